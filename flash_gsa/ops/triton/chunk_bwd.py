"""Backward kernels of the chunked GSA.

Gradients, per chunk (same notation as chunk_fwd; dz = gradient of the logits, dzs = scale * dz):
    dp  = (do @ hv^T) * exp(b) + value_decay(do v^T, s)           dz = p * (dp - sum_m p dp)
    dq  = (dzs * exp(b)) @ hk^T + key_decay(dzs, s) @ k
    dk  = key_decay(dzs, s)^T @ q + w @ dhk_out^T                  w = s * exp(b_last - b)
    dv  = key_decay(p, s)^T @ do + w @ dhv_out
    ds  = value_decay_t(q k^T, dzs) + value_decay_t(do v^T, p) + exp(b_last - b) * (k @ dhk_out + v @ dhv_out^T)
    dg_t = sum over the later tokens t' >= t of t's chunk of  db = p * dp + z * dz - s * ds,
           + <S_next, dh_out>, summed over K + V (per slot)
where dh*_out is the gradient of the state leaving the chunk, found by a reverse scan of the per-chunk gradients
    Y = [(dzs * exp(b))^T q | (p * exp(b))^T do]  (gradient of the state entering the chunk from its own outputs).
The last term of dg is what every later token adds, sum_{t' after the chunk} db_t' = dL/dg of the next chunk's first
token = <state leaving the chunk (S_next: the next chunk's entering state, or the final one), its gradient dh_out>.
Summing db over all later tokens of the sequence instead (a reverse cumulative sum across chunks) cancels terms that
are much larger than the result: with bf16 operands that left dg 7.4e-2 off at T = 8192, against 2-4e-3 for every
other gradient. The state form has no such cancellation.
The forward saved z, lse (so p = exp(z - lse) needs no recomputation of pass 1) and W = key_decay(p).
Buffers written here: p, dzs and pz = p*dp + z*dz [T', HQ, M] fp32; Wd = key_decay(dzs) [NC, HQ, C, C] and
Y [NC, HQ, M, K + V] in the state dtype; dg [T', H, M] fp32.
"""

import triton
import triton.language as tl

from .intra import dot, fast_path_ok, key_decay, value_decay, value_decay_t
from .tiles import chunk_block, chunk_span, load_slots, load_tile, state_tile, store_slots, store_tile


@triton.jit
def bwd_query_kernel(
    q,
    k,
    v,
    s,
    b_buf,
    S,
    do,
    z_buf,
    lse_buf,
    dq,
    p_buf,
    dzs_buf,
    pz_buf,
    Wd_buf,
    Y,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    scale,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
):
    """One program per (chunk, query head). Reads the forward's logits z and lse (p = exp(z - lse)), s, b, the
    states S entering the chunk, v, do, q, k. Writes dq, p, dzs, pz, Wd = key_decay(dzs) and Y."""
    c = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    HQ: tl.constexpr = H * G
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    live = tl.arange(0, C) < n_rows
    s_rows = s + t0 * (H * M) + h * M
    b_rows = b_buf + (c * H + h) * C * M
    write = load_slots(s, t0, h, H, n_rows, C, M)
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    fast = fast_path_ok(b, b_rows, C, M, SUB)
    z = load_slots(z_buf, t0, hq, HQ, n_rows, C, M)
    lse = tl.load(lse_buf + (t0 + tl.arange(0, C)) * HQ + hq, mask=live, other=0.0)
    p = tl.where(live[:, None], tl.exp(z - lse[:, None]), 0.0)

    dp_inter = tl.zeros([C, M], dtype=tl.float32)
    DV = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        dot_ = load_tile(do, t0, hq, HQ, V, v0, n_rows, C, BV)
        ptrs, mask = state_tile(S, c, h, H, M, K + V, K, V, v0, BV)
        dp_inter += dot(dot_, tl.trans(tl.load(ptrs, mask=mask, other=0.0).to(dot_.dtype)))  # do @ hv^T
        DV += dot(dot_, tl.trans(load_tile(v, t0, h, H, V, v0, n_rows, C, BV)))
    dp = dp_inter * tl.exp(b) + value_decay(DV, write, b, s_rows, H * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    dzs = scale * dz
    store_slots(p_buf, p, t0, hq, HQ, n_rows, C, M)
    store_slots(dzs_buf, dzs, t0, hq, HQ, n_rows, C, M)
    store_slots(pz_buf, p * dp + z * dz, t0, hq, HQ, n_rows, C, M)

    Wd = key_decay(dzs, write, b, s_rows, H * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
    tl.store(chunk_block(Wd_buf, c, hq, HQ, C, C), Wd.to(Wd_buf.dtype.element_ty))

    dze = (dzs * tl.exp(b)).to(q.dtype.element_ty)
    Wd = Wd.to(q.dtype.element_ty)
    for k0 in range(0, K, BK):
        qt = load_tile(q, t0, hq, HQ, K, k0, n_rows, C, BK)
        ptrs, mask = state_tile(S, c, h, H, M, K + V, 0, K, k0, BK)
        hk = tl.load(ptrs, mask=mask, other=0.0).to(qt.dtype)
        store_tile(dq, dot(dze, hk) + dot(Wd, load_tile(k, t0, h, H, K, k0, n_rows, C, BK)), t0, hq, HQ, K, k0,
                   n_rows, C, BK)
        ptrs, mask = state_tile(Y, c, hq, HQ, M, K + V, 0, K, k0, BK)
        tl.store(ptrs, dot(tl.trans(dze), qt).to(Y.dtype.element_ty), mask=mask)
    pe = tl.trans(p * tl.exp(b)).to(do.dtype.element_ty)
    for v0 in range(0, V, BV):
        ptrs, mask = state_tile(Y, c, hq, HQ, M, K + V, K, V, v0, BV)
        tl.store(ptrs, dot(pe, load_tile(do, t0, hq, HQ, V, v0, n_rows, C, BV)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bwd_kv_kernel(
    q,
    s,
    b_buf,
    b_last,
    D,
    do,
    W_buf,
    Wd_buf,
    dk,
    dv,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """One program per (chunk, kv-head, tile of K or of V). Reads s, b, the state gradient D leaving the chunk, and
    for each query head of the group q or do and Wd or W. Writes one tile of dk = Wd^T q + w D_k^T or
    dv = W^T do + w D_v."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    HQ: tl.constexpr = H * G
    NKT: tl.constexpr = (K + BK - 1) // BK
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    last = tl.load(b_last + (c * H + h) * M + tl.arange(0, M))
    w = (load_slots(s, t0, h, H, n_rows, C, M) * tl.exp(last[None, :] - b)).to(q.dtype.element_ty)
    # The branches use distinct names: Triton merges same-named values of both branches, which needs equal types.
    if tile < NKT:
        k0 = tile * BK
        ptrs_k, mask_k = state_tile(D, c, h, H, M, K + V, 0, K, k0, BK)
        acc_k = dot(w, tl.load(ptrs_k, mask=mask_k, other=0.0).to(w.dtype))
        for j in range(G):
            Wd = tl.load(chunk_block(Wd_buf, c, h * G + j, HQ, C, C)).to(w.dtype)
            acc_k += dot(tl.trans(Wd), load_tile(q, t0, h * G + j, HQ, K, k0, n_rows, C, BK))
        store_tile(dk, acc_k, t0, h, H, K, k0, n_rows, C, BK)
    else:
        v0 = (tile - NKT) * BV
        ptrs_v, mask_v = state_tile(D, c, h, H, M, K + V, K, V, v0, BV)
        acc_v = dot(w, tl.load(ptrs_v, mask=mask_v, other=0.0).to(w.dtype))
        for j in range(G):
            W = tl.load(chunk_block(W_buf, c, h * G + j, HQ, C, C)).to(w.dtype)
            acc_v += dot(tl.trans(W), load_tile(do, t0, h * G + j, HQ, V, v0, n_rows, C, BV))
        store_tile(dv, acc_v, t0, h, H, V, v0, n_rows, C, BV)


@triton.jit
def bwd_gate_kernel(
    q,
    k,
    v,
    s,
    b_buf,
    b_last,
    S,
    final,
    D,
    do,
    p_buf,
    dzs_buf,
    pz_buf,
    ds,
    dg,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    chunk_offsets,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    SUB: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
):
    """One program per (chunk, kv-head). Reads q, k, v, do, s, b, the state gradient D leaving the chunk, the state
    leaving it (S of the next chunk, or `final` [N, H, M, K + V] fp32 after a sequence's last chunk) and the
    p/dzs/pz buffers of the group's query heads. Writes ds and dg."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    HQ: tl.constexpr = H * G
    KV: tl.constexpr = K + V
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    write = load_slots(s, t0, h, H, n_rows, C, M)
    b_rows = b_buf + (c * H + h) * C * M
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    fast = fast_path_ok(b, b_rows, C, M, SUB)
    last = tl.load(b_last + (c * H + h) * M + tl.arange(0, M))
    n = tl.load(chunk_seq + c)
    inside = c + 1 < tl.load(chunk_offsets + n + 1)  # else the sequence's last chunk: the state leaving it is final

    from_state = tl.zeros([C, M], dtype=tl.float32)  # k @ dhk_out + v @ dhv_out^T
    later = tl.zeros([M], dtype=tl.float32)  # <state leaving the chunk, dh_out>: what later tokens add to dg
    for k0 in range(0, K, BK):
        kt = load_tile(k, t0, h, H, K, k0, n_rows, C, BK)
        ptrs, mask = state_tile(D, c, h, H, M, KV, 0, K, k0, BK)
        d_out = tl.load(ptrs, mask=mask, other=0.0)
        from_state += dot(kt, tl.trans(d_out.to(kt.dtype)))
        later += tl.sum(_state_leaving(S, final, c, n, h, H, M, KV, 0, K, k0, BK, inside) * d_out, axis=1)
    for v0 in range(0, V, BV):
        vt = load_tile(v, t0, h, H, V, v0, n_rows, C, BV)
        ptrs, mask = state_tile(D, c, h, H, M, KV, K, V, v0, BV)
        d_out = tl.load(ptrs, mask=mask, other=0.0)
        from_state += dot(vt, tl.trans(d_out.to(vt.dtype)))
        later += tl.sum(_state_leaving(S, final, c, n, h, H, M, KV, K, V, v0, BV, inside) * d_out, axis=1)
    grad_s = from_state * tl.exp(last[None, :] - b)

    pz = tl.zeros([C, M], dtype=tl.float32)
    for j in range(G):
        hq = h * G + j
        A = tl.zeros([C, C], dtype=tl.float32)
        for k0 in range(0, K, BK):
            qt = load_tile(q, t0, hq, HQ, K, k0, n_rows, C, BK)
            A += dot(qt, tl.trans(load_tile(k, t0, h, H, K, k0, n_rows, C, BK)))
        DV = tl.zeros([C, C], dtype=tl.float32)
        for v0 in range(0, V, BV):
            dot_ = load_tile(do, t0, hq, HQ, V, v0, n_rows, C, BV)
            DV += dot(dot_, tl.trans(load_tile(v, t0, h, H, V, v0, n_rows, C, BV)))
        head_rows = t0 * (HQ * M) + hq * M
        dzs = load_slots(dzs_buf, t0, hq, HQ, n_rows, C, M)
        p = load_slots(p_buf, t0, hq, HQ, n_rows, C, M)
        grad_s += value_decay_t(A, dzs, b, dzs_buf + head_rows, HQ * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
        grad_s += value_decay_t(DV, p, b, p_buf + head_rows, HQ * M, b_rows, n_rows, fast, C, M, SUB, LOWP)
        pz += load_slots(pz_buf, t0, hq, HQ, n_rows, C, M)

    store_slots(ds, grad_s, t0, h, H, n_rows, C, M)
    db = pz - write * grad_s
    store_slots(dg, tl.cumsum(db, axis=0, reverse=True) + later[None, :], t0, h, H, n_rows, C, M)


@triton.jit
def _state_leaving(S, final, c, n, h, H: tl.constexpr, M: tl.constexpr, KV: tl.constexpr, start, D: tl.constexpr, d0,
                   BD: tl.constexpr, inside):
    """Tile [M, BD] (fp32) of the state leaving chunk c: the state entering chunk c + 1, or the sequence's final
    state when c is its last chunk (two masked loads, one of which reads nothing)."""
    ptrs, mask = state_tile(S, c + 1, h, H, M, KV, start, D, d0, BD)
    inner = tl.load(ptrs, mask=mask & inside, other=0.0).to(tl.float32)
    ptrs, mask = state_tile(final, n, h, H, M, KV, start, D, d0, BD)
    return inner + tl.load(ptrs, mask=mask & (inside == 0), other=0.0)

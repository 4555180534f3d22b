"""Backward kernels of the chunked GSA.

Gradients, per chunk (same notation as chunk_fwd; dz = gradient of the logits, dzs = scale * dz):
    dp  = (do @ hv^T) * exp(b) + value_decay(do v^T, s)           dz = p * (dp - sum_m p dp)
    dq  = (dzs * exp(b)) @ hk^T + key_decay(dzs, s) @ k
    dk  = key_decay(dzs, s)^T @ q + w @ dhk_out^T                  w = s * exp(b_last - b)
    dv  = key_decay(p, s)^T @ do + w @ dhv_out
    ds  = value_decay_t(q k^T, dzs) + value_decay_t(do v^T, p) + exp(b_last - b) * (k @ dhk_out + v @ dhv_out^T)
    dg_t = sum over the later tokens t' >= t of t's chunk of  db = p * dp + z * dz - s * ds,
           + <S_next, dh_out>, summed over K + V (per slot)
where dh*_out is the gradient of the state leaving the chunk, found by a reverse scan (scan.py) that adds each
chunk's own gradient of the state entering it: [(dzs * exp(b))^T q | (p * exp(b))^T do].
The last term of dg is what every later token adds, sum_{t' after the chunk} db_t' = dL/dg of the next chunk's first
token = <state leaving the chunk (S_next), its gradient dh_out>. Summing db over all later tokens of the sequence
instead (a reverse cumulative sum across chunks) cancels terms that are much larger than the result: with bf16
operands that left dg 7.4e-2 off at T = 8192, against 2-4e-3 for every other gradient. The state form has no such
cancellation: S_next = exp(b_last) * S + w^T [k | v] (S: the state entering the chunk), so <S_next, dh_out> =
exp(b_last) * <S, dh_out> + sum over the chunk's tokens of w * (k @ dhk_out + v @ dhv_out^T), whose last factor ds
needs anyway.

The backward runs in halves, values first, as only the hk half of the reverse scan depends on dp:
    reverse scan, hv half (weights p * exp(b), which the forward saved, with do)   -> dhv_out
    bwd_values (per chunk and query head): reads v, do, the hv halves of S and dh_out once; forms dp, dz, dv and
        every term of ds and dg that is not a keys' term                            -> weights dzs * exp(b) ...
    reverse scan, hk half (weights dzs * exp(b), with q)                           -> dhk_out
    bwd_keys (per chunk and kv-head): reads q, k, the hk halves of S and dh_out once; forms dq, dk, ds and dg.
Each token tensor and each half of the states is read by one kernel of the backward besides the scans (the earlier
split, a slot-level kernel and then one for every token gradient, read v, do and the hv half twice).
The forward saved z, lse (so p = exp(z - lse) needs no recomputation of pass 1), W = key_decay(p), q k^T and
p * exp(b).
Buffers written here: wq = dzs * exp(b) [NC, HQ, C, M] in q's dtype and Wd = key_decay(dzs) [NC, HQ, C, C] (dq, dk
and the hk scan), dsv [T', HQ, M] fp32 (ds but its keys' term), pz = p * dp + z * dz [T', HQ, M] in the state dtype,
later [NC, HQ, M] fp32 (dg's state term but its keys' part); with grouped heads (G > 1) dv per query head in fp32,
summed over the group afterwards; on the exact intra-chunk path p and dzs [T', HQ, M] in the state dtype (its
diagonal loops read their rows back).
"""

import triton
import triton.language as tl

from .intra import any_exact, dot, is_exact, key_decay_exact, mm, tril, value_decay_exact, value_decay_t_exact
from .tiles import chunk_block, chunk_span, load_slots, load_tile, state_tile, store_slots, store_tile


@triton.jit(do_not_specialize=["n_items"])
def bwd_values_kernel(
    v,
    s,
    b_buf,
    b_last,
    S,
    D,
    do,
    z_buf,
    lse_buf,
    W_buf,
    QK_buf,
    p_buf,
    dzs_buf,
    pz_buf,
    dsv_buf,
    later_buf,
    Wd_buf,
    wq_buf,
    dv,
    exact_buf,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    scale,
    n_items,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
    EXACT: tl.constexpr,
    ITEMS: tl.constexpr,
):
    """The values' half of the backward for the chunks whose `exact` flag is EXACT: programs as chunk_output_kernel's
    (per chunk and query head; on the exact path per ITEMS (chunk, kv-head) pairs). _bwd_values says what each chunk
    reads and writes."""
    if EXACT:
        first = tl.program_id(0) * ITEMS
        if any_exact(exact_buf, first, n_items, ITEMS):
            for j in range(ITEMS):
                if is_exact(exact_buf, first + j, n_items):
                    for g in range(G):
                        _bwd_values(v, s, b_buf, b_last, S, D, do, z_buf, lse_buf, W_buf, QK_buf, p_buf, dzs_buf,
                                    pz_buf, dsv_buf, later_buf, Wd_buf, wq_buf, dv, cu_seqlens, chunk_seq,
                                    chunk_start, scale, (first + j) // H, (first + j) % H * G + g, H, G, K, V, M, C,
                                    BV, LOWP, EXACT)
    else:
        c = tl.program_id(0)
        hq = tl.program_id(1)
        if tl.load(exact_buf + c * H + hq // G) == 0:
            _bwd_values(v, s, b_buf, b_last, S, D, do, z_buf, lse_buf, W_buf, QK_buf, p_buf, dzs_buf, pz_buf,
                        dsv_buf, later_buf, Wd_buf, wq_buf, dv, cu_seqlens, chunk_seq, chunk_start, scale, c, hq, H, G,
                        K, V, M, C, BV, LOWP, EXACT)


@triton.jit
def _bwd_values(v, s, b_buf, b_last, S, D, do, z_buf, lse_buf, W_buf, QK_buf, p_buf, dzs_buf, pz_buf, dsv_buf,
                later_buf, Wd_buf, wq_buf, dv, cu_seqlens, chunk_seq, chunk_start, scale, c, hq, H: tl.constexpr,
                G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr,
                BV: tl.constexpr, LOWP: tl.constexpr, EXACT: tl.constexpr):
    """Chunk c, query head hq. Reads v, do, s, b, b_last, the hv halves of the state S entering the chunk and of the
    gradient D of the state leaving it, and the forward's z, lse, W and q k^T. One pass over the V tiles reads each of
    v, do, hv and dhv_out once. Writes dv (the head's part, G > 1), wq, Wd, pz, dsv, later (and p, dzs on the exact
    path). The kv-head's state terms (w @ dhv_out in dv, v @ dhv_out^T in ds, <S, dh_out> in dg) are taken by the
    first query head of its group alone: the others load no dhv_out."""
    h = hq // G
    HQ: tl.constexpr = H * G
    KV: tl.constexpr = K + V
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    live = tl.arange(0, C) < n_rows
    s_rows = s + t0 * (H * M) + h * M
    b_rows = b_buf + (c * H + h) * C * M
    first = hq % G == 0
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    last = tl.load(b_last + (c * H + h) * M + tl.arange(0, M))
    w = (load_slots(s, t0, h, H, n_rows, C, M) * tl.exp(last[None, :] - b)).to(v.dtype.element_ty)
    W = tl.load(chunk_block(W_buf, c, hq, HQ, C, C)).to(v.dtype.element_ty)  # key_decay(p, s), from the forward
    dp_inter = tl.zeros([C, M], dtype=tl.float32)  # do @ hv^T
    DV = tl.zeros([C, C], dtype=tl.float32)  # do @ v^T
    from_state = tl.zeros([C, M], dtype=tl.float32)  # v @ dhv_out^T
    entering = tl.zeros([M], dtype=tl.float32)  # <hv entering the chunk, dhv_out>
    for v0 in range(0, V, BV):
        dot_ = load_tile(do, t0, hq, HQ, V, v0, n_rows, C, BV)
        vt = load_tile(v, t0, h, H, V, v0, n_rows, C, BV)
        ptrs, mask = state_tile(S, c, h, H, M, KV, K, V, v0, BV)
        hv = tl.load(ptrs, mask=mask, other=0.0).to(vt.dtype)
        ptrs, mask = state_tile(D, c, h, H, M, KV, K, V, v0, BV)
        d_out = tl.load(ptrs, mask=mask & first, other=0.0).to(vt.dtype)
        dp_inter += dot(dot_, tl.trans(hv))
        DV += dot(dot_, tl.trans(vt))
        from_state += dot(vt, tl.trans(d_out))
        entering += tl.sum(hv.to(tl.float32) * d_out.to(tl.float32), axis=1)
        store_tile(dv, dot(tl.trans(W), dot_) + dot(w, d_out), t0, hq, HQ, V, v0, n_rows, C, BV)

    # the state terms: v @ dhv_out^T, carried to each token's slots (ds), and <S_next, dh_out> over the hv columns (dg).
    # The epilogue keeps few [C, M] tensors live at once (b, s and z are loaded again, exps formed again, the ds term
    # parked in dsv): with more, ptxas spills.
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))  # loaded again rather than kept through the tile loop
    carried = from_state * tl.exp(last[None, :] - b)
    later = entering * tl.exp(last) + tl.sum(load_slots(s, t0, h, H, n_rows, C, M) * carried, axis=0)
    tl.store(later_buf + (c * HQ + hq) * M + tl.arange(0, M), later)
    store_slots(dsv_buf, carried, t0, hq, HQ, n_rows, C, M)  # the rest of ds is added below

    write = load_slots(s, t0, h, H, n_rows, C, M)
    if EXACT:
        dp = dp_inter * tl.exp(b) + value_decay_exact(DV, b, s_rows, H * M, b_rows, n_rows, C, M)
    else:  # intra.py's fast path
        se = write * tl.exp(-b)
        dp = tl.exp(b) * (dp_inter + mm(tril(DV, C), se, LOWP))
    lse = tl.load(lse_buf + (t0 + tl.arange(0, C)) * HQ + hq, mask=live, other=0.0)
    p = tl.where(live[:, None], tl.exp(load_slots(z_buf, t0, hq, HQ, n_rows, C, M) - lse[:, None]), 0.0)
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    store_slots(pz_buf, p * dp + load_slots(z_buf, t0, hq, HQ, n_rows, C, M) * dz, t0, hq, HQ, n_rows, C, M)
    dzs = scale * dz
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    dzse = dzs * tl.exp(b)
    tl.store(chunk_block(wq_buf, c, hq, HQ, C, M), dzse.to(wq_buf.dtype.element_ty))
    if EXACT:  # the diagonal loops read rows of p and dzs back
        store_slots(p_buf, p, t0, hq, HQ, n_rows, C, M)
        store_slots(dzs_buf, dzs, t0, hq, HQ, n_rows, C, M)
        tl.debug_barrier()
        Wd = key_decay_exact(dzs, b, s_rows, H * M, b_rows, n_rows, C, M)
        rows_q = t0 * (HQ * M) + hq * M
        intra = value_decay_t_exact(DV, b, p_buf + rows_q, HQ * M, b_rows, n_rows, C, M)
        A = tl.load(chunk_block(QK_buf, c, hq, HQ, C, C)).to(tl.float32)
        intra += value_decay_t_exact(A, b, dzs_buf + rows_q, HQ * M, b_rows, n_rows, C, M)
    else:
        Wd = tril(mm(dzse, tl.trans(se), LOWP), C)
        part = mm(tl.trans(tril(DV, C)), p * tl.exp(b), LOWP)
        A = tril(tl.load(chunk_block(QK_buf, c, hq, HQ, C, C)).to(tl.float32), C)
        part += mm(tl.trans(A), dzse, LOWP)
        b = tl.load(chunk_block(b_buf, c, h, H, C, M))
        intra = tl.exp(-b) * part
    tl.store(chunk_block(Wd_buf, c, hq, HQ, C, C), Wd.to(Wd_buf.dtype.element_ty))
    tl.debug_barrier()  # dsv's store above, before its load
    store_slots(dsv_buf, intra + load_slots(dsv_buf, t0, hq, HQ, n_rows, C, M), t0, hq, HQ, n_rows, C, M)


@triton.jit
def bwd_keys_kernel(
    q,
    k,
    s,
    b_buf,
    b_last,
    S,
    D,
    Wd_buf,
    wq_buf,
    dsv_buf,
    pz_buf,
    later_buf,
    dq,
    dk,
    ds,
    dg,
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
):
    """The keys' half of the backward, one program per (chunk, kv-head); no intra-chunk decay product, so one path
    for every chunk. Reads q and the Wd, wq of the group's query heads, k, s, b, b_last, the hk halves of the state S
    entering the chunk and of the gradient D of the state leaving it, and bwd_values' dsv, pz and later. One pass over
    the K tiles reads each of q, k, hk and dhk_out once. Writes dq (of the group's heads), dk, ds and dg."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    HQ: tl.constexpr = H * G
    KV: tl.constexpr = K + V
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    last = tl.load(b_last + (c * H + h) * M + tl.arange(0, M))
    w = (load_slots(s, t0, h, H, n_rows, C, M) * tl.exp(last[None, :] - b)).to(k.dtype.element_ty)
    Wd0 = tl.load(chunk_block(Wd_buf, c, h * G, HQ, C, C))  # the first head's weights, loaded once; the other
    wq0 = tl.load(chunk_block(wq_buf, c, h * G, HQ, C, M))  # heads' are loaded per tile
    from_state = tl.zeros([C, M], dtype=tl.float32)  # k @ dhk_out^T
    entering = tl.zeros([M], dtype=tl.float32)  # <hk entering the chunk, dhk_out>
    for k0 in range(0, K, BK):
        kt = load_tile(k, t0, h, H, K, k0, n_rows, C, BK)
        ptrs, mask = state_tile(D, c, h, H, M, KV, 0, K, k0, BK)
        d_out = tl.load(ptrs, mask=mask, other=0.0).to(kt.dtype)
        ptrs, mask = state_tile(S, c, h, H, M, KV, 0, K, k0, BK)
        hk = tl.load(ptrs, mask=mask, other=0.0).to(kt.dtype)
        from_state += dot(kt, tl.trans(d_out))
        entering += tl.sum(hk.to(tl.float32) * d_out.to(tl.float32), axis=1)
        grad_k = dot(w, d_out)
        for j in tl.static_range(G):
            hq = h * G + j
            qt = load_tile(q, t0, hq, HQ, K, k0, n_rows, C, BK)
            if j == 0:
                Wd = Wd0.to(kt.dtype)
                wq = wq0.to(kt.dtype)
            else:
                Wd = tl.load(chunk_block(Wd_buf, c, hq, HQ, C, C)).to(kt.dtype)
                wq = tl.load(chunk_block(wq_buf, c, hq, HQ, C, M)).to(kt.dtype)
            grad_k += dot(tl.trans(Wd), qt)
            store_tile(dq, dot(wq, hk) + dot(Wd, kt), t0, hq, HQ, K, k0, n_rows, C, BK)  # dq = wq @ hk + Wd @ k
        store_tile(dk, grad_k, t0, h, H, K, k0, n_rows, C, BK)

    b = tl.load(chunk_block(b_buf, c, h, H, C, M))  # loaded again rather than kept through the tile loop
    grad_s = from_state * tl.exp(last[None, :] - b)
    later = entering * tl.exp(last) + tl.sum(load_slots(s, t0, h, H, n_rows, C, M) * grad_s, axis=0)
    for j in range(G):  # the values' half, per query head of the group
        hq = h * G + j
        grad_s += load_slots(dsv_buf, t0, hq, HQ, n_rows, C, M)
        later += tl.load(later_buf + (c * HQ + hq) * M + tl.arange(0, M))
    store_slots(ds, grad_s, t0, h, H, n_rows, C, M)
    db = -load_slots(s, t0, h, H, n_rows, C, M) * grad_s
    for j in range(G):
        db += load_slots(pz_buf, t0, h * G + j, HQ, n_rows, C, M)
    store_slots(dg, tl.cumsum(db, axis=0, reverse=True) + later[None, :], t0, h, H, n_rows, C, M)

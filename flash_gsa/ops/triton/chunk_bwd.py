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
chunk's own gradient of the state entering it, [(dzs * exp(b))^T q | (p * exp(b))^T do], from the weights
wq = dzs * exp(b) and wdo = p * exp(b) that bwd_slots writes.
The last term of dg is what every later token adds, sum_{t' after the chunk} db_t' = dL/dg of the next chunk's first
token = <state leaving the chunk (S_next: the next chunk's entering state, or the final one), its gradient dh_out>.
Summing db over all later tokens of the sequence instead (a reverse cumulative sum across chunks) cancels terms that
are much larger than the result: with bf16 operands that left dg 7.4e-2 off at T = 8192, against 2-4e-3 for every
other gradient. The state form has no such cancellation. bwd_tokens forms it from the state entering the chunk S:
S_next = exp(b_last) * S + w^T [k | v], so <S_next, dh_out> = exp(b_last) * <S, dh_out> + sum over the chunk's tokens
of w * (k @ dhk_out + v @ dhv_out^T), whose last factor ds needs anyway.
The forward saved z, lse (so p = exp(z - lse) needs no recomputation of pass 1), W = key_decay(p) and q k^T; bwd_slots
saves do v^T for bwd_tokens (those [C, C] products would otherwise take bwd_tokens one more matrix product per tile).
Two kernels around the reverse scan: bwd_slots (per chunk and query head) forms the slot-level gradients, which need
only the hv half of the states; bwd_tokens (per chunk and kv-head) forms every token gradient, dq included: the hk
tiles that dq takes are the ones it reads for <S, dh_out> anyway, so no kernel reads the hk half twice.
Buffers written here: p, dzs and pz = p*dp + z*dz [T', HQ, M] in the state dtype; Wd = key_decay(dzs) and DV =
do v^T [NC, HQ, C, C] in the state dtype; wq and wdo [NC, HQ, C, M] in q's dtype; dg [T', H, M] in g's dtype (summed
in fp32).
"""

import triton
import triton.language as tl

from .intra import any_exact, dot, is_exact, key_decay, value_decay, value_decay_t
from .tiles import chunk_block, chunk_span, load_slots, load_tile, state_tile, store_slots, store_tile


@triton.jit(do_not_specialize=["n_items"])
def bwd_slots_kernel(
    v,
    s,
    b_buf,
    S,
    do,
    z_buf,
    lse_buf,
    p_buf,
    dzs_buf,
    pz_buf,
    Wd_buf,
    wq_buf,
    wdo_buf,
    DV_buf,
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
    SUB: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
    EXACT: tl.constexpr,
    ITEMS: tl.constexpr,
):
    """The slot-level gradients of the chunks whose `exact` flag is EXACT: programs as chunk_output_kernel's (per
    chunk and query head; on the exact path per ITEMS (chunk, kv-head) pairs). _bwd_slots says what each chunk reads
    and writes."""
    if EXACT:
        first = tl.program_id(0) * ITEMS
        if any_exact(exact_buf, first, n_items, ITEMS):
            for j in range(ITEMS):
                if is_exact(exact_buf, first + j, n_items):
                    for g in range(G):
                        _bwd_slots(v, s, b_buf, S, do, z_buf, lse_buf, p_buf, dzs_buf, pz_buf, Wd_buf, wq_buf,
                                   wdo_buf, DV_buf, cu_seqlens, chunk_seq, chunk_start, scale, (first + j) // H,
                                   (first + j) % H * G + g, H, G, K, V, M, C, SUB, BV, LOWP, EXACT)
    else:
        c = tl.program_id(0)
        hq = tl.program_id(1)
        if tl.load(exact_buf + c * H + hq // G) == 0:
            _bwd_slots(v, s, b_buf, S, do, z_buf, lse_buf, p_buf, dzs_buf, pz_buf, Wd_buf, wq_buf, wdo_buf, DV_buf,
                       cu_seqlens, chunk_seq, chunk_start, scale, c, hq, H, G, K, V, M, C, SUB, BV, LOWP, EXACT)


@triton.jit
def _bwd_slots(v, s, b_buf, S, do, z_buf, lse_buf, p_buf, dzs_buf, pz_buf, Wd_buf, wq_buf, wdo_buf, DV_buf, cu_seqlens,
               chunk_seq, chunk_start, scale, c, hq, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
               V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, BV: tl.constexpr,
               LOWP: tl.constexpr, EXACT: tl.constexpr):
    """Chunk c, query head hq. Reads the forward's logits z and lse (p = exp(z - lse)), s, b, the hv half of the
    states S entering the chunk, v and do. Writes p, dzs, pz, Wd = key_decay(dzs), DV = do v^T and the scan's weights
    wq = dzs * exp(b) and wdo = p * exp(b) (0 past the sequence's end)."""
    h = hq // G
    HQ: tl.constexpr = H * G
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    live = tl.arange(0, C) < n_rows
    s_rows = s + t0 * (H * M) + h * M
    b_rows = b_buf + (c * H + h) * C * M
    dp_inter = tl.zeros([C, M], dtype=tl.float32)
    DV = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        dot_ = load_tile(do, t0, hq, HQ, V, v0, n_rows, C, BV)
        ptrs, mask = state_tile(S, c, h, H, M, K + V, K, V, v0, BV)
        dp_inter += dot(dot_, tl.trans(tl.load(ptrs, mask=mask, other=0.0).to(dot_.dtype)))  # do @ hv^T
        DV += dot(dot_, tl.trans(load_tile(v, t0, h, H, V, v0, n_rows, C, BV)))
    tl.store(chunk_block(DV_buf, c, hq, HQ, C, C), DV.to(DV_buf.dtype.element_ty))  # do v^T, for bwd_tokens
    write = load_slots(s, t0, h, H, n_rows, C, M)
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    dp = dp_inter * tl.exp(b) + value_decay(DV, write, b, s_rows, H * M, b_rows, n_rows, C, M, SUB, LOWP, EXACT)
    lse = tl.load(lse_buf + (t0 + tl.arange(0, C)) * HQ + hq, mask=live, other=0.0)
    p = tl.where(live[:, None], tl.exp(load_slots(z_buf, t0, hq, HQ, n_rows, C, M) - lse[:, None]), 0.0)
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    dzs = scale * dz
    store_slots(p_buf, p, t0, hq, HQ, n_rows, C, M)
    store_slots(dzs_buf, dzs, t0, hq, HQ, n_rows, C, M)
    z = load_slots(z_buf, t0, hq, HQ, n_rows, C, M)  # loaded again rather than kept: fewer live registers
    store_slots(pz_buf, p * dp + z * dz, t0, hq, HQ, n_rows, C, M)
    tl.store(chunk_block(wdo_buf, c, hq, HQ, C, M), (p * tl.exp(b)).to(wdo_buf.dtype.element_ty))

    write = load_slots(s, t0, h, H, n_rows, C, M)  # s and b loaded again rather than kept: fewer live registers
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    Wd = key_decay(dzs, write, b, s_rows, H * M, b_rows, n_rows, C, M, SUB, LOWP, EXACT)
    tl.store(chunk_block(Wd_buf, c, hq, HQ, C, C), Wd.to(Wd_buf.dtype.element_ty))

    tl.store(chunk_block(wq_buf, c, hq, HQ, C, M), (dzs * tl.exp(b)).to(wq_buf.dtype.element_ty))


@triton.jit(do_not_specialize=["n_items"])
def bwd_tokens_kernel(
    q,
    k,
    v,
    s,
    b_buf,
    b_last,
    S,
    D,
    do,
    W_buf,
    Wd_buf,
    wq_buf,
    QK_buf,
    DV_buf,
    p_buf,
    dzs_buf,
    pz_buf,
    dq,
    dk,
    dv,
    ds,
    dg,
    exact_buf,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    n_items,
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
    EXACT: tl.constexpr,
    ITEMS: tl.constexpr,
):
    """Every token gradient of the chunks whose `exact` flag is EXACT: on the fast path one program per (chunk,
    kv-head), on the exact path one per ITEMS of the n_items = NC * H (chunk, kv-head) pairs. _bwd_tokens says what
    each chunk reads and writes."""
    if EXACT:
        first = tl.program_id(0) * ITEMS
        if any_exact(exact_buf, first, n_items, ITEMS):
            for j in range(ITEMS):
                if is_exact(exact_buf, first + j, n_items):
                    _bwd_tokens(q, k, v, s, b_buf, b_last, S, D, do, W_buf, Wd_buf, wq_buf, QK_buf, DV_buf, p_buf,
                                dzs_buf, pz_buf, dq, dk, dv, ds, dg, cu_seqlens, chunk_seq, chunk_start,
                                (first + j) // H, (first + j) % H, H, G, K, V, M, C, SUB, BK, BV, LOWP, EXACT)
    else:
        c = tl.program_id(0)
        h = tl.program_id(1)
        if tl.load(exact_buf + c * H + h) == 0:
            _bwd_tokens(q, k, v, s, b_buf, b_last, S, D, do, W_buf, Wd_buf, wq_buf, QK_buf, DV_buf, p_buf, dzs_buf,
                        pz_buf, dq, dk, dv, ds, dg, cu_seqlens, chunk_seq, chunk_start, c, h, H, G, K, V, M, C, SUB,
                        BK, BV, LOWP, EXACT)


@triton.jit
def _bwd_tokens(q, k, v, s, b_buf, b_last, S, D, do, W_buf, Wd_buf, wq_buf, QK_buf, DV_buf, p_buf, dzs_buf, pz_buf, dq,
                dk, dv, ds, dg, cu_seqlens, chunk_seq, chunk_start, c, h, H: tl.constexpr, G: tl.constexpr,
                K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr, EXACT: tl.constexpr):
    """Chunk c, kv-head h: every token gradient of the kv-head and of its group's query heads. Reads q, k, v, do, s,
    b, the state gradient D leaving the chunk, the state S entering it, and W, Wd, wq, the saved q k^T and do v^T and
    the p/dzs/pz buffers of the group's query heads. Writes dq (of the group's heads), dk, dv, ds and dg. One pass
    over the K tiles and one over the V tiles read each of q, k, v, do, S and D once."""
    HQ: tl.constexpr = H * G
    KV: tl.constexpr = K + V
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    b_rows = b_buf + (c * H + h) * C * M
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    last = tl.load(b_last + (c * H + h) * M + tl.arange(0, M))
    w = (load_slots(s, t0, h, H, n_rows, C, M) * tl.exp(last[None, :] - b)).to(k.dtype.element_ty)
    # keys: dk, dq and k @ dhk_out^T; then values: dv and v @ dhv_out
    from_state = tl.zeros([C, M], dtype=tl.float32)  # k @ dhk_out + v @ dhv_out^T
    entering = tl.zeros([M], dtype=tl.float32)  # <state entering the chunk, dh_out>
    from_state, entering = _grad_half(k, q, Wd_buf, dk, D, S, w, from_state, entering, c, h, t0, n_rows, 0, H, G, K,
                                      M, KV, C, BK, wq_buf, dq, True)
    from_state, entering = _grad_half(v, do, W_buf, dv, D, S, w, from_state, entering, c, h, t0, n_rows, K, H, G, V,
                                      M, KV, C, BV, wq_buf, dq, False)
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))  # loaded again rather than kept through the tile loops
    carried = from_state * tl.exp(last[None, :] - b)
    # <state leaving the chunk, dh_out>, what later tokens add to dg: the leaving state is exp(b_last) * the entering
    # one + w^T [k | v] (w = s * exp(b_last - b)), so it is exp(b_last) * entering + sum over the chunk of s * carried
    later = entering * tl.exp(last) + tl.sum(load_slots(s, t0, h, H, n_rows, C, M) * carried, axis=0)
    grad_s = carried
    for j in range(G):  # the intra-chunk terms of each query head of the group, from the saved q k^T and do v^T
        hq = h * G + j
        rows_j = t0 * (HQ * M) + hq * M
        A = tl.load(chunk_block(QK_buf, c, hq, HQ, C, C)).to(tl.float32)
        dzs = load_slots(dzs_buf, t0, hq, HQ, n_rows, C, M)
        grad_s += value_decay_t(A, dzs, b, dzs_buf + rows_j, HQ * M, b_rows, n_rows, C, M, SUB, LOWP, EXACT)
        DV = tl.load(chunk_block(DV_buf, c, hq, HQ, C, C)).to(tl.float32)
        p = load_slots(p_buf, t0, hq, HQ, n_rows, C, M)
        grad_s += value_decay_t(DV, p, b, p_buf + rows_j, HQ * M, b_rows, n_rows, C, M, SUB, LOWP, EXACT)

    store_slots(ds, grad_s, t0, h, H, n_rows, C, M)
    db = -load_slots(s, t0, h, H, n_rows, C, M) * grad_s  # loaded last, as pz: shorter lives, fewer spills
    for j in range(G):
        db += load_slots(pz_buf, t0, h * G + j, HQ, n_rows, C, M)
    store_slots(dg, tl.cumsum(db, axis=0, reverse=True) + later[None, :], t0, h, H, n_rows, C, M)


@triton.jit
def _grad_half(x, src, W_buf, out, D, S, w, from_state, entering, c, h, t0, n_rows, start: tl.constexpr,
               H: tl.constexpr, G: tl.constexpr, width: tl.constexpr, M: tl.constexpr, KV: tl.constexpr,
               C: tl.constexpr, BD: tl.constexpr, wq_buf, dq, QUERY: tl.constexpr):
    """One half of bwd_tokens' tile loops: keys (x = k, src = q, W = Wd, out = dk, start = 0, QUERY: also dq) or
    values (x = v, src = do, W = W, out = dv, start = K). Writes out = w @ D_half + sum_j W_j^T src_j over the group's
    query heads j (and, QUERY, dq_j = wq_j @ hk + Wd_j @ k from the same state tiles), and returns from_state +
    x @ D_half^T [C, M] and entering + <state entering the chunk, D> over the half's columns [M]."""
    HQ: tl.constexpr = H * G
    W0 = tl.load(chunk_block(W_buf, c, h * G, HQ, C, C))  # the first head's [C, C] weights, loaded once
    if QUERY:  # ... and its dq weights (the other heads' are loaded per tile)
        wq0 = tl.load(chunk_block(wq_buf, c, h * G, HQ, C, M))
    for d0 in range(0, width, BD):
        xt = load_tile(x, t0, h, H, width, d0, n_rows, C, BD)
        ptrs, mask = state_tile(D, c, h, H, M, KV, start, width, d0, BD)
        d_out = tl.load(ptrs, mask=mask, other=0.0).to(xt.dtype)
        from_state += dot(xt, tl.trans(d_out))
        ptrs, mask = state_tile(S, c, h, H, M, KV, start, width, d0, BD)
        state = tl.load(ptrs, mask=mask, other=0.0).to(xt.dtype)
        entering += tl.sum(state.to(tl.float32) * d_out.to(tl.float32), axis=1)
        acc = dot(w, d_out)
        for j in tl.static_range(G):
            st = load_tile(src, t0, h * G + j, HQ, width, d0, n_rows, C, BD)
            if j == 0:
                Wj = W0.to(st.dtype)
            else:
                Wj = tl.load(chunk_block(W_buf, c, h * G + j, HQ, C, C)).to(st.dtype)
            acc += dot(tl.trans(Wj), st)
            if QUERY:  # dq = wq @ hk + Wd @ k
                if j == 0:
                    wq = wq0.to(xt.dtype)
                else:
                    wq = tl.load(chunk_block(wq_buf, c, h * G + j, HQ, C, M)).to(xt.dtype)
                store_tile(dq, dot(wq, state) + dot(Wj, xt), t0, h * G + j, HQ, width, d0, n_rows, C, BD)
        store_tile(out, acc, t0, h, H, width, d0, n_rows, C, BD)
    return from_state, entering

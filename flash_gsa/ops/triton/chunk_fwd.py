"""Forward kernels of the chunked GSA: the chunk-local gates and the outputs (scan.py forms the states entering
each chunk in between).

Layouts (all contiguous; T' = tokens of all sequences packed; NC = chunks of all sequences):
    q [T', HQ, K], k [T', H, K], v [T', H, V], g, s [T', H, M], o [T', HQ, V]
    b      [NC, H, C, M] fp32: cumulative log-gate inside each chunk (rows past a short chunk's end repeat its last)
    b_last [NC, H, M]    fp32: log-decay over the whole chunk
    w      [NC, H, C, M] in k's dtype: the weights with which each token enters the state leaving its chunk
    S      [NC, H, M, K + V]: both states side by side, slot-major: S[..., :K] = hk^T, S[..., K:] = hv (bf16 for
           16-bit inputs, else fp32; see function.state_dtype)
    z [T', HQ, M] fp32 and lse [T', HQ] fp32: the slot logits and their log-sum-exp; W [NC, HQ, C, C]: pass-2
           weights; QK [NC, HQ, C, C]: q k^T; wdo [NC, HQ, C, M] in q's dtype: p * exp(b) (all for the backward).
A chunk never straddles two sequences; `chunk_seq`/`chunk_start` give each chunk's sequence and first token.
"""

import triton
import triton.language as tl

from .intra import any_exact, dot, fast_path_ok, is_exact, key_decay_exact, mm, tril, value_decay_exact
from .tiles import chunk_block, chunk_span, load_slots, load_tile, state_tile, store_slots, store_tile


@triton.jit
def chunk_local_kernel(
    g,
    s,
    b_buf,
    b_last,
    w_buf,
    exact_buf,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    H: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
):
    """One program per (chunk, kv-head). Reads g and s of the chunk. Writes b, b_last, the weights with which the
    chunk's tokens enter the state leaving it, w = s * exp(b_last - b) [NC, H, C, M] in w_buf's dtype (0 past the
    sequence's end; the scan adds w^T [k | v] to the state), and whether the chunk's intra-chunk products must take
    the exact path, exact [NC, H] int32 (intra.fast_path_ok)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    gate = load_slots(g, t0, h, H, n_rows, C, M)
    b = tl.cumsum(gate, axis=0)
    tl.store(chunk_block(b_buf, c, h, H, C, M), b)
    last = tl.sum(gate, axis=0)  # = b's last row
    tl.store(b_last + (c * H + h) * M + tl.arange(0, M), last)
    tl.store(exact_buf + c * H + h, tl.where(fast_path_ok(last), 0, 1))
    w = load_slots(s, t0, h, H, n_rows, C, M) * tl.exp(last[None, :] - b)
    tl.store(chunk_block(w_buf, c, h, H, C, M), w.to(w_buf.dtype.element_ty))


@triton.jit(do_not_specialize=["n_items"])
def chunk_output_kernel(
    q,
    k,
    v,
    s,
    b_buf,
    S,
    o,
    z_buf,
    lse_buf,
    W_buf,
    QK_buf,
    wdo_buf,
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
    BK: tl.constexpr,
    BV: tl.constexpr,
    LOWP: tl.constexpr,
    EXACT: tl.constexpr,
    ITEMS: tl.constexpr,
):
    """The outputs of the chunks whose `exact` flag is EXACT (function._launch_both_paths): on the fast path one
    program per (chunk, query head); on the exact path one program per ITEMS of the n_items = NC * H (chunk, kv-head)
    pairs, taking each flagged pair's query heads in turn. _chunk_output says what each chunk reads and writes."""
    if EXACT:
        first = tl.program_id(0) * ITEMS
        if any_exact(exact_buf, first, n_items, ITEMS):
            for j in range(ITEMS):
                if is_exact(exact_buf, first + j, n_items):
                    for g in range(G):
                        _chunk_output(q, k, v, s, b_buf, S, o, z_buf, lse_buf, W_buf, QK_buf, wdo_buf, cu_seqlens,
                                      chunk_seq, chunk_start, scale, (first + j) // H, (first + j) % H * G + g, H, G,
                                      K, V, M, C, BK, BV, LOWP, EXACT)
    else:
        c = tl.program_id(0)
        hq = tl.program_id(1)
        if tl.load(exact_buf + c * H + hq // G) == 0:
            _chunk_output(q, k, v, s, b_buf, S, o, z_buf, lse_buf, W_buf, QK_buf, wdo_buf, cu_seqlens, chunk_seq,
                          chunk_start, scale, c, hq, H, G, K, V, M, C, BK, BV, LOWP, EXACT)


@triton.jit
def _chunk_output(q, k, v, s, b_buf, S, o, z_buf, lse_buf, W_buf, QK_buf, wdo_buf, cu_seqlens, chunk_seq, chunk_start,
                  scale, c, hq, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, LOWP: tl.constexpr,
                  EXACT: tl.constexpr):
    """Chunk c, query head hq. Reads q, k, v, s of the chunk, b and the states S entering it.
    Pass 1: z = scale * (q @ hk) per token (inter-chunk through S, intra-chunk through value_decay of A = q k^T),
    p = softmax_M(z). Pass 2: o = (p * exp(b)) @ hv + W @ v with W[i, j] = sum_m p_i s_j exp(b_i - b_j).
    Writes o, and for the backward z [T', HQ, M], its log-sum-exp lse [T', HQ], W and q k^T [NC, HQ, C, C] and the
    hv half's weights of the reverse scan, p * exp(b) [NC, HQ, C, M]."""
    h = hq // G
    HQ: tl.constexpr = H * G
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    rows = tl.arange(0, C)
    live = rows < n_rows
    s_rows = s + t0 * (H * M) + h * M
    b_rows = b_buf + (c * H + h) * C * M
    write = load_slots(s, t0, h, H, n_rows, C, M)
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))

    z_inter = tl.zeros([C, M], dtype=tl.float32)
    A = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        qt = load_tile(q, t0, hq, HQ, K, k0, n_rows, C, BK)
        ptrs, mask = state_tile(S, c, h, H, M, K + V, 0, K, k0, BK)
        z_inter += dot(qt, tl.trans(tl.load(ptrs, mask=mask, other=0.0).to(qt.dtype)))  # q @ hk
        A += dot(qt, tl.trans(load_tile(k, t0, h, H, K, k0, n_rows, C, BK)))
    tl.store(chunk_block(QK_buf, c, hq, HQ, C, C), A.to(QK_buf.dtype.element_ty))  # q k^T, for bwd_values
    if EXACT:
        z = scale * (z_inter * tl.exp(b) + value_decay_exact(A, b, s_rows, H * M, b_rows, n_rows, C, M))
    else:  # intra.py's fast path: z = scale * exp(b) * (q @ hk + tril(q k^T) @ (s * exp(-b)))
        se = write * tl.exp(-b)
        z = scale * tl.exp(b) * (z_inter + mm(tril(A, C), se, LOWP))
    z_max = tl.max(z, axis=1)
    e = tl.exp(z - z_max[:, None])
    total = tl.sum(e, axis=1)
    p = tl.where(live[:, None], e / total[:, None], 0.0)
    store_slots(z_buf, z, t0, hq, HQ, n_rows, C, M)
    tl.store(lse_buf + (t0 + rows) * HQ + hq, z_max + tl.log(total), mask=live)

    b = tl.load(chunk_block(b_buf, c, h, H, C, M))  # loaded again rather than kept: fewer live registers
    pe = p * tl.exp(b)
    if EXACT:
        W = key_decay_exact(p, b, s_rows, H * M, b_rows, n_rows, C, M)
    else:
        W = tril(mm(pe, tl.trans(se), LOWP), C)
    W = W.to(v.dtype.element_ty)
    pe = pe.to(v.dtype.element_ty)
    tl.store(chunk_block(W_buf, c, hq, HQ, C, C), W.to(W_buf.dtype.element_ty))
    tl.store(chunk_block(wdo_buf, c, hq, HQ, C, M), pe.to(wdo_buf.dtype.element_ty))
    for v0 in range(0, V, BV):
        vt = load_tile(v, t0, h, H, V, v0, n_rows, C, BV)
        ptrs, mask = state_tile(S, c, h, H, M, K + V, K, V, v0, BV)
        out = dot(pe, tl.load(ptrs, mask=mask, other=0.0).to(vt.dtype)) + dot(W, vt)  # p e^b @ hv + W @ v
        store_tile(o, out, t0, hq, HQ, V, v0, n_rows, C, BV)

"""Forward kernels of the chunked GSA: chunk-local states, the scan across chunks, and the outputs.

Layouts (all contiguous; T' = tokens of all sequences packed; NC = chunks of all sequences):
    q [T', HQ, K], k [T', H, K], v [T', H, V], g, s [T', H, M], o [T', HQ, V]
    b      [NC, H, C, M] fp32: cumulative log-gate inside each chunk (rows past a short chunk's end repeat its last)
    b_last [NC, H, M]    fp32: log-decay over the whole chunk
    S      [NC, H, M, K + V]: both states side by side, slot-major: S[..., :K] = hk^T, S[..., K:] = hv (bf16 for
           16-bit inputs, else fp32; see function.state_dtype)
    z [T', HQ, M] fp32 and lse [T', HQ] fp32: the slot logits and their log-sum-exp; W [NC, HQ, C, C]: pass-2
           weights (both for the backward).
A chunk never straddles two sequences; `chunk_seq`/`chunk_start` give each chunk's sequence and first token.
"""

import triton
import triton.language as tl

from .intra import dot, fast_path_ok, key_decay, value_decay
from .tiles import chunk_block, chunk_span, load_slots, load_tile, state_tile, store_slots, store_tile


@triton.jit
def chunk_local_kernel(
    k,
    v,
    g,
    s,
    b_buf,
    b_last,
    X,
    cu_seqlens,
    chunk_seq,
    chunk_start,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """One program per (chunk, kv-head). Reads g, s, k, v of the chunk. Writes b and b_last, and the chunk's own
    contribution to the state entering the next chunk: X = w^T [k | v] with w = s * exp(b_last - b)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    gate = load_slots(g, t0, h, H, n_rows, C, M)
    b = tl.cumsum(gate, axis=0)
    tl.store(chunk_block(b_buf, c, h, H, C, M), b)
    last = tl.sum(gate, axis=0)  # = b's last row
    tl.store(b_last + (c * H + h) * M + tl.arange(0, M), last)
    wt = tl.trans(load_slots(s, t0, h, H, n_rows, C, M) * tl.exp(last[None, :] - b)).to(k.dtype.element_ty)  # [M, C]
    for k0 in range(0, K, BK):
        ptrs, mask = state_tile(X, c, h, H, M, K + V, 0, K, k0, BK)
        tl.store(ptrs, dot(wt, load_tile(k, t0, h, H, K, k0, n_rows, C, BK)).to(X.dtype.element_ty), mask=mask)
    for v0 in range(0, V, BV):
        ptrs, mask = state_tile(X, c, h, H, M, K + V, K, V, v0, BV)
        tl.store(ptrs, dot(wt, load_tile(v, t0, h, H, V, v0, n_rows, C, BV)).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _scan_load(X, b_last, c, live, h, tile, mask, H: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
               KV: tl.constexpr, rows):
    """What chunk c brings to a scan tile: x = the sum over the G heads of X[c] and the decay exp(b_last[c]).
    When not live (past the sequence's end): x = 0 and decay 1, a step that changes nothing."""
    x = tl.zeros(tile.shape, dtype=tl.float32)
    for j in tl.static_range(G):
        x += tl.load(X + (c * H * G + h * G + j) * M * KV + tile, mask=mask & live, other=0.0).to(tl.float32)
    return x, tl.exp(tl.load(b_last + (c * H + h) * M + rows, mask=live, other=0.0))


@triton.jit
def _scan_step(out, S, x, decay, c, live, h, tile, mask, H: tl.constexpr, M: tl.constexpr, KV: tl.constexpr):
    """Writes S as the state of chunk c (if live) and returns the next one, S * decay + x."""
    tl.store(out + (c * H + h) * M * KV + tile, S.to(out.dtype.element_ty), mask=mask & live)
    return S * decay[:, None] + x


@triton.jit
def chunk_scan_kernel(
    X,
    out,
    b_last,
    init,
    final,
    chunk_offsets,
    H: tl.constexpr,
    G: tl.constexpr,
    M: tl.constexpr,
    KV: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """One program per (tile [BM slots, BN columns] of the state, sequence x kv-head), walking the sequence's chunks
    in order (REVERSE: backwards). With x_c = the sum over the G heads of the group of X[c]:
        out[c] = S;  S = S * exp(b_last[c]) + x_c       starting from S = init (or 0); final = S at the end.
    Forward: X = chunk contributions, out = states entering each chunk (may alias X when G == 1).
    Backward: X = state gradients from each chunk's outputs, out = gradients of the state leaving each chunk.
    The walk is latency-bound (each step waits for its loads), so it takes four chunks per step: their eight loads
    are issued together, then the four updates run."""
    nh = tl.program_id(2)
    n = nh // H
    h = nh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    tile = rows[:, None] * KV + cols[None, :]
    mask = (cols < KV)[None, :]
    lo = tl.load(chunk_offsets + n)
    n_chunks = tl.load(chunk_offsets + n + 1) - lo
    if HAS_INIT:
        S = tl.load(init + nh * M * KV + tile, mask=mask, other=0.0)
    else:
        S = tl.zeros([BM, BN], dtype=tl.float32)
    for p in range(0, n_chunks, 4):  # p: position in the walk
        c0 = lo + n_chunks - 1 - p if REVERSE else lo + p
        c1 = c0 - 1 if REVERSE else c0 + 1
        c2 = c1 - 1 if REVERSE else c1 + 1
        c3 = c2 - 1 if REVERSE else c2 + 1
        live0, live1, live2, live3 = p < n_chunks, p + 1 < n_chunks, p + 2 < n_chunks, p + 3 < n_chunks
        x0, d0 = _scan_load(X, b_last, c0, live0, h, tile, mask, H, G, M, KV, rows)
        x1, d1 = _scan_load(X, b_last, c1, live1, h, tile, mask, H, G, M, KV, rows)
        x2, d2 = _scan_load(X, b_last, c2, live2, h, tile, mask, H, G, M, KV, rows)
        x3, d3 = _scan_load(X, b_last, c3, live3, h, tile, mask, H, G, M, KV, rows)
        S = _scan_step(out, S, x0, d0, c0, live0, h, tile, mask, H, M, KV)
        S = _scan_step(out, S, x1, d1, c1, live1, h, tile, mask, H, M, KV)
        S = _scan_step(out, S, x2, d2, c2, live2, h, tile, mask, H, M, KV)
        S = _scan_step(out, S, x3, d3, c3, live3, h, tile, mask, H, M, KV)
    tl.store(final + nh * M * KV + tile, S, mask=mask)


@triton.jit
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
    """One program per (chunk, query head). Reads q, k, v, s of the chunk, b and the states S entering it.
    Pass 1: z = scale * (q @ hk) per token (inter-chunk through S, intra-chunk through value_decay of A = q k^T),
    p = softmax_M(z). Pass 2: o = (p * exp(b)) @ hv + W @ v with W[i, j] = sum_m p_i s_j exp(b_i - b_j).
    Writes o, and for the backward z [T', HQ, M], its log-sum-exp lse [T', HQ] and W [NC, HQ, C, C]."""
    c = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    HQ: tl.constexpr = H * G
    t0, n_rows = chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C)
    rows = tl.arange(0, C)
    live = rows < n_rows
    s_rows = s + t0 * (H * M) + h * M
    b_rows = b_buf + (c * H + h) * C * M
    write = load_slots(s, t0, h, H, n_rows, C, M)
    b = tl.load(chunk_block(b_buf, c, h, H, C, M))
    fast = fast_path_ok(b, b_rows, C, M, SUB)

    z_inter = tl.zeros([C, M], dtype=tl.float32)
    A = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, K, BK):
        qt = load_tile(q, t0, hq, HQ, K, k0, n_rows, C, BK)
        ptrs, mask = state_tile(S, c, h, H, M, K + V, 0, K, k0, BK)
        z_inter += dot(qt, tl.trans(tl.load(ptrs, mask=mask, other=0.0).to(qt.dtype)))  # q @ hk
        A += dot(qt, tl.trans(load_tile(k, t0, h, H, K, k0, n_rows, C, BK)))
    z = scale * (z_inter * tl.exp(b) + value_decay(A, write, b, s_rows, H * M, b_rows, n_rows, fast, C, M, SUB, LOWP))
    z_max = tl.max(z, axis=1)
    e = tl.exp(z - z_max[:, None])
    total = tl.sum(e, axis=1)
    p = tl.where(live[:, None], e / total[:, None], 0.0)
    store_slots(z_buf, z, t0, hq, HQ, n_rows, C, M)
    tl.store(lse_buf + (t0 + rows) * HQ + hq, z_max + tl.log(total), mask=live)

    W = key_decay(p, write, b, s_rows, H * M, b_rows, n_rows, fast, C, M, SUB, LOWP).to(v.dtype.element_ty)
    tl.store(chunk_block(W_buf, c, hq, HQ, C, C), W.to(W_buf.dtype.element_ty))
    pe = (p * tl.exp(b)).to(v.dtype.element_ty)
    for v0 in range(0, V, BV):
        vt = load_tile(v, t0, h, H, V, v0, n_rows, C, BV)
        ptrs, mask = state_tile(S, c, h, H, M, K + V, K, V, v0, BV)
        out = dot(pe, tl.load(ptrs, mask=mask, other=0.0).to(vt.dtype)) + dot(W, vt)  # p e^b @ hv + W @ v
        store_tile(o, out, t0, hq, HQ, V, v0, n_rows, C, BV)

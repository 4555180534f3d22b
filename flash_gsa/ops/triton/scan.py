"""The scan across chunks, forward (the states entering each chunk) and reversed (the gradients of the states
leaving each chunk). What each chunk adds to the state is formed on the way, as a product on the tensor cores from
the chunk's tokens and a [C, M] weight per token, rather than read from a per-chunk [M, K + V] buffer that another
kernel would have to write first. Layouts as in chunk_fwd: per-chunk states [NC, H, M, K + V], b_last [NC, H, M]
fp32, weights [NC, H * G, C, M]."""

import triton
import triton.language as tl

from .intra import dot
from .tiles import load_tile


@triton.jit
def chunk_scan_kernel(
    wk,
    xk,
    wv,
    xv,
    out,
    b_last,
    init,
    final,
    cu_seqlens,
    chunk_offsets,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_INIT: tl.constexpr,
    FIRST_TILE: tl.constexpr,
    PIPELINED: tl.constexpr,
    STAGES: tl.constexpr,
):
    """One program per (tile [BM slots, BN columns] of the state, sequence x kv-head), walking the sequence's chunks
    in order (REVERSE: backwards). With x_c = sum over the group's G heads j of w_j[c]^T x_j[c] ([M, C] @ [C, BN]):
        out[c] = S;  S = S * exp(b_last[c]) + x_c       starting from S = init (or 0); final = S at the end.
    The column tiles in order: cdiv(K, BN) of the hk^T part (weights wk, tokens xk [T', H * G, K]), then those of
    the hv part (wv, xv [T', H * G, V]); a launch takes the tiles from FIRST_TILE on (the backward scans each half
    in its own launch: FIRST_TILE = 0 and a grid of the K part's tiles, or FIRST_TILE = cdiv(K, BN)).
    Forward (G = 1): w = s * exp(b_last - b) (chunk_local), x = k and v; out = the states entering each chunk.
    Reversed: w = p * exp(b) (chunk_output) with x = do, then w = dzs * exp(b) (bwd_values) with x = q: the gradient
    of the state entering the chunk from the chunk's own outputs; out = the gradients of the states leaving each
    chunk.
    Two walks (config.SCAN_STAGES's note): PIPELINED, Triton's pipeliner keeps STAGES - 1 chunks' loads in flight in
    shared memory (faster when many walks share each SM); else each walk keeps two chunks' loads ahead in registers
    (faster when few walks, each bound by its own latency)."""
    NK: tl.constexpr = (K + BN - 1) // BN
    tile = FIRST_TILE + tl.program_id(0)
    if PIPELINED:
        if tile < NK:  # one walk for either part, so that its pipeline buffers are allocated once
            w, x, start, width, d0 = wk, xk, 0, K, tile * BN
        else:
            w, x, start, width, d0 = wv, xv, K, V, (tile - NK) * BN
        _walk_pipelined(w, x, out, b_last, init, final, cu_seqlens, chunk_offsets, d0, start, width, H, G, K + V, M,
                        C, BM, BN, REVERSE, HAS_INIT, STAGES)
    elif tile < NK:
        _walk_prefetched(wk, xk, out, b_last, init, final, cu_seqlens, chunk_offsets, tile * BN, 0, K, H, G, K + V, M,
                         C, BM, BN, REVERSE, HAS_INIT)
    else:
        _walk_prefetched(wv, xv, out, b_last, init, final, cu_seqlens, chunk_offsets, (tile - NK) * BN, K, V, H, G,
                         K + V, M, C, BM, BN, REVERSE, HAS_INIT)


@triton.jit
def _walk_pipelined(w, x, out, b_last, init, final, cu_seqlens, chunk_offsets, d0, start, width, H: tl.constexpr,
                    G: tl.constexpr, KV: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STAGES: tl.constexpr):
    """chunk_scan_kernel's walk when PIPELINED, over columns start + d0 .. start + d0 + BN of the state (masked past
    `width`, the part's K or V; x is [T', H * G, width]).
    Only S carries from one chunk to the next, and the walk is bound by the latency of each chunk's loads, which do
    not depend on S: Triton's software pipeliner copies the tiles of the next STAGES - 1 chunks into shared memory
    while the current one is added (STAGES: config.SCAN_STAGES, or fewer where they do not fit)."""
    nh = tl.program_id(2)
    n = nh // H
    h = nh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = d0 + tl.arange(0, BN)
    tile = rows[:, None] * KV + start + cols[None, :]
    mask = (cols < width)[None, :]
    lo = tl.load(chunk_offsets + n)
    n_chunks = tl.load(chunk_offsets + n + 1) - lo
    seq_start = tl.load(cu_seqlens + n)
    seq_end = tl.load(cu_seqlens + n + 1)
    if HAS_INIT:
        S = tl.load(init + nh * M * KV + tile, mask=mask, other=0.0)
    else:
        S = tl.zeros([BM, BN], dtype=tl.float32)
    for p in tl.range(0, n_chunks, num_stages=STAGES):  # p: position in the walk
        c = _chunk(lo, n_chunks, p, REVERSE)
        t0 = seq_start + (c - lo) * C
        n_rows = tl.minimum(seq_end - t0, C)
        add = tl.zeros([BM, BN], dtype=tl.float32)
        for j in tl.static_range(G):  # the group's heads: w_j^T x_j, [BM, C] @ [C, BN]
            wt = tl.load(w + (c * H * G + h * G + j) * C * M + tl.arange(0, C)[:, None] * M + rows[None, :])
            # (tiles.load_tile's row width is a compile-time size; here it is the part's, K or V, known at run time)
            xt = tl.load(x + (t0 + tl.arange(0, C))[:, None] * (H * G * width) + (h * G + j) * width + cols[None, :],
                         mask=(tl.arange(0, C) < n_rows)[:, None] & mask, other=0.0)
            add += dot(tl.trans(wt), xt)
        # exp(b_last) [BM], loaded as a [BM, 1] tile: Triton 3.6 pipelines that load, but not a 1-D one
        last = tl.load(b_last + (c * H + h) * M + rows[:, None] + tl.zeros([1, 1], dtype=tl.int32))
        decay = tl.exp(tl.sum(last, axis=1))
        tl.store(out + (c * H + h) * M * KV + tile, S.to(out.dtype.element_ty), mask=mask)
        S = S * decay[:, None] + add
    tl.store(final + nh * M * KV + tile, S, mask=mask)


@triton.jit
def _walk_prefetched(w, x, out, b_last, init, final, cu_seqlens, chunk_offsets, d0, start: tl.constexpr,
                     width: tl.constexpr, H: tl.constexpr, G: tl.constexpr, KV: tl.constexpr, M: tl.constexpr,
                     C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, REVERSE: tl.constexpr,
                     HAS_INIT: tl.constexpr):
    """chunk_scan_kernel's walk when not PIPELINED, over columns start + d0 .. start + d0 + BN of the state (masked
    past `width`).
    Only S carries from one chunk to the next; the walk is bound by the latency of each chunk's loads. So it goes two
    chunks per step, and a step first issues the loads of the next two chunks, then updates S with the two whose
    loads the previous step issued (four chunks' loads in flight). (Loads issued after a step's stores made the
    reversed scan 3-5x slower on the H200: a load may not pass an earlier store.)"""
    nh = tl.program_id(2)
    n = nh // H
    h = nh % H
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    tile = rows[:, None] * KV + start + d0 + tl.arange(0, BN)[None, :]
    mask = (d0 + tl.arange(0, BN) < width)[None, :]
    lo = tl.load(chunk_offsets + n)
    seq = (lo, tl.load(chunk_offsets + n + 1) - lo, tl.load(cu_seqlens + n), tl.load(cu_seqlens + n + 1))
    if HAS_INIT:
        S = tl.load(init + nh * M * KV + tile, mask=mask, other=0.0)
    else:
        S = tl.zeros([BM, BN], dtype=tl.float32)
    a0 = _chunk_inputs(w, x, b_last, 0, seq, h, rows, d0, width, H, G, M, C, BN, REVERSE)
    a1 = _chunk_inputs(w, x, b_last, 1, seq, h, rows, d0, width, H, G, M, C, BN, REVERSE)
    for p in range(0, seq[1], 2):  # p: position in the walk
        b0 = _chunk_inputs(w, x, b_last, p + 2, seq, h, rows, d0, width, H, G, M, C, BN, REVERSE)
        b1 = _chunk_inputs(w, x, b_last, p + 3, seq, h, rows, d0, width, H, G, M, C, BN, REVERSE)
        S = _step(S, p, a0, seq, w, x, out, h, rows, tile, mask, d0, width, H, G, KV, M, C, BN, REVERSE)
        S = _step(S, p + 1, a1, seq, w, x, out, h, rows, tile, mask, d0, width, H, G, KV, M, C, BN, REVERSE)
        a0 = b0
        a1 = b1
    tl.store(final + nh * M * KV + tile, S, mask=mask)


@triton.jit
def _chunk_at(p, seq, C: tl.constexpr, REVERSE: tl.constexpr):
    """The chunk at walk position p: its index, whether it is live (p < the sequence's chunks), its first token and
    its rows (0 when not live: every load of a step past the sequence's end is masked, and the step changes
    nothing)."""
    lo, n_chunks, seq_start, seq_end = seq
    live = p < n_chunks
    c = _chunk(lo, n_chunks, p, REVERSE)
    t0 = seq_start + (c - lo) * C
    return c, live, t0, tl.where(live, tl.minimum(seq_end - t0, C), 0)


@triton.jit
def _weights(w, c, live, head, rows, H: tl.constexpr, G: tl.constexpr, M: tl.constexpr, C: tl.constexpr):
    """Chunk c's weights [C, BM] (slots `rows`) of head `head` of w [NC, H * G, C, M]; 0 when not live."""
    return tl.load(w + (c * H * G + head) * C * M + tl.arange(0, C)[:, None] * M + rows[None, :], mask=live, other=0.0)


@triton.jit
def _chunk_inputs(w, x, b_last, p, seq, h, rows, d0, width: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                  M: tl.constexpr, C: tl.constexpr, BN: tl.constexpr, REVERSE: tl.constexpr):
    """The loads of the chunk at walk position p: the group's first head's weights [C, BM] and tokens [C, BN], and
    the decay exp(b_last[c])."""
    c, live, t0, n_rows = _chunk_at(p, seq, C, REVERSE)
    wt = _weights(w, c, live, h * G, rows, H, G, M, C)
    xt = load_tile(x, t0, h * G, H * G, width, d0, n_rows, C, BN)
    decay = tl.exp(tl.load(b_last + (c * H + h) * M + rows, mask=live, other=0.0))
    return wt, xt, decay


@triton.jit
def _step(S, p, inputs, seq, w, x, out, h, rows, tile, mask, d0, width: tl.constexpr, H: tl.constexpr,
          G: tl.constexpr, KV: tl.constexpr, M: tl.constexpr, C: tl.constexpr, BN: tl.constexpr,
          REVERSE: tl.constexpr):
    """Writes S as the entry of `out` of the chunk at walk position p (if live) and returns the next state, S * decay
    + the chunk's product (the group's other heads are loaded here)."""
    c, live, t0, n_rows = _chunk_at(p, seq, C, REVERSE)
    wt, xt, decay = inputs
    add = dot(tl.trans(wt), xt)
    for j in tl.static_range(1, G):
        add += dot(tl.trans(_weights(w, c, live, h * G + j, rows, H, G, M, C)),
                   load_tile(x, t0, h * G + j, H * G, width, d0, n_rows, C, BN))
    tl.store(out + (c * H + h) * M * KV + tile, S.to(out.dtype.element_ty), mask=mask & live)
    return S * decay[:, None] + add


@triton.jit
def _chunk(lo, n_chunks, p, REVERSE: tl.constexpr):
    """The chunk at walk position p of the sequence whose chunks are lo .. lo + n_chunks."""
    return lo + n_chunks - 1 - p if REVERSE else lo + p

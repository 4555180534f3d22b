"""The scan across chunks, forward (the states entering each chunk) and reversed (the gradients of the states
leaving each chunk). Layouts as in chunk_fwd: per-chunk states [NC, heads, M, K + V], b_last [NC, H, M] fp32."""

import triton
import triton.language as tl


@triton.jit
def _scan_load(X, b_last, c, live, h, tile, mask, rows, H: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
               KV: tl.constexpr, REVERSE: tl.constexpr, states, states_final, nh, final_chunk):
    """What chunk c brings to a scan tile: x = the sum over the G heads of X[c] and the decay exp(b_last[c]).
    When not live (past the sequence's end): x = 0 and decay 1, a step that changes nothing. Reversed, also the
    state leaving c (fp32): the forward's state entering c + 1, or the final one after the sequence's last chunk."""
    x = tl.zeros(tile.shape, dtype=tl.float32)
    for j in tl.static_range(G):
        x += tl.load(X + (c * H * G + h * G + j) * M * KV + tile, mask=mask & live, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(b_last + (c * H + h) * M + rows, mask=live, other=0.0))
    if REVERSE:
        last_chunk = c == final_chunk
        leaving = tl.load(states + ((c + 1) * H + h) * M * KV + tile, mask=mask & live & (last_chunk == 0),
                          other=0.0).to(tl.float32)
        leaving += tl.load(states_final + nh * M * KV + tile, mask=mask & live & last_chunk, other=0.0)
    else:
        leaving = x  # not used forward
    return x, decay, leaving


@triton.jit
def _scan_step(out, S, x, decay, leaving, c, live, h, tile, mask, rows, H: tl.constexpr, M: tl.constexpr,
               KV: tl.constexpr, REVERSE: tl.constexpr, later, NT: tl.constexpr):
    """Writes S as the state of chunk c (if live) and returns the next one, S * decay + x. Reversed, also writes this
    tile's share of <state leaving chunk c, its gradient S> (a sum over the tile's columns) to later."""
    tl.store(out + (c * H + h) * M * KV + tile, S.to(out.dtype.element_ty), mask=mask & live)
    if REVERSE:
        tl.store(later + ((c * H + h) * NT + tl.program_id(0)) * M + rows, tl.sum(leaving * S, axis=1), mask=live)
    return S * decay[:, None] + x


@triton.jit
def chunk_scan_kernel(
    X,
    out,
    b_last,
    init,
    final,
    states,
    states_final,
    later,
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
    Backward: X = state gradients from each chunk's outputs, out = gradients of the state leaving each chunk (may
    alias X when G == 1); also writes later [NC, H, NT, M] fp32 (NT = column tiles): each tile's share of <state
    leaving the chunk, its gradient>, from the forward's `states` and `states_final` (bwd_kv adds the shares up).
    The walk is latency-bound (each step waits for its loads), so it takes four chunks per step: their loads (twelve
    reversed) are issued together, then the four updates run. (Loads of the leaving states placed after each
    step's store made the reversed scan 3-5x slower on the H200: a load may not pass an earlier store.)"""
    nh = tl.program_id(2)
    n = nh // H
    h = nh % H
    NT: tl.constexpr = (KV + BN - 1) // BN
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
        end = lo + n_chunks - 1  # the sequence's last chunk
        x0, d0, s0 = _scan_load(X, b_last, c0, live0, h, tile, mask, rows, H, G, M, KV, REVERSE, states,
                                states_final, nh, end)
        x1, d1, s1 = _scan_load(X, b_last, c1, live1, h, tile, mask, rows, H, G, M, KV, REVERSE, states,
                                states_final, nh, end)
        x2, d2, s2 = _scan_load(X, b_last, c2, live2, h, tile, mask, rows, H, G, M, KV, REVERSE, states,
                                states_final, nh, end)
        x3, d3, s3 = _scan_load(X, b_last, c3, live3, h, tile, mask, rows, H, G, M, KV, REVERSE, states,
                                states_final, nh, end)
        S = _scan_step(out, S, x0, d0, s0, c0, live0, h, tile, mask, rows, H, M, KV, REVERSE, later, NT)
        S = _scan_step(out, S, x1, d1, s1, c1, live1, h, tile, mask, rows, H, M, KV, REVERSE, later, NT)
        S = _scan_step(out, S, x2, d2, s2, c2, live2, h, tile, mask, rows, H, M, KV, REVERSE, later, NT)
        S = _scan_step(out, S, x3, d3, s3, c3, live3, h, tile, mask, rows, H, M, KV, REVERSE, later, NT)
    tl.store(final + nh * M * KV + tile, S, mask=mask)

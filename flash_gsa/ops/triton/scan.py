"""The scan across chunks, forward (the states entering each chunk) and reversed (the gradients of the states
leaving each chunk). Layouts as in chunk_fwd: per-chunk states [NC, heads, M, K + V], b_last [NC, H, M] fp32."""

import triton
import triton.language as tl

from .intra import dot


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



@triton.jit
def _states_load(x, g, s, chunk_start, c, live, end, h, rows, slots, cols, col_ok, H: tl.constexpr, M: tl.constexpr,
                 width):
    """What chunk c's rows hold for a state tile: its gates and writes [C, BM] (of the tile's slots) and x [C, BN] (of
    the tile's columns of k or v, `width` wide). 0 past the sequence's end and when the chunk is not live."""
    t0 = tl.load(chunk_start + c, mask=live, other=0)
    ok = ((t0 + rows < end) & live)[:, None]
    token = (t0 + rows)[:, None]
    gate = tl.load(g + token * (H * M) + h * M + slots[None, :], mask=ok, other=0.0)
    write = tl.load(s + token * (H * M) + h * M + slots[None, :], mask=ok, other=0.0)
    xt = tl.load(x + token * (H * width) + h * width + cols[None, :], mask=ok & col_ok, other=0.0)
    return gate, write, xt


@triton.jit
def _states_step(out, b_buf, b_last, S, gate, write, xt, c, live, h, tile, rows, slots, first_tile, col_ok,
                 H: tl.constexpr, M: tl.constexpr, KV: tl.constexpr, C: tl.constexpr):
    """Writes S as the state entering chunk c (if live), and b, b_last of the tile's slots (programs of the first
    column tile); returns the state leaving c: S * exp(b_last) + w^T x, with w = s * exp(b_last - b)."""
    b = tl.cumsum(gate.to(tl.float32), axis=0)  # rows past the end add 0: they repeat the last row
    last = tl.sum(gate.to(tl.float32), axis=0)
    w = write.to(tl.float32) * tl.exp(last[None, :] - b)
    tl.store(out + (c * H + h) * M * KV + tile, S.to(out.dtype.element_ty), mask=col_ok & live)
    tl.store(b_buf + (c * H + h) * C * M + rows[:, None] * M + slots[None, :], b, mask=first_tile & live)
    tl.store(b_last + (c * H + h) * M + slots, last, mask=first_tile & live)
    return S * tl.exp(last)[:, None] + dot(tl.trans(w.to(xt.dtype)), xt)


@triton.jit
def chunk_states_kernel(
    k,
    v,
    g,
    s,
    b_buf,
    b_last,
    init,
    out,
    final,
    cu_seqlens,
    chunk_offsets,
    chunk_start,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    C: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    STEP: tl.constexpr,
    HAS_INIT: tl.constexpr,
):
    """The forward scan, fed straight from the inputs. One program per (tile [BM slots, BN columns] of the [M, K + V]
    state: column tiles of hk^T, then of hv; slot tile; sequence x kv-head) walks the sequence's chunks in order:
        out[c] = S;   S = S * exp(b_last[c]) + w_c^T x_c,   w = s * exp(b_last - b)  (x = k or v: the tile's half)
    from S = init (or 0); final = S after the last chunk. b (the cumulative log-gate inside each chunk) and b_last
    are formed from g on the way; the first column tile's programs write them for the other kernels. Reads k or v,
    g, s; writes out [NC, H, M, K + V], b [NC, H, C, M], b_last [NC, H, M] fp32 and final [N, H, M, K + V] fp32.
    STEP (2 or 4) chunks per step: their loads are issued together, before the step's stores (which later loads may
    not pass), then the updates run."""
    nh = tl.program_id(2)
    n = nh // H
    h = nh % H
    KV: tl.constexpr = K + V
    NKT: tl.constexpr = (K + BN - 1) // BN  # column tiles of the hk^T half
    t = tl.program_id(0)
    if t < NKT:
        x, width, d0, start = k, K, t * BN, 0
    else:
        x, width, d0, start = v, V, (t - NKT) * BN, K
    slots = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = d0 + tl.arange(0, BN)
    col_ok = (cols < width)[None, :]
    tile = slots[:, None] * KV + start + cols[None, :]
    rows = tl.arange(0, C)
    first_tile = t == 0
    lo = tl.load(chunk_offsets + n)
    n_chunks = tl.load(chunk_offsets + n + 1) - lo
    end = tl.load(cu_seqlens + n + 1)
    if HAS_INIT:
        S = tl.load(init + nh * M * KV + tile, mask=col_ok, other=0.0)
    else:
        S = tl.zeros([BM, BN], dtype=tl.float32)
    for p in range(0, n_chunks, STEP):
        c0, c1, c2, c3 = lo + p, lo + p + 1, lo + p + 2, lo + p + 3
        l0, l1, l2, l3 = p < n_chunks, p + 1 < n_chunks, p + 2 < n_chunks, p + 3 < n_chunks
        g0, s0, x0 = _states_load(x, g, s, chunk_start, c0, l0, end, h, rows, slots, cols, col_ok, H, M, width)
        g1, s1, x1 = _states_load(x, g, s, chunk_start, c1, l1, end, h, rows, slots, cols, col_ok, H, M, width)
        if STEP == 4:
            g2, s2, x2 = _states_load(x, g, s, chunk_start, c2, l2, end, h, rows, slots, cols, col_ok, H, M, width)
            g3, s3, x3 = _states_load(x, g, s, chunk_start, c3, l3, end, h, rows, slots, cols, col_ok, H, M, width)
        S = _states_step(out, b_buf, b_last, S, g0, s0, x0, c0, l0, h, tile, rows, slots, first_tile, col_ok, H, M,
                         KV, C)
        S = _states_step(out, b_buf, b_last, S, g1, s1, x1, c1, l1, h, tile, rows, slots, first_tile, col_ok, H, M,
                         KV, C)
        if STEP == 4:
            S = _states_step(out, b_buf, b_last, S, g2, s2, x2, c2, l2, h, tile, rows, slots, first_tile, col_ok, H,
                             M, KV, C)
            S = _states_step(out, b_buf, b_last, S, g3, s3, x3, c3, l3, h, tile, rows, slots, first_tile, col_ok, H,
                             M, KV, C)
    tl.store(final + nh * M * KV + tile, S, mask=col_ok)

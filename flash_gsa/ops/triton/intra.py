"""Intra-chunk building blocks shared by the forward and backward kernels.

A chunk holds C tokens; b [C, M] is the cumulative log-gate inside it (non-increasing, <= 0; rows past the end of a
short chunk repeat the last value). Every product below carries a decay exp(b[i, m] - b[j, m]) between a later row i
and an earlier row j. It is never exponentiated as a whole over the chunk: rows are grouped in sub-chunks of SUB, an
earlier sub-chunk is reached through the anchor beta = b at the last row before row i's sub-chunk, so that

    exp(b_i - b_j) = exp(b_i - beta) * exp(beta - b_j)        both factors <= 1,

and pairs inside one sub-chunk are taken exactly, one diagonal offset d at a time. No exponent is ever positive.

Fast path: when no sub-chunk decays by more than FAST_DECAY_LIMIT in any slot (`fast_path_ok`; always so for the
gates GSA produces in practice), the pairs inside sub-chunk I go through the same anchored matrix product as the
earlier sub-chunks, under a causal mask: their key factor exp(beta - b_j) is then > 1 but below exp(FAST_DECAY_LIMIT),
far from fp32's range. Otherwise the exact per-offset loop runs; both give the same values up to rounding. Which path a
chunk takes is decided once, by chunk_local (its `exact` flags); each form takes it as the compile-time EXACT, so a
kernel compiled for the fast path holds none of the exact path's code (function._launch_both_paths launches both).

The three forms:
    value_decay(A, s)[i, m]   = sum_{j<=i} A[i, j] * s[j, m] * exp(b[i, m] - b[j, m])     (pass-1 logits, dp)
    key_decay(x, s)[i, j]     = sum_m x[i, m] * s[j, m] * exp(b[i, m] - b[j, m]), j<=i    (pass-2 weights, dq)
    value_decay_t(A, x)[j, m] = sum_{i>=j} A[i, j] * x[i, m] * exp(b[i, m] - b[j, m])     (ds)

Products of two computed fp32 factors take bf16 operands for 16-bit inputs (LOWP): bf16 keeps fp32's exponent
range, so the fast path's large key factors stay finite.

Register tensors hold whole chunks; rows that a diagonal step needs shifted by d are re-read from memory through
the pointer arguments (`*_rows` point at row 0 of the chunk, `stride` is the row stride, `n_rows` masks the short
last chunk). b always comes from the per-chunk scratch buffer, which has all C rows.
"""

import triton
import triton.language as tl

from . import config, launch

# Triton 3.6's interpreter multiplies bf16 operands of tl.dot wrongly; bf16 products are exact in fp32, so under the
# interpreter the operands are upcast, which computes the same thing.
INTERPRET = tl.constexpr(launch.INTERPRET)

FAST_DECAY_LIMIT = tl.constexpr(config.FAST_DECAY_LIMIT)


@triton.jit
def anchor(b_rows, I: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr):
    """beta of sub-chunk I: b at the row before it ([M], loaded from the chunk's b scratch; 0 for I = 0)."""
    if I == 0:
        return tl.zeros([M], dtype=tl.float32)
    return tl.load(b_rows + (I * SUB - 1) * M + tl.arange(0, M))


@triton.jit
def dot(a, b):
    """a @ b on the tensor cores, fp32 accumulation."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def mm(a, b, LOWP: tl.constexpr):
    """a @ b with fp32 accumulation; bf16 operands when LOWP (16-bit inputs), else fp32 (tf32 on tensor cores)."""
    if LOWP:
        return dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return dot(a, b)


@triton.jit
def any_exact(exact_buf, first, n_items, ITEMS: tl.constexpr):
    """Whether any of the (chunk, kv-head) items first .. first + ITEMS (of n_items) is flagged exact (exact_buf, flat
    [NC * H] int32): one load for the whole block. The exact-path programs of the heavy kernels each take ITEMS items,
    so that on the fast path (no chunk flagged) few programs read their flags and return."""
    items = first + tl.arange(0, ITEMS)
    return tl.max(tl.load(exact_buf + items, mask=items < n_items, other=0), axis=0) != 0


@triton.jit
def is_exact(exact_buf, item, n_items):
    """Whether (chunk, kv-head) item `item` exists and is flagged exact."""
    return tl.load(exact_buf + item, mask=item < n_items, other=0) != 0


@triton.jit
def fast_path_ok(b, b_rows, C: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr):
    """True when every row's decay since the start of its sub-chunk stays above -FAST_DECAY_LIMIT."""
    rows = tl.arange(0, C)
    before = rows // SUB * SUB - 1  # the anchor row of each row's sub-chunk (-1: none, beta = 0)
    beta = tl.load(b_rows + before[:, None] * M + tl.arange(0, M)[None, :], mask=(before >= 0)[:, None], other=0.0)
    return tl.min(tl.min(b - beta, axis=1), axis=0) > -FAST_DECAY_LIMIT


@triton.jit
def load_rows_shifted(base, shift, stride, n_rows, C: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr):
    """x[i - shift] (shift > 0) or x[i + (-shift)] (shift < 0) within each sub-chunk; 0 where that row is outside
    the sub-chunk or past n_rows. Returns the values (float32) and the mask."""
    rows = tl.arange(0, C)
    src = rows - shift
    ok = ((rows % SUB) - shift >= 0) & ((rows % SUB) - shift < SUB) & (src < n_rows)
    cols = tl.arange(0, M)
    x = tl.load(base + src[:, None] * stride + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return x, ok


@triton.jit
def value_decay(
    A,
    s,
    b,
    s_rows,
    s_stride,
    b_rows,
    n_rows,
    C: tl.constexpr,
    M: tl.constexpr,
    SUB: tl.constexpr,
    LOWP: tl.constexpr,
    EXACT: tl.constexpr,
):
    """out[i, m] = sum_{j<=i} A[i, j] s[j, m] exp(b[i, m] - b[j, m]). A [C, C]; s, b [C, M]; returns [C, M] fp32."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    if not EXACT:
        out = _value_decay_anchored(tl.where(cols[None, :] <= rows[:, None], A, 0.0), s, b, b_rows, C, M, SUB, LOWP,
                                    True)
    else:
        out = _value_decay_anchored(A, s, b, b_rows, C, M, SUB, LOWP, False)
        for d in range(SUB):  # pairs (i, i - d) inside a sub-chunk
            s_d, ok = load_rows_shifted(s_rows, d, s_stride, n_rows, C, M, SUB)
            b_d, _ = load_rows_shifted(b_rows, d, M, C, C, M, SUB)
            a_d = tl.sum(tl.where(cols[None, :] == rows[:, None] - d, A, 0.0), axis=1)
            out += tl.where(ok[:, None], a_d[:, None] * s_d * tl.exp(b - b_d), 0.0)
    return out


@triton.jit
def _value_decay_anchored(A, s, b, b_rows, C: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr, LOWP: tl.constexpr,
                          INSIDE: tl.constexpr):
    """value_decay's pairs across sub-chunks, through the anchors (INSIDE: also the pairs inside one, A masked)."""
    rows = tl.arange(0, C)
    out = tl.zeros([C, M], dtype=tl.float32)
    for I in tl.static_range(C // SUB):  # through the anchor of sub-chunk I (beta = 0 for I = 0)
        beta = anchor(b_rows, I, M, SUB)
        reach: tl.constexpr = (I + 1) * SUB if INSIDE else I * SUB
        if reach > 0:
            key = tl.where(rows[:, None] < reach, s * tl.exp(beta[None, :] - b), 0.0)
            lift = tl.where((rows // SUB == I)[:, None], tl.exp(b - beta[None, :]), 0.0)
            out += lift * mm(A, key, LOWP)
    return out


@triton.jit
def key_decay(
    x,
    s,
    b,
    s_rows,
    s_stride,
    b_rows,
    n_rows,
    C: tl.constexpr,
    M: tl.constexpr,
    SUB: tl.constexpr,
    LOWP: tl.constexpr,
    EXACT: tl.constexpr,
):
    """W[i, j] = sum_m x[i, m] s[j, m] exp(b[i, m] - b[j, m]) for j <= i, else 0. x, s, b [C, M]; returns [C, C]."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    if not EXACT:
        W = tl.where(cols[None, :] <= rows[:, None], _key_decay_anchored(x, s, b, b_rows, C, M, SUB, LOWP, True), 0.0)
    else:
        W = _key_decay_anchored(x, s, b, b_rows, C, M, SUB, LOWP, False)
        for d in range(SUB):
            s_d, ok = load_rows_shifted(s_rows, d, s_stride, n_rows, C, M, SUB)
            b_d, _ = load_rows_shifted(b_rows, d, M, C, C, M, SUB)
            w_d = tl.sum(tl.where(ok[:, None], x * s_d * tl.exp(b - b_d), 0.0), axis=1)
            W += tl.where(cols[None, :] == rows[:, None] - d, w_d[:, None], 0.0)
    return W


@triton.jit
def _key_decay_anchored(x, s, b, b_rows, C: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr, LOWP: tl.constexpr,
                        INSIDE: tl.constexpr):
    """key_decay's pairs across sub-chunks, through the anchors (INSIDE: also the pairs inside one, unmasked)."""
    rows = tl.arange(0, C)
    W = tl.zeros([C, C], dtype=tl.float32)
    for I in tl.static_range(C // SUB):
        beta = anchor(b_rows, I, M, SUB)
        reach: tl.constexpr = (I + 1) * SUB if INSIDE else I * SUB
        if reach > 0:
            key = tl.where(rows[:, None] < reach, s * tl.exp(beta[None, :] - b), 0.0)
            xq = tl.where((rows // SUB == I)[:, None], x * tl.exp(b - beta[None, :]), 0.0)
            W += mm(xq, tl.trans(key), LOWP)
    return W


@triton.jit
def value_decay_t(
    A,
    x,
    b,
    x_rows,
    x_stride,
    b_rows,
    n_rows,
    C: tl.constexpr,
    M: tl.constexpr,
    SUB: tl.constexpr,
    LOWP: tl.constexpr,
    EXACT: tl.constexpr,
):
    """out[j, m] = sum_{i>=j} A[i, j] x[i, m] exp(b[i, m] - b[j, m]). A [C, C]; x, b [C, M]; returns [C, M] fp32."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    if not EXACT:
        out = _value_decay_t_anchored(tl.where(cols[None, :] <= rows[:, None], A, 0.0), x, b, b_rows, C, M, SUB, LOWP,
                                      True)
    else:
        out = _value_decay_t_anchored(A, x, b, b_rows, C, M, SUB, LOWP, False)
        for d in range(SUB):  # pairs (j + d, j) inside a sub-chunk
            x_d, ok = load_rows_shifted(x_rows, -d, x_stride, n_rows, C, M, SUB)
            b_d, _ = load_rows_shifted(b_rows, -d, M, C, C, M, SUB)
            a_d = tl.sum(tl.where(rows[:, None] == cols[None, :] + d, A, 0.0), axis=0)
            out += tl.where(ok[:, None], a_d[:, None] * x_d * tl.exp(b_d - b), 0.0)
    return out


@triton.jit
def _value_decay_t_anchored(A, x, b, b_rows, C: tl.constexpr, M: tl.constexpr, SUB: tl.constexpr,
                            LOWP: tl.constexpr, INSIDE: tl.constexpr):
    """value_decay_t's pairs across sub-chunks, through the anchors (INSIDE: also the pairs inside one, A masked)."""
    rows = tl.arange(0, C)
    out = tl.zeros([C, M], dtype=tl.float32)
    for I in tl.static_range(C // SUB):  # sub-chunk I reaching back to the rows j before it (and into it, if INSIDE)
        beta = anchor(b_rows, I, M, SUB)
        reach: tl.constexpr = (I + 1) * SUB if INSIDE else I * SUB
        if reach > 0:
            xq = tl.where((rows // SUB == I)[:, None], x * tl.exp(b - beta[None, :]), 0.0)
            part = mm(tl.trans(A), xq, LOWP)
            out += tl.where(rows[:, None] < reach, tl.exp(beta[None, :] - b) * part, 0.0)
    return out

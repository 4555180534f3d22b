"""Intra-chunk building blocks shared by the forward and backward kernels.

A chunk holds C tokens; b [C, M] is the cumulative log-gate inside it (non-increasing, <= 0; rows past the end of a
short chunk repeat the last value). Every product below carries a decay exp(b[i, m] - b[j, m]) <= 1 between a later
row i and an earlier row j:

    value_decay(A, s)[i, m]   = sum_{j<=i} A[i, j] * s[j, m] * exp(b[i, m] - b[j, m])     (pass-1 logits, dp)
    key_decay(x, s)[i, j]     = sum_m x[i, m] * s[j, m] * exp(b[i, m] - b[j, m]), j<=i    (pass-2 weights, dq)
    value_decay_t(A, x)[j, m] = sum_{i>=j} A[i, j] * x[i, m] * exp(b[i, m] - b[j, m])     (ds)

Fast path: when the chunk decays by at most FAST_DECAY_LIMIT in every slot (`fast_path_ok`; always so for the gates
GSA produces in practice), the decay splits as exp(b_i) * exp(-b_j), both factors finite (exp(-b) < exp(60) ~ 1e26,
far from fp32's range), and each form is one matrix product under a causal mask:

    value_decay(A, s)   = eb * (tril(A) @ se)          eb = exp(b), enb = exp(-b), se = s * enb
    key_decay(x, s)     = tril(xe @ se^T)              xe = x * eb
    value_decay_t(A, x) = enb * (tril(A)^T @ xe)

The kernels form eb, enb and the scaled operands once and share them between the forms (each exp of a [C, M] tile,
and each change of register layout that a product's operands need, costs the heavy kernels' epilogues time).
Exact path (a chunk that decays by more: `*_exact`): the pairs are taken one diagonal offset d at a time, each
factor exp(b_i - b_{i-d}) formed whole, so no exponent is ever positive. Which path a chunk takes is decided once, by
chunk_local (its `exact` flags); each kernel takes it as the compile-time EXACT, so a kernel compiled for the fast
path holds none of the exact path's code (function._launch_both_paths launches both).

Products of two computed fp32 factors take bf16 operands for 16-bit inputs when LOWP: bf16 keeps fp32's exponent
range, so the fast path's large factors stay finite.

The exact path's register tensors hold whole chunks; the rows that a diagonal step needs shifted by d are re-read from
memory through the pointer arguments (`*_rows` point at row 0 of the chunk, `stride` is the row stride, `n_rows`
masks the short last chunk). b always comes from the per-chunk scratch buffer, which has all C rows.
"""

import triton
import triton.language as tl

from . import config, launch

# Triton 3.6's interpreter multiplies bf16 operands of tl.dot wrongly; bf16 products are exact in fp32, so under the
# interpreter the operands are upcast, which computes the same thing.
INTERPRET = tl.constexpr(launch.INTERPRET)

FAST_DECAY_LIMIT = tl.constexpr(config.FAST_DECAY_LIMIT)


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
def tril(A, C: tl.constexpr):
    """A [C, C] with the entries above the diagonal (j > i) set to 0."""
    rows = tl.arange(0, C)
    return tl.where(tl.arange(0, C)[None, :] <= rows[:, None], A, 0.0)


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
def fast_path_ok(b_last):
    """True when the chunk's decay over all its rows, b_last [M] (b's last row), stays above -FAST_DECAY_LIMIT in
    every slot."""
    return tl.min(b_last, axis=0) > -FAST_DECAY_LIMIT


@triton.jit
def load_rows_shifted(base, shift, stride, n_rows, C: tl.constexpr, M: tl.constexpr):
    """x[i - shift] (shift > 0) or x[i + (-shift)] (shift < 0); 0 where that row is outside the chunk or past
    n_rows. Returns the values (float32) and the mask."""
    rows = tl.arange(0, C)
    src = rows - shift
    ok = (src >= 0) & (src < n_rows)  # (n_rows <= C)
    cols = tl.arange(0, M)
    x = tl.load(base + src[:, None] * stride + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return x, ok


@triton.jit
def value_decay_exact(A, b, s_rows, s_stride, b_rows, n_rows, C: tl.constexpr, M: tl.constexpr):
    """value_decay(A, s) on the exact path: A [C, C] and b [C, M] in registers, s read through s_rows."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    out = tl.zeros([C, M], dtype=tl.float32)
    for d in range(C):  # pairs (i, i - d)
        s_d, ok = load_rows_shifted(s_rows, d, s_stride, n_rows, C, M)
        b_d, _ = load_rows_shifted(b_rows, d, M, C, C, M)
        a_d = tl.sum(tl.where(cols[None, :] == rows[:, None] - d, A, 0.0), axis=1)
        out += tl.where(ok[:, None], a_d[:, None] * s_d * tl.exp(b - b_d), 0.0)
    return out


@triton.jit
def key_decay_exact(x, b, s_rows, s_stride, b_rows, n_rows, C: tl.constexpr, M: tl.constexpr):
    """key_decay(x, s) on the exact path: x [C, M] and b in registers, s read through s_rows. Returns [C, C]."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    W = tl.zeros([C, C], dtype=tl.float32)
    for d in range(C):
        s_d, ok = load_rows_shifted(s_rows, d, s_stride, n_rows, C, M)
        b_d, _ = load_rows_shifted(b_rows, d, M, C, C, M)
        w_d = tl.sum(tl.where(ok[:, None], x * s_d * tl.exp(b - b_d), 0.0), axis=1)
        W += tl.where(cols[None, :] == rows[:, None] - d, w_d[:, None], 0.0)
    return W


@triton.jit
def value_decay_t_exact(A, b, x_rows, x_stride, b_rows, n_rows, C: tl.constexpr, M: tl.constexpr):
    """value_decay_t(A, x) on the exact path: A [C, C] and b in registers, x read through x_rows."""
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    out = tl.zeros([C, M], dtype=tl.float32)
    for d in range(C):  # pairs (j + d, j)
        x_d, ok = load_rows_shifted(x_rows, -d, x_stride, n_rows, C, M)
        b_d, _ = load_rows_shifted(b_rows, -d, M, C, C, M)
        a_d = tl.sum(tl.where(rows[:, None] == cols[None, :] + d, A, 0.0), axis=0)
        out += tl.where(ok[:, None], a_d[:, None] * x_d * tl.exp(b_d - b), 0.0)
    return out

"""Addressing shared by the chunk kernels: where a chunk lies, and [C, width] tiles of its rows.

Token tensors are packed [T', heads, D] (contiguous); a tile is the chunk's C rows (masked past the sequence's end,
n_rows) of one head and the columns d0 .. d0 + BD (masked past D). Per-chunk buffers are [NC, heads, rows, cols]
(`chunk_block`), full and unmasked.
"""

import triton
import triton.language as tl


@triton.jit
def chunk_span(c, cu_seqlens, chunk_seq, chunk_start, C: tl.constexpr):
    """The first token of chunk c and its number of rows: C, or fewer in a sequence's last chunk."""
    t0 = tl.load(chunk_start + c)
    return t0, tl.minimum(tl.load(cu_seqlens + tl.load(chunk_seq + c) + 1) - t0, C)


@triton.jit
def _tile_offsets(t0, head, n_heads, D: tl.constexpr, d0, n_rows, C: tl.constexpr, BD: tl.constexpr):
    rows = tl.arange(0, C)
    cols = d0 + tl.arange(0, BD)
    offsets = (t0 + rows)[:, None] * (n_heads * D) + head * D + cols[None, :]
    return offsets, (rows < n_rows)[:, None] & (cols < D)[None, :]


@triton.jit
def load_tile(x, t0, head, n_heads, D: tl.constexpr, d0, n_rows, C: tl.constexpr, BD: tl.constexpr):
    """x[t0 : t0 + C, head, d0 : d0 + BD] of x [T', n_heads, D] in x's dtype, 0 where masked."""
    offsets, mask = _tile_offsets(t0, head, n_heads, D, d0, n_rows, C, BD)
    return tl.load(x + offsets, mask=mask, other=0.0)


@triton.jit
def store_tile(x, value, t0, head, n_heads, D: tl.constexpr, d0, n_rows, C: tl.constexpr, BD: tl.constexpr):
    """Writes value [C, BD] (cast to x's dtype) to the tile of `load_tile`, rows and columns masked."""
    offsets, mask = _tile_offsets(t0, head, n_heads, D, d0, n_rows, C, BD)
    tl.store(x + offsets, value.to(x.dtype.element_ty), mask=mask)


@triton.jit
def load_slots(x, t0, head, n_heads, n_rows, C: tl.constexpr, M: tl.constexpr):
    """The chunk's [C, M] rows of a per-token slot tensor x [T', n_heads, M], as fp32, 0 past n_rows."""
    return load_tile(x, t0, head, n_heads, M, 0, n_rows, C, M).to(tl.float32)


@triton.jit
def store_slots(x, value, t0, head, n_heads, n_rows, C: tl.constexpr, M: tl.constexpr):
    store_tile(x, value, t0, head, n_heads, M, 0, n_rows, C, M)


@triton.jit
def chunk_block(base, c, head, n_heads, R: tl.constexpr, W: tl.constexpr):
    """Pointers [R, W] to block (c, head) of a per-chunk buffer [NC, n_heads, R, W]."""
    return base + (c * n_heads + head) * R * W + tl.arange(0, R)[:, None] * W + tl.arange(0, W)[None, :]


@triton.jit
def state_tile(S, c, head, n_heads, M: tl.constexpr, KV: tl.constexpr, start, D: tl.constexpr, d0, BD: tl.constexpr):
    """Pointers [M, BD] into state (c, head) of S [NC, n_heads, M, KV] (KV = K + V) and their column mask: columns
    start + d0 .. start + d0 + BD of the hk^T part (start = 0, D = K) or of the hv part (start = K, D = V)."""
    cols = d0 + tl.arange(0, BD)
    ptrs = S + (c * n_heads + head) * M * KV + tl.arange(0, M)[:, None] * KV + start + cols[None, :]
    return ptrs, (cols < D)[None, :]

"""The triton backend's launches: the chunked forward (3 kernels) and backward (bwd_values, bwd_keys and the scan,
reversed, once per half of the state).
`flash_gsa.ops.custom_op` wraps them as the torch.library ops `flash_gsa::triton_fwd` / `triton_bwd`.

Forward:  chunk_local (per chunk) -> chunk_scan (across chunks) -> chunk_output (per chunk).
Backward: chunk_scan, reversed, of the hv half -> bwd_values (per chunk) -> chunk_scan, reversed, of the hk half ->
bwd_keys (per chunk).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import config
from .chunk_bwd import bwd_keys_kernel, bwd_values_kernel
from .chunk_fwd import chunk_local_kernel, chunk_output_kernel
from .launch import BOUND, launch, specialization
from .scan import chunk_scan_kernel


@dataclass
class ChunkLayout:
    """Where the chunks of the packed sequences lie. No chunk straddles two sequences."""

    cu_seqlens: torch.Tensor  # [N + 1] int32
    chunk_offsets: torch.Tensor  # [N + 1] int32: first chunk of each sequence
    chunk_seq: torch.Tensor  # [NC] int32: the sequence of each chunk
    chunk_start: torch.Tensor  # [NC] int32: the first token of each chunk
    num_chunks: int
    chunk: int  # tokens per chunk


def chunk_layout(cu_seqlens: torch.Tensor, num_chunks: int | None, chunk: int) -> ChunkLayout:
    """Tables for `cu_seqlens`. `num_chunks` may be given when it is known on the host (equal-length batches)."""
    cu = cu_seqlens.to(torch.int32)
    lengths = (cu[1:] - cu[:-1]).long()
    per_seq = (lengths + chunk - 1) // chunk
    offsets = torch.zeros_like(cu)
    offsets[1:] = per_seq.cumsum(0)
    if num_chunks is None:
        num_chunks = int(offsets[-1].item())
    seq_ids = torch.arange(len(lengths), device=cu.device)
    chunk_seq = torch.repeat_interleave(seq_ids, per_seq, output_size=num_chunks)
    chunk_start = cu[chunk_seq] + (torch.arange(num_chunks, device=cu.device) - offsets[chunk_seq]) * chunk
    return ChunkLayout(cu, offsets, chunk_seq.to(torch.int32), chunk_start.to(torch.int32), num_chunks, chunk)


@lru_cache(maxsize=64)
def _equal_length_layout(batch: int, seq_len: int, chunk: int, device: torch.device) -> ChunkLayout:
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * seq_len
    return chunk_layout(cu, batch * config.cdiv(seq_len, chunk), chunk)


def layout_for(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, M: int, device) -> ChunkLayout:
    """The chunk layout of q [batch, seq_len, ...] (or of the packed sequences of `cu_seqlens`) for M slots. The
    tables of equal-length batches are built once per shape and device (a dozen small launches saved per call)."""
    C = config.chunk_size(M)
    if cu_seqlens is None:
        return _equal_length_layout(batch, seq_len, C, torch.device(device))
    return chunk_layout(cu_seqlens, None, C)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes `device` the current CUDA device for the launches inside: Triton launches on the current device (and its
    stream), so tensors on cuda:1 while cuda:0 is current would otherwise fail or read the wrong memory."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():  # (entering one costs ~2 us)
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def empty(*shape: int, device, dtype) -> torch.Tensor:
    """Every buffer and output of this backend is allocated here, so that tests can poison them (fill with NaN)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-chunk states and pairwise weights are kept in bf16 for 16-bit inputs (their matrix products take 16-bit
    operands anyway; every sum over chunks is carried in fp32 registers), in fp32 otherwise."""
    return torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else torch.float32


@dataclass(frozen=True)
class _KernelInfo:
    name: str  # the kernel's key in config's tables: chunk_local_kernel -> "local", bwd_keys_kernel -> "bwd_keys"
    takes: frozenset[str]  # its parameters
    tiled: bool  # takes K / V tile widths (BK and / or BV)


_INFO: dict[int, _KernelInfo] = {}  # by id(kernel): hashing a JITFunction costs host time on every launch


def _info(kernel) -> _KernelInfo:
    info = _INFO.get(id(kernel))
    if info is None:
        name = kernel.fn.__name__.removesuffix("_kernel").removeprefix("chunk_")
        takes = frozenset(kernel.arg_names)
        info = _INFO[id(kernel)] = _KernelInfo(name, takes, not takes.isdisjoint({"BK", "BV"}))
    return info


def _width(limit: int, D: int, itemsize: int) -> int:
    """Tile width for a dimension of size D with elements of `itemsize` bytes: `limit`, or D rounded up to a power of
    two if that is less, and never narrower than config.MIN_TILE_BYTES."""
    return max(config.MIN_TILE_BYTES // itemsize, min(limit, config.next_power_of_2(D)))


def _tile(D: int, name: str, itemsize: int) -> int:
    """Width of the tiles of a K or V dimension of size D in kernel `name`'s products (config.TILE, capped at D)."""
    return _width(config.TILE[name], D, itemsize)


_SIGNATURES: dict[tuple, int] = {}  # a call's signature -> a small int: hashed once per call, not at every launch


def signature(sizes: dict, tensors: tuple, *also) -> int:
    """What the chunk kernels' launches in one call are compiled for, beyond each launch's own compile-time arguments,
    as a small int: the device; for each of `tensors` that the call did not allocate itself what `launch` keys on (a
    tensor's dtype and 16-byte alignment, None); the compile-time `sizes`; config's warps, stages, register caps and
    tile widths; and `also`. Every buffer allocated here follows from them: its dtype from theirs, and it is aligned
    (the CUDA caching allocator aligns to 512 bytes). With the kernel and the launch's own sizes it keys
    `launch.BOUND`."""
    full = (tensors[0].device.index, *map(specialization, tensors), *sizes.items(), *config.NUM_WARPS.items(),
            *config.NUM_STAGES.items(), *config.MAX_REGISTERS.items(), *config.TILE.items(), config.MIN_TILE_BYTES,
            *also)
    sig = _SIGNATURES.get(full)
    if sig is None:
        sig = _SIGNATURES[full] = len(_SIGNATURES)
    return sig


def _launch(kernel, grid, sig: int, sizes: dict, *args, **extra) -> None:
    """Launches `kernel` with the sizes among `sizes` and `extra` (this launch's own; they win) that it takes, its
    K / V tile widths (BK, BV), and its warps, stages and register cap from `config`. `sig` is the call's `signature`
    of `sizes`: with the kernel and `extra` it finds the compiled kernel in `launch.BOUND` without looking at the
    arguments (~10 us of host time per launch)."""
    key = (id(kernel), sig, *extra.items())
    launcher = BOUND.get(key)
    if launcher is not None:
        launcher(grid, *args)
        return
    info = _info(kernel)
    name = info.name
    sizes = {**sizes, **extra}
    if info.tiled:
        itemsize = args[0].element_size()  # every tiled kernel's first argument is a token tensor (q, k or v)
        sizes.update(BK=_tile(sizes["K"], name, itemsize), BV=_tile(sizes["V"], name, itemsize))
    const = {k: v for k, v in sizes.items() if k in info.takes}
    launcher = launch(kernel, grid, args, const, config.NUM_WARPS[name], config.NUM_STAGES[name],
                      config.MAX_REGISTERS.get(name))
    if launcher is not None:
        BOUND[key] = launcher


def _launch_both_paths(kernel, items: tuple[int, int], sig: int, sizes: dict, *args) -> None:
    """Launches a kernel with intra-chunk products twice, for the `items` = (chunks, heads) of a chunk and head grid:
    first one program per item on the fast path (every item whose chunk_local `exact` flag is 0), then the exact
    path's programs, each of which reads the flags of config.EXACT_ITEMS (chunk, kv-head) pairs at once and returns
    unless one of them is flagged. Compiled apart, the fast kernel holds none of the exact path's code: on the H200
    that made the three kernels 4-11% faster than one kernel with a runtime branch between the paths. Grouping the
    exact path's pairs leaves few programs to launch and retire when (as usual) no chunk is flagged, while as many
    programs as fit on the GPU still take flagged pairs in parallel."""
    n_items = items[0] * sizes["H"]  # (chunk, kv-head) pairs, the entries of `exact`
    per = config.EXACT_ITEMS
    _launch(kernel, items, sig, sizes, *args, n_items, EXACT=False, ITEMS=per)
    _launch(kernel, (config.cdiv(n_items, per),), sig, sizes, *args, n_items, EXACT=True, ITEMS=per)


def _sizes(q, k, v, M: int, layout: ChunkLayout, lowp: bool) -> dict:
    """The compile-time sizes of the chunk kernels (each takes the subset it needs)."""
    K, V = q.shape[-1], v.shape[-1]
    return dict(
        H=k.shape[-2],
        G=q.shape[-2] // k.shape[-2],
        K=K,
        V=V,
        M=M,
        C=layout.chunk,
        # bf16 operands only where each [C, M] and [C, C] operand row is at least config.MIN_TILE_BYTES wide: at M = 32
        # (T = 65, varlen) Triton 3.6's bf16 products gave dq 0.88 off on an H200 (session 19), as narrow 16-bit token
        # tiles did before
        LOWP=lowp and q.dtype != torch.float32 and 2 * min(M, layout.chunk) >= config.MIN_TILE_BYTES,
    )


def _scan(sig: int, sizes: dict, parts: dict, out, b_last, init, final, layout: ChunkLayout, H: int, G: int,
          reverse: bool) -> None:
    """Runs chunk_scan_kernel over the chunks' products w^T x for the `parts` of the state it is given: "keys" (the
    hk^T columns) and / or "values" (the hv columns), each a pair w [NC, H * G, C, M], x [T', H * G, K or V]. Writes
    those columns of `out` [NC, H, M, K + V] (the states entering each chunk; reversed, the gradients of those leaving
    it) and of `final` [N, H, M, K + V] fp32, the state after the last chunk (the first, when reversed), starting from
    `init` (same layout) or 0."""
    M, K, V = out.shape[-2], sizes["K"], sizes["V"]
    n_seq = layout.cu_seqlens.numel() - 1
    w, x = next(iter(parts.values()))
    # columns of one scan tile; the K part's tiles come first, then the V part's
    BN = _width(config.BLOCK_SCAN, max(K, V), x.element_size())
    nk, nv = config.cdiv(K, BN), config.cdiv(V, BN)
    tiles = (nk if "keys" in parts else 0) + (nv if "values" in parts else 0)
    BM = min(config.BLOCK_SCAN_M[1], M)
    many = tiles * (M // BM) * n_seq * H >= config.SCAN_MANY_PROGRAMS
    if not many:
        BM = min(config.BLOCK_SCAN_M[0], M)
    # the pipelined walk for many walks of 64-slot tiles (measured slower with fewer or smaller), with as many stages
    # as fit: each holds the G heads' [C, BM] weights and [C, BN] tokens and the chunk's BM decays
    stage = G * layout.chunk * (BM * w.element_size() + BN * x.element_size()) + 4 * BM
    stages = min(config.SCAN_STAGES, config.SCAN_SHARED_BYTES // stage)
    pipelined = many and BM >= 64 and stages >= 2
    grid = (tiles, M // BM, n_seq * H)
    wk, xk = parts.get("keys", parts.get("values"))  # a launch of one half passes its tensors in the other's place
    wv, xv = parts.get("values", parts.get("keys"))  # too: that half's tiles are not in its grid
    _launch(chunk_scan_kernel, grid, sig, sizes, wk, xk, wv, xv, out, b_last, init if init is not None else final,
            final, layout.cu_seqlens, layout.chunk_offsets, G=G, BM=BM, BN=BN, REVERSE=reverse,
            HAS_INIT=init is not None, FIRST_TILE=0 if "keys" in parts else nk, PIPELINED=pipelined,
            STAGES=stages if pipelined else 1)


def chunk_forward(q, k, v, g, s, scale: float, init, layout: ChunkLayout):
    """q [T', HQ, K] ... (contiguous; or [B, T, HQ, K] ..., read as [B * T, HQ, K]). init: [N, H, M, K + V] fp32 or
    None. Returns o (q's shape, V for K), the final state [N, H, M, K + V] fp32 and the buffers the backward needs: b,
    b_last, the states entering each chunk, z, lse, W, q k^T, p * exp(b), exact."""
    HQ, K = q.shape[-2:]
    T, H, V, M = q.numel() // (HQ * K), k.shape[-2], v.shape[-1], g.shape[-1]
    C, NC = layout.chunk, layout.num_chunks
    sizes = _sizes(q, k, v, M, layout, config.LOWP_FORWARD)
    dev, f32, low = q.device, torch.float32, state_dtype(q.dtype)
    b = empty(NC, H, C, M, device=dev, dtype=f32)
    b_last = empty(NC, H, M, device=dev, dtype=f32)
    w = empty(NC, H, C, M, device=dev, dtype=k.dtype)
    states = empty(NC, H, M, K + V, device=dev, dtype=low)
    exact = empty(NC, H, device=dev, dtype=torch.int32)
    tables = (layout.cu_seqlens, layout.chunk_seq, layout.chunk_start)
    sig = signature(sizes, (q, k, v, g, s, init, layout.cu_seqlens))

    _launch(chunk_local_kernel, (NC, H), sig, sizes, g, s, b, b_last, w, exact, *tables)
    final = empty(layout.cu_seqlens.numel() - 1, H, M, K + V, device=dev, dtype=f32)
    _scan(sig, sizes, {"keys": (w, k), "values": (w, v)}, states, b_last, init, final, layout, H, 1, reverse=False)
    o = empty(*q.shape[:-1], V, device=dev, dtype=q.dtype)
    z = empty(T, HQ, M, device=dev, dtype=f32)
    lse = empty(T, HQ, device=dev, dtype=f32)
    W, QK = (empty(NC, HQ, C, C, device=dev, dtype=low) for _ in range(2))
    wdo = empty(NC, HQ, C, M, device=dev, dtype=q.dtype)
    _launch_both_paths(chunk_output_kernel, (NC, HQ), sig, sizes, q, k, v, s, b, states, o, z, lse, W, QK, wdo, exact,
                       *tables, scale)
    return o, final, (b, b_last, states, z, lse, W, QK, wdo, exact)


def chunk_backward(q, k, v, s, do, d_final, saved, scale: float, layout: ChunkLayout, g_dtype: torch.dtype):
    """Gradients of q, k, v, s, g (in g_dtype, cast from fp32 in the kernel) and of the initial state. d_final:
    gradient of the final state, or None. Tensors as chunk_forward's; each gradient has its tensor's shape."""
    b, b_last, states, z, lse, W, QK, wdo, exact = saved
    HQ, K = q.shape[-2:]
    T, H, V, M = q.numel() // (HQ * K), k.shape[-2], v.shape[-1], s.shape[-1]
    G, C, NC = HQ // H, layout.chunk, layout.num_chunks
    sizes = _sizes(q, k, v, M, layout, config.LOWP_BACKWARD)
    dev, f32, low = q.device, torch.float32, state_dtype(q.dtype)
    tables = (layout.cu_seqlens, layout.chunk_seq, layout.chunk_start)
    sig = signature(sizes, (q, k, v, s, do, d_final, layout.cu_seqlens), g_dtype)

    D = empty(NC, H, M, K + V, device=dev, dtype=low)
    d_init = empty(layout.cu_seqlens.numel() - 1, H, M, K + V, device=dev, dtype=f32)
    _scan(sig, sizes, {"values": (wdo, do)}, D, b_last, d_final, d_init, layout, H, G, reverse=True)

    wq = empty(NC, HQ, C, M, device=dev, dtype=q.dtype)
    Wd = empty(NC, HQ, C, C, device=dev, dtype=low)
    p, dzs, pz = (empty(T, HQ, M, device=dev, dtype=low) for _ in range(3))  # (p, dzs: the exact path's scratch)
    dsv = empty(T, HQ, M, device=dev, dtype=f32)
    later = empty(NC, HQ, M, device=dev, dtype=f32)
    dv = empty(*v.shape, device=dev, dtype=v.dtype)
    dv_heads = dv if G == 1 else empty(*q.shape[:-1], V, device=dev, dtype=f32)  # per query head, summed below
    _launch_both_paths(bwd_values_kernel, (NC, HQ), sig, sizes, v, s, b, b_last, states, D, do, z, lse, W, QK, p, dzs,
                       pz, dsv, later, Wd, wq, dv_heads, exact, *tables, scale)
    if G > 1:
        dv.copy_(dv_heads.unflatten(-2, (H, G)).sum(-2))
    _scan(sig, sizes, {"keys": (wq, q)}, D, b_last, d_final, d_init, layout, H, G, reverse=True)

    dq, dk, ds = (empty(*x.shape, device=dev, dtype=x.dtype) for x in (q, k, s))
    dg = empty(*s.shape, device=dev, dtype=g_dtype)
    _launch(bwd_keys_kernel, (NC, H), sig, sizes, q, k, s, b, b_last, states, D, Wd, wq, dsv, pz, later, dq, dk, ds, dg,
            *tables)
    return dq, dk, dv, ds, dg, d_init

"""Decoding kernel: the GSA recurrence for one token (or a few, T <= 64) per sequence, forward only.

Per sequence and kv-head, with a_t = exp(g_t) (g in log space, <= 0):

    hk_t = hk_{t-1} * a_t[None, :] + k_t[:, None] * s_t[None, :]     hk: [K, M]
    hv_t = hv_{t-1} * a_t[:, None] + s_t[:, None] * v_t[None, :]     hv: [M, V]
    o_t  = softmax_M(scale * q_t @ hk_t) @ hv_t                       each of the G = HQ / H query heads of the group

Two launches, each over tiles of one state:

1. keys: one program per (sequence, kv-head, K-tile). It loads its [BK, M] tile of hk once, walks the T steps
   keeping the tile in registers, and writes, per step and query head, its partial slot logits q[tile] @ hk[tile]
   to a small fp32 scratch [tokens, HQ, NK, M]. It stores the tile once at the end.
2. values: one program per (sequence, kv-head, V-tile). It loads its [M, BV] tile of hv once, walks the same steps,
   sums the NK partial logits, takes the softmax over the slots in fp32, updates the tile and writes o[:, tile].

Every state element is read once and written once, k/v/g/s are read in place for all G query heads (never
repeated in memory), accumulation is fp32, and only g is exponentiated. The scratch (NK * M floats per token and
query head) is the one extra traffic. Splitting the state into tiles over K and V gives B * H * (NK + NV) programs,
enough to spread a batch of one over the GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import config
from .function import device_guard

State = tuple[torch.Tensor, torch.Tensor]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gsa_decode_keys_kernel(
    q,
    k,
    g,
    s,
    hk0,
    hk1,
    zp,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    M: tl.constexpr,
    BK: tl.constexpr,
    BM: tl.constexpr,
    NK: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    """Key pass. Program (n, h, K-tile i): reads hk0[n, h, tile, :] (if HAS_H0), k[., h, tile], g and s[., h, :],
    q[., h*G:(h+1)*G, tile]; writes zp[t, h*G+j, i, :] = scale * q_tj[tile] @ hk_t[tile, :] for each step t and query
    head j, and hk1[n, h, tile, :] (if STORE_FINAL; hk1 may alias hk0)."""
    pid = tl.program_id(0).to(tl.int64)
    i_k = pid % NK
    i_nh = pid // NK
    i_n = i_nh // H
    i_h = i_nh % H
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T

    o_k = i_k * BK + tl.arange(0, BK)
    o_m = tl.arange(0, BM)
    m_k = o_k < K
    m_m = o_m < M
    m_h = m_k[:, None] & m_m[None, :]
    p_h = i_nh * K * M + o_k[:, None] * M + o_m[None, :]
    if HAS_H0:
        b_h = tl.load(hk0 + p_h, mask=m_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BK, BM], dtype=tl.float32)

    # A while loop rather than range(length): Triton's interpreter cannot take a run-time bound with NumPy >= 2.4.
    t = bos
    while t < eos:
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + (t * H + i_h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_s = tl.load(s + (t * H + i_h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_h = b_h * tl.exp(b_g)[None, :] + b_k[:, None] * b_s[None, :]
        for j in tl.static_range(G):
            i_q = (t * H + i_h) * G + j
            b_q = tl.load(q + i_q * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
            b_z = tl.sum(b_h * b_q[:, None], axis=0)
            tl.store(zp + (i_q * NK + i_k) * M + o_m, b_z, mask=m_m)
        t += 1

    if STORE_FINAL:
        tl.store(hk1 + p_h, b_h, mask=m_h)


@triton.jit
def _gsa_decode_values_kernel(
    v,
    g,
    s,
    zp,
    o,
    hv0,
    hv1,
    cu_seqlens,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    BV: tl.constexpr,
    BM: tl.constexpr,
    NK: tl.constexpr,
    BNK: tl.constexpr,
    NV: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    """Value pass. Program (n, h, V-tile i): reads hv0[n, h, :, tile] (if HAS_H0), v[., h, tile], g and s[., h, :],
    the partial logits zp[., h*G:(h+1)*G, :, :]; writes o[t, h*G+j, tile] = softmax(sum of partials) @ hv_t[:, tile]
    for each step t and query head j, and hv1[n, h, :, tile] (if STORE_FINAL; hv1 may alias hv0)."""
    pid = tl.program_id(0).to(tl.int64)
    i_v = pid % NV
    i_nh = pid // NV
    i_n = i_nh // H
    i_h = i_nh % H
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T

    o_v = i_v * BV + tl.arange(0, BV)
    o_m = tl.arange(0, BM)
    o_nk = tl.arange(0, BNK)
    m_v = o_v < V
    m_m = o_m < M
    m_h = m_m[:, None] & m_v[None, :]
    m_z = (o_nk[:, None] < NK) & m_m[None, :]
    p_h = i_nh * M * V + o_m[:, None] * V + o_v[None, :]
    if HAS_H0:
        b_h = tl.load(hv0 + p_h, mask=m_h, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BM, BV], dtype=tl.float32)

    t = bos
    while t < eos:
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + (t * H + i_h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_s = tl.load(s + (t * H + i_h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_h = b_h * tl.exp(b_g)[:, None] + b_s[:, None] * b_v[None, :]
        for j in tl.static_range(G):
            i_q = (t * H + i_h) * G + j
            b_z = tl.sum(tl.load(zp + (i_q * NK + o_nk[:, None]) * M + o_m[None, :], mask=m_z, other=0.0), axis=0)
            b_z = tl.where(m_m, b_z, float("-inf"))
            b_p = tl.exp(b_z - tl.max(b_z, axis=0))
            b_p = b_p / tl.sum(b_p, axis=0)
            b_o = tl.sum(b_h * b_p[:, None], axis=0)
            tl.store(o + i_q * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        t += 1

    if STORE_FINAL:
        tl.store(hv1 + p_h, b_h, mask=m_h)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every tensor the kernels write (a seam for tests that poison fresh memory)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block(extent: int, bm: int, tile: int) -> int:
    """Power-of-two block along K or V so that block * bm is about `tile`, no larger than needed for `extent`."""
    return max(1, min(config.next_power_of_2(extent), tile // bm))


def _tiles(n_heads: int, k: int, v: int, bm: int) -> tuple[int, int]:
    """(BK, BV): the largest tiles up to DECODE_MAX_TILE that still give about DECODE_TARGET_PROGRAMS programs."""
    tile = config.DECODE_MAX_TILE
    while tile > config.DECODE_MIN_TILE and n_heads * config.cdiv(max(k, v), _block(max(k, v), bm, tile)) < (
        config.DECODE_TARGET_PROGRAMS
    ):
        tile //= 2
    return _block(k, bm, tile), _block(v, bm, tile)


def _check(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != rank:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a {rank}-d torch.Tensor, got {got}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def fused_recurrent_gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """GSA decoding step(s) in Triton: the recurrence over a few tokens, forward only (no autograd).

    Meant for `generate()`: one token per sequence (T = 1), or a short block (T <= 64; longer T is correct but
    sequential, so use `flash_gsa.gsa` for prompts).

    Args:
        q: `[B, T, HQ, K]`, HQ a multiple of H; the G = HQ / H query heads of a group share k, v, g, s.
        k: `[B, T, H, K]`.  v: `[B, T, H, V]`.
        g: log forget gates `[B, T, H, M]`, entries <= 0.
        s: slot write weights `[B, T, H, M]`; default `1 - exp(g)`.
        scale: multiplies the slot logits; default `K ** -0.5`.
        initial_state: `(hk [N, H, K, M], hv [N, H, M, V])`; zeros when None.
        output_final_state: return the state after the last token of each sequence.
        cu_seqlens: `[N + 1]` int32/int64 offsets of N sequences packed along T (B == 1). Not checked on the host
            (that would synchronise): it must start at 0, end at T and not decrease.
        inplace: write the final state into the `initial_state` tensors themselves (they must be float32 and
            contiguous) instead of new ones. With `output_final_state` those same tensor objects are returned as the
            final state; without it they are still updated and None is returned.

    Inputs may be float32, bfloat16 or float16; the state is float32 and all arithmetic is fp32.
    Returns `o [B, T, HQ, V]` in q's dtype and the final state (float32) or None.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        _check(name, x, 4)
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], g.shape[3]
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have shape {(B, T, H, K)}, got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H) or tuple(g.shape[:3]) != (B, T, H):
        raise ValueError(f"v and g must be [B, T, H, .] = {(B, T, H)}, got {tuple(v.shape)} and {tuple(g.shape)}")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"q's heads ({HQ}) must be a multiple of k's heads ({H})")
    if s is not None:
        _check("s", s, 4)
        if s.shape != g.shape:
            raise ValueError(f"s must have g's shape {tuple(g.shape)}, got {tuple(s.shape)}")
    device = q.device
    for name, x in (("k", k), ("v", v), ("g", g), ("s", s), ("cu_seqlens", cu_seqlens)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device}, but q is on {device}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton decoding kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, g, s)):
        raise ValueError("fused_recurrent_gsa is forward only; use flash_gsa.gsa for gradients (or torch.no_grad())")
    if cu_seqlens is not None:
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-d int32/int64 tensor [N + 1] with N >= 1")
        if B != 1:
            raise ValueError(f"cu_seqlens needs a packed batch (B == 1), got B = {B}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("initial_state must be a tuple (hk, hv)")
        for name, x, shape in (("hk", initial_state[0], (N, H, K, M)), ("hv", initial_state[1], (N, H, M, V))):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape or x.device != device:
                got = (tuple(x.shape), str(x.device)) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"initial_state {name} must be a tensor of shape {shape} on {device}, got {got}")
            if inplace and (x.dtype != torch.float32 or not x.is_contiguous()):
                raise ValueError(f"inplace=True needs a float32 contiguous initial_state {name}")
    elif inplace:
        raise ValueError("inplace=True updates initial_state in place, so it needs one")
    if scale is None:
        scale = K**-0.5
    elif not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number, got {type(scale).__name__}")

    if s is None:
        s = -torch.expm1(g)
    q, k, v, g, s = (x.contiguous() for x in (q, k, v, g, s))
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    has_h0 = initial_state is not None
    store_final = output_final_state or inplace
    hk0 = hv0 = None
    if has_h0:
        hk0, hv0 = (x.to(torch.float32).contiguous() for x in initial_state)
    if inplace:
        hk1, hv1 = hk0, hv0
    elif output_final_state:
        hk1, hv1 = _empty((N, H, K, M), torch.float32, device), _empty((N, H, M, V), torch.float32, device)
    else:
        hk1 = hv1 = None

    BM = config.next_power_of_2(M)
    BK, BV = _tiles(N * H, K, V, BM)
    NK, NV = config.cdiv(K, BK), config.cdiv(V, BV)
    o = _empty((B, T, HQ, V), q.dtype, device)
    zp = _empty((B * T, HQ, NK, M), torch.float32, device)
    common = dict(
        H=H,
        G=HQ // H,
        M=M,
        BM=BM,
        NK=NK,
        VARLEN=cu_seqlens is not None,
        HAS_H0=has_h0,
        STORE_FINAL=store_final,
        num_warps=config.DECODE_NUM_WARPS,
        num_stages=config.DECODE_NUM_STAGES,
    )
    if N * H > 0:
        with device_guard(device):
            _gsa_decode_keys_kernel[(N * H * NK,)](
                q, k, g, s, hk0, hk1, zp, cu_seqlens, float(scale), T, K=K, BK=BK, **common
            )
            _gsa_decode_values_kernel[(N * H * NV,)](
                v, g, s, zp, o, hv0, hv1, cu_seqlens, T, V=V, BV=BV, BNK=config.next_power_of_2(NK), NV=NV, **common
            )
    return o, ((hk1, hv1) if output_final_state else None)

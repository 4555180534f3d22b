"""Decoding kernel: the GSA recurrence for one token (or a few, T <= 64) per sequence, forward only.

Per sequence and kv-head, with a_t = exp(g_t) (g in log space, <= 0):

    hk_t = hk_{t-1} * a_t[None, :] + k_t[:, None] * s_t[None, :]     hk: [K, M]
    hv_t = hv_{t-1} * a_t[:, None] + s_t[:, None] * v_t[None, :]     hv: [M, V]
    o_t  = softmax_M(scale * q_t @ hk_t) @ hv_t                       each of the G = HQ / H query heads of the group

One launch, one program per (sequence, kv-head): per step it walks the tiles of hk (updating each and summing the
slot logits of all G query heads), takes the softmax over the slots in fp32, then walks the tiles of hv (updating
each and writing o). A decoding step is bound by host time (Python and launches: two launches took ~120 us per
step on the H200 machine, the kernels a few), so one launch matters more than spreading a batch of one over many
programs. Every state element is read once and written once per step, k/v/g/s are read in place for all G query
heads (never repeated in memory), accumulation is fp32, and only g is exponentiated. From the second step of a
sequence on, the program reads back the state it wrote (a barrier orders the two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from .function import device_guard
from .launch import INTERPRET, launch

State = tuple[torch.Tensor, torch.Tensor]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _decode_step(q, k, v, g, s, hk_src, hv_src, hk1, hv1, o, scale, t, i_nh, i_h,
                 H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
                 BG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, HAS_SRC: tl.constexpr,
                 STORE: tl.constexpr):
    """One step t of sequence-head i_nh: reads the state from hk_src / hv_src (zeros without HAS_SRC), k[t, h],
    v[t, h], g and s[t, h, :], q[t, h*G:(h+1)*G]; writes o[t, h*G:(h+1)*G] and, with STORE, the new state to
    hk1 / hv1 (which may be the source)."""
    o_m = tl.arange(0, BM)
    o_g = tl.arange(0, BG)
    m_m = o_m < M
    m_g = o_g < G
    b_g = tl.load(g + (t * H + i_h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_s = tl.load(s + (t * H + i_h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_a = tl.exp(b_g)
    rows = (t * H + i_h) * G + o_g  # the group's query heads in q and o

    b_z = tl.zeros([BG, BM], dtype=tl.float32)
    for i_k in tl.static_range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < K
        m_h = m_k[:, None] & m_m[None, :]
        p_h = i_nh * K * M + o_k[:, None] * M + o_m[None, :]
        if HAS_SRC:
            b_h = tl.load(hk_src + p_h, mask=m_h, other=0.0).to(tl.float32)
        else:
            b_h = tl.zeros([BK, BM], dtype=tl.float32)
        b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_h = b_h * b_a[None, :] + b_k[:, None] * b_s[None, :]
        if STORE:
            tl.store(hk1 + p_h, b_h, mask=m_h)
        b_q = tl.load(q + rows[:, None] * K + o_k[None, :], mask=m_g[:, None] & m_k[None, :], other=0.0)
        b_z += tl.sum(b_q.to(tl.float32)[:, :, None] * b_h[None, :, :], axis=1)

    b_z = tl.where(m_m[None, :], b_z * scale, float("-inf"))
    b_p = tl.exp(b_z - tl.max(b_z, axis=1)[:, None])
    b_p = b_p / tl.sum(b_p, axis=1)[:, None]

    for i_v in tl.static_range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m_v = o_v < V
        m_h = m_m[:, None] & m_v[None, :]
        p_h = i_nh * M * V + o_m[:, None] * V + o_v[None, :]
        if HAS_SRC:
            b_h = tl.load(hv_src + p_h, mask=m_h, other=0.0).to(tl.float32)
        else:
            b_h = tl.zeros([BM, BV], dtype=tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_h = b_h * b_a[:, None] + b_s[:, None] * b_v[None, :]
        if STORE:
            tl.store(hv1 + p_h, b_h, mask=m_h)
        b_o = tl.sum(b_p[:, :, None] * b_h[None, :, :], axis=1)
        tl.store(o + rows[:, None] * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_g[:, None] & m_v[None, :])


@triton.jit
def _copy_state(hk0, hv0, hk1, hv1, i_nh, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, BM: tl.constexpr, HAS_H0: tl.constexpr):
    """An empty sequence: its final state is its initial state (zeros without HAS_H0)."""
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    for i_k in tl.static_range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        m_h = (o_k < K)[:, None] & m_m[None, :]
        p_h = i_nh * K * M + o_k[:, None] * M + o_m[None, :]
        b_h = tl.zeros([BK, BM], dtype=tl.float32)
        if HAS_H0:
            b_h = tl.load(hk0 + p_h, mask=m_h, other=0.0)
        tl.store(hk1 + p_h, b_h, mask=m_h)
    for i_v in tl.static_range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        m_h = m_m[:, None] & (o_v < V)[None, :]
        p_h = i_nh * M * V + o_m[:, None] * V + o_v[None, :]
        b_h = tl.zeros([BM, BV], dtype=tl.float32)
        if HAS_H0:
            b_h = tl.load(hv0 + p_h, mask=m_h, other=0.0)
        tl.store(hv1 + p_h, b_h, mask=m_h)


@triton.jit
def _gsa_decode_kernel(
    q,
    k,
    v,
    g,
    s,
    hk0,
    hv0,
    hk1,
    hv1,
    o,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    M: tl.constexpr,
    BG: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BM: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE: tl.constexpr,
):
    """Program (n, h): the steps of sequence n for kv-head h. Reads hk0[n, h], hv0[n, h] (if HAS_H0) and the tokens'
    q, k, v, g, s; writes o for every step and, with STORE, the state after each step into hk1[n, h], hv1[n, h]
    (the final state when the program ends; they may alias hk0, hv0; STORE is needed when a sequence has more than
    one step, which reads back what the previous step stored)."""
    i_nh = tl.program_id(0).to(tl.int64)
    i_n = i_nh // H
    i_h = i_nh % H
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    if eos > bos:
        _decode_step(q, k, v, g, s, hk0, hv0, hk1, hv1, o, scale, bos, i_nh, i_h, H, G, K, V, M, BG, BK, BV, BM,
                     HAS_H0, STORE)
    elif STORE:
        _copy_state(hk0, hv0, hk1, hv1, i_nh, K, V, M, BK, BV, BM, HAS_H0)
    # A while loop rather than range(length): Triton's interpreter cannot take a run-time bound with NumPy >= 2.4.
    t = bos + 1
    while t < eos:
        tl.debug_barrier()  # the previous step's stores are visible to every thread of the program
        _decode_step(q, k, v, g, s, hk1, hv1, hk1, hv1, o, scale, t, i_nh, i_h, H, G, K, V, M, BG, BK, BV, BM,
                     True, True)
        t += 1


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of every tensor the kernels write (a seam for tests that poison fresh memory)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(extent: int, bg: int, bm: int) -> int:
    """Power-of-two tile along K or V: the [BG, tile, BM] product of a step has at most DECODE_PRODUCT elements."""
    return max(16, min(config.next_power_of_2(extent), config.DECODE_PRODUCT // (bg * bm)))


def launch_decode_kernel(q, k, v, g, s, scale: float, hk0, hv0, hk1, hv1, o, cu_seqlens, N: int, store: bool):
    """Launches `_gsa_decode_kernel` on checked, contiguous tensors (shapes as in `fused_recurrent_gsa`; hk0/hv0 None
    for a zero initial state, hk1/hv1 None unless `store`): one program per (sequence, kv-head)."""
    T, HQ, K = q.shape[1:]
    H, V, M = k.shape[2], v.shape[3], g.shape[3]
    G = HQ // H
    BG, BM = config.next_power_of_2(G), config.next_power_of_2(M)
    const = dict(H=H, G=G, K=K, V=V, M=M, BG=BG, BK=_tile(K, BG, BM), BV=_tile(V, BG, BM), BM=BM,
                 VARLEN=cu_seqlens is not None, HAS_H0=hk0 is not None, STORE=store)
    return launch(_gsa_decode_kernel, (N * H,), (q, k, v, g, s, hk0, hv0, hk1, hv1, o, cu_seqlens, scale, T), const,
                  config.DECODE_NUM_WARPS, config.DECODE_NUM_STAGES)


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
    if device.type != "cuda" and not INTERPRET:
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
    hk0 = hv0 = None
    if has_h0:
        hk0, hv0 = (x.to(torch.float32).contiguous() for x in initial_state)
    # A sequence of several steps reads back the state each step stores: then a state is stored even when the caller
    # asked for none (into scratch). With cu_seqlens the lengths are not known on the host.
    store = output_final_state or inplace or T > 1 or cu_seqlens is not None
    if inplace:
        hk1, hv1 = hk0, hv0
    elif store:
        hk1, hv1 = _empty((N, H, K, M), torch.float32, device), _empty((N, H, M, V), torch.float32, device)
    else:
        hk1 = hv1 = None

    o = _empty((B, T, HQ, V), q.dtype, device)
    if N * H > 0:
        with device_guard(device):
            launch_decode_kernel(q, k, v, g, s, float(scale), hk0, hv0, hk1, hv1, o, cu_seqlens, N, store)
    return o, ((hk1, hv1) if output_final_state else None)

"""The reference backend: GSA as the token-by-token recurrence. This is the spec.

Every other backend is tested against this file. It favours clarity over speed: one Python step per token,
computed in float32 (float64 when the inputs are float64), differentiable through autograd.

Per sequence and kv-head, with a_t = exp(g_t):

    hk_t = hk_{t-1} * a_t[None, :] + k_t[:, None] * s_t[None, :]     hk: [K, M]
    hv_t = hv_{t-1} * a_t[:, None] + s_t[:, None] * v_t[None, :]     hv: [M, V]
    o_t  = softmax_M(scale * q_t @ hk_t) @ hv_t                       per query head of the group
"""

from __future__ import annotations

import torch

State = tuple[torch.Tensor, torch.Tensor]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _recurrence(q, k, v, g, s, scale: float, hk, hv):
    """Batched recurrence over dense sequences. q [N,T,HQ,K]; k [N,T,H,K]; v [N,T,H,V]; g, s [N,T,H,M];
    hk [N,H,K,M]; hv [N,H,M,V]. Returns o [N,T,HQ,V] and the final (hk, hv)."""
    N, T, HQ, K = q.shape
    H = k.shape[2]
    q = q.view(N, T, H, HQ // H, K)
    outputs = []
    for t in range(T):
        a = g[:, t].exp()
        hk = hk * a[:, :, None, :] + k[:, t, :, :, None] * s[:, t, :, None, :]
        hv = hv * a[:, :, :, None] + s[:, t, :, :, None] * v[:, t, :, None, :]
        logits = scale * torch.einsum("nhgk,nhkm->nhgm", q[:, t], hk)
        o = torch.einsum("nhgm,nhmv->nhgv", logits.softmax(dim=-1), hv)
        outputs.append(o.reshape(N, HQ, -1))
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(N, 0, HQ, v.shape[-1])
    return o, hk, hv


def gsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    initial_state: State | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, State | None]:
    """Arguments are validated by `flash_gsa.gsa`; see its docstring for shapes."""
    dt = compute_dtype(q)
    q, k, v, g, s = (x.to(dt) for x in (q, k, v, g, s))
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], g.shape[-1]
    if cu_seqlens is None:
        bounds = None
        N = B
    else:
        bounds = cu_seqlens.tolist()
        N = len(bounds) - 1
    if initial_state is None:
        hk0 = q.new_zeros(N, H, K, M)
        hv0 = q.new_zeros(N, H, M, V)
    else:
        hk0, hv0 = (x.to(dt, copy=True) for x in initial_state)  # a copy: with T = 0 it is the final state

    if bounds is None:
        o, hk, hv = _recurrence(q, k, v, g, s, scale, hk0, hv0)
    else:
        outs, hks, hvs = [], [], []
        for n in range(N):
            lo, hi = bounds[n], bounds[n + 1]
            o_n, hk_n, hv_n = _recurrence(
                q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], s[:, lo:hi], scale,
                hk0[n : n + 1], hv0[n : n + 1],
            )
            outs.append(o_n)
            hks.append(hk_n)
            hvs.append(hv_n)
        o = torch.cat(outs, dim=1)
        hk, hv = torch.cat(hks), torch.cat(hvs)
    return o, ((hk, hv) if output_final_state else None)

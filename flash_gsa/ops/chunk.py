"""The chunk backend: GSA in chunkwise-parallel form, in plain PyTorch (any device, autograd for gradients).

The sequence is cut into chunks of C tokens. With b = the cumulative log-gate inside a chunk (b_i includes g_i)
and B = b at the chunk's last token, the state entering chunk c+1 is

    S_{c+1} = S_c * exp(B) + sum_j k_j (s_j * exp(B - b_j))^T                         (both passes alike)

and a token i of the chunk reads

    z_i = scale * (q_i @ S_c) * exp(b_i) + sum_{j<=i} scale * (q_i . k_j) * s_j * exp(b_i - b_j)   (pass 1, [M])
    o_i = (p_i * exp(b_i)) @ Sv_c + sum_{j<=i} (sum_m p_i s_j exp(b_i - b_j)) v_j              (pass 2)

with p_i = softmax(z_i). Every exponent is <= 0 (b only decreases), so nothing overflows whatever the gates.
The only sequential part is the loop over chunks that carries the states.
"""

from __future__ import annotations

import torch

from .reference import State, compute_dtype

CHUNK_SIZE = 16


def _pack_to_batch(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[1, T_total, ...] packed -> [N, T_pad, ...], zeros at padding."""
    out = x[0][index]
    return out * valid.view(*valid.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def _varlen_layout(cu_seqlens: torch.Tensor, chunk: int):
    """Index map from a padded [N, T_pad] batch to packed positions, and the validity mask."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    t_pad = max(int(lengths.max().item()) if lengths.numel() else 0, 1)
    t_pad = -(-t_pad // chunk) * chunk
    pos = torch.arange(t_pad, device=cu_seqlens.device)
    valid = pos[None, :] < lengths[:, None]
    index = (cu_seqlens[:-1, None] + pos[None, :]).clamp(max=max(int(cu_seqlens[-1].item()) - 1, 0))
    return index, valid


def _chunked(q, k, v, g, s, scale: float, hk, hv, chunk: int):
    """Dense batch whose T is a multiple of `chunk`. q [N,T,HQ,K]; k [N,T,H,K]; v [N,T,H,V]; g, s [N,T,H,M]."""
    N, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    G, nc, C = HQ // H, T // chunk, chunk

    # [N, H, nc, C, ...] layout; queries carry their group index G after H.
    q = q.view(N, nc, C, H, G, K).permute(0, 3, 4, 1, 2, 5)
    k, v, g, s = (x.view(N, nc, C, H, -1).permute(0, 3, 1, 2, 4) for x in (k, v, g, s))

    b = g.cumsum(dim=3)  # [N,H,nc,C,M], inclusive, <= 0, non-increasing along C
    b_last = b[:, :, :, -1:, :]
    w = s * (b_last - b).exp()  # write weight of token j as seen from the chunk's end
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = torch.where(causal[:, :, None], b[..., :, None, :] - b[..., None, :, :], float("-inf"))
    s_decay = s[..., None, :, :] * diff.exp()  # [N,H,nc,C(i),C(j),M]: s_j * exp(b_i - b_j), j <= i

    # Carry both states across chunks (the one sequential loop).
    d_hk = torch.einsum("nhcjk,nhcjm->nhckm", k, w)
    d_hv = torch.einsum("nhcjm,nhcjv->nhcmv", w, v)
    decay = b_last.squeeze(3).exp()  # [N,H,nc,M]
    hk_in, hv_in = [], []
    for c in range(nc):
        hk_in.append(hk)
        hv_in.append(hv)
        hk = hk * decay[:, :, c, None, :] + d_hk[:, :, c]
        hv = hv * decay[:, :, c, :, None] + d_hv[:, :, c]
    hk_in = torch.stack(hk_in, dim=2)  # [N,H,nc,K,M]
    hv_in = torch.stack(hv_in, dim=2)  # [N,H,nc,M,V]

    # Pass 1: slot logits, then the softmax over slots.
    eb = b.exp()[:, :, None]  # [N,H,1,nc,C,M]
    z = torch.einsum("nhgcik,nhckm->nhgcim", q, hk_in) * eb
    qk = torch.einsum("nhgcik,nhcjk->nhgcij", q, k)
    z = scale * (z + torch.einsum("nhgcij,nhcijm->nhgcim", qk, s_decay))
    p = z.softmax(dim=-1)

    # Pass 2: read the value memory with the slot probabilities.
    o = torch.einsum("nhgcim,nhcmv->nhgciv", p * eb, hv_in)
    attn = torch.einsum("nhgcim,nhcijm->nhgcij", p, s_decay)
    o = o + torch.einsum("nhgcij,nhcjv->nhgciv", attn, v)
    o = o.permute(0, 3, 4, 1, 2, 5).reshape(N, T, HQ, V)
    return o, hk, hv


def gsa_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    initial_state: State | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, State | None]:
    """Arguments are validated by `flash_gsa.gsa`; see its docstring for shapes."""
    dt = compute_dtype(q)
    q, k, v, g, s = (x.to(dt) for x in (q, k, v, g, s))
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], g.shape[-1]

    if cu_seqlens is not None:
        index, valid = _varlen_layout(cu_seqlens, chunk_size)
        q, k, v, g, s = (_pack_to_batch(x, index, valid) for x in (q, k, v, g, s))
    else:
        pad = -T % chunk_size
        if pad:  # g = s = 0 past the end: the states pass through unchanged
            q, k, v, g, s = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g, s))
    N = q.shape[0]

    if initial_state is None:
        hk0, hv0 = q.new_zeros(N, H, K, M), q.new_zeros(N, H, M, V)
    else:
        hk0, hv0 = (x.to(dt) for x in initial_state)

    o, hk, hv = _chunked(q, k, v, g, s, scale, hk0, hv0, chunk_size)
    o = o[valid][None] if cu_seqlens is not None else o[:, :T]
    return o, ((hk, hv) if output_final_state else None)

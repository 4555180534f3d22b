"""The chunk backend: GSA in chunkwise-parallel form, in plain PyTorch (any device).

The sequence is cut into chunks of C tokens. With b = the cumulative log-gate inside a chunk (b_i includes g_i)
and B = b at the chunk's last token, the state entering chunk c+1 is

    S_{c+1} = S_c * exp(B) + sum_j k_j (s_j * exp(B - b_j))^T                         (both passes alike)

and a token i of the chunk reads

    z_i = scale * (q_i @ S_c) * exp(b_i) + sum_{j<=i} scale * (q_i . k_j) * s_j * exp(b_i - b_j)   (pass 1, [M])
    o_i = (p_i * exp(b_i)) @ Sv_c + sum_{j<=i} (sum_m p_i s_j exp(b_i - b_j)) v_j              (pass 2)

with p_i = softmax(z_i). Every exponent is <= 0 (b only decreases), so nothing overflows whatever the gates.
The only sequential part is the loop over chunks that carries the states.

`gsa_chunk` is differentiable through autograd. `gsa_chunk_backward` gives the same gradients from explicit formulas
(recomputing the forward's intermediates): the backward of the `flash_gsa::chunk_fwd` custom op, inside which
autograd is not available.
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


def _split(q, k, v, g, s, chunk: int):
    """[N, T, heads, d] -> [N, H, (G,) nc, C, d]: chunks of C tokens; queries carry their group index G after H."""
    N, T, HQ, K = q.shape
    H = k.shape[2]
    nc = T // chunk
    q = q.view(N, nc, chunk, H, HQ // H, K).permute(0, 3, 4, 1, 2, 5)
    k, v, g, s = (x.view(N, nc, chunk, H, x.shape[-1]).permute(0, 3, 1, 2, 4) for x in (k, v, g, s))
    return q, k, v, g, s


def _merge(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `_split`: [N, H, G, nc, C, d] -> [N, T, H * G, d], or [N, H, nc, C, d] -> [N, T, H, d]."""
    if x.dim() == 6:
        N, H, G, nc, C, d = x.shape
        return x.permute(0, 3, 4, 1, 2, 5).reshape(N, nc * C, H * G, d)
    N, H, nc, C, d = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(N, nc * C, H, d)


def _forward(q, k, v, g, s, scale: float, hk, hv) -> dict[str, torch.Tensor]:
    """Every intermediate of the chunked form, on `_split` tensors. Returns o [N,H,G,nc,C,V], the final states and
    what the backward needs."""
    C = g.shape[3]
    b = g.cumsum(dim=3)  # [N,H,nc,C,M], inclusive, <= 0, non-increasing along C
    b_last = b[:, :, :, -1:, :]
    ew = (b_last - b).exp()
    w = s * ew  # write weight of token j as seen from the chunk's end
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    E = torch.where(causal[:, :, None], b[..., :, None, :] - b[..., None, :, :], float("-inf")).exp()
    A = s[..., None, :, :] * E  # [N,H,nc,C(i),C(j),M]: s_j * exp(b_i - b_j), j <= i

    # Carry both states across chunks (the one sequential loop).
    d_hk = torch.einsum("nhcjk,nhcjm->nhckm", k, w)
    d_hv = torch.einsum("nhcjm,nhcjv->nhcmv", w, v)
    decay = b_last.squeeze(3).exp()  # [N,H,nc,M]
    hk_in, hv_in = [], []
    for c in range(g.shape[2]):
        hk_in.append(hk)
        hv_in.append(hv)
        hk = hk * decay[:, :, c, None, :] + d_hk[:, :, c]
        hv = hv * decay[:, :, c, :, None] + d_hv[:, :, c]
    hk_in = torch.stack(hk_in, dim=2)  # [N,H,nc,K,M]
    hv_in = torch.stack(hv_in, dim=2)  # [N,H,nc,M,V]

    # Pass 1: slot logits, then the softmax over slots.
    eb = b.exp()[:, :, None]  # [N,H,1,nc,C,M]
    zq = torch.einsum("nhgcik,nhckm->nhgcim", q, hk_in)
    qk = torch.einsum("nhgcik,nhcjk->nhgcij", q, k)
    z = scale * (zq * eb + torch.einsum("nhgcij,nhcijm->nhgcim", qk, A))
    p = z.softmax(dim=-1)

    # Pass 2: read the value memory with the slot probabilities.
    pe = p * eb
    attn = torch.einsum("nhgcim,nhcijm->nhgcij", p, A)
    o = torch.einsum("nhgcim,nhcmv->nhgciv", pe, hv_in) + torch.einsum("nhgcij,nhcjv->nhgciv", attn, v)
    return dict(o=o, hk=hk, hv=hv, ew=ew, w=w, E=E, A=A, decay=decay, hk_in=hk_in, hv_in=hv_in, eb=eb, zq=zq, qk=qk,
                p=p, pe=pe, attn=attn)


def _backward(q, k, v, s, scale: float, f: dict[str, torch.Tensor], do, dhk, dhv):
    """Gradients of the `_split` inputs q, k, v, g, s and of the initial states, given those of o (split like q)
    and of the final states; f: the intermediates from `_forward`."""
    A, E, p, eb = f["A"], f["E"], f["p"], f["eb"]
    # Pass 2: o = pe @ hv_in + attn @ v.
    dpe = torch.einsum("nhgciv,nhcmv->nhgcim", do, f["hv_in"])
    dhv_in = torch.einsum("nhgcim,nhgciv->nhcmv", f["pe"], do)
    dattn = torch.einsum("nhgciv,nhcjv->nhgcij", do, v)
    dv = torch.einsum("nhgcij,nhgciv->nhcjv", f["attn"], do)
    dp = dpe * eb + torch.einsum("nhgcij,nhcijm->nhgcim", dattn, A)
    dA = torch.einsum("nhgcim,nhgcij->nhcijm", p, dattn)
    deb = dpe * p
    # Softmax, then pass 1: z = scale * (zq * eb + qk @ A).
    dz = scale * p * (dp - (p * dp).sum(-1, keepdim=True))
    dzq = dz * eb
    dq = torch.einsum("nhgcim,nhckm->nhgcik", dzq, f["hk_in"])
    dhk_in = torch.einsum("nhgcik,nhgcim->nhckm", q, dzq)
    deb = (deb + dz * f["zq"]).sum(2)  # eb is shared by the G query heads
    dqk = torch.einsum("nhgcim,nhcijm->nhgcij", dz, A)
    dq = dq + torch.einsum("nhgcij,nhcjk->nhgcik", dqk, k)
    dk = torch.einsum("nhgcij,nhgcik->nhcjk", dqk, q)
    dA = dA + torch.einsum("nhgcim,nhgcij->nhcijm", dz, f["qk"])
    # A = s_j * exp(b_i - b_j); eb = exp(b).
    ds = torch.einsum("nhcijm,nhcijm->nhcjm", dA, E)
    dAA = dA * A
    db = dAA.sum(4) - dAA.sum(3) + deb * eb.squeeze(2)

    # The states, in reverse: S_{c+1} = S_c * decay_c + d_S_c.
    decay, hk_in, hv_in = f["decay"], f["hk_in"], f["hv_in"]
    dd_hk, dd_hv, ddecay = [], [], []
    for c in reversed(range(decay.shape[2])):
        dd_hk.append(dhk)
        dd_hv.append(dhv)
        ddecay.append((dhk * hk_in[:, :, c]).sum(2) + (dhv * hv_in[:, :, c]).sum(3))
        dhk = dhk * decay[:, :, c, None, :] + dhk_in[:, :, c]
        dhv = dhv * decay[:, :, c, :, None] + dhv_in[:, :, c]
    dd_hk, dd_hv, ddecay = (torch.stack(x[::-1], dim=2) for x in (dd_hk, dd_hv, ddecay))

    # d_hk = k^T w, d_hv = w^T v, with w = s * exp(b_last - b); decay = exp(b_last).
    w = f["w"]
    dk = dk + torch.einsum("nhcjm,nhckm->nhcjk", w, dd_hk)
    dv = dv + torch.einsum("nhcjm,nhcmv->nhcjv", w, dd_hv)
    dw = torch.einsum("nhcjk,nhckm->nhcjm", k, dd_hk) + torch.einsum("nhcjv,nhcmv->nhcjm", v, dd_hv)
    ds = ds + dw * f["ew"]
    dww = dw * w
    db = db - dww
    db[:, :, :, -1] += dww.sum(3) + ddecay * decay
    dg = db.flip(3).cumsum(3).flip(3)  # b = cumsum(g)
    return dq, dk, dv, dg, ds, dhk, dhv


def _to_chunks(xs, T: int, cu_seqlens: torch.Tensor | None, chunk: int):
    """Dense [B, T, ...] padded to a multiple of `chunk` (g = s = 0 past the end: the states pass through), or packed
    sequences [1, T, ...] spread to one row each. Returns them, and the map from such rows back to [B, T, ...]."""
    if cu_seqlens is not None:
        index, valid = _varlen_layout(cu_seqlens, chunk)
        return [_pack_to_batch(x, index, valid) for x in xs], lambda y: y[valid][None]
    pad = -T % chunk
    if pad:
        xs = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in xs]
    return xs, lambda y: y[:, :T]


def _initial(initial_state: State | None, N: int, H: int, K: int, M: int, V: int, like: torch.Tensor):
    if initial_state is None:
        return like.new_zeros(N, H, K, M), like.new_zeros(N, H, M, V)
    return tuple(x.to(like.dtype) for x in initial_state)


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
    if T == 0:  # no tokens: the states pass through (copied, so that the result never aliases the caller's state)
        N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        hk, hv = (x.clone() for x in _initial(initial_state, N, H, K, M, V, q))
        return q.new_zeros(B, 0, HQ, V), ((hk, hv) if output_final_state else None)

    xs, unchunk = _to_chunks([q, k, v, g, s], T, cu_seqlens, chunk_size)
    hk0, hv0 = _initial(initial_state, xs[0].shape[0], H, K, M, V, q)
    f = _forward(*_split(*xs, chunk_size), scale, hk0, hv0)
    o = unchunk(_merge(f["o"]))
    return o, ((f["hk"], f["hv"]) if output_final_state else None)


def gsa_chunk_backward(
    do: torch.Tensor,
    dhk: torch.Tensor | None,
    dhv: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    initial_state: State | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dg, ds, dhk0, dhv0) of `gsa_chunk`, given do and the gradients of the final states
    (None: zero), each in its input's dtype (dhk0, dhv0: the compute dtype without an initial state)."""
    dt = compute_dtype(q)
    dtypes = [x.dtype for x in (q, k, v, g, s)]
    q, k, v, g, s = (x.to(dt) for x in (q, k, v, g, s))
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[-1], g.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    state_dtypes = [dt, dt] if initial_state is None else [x.dtype for x in initial_state]
    dhk = q.new_zeros(N, H, K, M) if dhk is None else dhk.to(dt)
    dhv = q.new_zeros(N, H, M, V) if dhv is None else dhv.to(dt)
    if T == 0:
        grads = [torch.zeros_like(x) for x in (q, k, v, g, s)] + [dhk.clone(), dhv.clone()]
    else:
        xs, unchunk = _to_chunks([q, k, v, g, s, do.to(dt)], T, cu_seqlens, chunk_size)
        hk0, hv0 = _initial(initial_state, N, H, K, M, V, q)
        q_, k_, v_, g_, s_ = _split(*xs[:5], chunk_size)
        do_ = _split(xs[5], *xs[1:5], chunk_size)[0]
        f = _forward(q_, k_, v_, g_, s_, scale, hk0, hv0)
        dq, dk, dv, dg, ds, dhk0, dhv0 = _backward(q_, k_, v_, s_, scale, f, do_, dhk, dhv)
        grads = [unchunk(_merge(x)) for x in (dq, dk, dv, dg, ds)] + [dhk0, dhv0]
    return tuple(x.to(d) for x, d in zip(grads, dtypes + state_dtypes, strict=True))

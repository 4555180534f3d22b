"""The chunk and triton backends as `torch.library` custom ops, so that `torch.compile` keeps `flash_gsa.gsa` in one
graph: the compiler sees each op as one opaque node, and a fake implementation gives the shapes of its outputs.

    flash_gsa::chunk_fwd(q, k, v, g, s, scale, hk0?, hv0?, cu_seqlens?) -> o, hk, hv
    flash_gsa::chunk_bwd(do, dhk?, dhv?, q, k, v, g, s, scale, hk0?, hv0?, cu_seqlens?)
        -> dq, dk, dv, dg, ds, dhk0, dhv0
    flash_gsa::triton_fwd(q, k, v, g, s, scale, init?, cu_seqlens?) -> o, final, saved
    flash_gsa::triton_bwd(q, k, v, s, do, d_final?, saved, scale, cu_seqlens?, g_dtype)
        -> dq, dk, dv, dg (in g_dtype), ds, d_init

Each forward is tied to its backward with `register_autograd`. Eager calls of the triton backend skip the op's
dispatch (`_TritonGSA`, an autograd.Function over the same two functions): it costs host time on every call. The
final state is always computed and returned (both backends produce it anyway); the wrappers hand it out only when
asked for, and the backward then ignores its gradient. Host syncs are fine inside an op, where the compiler never
looks: the chunk backend reads the longest varlen sequence there, the triton backend builds its chunk tables for
packed sequences (in both of its ops).

chunk_bwd recomputes the forward's intermediates and applies explicit gradient formulas (`gsa_chunk_backward`;
autograd is off inside an op). The triton ops keep the kernels' buffers instead: `final` is the packed state
`[N, H, M, K + V]` (fp32) and `saved` the list `chunk_forward` returns, whose shapes and dtypes `_saved_like` must
mirror for the compiler (tests/test_compile.py checks them with `torch.library.opcheck`).
"""

from __future__ import annotations

import torch

from .chunk import gsa_chunk, gsa_chunk_backward
from .reference import State, compute_dtype

Tensor = torch.Tensor


def _num_seqs(q: Tensor, cu_seqlens: Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


# ---- chunk backend --------------------------------------------------------------------------------------------------


def _chunk_call(q, k, v, g, s, scale, hk0, hv0, cu_seqlens):
    o, (hk, hv) = gsa_chunk(q, k, v, g, s, scale, None if hk0 is None else (hk0, hv0), True, cu_seqlens)
    return o.to(q.dtype).contiguous(), hk, hv


@torch.library.custom_op("flash_gsa::chunk_fwd", mutates_args=())
def chunk_fwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor, scale: float,
    hk0: Tensor | None, hv0: Tensor | None, cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return _chunk_call(q, k, v, g, s, scale, hk0, hv0, cu_seqlens)


@chunk_fwd.register_fake
def _(q, k, v, g, s, scale, hk0, hv0, cu_seqlens):
    B, T, HQ, K = q.shape
    H, V, M = k.shape[2], v.shape[3], g.shape[3]
    N, dt = _num_seqs(q, cu_seqlens), compute_dtype(q)
    return q.new_empty(B, T, HQ, V), q.new_empty(N, H, K, M, dtype=dt), q.new_empty(N, H, M, V, dtype=dt)


@torch.library.custom_op("flash_gsa::chunk_bwd", mutates_args=())
def chunk_bwd(
    do: Tensor, dhk: Tensor | None, dhv: Tensor | None,
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor, scale: float,
    hk0: Tensor | None, hv0: Tensor | None, cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    init = None if hk0 is None else (hk0, hv0)
    grads = gsa_chunk_backward(do, dhk, dhv, q, k, v, g, s, scale, init, cu_seqlens)
    return tuple(x.contiguous() for x in grads)


@chunk_bwd.register_fake
def _(do, dhk, dhv, q, k, v, g, s, scale, hk0, hv0, cu_seqlens):
    N, H, K, M, V = _num_seqs(q, cu_seqlens), k.shape[2], k.shape[3], g.shape[3], v.shape[3]
    dt = compute_dtype(q)
    dhk0 = q.new_empty(N, H, K, M, dtype=dt if hk0 is None else hk0.dtype)
    dhv0 = q.new_empty(N, H, M, V, dtype=dt if hv0 is None else hv0.dtype)
    return (*(x.new_empty(x.shape) for x in (q, k, v, g, s)), dhk0, dhv0)


def _chunk_setup(ctx, inputs, output):
    q, k, v, g, s, scale, hk0, hv0, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, g, s, hk0, hv0, cu_seqlens)
    ctx.scale = scale


def _chunk_backward(ctx, do, dhk, dhv):
    q, k, v, g, s, hk0, hv0, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg, ds, dhk0, dhv0 = chunk_bwd(do, dhk, dhv, q, k, v, g, s, ctx.scale, hk0, hv0, cu_seqlens)
    has_init = hk0 is not None
    return dq, dk, dv, dg, ds, None, dhk0 if has_init else None, dhv0 if has_init else None, None


chunk_fwd.register_autograd(_chunk_backward, setup_context=_chunk_setup)


def gsa_chunk_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor, scale: float,
    initial_state: State | None, output_final_state: bool, cu_seqlens: Tensor | None,
) -> tuple[Tensor, State | None]:
    """The chunk backend through `flash_gsa::chunk_fwd`; arguments as `flash_gsa.ops.chunk.gsa_chunk`."""
    hk0, hv0 = initial_state if initial_state is not None else (None, None)
    o, hk, hv = chunk_fwd(q, k, v, g, s, scale, hk0, hv0, cu_seqlens)
    return o, ((hk, hv) if output_final_state else None)


# ---- triton backend -------------------------------------------------------------------------------------------------


def _layout(q: Tensor, g: Tensor, cu_seqlens: Tensor | None):
    from .triton.function import layout_for

    return layout_for(q.shape[0], q.shape[1], cu_seqlens, g.shape[-1], q.device)


def _contiguous(*xs: Tensor) -> list[Tensor]:
    """The kernels read a contiguous [B, T, ...] tensor as [B * T, ...]: only its memory layout matters."""
    return [x.contiguous() for x in xs]


def _triton_forward(q, k, v, g, s, scale, init, cu_seqlens) -> tuple[Tensor, Tensor, list[Tensor]]:
    from .triton.function import chunk_forward, device_guard

    with device_guard(q.device):
        o, final, saved = chunk_forward(*_contiguous(q, k, v, g, s), scale, init, _layout(q, g, cu_seqlens))
    return o, final, list(saved)


def _triton_backward_grads(q, k, v, s, do, d_final, saved, scale, cu_seqlens, g_dtype):
    from .triton.function import chunk_backward, device_guard

    d_final = None if d_final is None else d_final.float().contiguous()
    with device_guard(q.device):
        layout = _layout(q, s, cu_seqlens)
        dq, dk, dv, ds, dg, d_init = chunk_backward(*_contiguous(q, k, v, s, do), d_final, tuple(saved), scale, layout,
                                                    g_dtype)
    return dq, dk, dv, dg, ds, d_init


@torch.library.custom_op("flash_gsa::triton_fwd", mutates_args=())
def triton_fwd(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor, scale: float, init: Tensor | None,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    return _triton_forward(q, k, v, g, s, scale, init, cu_seqlens)


def _saved_like(q: Tensor, k: Tensor, v: Tensor, g: Tensor, cu_seqlens: Tensor | None) -> list[Tensor]:
    """Empty tensors as the buffers `chunk_forward` saves: b [NC, H, C, M] and b_last [NC, H, M] in fp32, the states
    entering each chunk [NC, H, M, K + V] in `state_dtype`, the logits z [T', HQ, M] and lse [T', HQ] in fp32, the
    pass-2 weights W and q k^T [NC, HQ, C, C] in `state_dtype`, p * exp(b) [NC, HQ, C, M] in q's dtype and the
    chunks' `exact` flags [NC, H] int32. NC, the number of chunks, depends on cu_seqlens' values."""
    from .triton import config
    from .triton.function import state_dtype

    B, T, HQ = q.shape[:3]
    H, K = k.shape[2:]
    V, M = v.shape[3], g.shape[3]
    C = config.chunk_size(M)
    nc = B * (-(-T // C)) if cu_seqlens is None else torch.library.get_ctx().new_dynamic_size()
    f32, low = dict(dtype=torch.float32), dict(dtype=state_dtype(q.dtype))
    return [
        q.new_empty(nc, H, C, M, **f32),
        q.new_empty(nc, H, M, **f32),
        q.new_empty(nc, H, M, K + V, **low),
        q.new_empty(B * T, HQ, M, **f32),
        q.new_empty(B * T, HQ, **f32),
        q.new_empty(nc, HQ, C, C, **low),
        q.new_empty(nc, HQ, C, C, **low),
        q.new_empty(nc, HQ, C, M),
        q.new_empty(nc, H, dtype=torch.int32),
    ]


@triton_fwd.register_fake
def _(q, k, v, g, s, scale, init, cu_seqlens):
    H, K, V, M = k.shape[2], k.shape[3], v.shape[3], g.shape[3]
    final = q.new_empty(_num_seqs(q, cu_seqlens), H, M, K + V, dtype=torch.float32)
    return q.new_empty(*q.shape[:3], V), final, _saved_like(q, k, v, g, cu_seqlens)


@torch.library.custom_op("flash_gsa::triton_bwd", mutates_args=())
def triton_bwd(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, do: Tensor, d_final: Tensor | None, saved: list[Tensor],
    scale: float, cu_seqlens: Tensor | None, g_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _triton_backward_grads(q, k, v, s, do, d_final, saved, scale, cu_seqlens, g_dtype)


@triton_bwd.register_fake
def _(q, k, v, s, do, d_final, saved, scale, cu_seqlens, g_dtype):
    dq, dk, dv, ds = (x.new_empty(x.shape) for x in (q, k, v, s))
    H, K, V, M = k.shape[2], k.shape[3], v.shape[3], s.shape[3]
    d_init = q.new_empty(_num_seqs(q, cu_seqlens), H, M, K + V, dtype=torch.float32)
    return dq, dk, dv, s.new_empty(s.shape, dtype=g_dtype), ds, d_init


def _triton_save(ctx, inputs, saved) -> None:
    q, k, v, g, s, scale, init, cu_seqlens = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, s, cu_seqlens, *saved)
    ctx.scale, ctx.g_dtype, ctx.has_init = scale, g.dtype, init is not None


def _triton_setup(ctx, inputs, output):
    _, _, saved = output
    ctx.mark_non_differentiable(*saved)
    _triton_save(ctx, inputs, saved)


def _triton_grads(ctx, do, d_final, bwd):
    """The gradients of (q, k, v, g, s, scale, init, cu_seqlens) through `bwd` (the op or the plain function)."""
    q, k, v, s, cu_seqlens, *saved = ctx.saved_tensors
    if do is None:
        do = q.new_zeros(*q.shape[:3], v.shape[3])
    dq, dk, dv, dg, ds, d_init = bwd(q, k, v, s, do, d_final, saved, ctx.scale, cu_seqlens, ctx.g_dtype)
    return dq, dk, dv, dg, ds, None, d_init if ctx.has_init else None, None


def _triton_backward(ctx, do, d_final, _):
    return _triton_grads(ctx, do, d_final, triton_bwd)


triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup)


class _TritonGSA(torch.autograd.Function):
    """The same forward and backward as `triton_fwd`, without the custom-op dispatch: eager calls take this path.
    On the H200 machine the dispatch's own Python time (cProfile: ~1 ms per op call) exceeded that of all the
    kernel launches; host time per forward+backward fell from 2.0 to 1.1 ms (hidden 1024, T = 2048) with this
    change alone. torch.compile takes the op."""

    @staticmethod
    def forward(ctx, q, k, v, g, s, scale, init, cu_seqlens):
        o, final, saved = _triton_forward(q, k, v, g, s, scale, init, cu_seqlens)
        _triton_save(ctx, (q, k, v, g, s, scale, init, cu_seqlens), saved)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        return _triton_grads(ctx, do, d_final, _triton_backward_grads)


def triton_size_error(K: int, V: int, M: int) -> str | None:
    """Why the triton backend cannot take these sizes (head dims K, V and M slots), or None when it can."""
    if M & (M - 1) or not 16 <= M <= 256:
        return f"the triton backend needs M (slots) a power of two >= 16 and <= 256, got {M}"
    if K < 16 or V < 16:
        return f"the triton backend needs K and V >= 16, got K={K}, V={V}"
    return None


def gsa_triton_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor, scale: float,
    initial_state: State | None, output_final_state: bool, cu_seqlens: Tensor | None,
) -> tuple[Tensor, State | None]:
    """The triton backend: through `flash_gsa::triton_fwd` under torch.compile, else through `_TritonGSA` (same
    kernels); arguments as `flash_gsa.ops.chunk.gsa_chunk`. It needs M a power of two >= 16 and K, V >= 16. The final
    state is float32."""
    M, K, V = g.shape[-1], q.shape[-1], v.shape[-1]
    why = triton_size_error(K, V, M)
    if why:
        raise ValueError(why)
    init = None
    if initial_state is not None:  # packed as the kernels keep it: [N, H, M, K + V] fp32
        hk0, hv0 = initial_state
        init = torch.cat([hk0.transpose(-1, -2), hv0], dim=-1).float().contiguous()
    if torch.compiler.is_compiling():
        o, final, _ = triton_fwd(q, k, v, g, s, scale, init, cu_seqlens)
    else:
        o, final = _TritonGSA.apply(q, k, v, g, s, scale, init, cu_seqlens)
    if not output_final_state:
        return o, None
    return o, (final[..., :K].transpose(-1, -2), final[..., K:])

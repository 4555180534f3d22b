"""RMSNorm."""

from __future__ import annotations

import torch
from torch import nn

from ..ops import available_backends


def _kernel_device(x: torch.Tensor) -> bool:
    """Whether the Triton kernels normalize x: where the triton backend runs (CUDA, Triton installed; tests also run
    them on the CPU, through Triton's interpreter)."""
    return "triton" in available_backends(x.device)


def _takes_kernel(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take x: a device where they run, a float dtype, rows of at most NORM_MAX_D."""
    if not (x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _kernel_device(x)):
        return False
    from ..ops.triton.config import NORM_MAX_D

    return 0 < x.shape[-1] <= NORM_MAX_D


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or the autocast dtype where autocast is on: every consumer of the model's norms is a linear layer,
    which would cast to it anyway, so the cast happens here, once (not once per consumer, each with its backward)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _rms_norm_and_rstd(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """The formula in PyTorch, in at least float32: y in out_dtype and the per-row rsqrt(mean(x^2) + eps)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(dt)).to(out_dtype), rstd


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The formula, in at least float32, returned in out_dtype (what `_RMSNormFunction` computes)."""
    return _rms_norm_and_rstd(x, weight, eps, out_dtype)[0]


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dimension, computed in at least float32 and returned in
    `out_dtype`. Keeps only x and the per-row rsqrt for the backward (autograd through the plain formula would also
    keep the float32 normalized rows); the backward recomputes them. On CUDA one Triton pass each way
    (`flash_gsa.ops.triton.rms_norm`), elsewhere PyTorch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.kernel = _takes_kernel(x)
        if ctx.kernel:
            from ..ops.triton.rms_norm import rms_norm_forward

            rows = x.reshape(-1, x.shape[-1]).contiguous()
            y, rstd = rms_norm_forward(rows, weight, eps, out_dtype)
            ctx.save_for_backward(rows, weight, rstd)
            return y.view(x.shape)
        y, rstd = _rms_norm_and_rstd(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        if ctx.kernel:
            from ..ops.triton.rms_norm import rms_norm_backward

            dx, dw = rms_norm_backward(x, weight, rstd, dy.reshape(x.shape).contiguous(), ctx.needs_input_grad[1])
            return dx.view(dy.shape), None if dw is None else dw.to(weight.dtype), None, None
        dt = rstd.dtype
        xhat = x.to(dt) * rstd
        dyw = dy.to(dt) * weight.to(dt)
        dx = rstd * (dyw - xhat * (dyw * xhat).mean(dim=-1, keepdim=True))
        dw = (dy.to(dt) * xhat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), None if dw is None else dw.to(weight.dtype), None, None


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale (no bias), computed in at least float32.
    Returns x's dtype, or the autocast dtype under autocast (the cast its linear consumers would make)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced as plain ops, which inductor fuses (and whose saved tensors it chooses). Through the Function,
            # torch 2.11's compiled backward gave zero gradients to the weight and to earlier layers (H200 run,
            # 2026-11-30); torch 2.13's did not.
            return rms_norm(x, self.weight, self.eps, _output_dtype(x))
        return _RMSNormFunction.apply(x, self.weight, self.eps, _output_dtype(x))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

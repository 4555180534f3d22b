"""The causal LM loss: next-token cross-entropy over logits that keeps no float32 copy of the [tokens, vocabulary]
logits for the backward and makes none whole in it. On CUDA one Triton pass over the logits forward and one backward
(`flash_gsa.ops.triton.cross_entropy`); elsewhere PyTorch over chunks of rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import available_backends

CHUNK_ELEMENTS = 1 << 25  # float32 elements of one chunk of rows (128 MiB): the most the PyTorch path adds
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_device(x: torch.Tensor) -> bool:
    """Whether the Triton kernels compute the loss of x: where the triton backend runs (CUDA, Triton installed; tests
    also run them on the CPU, through Triton's interpreter)."""
    return "triton" in available_backends(x.device)


def _takes_kernel(x: torch.Tensor) -> bool:
    """The kernels run eagerly only: under torch.compile the PyTorch path is traced (and fused by inductor)."""
    return (
        x.dtype in _KERNEL_DTYPES and x.is_contiguous() and not torch.compiler.is_compiling() and _kernel_device(x)
    )


class _CrossEntropy(torch.autograd.Function):
    """sum over rows with a target of (logsumexp(x_i) - x_i[target_i]), divided by `divisor`; rows whose target is
    -100 count for nothing. x [N, V] in any float dtype, computed in at least float32. Keeps x (which the caller holds
    anyway), the targets and the per-row logsumexp; the backward recomputes the softmax (per row in the Triton
    kernel, else chunk by chunk of rows) and writes the gradient in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        ctx.kernel = _takes_kernel(x)
        if ctx.kernel:
            from ..ops.triton.cross_entropy import cross_entropy_forward

            losses, lse = cross_entropy_forward(x, targets)
            ctx.save_for_backward(x, targets, lse, divisor)
            return losses.sum() / divisor
        dt = torch.promote_types(x.dtype, torch.float32)
        rows = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
        valid = targets != -100
        safe = torch.where(valid, targets, 0)
        lse = torch.empty(x.shape[0], dtype=dt, device=x.device)
        total = torch.zeros((), dtype=dt, device=x.device)
        for lo in range(0, x.shape[0], rows):
            xc = x[lo : lo + rows].to(dt)
            lse[lo : lo + rows] = torch.logsumexp(xc, dim=-1)
            picked = xc.gather(1, safe[lo : lo + rows, None]).squeeze(1)
            total = total + torch.where(valid[lo : lo + rows], lse[lo : lo + rows] - picked, 0).sum()
        ctx.save_for_backward(x, safe, valid, lse, divisor)
        ctx.rows = rows
        return total / divisor

    @staticmethod
    def backward(ctx, d_loss: torch.Tensor):
        if ctx.kernel:
            from ..ops.triton.cross_entropy import cross_entropy_backward

            x, targets, lse, divisor = ctx.saved_tensors
            return cross_entropy_backward(x, targets, lse, (d_loss / divisor).float().reshape(1)), None, None
        x, safe, valid, lse, divisor = ctx.saved_tensors
        scale = (d_loss / divisor).to(lse.dtype)
        dx = torch.empty_like(x)
        for lo in range(0, x.shape[0], ctx.rows):
            hi = lo + ctx.rows
            p = torch.exp(x[lo:hi].to(lse.dtype) - lse[lo:hi, None])
            p.scatter_add_(1, safe[lo:hi, None], torch.full_like(p[:, :1], -1.0))
            dx[lo:hi] = (p * torch.where(valid[lo:hi], scale, 0)[:, None]).to(x.dtype)
        return dx, None, None


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy in (at least) float32: logits at t predict labels at t + 1; label -100 is ignored.

    With `cu_seqlens`, the first token of each packed document is not a target of the previous document's last token.
    The sum is divided by `num_items_in_batch` when given (gradient accumulation), else by the number of targets.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        targets = targets.clone()
        targets[:, cu_seqlens[1:-1].long() - 1] = -100
    targets = targets.flatten()
    dt = torch.promote_types(logits.dtype, torch.float32)
    if num_items_in_batch is None:
        divisor = (targets != -100).sum().to(dt)  # 0 targets: 0 / 0 = NaN, as F.cross_entropy's mean
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=logits.device).to(dt)
    return _CrossEntropy.apply(logits.flatten(0, 1), targets, divisor)

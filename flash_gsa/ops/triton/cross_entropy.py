"""Cross-entropy over the rows of a logits matrix, for the LM loss (`flash_gsa.models.loss`): one pass over the
logits forward, one backward, in their own dtype; nothing of size [rows, vocabulary] is made in float32.

Per row i with target t_i (-100: no target), in fp32: lse_i = logsumexp(x_i) (online over vocabulary blocks),
loss_i = lse_i - x_i[t_i]; the backward writes dx_i = scale * (softmax(x_i) - onehot(t_i)) (0 for rows without a
target), with softmax(x_i) = exp(x_i - lse_i) from the saved lse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from .function import device_guard
from .launch import launch

IGNORE = -100


@triton.jit
def cross_entropy_fwd_kernel(x, targets, loss, lse, stride, V: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row. Reads x[row, :] and targets[row]; writes lse[row] and loss[row] (0 without a target, NaN
    for a target outside [0, V))."""
    row = tl.program_id(0).to(tl.int64)
    base = x + row * stride
    m = tl.full([], -3.0e38, tl.float32)  # running max (finite: exp(m - m_new) is 0, not NaN, at the first block)
    total = tl.zeros([], dtype=tl.float32)  # running sum of exp(x - m)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        xv = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(xv, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(xv - m_new), axis=0)
        m = m_new
    lse_row = m + tl.log(total)
    t = tl.load(targets + row)
    valid = t != -100
    in_range = (t >= 0) & (t < V)  # a target outside the vocabulary gives a NaN loss, not a read out of bounds
    picked = tl.load(base + tl.where(in_range, t, 0)).to(tl.float32)
    tl.store(lse + row, lse_row)
    tl.store(loss + row, tl.where(valid, tl.where(in_range, lse_row - picked, float("nan")), 0.0))


@triton.jit
def cross_entropy_bwd_kernel(x, targets, lse, scale, dx, stride, V: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row. Reads x[row, :], targets[row], lse[row] and the scalar scale; writes dx[row, :] =
    scale * (exp(x - lse) - onehot(target)), or 0 for a row without a target."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(targets + row)
    factor = tl.where(t != -100, tl.load(scale), 0.0)
    lse_row = tl.load(lse + row)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        p = tl.exp(tl.load(x + row * stride + cols, mask=mask, other=0.0).to(tl.float32) - lse_row)
        p = tl.where(cols == t, p - 1.0, p)
        tl.store(dx + row * stride + cols, (p * factor).to(dx.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(config.CE_BLOCK, config.next_power_of_2(V))


def cross_entropy_forward(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and log-sum-exps (fp32) of x [N, V] (rows contiguous) for int targets [N]."""
    N, V = x.shape
    loss, lse = (torch.empty(N, dtype=torch.float32, device=x.device) for _ in range(2))
    if N:
        with device_guard(x.device):
            launch(cross_entropy_fwd_kernel, (N,), (x, targets, loss, lse, x.stride(0)), dict(V=V, BLOCK=_block(V)),
                   config.CE_NUM_WARPS, config.CE_NUM_STAGES)
    return loss, lse


def cross_entropy_backward(x: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor):
    """dx [N, V] in x's dtype for the loss sum(loss_i) * scale (scale: a one-element fp32 tensor)."""
    N, V = x.shape
    dx = torch.empty_like(x)
    if N:
        with device_guard(x.device):
            launch(cross_entropy_bwd_kernel, (N,), (x, targets, lse, scale, dx, x.stride(0)),
                   dict(V=V, BLOCK=_block(V)), config.CE_NUM_WARPS, config.CE_NUM_STAGES)
    return dx

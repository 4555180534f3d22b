"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SiLUMul(torch.autograd.Function):
    """SiLU(gate) * up. Keeps gate and up for the backward, which recomputes SiLU(gate) (autograd through the plain
    formula would also keep it: one more [tokens, intermediate] tensor per layer). The backward takes the same ops,
    in the same dtype, as autograd's (aten's fused silu_backward), so its gradients and cost are autograd's."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, d: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(d * up, gate), d * F.silu(gate)


class SwiGLU(nn.Module):
    """`down(SiLU(gate(x)) * up(x))`, all bias-free (the Llama MLP)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        if hidden_size < 1 or intermediate_size < 1:
            raise ValueError(f"hidden_size and intermediate_size must be >= 1, got {hidden_size}, {intermediate_size}")
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SiLUMul.apply(self.gate_proj(x), self.up_proj(x)))

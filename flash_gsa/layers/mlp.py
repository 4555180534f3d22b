"""SwiGLU feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SiLUMul(torch.autograd.Function):
    """SiLU(gate) * up. Keeps gate and up for the backward, which recomputes SiLU in float32 (autograd through the
    plain formula would also keep SiLU(gate): one more [tokens, intermediate] tensor per layer). The backward
    computes in at least float32."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, d: torch.Tensor):
        gate, up = ctx.saved_tensors
        dt = torch.promote_types(gate.dtype, torch.float32)
        g, d = gate.to(dt), d.to(dt)
        sig = torch.sigmoid(g)
        d_up = d * (g * sig)
        d_gate = d * up.to(dt) * sig * (1 + g * (1 - sig))
        return d_gate.to(gate.dtype), d_up.to(up.dtype)


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

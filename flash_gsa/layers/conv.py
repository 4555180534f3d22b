"""Short causal convolution over time, for dense batches and packed documents, with a carried window."""

from __future__ import annotations

import math

import torch
from torch import nn

from .varlen import document_positions


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution: `y_t = sum_i w[:, i] * x_{t - (W-1) + i}` per channel, bias-free.

    The window reaching before a sequence's first token reads the carried `state` (the W-1 inputs before it), or zeros.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if kernel_size < 2:
            raise ValueError(f"conv kernel size must be >= 2, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's Conv1d default for a depthwise kernel: U(-1/sqrt(W), 1/sqrt(W))."""
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: `[B, T, C]`, or `[1, L, C]` packed documents when `cu_seqlens` `[N + 1]` is given.
            state: `[N, C, W-1]` (N = B, or the number of documents): the last W-1 inputs before each sequence,
                oldest first; zeros when None.

        Returns:
            `y` shaped like `x`, and the new state `[N, C, W-1]` (the last W-1 inputs of each sequence, including
            the old window where a sequence is shorter than W-1).
        """
        B, T, C = x.shape
        W = self.kernel_size
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, B * T + 1, T, device=x.device) if T else x.new_zeros(B + 1, dtype=torch.long)
        cu = cu_seqlens.long()
        N, L = cu.numel() - 1, B * T
        if state is not None and tuple(state.shape) != (N, C, W - 1):
            raise ValueError(f"conv state must have shape {(N, C, W - 1)}, got {tuple(state.shape)}")
        if state is None:
            state = x.new_zeros(N, C, W - 1)

        # One table of inputs: every sequence's window (N * (W-1) rows), then the L packed tokens.
        table = torch.cat([state.to(x.dtype).transpose(1, 2).reshape(N * (W - 1), C), x.reshape(L, C)])

        def source(doc: torch.Tensor, pos: torch.Tensor, back: int) -> torch.Tensor:
            """Row of `table` holding the input `back` steps before position `pos` of document `doc`."""
            inside = cu[doc] + pos - back + N * (W - 1)
            window = doc * (W - 1) + (W - 1) + pos - back
            return torch.where(pos >= back, inside, window)

        doc, pos = document_positions(cu, L)
        y = sum(table[source(doc, pos, back)] * self.weight[:, W - 1 - back].to(x.dtype) for back in range(W))

        docs, lengths = torch.arange(N, device=x.device), cu[1:] - cu[:-1]
        new_state = torch.stack([table[source(docs, lengths, W - 1 - i)] for i in range(W - 1)], dim=-1)
        return y.reshape(B, T, C), new_state

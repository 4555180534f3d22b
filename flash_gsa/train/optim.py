"""AdamW with decoupled weight decay on matrices only, and a linear warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Factor on the peak LR for optimizer step `step` (0-based): (step+1)/warmup during warm-up, then a cosine
    from 1 down to `min_ratio` at the last step, and `min_ratio` after it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool = False
) -> torch.optim.AdamW:
    """AdamW; parameters with two or more dimensions decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = functools.partial(lr_multiplier, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)

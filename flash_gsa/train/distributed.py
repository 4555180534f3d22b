"""Process-group set-up and model wrapping for multi-GPU training with PyTorch's own engine (DDP or FSDP2).

Launched by `torchrun` (WORLD_SIZE > 1) a process joins the group (NCCL on CUDA, Gloo on CPU) and takes
`cuda:LOCAL_RANK`; launched plainly it is rank 0 of 1 and nothing here communicates.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available else cpu; anything else as torch parses it, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def setup(device_name: str) -> DistInfo:
    """Join the torchrun process group if there is one; pick this process's device."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `x` over ranks (in place; returned for chaining)."""
    if info.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def wrap(model: nn.Module, mode: str, info: DistInfo, layers: list[nn.Module]) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on each of `layers`, then on the root); unchanged when not distributed."""
    if not info.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 shards in place, so its model is already the model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for micro-batches before the last one of an accumulation window."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield

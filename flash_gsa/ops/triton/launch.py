"""Kernel launches with a cache of compiled kernels.

Triton's own launch path (`kernel[grid](...)`) binds and specializes every argument again on each launch, which costs
tens of microseconds per launch in Python: at small sizes that is host time the GPU waits for (on an H200, an eager
fwd+bwd at hidden 1024, T = 2048 spent 1.51 ms of CPU time per call against ~1.16 ms of kernels). `launch` takes
Triton's path the first time it sees a specialization and keeps the compiled kernel; later launches of the same
specialization go to it directly. A specialization is what Triton compiles anew for: the kernel, the device, the
dtype and 16-byte alignment of every tensor argument, whether an integer argument is 1 or a multiple of 16 (and its
width), which arguments are None, the compile-time arguments, warps and stages.

Under Triton's interpreter (TRITON_INTERPRET=1) nothing is compiled: there every launch takes Triton's path.
"""

from __future__ import annotations

import os
from functools import cache

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (kernel, device, specialization of the runtime arguments, compile-time arguments, warps, stages) -> compiled kernel
COMPILED: dict[tuple, object] = {}


@cache
def _arg_names(kernel) -> tuple[str, ...]:
    return tuple(kernel.arg_names)


def _specialization(x) -> object:
    """What Triton specializes a runtime argument on (see the module's doc)."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return x == 1, x % 16 == 0, -(2**31) <= x < 2**31
    return type(x)


def launch(kernel, grid: tuple[int, ...], args: tuple, const: dict, num_warps: int, num_stages: int):
    """`kernel[grid](*args, **const, num_warps=..., num_stages=...)`: `args` are the kernel's leading parameters in
    order (at least one of them a tensor, on the device to launch on), `const` all the others, by name. Returns
    what Triton returns for a first launch (the compiled kernel), else None."""
    if INTERPRET:
        return kernel[grid](*args, **const, num_warps=num_warps, num_stages=num_stages)
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.index
    key = (kernel, device, tuple(map(_specialization, args)), tuple(const.items()), num_warps, num_stages)
    compiled = COMPILED.get(key)
    if compiled is None:
        COMPILED[key] = compiled = kernel[grid](*args, **const, num_warps=num_warps, num_stages=num_stages)
        return compiled
    # the compiled kernel's launcher takes a 3-d grid and every argument in signature order, compile-time ones included
    compiled[(*grid, 1, 1)[:3]](*args, *(const[name] for name in _arg_names(kernel)[len(args):]))
    return None

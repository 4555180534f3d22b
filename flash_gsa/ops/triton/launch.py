"""Kernel launches with a cache of compiled kernels.

Triton's own launch path (`kernel[grid](...)`) binds and specializes every argument again on each launch, which costs
tens of microseconds per launch in Python: at small sizes that is host time the GPU waits for (on an H200, an eager
fwd+bwd at hidden 1024, T = 2048 spent 1.51 ms of CPU time per call against ~1.16 ms of kernels). `launch` takes
Triton's path the first time it sees a specialization and keeps the compiled kernel; later launches of the same
specialization call its C launch function directly (`_direct`). A specialization is what Triton compiles anew for:
the kernel, the device, the dtype and 16-byte alignment of every tensor argument, whether an integer argument is 1
or a multiple of 16 (and its width), which arguments are None, the compile-time arguments, warps, stages and the
register cap. A kernel that needs more shared memory than the GPU has is compiled again with fewer pipeline stages.

Under Triton's interpreter (TRITON_INTERPRET=1) nothing is compiled: there every launch takes Triton's path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from triton import knobs
from triton.runtime.errors import OutOfResources

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (id of the kernel, device, specialization of the runtime arguments, compile-time arguments, warps, stages,
# register cap) ->
# (compiled kernel, its compile-time arguments in signature order, its direct launcher or None)
COMPILED: dict[tuple, tuple] = {}


def _specialization(x) -> object:
    """What Triton specializes a runtime argument on (see the module's doc)."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return x == 1, x % 16 == 0, -(2**31) <= x < 2**31
    return type(x)


def _direct(compiled) -> Callable | None:
    """A launcher of `compiled` that calls Triton 3.6's C launch function itself, or None when the compiled kernel
    does not have the form this relies on (another Triton version, or a kernel that needs scratch memory). Triton's
    own runner (`compiled[grid](*args)`) also looks up the current device and stream and builds launch metadata on
    every call: ~10 us of host time per launch on the H200 machine."""
    try:
        compiled._init_handles()
        launcher = compiled.run
        c_launch, function, metadata = launcher.launch, compiled.function, compiled.packed_metadata
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        cooperative, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
    except AttributeError:
        return None

    def run(grid_x: int, grid_y: int, grid_z: int, stream: int, *args) -> None:
        # (grid, stream, function, cooperative, pdl, global and profile scratch, metadata, launch metadata, hooks)
        c_launch(grid_x, grid_y, grid_z, stream, function, cooperative, pdl, None, None, metadata, None, None, None,
                 *args)

    return run


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler such as proton): launches then take Triton's path, which calls it.
    Triton 3.6 keeps each hook as a chain of calls, empty unless someone added one; other versions use None."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def launch(kernel, grid: tuple[int, ...], args: tuple, const: dict, num_warps: int, num_stages: int,
           maxnreg: int | None = None):
    """`kernel[grid](*args, **const, num_warps=..., num_stages=..., maxnreg=...)`: `args` are the kernel's leading
    parameters in order (at least one of them a tensor, on the device to launch on, which must be the current device),
    `const` all the others, by name; `maxnreg` (registers per thread, if given) caps ptxas' choice. Returns what
    Triton returns for a first launch (the compiled kernel), else None."""
    if INTERPRET:
        return kernel[grid](*args, **const, num_warps=num_warps, num_stages=num_stages)
    options = dict(num_warps=num_warps, num_stages=num_stages) | ({} if maxnreg is None else dict(maxnreg=maxnreg))
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.index
    key = (id(kernel), device, tuple(map(_specialization, args)), tuple(const.items()), num_warps, num_stages, maxnreg)
    entry = COMPILED.get(key)
    if entry is None:
        try:
            compiled = kernel[grid](*args, **const, **options)
        except OutOfResources:
            # More shared memory than the GPU has (fp32 tiles at large K, V or M): one pipeline stage fewer, down to
            # one; later launches of this specialization take that kernel directly.
            if num_stages == 1:
                raise
            compiled = launch(kernel, grid, args, const, num_warps, num_stages - 1, maxnreg)
            COMPILED[key] = COMPILED[key[:-2] + (num_stages - 1, maxnreg)]
            return compiled
        in_order = tuple(const[name] for name in kernel.arg_names[len(args):])
        COMPILED[key] = (compiled, in_order, _direct(compiled))
        return compiled
    compiled, in_order, direct = entry
    grid = (*grid, 1, 1)
    # the compiled kernel takes a 3-d grid and every argument in signature order, compile-time ones included
    if direct is not None and not _hooked():
        direct(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(device), *args, *in_order)
    else:
        compiled[grid[:3]](*args, *in_order)
    return None

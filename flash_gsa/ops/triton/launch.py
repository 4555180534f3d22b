"""Kernel launches with a cache of compiled kernels.

Triton's own launch path (`kernel[grid](...)`) binds and specializes every argument again on each launch, which costs
tens of microseconds per launch in Python: at small sizes that is host time the GPU waits for (on an H200, an eager
fwd+bwd at hidden 1024, T = 2048 spent 1.51 ms of CPU time per call against ~1.16 ms of kernels). `launch` takes
Triton's path the first time it sees a specialization and keeps the compiled kernel as a `Launcher`; later launches of
the same specialization call its C launch function directly. A specialization is what Triton compiles anew for: the
kernel, the device, the dtype and 16-byte alignment of every tensor argument, whether an integer argument is 1 or a
multiple of 16 (and its width), which arguments are None, the compile-time arguments, warps, stages and the register
cap. A kernel that needs more shared memory than the GPU has is compiled again with fewer pipeline stages.

Working out a launch's specialization from its arguments still costs ~10 us of host time per launch: callers that
know it from fewer values (the chunk kernels: from the tensors the caller did not allocate itself) keep the
`Launcher` that `launch` returns under a key of their own in `BOUND` and call it directly.

Under Triton's interpreter (TRITON_INTERPRET=1) nothing is compiled: there every launch takes Triton's path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from triton import knobs
from triton.runtime.errors import OutOfResources

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Launcher:
    """One compiled kernel: `launcher(grid, *args)` launches it on runtime arguments `args` of the specialization it
    was compiled for (its compile-time arguments are bound)."""

    __slots__ = ("compiled", "in_order", "c_launch", "leading", "device")

    def __init__(self, compiled, in_order: tuple, device: int):
        self.compiled = compiled
        self.in_order = in_order  # the compile-time arguments in signature order: the compiled kernel takes them all
        self.c_launch, self.leading = _direct(compiled) or (None, ())
        self.device = device

    def __call__(self, grid: tuple[int, ...], *args) -> None:
        grid = (*grid, 1, 1)  # the compiled kernel takes a 3-d grid
        if self.c_launch is not None and not _hooked():
            self.c_launch(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device), *self.leading,
                          *args, *self.in_order)
        else:
            self.compiled[grid[:3]](*args, *self.in_order)


# (id of the kernel, device, specialization of the runtime arguments, compile-time arguments, warps, stages,
# register cap) -> Launcher
COMPILED: dict[tuple, Launcher] = {}
# a caller's own key -> Launcher (see the module's doc); a key must determine everything COMPILED's keys hold
BOUND: dict[tuple, Launcher] = {}


def clear() -> None:
    """Forgets every compiled kernel (both caches)."""
    COMPILED.clear()
    BOUND.clear()


def specialization(x) -> object:
    """What Triton specializes a runtime argument on (see the module's doc)."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return x == 1, x % 16 == 0, -(2**31) <= x < 2**31
    return type(x)


def _direct(compiled) -> tuple[Callable, tuple] | None:
    """Triton 3.6's C launch function of `compiled` and the arguments it takes between the stream and the kernel's
    own: (function, cooperative, pdl, global and profile scratch, metadata, launch metadata, enter and exit hooks).
    None when the compiled kernel does not have the form this relies on (another Triton version, or a kernel that
    needs scratch memory). Triton's own runner (`compiled[grid](*args)`) also looks up the current device and stream
    and builds launch metadata on every call: ~10 us of host time per launch on the H200 machine."""
    try:
        compiled._init_handles()
        launcher = compiled.run
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        return launcher.launch, (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                                 compiled.packed_metadata, None, None, None)
    except AttributeError:
        return None


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler such as proton): launches then take Triton's path, which calls it.
    Triton 3.6 keeps each hook as a chain of calls, empty unless someone added one; other versions use None."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


def launch(kernel, grid: tuple[int, ...], args: tuple, const: dict, num_warps: int, num_stages: int,
           maxnreg: int | None = None) -> Launcher | None:
    """`kernel[grid](*args, **const, num_warps=..., num_stages=..., maxnreg=...)`: `args` are the kernel's leading
    parameters in order (at least one of them a tensor, on the device to launch on, which must be the current device),
    `const` all the others, by name; `maxnreg` (registers per thread, if given) caps ptxas' choice. Returns the
    `Launcher` of this specialization (None under the interpreter)."""
    if INTERPRET:
        kernel[grid](*args, **const, num_warps=num_warps, num_stages=num_stages)
        return None
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.index
    key = (id(kernel), device, tuple(map(specialization, args)), tuple(const.items()), num_warps, num_stages, maxnreg)
    launcher = COMPILED.get(key)
    if launcher is not None:
        launcher(grid, *args)
        return launcher
    options = dict(num_warps=num_warps, num_stages=num_stages) | ({} if maxnreg is None else dict(maxnreg=maxnreg))
    try:
        compiled = kernel[grid](*args, **const, **options)
    except OutOfResources:
        # More shared memory than the GPU has (fp32 tiles at large K, V or M): one pipeline stage fewer, down to
        # one; later launches of this specialization take that kernel directly.
        if num_stages == 1:
            raise
        launcher = COMPILED[key] = launch(kernel, grid, args, const, num_warps, num_stages - 1, maxnreg)
        return launcher
    launcher = COMPILED[key] = Launcher(compiled, tuple(const[name] for name in kernel.arg_names[len(args):]), device)
    return launcher

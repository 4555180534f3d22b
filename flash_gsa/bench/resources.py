"""`gsa bench resources`: compile the Triton kernels (training, decoding, LM loss, RMSNorm) for an NVIDIA GPU on any
machine, no GPU needed, and report what each needs: shared memory, registers per thread and local-memory stack
(register spills).

Triton lowers a kernel to PTX and runs ptxas without touching a device, so the launch code of the triton backend is
run on CPU tensors with two things swapped in: a stand-in driver that names the target (sm_90, the H100, by default)
and a `JITFunction.run` that compiles instead of launching. Registers, stack and spills come from `ptxas -v` on the PTX,
shared memory from Triton's metadata. Nothing is timed: this catches kernels that cannot launch (shared
memory above the per-block limit) and register spills, which make a kernel slow, before any GPU is at hand. A kernel
whose shared memory exceeds the limit is compiled again with fewer pipeline stages, as `launch.launch` does on a GPU;
the records are the kernels as they launch.

    gsa bench resources                      # the benchmark shapes and the largest supported ones (bf16 inputs)
    gsa bench resources --shape 256,256,128  # K,V,M
    gsa bench resources --dtype fp32         # float32 inputs (tiles of twice the bytes)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from .record import stamp, write_json

# Per-block shared memory a kernel may use (opt-in maximum), shared memory per SM, of which the driver reserves 1 KiB
# per resident block, and the register file, per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SHARED_PER_SM = {80: 167936, 86: 102400, 89: 102400, 90: 233472}
SHARED_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536


def _shared_limit(arch: int) -> int:
    """Per-block shared memory of compute capability `arch` (the H100's where it is not in the table)."""
    return SHARED_LIMIT.get(arch, SHARED_LIMIT[90])


DEFAULT_SHAPES = ((256, 256, 64), (512, 512, 64), (256, 256, 128), (512, 512, 256), (64, 64, 16))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class KernelResources:
    kernel: str
    K: int
    V: int
    M: int
    num_warps: int
    shared_bytes: int
    registers: int
    stack_bytes: int
    spill_bytes: int  # bytes of spill stores + spill loads in the code (static counts, not traffic)
    fits: bool  # shared memory within the per-block limit: the kernel can launch
    shared_per_sm: int  # of the target
    num_stages: int = 0  # software pipelining stages it was compiled with (fewer than config's if they did not fit)
    dtype: str = ""  # of the inputs (q, k, v) it was compiled for; "" for the model's kernels

    @property
    def blocks_per_sm(self) -> int:
        """Blocks that fit on one SM at once, by registers and by shared memory."""
        by_registers = REGISTERS_PER_SM // max(1, self.registers * 32 * self.num_warps)
        by_shared = self.shared_per_sm // (self.shared_bytes + SHARED_RESERVED_PER_BLOCK)
        return max(0, min(by_registers, by_shared))


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill traffic, as `ptxas -v` reports them for the kernel's PTX."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f, tempfile.TemporaryDirectory() as out:
        f.write(ptx)
        f.flush()
        cmd = [ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.path.join(out, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
    }


@contextlib.contextmanager
def offline_compilation(arch: int = 90) -> Iterator[list[tuple[str, dict, object]]]:
    """Within the block, launching a Triton kernel compiles it for sm_<arch> and records (name, constexprs, compiled
    kernel) in the yielded list instead of running it. Not thread-safe; restores Triton on exit."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline compilation needs the kernels compiled, not interpreted: unset TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    class _Target:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled: list[tuple[str, dict, object]] = []
    run = JITFunction.run
    limit = _shared_limit(arch)

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kwargs, kernel))
        if kernel.metadata.shared > limit and kwargs.get("num_stages", 1) > 1:
            # as a launch on the target would fail: launch.launch then compiles it with one stage fewer
            raise OutOfResources(kernel.metadata.shared, limit, "shared memory")
        return kernel

    from ..ops.triton import launch

    active = driver._active  # None until first use; reset_active() would fail on a machine without a GPU
    driver.set_active(_Target())
    JITFunction.run = compile_only
    launch.clear()  # every launch inside compiles (none is taken from, or left in, the launch caches)
    try:
        yield compiled
    finally:
        JITFunction.run = run
        driver._active = active
        launch.clear()


def training_kernel_resources(
    K: int, V: int, M: int, *, G: int = 1, dtype: torch.dtype = torch.bfloat16, arch: int = 90
) -> list[KernelResources]:
    """Compile the forward and backward kernels of the triton backend for one shape and input dtype; one record per
    kernel, as it launches (with fewer pipeline stages where config's did not fit)."""
    from ..ops.triton import config
    from ..ops.triton.function import chunk_backward, chunk_forward, layout_for

    H, T = 1, 2 * config.chunk_size(M)
    q = torch.randn(T, H * G, K, dtype=dtype)
    k, v = torch.randn(T, H, K, dtype=dtype), torch.randn(T, H, V, dtype=dtype)
    g, s = -torch.rand(T, H, M, dtype=dtype), torch.rand(T, H, M, dtype=dtype)
    layout = layout_for(1, T, None, M, q.device)
    with offline_compilation(arch) as compiled:
        o, _, saved = chunk_forward(q, k, v, g, s, 1.0, None, layout)
        chunk_backward(q, k, v, s, torch.randn_like(o), None, saved, 1.0, layout, g.dtype)
        if M >= 64:
            _pipelined_scan(q, k, v, g, saved[1], layout)
    launched = {}  # the last compilation of each kernel: the one that launches (the scan's two directions share it)
    for name, const, kernel in compiled:
        name += " (exact path)" if const.get("EXACT") else ""  # the kernels compiled for each intra-chunk path
        name += " (pipelined)" if const.get("PIPELINED") else ""  # the scan's walk when there are many programs
        launched[name] = kernel, const.get("STAGES") if const.get("PIPELINED") else None
    return [_record(name, kernel, K, V, M, arch, dtype, stages) for name, (kernel, stages) in launched.items()]


def _pipelined_scan(q, k, v, g, b_last, layout) -> None:
    """Launches (inside offline_compilation: compiles) the forward scan as it runs when the state splits into many
    tiles of 64 slots, its pipelined walk, whose stages take shared memory."""
    from ..ops.triton import config, function

    H, M, K, V = k.shape[-2], g.shape[-1], k.shape[-1], v.shape[-1]
    sizes = function._sizes(q, k, v, M, layout, config.LOWP_FORWARD)
    sig = function.signature(sizes, (q, k, v, g), "pipelined")
    w = torch.zeros(layout.num_chunks, H, layout.chunk, M, dtype=k.dtype)
    states = torch.empty(layout.num_chunks, H, M, K + V, dtype=function.state_dtype(q.dtype))
    final = torch.empty(layout.cu_seqlens.numel() - 1, H, M, K + V)
    many, config.SCAN_MANY_PROGRAMS = config.SCAN_MANY_PROGRAMS, 0
    try:
        function._scan(sig, sizes, {"keys": (w, k), "values": (w, v)}, states, b_last, None, final, layout, H, 1,
                       reverse=False)
    finally:
        config.SCAN_MANY_PROGRAMS = many


def decode_kernel_resources(
    K: int, V: int, M: int, *, G: int = 1, dtype: torch.dtype = torch.bfloat16, arch: int = 90
) -> list[KernelResources]:
    """Compile the decoding kernel (one token, state in place) for one shape; one record."""
    from ..ops.triton.decode import launch_decode_kernel

    H = 1
    q = torch.randn(1, 1, H * G, K, dtype=dtype)
    k, v = torch.randn(1, 1, H, K, dtype=dtype), torch.randn(1, 1, H, V, dtype=dtype)
    g, s = -torch.rand(1, 1, H, M), torch.rand(1, 1, H, M)
    hk, hv = torch.zeros(1, H, K, M), torch.zeros(1, H, M, V)
    with offline_compilation(arch) as compiled:
        launch_decode_kernel(q, k, v, g, s, 1.0, hk, hv, hk, hv, torch.empty_like(q[..., :1].expand(1, 1, H * G, V)),
                             None, 1, True)
    return [_record(name, kernel, K, V, M, arch, dtype) for name, _, kernel in compiled]


def model_kernel_resources(vocab: int = 32000, hidden: int = 1024, *, arch: int = 90) -> list[KernelResources]:
    """Compile the model's other kernels: the LM loss's cross-entropy (bf16 logits of `vocab` entries) and RMSNorm
    (fp32 rows of `hidden`, bf16 output, as under autocast), forward and backward; one record each (K, V, M are 0:
    they do not apply)."""
    from ..ops.triton.cross_entropy import cross_entropy_backward, cross_entropy_forward
    from ..ops.triton.rms_norm import rms_norm_backward, rms_norm_forward

    x, targets = torch.randn(2, vocab, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long)
    rows, weight = torch.randn(8, hidden), torch.ones(hidden)
    with offline_compilation(arch) as compiled:
        _, lse = cross_entropy_forward(x, targets)
        cross_entropy_backward(x, targets, lse, torch.ones(1))
        y, rstd = rms_norm_forward(rows, weight, 1e-5, torch.bfloat16)
        rms_norm_backward(rows, weight, rstd, y, True)
    return [_record(name, kernel, 0, 0, 0, arch) for name, _, kernel in compiled]


def _record(name: str, kernel, K: int, V: int, M: int, arch: int, dtype: torch.dtype | None = None,
            stages: int | None = None) -> KernelResources:
    """`stages`: those of the kernel's pipelined loop where the loop sets its own (the scan's pipelined walk)."""
    md = kernel.metadata
    return KernelResources(
        name, K, V, M, md.num_warps, md.shared, **_ptxas_report(kernel.asm["ptx"], arch),
        fits=md.shared <= _shared_limit(arch),
        shared_per_sm=SHARED_PER_SM.get(arch, SHARED_PER_SM[90]),
        num_stages=stages or md.num_stages, dtype="" if dtype is None else str(dtype).removeprefix("torch."),
    )


def format_table(records: Sequence[KernelResources]) -> str:
    columns = ["dtype", "K", "V", "M", "kernel", "warps", "stages", "shared KiB", "regs", "stack B", "spill B",
               "blocks/SM", "launches"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append(
            f"| {r.dtype or '-'} | {r.K} | {r.V} | {r.M} | {r.kernel} | {r.num_warps} | {r.num_stages} "
            f"| {r.shared_bytes / 1024:.0f} | {r.registers} | {r.stack_bytes} | {r.spill_bytes} | {r.blocks_per_sm} "
            f"| {'yes' if r.fits else 'NO'} |"
        )
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        K, V, M = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K,V,M (e.g. 256,256,64), got {text!r}") from None
    return K, V, M


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gsa bench resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=_shape, action="append", metavar="K,V,M", help="repeatable (default: a set)")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    p.add_argument("--dtype", choices=DTYPES, action="append", help="of the inputs; repeatable (default: bf16)")
    p.add_argument("--json", help="also write the records (stamped: versions, commit, date) to this JSON file")
    args = p.parse_args(argv)
    records = []
    for name in args.dtype or ["bf16"]:
        for K, V, M in args.shape or DEFAULT_SHAPES:
            kw = dict(dtype=DTYPES[name], arch=args.arch)
            records += training_kernel_resources(K, V, M, **kw) + decode_kernel_resources(K, V, M, **kw)
    records += model_kernel_resources(arch=args.arch)
    print(format_table(records))
    if args.json:
        payload = {"stamp": stamp(), "target": f"sm_{args.arch}", "shared_limit": SHARED_LIMIT.get(args.arch),
                   "records": [asdict(r) for r in records]}
        write_json(args.json, payload)
    return 0 if all(r.fits for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())

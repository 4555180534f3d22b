"""Variants of the triton backend's tunables (flash_gsa/ops/triton/config.py) on a CUDA GPU: fwd+bwd time per
variant and hidden size, the per-kernel GPU time of each, and each variant's agreement with the default.

    python benchmarks/tune_kernels.py [--variants default,tiles64,...] [--seq-len 2048] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/tune_kernels.py --quick     # tiny shapes on the CPU: checks the script only

The op benchmark's shapes (bf16, 32K tokens per call, H = 4, M = 64; hidden 1024: K = V = 256, hidden 2048: K = V =
512). A variant sets attributes of `config` in this process; the kernels read them at launch, so each variant
compiles its own kernels (seconds per shape). Writes `tune_kernels.json` into --out (default: $OUT, else .) and
prints one line per variant and shape. Nothing here changes the defaults: adopt a variant by editing config.py, then
run the tests and `benchmarks/run_gpu_checks.sh`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
import torch.nn.functional as F

from flash_gsa import gsa
from flash_gsa.bench.record import stamp
from flash_gsa.ops.triton import config

VARIANTS = {
    "default": {},
    # software pipelining of the K / V tile loops: one stage fewer than the defaults
    "output_stages1": dict(NUM_STAGES={**config.NUM_STAGES, "output": 1}),
    "bwd_stages2": dict(NUM_STAGES={**config.NUM_STAGES, "bwd_values": 2, "bwd_keys": 2}),
    "bwd_values_stages2": dict(NUM_STAGES={**config.NUM_STAGES, "bwd_values": 2}),
    "bwd_values_stages4": dict(NUM_STAGES={**config.NUM_STAGES, "bwd_values": 4}),
    "bwd_keys_stages2": dict(NUM_STAGES={**config.NUM_STAGES, "bwd_keys": 2}),
    "bwd_keys_stages4": dict(NUM_STAGES={**config.NUM_STAGES, "bwd_keys": 4}),
    # one tile width for every kernel: 64 (twice the loop trips at K = V = 512, smaller products) or 128
    "tiles64": dict(TILE=dict.fromkeys(config.TILE, 64)),
    "tiles128": dict(TILE=dict.fromkeys(config.TILE, 128)),
    # one backward kernel with 128-wide tiles (fewer trips; more live registers)
    "bwd_values128": dict(TILE={**config.TILE, "bwd_values": 128}),
    "bwd_keys128": dict(TILE={**config.TILE, "bwd_keys": 128}),
    "output64": dict(TILE={**config.TILE, "output": 64}),
    # no register cap for ptxas (MAX_REGISTERS): its own choice per kernel
    "no_maxnreg": dict(MAX_REGISTERS={}),
    # bf16 operands for the intra-chunk products of 16-bit inputs (tf32 otherwise)
    "lowp": dict(LOWP_FORWARD=True, LOWP_BACKWARD=True),
    # tf32 for bwd_values' four intra-chunk products (bf16, the default since session 19; before, "lowp_backward")
    "tf32_backward": dict(LOWP_BACKWARD=False),
    # 32-token chunks at M = 64: [C, C] and [C, M] tiles of half the size (the heavy kernels are register-bound at
    # 64: 255 registers and spills), twice the chunks (states, scan steps)
    "chunk32": dict(CHUNK={**config.CHUNK, 64: 32}),
    # 8 warps for the three heavy kernels (register-bound at 4: 255 registers, spills)
    "warps8": dict(NUM_WARPS={**config.NUM_WARPS, "output": 8, "bwd_values": 8, "bwd_keys": 8}),
    # 8 warps for bwd_values alone (the kernel with the most live [C, M] tensors)
    "bwd_values_w8": dict(NUM_WARPS={**config.NUM_WARPS, "bwd_values": 8}),
    # state tiles of the scan: 32 or 64 rows (slots) whatever the number of programs, 16 when programs are few, or
    # 128 columns per program (no variant narrower than 64 columns: config.MIN_TILE_BYTES)
    "scan_rows32": dict(BLOCK_SCAN_M=(32, 32)),
    "scan_rows64": dict(BLOCK_SCAN_M=(64, 64)),
    "scan_rows16": dict(BLOCK_SCAN_M=(16, 64)),
    "scan_n128": dict(BLOCK_SCAN=128),
    # 8 warps per scan program (half the registers per thread for the same tile), also with 128-column tiles
    "scan_w8": dict(NUM_WARPS={**config.NUM_WARPS, "scan": 8}),
    "scan_n128_w8": dict(BLOCK_SCAN=128, NUM_WARPS={**config.NUM_WARPS, "scan": 8}),
    # more programs per SM: at 255 registers (4 warps) two fit; a cap of 168 fits three, 128 four (more spills). On
    # the H200 (session 13) every one of these was slower than the default: spills cost more than the occupancy gave
    "output_r168": dict(MAX_REGISTERS={**config.MAX_REGISTERS, "output": 168}, TILE={**config.TILE, "output": 64}),
    "output_r128": dict(MAX_REGISTERS={**config.MAX_REGISTERS, "output": 128}, TILE={**config.TILE, "output": 64}),
    "bwd_values_r168": dict(MAX_REGISTERS={**config.MAX_REGISTERS, "bwd_values": 168}),
    "bwd_keys_r168": dict(MAX_REGISTERS={**config.MAX_REGISTERS, "bwd_keys": 168},
                          NUM_STAGES={**config.NUM_STAGES, "bwd_keys": 2}),
    "scan_r168": dict(MAX_REGISTERS={**config.MAX_REGISTERS, "scan": 168}),
    "scan_r128": dict(MAX_REGISTERS={**config.MAX_REGISTERS, "scan": 128}),
    # 128-token chunks at M = 64: half the per-chunk states (the kernels move ~6 GB per fwd+bwd at hidden 2048, about
    # 2.6 GB of it states), twice the intra-chunk work per token; 8 warps for the [C, C] tiles (4 spill 10-13 KB)
    "chunk128w8": dict(CHUNK={**config.CHUNK, 64: 128},
                       NUM_WARPS={**config.NUM_WARPS, "output": 8, "bwd_values": 8, "bwd_keys": 8},
                       NUM_STAGES={**config.NUM_STAGES, "output": 2, "bwd_values": 2, "bwd_keys": 2}),
}
TUNABLES = ("CHUNK", "NUM_WARPS", "NUM_STAGES", "MAX_REGISTERS", "TILE", "LOWP_FORWARD", "LOWP_BACKWARD", "BLOCK_SCAN",
            "BLOCK_SCAN_M", "SCAN_MANY_PROGRAMS")


SHAPES = {"h1024": 256, "h2048": 512}  # K = V per head, at H = 4, M = 64
QUICK_SHAPES = {"tiny": 32}


def inputs(K: int, T: int, tokens: int, device: str, seed: int = 0):
    B, H, M = tokens // T, 4, 64
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (F.silu(torch.randn(B, T, H, K, device=device, generator=gen)).bfloat16() for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, M, device=device, generator=gen)) / 8
    do = torch.randn(B, T, H, K, device=device, generator=gen).bfloat16()
    return [q, k, v, g.bfloat16(), (-torch.expm1(g)).bfloat16()], do


def fwd_bwd(xs, do):
    xs = [x.detach().requires_grad_() for x in xs]
    o, _ = gsa(*xs, scale=1.0, backend="triton")
    o.backward(do)
    return [o.detach()] + [x.grad for x in xs]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def kernel_times(step, n: int = 5) -> list[tuple[str, float]]:
    """Per-kernel GPU ms per call, largest first (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / n / 1e3) for e in p.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    import triton

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, tokens, T = (QUICK_SHAPES, 128, 64) if a.quick else (SHAPES, 32768, a.seq_len)
    base = {name: getattr(config, name) for name in TUNABLES}
    results = {"stamp": stamp(), "seq_len": T, "tokens": tokens, "variants": {}}
    reference = {}
    for name in a.variants.split(","):
        for key, value in {**base, **VARIANTS[name]}.items():
            setattr(config, key, value)
        for shape, K in shapes.items():
            xs, do = inputs(K, T, tokens, device)
            row = dict(overrides={k: str(v) for k, v in VARIANTS[name].items()}, K=K, V=K)
            try:
                t0 = time.perf_counter()
                out = fwd_bwd(xs, do)
                sync(device)
                row["first_call_s"] = time.perf_counter() - t0
                ref = reference.setdefault(shape, out)  # the first variant run is the reference (default first)
                row["max_rel_diff_vs_first"] = max(
                    ((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(out, ref, strict=True)
                )
                if device == "cuda":
                    step = functools.partial(fwd_bwd, xs, do)
                    row["ms"] = triton.testing.do_bench(step, warmup=25, rep=200)
                    row["kernels_ms"] = kernel_times(step)[:10]
                else:  # the interpreter: a check of the script, not a timing
                    row["ms"], row["kernels_ms"] = 1e3 * (time.perf_counter() - t0), []
            except Exception as e:  # a variant that does not compile or launch is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            results["variants"][f"{name}/{shape}"] = row
            print(f"{name:15s} {shape}: " + (row.get("error") or
                  f"{row['ms']:.3f} ms fwd+bwd, first call {row['first_call_s']:.1f} s, "
                  f"diff {row['max_rel_diff_vs_first']:.1e}; " +
                  ", ".join(f"{k.removesuffix('_kernel')} {t:.3f}" for k, t in row["kernels_ms"][:8])), flush=True)
    for key, value in base.items():
        setattr(config, key, value)
    path = os.path.join(a.out, "tune_kernels.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(path)


if __name__ == "__main__":
    main()

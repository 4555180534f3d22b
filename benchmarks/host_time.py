"""Host time against GPU time of the triton backend's eager fwd+bwd, at the op benchmark's shapes (bf16, 32K tokens per
call, H = 4, M = 64; hidden 1024: K = V = 256, hidden 2048: K = V = 512).

    python benchmarks/host_time.py [--label NAME] [--hidden 1024,2048] [--seq-len 2048] [--profile] [--out DIR]

Per hidden size it prints and writes (`host_time_<label>.json` in --out, default $OUT or .):
- do_bench_ms: triton's do_bench median of `gsa(...)[0].backward(do)`, gradients reset to None, L2 flushed (as the op
  benchmark times it);
- host_ms: CPU time per call of 40 calls enqueued without a sync (median and min of 10 such loops): when it exceeds
  the GPU time, the GPU waits for the host;
- gpu_ms and kernels: the kernels' GPU time per call (torch profiler); launches: each launch's, in launch order.
--profile adds a cProfile of 100 calls (the first hidden size), sorted by own time. Compare trees by running it once
per tree in the same device call (PYTHONPATH=<tree>): the host's speed moves from machine to machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from flash_gsa import gsa
from flash_gsa.bench.record import stamp

HEAD_DIM = {1024: 256, 2048: 512}


def launch_times(prof, calls: int) -> list[tuple[str, float]] | None:
    """GPU ms of each kernel launch of one call, in launch order (the median over `calls` identical calls), or None
    when the profiled kernels do not split into `calls` equal runs. Separates the launches that share a kernel name
    (the fast and exact intra-chunk paths, the two scans)."""
    from torch.autograd import DeviceType

    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    if not events or len(events) % calls:
        return None
    n = len(events) // calls
    return [(events[j].name, statistics.median(events[i * n + j].time_range.elapsed_us() for i in range(calls)) / 1e3)
            for j in range(n)]


def measure(hidden: int, T: int, label: str, profile: bool) -> dict:
    """One hidden size: do_bench, host time per call, kernel times (and the cProfile when `profile`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    K, H, M, B = HEAD_DIM[hidden], 4, 64, 32768 // T
    torch.manual_seed(0)
    q, k = (torch.randn(B, T, H, K, device="cuda") * K**-0.25 for _ in range(2))
    v = torch.randn(B, T, H, K, device="cuda")
    g = F.logsigmoid(torch.randn(B, T, H, M, device="cuda")) / 8
    xs = [x.bfloat16().requires_grad_() for x in (q, k, v, g, -torch.expm1(g))]
    do = torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16)

    def step():
        gsa(*xs, scale=1.0, backend="triton")[0].backward(do)

    def step_reset():
        for x in xs:
            x.grad = None
        step()

    for _ in range(5):
        step_reset()
    torch.cuda.synchronize()
    ms = do_bench(step, warmup=25, rep=200, grad_to_none=xs, return_mode="median")
    host = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(40):
            step_reset()
        host.append(1e3 * (time.perf_counter() - t0) / 40)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step_reset()
        torch.cuda.synchronize()
    kernels = {e.key: e.self_device_time_total / 10 / 1e3 for e in prof.key_averages() if e.self_device_time_total}
    rec = dict(hidden=hidden, B=B, T=T, H=H, K=K, V=K, M=M, do_bench_ms=ms, host_ms_median=statistics.median(host),
               host_ms_min=min(host), gpu_ms=sum(kernels.values()),
               kernels=dict(sorted(kernels.items(), key=lambda kv: -kv[1])), launches=launch_times(prof, 10))
    print(f"[{label}] hidden {hidden} T {T}: do_bench {ms:.3f} ms | host per call: median {rec['host_ms_median']:.3f}, "
          f"min {rec['host_ms_min']:.3f} | kernels {rec['gpu_ms']:.3f}", flush=True)
    for name, t in rec["kernels"].items():
        print(f"    {t:.4f}  {name}")
    print("  in launch order (median over the calls):")
    for name, t in rec["launches"] or []:
        print(f"    {t:.4f}  {name}")
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(100):
            step_reset()
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="run")
    p.add_argument("--hidden", default="1024,2048")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_time.py needs a CUDA device")
    results = []
    for i, hidden in enumerate(int(x) for x in args.hidden.split(",")):
        results.append(measure(hidden, args.seq_len, args.label, args.profile and i == 0))
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"host_time_{args.label}.json")
    with open(path, "w") as f:
        json.dump(dict(stamp=stamp(), label=args.label, results=results), f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""`gsa bench op`: the GSA operator against its peers, forward and forward+backward, plus the decoding step.

Run as a script: `python -m flash_gsa.bench.op [--quick] [...]` (see `--help`), or call `run_op_benchmark`.

What it measures, per config (hidden 1024: H=4, K=V=256, M=64; hidden 2048: H=4, K=V=512, M=64; T in 2048, 8192,
32768 with B = 32768 / T, bf16, GSA scale 1.0):

- impls: "flash_gsa-triton" (`flash_gsa.gsa(..., backend="triton")`), "flash_gsa-chunk" (the PyTorch chunk backend),
  "fla-chunk_gsa" (fla 0.6.0), "sdpa-flash" (torch SDPA, causal, head dim 128, hidden / 128 heads, flash backend).
- ms: median of `triton.testing.do_bench` (which flushes the L2 before every repetition; the inputs are >= 64 MiB
  anyway). "fwd" is the training forward (inputs require grad, the output is dropped); "fwdbwd" is forward then
  `o.backward(do)`, gradients reset to None between repetitions.
- peak_gib: peak allocated CUDA memory during one call minus what was allocated just before it: the memory the call
  needs on top of its inputs (outputs, saved activations, workspace and, for fwdbwd, the gradients).
- first_call_s: wall time of the first call of that shape and mode in a fresh process (compilation and autotuning);
  "flash_gsa-*" workers get an empty Triton cache, so theirs is a cold start. Peers share a cache directory across
  runs (`triton_cache` says whether it was empty when the worker started).
- roofline: tensor-core FLOPs of a chunked algorithm and the bytes a fully fused fwd+bwd must move (see
  `gsa_flops`, `gsa_bytes`), against the HBM bandwidth measured in the same run by a large device-to-device copy
  (bytes read + written); `hbm_frac` = bytes / time / bandwidth.
- decode: B in {1, 64}, one token, state updated in place, `flash_gsa.ops.triton.decode.fused_recurrent_gsa` against
  fla `fused_recurrent_gsa` (which writes a new state), for the hidden-1024, hidden-2048 and 7B (HQ=32, H=8, K=V=128)
  shapes. ms is the do_bench median (L2 flushed, so the state comes from HBM); host_us is the wall time per call of a
  loop of eager calls (launch-bound throughput without CUDA graphs).

Every impl runs in its own worker process with a time limit: a peer that is missing, fails, runs out of memory or
hangs becomes a record with status "skipped" or "error" and the run goes on. fla autotunes its kernels on first use
(minutes per shape): `--warmup-only` runs just the first calls, filling the shared Triton cache, so that a later
timed run (possibly another process on the same machine) starts warm.

Output: `<results-dir>/op_<device-slug>.json` and `.png` (`op_<device-slug>-quick.*` for --quick);
`render_markdown` turns the JSON into README tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .record import (  # noqa: F401  (PEER_CACHE_DIR, RECORD_PREFIX and Skip stay importable from here)
    PEER_CACHE_DIR,
    RECORD_PREFIX,
    REPO_ROOT,
    Skip,
    device_slug,
    emit_record,
    read_json,
    run_worker,
    stamp,
    worker_env,
    write_json,
)

IMPLS = ("flash_gsa-triton", "flash_gsa-chunk", "fla-chunk_gsa", "sdpa-flash")
DECODE_IMPLS = ("flash_gsa-decode", "fla-fused_recurrent_gsa")
MODES = ("fwd", "fwdbwd")
OURS = "flash_gsa-triton"
PEERS = ("fla-chunk_gsa", "sdpa-flash")
HIDDEN_SHAPES = {1024: dict(H=4, K=256, V=256, M=64), 2048: dict(H=4, K=512, V=512, M=64)}
SEQ_LENS = (2048, 8192, 32768)
TOKENS = 32768
DECODE_SHAPES = {
    "hidden1024": dict(HQ=4, H=4, K=256, V=256, M=64),
    "hidden2048": dict(HQ=4, H=4, K=512, V=512, M=64),
    "7b": dict(HQ=32, H=8, K=128, V=128, M=64),
}
DECODE_BATCHES = (1, 64)
# --quick: tiny sizes that the CPU (chunk backend, Triton interpreter) gets through in seconds.
QUICK_HIDDEN_SHAPES = {64: dict(H=2, K=32, V=32, M=16)}
QUICK_SEQ_LENS = (32, 64)
QUICK_TOKENS = 64
QUICK_DECODE_SHAPES = {"tiny": dict(HQ=4, H=2, K=32, V=16, M=16)}
QUICK_DECODE_BATCHES = (1, 2)

CHUNK = 64  # chunk length assumed by the FLOP count
SDPA_HEAD_DIM = 128
GATE_NORMALIZER = 8.0  # g = logsigmoid(x) / 8, as in the released models
HBM_COPY_BYTES = 1 << 30  # bytes of each buffer of the bandwidth copy (CPU: 1/16 of it)
CPU_TIMING_BUDGET_S = 0.25  # --quick on the CPU: time each call for about this long (at least 3 calls)


@dataclass(frozen=True)
class OpConfig:
    hidden: int
    B: int
    T: int
    H: int
    K: int
    V: int
    M: int


# ---- roofline -------------------------------------------------------------------------------------------------------


def gsa_flops(B: int, T: int, HQ: int, H: int, K: int, V: int, M: int, chunk: int = CHUNK) -> tuple[int, int]:
    """Tensor-core FLOPs (forward, backward) of chunked GSA with dense `chunk` x `chunk` intra-chunk blocks.

    Per token and query head: q @ hk (2KM), q k^T (2CK), A1 @ s (2CM), p @ hv (2MV), p s^T (2CM), A2 @ v (2CV);
    per token and kv-head: the state updates k^T s (2KM) and s^T v (2MV). Backward: two products per forward product
    plus recomputing the chunk states.
    """
    n, c = B * T, chunk
    fwd = n * (HQ * (2 * K * M + 2 * c * K + 4 * c * M + 2 * M * V + 2 * c * V) + H * (2 * K * M + 2 * M * V))
    bwd = 2 * fwd + n * H * (2 * K * M + 2 * M * V)
    return fwd, bwd


def gsa_bytes(B: int, T: int, HQ: int, H: int, K: int, V: int, M: int, elem: int = 2) -> tuple[int, int]:
    """Bytes (forward, forward+backward) a fully fused implementation must move at `elem` bytes per element.

    Forward: read q, k, v, g, s; write o. Backward: read q, k, v, g, s and do; write dq, dk, dv, dg, ds.
    """
    n = B * T
    inputs = HQ * K + H * K + H * V + 2 * H * M
    fwd = n * elem * (inputs + HQ * V)
    return fwd, fwd + n * elem * (inputs + HQ * V + inputs)


def sdpa_shape(hidden: int) -> tuple[int, int]:
    """(heads, head dim) of the attention peer: head dim 128 (or `hidden` itself when smaller)."""
    d = min(SDPA_HEAD_DIM, hidden)
    return hidden // d, d


def sdpa_flops(B: int, T: int, heads: int, d: int) -> tuple[int, int]:
    """Causal attention FLOPs (forward, backward): QK^T and PV over half the T x T square; backward 2.5x."""
    fwd = 2 * 2 * B * heads * T * T * d // 2
    return fwd, fwd * 5 // 2


def sdpa_bytes(B: int, T: int, heads: int, d: int, elem: int = 2) -> tuple[int, int]:
    """Bytes (forward, forward+backward): read q, k, v, write o; backward reads q, k, v, o, do, writes dq, dk, dv."""
    x = B * T * heads * d * elem
    return 4 * x, 4 * x + 8 * x


def decode_bytes(B: int, HQ: int, H: int, K: int, V: int, M: int, elem: int = 2) -> int:
    """Bytes of one decoding step: the fp32 state read and written, plus q, k, v, g, s read and o written."""
    return B * (2 * 4 * H * (K * M + M * V) + elem * (HQ * K + H * K + H * V + 2 * H * M + HQ * V))


def roofline(configs: Sequence[OpConfig], hbm_bytes_per_s: float | None) -> list[dict[str, Any]]:
    rows = []
    for c in configs:
        f_fwd, f_bwd = gsa_flops(c.B, c.T, c.H, c.H, c.K, c.V, c.M)
        b_fwd, b_all = gsa_bytes(c.B, c.T, c.H, c.H, c.K, c.V, c.M)
        row = dict(asdict(c), flops_fwd=f_fwd, flops_bwd=f_bwd, bytes_fwd=b_fwd, bytes_fwdbwd=b_all,
                   floor_ms_fwd=None, floor_ms_fwdbwd=None)
        if hbm_bytes_per_s:
            row["floor_ms_fwd"] = 1e3 * b_fwd / hbm_bytes_per_s
            row["floor_ms_fwdbwd"] = 1e3 * b_all / hbm_bytes_per_s
        rows.append(row)
    return rows


# ---- worker side: everything below runs inside a worker process -----------------------------------------------------


_emit = emit_record


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], Any], device, grad_to_none=None) -> float:
    """Median milliseconds of `fn`: triton's do_bench on CUDA, a wall-clock loop on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"))
    times, budget = [], time.perf_counter() + CPU_TIMING_BUDGET_S
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 50):
        for x in grad_to_none or ():
            x.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _first_call_s(fn: Callable[[], Any], device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak_gib(fn: Callable[[], Any], device, grad_to_none=None) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    for x in grad_to_none or ():
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _gsa_inputs(c: OpConfig, device, dtype):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    q = torch.randn(c.B, c.T, c.H, c.K, device=device, dtype=dtype) * c.K**-0.25
    k = torch.randn(c.B, c.T, c.H, c.K, device=device, dtype=dtype) * c.K**-0.25
    v = torch.randn(c.B, c.T, c.H, c.V, device=device, dtype=dtype)
    g = F.logsigmoid(torch.randn(c.B, c.T, c.H, c.M, device=device, dtype=torch.float32)) / GATE_NORMALIZER
    s = -torch.expm1(g)
    return [x.to(dtype).requires_grad_() for x in (q, k, v, g, s)]


def _make_op(impl: str, c: OpConfig, device, dtype):
    """(call, inputs, output grad) for one impl and config; call() runs the forward and returns o."""
    import torch

    if impl == "sdpa-flash":
        import torch.nn.functional as F

        heads, d = sdpa_shape(c.hidden)
        torch.manual_seed(0)
        inputs = [torch.randn(c.B, heads, c.T, d, device=device, dtype=dtype).requires_grad_() for _ in range(3)]
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def call():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(*inputs, is_causal=True)
        else:

            def call():
                return F.scaled_dot_product_attention(*inputs, is_causal=True)

        return call, inputs, torch.randn_like(inputs[0])

    inputs = _gsa_inputs(c, device, dtype)
    q, k, v, g, s = inputs
    if impl in ("flash_gsa-triton", "flash_gsa-chunk"):
        from flash_gsa import gsa

        backend = impl.split("-")[1]
        if backend == "triton":
            from flash_gsa.ops.gsa import _triton_backend

            if _triton_backend() is None:
                raise Skip("flash_gsa.ops.triton is not importable (is the triton package installed?)")

        def call():
            return gsa(q, k, v, g, s, scale=1.0, backend=backend)[0]
    elif impl == "fla-chunk_gsa":
        try:
            from fla.ops.gsa import chunk_gsa
        except ImportError as e:
            raise Skip(f"fla is not importable: {e}") from e

        def call():
            return chunk_gsa(q, k, v, s, g, scale=1.0)[0]
    else:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    return call, inputs, torch.randn(c.B, c.T, c.H, c.V, device=device, dtype=dtype)


def _op_record(impl: str, c: OpConfig, mode: str, **fields) -> dict[str, Any]:
    rec = dict(kind="op", impl=impl, mode=mode, **asdict(c), dtype="bfloat16", ms=None, tokens_per_s=None,
               peak_gib=None, first_call_s=None, flops=None, bytes=None, tflops=None, hbm_frac=None, status="ok",
               error=None)
    if impl == "sdpa-flash":
        heads, d = sdpa_shape(c.hidden)
        rec.update(H=heads, K=d, V=d, M=None)
    rec.update(fields)
    return rec


def _run_op_job(job: dict[str, Any], device, dtype) -> Iterator[dict[str, Any]]:
    import torch

    impl = job["impl"]
    for cd in job["configs"]:
        c = OpConfig(**cd)
        try:
            call, inputs, do = _make_op(impl, c, device, dtype)
        except Skip as e:
            for mode in job["modes"]:
                yield _op_record(impl, c, mode, status="skipped", error=str(e))
            continue
        except Exception as e:  # an input that cannot even be built is that record's error
            for mode in job["modes"]:
                yield _op_record(impl, c, mode, status="error", error=f"{type(e).__name__}: {e}")
            continue
        for mode in job["modes"]:
            if mode == "fwd":
                fn = call
            else:

                def fn(call=call, do=do):
                    call().backward(do)

            rec = _op_record(impl, c, mode, triton_cache=job.get("triton_cache"))
            try:
                for x in inputs:
                    x.grad = None
                rec["first_call_s"] = _first_call_s(fn, device)
                if not job.get("warmup_only"):
                    ms = _time_ms(fn, device, grad_to_none=inputs)
                    rec.update(ms=ms, tokens_per_s=c.B * c.T / (ms / 1e3), peak_gib=_peak_gib(fn, device, inputs))
            except NotImplementedError as e:
                rec.update(status="skipped", error=f"NotImplementedError: {e}")
            except torch.cuda.OutOfMemoryError as e:
                rec.update(status="error", error=f"OOM: {str(e).splitlines()[0]}")
            except Exception as e:  # one failing peer must not end the run
                rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            yield rec
            if rec["status"] != "ok" and device.type == "cuda":
                torch.cuda.empty_cache()
        del call, inputs, do
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _bind(f: Callable[..., Any], *args, **kwargs) -> Callable[[], Any]:
    return lambda: f(*args, **kwargs)


def _run_decode_job(job: dict[str, Any], device, dtype) -> Iterator[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    impl = job["impl"]
    if impl == "flash_gsa-decode":
        from flash_gsa.ops.triton.decode import fused_recurrent_gsa as ours
    elif impl == "fla-fused_recurrent_gsa":
        try:
            from fla.ops.gsa import fused_recurrent_gsa as theirs
        except ImportError as e:
            theirs = None
            missing = f"fla is not importable: {e}"
    else:
        raise ValueError(f"unknown decode impl {impl!r}; expected one of {DECODE_IMPLS}")
    for name, shape in job["shapes"].items():
        HQ, H, K, V, M = (shape[x] for x in ("HQ", "H", "K", "V", "M"))
        for B in job["batches"]:
            rec = dict(kind="decode", impl=impl, shape=name, B=B, T=1, HQ=HQ, H=H, K=K, V=V, M=M, dtype="bfloat16",
                       ms=None, host_us=None, first_call_s=None, bytes=decode_bytes(B, HQ, H, K, V, M),
                       hbm_frac=None, status="ok", error=None, triton_cache=job.get("triton_cache"))
            if impl == "fla-fused_recurrent_gsa" and theirs is None:
                rec.update(status="skipped", error=missing)
                yield rec
                continue
            try:
                torch.manual_seed(0)
                q = torch.randn(B, 1, HQ, K, device=device, dtype=dtype) * K**-0.25
                k = torch.randn(B, 1, H, K, device=device, dtype=dtype) * K**-0.25
                v = torch.randn(B, 1, H, V, device=device, dtype=dtype)
                g = F.logsigmoid(torch.randn(B, 1, H, M, device=device)) / GATE_NORMALIZER
                s = -torch.expm1(g)
                g, s = g.to(dtype), s.to(dtype)
                state = (torch.randn(B, H, K, M, device=device) * 0.1, torch.randn(B, H, M, V, device=device) * 0.1)
                if impl == "flash_gsa-decode":
                    fn = _bind(ours, q, k, v, g, s, 1.0, state, True, None, inplace=True)
                else:
                    fn = _bind(theirs, q, k, v, s, g, scale=1.0, initial_state=state, output_final_state=True)

                with torch.no_grad():
                    rec["first_call_s"] = _first_call_s(fn, device)
                    if not job.get("warmup_only"):
                        rec["ms"] = _time_ms(fn, device)
                        n = 100 if device.type == "cuda" else 3
                        _sync(device)
                        t0 = time.perf_counter()
                        for _ in range(n):
                            fn()
                        _sync(device)
                        rec["host_us"] = 1e6 * (time.perf_counter() - t0) / n
            except Exception as e:  # one failing peer must not end the run
                rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            yield rec


def _run_hbm_job(job: dict[str, Any], device) -> Iterator[dict[str, Any]]:
    import torch

    nbytes = job["nbytes"]
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), device)
    yield dict(kind="hbm", copy_bytes=nbytes, ms=ms, bytes_per_s=2 * nbytes / (ms / 1e3), status="ok", error=None)


def worker_main(job: dict[str, Any]) -> None:
    """Entry of a worker process: run one job and print one `@@{json}` line per record."""
    import torch

    device = torch.device(job["device"])
    dtype = torch.bfloat16
    kind = job["kind"]
    if kind == "op":
        records = _run_op_job(job, device, dtype)
    elif kind == "decode":
        records = _run_decode_job(job, device, dtype)
    elif kind == "hbm":
        records = _run_hbm_job(job, device)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    for rec in records:
        _emit(rec)


# ---- parent side ----------------------------------------------------------------------------------------------------


def _spawn(job: dict[str, Any], timeout_s: float, env: dict[str, str], log: Callable[[str], None]):
    """Run one worker; returns (records, failure message or None). Its other output is passed to `log`."""
    return run_worker("flash_gsa.bench.op", job, timeout_s, env, log)


def _worker_env(device: str, cache_dir: Path) -> dict[str, str]:
    return worker_env(device, cache_dir)


def _unavailable(impl: str) -> str | None:
    """Why a peer cannot run here, when that is known without starting a worker (fla not installed)."""
    if impl.startswith("fla-") and importlib.util.find_spec("fla") is None:
        return "fla is not importable: no module named 'fla' (install the fla-core wheel)"
    return None


def _key(rec: dict[str, Any]) -> tuple:
    if rec["kind"] == "op":
        return ("op", rec["impl"], rec["mode"], rec["hidden"], rec["B"], rec["T"])
    return ("decode", rec["impl"], rec["shape"], rec["B"])


def results_paths(results_dir: str | os.PathLike, slug: str, quick: bool = False) -> tuple[Path, Path]:
    """(JSON, PNG) paths of a device's op benchmark; a --quick run's names end in "-quick"."""
    name = f"op_{slug}" + ("-quick" if quick else "")
    d = Path(results_dir)
    return d / f"{name}.json", d / f"{name}.png"


def run_op_benchmark(
    results_dir: str | os.PathLike = REPO_ROOT / "benchmarks" / "results",
    *,
    quick: bool = False,
    impls: Sequence[str] = IMPLS,
    hiddens: Sequence[int] | None = None,
    seq_lens: Sequence[int] | None = None,
    modes: Sequence[str] = MODES,
    decode_impls: Sequence[str] = DECODE_IMPLS,
    decode_batches: Sequence[int] | None = None,
    timeout_s: float = 300.0,
    merge: bool = False,
    warmup_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the op benchmark (each impl in its own worker process) and write `op_<device>.json` and `.png`.

    Args:
        results_dir: where the JSON and PNG go.
        quick: tiny sizes (a smoke test that runs on the CPU through the chunk backend and Triton's interpreter).
        impls, modes: which training impls and modes to time ([] for none).
        hiddens, seq_lens: subsets of the configs (default: all of the chosen size class).
        decode_impls, decode_batches: the decoding step's impls and batch sizes ([] impls for none).
        timeout_s: wall-clock limit of each worker; whatever it has not finished becomes error records.
        merge: keep the records of an existing JSON that this run does not redo (split a long run into parts).
        warmup_only: only the first call of each shape (compilation, autotuning; fills the peers' Triton cache);
            nothing is written.
    Returns the results dict (as written).
    """
    import torch

    if not torch.cuda.is_available() and not quick:
        raise ValueError("the full-size benchmark needs CUDA; use quick=True (--quick) on the CPU")
    for name, given, allowed in (("impl", impls, IMPLS), ("mode", modes, MODES), ("decode impl", decode_impls,
                                                                                    DECODE_IMPLS)):
        bad = [x for x in given if x not in allowed]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; expected some of {allowed}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_HIDDEN_SHAPES if quick else HIDDEN_SHAPES
    tokens = QUICK_TOKENS if quick else TOKENS
    hiddens = list(shapes) if hiddens is None else list(hiddens)
    seq_lens = list(QUICK_SEQ_LENS if quick else SEQ_LENS) if seq_lens is None else list(seq_lens)
    for h in hiddens:
        if h not in shapes:
            raise ValueError(f"hidden {h} is not one of {list(shapes)}")
    for t in seq_lens:
        if t <= 0 or tokens % t:
            raise ValueError(f"T = {t} must divide the {tokens} tokens of a config")
    configs = [OpConfig(hidden=h, B=tokens // t, T=t, **shapes[h]) for h in hiddens for t in seq_lens]
    dshapes = QUICK_DECODE_SHAPES if quick else DECODE_SHAPES
    dbatches = list(QUICK_DECODE_BATCHES if quick else DECODE_BATCHES) if decode_batches is None else list(
        decode_batches)

    jobs: list[dict[str, Any]] = []
    if not warmup_only:
        jobs.append(dict(kind="hbm", nbytes=HBM_COPY_BYTES if device == "cuda" else HBM_COPY_BYTES // 16))
    for impl in impls:
        if modes and configs:
            jobs.append(dict(kind="op", impl=impl, configs=[asdict(c) for c in configs], modes=list(modes)))
    for impl in decode_impls:
        if dbatches:
            jobs.append(dict(kind="decode", impl=impl, shapes=dshapes, batches=dbatches))

    records: list[dict[str, Any]] = []
    hbm = None
    for job in jobs:
        job.update(device=device, warmup_only=warmup_only)
        why_not = _unavailable(job.get("impl", ""))
        if why_not:
            log(f"[bench op] {job['kind']} {job['impl']}: skipped ({why_not})")
            records.extend(dict(r, status="skipped", error=why_not) for r in _expected(job, configs, dshapes, dbatches))
            continue
        with tempfile.TemporaryDirectory(prefix="flash_gsa_triton_cache_") as fresh:
            # Ours compile into an empty cache (first_call_s is a cold start); peers share one across runs.
            ours = job.get("impl", "").startswith("flash_gsa")
            cache_dir = Path(fresh) if ours else PEER_CACHE_DIR
            job["triton_cache"] = "warm" if cache_dir.is_dir() and any(cache_dir.iterdir()) else "cold"
            log(f"[bench op] {job['kind']} {job.get('impl', '')} (Triton cache {job['triton_cache']}) ...")
            t0 = time.perf_counter()
            got, failure = _spawn(job, timeout_s, _worker_env(device, cache_dir), log)
            log(f"[bench op]   done in {time.perf_counter() - t0:.1f} s" + (f"; {failure}" if failure else ""))
        if job["kind"] == "hbm":
            hbm = got[0] if got else dict(kind="hbm", status="error", error=failure, bytes_per_s=None)
            continue
        records.extend(got)
        if failure:
            done = {_key(r) for r in got}
            for expected in _expected(job, configs, dshapes, dbatches):
                if _key(expected) not in done:
                    records.append(dict(expected, status="error", error=failure))

    if warmup_only:
        for r in records:
            log(f"[warm-up] {r['impl']:26s} {_describe(r):34s} first call {_fmt(r.get('first_call_s'), '.1f')} s"
                + (f"  {r['status']}: {r['error']}" if r["status"] != "ok" else ""))
        return {"records": records}

    json_path, png_path = results_paths(results_dir, device_slug(), quick)
    if merge and json_path.exists():
        old = read_json(json_path)
        new_keys = {_key(r) for r in records}
        records = [r for r in old.get("records", []) + old.get("decode", []) if _key(r) not in new_keys] + records
        if hbm is None or hbm.get("bytes_per_s") is None:
            hbm = old.get("hbm")
    bw = hbm.get("bytes_per_s") if hbm else None
    op_records = [r for r in records if r["kind"] == "op"]
    dec_records = [r for r in records if r["kind"] == "decode"]
    for r in op_records:
        _add_roofline(r, bw)
    for r in dec_records:
        if r.get("ms") and bw:
            r["hbm_frac"] = r["bytes"] / (r["ms"] / 1e3) / bw
    all_configs = sorted({OpConfig(**{f: r[f] for f in ("hidden", "B", "T")}, **shapes[r["hidden"]])
                          for r in op_records if r["hidden"] in shapes}, key=lambda c: (c.hidden, c.T))
    results = {
        "benchmark": "op",
        "stamp": stamp(),
        "settings": dict(quick=quick, dtype="bfloat16", tokens_per_config=tokens, gsa_scale=1.0,
                         gate="g = logsigmoid(randn) / 8, s = 1 - exp(g)", chunk_for_flops=CHUNK,
                         timing="triton.testing.do_bench median (L2 flushed before each repetition)"
                         if device == "cuda" else "wall-clock median (CPU)"),
        "hbm": hbm,
        "roofline": roofline(all_configs, bw),
        "records": op_records,
        "decode": dec_records,
        "notes": {
            "peak_gib": "peak allocated memory during one call minus the memory allocated just before it",
            "fwd": "training forward: inputs require grad, the output is dropped",
            "fwdbwd": "forward then o.backward(do); gradients reset to None between repetitions",
            "flops": "tensor-core work of chunked GSA (chunk 64, dense intra-chunk blocks); SDPA: causal half",
            "bytes": "what a fully fused implementation must move: inputs read, outputs and gradients written (bf16)",
            "hbm_frac": "bytes / time / measured copy bandwidth (hbm.bytes_per_s, bytes read + written)",
            "first_call_s": "first call of the shape and mode in a fresh worker (compile + autotune)",
            "decode": "B sequences, one token, state updated in place (fla writes a new state); ms: do_bench median "
                      "with L2 flushed; host_us: wall time per eager call in a loop",
        },
    }
    write_json(json_path, results)
    log(f"[bench op] wrote {json_path}")
    try:
        plot(results, png_path)
        log(f"[bench op] wrote {png_path}")
    except Exception as e:  # the JSON is the result; a plot failure is reported, not fatal
        log(f"[bench op] plot failed: {type(e).__name__}: {e}")
    return results


def _expected(job, configs, dshapes, dbatches) -> Iterator[dict[str, Any]]:
    """Placeholder records for everything a job should produce (filled in when its worker fails)."""
    if job["kind"] == "op":
        for c in configs:
            for mode in job["modes"]:
                yield _op_record(job["impl"], c, mode)
    elif job["kind"] == "decode":
        for name, sh in dshapes.items():
            for B in dbatches:
                yield dict(kind="decode", impl=job["impl"], shape=name, B=B, T=1, **sh, dtype="bfloat16", ms=None,
                           host_us=None, first_call_s=None, bytes=decode_bytes(B, **sh), hbm_frac=None)


def _add_roofline(r: dict[str, Any], bw: float | None) -> None:
    if r["impl"] == "sdpa-flash":
        f_fwd, f_bwd = sdpa_flops(r["B"], r["T"], r["H"], r["K"])
        b_fwd, b_all = sdpa_bytes(r["B"], r["T"], r["H"], r["K"])
    else:
        f_fwd, f_bwd = gsa_flops(r["B"], r["T"], r["H"], r["H"], r["K"], r["V"], r["M"])
        b_fwd, b_all = gsa_bytes(r["B"], r["T"], r["H"], r["H"], r["K"], r["V"], r["M"])
    fwd = r["mode"] == "fwd"
    r["flops"] = f_fwd if fwd else f_fwd + f_bwd
    r["bytes"] = b_fwd if fwd else b_all
    if r.get("ms"):
        r["tflops"] = r["flops"] / (r["ms"] / 1e3) / 1e12
        r["hbm_frac"] = r["bytes"] / (r["ms"] / 1e3) / bw if bw else None


# ---- reporting ------------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _describe(r: dict[str, Any]) -> str:
    if r["kind"] == "op":
        return f"hidden {r['hidden']} B={r['B']} T={r['T']} {r['mode']}"
    return f"decode {r['shape']} B={r['B']}"


def plot(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """ms vs T, one panel per (mode, hidden size), one line per impl (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    ok = [r for r in results["records"] if r["status"] == "ok" and r.get("ms")]
    hiddens = sorted({r["hidden"] for r in results["records"]}) or [0]
    fig, axes = plt.subplots(len(MODES), len(hiddens), figsize=(5.5 * len(hiddens), 7), squeeze=False)
    for i, mode in enumerate(MODES):
        for j, hidden in enumerate(hiddens):
            ax = axes[i][j]
            for impl in IMPLS:
                pts = sorted((r["T"], r["ms"]) for r in ok if r["impl"] == impl and r["mode"] == mode
                             and r["hidden"] == hidden)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ts = sorted({r["T"] for r in results["records"] if r["hidden"] == hidden})
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("T (B = tokens / T)")
            ax.set_ylabel("ms")
            ax.set_title(f"{mode}, hidden {hidden}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    st = results["stamp"]
    fig.suptitle(f"GSA op, {results['settings']['tokens_per_config']} tokens per config, bf16 — {st['device']} "
                 f"({st['commit'][:12]}, {st['date_utc'][:10]})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    return _fmt(r["ms"])


def render_markdown(results: dict[str, Any]) -> str:
    """README tables from a results dict (or JSON): op times and ratios, the roofline, the decoding step."""
    st = results["stamp"]
    ops = {(r["impl"], r["mode"], r["hidden"], r["T"]): r for r in results["records"]}
    impls = [i for i in IMPLS if any(k[0] == i for k in ops)]
    rows = sorted({(r["hidden"], r["T"], r["B"], r["mode"]) for r in results["records"]},
                  key=lambda x: (x[0], MODES.index(x[3]), x[1]))
    hbm = results.get("hbm") or {}
    out = [f"Device: {st['device']}; torch {st['torch']}, triton {st['triton']}; commit {st['commit'][:12]}; "
           f"{st['date_utc']}. bf16, {results['settings']['tokens_per_config']} tokens per config. "
           f"Measured copy bandwidth: {_fmt((hbm.get('bytes_per_s') or 0) / 1e12 or None)} TB/s.", ""]
    if rows:
        ratio_cols = [p for p in PEERS if p in impls] if OURS in impls else []
        out.append("| hidden | T | B | mode | " + " | ".join(f"{i} ms" for i in impls)
                   + "".join(f" | ours / {p}" for p in ratio_cols) + " | ours: TFLOP/s, HBM frac |")
        out.append("|---" * (4 + len(impls) + len(ratio_cols) + 1) + "|")
        for hidden, T, B, mode in rows:
            cells = [_cell(ops.get((i, mode, hidden, T))) for i in impls]
            mine = ops.get((OURS, mode, hidden, T))
            ratios = []
            for p in ratio_cols:
                peer = ops.get((p, mode, hidden, T))
                ok = mine and peer and mine.get("ms") and peer.get("ms")
                ratios.append(_fmt(mine["ms"] / peer["ms"], ".2f") if ok else "—")
            eff = f"{_fmt(mine.get('tflops'))}, {_fmt(mine.get('hbm_frac'), '.2f')}" if mine and mine.get("ms") else "—"
            out.append(f"| {hidden} | {T} | {B} | {mode} | " + " | ".join(cells)
                       + "".join(f" | {x}" for x in ratios) + f" | {eff} |")
        out.append("")
    if results.get("roofline"):
        out.append("| hidden | T | B | GFLOP fwd / bwd | GB fwd / fwd+bwd | floor ms fwd / fwd+bwd |")
        out.append("|---|---|---|---|---|---|")
        for r in results["roofline"]:
            out.append(f"| {r['hidden']} | {r['T']} | {r['B']} "
                       f"| {r['flops_fwd'] / 1e9:.3g} / {r['flops_bwd'] / 1e9:.3g}"
                       f" | {r['bytes_fwd'] / 1e9:.3g} / {r['bytes_fwdbwd'] / 1e9:.3g}"
                       f" | {_fmt(r['floor_ms_fwd'])} / {_fmt(r['floor_ms_fwdbwd'])} |")
        out.append("")
    dec = {(r["impl"], r["shape"], r["B"]): r for r in results.get("decode", [])}
    if dec:
        out.append("| decode shape | B | " + " | ".join(f"{i} µs (host µs)" for i in DECODE_IMPLS)
                   + " | ours / fla | ours: HBM frac |")
        out.append("|---" * (4 + len(DECODE_IMPLS)) + "|")
        for shape, B in sorted({(k[1], k[2]) for k in dec}, key=lambda x: (list(DECODE_SHAPES).index(x[0])
                                                                            if x[0] in DECODE_SHAPES else 99, x[1])):
            cells = []
            for i in DECODE_IMPLS:
                r = dec.get((i, shape, B))
                if r is None or r["status"] != "ok":
                    cells.append("—" if r is None else r["status"])
                else:
                    cells.append(f"{_fmt(r['ms'] * 1e3)} ({_fmt(r['host_us'])})")
            a, b = dec.get((DECODE_IMPLS[0], shape, B)), dec.get((DECODE_IMPLS[1], shape, B))
            ratio = _fmt(a["ms"] / b["ms"], ".2f") if a and b and a.get("ms") and b.get("ms") else "—"
            frac = _fmt(a.get("hbm_frac"), ".2f") if a else "—"
            out.append(f"| {shape} | {B} | " + " | ".join(cells) + f" | {ratio} | {frac} |")
        out.append("")
    return "\n".join(out)


def summary_table(results: dict[str, Any]) -> str:
    """A compact plain-text table for the end of a log: every record, its time and its status."""
    lines = [f"{'impl':26s} {'config':34s} {'ms':>9s} {'tok/s':>9s} {'peak GiB':>8s} {'first s':>7s} {'HBM':>5s}"]
    for r in results["records"] + results.get("decode", []):
        tps = r.get("tokens_per_s")
        line = (f"{r['impl']:26s} {_describe(r):34s} {_fmt(r.get('ms')):>9s} "
                f"{_fmt(tps / 1e6 if tps else None, '.3g') + ('M' if tps else ''):>9s} "
                f"{_fmt(r.get('peak_gib')):>8s} {_fmt(r.get('first_call_s'), '.1f'):>7s} "
                f"{_fmt(r.get('hbm_frac'), '.2f'):>5s}")
        if r["status"] != "ok":
            line += f"  {r['status']}: {(r.get('error') or '')[:90]}"
        lines.append(line)
    hbm = results.get("hbm") or {}
    lines.append(f"copy bandwidth {_fmt((hbm.get('bytes_per_s') or 0) / 1e12 or None)} TB/s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gsa bench op", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes; runs on the CPU (smoke test)")
    p.add_argument("--results-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated; '' for none")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--hidden", default=None, help="comma-separated hidden sizes (default: all)")
    p.add_argument("--seq-lens", default=None, help="comma-separated T values (default: all)")
    p.add_argument("--decode-impls", default=",".join(DECODE_IMPLS), help="comma-separated; '' for none")
    p.add_argument("--decode-batches", default=None, help="comma-separated batch sizes (default: 1,64)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per worker (one impl)")
    p.add_argument("--merge", action="store_true", help="keep records of an existing JSON that this run does not redo")
    p.add_argument("--warmup-only", action="store_true", help="first calls only (compile/autotune); writes nothing")
    p.add_argument("--markdown", action="store_true", help="also print the README tables")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        worker_main(json.loads(a.worker))
        return 0

    def items(text: str | None, conv=str):
        return None if text is None else [conv(x) for x in text.split(",") if x.strip()]

    try:
        results = run_op_benchmark(
            a.results_dir, quick=a.quick, impls=items(a.impls), hiddens=items(a.hidden, int),
            seq_lens=items(a.seq_lens, int), modes=items(a.modes), decode_impls=items(a.decode_impls),
            decode_batches=items(a.decode_batches, int), timeout_s=a.timeout, merge=a.merge,
            warmup_only=a.warmup_only,
        )
    except ValueError as e:
        p.error(str(e))
    if a.warmup_only:
        return 0
    if a.markdown:
        print(render_markdown(results))
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

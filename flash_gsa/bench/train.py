"""`gsa bench train`: tokens/s of a full training step of our `GSAForCausalLM` against fla's and a Llama's.

Run as a script: `python -m flash_gsa.bench.train [--quick] [...]` (see `--help`), or call `run_train_benchmark`.

The target (issue): on an H100 in bf16, the 340m preset at T=4096 trains at >= 1.3x the tokens/s of fla 0.6.0's
`GSAForCausalLM` of the same shape and >= the tokens/s of a Llama of the same size (transformers, SDPA attention),
the peers timed in the same run.

The models (`model_kwargs`; the JSON's "models" holds every keyword each was built with):

- "flash_gsa": `flash_gsa.models.GSAForCausalLM(GSAConfig(vocab_size=V, **preset["model"]))` with the preset's model
  fields (340m: hidden 1024, 24 layers, 4 heads, 64 slots, gate_logit_normalizer 8, SwiGLU 2816) and V = 32000 by
  default (`--vocab`). On CUDA its GSA layers run the Triton backend, on the CPU the PyTorch chunk backend.
- "fla-GSAForCausalLM": `fla.models.GSAForCausalLM` (fla 0.6.0) with every architectural knob set to ours
  (`fla_config_kwargs`): same widths, heads, slots, normalizer, intermediate size, vocabulary, swish feature map, no
  short convolution, no output gate, RMSNorm on the output (use_norm) with weights, norm eps, untied embeddings,
  expand_k = expand_v = 1 (fla's keywords are spelled `exapnd_k`, `exapnd_v`). Same parameter count as ours. fla's
  own implementation switches stay at its defaults (fused RMSNorm, fused SwiGLU, fused cross-entropy; not the fused
  linear cross-entropy): they are how fla trains, and they change no weight. What still differs: the weight init (fla:
  N(0, 0.02) everywhere; ours: Xavier for q, k, v, f and scaled residual projections), which does not change the
  work of a step. fla's kernels are Triton GPU kernels: without CUDA it is recorded as "skipped".
- "llama-sdpa": `transformers.LlamaForCausalLM` with `attn_implementation="sdpa"`: same hidden size, layers,
  intermediate size, vocabulary, norm eps and untied embeddings; hidden / 64 heads of head dim 64 (16 heads at
  hidden 1024; no grouped-query attention), RoPE theta 10000, no biases. On CUDA, SDPA may use the flash,
  memory-efficient or cuDNN kernels but not the math fallback (`sdpa_kernel`), so a slow fallback cannot flatter us.

One training step, the same for every model: `loss = model(input_ids=x, labels=x).loss` (next-token cross-entropy
over B*T random tokens, the same batch every step) under `torch.autocast("cuda", torch.bfloat16)` with fp32
parameters on CUDA (plain fp32 on the CPU); `loss.backward()`; `AdamW.step()` (lr 1e-4, weight decay 0.01, betas
(0.9, 0.95), `fused=True` on CUDA; all parameters decayed); `zero_grad(set_to_none=True)`. No gradient clipping, no
gradient accumulation, no activation checkpointing, no torch.compile.

Timing, in a fresh worker process per model: `--warmup` steps (default 3) untimed except the first, whose wall time
(synchronized) is `first_step_s` (compilation and autotuning); then `--steps` steps (default 10), each timed alone with
CUDA events (wall clock on the CPU) and synchronized after. `step_ms` is their median, `tokens_per_s` = B * T /
step_ms (B = 4, T = 4096 by default). `peak_gib` is `torch.cuda.max_memory_allocated()` over the timed steps after
`reset_peak_memory_stats()`: parameters, gradients, AdamW state and activations together. `params` counts every
parameter (embedding and LM head included), `params_non_embedding` leaves those two out.
Ratios: "vs_fla" = ours / fla tokens/s, "vs_llama" = ours / llama tokens/s, beside their targets 1.3 and 1.0.

Every model runs in its own worker with a time limit (`--timeout-s`, default 540 s): one that is missing, fails,
runs out of memory or hangs becomes a record with status "skipped", "error" or "timeout" (and the reason) and the run
goes on. Our worker compiles into an empty Triton cache (its first_step_s is a cold start); the peers share a cache
directory across runs (`flash_gsa.bench.record.PEER_CACHE_DIR`), where fla also keeps its autotuning results
(FLA_CACHE_RESULTS, on by default). fla autotunes every kernel on first use: at this shape its first step once ran
past 9 minutes on an H100. `--warmup-only` runs just each model's first step, filling that cache for a later timed run
on the same machine, and writes the first-step seconds to `train_<device-slug>-warmup.json`.

Output: `<results-dir>/train_<device-slug>.json` and `.png` (a bar chart of tokens/s), `train_<device-slug>-quick.*`
for --quick (2 layers, hidden 128, 4 heads, 16 slots, vocabulary 1024, T=256, B=2, 1 warm-up and 2 timed steps: a
CPU smoke test); `render_markdown` turns the JSON into the README table.
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
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .record import (
    PEER_CACHE_DIR,
    REPO_ROOT,
    Skip,
    device_slug,
    emit_record,
    run_worker,
    stamp,
    worker_env,
    write_json,
)

OURS = "flash_gsa"
FLA = "fla-GSAForCausalLM"
LLAMA = "llama-sdpa"
IMPLS = (OURS, FLA, LLAMA)
PRESET = "340m"
SEQ_LEN, BATCH, STEPS, WARMUP, VOCAB = 4096, 4, 10, 3, 32000
TIMEOUT_S = 540.0
TARGETS = {"vs_fla": 1.3, "vs_llama": 1.0}
TARGET_SETTING = "H100, bf16, the 340m preset, T=4096"
LLAMA_HEAD_DIM = 64
LR, WEIGHT_DECAY, BETAS = 1e-4, 0.01, (0.9, 0.95)
# --quick: a model and batch that the CPU gets through in seconds.
QUICK_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_heads=4, num_slots=16, gate_logit_normalizer=8,
                   intermediate_size=352, mixer="gsa")
QUICK_SEQ_LEN, QUICK_BATCH, QUICK_STEPS, QUICK_WARMUP, QUICK_VOCAB = 256, 2, 2, 1, 1024
WORKER_LOG_TAIL = 8  # lines of a failed worker's output kept in its record's reason
RECORD_FIELDS = ("impl", "status", "B", "T", "params", "params_non_embedding", "step_ms", "tokens_per_s", "peak_gib",
                 "first_step_s", "reason")


# ---- the three models' configurations -------------------------------------------------------------------------------


def preset_model_fields(preset: str = PRESET, quick: bool = False) -> dict[str, Any]:
    """Our GSAConfig fields (all but vocab_size) of a shipped preset, or the --quick model."""
    if quick:
        return dict(QUICK_MODEL)
    from ..train.config import load_preset

    return dict(load_preset(preset).model)


def ours_config(fields: dict[str, Any], vocab: int):
    """Our resolved `GSAConfig` (defaults filled in) for the preset's fields and a vocabulary size."""
    from ..models import GSAConfig

    cfg = GSAConfig(vocab_size=vocab, **fields)
    if cfg.mixer != "gsa" or cfg.attn_layers:
        raise ValueError(f"the training benchmark compares GSA models: the model must have mixer 'gsa' and no "
                         f"attention layers, got mixer {cfg.mixer!r}, attn_layers {cfg.attn_layers}")
    return cfg


def fla_config_kwargs(cfg) -> dict[str, Any]:
    """`fla.models.GSAConfig` keywords with every architectural knob of our `GSAConfig` `cfg`."""
    if cfg.feature_map not in ("swish", "relu"):
        raise ValueError(f"fla's GSA has no feature map {cfg.feature_map!r} (it has swish, relu and t2r)")
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        num_slots=cfg.num_slots,
        gate_logit_normalizer=cfg.gate_logit_normalizer,
        clamp_min=None,
        clamp_max=None,
        intermediate_size=cfg.intermediate_size,
        hidden_act="swish",  # SwiGLU MLP, as ours
        feature_map=cfg.feature_map,
        use_short_conv=cfg.use_short_conv,
        conv_size=cfg.conv_size,
        exapnd_k=1,  # sic: fla 0.6.0's keyword; head k dim = hidden / heads, as ours
        exapnd_v=1,
        use_output_gate=False,  # ours: o_proj(RMSNorm(silu(o))), no output gate
        use_norm=True,
        elementwise_affine=True,
        norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn=None,  # no softmax-attention layers
        attnres_block_size=None,
        use_l2warp=False,
        use_cache=False,
        # fla's implementation switches, at its defaults:
        fuse_norm=True,
        fuse_swiglu=True,
        fuse_cross_entropy=True,
        fuse_linear_cross_entropy=False,
    )


def llama_config_kwargs(cfg, seq_len: int) -> dict[str, Any]:
    """`transformers.LlamaConfig` keywords of a Llama the size of our `GSAConfig` `cfg`: head dim 64."""
    if cfg.hidden_size % LLAMA_HEAD_DIM:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of the Llama head dim {LLAMA_HEAD_DIM}")
    heads = cfg.hidden_size // LLAMA_HEAD_DIM
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=LLAMA_HEAD_DIM,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=max(seq_len, cfg.max_position_embeddings),
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation="sdpa",
    )


def model_kwargs(fields: dict[str, Any], vocab: int, seq_len: int) -> dict[str, dict[str, Any]]:
    """The keywords each impl's config is built from: ours (GSAConfig), fla's GSAConfig, LlamaConfig."""
    cfg = ours_config(fields, vocab)
    ours = dict(vocab_size=vocab, **fields)
    return {OURS: ours, FLA: fla_config_kwargs(cfg), LLAMA: llama_config_kwargs(cfg, seq_len)}


MAPPING_NOTES = [
    "fla: same widths, heads, slots, gate normalizer, intermediate size, vocabulary, feature map, short conv (none), "
    "output norm, norm eps and untied embeddings as ours; no output gate; same parameter count",
    "fla: its fused RMSNorm, fused SwiGLU and fused cross-entropy stay on (fla's defaults); the fused linear "
    "cross-entropy stays off (its default)",
    "fla: weight init differs (N(0, 0.02) everywhere; ours Xavier on q, k, v, f and scaled residual projections): the "
    "step's work is the same",
    "llama: hidden / 64 heads of head dim 64 (16 at hidden 1024), no GQA, RoPE theta 10000, SwiGLU of the same "
    "intermediate size, SDPA attention (flash / memory-efficient / cuDNN on CUDA; the math fallback is not allowed)",
]


# ---- worker side: everything below runs inside a worker process -----------------------------------------------------


def _fla_unavailable(device) -> str | None:
    """Why fla's model cannot train here, when that is known before building it."""
    if device.type != "cuda":
        return "fla's kernels are Triton GPU kernels: they need a CUDA device (there is none here)"
    if importlib.util.find_spec("fla") is None:
        return "fla is not importable: no module named 'fla' (install the fla-core and flash-linear-attention wheels)"
    return None


def build_model(impl: str, job: dict[str, Any], device):
    """The impl's model, built on `device` in fp32 from the job's config keywords. Raises Skip when unavailable."""
    import torch

    kwargs = dict(job["models"][impl])
    if impl == OURS:
        from ..models import GSAConfig, GSAForCausalLM

        cls, cfg = GSAForCausalLM, GSAConfig(**kwargs)
    elif impl == FLA:
        why = _fla_unavailable(device)
        if why:
            raise Skip(why)
        try:
            from fla.models import GSAConfig as FlaGSAConfig
            from fla.models import GSAForCausalLM as FlaGSAForCausalLM
        except ImportError as e:
            raise Skip(f"fla.models is not importable: {e}") from e
        cls, cfg = FlaGSAForCausalLM, FlaGSAConfig(**kwargs)
    elif impl == LLAMA:
        from transformers import LlamaConfig, LlamaForCausalLM

        cls, cfg = LlamaForCausalLM, LlamaConfig(**kwargs)
    else:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg)
    return model.to(device=device, dtype=torch.float32).train()


def count_params(model) -> tuple[int, int]:
    """(all parameters, all but the input embedding and the LM head)."""
    total = sum(p.numel() for p in model.parameters())
    mods = (model.get_input_embeddings(), model.get_output_embeddings())
    emb = {id(m.weight): m.weight.numel() for m in mods if m is not None}  # a tied weight counts once
    return total, total - sum(emb.values())


def _step_fn(impl: str, model, job: dict[str, Any], device) -> Callable[[], Any]:
    """One training step (forward with labels, backward, AdamW, zero_grad); returns the detached loss."""
    import contextlib
    import functools

    import torch

    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS,
                            fused=True if cuda else None)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, job["vocab"], (job["B"], job["T"]), generator=gen).to(device)
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext
    if impl == LLAMA and cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        attention = functools.partial(sdpa_kernel, backends)
    else:
        attention = contextlib.nullcontext
    kwargs = {"use_cache": False}

    def step():
        with attention(), autocast():
            loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_record(impl: str, job: dict[str, Any], **fields) -> dict[str, Any]:
    rec = dict(impl=impl, status="ok", B=job["B"], T=job["T"], params=None, params_non_embedding=None, step_ms=None,
               tokens_per_s=None, peak_gib=None, first_step_s=None, reason=None, step_ms_all=None, loss_first=None,
               loss_last=None, triton_cache=job.get("triton_cache"))
    rec.update(fields)
    return rec


def run_train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: build one model, run its steps, return its record (status ok / skipped / error)."""
    import torch

    impl, device = job["impl"], torch.device(job["device"])
    rec = train_record(impl, job)
    try:
        model = build_model(impl, job, device)
        rec["params"], rec["params_non_embedding"] = count_params(model)
        step = _step_fn(impl, model, job, device)
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        rec["first_step_s"] = time.perf_counter() - t0
        rec["loss_first"] = float(loss)
        if not job["warmup_only"]:
            for _ in range(job["warmup"] - 1):
                step()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(job["steps"]):
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    loss = step()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    loss = step()
                    times.append(1e3 * (time.perf_counter() - t0))
            ms = statistics.median(times)
            rec.update(step_ms=ms, step_ms_all=times, tokens_per_s=job["B"] * job["T"] / (ms / 1e3),
                       loss_last=float(loss))
            if device.type == "cuda":
                rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if not all(math.isfinite(x) for x in (rec["loss_first"], rec["loss_last"] or 0.0)):
            rec.update(status="error", reason=f"non-finite loss: first {rec['loss_first']}, last {rec['loss_last']}")
    except Skip as e:
        rec.update(status="skipped", reason=str(e))
    except torch.cuda.OutOfMemoryError as e:
        rec.update(status="error", reason=f"OOM: {str(e).splitlines()[0]}")
    except Exception as e:  # one failing model must not end the run
        rec.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return rec


def worker_main(job: dict[str, Any]) -> None:
    """Entry of a worker process: one model, one `@@{json}` record on stdout."""
    emit_record(run_train_job(job))


# ---- parent side ----------------------------------------------------------------------------------------------------


def results_paths(results_dir: str | os.PathLike, slug: str, quick: bool = False,
                  warmup_only: bool = False) -> tuple[Path, Path]:
    """(JSON, PNG) paths of a device's training benchmark: `train_<slug>[-quick][-warmup].json` and `.png`."""
    name = f"train_{slug}" + ("-quick" if quick else "") + ("-warmup" if warmup_only else "")
    d = Path(results_dir)
    return d / f"{name}.json", d / f"{name}.png"


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    ok = a and b and a["status"] == "ok" and b["status"] == "ok" and a["tokens_per_s"] and b["tokens_per_s"]
    return a["tokens_per_s"] / b["tokens_per_s"] if ok else None


def run_train_benchmark(
    results_dir: str | os.PathLike = REPO_ROOT / "benchmarks" / "results",
    *,
    quick: bool = False,
    impls: Sequence[str] = IMPLS,
    preset: str = PRESET,
    batch: int | None = None,
    seq_len: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    vocab: int | None = None,
    timeout_s: float = TIMEOUT_S,
    warmup_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the training benchmark (each model in its own worker process) and write its JSON and PNG.

    Args:
        results_dir: where `train_<device-slug>.json` and `.png` go.
        quick: the tiny model and batch of the CPU smoke test (`-quick` in the file names); `preset` is not read.
        impls: which models to run, some of IMPLS.
        preset: the shipped preset whose model fields are ours (and the peers' shape).
        batch, seq_len, steps, warmup, vocab: B, T, timed steps, warm-up steps (the first is `first_step_s`) and
            vocabulary size; None = 4, 4096, 10, 3, 32000 (quick: 2, 256, 2, 1, 1024).
        timeout_s: wall-clock limit of each worker; one that overruns becomes a "timeout" record.
        warmup_only: only each model's first step (compilation, autotuning; fills the peers' Triton cache); writes
            `train_<device-slug>-warmup.json` (no PNG).
    Returns the results dict (as written).
    """
    import torch

    impls = list(impls)
    bad = [x for x in impls if x not in IMPLS]
    if bad:
        raise ValueError(f"unknown impl(s) {bad}; expected some of {list(IMPLS)}")
    if not impls:
        raise ValueError(f"no impl to run; expected some of {list(IMPLS)}")
    B = _positive("batch", batch if batch is not None else (QUICK_BATCH if quick else BATCH))
    T = _positive("seq_len", seq_len if seq_len is not None else (QUICK_SEQ_LEN if quick else SEQ_LEN), 2)
    n_steps = _positive("steps", steps if steps is not None else (QUICK_STEPS if quick else STEPS))
    n_warmup = _positive("warmup", warmup if warmup is not None else (QUICK_WARMUP if quick else WARMUP))
    V = _positive("vocab", vocab if vocab is not None else (QUICK_VOCAB if quick else VOCAB), 2)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    fields = preset_model_fields(preset, quick)
    if not torch.cuda.is_available() and not quick:
        raise ValueError("the full-size benchmark needs CUDA; use quick=True (--quick) on the CPU")
    models = model_kwargs(fields, V, T)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    records: list[dict[str, Any]] = []
    for impl in impls:
        job = dict(impl=impl, device=device, B=B, T=T, vocab=V, steps=n_steps, warmup=n_warmup,
                   warmup_only=warmup_only, models=models)
        why_not = _fla_unavailable(torch.device(device)) if impl == FLA else None
        if why_not:
            log(f"[bench train] {impl}: skipped ({why_not})")
            records.append(train_record(impl, job, status="skipped", reason=why_not))
            continue
        with tempfile.TemporaryDirectory(prefix="flash_gsa_triton_cache_") as fresh:
            # Ours compile into an empty cache (first_step_s is a cold start); peers share one across runs.
            cache_dir = Path(fresh) if impl == OURS else PEER_CACHE_DIR
            job["triton_cache"] = "warm" if cache_dir.is_dir() and any(cache_dir.iterdir()) else "cold"
            log(f"[bench train] {impl} B={B} T={T} (Triton cache {job['triton_cache']}) ...")
            tail: deque[str] = deque(maxlen=WORKER_LOG_TAIL)

            def worker_log(line: str, tail=tail) -> None:
                tail.append(line.strip())
                log(line)

            t0 = time.perf_counter()
            got, failure = run_worker("flash_gsa.bench.train", job, timeout_s, worker_env(device, cache_dir),
                                      worker_log, label=impl)
            log(f"[bench train]   done in {time.perf_counter() - t0:.1f} s" + (f"; {failure}" if failure else ""))
        if got:
            rec = got[0]
        else:
            status = "timeout" if failure and failure.startswith("timeout") else "error"
            reason = failure or "the worker returned no record"
            if status == "error" and tail:
                reason += "; last output: " + " | ".join(tail)
            if status == "timeout" and impl == FLA and not warmup_only:
                reason += " (fla autotunes its kernels on its first step: run --warmup-only first on this machine)"
            rec = train_record(impl, job, status=status, reason=reason)
        if rec["status"] != "ok":
            log(f"[bench train]   {impl}: {rec['status']}: {rec['reason']}")
        records.append(rec)

    by_impl = {r["impl"]: r for r in records}
    ours = by_impl.get(OURS)
    ratios = {"vs_fla": _ratio(ours, by_impl.get(FLA)), "vs_llama": _ratio(ours, by_impl.get(LLAMA))}
    name = stamp()
    at_target = (device == "cuda" and "h100" in name["device"].lower() and not quick and preset == PRESET
                 and T == SEQ_LEN)
    results = {
        "benchmark": "train-warmup" if warmup_only else "train",
        "stamp": name,
        "settings": dict(
            quick=quick, preset=None if quick else preset, B=B, T=T, vocab=V, steps=n_steps, warmup=n_warmup,
            warmup_only=warmup_only, timeout_s=timeout_s,
            precision="bf16 autocast, fp32 parameters" if device == "cuda" else "fp32",
            optimizer=f"AdamW lr {LR}, weight decay {WEIGHT_DECAY}, betas {list(BETAS)}"
                      + (", fused" if device == "cuda" else ""),
            timing="CUDA events per step, median" if device == "cuda" else "wall clock per step, median",
            llama_head_dim=LLAMA_HEAD_DIM,
        ),
        "models": models,
        "mapping_notes": MAPPING_NOTES,
        "records": records,
        "ratios": ratios,
        "targets": dict(TARGETS),
        "targets_met": {k: (None if v is None else v >= TARGETS[k]) for k, v in ratios.items()},
        "at_target_setting": at_target,
        "target_setting": TARGET_SETTING,
        "notes": {
            "step": "forward with labels (loss), backward, AdamW step, zero_grad(set_to_none=True)",
            "step_ms": "median of the timed steps (each synchronized)",
            "tokens_per_s": "B * T / step_ms",
            "peak_gib": "torch.cuda.max_memory_allocated() over the timed steps, after reset_peak_memory_stats()",
            "first_step_s": "wall time of the first step in a fresh worker (compile + autotune; our Triton cache is "
                            "empty, the peers' is shared across runs)",
            "ratios": "ours / peer tokens/s; targets_met compares them with targets, which are set for "
                      + TARGET_SETTING + " (at_target_setting says whether this run is that setting)",
        },
    }
    json_path, png_path = results_paths(results_dir, device_slug(), quick, warmup_only)
    write_json(json_path, results)
    log(f"[bench train] wrote {json_path}")
    if not warmup_only:
        try:
            plot(results, png_path)
            log(f"[bench train] wrote {png_path}")
        except Exception as e:  # the JSON is the result; a plot failure is reported, not fatal
            log(f"[bench train] plot failed: {type(e).__name__}: {e}")
    return results


# ---- reporting ------------------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _params(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}M"


def plot(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bar chart: tokens/s per model (records that did not run are marked with their status)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = results["records"]
    names = [r["impl"] for r in recs]
    values = [r["tokens_per_s"] if r["status"] == "ok" and r["tokens_per_s"] else 0.0 for r in recs]
    colors = ["tab:red" if n == OURS else "tab:blue" if n == FLA else "tab:gray" for n in names]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(names, [v / 1e3 for v in values], color=colors)
    top = max(values, default=0.0) / 1e3 or 1.0
    ours = next((r for r in recs if r["impl"] == OURS), None)
    for bar, r, v in zip(bars, recs, values, strict=True):
        if r["status"] != "ok":
            label = r["status"]
        else:
            label = f"{v / 1e3:.3g}k"
            ratio = _ratio(ours, r) if r["impl"] != OURS else None
            label += f"\nours / this {ratio:.2f}x" if ratio else ""
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.02 * top, label, ha="center", va="bottom",
                fontsize=9)
    ax.set_ylim(0, top * 1.3)
    ax.set_ylabel("thousand tokens / s (full training step)")
    st, s = results["stamp"], results["settings"]
    model = "quick model" if s["quick"] else f"{s['preset']} preset"
    ax.set_title(f"Training throughput, {model}, B={s['B']} T={s['T']}, {s['precision']}\n{st['device']} "
                 f"({st['commit'][:12]}, {st['date_utc'][:10]})", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_markdown(results: dict[str, Any]) -> str:
    """The README table from a results dict (or its JSON): one row per model, then the ratios and their targets."""
    st, s = results["stamp"], results["settings"]
    model = "The quick model" if s["quick"] else f"The {s['preset']} preset"
    warm = f"{s['warmup']} warm-up step" + ("s" if s["warmup"] != 1 else "")
    out = [f"Device: {st['device']}; torch {st['torch']}, triton {st['triton']}; commit {st['commit'][:12]}; "
           f"{st['date_utc']}. {model}, vocabulary {s['vocab']}, B={s['B']}, T={s['T']}, {s['precision']}; median of "
           f"{s['steps']} timed steps after {warm}.", ""]
    out.append("| model | params | status | step ms | tokens/s | peak GiB | first step s | ours / model |")
    out.append("|---|---|---|---|---|---|---|---|")
    by_impl = {r["impl"]: r for r in results["records"]}
    for r in results["records"]:
        ratio = _ratio(by_impl.get(OURS), r) if r["impl"] != OURS else None
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('reason') or '')[:100]}"
        out.append(f"| {r['impl']} | {_params(r.get('params'))} | {status} | {_fmt(r.get('step_ms'), '.1f')} "
                   f"| {_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('peak_gib'))} "
                   f"| {_fmt(r.get('first_step_s'), '.1f')} | {_fmt(ratio, '.2f')} |")
    out.append("")
    ratios, met = results.get("ratios") or {}, results.get("targets_met") or {}
    for key, peer in (("vs_fla", FLA), ("vs_llama", LLAMA)):
        if key not in ratios:
            continue
        verdict = "—" if met.get(key) is None else ("met" if met[key] else "not met")
        ratio = "—" if ratios[key] is None else f"{ratios[key]:.2f}x"
        out.append(f"- ours / {peer}: {ratio} (target >= {results['targets'][key]}: {verdict})")
    if not results.get("at_target_setting"):
        out.append(f"- the targets are set for {results.get('target_setting', TARGET_SETTING)}: this run is not that "
                   "setting")
    out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gsa bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and batch; runs on the CPU (smoke test)")
    p.add_argument("--results-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, some of {','.join(IMPLS)}")
    p.add_argument("--preset", default=PRESET, help="the preset whose model fields are ours (default 340m)")
    p.add_argument("--batch", type=int, default=None, help=f"B (default {BATCH}; --quick {QUICK_BATCH})")
    p.add_argument("--seq-len", type=int, default=None, help=f"T (default {SEQ_LEN}; --quick {QUICK_SEQ_LEN})")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps (default {STEPS}; --quick {QUICK_STEPS})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps before them, the first timed as first_step_s (default {WARMUP}; --quick "
                        f"{QUICK_WARMUP})")
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary size (default {VOCAB}; --quick {QUICK_VOCAB})")
    p.add_argument("--timeout-s", type=float, default=TIMEOUT_S, help="seconds per worker (one model)")
    p.add_argument("--warmup-only", action="store_true",
                   help="first steps only (compile/autotune, fills the peers' Triton cache); writes *-warmup.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        worker_main(json.loads(a.worker))
        return 0
    try:
        results = run_train_benchmark(
            a.results_dir, quick=a.quick, impls=[x.strip() for x in a.impls.split(",") if x.strip()],
            preset=a.preset, batch=a.batch, seq_len=a.seq_len, steps=a.steps, warmup=a.warmup, vocab=a.vocab,
            timeout_s=a.timeout_s, warmup_only=a.warmup_only,
        )
    except ValueError as e:
        p.error(str(e))
    if a.warmup_only:
        for r in results["records"]:
            print(f"[warm-up] {r['impl']:20s} first step {_fmt(r.get('first_step_s'), '.1f')} s  {r['status']}"
                  + (f": {r['reason']}" if r["status"] != "ok" else ""))
        return 0
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

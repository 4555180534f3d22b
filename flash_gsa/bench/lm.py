"""`gsa bench lm`: language-model quality of the token mixers, trained on the same tokens.

What is measured, per mixer (`--mixers`, default gsa gla attention):

- Training: a fresh `GSAForCausalLM` from the `--preset` (default 30m) with `model.mixer` set to the mixer, trained by
  `flash_gsa.train.train` for `--steps` optimizer steps (default 1500). Every mixer gets the same config apart from
  the mixer (same seed, so the same shuffled data order and the same number of tokens; `--set key=value` overrides
  apply to all), tokenizer `--tokenizer` (default byte), bf16 autocast on CUDA and fp32 on the CPU, as `gsa train`
  does. The learning rate warms up over the preset's `warmup_steps` (500 at 30m) and decays to `min_lr_ratio` at
  `--steps`.
- `tokens_per_s`: training throughput of the optimizer steps themselves (the training loop's own timer: no
  validation, checkpoint or start-up time), from the run's metrics log, measured from the first logged step on, so
  the first `log_every` steps (CUDA/Triton compilation and autotuning) are excluded; `tokens_per_s_all` includes them;
  `mfu` = tokens_per_s x the loop's FLOPs per token / the GPU's bf16 peak (None on the CPU).
- `peak_mem_gib`: `torch.cuda.max_memory_allocated` over the training run (model, optimizer, activations), reset
  before each run; None on the CPU.
- `final_train_loss`: the training loss of the last step (mean NLL per token, nats, on that step's batch);
  `train_loss_tail`: the mean of the logged losses over the last 10% of the steps; `val_loss_train_mix`: the
  training loop's own final validation on rows of the training files it never trained on.
- `heldout`: perplexity (`flash_gsa.eval.perplexity`) of the final model on two held-out sets, in non-overlapping
  windows of the training seq_len, documents packed as in training: `wiki` = every `--heldout-every`-th (default 20th)
  Wikipedia summary (never trained on; also any training document with the same text is dropped), `austen` = Jane
  Austen's six novels (not in the training data at all: an out-of-domain test). Perplexity is per token; with the byte
  tokenizer `bits_per_byte` is per UTF-8 byte.

Data (prepared once into `<work-dir>/data-...`, with a manifest): training = the GCIDE dictionary (1913 Webster's,
cut into documents of about 1 MB at blank lines) + the Wikipedia summaries except the held-out slice; held-out = that
slice and Austen. Output: `<results-dir>/lm_<device-slug>[-quick].json` (rewritten after each mixer, so a run cut
short keeps the mixers it finished), a PNG (training loss against tokens; held-out perplexity bars) and a Markdown
table. `--quick` is a CPU smoke test (tiny preset, small slices, few steps): its numbers say nothing about quality.

    gsa bench lm [--preset 30m] [--steps 1500] [--mixers gsa gla attention] [--set lr=0.002] [--quick]
    gsa bench lm --merge gpu0/lm_x.json gpu1/lm_x.json     # join runs made side by side, one GPU each
"""

from __future__ import annotations

import argparse
import gc
import gzip
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .record import REPO_ROOT, device_slug, stamp, write_json

DEFAULT_CORPORA = REPO_ROOT.parent / "shared" / "corpora"
DEFAULT_WORK_DIR = REPO_ROOT / "runs" / "lm_bench"
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CORPUS_FILES = {"gcide": "gcide.txt.gz", "wiki": "wiki_summaries.jsonl.gz", "austen": "austen.txt.gz"}
LM_MIXERS = ("gsa", "gla", "attention")
DEFAULT_STEPS = 1500  # without --quick or --steps (the presets' own counts are hours at 30m and above)
HELDOUT_SETS = ("wiki", "austen")
GCIDE_DOC_CHARS = 1 << 20  # GCIDE is one file; it is cut at blank lines into documents of about this many characters
MANIFEST = "manifest.json"
DATA_VERSION = 1
CURVE_POINTS = 200  # loss-curve points kept per mixer in the JSON
FORBIDDEN_OVERRIDES = {
    "model.mixer": "use --mixers",
    "data": "the benchmark trains on its own split",
    "stop_at": "every mixer trains for all --steps",
}


@dataclass(frozen=True)
class DataSlices:
    """How much of each corpus to use (None = all): the first `gcide_chars` characters of GCIDE, the first
    `wiki_docs` Wikipedia summaries (before the held-out split), the first `austen_chars` characters of Austen."""

    gcide_chars: int | None = None
    wiki_docs: int | None = None
    austen_chars: int | None = None


@dataclass(frozen=True)
class QuickSettings:
    preset: str = "tiny"
    steps: int = 30
    slices: DataSlices = DataSlices(gcide_chars=200_000, wiki_docs=400, austen_chars=200_000)
    eval_max_tokens: int = 4096
    overrides: tuple[tuple[str, Any], ...] = (
        ("seq_len", 128), ("batch_size", 8), ("warmup_steps", 5), ("log_every", 5), ("eval_every", 0),
        ("eval_batches", 2),
    )


QUICK = QuickSettings()


# -- data -------------------------------------------------------------------------------------------------------------


def _read_text(path: Path, limit: int | None) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read() if limit is None else f.read(limit)


def _split_at_blank_lines(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at least `size` characters (the last may be shorter), each ending at a blank line."""
    pieces, lo = [], 0
    while lo < len(text):
        hi = text.find("\n\n", lo + size)
        hi = len(text) if hi < 0 else hi + 2
        pieces.append(text[lo:hi])
        lo = hi
    return [p for p in pieces if p.strip()]


def _write_jsonl(path: Path, docs: Sequence[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_wiki(docs: Sequence[str], heldout_every: int) -> tuple[list[str], list[str], int]:
    """(training documents, held-out documents, training documents dropped as duplicates of held-out ones): document
    i (counting from 0) is held out when (i + 1) % heldout_every == 0."""
    if isinstance(heldout_every, bool) or not isinstance(heldout_every, int) or heldout_every < 2:
        raise ValueError(f"heldout_every must be an int >= 2, got {heldout_every!r}")
    heldout = [d for i, d in enumerate(docs) if (i + 1) % heldout_every == 0]
    seen = set(heldout)
    candidates = [d for i, d in enumerate(docs) if (i + 1) % heldout_every != 0]
    train = [d for d in candidates if d not in seen]
    return train, heldout, len(candidates) - len(train)


def prepare_data(
    corpora_dir: str | Path = DEFAULT_CORPORA,
    work_dir: str | Path = DEFAULT_WORK_DIR,
    heldout_every: int = 20,
    slices: DataSlices = DataSlices(),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the training and held-out files once into `<work_dir>/data-<key>/` and return its manifest.

    Layout: `train/gcide.jsonl` and `train/wiki_train.jsonl` (the training folder), `heldout/wiki.jsonl` and
    `heldout/austen.txt`; `manifest.json` (written last: the split is complete exactly when it exists) records the
    sources, the rule, document and character counts and each file's SHA-256. An existing complete split with the
    same settings is reused.
    """
    from ..train.data import iter_documents

    corpora_dir = Path(corpora_dir)
    if not corpora_dir.is_dir():
        raise FileNotFoundError(
            f"corpora folder {corpora_dir} does not exist (expected {', '.join(CORPUS_FILES.values())}); "
            "give --corpora"
        )
    sources = {name: corpora_dir / fname for name, fname in CORPUS_FILES.items()}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing corpus file(s): {', '.join(missing)}")
    for name, value in asdict(slices).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    split_wiki([], heldout_every)  # validates heldout_every
    settings = {
        "version": DATA_VERSION,
        "heldout_every": heldout_every,
        "gcide_doc_chars": GCIDE_DOC_CHARS,
        **asdict(slices),
        "sources": {k: [str(p.resolve()), p.stat().st_size] for k, p in sources.items()},
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(work_dir) / f"data-{key}"
    if (root / MANIFEST).is_file():
        manifest = json.loads((root / MANIFEST).read_text())
        if all(Path(f).is_file() for f in _manifest_paths(manifest)):
            return manifest
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    (root / "heldout").mkdir()
    log(f"preparing the data split in {root}")

    gcide = _split_at_blank_lines(_read_text(sources["gcide"], slices.gcide_chars), GCIDE_DOC_CHARS)
    wiki = list(iter_documents(sources["wiki"]))
    if slices.wiki_docs is not None:
        wiki = wiki[: slices.wiki_docs]
    wiki_train, wiki_heldout, dropped = split_wiki(wiki, heldout_every)
    if not wiki_heldout:
        raise ValueError(f"{len(wiki)} Wikipedia documents leave none held out with heldout_every={heldout_every}")
    austen = _read_text(sources["austen"], slices.austen_chars)
    files = {
        "train_gcide": root / "train" / "gcide.jsonl",
        "train_wiki": root / "train" / "wiki_train.jsonl",
        "heldout_wiki": root / "heldout" / "wiki.jsonl",
        "heldout_austen": root / "heldout" / "austen.txt",
    }
    _write_jsonl(files["train_gcide"], gcide)
    _write_jsonl(files["train_wiki"], wiki_train)
    _write_jsonl(files["heldout_wiki"], wiki_heldout)
    files["heldout_austen"].write_text(austen, encoding="utf-8")

    def chars(docs: Sequence[str]) -> int:
        return sum(len(d) for d in docs)

    manifest = {
        "settings": settings,
        "dir": str(root),
        "train_dir": str(root / "train"),
        "heldout": {"wiki": str(files["heldout_wiki"]), "austen": str(files["heldout_austen"])},
        "rule": f"Wikipedia summary i (from 0, file order) is held out when (i + 1) % {heldout_every} == 0; training "
        "documents with the text of a held-out one are dropped; Austen is never trained on",
        "counts": {
            "train_gcide": {"docs": len(gcide), "chars": chars(gcide)},
            "train_wiki": {"docs": len(wiki_train), "chars": chars(wiki_train), "dropped_duplicates": dropped},
            "heldout_wiki": {"docs": len(wiki_heldout), "chars": chars(wiki_heldout)},
            "heldout_austen": {"docs": 1, "chars": len(austen)},
        },
        "files": {k: {"path": str(p), "sha256": _sha256(p)} for k, p in files.items()},
    }
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(root / MANIFEST)
    return manifest


def _manifest_paths(manifest: dict[str, Any]) -> list[str]:
    return [f["path"] for f in manifest.get("files", {}).values()]


# -- one mixer --------------------------------------------------------------------------------------------------------


def lm_config(
    preset: str,
    mixer: str,
    train_dir: str | Path,
    cache_dir: str | Path,
    steps: int | None = None,
    tokenizer: str = "byte",
    seed: int = 0,
    device: str = "auto",
    overrides: dict[str, Any] | Sequence[tuple[str, Any]] = (),
):
    """The `TrainConfig` of one mixer's run: the preset, the benchmark's fixed fields, then `overrides`."""
    from ..layers import MIXERS
    from ..train.config import load_preset

    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; available: {', '.join(sorted(MIXERS))}")
    overrides = dict(overrides)
    for key, why in FORBIDDEN_OVERRIDES.items():
        if key in overrides:
            raise ValueError(f"--set {key}=... is not allowed here: {why}")
    fixed: dict[str, Any] = {
        "model.mixer": mixer, "data": str(train_dir), "cache_dir": str(cache_dir), "tokenizer": tokenizer,
        "seed": seed, "device": device, "sample_tokens": 0, "save_every": 0, "keep_last": 1,
    }
    if steps is not None:
        fixed["steps"] = steps
    return load_preset(preset).override(fixed).override(overrides)


def _curve(records: Sequence[dict[str, Any]]) -> list[list[float]]:
    points = [[r["step"], r["tokens"], r["loss"]] for r in records if r.get("loss") is not None and "tokens" in r]
    if len(points) > CURVE_POINTS:
        stride = math.ceil(len(points) / CURVE_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_mixer(
    cfg,
    run_dir: Path,
    heldout: dict[str, str],
    eval_batch_size: int | None = None,
    eval_max_tokens: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train `cfg` into `run_dir`, then evaluate the held-out sets. Returns the mixer's record (see the module
    docstring); a failed run is a record with status "nonfinite" or "error"."""
    from ..eval.perplexity import perplexity
    from ..train.distributed import resolve_device
    from ..train.loop import NonFiniteLossError, train
    from ..train.metrics import read_metrics, throughput
    from ..train.sample import load_run

    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    record: dict[str, Any] = {"mixer": cfg.model["mixer"], "status": "ok", "error": None, "run_dir": str(run_dir)}
    start = time.monotonic()
    _release_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = train(cfg, run_dir, overwrite=True, show_progress=show_progress)
    except NonFiniteLossError as e:
        record.update(status="nonfinite", error=str(e))
    except (RuntimeError, ValueError) as e:  # out of memory, a kernel failing on this device, ...
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    _release_memory()
    records = read_metrics(run_dir) if (run_dir / "log.jsonl").is_file() else []
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    tail = losses[-max(1, len(losses) // 10) :] if losses else []
    record.update(
        steps=cfg.steps,
        tokens=cfg.steps * cfg.tokens_per_step,
        tokens_per_step=cfg.tokens_per_step,
        peak_mem_gib=peak,
        final_train_loss=losses[-1] if losses else None,
        train_loss_tail=sum(tail) / len(tail) if tail else None,
        **throughput(records),
        curve=_curve(records),
    )
    if record["status"] != "ok":
        record["wall_s"] = round(time.monotonic() - start, 1)
        return record
    record.update(train_seconds=result.train_seconds, val_loss_train_mix=result.val_loss, heldout={})
    model, tokenizer = load_run(run_dir, device)
    record["params"] = sum(p.numel() for p in model.parameters())
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for name, path in heldout.items():
            record["heldout"][name] = perplexity(
                model, tokenizer, path, cfg.seq_len, eval_batch_size or cfg.batch_size, device,
                max_tokens=eval_max_tokens, show_progress=show_progress,
            )
    except (RuntimeError, ValueError) as e:
        record.update(status="error", error=f"evaluation: {type(e).__name__}: {e}"[:2000])
    record["eval_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    del model
    _release_memory()
    record["wall_s"] = round(time.monotonic() - start, 1)
    return record


# -- the benchmark ----------------------------------------------------------------------------------------------------


def run_lm_benchmark(
    corpora_dir: str | Path = DEFAULT_CORPORA,
    work_dir: str | Path = DEFAULT_WORK_DIR,
    results_dir: str | Path = DEFAULT_RESULTS_DIR,
    mixers: Sequence[str] = LM_MIXERS,
    preset: str | None = None,
    steps: int | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    tokenizer: str = "byte",
    quick: bool = False,
    device: str | None = None,
    seed: int = 0,
    heldout_every: int = 20,
    slices: DataSlices | None = None,
    eval_batch_size: int | None = None,
    eval_max_tokens: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Prepare the split, train and evaluate every mixer, write `lm_<device-slug>[-quick].json`, `.png`, `.md`.

    `quick` changes the defaults only (preset tiny, `QUICK.steps` steps, small data slices, `QUICK.overrides`,
    `QUICK.eval_max_tokens`); explicit arguments win; without `quick`, `steps` defaults to `DEFAULT_STEPS`.
    Returns the payload plus, not in the JSON, `markdown` and `files`.
    """
    from ..train.config import parse_assignments
    from ..train.distributed import resolve_device

    mixers = list(mixers)
    if not mixers:
        raise ValueError("give at least one mixer")
    if len(set(mixers)) != len(mixers):
        raise ValueError(f"mixers repeat: {mixers}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for name, value in (("eval_batch_size", eval_batch_size), ("eval_max_tokens", eval_max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    user = parse_assignments(list(overrides)) if not isinstance(overrides, dict) else dict(overrides)
    merged: dict[str, Any] = dict(QUICK.overrides) if quick else {}
    merged.update(user)
    preset = preset or (QUICK.preset if quick else "30m")
    steps = steps if steps is not None else (QUICK.steps if quick else DEFAULT_STEPS)
    slices = slices if slices is not None else (QUICK.slices if quick else DataSlices())
    if eval_max_tokens is None and quick:
        eval_max_tokens = QUICK.eval_max_tokens
    dev = resolve_device(device or "auto")
    work_dir = Path(work_dir)
    cache_dir = work_dir / "cache"

    # Every config is built (and so validated) before any data is prepared or any model trained.
    configs = {m: lm_config(preset, m, "<train>", cache_dir, steps, tokenizer, seed, str(dev), merged) for m in mixers}
    start = time.monotonic()
    manifest = prepare_data(corpora_dir, work_dir, heldout_every, slices, log=log)
    configs = {m: lm_config(preset, m, manifest["train_dir"], cache_dir, steps, tokenizer, seed, str(dev), merged)
               for m in mixers}
    cfg0 = configs[mixers[0]]
    slug = device_slug() if dev.type == "cuda" else "cpu"
    name = f"lm_{slug}" + ("-quick" if quick else "")
    results_dir = Path(results_dir)
    payload: dict[str, Any] = {
        "benchmark": "lm",
        "stamp": stamp(),
        "settings": {
            "preset": preset,
            "quick": quick,
            "device": str(dev),
            "precision": "bf16 autocast" if cfg0.precision == "bf16" or (cfg0.precision == "auto" and
                                                                         dev.type == "cuda") else "fp32",
            "model": {k: v for k, v in cfg0.model.items() if k != "mixer"},
            "tokenizer": tokenizer,
            "steps": cfg0.steps,
            "seq_len": cfg0.seq_len,
            "batch_size": cfg0.batch_size,
            "grad_accum": cfg0.grad_accum,
            "tokens_per_step": cfg0.tokens_per_step,
            "tokens_per_run": cfg0.steps * cfg0.tokens_per_step,
            "lr": cfg0.lr,
            "warmup_steps": cfg0.warmup_steps,
            "seed": seed,
            "overrides": {k: v for k, v in merged.items()},
            "mixers": mixers,
            "eval": {"seq_len": cfg0.seq_len, "batch_size": eval_batch_size or cfg0.batch_size,
                     "max_tokens": eval_max_tokens},
            "data": {k: manifest[k] for k in ("rule", "counts", "settings")},
        },
        "records": [],
        "notes": _measured(),
    }
    files: list[str] = []
    for mixer in mixers:
        cfg = configs[mixer]
        log(f"lm bench: training {mixer} for {cfg.steps} steps x {cfg.tokens_per_step:,} tokens on {dev}")
        record = run_mixer(cfg, work_dir / "runs" / mixer, manifest["heldout"], eval_batch_size, eval_max_tokens,
                           show_progress)
        payload["records"].append(record)
        log(summary_line(record))
        payload["wall_s"] = round(time.monotonic() - start, 1)
        files = _write_outputs(payload, results_dir, name)  # after every mixer: a run cut short keeps what it did
    markdown = render_markdown(payload)
    payload["files"], payload["markdown"] = files, markdown
    return payload


def merge_results(paths: Sequence[str | Path], results_dir: str | Path = DEFAULT_RESULTS_DIR) -> dict[str, Any]:
    """Joins results of runs made side by side with the same settings but different mixers (e.g. one process per
    GPU, each with its own `--results-dir`) into one `lm_*.json`, `.png` and `.md` in `results_dir`, named as the
    first input. Returns the joined payload plus `files` and `markdown`."""
    if len(paths) < 2:
        raise ValueError("merge needs at least two result files")
    payloads = [json.loads(Path(p).read_text()) for p in paths]

    def comparable(payload: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in payload["settings"].items() if k not in ("mixers", "device")}

    for path, payload in zip(paths[1:], payloads[1:], strict=True):
        if payload.get("benchmark") != "lm" or comparable(payload) != comparable(payloads[0]):
            raise ValueError(f"{path}: not an lm result with the same settings as {paths[0]}")
    records = [r for payload in payloads for r in payload["records"]]
    mixers = [r["mixer"] for r in records]
    if len(set(mixers)) != len(mixers):
        raise ValueError(f"a mixer appears in more than one input: {mixers}")
    devices = sorted({payload["settings"]["device"] for payload in payloads})
    merged = {
        **payloads[0],
        "settings": {**payloads[0]["settings"], "mixers": mixers, "device": ", ".join(devices)},
        "records": records,
        "wall_s": max(payload.get("wall_s", 0.0) for payload in payloads),
        "merged_from": [
            {"file": Path(p).name, "commit": pl["stamp"].get("commit"), "date_utc": pl["stamp"].get("date_utc")}
            for p, pl in zip(paths, payloads, strict=True)
        ],
    }
    files = _write_outputs(merged, Path(results_dir), Path(paths[0]).stem)
    merged["files"], merged["markdown"] = files, render_markdown(merged)
    return merged


def _measured() -> str:
    """The module docstring's paragraph on what is measured (it goes into the JSON as `notes`)."""
    doc = __doc__ or ""
    start, end = doc.find("What is measured"), doc.find("Data (prepared")
    return doc[start:end].strip() if 0 <= start < end else doc.strip()


def _write_outputs(payload: dict[str, Any], results_dir: Path, name: str) -> list[str]:
    files = [str(write_json(results_dir / f"{name}.json", payload))]
    files.append(str(plot_lm(payload, results_dir / f"{name}.png")))
    md = results_dir / f"{name}.md"
    md.write_text(render_markdown(payload))
    files.append(str(md))
    return files


def summary_line(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return f"{r['mixer']}: {r['status']}: {r['error']}"
    held = ", ".join(f"{k} ppl {v['perplexity']:.3f}" for k, v in r["heldout"].items())
    mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
    return (f"{r['mixer']}: loss {r['final_train_loss']:.4f}, {held}, {_num(r['tokens_per_s'])} tok/s, "
            f"peak {mem}, {r['wall_s']:.0f} s")


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def render_markdown(payload: dict[str, Any]) -> str:
    """README table: one row per mixer."""
    s = payload["settings"]
    m = s["model"]
    lines = [
        f"Language modelling, preset {s['preset']} ({m.get('num_hidden_layers')} layers x {m.get('hidden_size')}), "
        f"{s['tokenizer']} tokenizer, {s['steps']:,} steps x {s['tokens_per_step']:,} tokens = "
        f"{_count(s['tokens_per_run'])} training tokens of GCIDE + Wikipedia summaries per mixer, same data order, "
        f"{s['precision']}, on {payload['stamp']['device']}"
        + (" (--quick: a smoke test, not a quality measurement)" if s["quick"] else "")
        + ". Held-out perplexity per token (bits per byte), windows of "
        f"{s['eval']['seq_len']} tokens" + (f", first {s['eval']['max_tokens']:,} tokens of each set"
                                           if s["eval"]["max_tokens"] else "") + ".\n",
        "| mixer | params | final train loss | wiki ppl (bpb) | austen ppl (bpb) | tokens/s | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in payload["records"]:
        if r["status"] != "ok":
            lines.append(f"| {r['mixer']} | {r['status']}: {str(r['error'])[:80]} | | | | | |")
            continue
        held = []
        for k in HELDOUT_SETS:
            h = r["heldout"].get(k)
            bpb = "" if h is None or h.get("bits_per_byte") is None else f" ({h['bits_per_byte']:.3f})"
            held.append("–" if h is None else f"{h['perplexity']:.3f}{bpb}")
        mem = "–" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
        mfu = f" ({100 * r['mfu']:.0f}% MFU)" if r.get("mfu") is not None else ""
        lines.append(f"| {r['mixer']} | {r['params'] / 1e6:.1f}M | {r['final_train_loss']:.3f} | {held[0]} | "
                     f"{held[1]} | {_num(r['tokens_per_s'])}{mfu} | {mem} |")
    return "\n".join(lines) + "\n"


def plot_lm(payload: dict[str, Any], path: str | Path) -> Path:
    """PNG from the payload alone: training loss against tokens (one line per mixer) and held-out perplexity bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    ok = [r for r in payload["records"] if r["status"] == "ok"]
    for r in payload["records"]:
        if r.get("curve"):
            ax_loss.plot([p[1] for p in r["curve"]], [p[2] for p in r["curve"]], label=r["mixer"], lw=1.2)
    ax_loss.set(xlabel="training tokens", ylabel="training loss (nats/token)", title="training loss")
    width = 0.8 / max(1, len(ok))
    for i, r in enumerate(ok):
        values = [r["heldout"].get(k, {}).get("perplexity", math.nan) for k in HELDOUT_SETS]
        bars = ax_ppl.bar([j + (i - (len(ok) - 1) / 2) * width for j in range(len(HELDOUT_SETS))], values, width,
                          label=r["mixer"], color=f"C{payload['records'].index(r)}")
        ax_ppl.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_ppl.set_xticks(range(len(HELDOUT_SETS)), [f"{k} (held out)" for k in HELDOUT_SETS])
    ax_ppl.set(ylabel="perplexity per token", title="held-out perplexity (lower is better)")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    s = payload["settings"]
    fig.suptitle(f"{payload['stamp']['device']}: preset {s['preset']}, {_count(s['tokens_per_run'])} tokens per "
                 f"mixer" + (" (quick smoke test)" if s["quick"] else ""), fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gsa bench lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", default=str(DEFAULT_CORPORA), help="folder with " + ", ".join(CORPUS_FILES.values()))
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="data split, token cache and run folders")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR), help="where the JSON, PNG and table go")
    p.add_argument("--mixers", nargs="+", default=list(LM_MIXERS), metavar="MIXER")
    p.add_argument("--preset", help="training preset (default 30m; tiny with --quick)")
    p.add_argument("--steps", type=int, help=f"optimizer steps per mixer (default {DEFAULT_STEPS}; "
                   f"{QUICK.steps} with --quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="training/model field for every mixer, e.g. lr=0.002 or model.num_slots=32; repeatable")
    p.add_argument("--tokenizer", default="byte", help="'byte', a Hugging Face tokenizer folder, or a .gguf file")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-every", type=int, default=20, help="hold out every N-th Wikipedia summary")
    p.add_argument("--eval-batch-size", type=int, help="windows per evaluation pass (default: training batch_size)")
    p.add_argument("--eval-max-tokens", type=int, help="evaluate only the first N tokens of each held-out set")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny preset, small slices, few steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's; 1 with --quick on a CPU, faster for its tiny tensors)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="train nothing: join lm_*.json files of side-by-side runs (same settings, other mixers) "
                        "into --results-dir")
    a = p.parse_args(argv)
    if a.merge:
        try:
            payload = merge_results(a.merge, a.results_dir)
        except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
            print(f"gsa bench lm: error: {e}", file=sys.stderr)
            return 2
        print(payload["markdown"])
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file save/load bars
    threads = a.threads
    if threads is None and a.quick and not torch.cuda.is_available():
        threads = 1
    if threads is not None:
        if threads < 1:
            print(f"gsa bench lm: error: --threads must be >= 1, got {threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(threads)
    try:
        payload = run_lm_benchmark(
            a.corpora, a.work_dir, a.results_dir, a.mixers, a.preset, a.steps, a.set, a.tokenizer, a.quick, a.device,
            a.seed, a.heldout_every, eval_batch_size=a.eval_batch_size, eval_max_tokens=a.eval_max_tokens,
            show_progress=not a.no_progress,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"gsa bench lm: error: {e}", file=sys.stderr)
        return 2
    print(payload["markdown"])
    print("\n".join(payload["files"]))
    return 0 if all(r["status"] == "ok" for r in payload["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`gsa mqar`: train small models of every mixer on MQAR and measure recall at known recurrent-state sizes.

One cell = (setting (seq_len, num_pairs), mixer, d_model, learning rate). Each cell trains a fresh `GSAForCausalLM`
(2 layers of pre-norm mixer + small SwiGLU MLP with hidden 2 * d_model) with AdamW on fresh MQAR batches and reports
the accuracy on a held-out set: the fraction of answer positions whose argmax prediction is the answer. The best
learning rate per (setting, mixer, d_model) is kept; every run is recorded.

Shapes, chosen so that the recurrent mixers hold the same state per layer (D = d_model, see `mqar_model_config`;
`state_size` in the results = numbers per layer per sequence after seq_len tokens, conv windows included):

- gla: 1 head, key dim D/2, value dim D: state D * D/2 (+ 6 D of conv windows).
- gsa and abc: 2 heads of dim D/2, M = D/4 slots per head: state 2 * M * D = D * D/2 (+ 9 D of conv windows; abc
  adds its H * M log Z).
- attention: D / 64 heads (at least 2), RoPE; its KV cache after seq_len tokens is 2 * seq_len * D (+ 9 D).

Every mixer gets the same causal short convolution (kernel 4) on its q, k and v (`use_short_conv`; its windows are
counted in the state size), as Zoology gives every model a convolution: MQAR needs each value to be written with its
key, i.e. a "previous token" step, which a convolution makes free. Without it no mixer, attention included, left the
1/num_pairs plateau within 1000-2000 CPU steps at seq_len 128 with 16 pairs, while with it attention reached 99% in
500 steps (d 64, vocab 64). Input and output embeddings are untied (tying left attention at chance on the smallest
instance). The default vocabulary is 256 rather than Zoology's 8192: with 8192 (or 1024) tokens the output layer
alone needs far more steps than the budget allows (loss still at log(4096) after 1000 steps with a convolution).

Training: bf16 autocast on CUDA (float32 on CPU), the operator's default backend (triton on CUDA, chunk on CPU),
AdamW (betas 0.9/0.98, weight decay 0.1 on matrices), gradient clipping at 1, linear warm-up over the first 10% then
cosine decay to zero. The schedule follows progress = max(step / steps, time / time cap), so a cell cut short by
the time budget still anneals. The loss and the accuracy use the logits of the query positions only (the LM head is
applied there alone). A cell stops early once the training accuracy of the last `check_every` steps (on fresh,
never-seen batches) reaches `target_accuracy`.

Time budget: `budget_s` is the wall time for the whole grid. Cells run in order (setting, d_model, mixer, lr) on
`workers` processes (spread over every visible GPU when the device is plain "cuda"); each cell gets a time cap of
(time left) / (rounds of cells left), counted from the end of its first step (which compiles). When too little time
is left, the remaining cells are recorded as skipped.

Data: training batches come from a generator seeded with `seed + 1`, the held-out set from one seeded with `seed`;
model initialisation uses `seed` too. Output: `mqar_<device-slug>.json` (`-quick` for --quick), a PNG (accuracy vs
d_model, one line per mixer and one panel per setting; accuracy vs state size) and a Markdown table.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bench.record import REPO_ROOT, device_slug, stamp, write_json
from .mqar import MQARSpec, answer_targets, mqar_batch, mqar_dataset

MQAR_MIXERS = ("attention", "gsa", "gla", "abc")
NUM_LAYERS = 2
MIN_CELL_S = 3.0  # a cell is not started with less time than this left


@dataclass(frozen=True)
class MQARGrid:
    """What `run_mqar` trains. Every field is recorded in the results.

    Args:
        settings: (seq_len, num_pairs) pairs; each query asks one of the pairs (num_queries = num_pairs).
        d_models: model widths.
        mixers: keys of `flash_gsa.layers.MIXERS` among "attention", "gsa", "gla", "abc".
        lrs: peak learning rates swept per cell.
        vocab_size: MQAR vocabulary (filler, keys, values).
        steps: training steps per cell (fewer if the time cap or the target accuracy stops it).
        batch_size: sequences per step (and per evaluation batch).
        eval_examples: held-out sequences per setting.
        target_accuracy: stop a cell once its training accuracy over `check_every` steps reaches this.
        check_every: steps between (host-syncing) checks of the training accuracy and the loss.
        budget_s: wall-clock budget of the whole grid in seconds; None = no limit.
        workers: training processes (sharing the device); 1 = in this process, with a progress bar per cell.
        seed: data and initialisation seed.
        overrides: per mixer, GSAConfig fields that replace `mqar_model_config`'s (e.g. {"gsa": {"num_slots": 64}}).
    """

    settings: tuple[tuple[int, int], ...] = ((512, 64), (256, 16))
    d_models: tuple[int, ...] = (64, 128, 256, 512)
    mixers: tuple[str, ...] = MQAR_MIXERS
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    vocab_size: int = 256
    steps: int = 2000
    batch_size: int = 64
    eval_examples: int = 1024
    target_accuracy: float = 0.995
    check_every: int = 25
    budget_s: float | None = None
    workers: int = 1
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.settings or not self.d_models or not self.mixers or not self.lrs:
            raise ValueError("settings, d_models, mixers and lrs must each have at least one entry")
        for seq_len, num_pairs in self.settings:
            MQARSpec(self.vocab_size, seq_len, num_pairs)  # raises on an impossible setting
        bad = [m for m in self.mixers if m not in MQAR_MIXERS]
        if bad:
            raise ValueError(f"unknown mixers {bad}; choose among {MQAR_MIXERS}")
        if any(not isinstance(d, int) or d < 8 or d % 8 for d in self.d_models):
            raise ValueError(f"every d_model must be a multiple of 8, got {self.d_models}")
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"learning rates must be > 0, got {self.lrs}")
        for name in ("steps", "batch_size", "eval_examples", "check_every", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0 or None, got {self.budget_s}")
        bad = [m for m in self.overrides if m not in self.mixers]
        if bad:
            raise ValueError(f"overrides for mixers not in the grid: {bad}")
        from ..models import GSAConfig

        known = set(inspect.signature(GSAConfig.__init__).parameters) - {"self", "kwargs"}
        bad = sorted({f"{m}.{k}" for m, fields in self.overrides.items() for k in fields if k not in known})
        if bad:
            raise ValueError(f"overrides name fields that GSAConfig does not have: {bad}")
        from ..layers import MIXERS, mixer_config_fields

        base = GSAConfig()
        mixer_fields = set().union(*(mixer_config_fields(m, base) for m in MIXERS))
        for m, fields in self.overrides.items():
            ignored = sorted(k for k in fields if k in mixer_fields and k not in mixer_config_fields(m, base))
            if ignored:
                raise ValueError(f"{m} does not use {ignored}: those settings would change nothing in its models")

    def cells(self) -> list[dict[str, Any]]:
        """Every run, in the order they are started."""
        return [
            {"seq_len": t, "num_pairs": n, "d_model": d, "mixer": m, "lr": lr}
            for t, n in self.settings for d in self.d_models for m in self.mixers for lr in self.lrs
        ]


QUICK_GRID = MQARGrid(
    settings=((64, 4),), d_models=(32, 64), lrs=(3e-3, 1e-2), vocab_size=64, steps=300, batch_size=32,
    eval_examples=256, check_every=20,
)


def grid_from_options(quick: bool, options: dict[str, Any], assignments: Sequence[str] = ()) -> MQARGrid:
    """The grid of `gsa mqar`: `QUICK_GRID` or the defaults, with the options that are not None replacing fields.

    `options["settings"]` holds "T:PAIRS" strings; `assignments` are "MIXER.FIELD=VALUE" strings for `overrides`
    (VALUE is read as JSON when it parses, else kept as a string).
    """
    base = QUICK_GRID if quick else MQARGrid()
    fields = {k: v for k, v in options.items() if v is not None}
    if "settings" in fields:
        settings = []
        for text in fields["settings"]:
            try:
                seq_len, pairs = (int(x) for x in text.split(":"))
            except ValueError:
                raise ValueError(f"a setting must look like T:PAIRS (e.g. 512:64), got {text!r}") from None
            settings.append((seq_len, pairs))
        fields["settings"] = tuple(settings)
    for name in ("d_models", "mixers", "lrs"):
        if name in fields:
            fields[name] = tuple(fields[name])
    overrides: dict[str, dict[str, Any]] = {}
    for text in assignments:
        key, sep, raw = text.partition("=")
        mixer, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set needs MIXER.FIELD=VALUE (e.g. gsa.num_slots=64), got {text!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides.setdefault(mixer, {})[name] = value
    if overrides:
        fields["overrides"] = overrides
    return replace(base, **fields)


def mqar_model_config(mixer: str, d_model: int, vocab_size: int, seq_len: int, **overrides: Any):
    """The `GSAConfig` of one MQAR model (see the module docstring for the shapes); `overrides` replace fields."""
    from ..models import GSAConfig

    if mixer not in MQAR_MIXERS:
        raise ValueError(f"mixer must be one of {MQAR_MIXERS}, got {mixer!r}")
    if d_model < 8 or d_model % 8:
        raise ValueError(f"d_model must be a multiple of 8, got {d_model}")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=NUM_LAYERS, intermediate_size=2 * d_model,
        max_position_embeddings=seq_len, mixer=mixer, num_heads=2, num_slots=d_model // 4,
        attn_num_heads=max(2, d_model // 64), use_short_conv=True, conv_size=4,
    )
    if mixer == "gla":
        kwargs["num_heads"] = 1
    return GSAConfig(**{**kwargs, **overrides})


def _mixer_state_size(model, seq_len: int) -> int:
    """Numbers per sequence held by one layer's mixer after seq_len tokens (the same for both layers)."""
    return int(model.model.layers[0].mixer.state_size(seq_len))


def _lr_factor(progress: float) -> float:
    """Linear warm-up over the first 10% of progress, then cosine decay to zero."""
    if progress < 0.1:
        return max(progress / 0.1, 0.01)
    return 0.5 * (1 + math.cos(math.pi * min((progress - 0.1) / 0.9, 1.0)))


def _query_logits(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the query positions `[A, vocab]` (float32) and the answers `[A]`."""
    hidden = model.model(input_ids=input_ids).last_hidden_state
    where, answers = answer_targets(labels)
    return model.lm_head(hidden[:, :-1][where]).float(), answers


@torch.no_grad()
def evaluate_mqar(model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int, autocast) -> float:
    """Fraction of answer positions where the argmax prediction is the answer, over a held-out set (CPU tensors)."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for i in range(0, input_ids.shape[0], batch_size):
        ids, lab = input_ids[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        with autocast():
            logits, answers = _query_logits(model, ids, lab)
        correct += int((logits.argmax(-1) == answers).sum())
        total += answers.numel()
    model.train()
    return correct / total


def train_cell(
    cell: dict[str, Any],
    grid: MQARGrid,
    device: str | torch.device,
    time_cap_s: float | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Trains and evaluates one cell (a dict from `MQARGrid.cells`). Returns its record (cell fields, shapes, state
    size, accuracy, steps, seconds, why it stopped)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # a worker's cell may be on any GPU; this process's allocations follow it
    spec = MQARSpec(grid.vocab_size, cell["seq_len"], cell["num_pairs"])
    config = mqar_model_config(
        cell["mixer"], cell["d_model"], grid.vocab_size, spec.seq_len, **grid.overrides.get(cell["mixer"], {})
    )
    from ..models import GSAForCausalLM

    torch.manual_seed(grid.seed)
    model = GSAForCausalLM(config).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cell["lr"], betas=(0.9, 0.98),
    )
    if device.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    record: dict[str, Any] = {
        **cell,
        "vocab_size": grid.vocab_size,
        "num_heads": config.attn_num_heads if cell["mixer"] == "attention" else config.num_heads,
        "num_slots": config.num_slots if cell["mixer"] in ("gsa", "abc") else None,
        "state_size": _mixer_state_size(model, spec.seq_len),
        "params": sum(p.numel() for p in model.parameters()),
    }

    gen = torch.Generator().manual_seed(grid.seed + 1)
    bar = tqdm(total=grid.steps, desc=f"{cell['mixer']} d={cell['d_model']} lr={cell['lr']:g}", unit="step",
               disable=not show_progress, leave=False, mininterval=1.0)
    t_start = time.perf_counter()
    t_warm = None  # the clock of the time cap starts after the first step (compilation)
    step, stopped, loss_val, train_acc = 0, "steps", math.nan, math.nan
    hits = torch.zeros((), device=device)
    count = 0
    ids, labels = mqar_batch(spec, grid.batch_size, gen)
    while step < grid.steps:
        elapsed = 0.0 if t_warm is None else time.perf_counter() - t_warm
        progress = step / grid.steps
        if time_cap_s is not None:
            progress = max(progress, elapsed / time_cap_s)
        if progress >= 1:
            stopped = "time"
            break
        for group in opt.param_groups:
            group["lr"] = cell["lr"] * _lr_factor(progress)
        ids_d, labels_d = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            logits, answers = _query_logits(model, ids_d, labels_d)
        loss = F.cross_entropy(logits, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hits += (logits.detach().argmax(-1) == answers).sum()
        count += answers.numel()
        step += 1
        bar.update(1)
        ids, labels = mqar_batch(spec, grid.batch_size, gen)  # drawn while the device works
        if t_warm is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_warm = time.perf_counter()
        if step % grid.check_every == 0 or step == grid.steps:
            loss_val, train_acc = float(loss.detach()), float(hits) / count
            hits.zero_()
            count = 0
            bar.set_postfix_str(f"loss {loss_val:.3f} acc {train_acc:.3f}", refresh=False)
            if not math.isfinite(loss_val):
                stopped = "diverged"
                break
            if train_acc >= grid.target_accuracy:
                stopped = "target"
                break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t_start

    if stopped == "diverged":
        accuracy = 0.0
    else:
        test_ids, test_labels = mqar_dataset(spec, grid.eval_examples, grid.seed)
        accuracy = evaluate_mqar(model, test_ids, test_labels, grid.batch_size, autocast)
    return {
        **record, "status": "ok", "accuracy": accuracy, "steps": step, "stopped": stopped, "seconds": round(train_s, 2),
        "eval_seconds": round(time.perf_counter() - t_start - train_s, 2), "final_loss": loss_val,
        "train_accuracy": train_acc,
    }


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_cell_safely(cell, grid, device, time_cap_s, show_progress) -> dict[str, Any]:
    try:
        return train_cell(cell, grid, device, time_cap_s, show_progress)
    except Exception as e:  # one failing cell (e.g. out of memory) must not lose the grid
        return {**cell, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}


def _summary(record: dict[str, Any]) -> str:
    head = f"T={record['seq_len']} pairs={record['num_pairs']} {record['mixer']:>9} d={record['d_model']:<3} " \
           f"lr={record['lr']:g}"
    if record["status"] != "ok":
        return f"{head}: {record['status']} {record.get('error', '')}"
    return (f"{head}: acc {record['accuracy']:.3f} ({record['steps']} steps, {record['seconds']:.0f} s, "
            f"stopped: {record['stopped']})")


def _worker_device(device: torch.device, cell_index: int) -> str:
    """Where a worker trains cell `cell_index`: "cuda" without an index spreads the cells over every visible GPU."""
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return f"cuda:{cell_index % torch.cuda.device_count()}"
    return str(device)


def _run_grid(grid: MQARGrid, device: torch.device, log) -> list[dict[str, Any]]:
    """Runs every cell within the budget; returns one record per cell (skipped ones included), in grid order."""
    cells = grid.cells()
    deadline = None if grid.budget_s is None else time.monotonic() + grid.budget_s
    records: dict[int, dict[str, Any]] = {}

    def cap(pending: int) -> float | None:
        """Time cap for the next cell: the time left shared by the rounds of cells left; None when unlimited."""
        if deadline is None:
            return None
        rounds = math.ceil(pending / grid.workers)
        return (deadline - time.monotonic()) / rounds

    bar = tqdm(total=len(cells), desc="mqar grid", unit="cell")
    queue = list(enumerate(cells))
    if grid.workers == 1:
        for i, cell in queue:
            c = cap(len(cells) - i)
            if c is not None and c < MIN_CELL_S:
                records[i] = {**cell, "status": "skipped", "error": "time budget spent"}
            else:
                records[i] = _run_cell_safely(cell, grid, device, c, True)
            log(_summary(records[i]))
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // grid.workers)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(grid.workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
            running: dict[Future, int] = {}
            while queue or running:
                while queue and len(running) < grid.workers:
                    i, cell = queue.pop(0)
                    c = cap(len(queue) + 1)
                    if c is not None and c < MIN_CELL_S:
                        records[i] = {**cell, "status": "skipped", "error": "time budget spent"}
                        log(_summary(records[i]))
                        bar.update(1)
                        continue
                    running[ex.submit(_run_cell_safely, cell, grid, _worker_device(device, i), c, False)] = i
                if not running:
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = running.pop(fut)
                    records[i] = fut.result()
                    log(_summary(records[i]))
                    bar.update(1)
    bar.close()
    return [records[i] for i in range(len(cells))]


def best_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best learning rate of every (seq_len, num_pairs, mixer, d_model): highest accuracy, then lowest loss."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        if r["status"] != "ok":
            continue
        key = (r["seq_len"], r["num_pairs"], r["mixer"], r["d_model"])
        if key not in best or _rank(r) > _rank(best[key]):
            best[key] = r
    return [best[k] for k in sorted(best, key=lambda k: (-k[0], k[1], MQAR_MIXERS.index(k[2]), k[3]))]


def _rank(record: dict[str, Any]) -> tuple[float, float]:
    loss = record["final_loss"]
    return record["accuracy"], -loss if math.isfinite(loss) else -math.inf


def render_markdown(payload: dict[str, Any]) -> str:
    """README table: one row per (setting, mixer), one column per d_model: best accuracy and the state per layer."""
    best, grid = payload["best"], payload["grid"]
    lines = []
    for seq_len, num_pairs in grid["settings"]:
        lines.append(f"MQAR, seq_len {seq_len}, {num_pairs} key-value pairs, vocab {grid['vocab_size']} "
                     f"(accuracy of the best lr; state = numbers per layer per sequence)\n")
        lines.append("| mixer | " + " | ".join(f"d={d}" for d in grid["d_models"]) + " |")
        lines.append("|---|" + "---|" * len(grid["d_models"]))
        for mixer in grid["mixers"]:
            cells = []
            for d in grid["d_models"]:
                r = next((r for r in best if (r["seq_len"], r["num_pairs"], r["mixer"], r["d_model"]) ==
                          (seq_len, num_pairs, mixer, d)), None)
                cells.append("–" if r is None else f"{100 * r['accuracy']:.1f}% ({_short(r['state_size'])})")
            lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _short(n: int) -> str:
    return f"{n / 1024:.0f}K" if n >= 1024 else str(n)


def plot_mqar(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """PNG: per setting, best accuracy vs d_model (one line per mixer) and best accuracy vs state size per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, best = payload["grid"], payload["best"]
    settings = [tuple(s) for s in grid["settings"]]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.8 * len(settings)), squeeze=False)
    markers = {"attention": "s", "gsa": "o", "gla": "^", "abc": "v"}
    for row, (seq_len, num_pairs) in enumerate(settings):
        for mixer in grid["mixers"]:
            rs = sorted((r for r in best if (r["seq_len"], r["num_pairs"], r["mixer"]) == (seq_len, num_pairs, mixer)),
                        key=lambda r: r["d_model"])
            if not rs:
                continue
            acc = [100 * r["accuracy"] for r in rs]
            axes[row, 0].plot([r["d_model"] for r in rs], acc, marker=markers.get(mixer, "o"), label=mixer)
            axes[row, 1].plot([r["state_size"] for r in rs], acc, marker=markers.get(mixer, "o"), label=mixer)
        title = f"MQAR: seq_len {seq_len}, {num_pairs} pairs"
        axes[row, 0].set(xscale="log", xlabel="model dimension", ylabel="accuracy (%)", title=title, ylim=(-3, 103))
        axes[row, 0].set_xticks(grid["d_models"], [str(d) for d in grid["d_models"]])
        axes[row, 0].minorticks_off()
        axes[row, 1].set(xscale="log", xlabel="state size per layer (numbers per sequence)", ylabel="accuracy (%)",
                         title=title, ylim=(-3, 103))
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
    fig.suptitle(f"{payload['stamp']['device']}, {NUM_LAYERS} layers, best of lr {grid['lrs']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_mqar(
    grid: MQARGrid,
    results_dir: str | os.PathLike = REPO_ROOT / "benchmarks" / "results",
    device: str | torch.device | None = None,
    quick: bool = False,
    log=tqdm.write,
) -> dict[str, Any]:
    """Runs the grid and writes `mqar_<device-slug>[-quick].json`, `.png` and `.md` into `results_dir`.

    Returns the payload: `stamp`, `grid` (every setting), `runs` (one record per cell, skipped ones included),
    `best` (the best lr per setting, mixer and d_model), `wall_s`; plus, not in the JSON, `markdown` (the table)
    and `files` (what was written).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.monotonic()
    runs = _run_grid(grid, device, log)
    slug = device_slug() if device.type == "cuda" else "cpu"
    name = f"mqar_{slug}" + ("-quick" if quick else "")
    grid_record = asdict(grid)
    payload = {
        "stamp": stamp(),
        "grid": {**grid_record, "settings": [list(s) for s in grid.settings], "quick": quick,
                 "num_layers": NUM_LAYERS, "device": str(device)},
        "runs": runs,
        "best": best_runs(runs),
        "wall_s": round(time.monotonic() - start, 1),
    }
    payload["files"] = _write_outputs(payload, Path(results_dir), name)
    payload["markdown"] = render_markdown(payload)
    return payload


def _write_outputs(payload: dict[str, Any], results_dir: Path, name: str) -> list[str]:
    """`name`.json, .png and .md in `results_dir`."""
    files = [str(write_json(results_dir / f"{name}.json", payload)),
             str(plot_mqar(payload, results_dir / f"{name}.png"))]
    md = results_dir / f"{name}.md"
    md.write_text(render_markdown(payload))
    return files + [str(md)]


def merge_mqar(paths: Sequence[str | os.PathLike], results_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Joins MQAR results of runs that differ only in their settings (sequence length, pairs), mixers and learning
    rates (e.g. a second run with a learning rate the first lacked, or one setting per device call) into one
    `mqar_*.json`, `.png` and `.md`, named as the first input and written into `results_dir` (default: the first
    input's folder). The best learning rate per cell is chosen again over all runs. A cell (setting, d_model, mixer,
    lr) may come from one input only."""
    if len(paths) < 2:
        raise ValueError("merge needs at least two result files")
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    varying = ("settings", "mixers", "lrs", "workers", "budget_s")

    def comparable(payload: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in payload["grid"].items() if k not in varying}

    for path, payload in zip(paths[1:], payloads[1:], strict=True):
        if comparable(payload) != comparable(payloads[0]):
            raise ValueError(f"{path}: its grid differs from {paths[0]}'s in more than {varying}")
    runs = [r for payload in payloads for r in payload["runs"]]
    keys = [(r["seq_len"], r["num_pairs"], r["d_model"], r["mixer"], r["lr"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("a cell (setting, d_model, mixer, lr) appears in more than one input")
    grid = dict(payloads[0]["grid"])
    grid["settings"] = list(dict.fromkeys(tuple(x) for payload in payloads for x in payload["grid"]["settings"]))
    grid["mixers"] = list(dict.fromkeys(m for payload in payloads for m in payload["grid"]["mixers"]))
    grid["lrs"] = sorted({lr for payload in payloads for lr in payload["grid"]["lrs"]})
    merged = {
        **payloads[0],
        "grid": grid,
        "runs": runs,
        "best": best_runs(runs),
        "wall_s": sum(payload.get("wall_s", 0.0) for payload in payloads),
        "merged_from": [
            {"file": Path(p).name, "commit": pl["stamp"].get("commit"), "date_utc": pl["stamp"].get("date_utc"),
             "settings": pl["grid"]["settings"], "mixers": pl["grid"]["mixers"], "lrs": pl["grid"]["lrs"]}
            for p, pl in zip(paths, payloads, strict=True)
        ],
    }
    out_dir = Path(results_dir) if results_dir is not None else Path(paths[0]).parent
    merged["files"] = _write_outputs(merged, out_dir, Path(paths[0]).stem)
    merged["markdown"] = render_markdown(merged)
    return merged


__all__ = ["MQARGrid", "QUICK_GRID", "best_runs", "evaluate_mqar", "grid_from_options", "merge_mqar",
           "mqar_model_config", "plot_mqar", "render_markdown", "run_mqar", "train_cell"]

"""`gsa bench scaling`: does data-parallel training reproduce a single-device run, and how does its throughput scale?

Compares finished `gsa train` runs (their `log.jsonl`): a single-device run and runs on N devices (torchrun, DDP or
FSDP2) at the same global batch (N ranks x batch b = one device x batch N * b, same seed and data). The data loader
deals the same shuffled rows to the ranks round-robin, so every step sees the same rows in both; losses may differ
only by floating-point reduction order.

Per parallel run: the largest absolute and relative difference of the training loss over the common steps, the
tokens/s from the first logged step to the last (the steps before it compile; `train.metrics.throughput`), its ratio
to the single run and the scaling efficiency = ratio / N. Writes `<results-dir>/scaling_<device-slug>.json` and a PNG
of the loss curves.

    bash benchmarks/run_scaling.sh           # on a 2-GPU machine: trains the three runs, then this
    gsa bench scaling --single runs/1gpu --run ddp=runs/ddp --run fsdp=runs/fsdp --devices 2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..train.metrics import read_metrics, throughput
from ..train.plot import plot_runs
from .record import REPO_ROOT, device_slug, stamp, write_json


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def _throughput(run: Path) -> float | None:
    """Tokens/s of the training steps after the first logged one (which compiles), as `gsa bench lm` reckons it."""
    return throughput(read_metrics(run))["tokens_per_s"]


def compare_runs(single: str | Path, parallel: dict[str, str | Path], devices: int) -> dict[str, Any]:
    """The comparison record of `parallel` runs (name -> run folder) on `devices` devices against `single`."""
    if devices < 2:
        raise ValueError(f"devices must be >= 2 (the parallel runs' world size), got {devices}")
    single = Path(single)
    base = _losses(single)
    if not base:
        raise ValueError(f"{single} has no training losses in its log.jsonl (is it a finished `gsa train` run?)")
    base_tps = _throughput(single)
    records = []
    for name, folder in parallel.items():
        losses = _losses(Path(folder))
        steps = sorted(set(base) & set(losses))
        if not steps:
            raise ValueError(f"{folder} shares no logged step with {single}")
        abs_diff = max(abs(losses[s] - base[s]) for s in steps)
        rel_diff = max(abs(losses[s] - base[s]) / max(abs(base[s]), 1e-12) for s in steps)
        tps = _throughput(Path(folder))
        speedup = tps / base_tps if tps and base_tps else None
        records.append({
            "name": name, "run": str(folder), "devices": devices, "steps_compared": len(steps),
            "first_loss": losses[steps[0]], "last_loss": losses[steps[-1]],
            "max_abs_loss_diff": abs_diff, "max_rel_loss_diff": rel_diff,
            "tokens_per_s": tps, "speedup": speedup, "efficiency": speedup / devices if speedup else None,
        })  # fmt: skip
    return {
        "single": {"run": str(single), "tokens_per_s": base_tps, "first_loss": base[min(base)],
                   "last_loss": base[max(base)]},
        "parallel": records,
    }


def render_markdown(payload: dict[str, Any]) -> str:
    lines = [
        "| run | devices | steps | max loss diff (abs / rel) | tokens/s | speed-up | efficiency |",
        "|---|---|---|---|---|---|---|",
        f"| single | 1 | - | - | {payload['single']['tokens_per_s'] or 0:,.0f} | 1.00x | - |",
    ]
    for r in payload["parallel"]:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        eff = f"{r['efficiency']:.0%}" if r["efficiency"] else "-"
        lines.append(
            f"| {r['name']} | {r['devices']} | {r['steps_compared']} | {r['max_abs_loss_diff']:.1e} / "
            f"{r['max_rel_loss_diff']:.1e} | {r['tokens_per_s'] or 0:,.0f} | {speed} | {eff} |"
        )
    return "\n".join(lines)


def _named_run(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_DIR (e.g. ddp=runs/ddp), got {text!r}")
    return name, folder


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gsa bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--single", required=True, help="the single-device run folder")
    p.add_argument("--run", type=_named_run, action="append", required=True, metavar="NAME=RUN_DIR",
                   help="a run on --devices devices at the same global batch; repeatable")
    p.add_argument("--devices", type=int, default=2, help="world size of the --run runs")
    p.add_argument("--results-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--name", help="file stem (default scaling_<device-slug>)")
    args = p.parse_args(argv)
    payload = {"stamp": stamp(), **compare_runs(args.single, dict(args.run), args.devices)}
    stem = args.name or f"scaling_{device_slug()}"
    out = Path(args.results_dir)
    write_json(out / f"{stem}.json", payload)
    plot_runs([Path(args.single), *(Path(folder) for _, folder in args.run)], out / f"{stem}.png")
    print(render_markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

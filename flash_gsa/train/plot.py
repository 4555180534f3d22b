"""Loss and validation-perplexity curves of one or more runs, drawn into one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from .metrics import read_metrics

X_AXES = ("step", "tokens")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, x: str = "step") -> Path:
    """Training loss (left) and validation perplexity (right, log scale) of each run against `x`
    ("step" or "tokens"); runs are labelled by their folder names."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    if not run_dirs:
        raise ValueError("give at least one run folder")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ppl = fig.subplots(1, 2)
    for run in run_dirs:
        records = read_metrics(run)
        label = Path(run).resolve().name
        train = [r for r in records if r.get("loss") is not None]
        val = [r for r in records if r.get("val_ppl") is not None]
        line = ax_loss.plot([r[x] for r in train], [r["loss"] for r in train], label=label, lw=1.2)[0]
        if val:
            ax_ppl.plot(
                [r[x] for r in val], [r["val_ppl"] for r in val], "o-", color=line.get_color(), label=label, ms=3
            )
    ax_loss.set(xlabel=x, ylabel="training loss (nats/token)", title="training loss")
    ax_ppl.set(xlabel=x, ylabel="validation perplexity", title="validation perplexity", yscale="log")
    ax_ppl.yaxis.set_major_formatter(LogFormatter())  # plain numbers, minor ticks labelled on short ranges
    ax_ppl.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out

"""The `gsa` command line: a thin shell over the library.

    gsa train --preset tiny --out runs/demo [--steps N] [--data PATH] [--device cpu] [--set model.hidden_size=256]
    gsa generate runs/demo --prompt "It was"
    gsa plot runs/a runs/b --out curves.png
    gsa mqar [--quick] [--budget-s 480] [--workers 4]
    gsa bench op|resources|train|lm [...]

Adding a subcommand: write `_add_<name>(subparsers)` that adds its parser and sets `run=<handler>`, and list it in
`COMMANDS`. A handler takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .train.config import TrainConfig


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .layers import MIXERS
    from .train.config import STRUCTURED_FIELDS, TrainConfig

    p = sub.add_parser(
        "train",
        help="train a language model",
        description="Train a GSA (or baseline) language model. Every training field has a --flag; any field, model "
        "fields included, can be set with --set key=value (e.g. --set model.hidden_size=256).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a shipped preset: tiny (default), 30m, 125m, 340m, 1.3b")
    src.add_argument("--config", help="a config JSON file (same layout as flash_gsa/configs/*.json)")
    p.add_argument("--out", required=True, help="run folder: model, log.jsonl, loss.png, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--mixer", choices=sorted(MIXERS), help="token mixer of every layer (sets model.mixer)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field; repeatable")
    hints = typing.get_type_hints(TrainConfig)
    fields = p.add_argument_group("training fields (default: the preset's value)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in STRUCTURED_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            fields.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            fields.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=f.metadata["help"])
    p.set_defaults(run=_run_train, field_names=[f.name for f in dataclasses.fields(TrainConfig)])


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config `gsa train` runs: --config, or (resuming) the run's saved config, or --preset; then the overrides."""
    from .train.config import load_config, load_preset, parse_assignments
    from .train.loop import CONFIG_FILE

    saved = Path(args.out) / CONFIG_FILE
    if args.config:
        base = load_config(args.config)
    elif args.resume and args.preset is None and saved.is_file():
        base = load_config(saved)
    else:
        base = load_preset(args.preset or "tiny")
    overrides: dict[str, object] = {}
    for name in args.field_names:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.mixer:
        overrides["model.mixer"] = args.mixer
    overrides.update(parse_assignments(args.set))  # --set wins over the flags
    return base.override(overrides)


def _run_train(args: argparse.Namespace) -> int:
    from .train.loop import PLOT_FILE, NonFiniteLossError, train

    cfg = train_config_from_args(args)
    try:
        result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as e:
        print(f"gsa train: {e}", file=sys.stderr)
        return 1
    if _is_main_process():
        print(
            f"validation perplexity: {result.val_ppl:.3f} (loss {result.val_loss:.4f} per token) at step "
            f"{result.step}, {result.train_seconds:.0f} s of training"
        )
        if result.sample is not None:
            print(f"sample: {cfg.sample_prompt}{result.sample}")
        print(f"run folder: {result.out_dir} (model.safetensors, log.jsonl, {PLOT_FILE}, checkpoints/)")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model", description="Sample from a run.")
    p.add_argument("run_dir", help="a run folder written by gsa train (or one of its checkpoints)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="torch device; auto = cuda if available else cpu")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from .train.distributed import resolve_device
    from .train.sample import generate, load_run

    model, tokenizer = load_run(args.run_dir, resolve_device(args.device))
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw loss and perplexity curves of runs", description="Plot runs into a PNG.")
    p.add_argument("run_dirs", nargs="+", help="run folders (each with a log.jsonl)")
    p.add_argument("--out", default="loss_curves.png", help="PNG to write")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis")
    p.set_defaults(run=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    from .train.plot import plot_runs

    print(plot_runs(args.run_dirs, args.out, x=args.x))
    return 0


BENCHMARKS = {
    "op": "the GSA operator against its peers (fla chunk_gsa, SDPA), forward and forward+backward, and decoding",
    "resources": "shared memory, registers and spills of the Triton kernels, compiled for a GPU without one",
    "train": "tokens/s of a full training step against fla's GSAForCausalLM and a Llama (SDPA) of the same size",
    "lm": "train gsa, gla and attention on the same tokens; held-out perplexity, tokens/s and peak memory",
    "scaling": "a data-parallel run (DDP/FSDP2) against a single-device run at the same global batch",
}


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (`gsa bench NAME --help`)",
        description="Run a benchmark: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()),
    )
    p.add_argument("name", choices=tuple(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"flash_gsa.bench.{args.name}")
    return module.main(args.args)


def _add_mqar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mqar",
        help="recall benchmark: MQAR accuracy of gsa, gla, abc and attention",
        description="Train small models of each mixer on multi-query associative recall over a grid (settings x "
        "d_model x learning rate); write mqar_<device>.json/.png/.md. Unset flags take the grid's defaults "
        "(flash_gsa.eval.recall.MQARGrid, or QUICK_GRID with --quick).",
    )
    p.add_argument("--quick", action="store_true", help="a tiny grid that runs in minutes on a CPU")
    p.add_argument("--settings", nargs="+", metavar="T:PAIRS", help="sequence lengths and key-value pairs")
    p.add_argument("--d-models", nargs="+", type=int, metavar="D")
    p.add_argument("--mixers", nargs="+", metavar="MIXER", help="among attention, gsa, gla, abc")
    p.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="learning rates (the best one per cell is kept)")
    for flag, kind in (("--vocab-size", int), ("--steps", int), ("--batch-size", int), ("--eval-examples", int),
                       ("--workers", int), ("--seed", int), ("--budget-s", float), ("--target-accuracy", float)):
        p.add_argument(flag, type=kind)
    p.add_argument("--set", action="append", default=[], metavar="MIXER.FIELD=VALUE",
                   help="a GSAConfig field for one mixer's models, e.g. gsa.gate_logit_normalizer=4; repeatable")
    p.add_argument("--device", help="torch device; default cuda if available, else cpu")
    p.add_argument("--results-dir", default=None, help="where to write (default benchmarks/results)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="train nothing: join mqar_*.json files of runs that differ only in mixers and learning rates "
                   "(written under the first one's name, into --results-dir or the first one's folder)")
    p.set_defaults(run=_run_mqar)


def _run_mqar(args: argparse.Namespace) -> int:
    from .eval.recall import grid_from_options, merge_mqar, run_mqar

    if args.merge:
        try:
            payload = merge_mqar(args.merge, args.results_dir)
        except (ValueError, OSError) as e:
            print(f"gsa mqar --merge: {e}", file=sys.stderr)
            return 2
        print(payload["markdown"])
        print("\n".join(payload["files"]))
        return 0
    options = {k: getattr(args, k) for k in ("settings", "d_models", "mixers", "lrs", "vocab_size", "steps",
                                             "batch_size", "eval_examples", "workers", "seed", "budget_s",
                                             "target_accuracy")}
    grid = grid_from_options(args.quick, options, args.set)
    kwargs = {} if args.results_dir is None else {"results_dir": args.results_dir}
    payload = run_mqar(grid, device=args.device, quick=args.quick, **kwargs)
    print(payload["markdown"])
    print("\n".join(payload["files"]))
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_generate, _add_plot, _add_bench, _add_mqar
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsa", description="flash-gsa: Gated Slot Attention tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gsa`; errors of use (bad values, missing files) print one line and return 2."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file save/load bars; ours say what matters
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"gsa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

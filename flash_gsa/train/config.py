"""Training configuration: the `TrainConfig` dataclass, presets in `flash_gsa/configs/*.json`, overrides, validation.

A config file (and a preset) is JSON with three keys:

    {"description": "...", "model": {GSAConfig fields except vocab_size}, "train": {TrainConfig fields}}

Any field can be overridden with `key=value` strings (`steps=100`, `model.hidden_size=256`); values are parsed by
the field's declared type. Every bad value raises a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import GSAConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")

# Fields that are not plain training knobs: they get no `--flag` of their own on the command line.
STRUCTURED_FIELDS = ("description", "model")


def _f(default: Any, help: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides its output folder. Validated on construction."""

    description: str = _f("", "one line saying what this config is for")
    model: dict = _f({}, "GSAConfig fields (vocab_size comes from the tokenizer unless given)")
    tokenizer: str = _f("byte", "'byte', a Hugging Face tokenizer folder, or a .gguf file")
    data: str | None = _f(None, "text/.gz/.jsonl file or folder of them; default: the embedded Jane Austen corpus")
    cache_dir: str | None = _f(None, "where tokenized data is cached; default $FLASH_GSA_CACHE or ~/.cache/flash_gsa")
    val_fraction: float = _f(0.01, "fraction of the packed rows held out for validation")
    seq_len: int = _f(256, "tokens per packed row")
    batch_size: int = _f(16, "rows per micro-batch on each rank")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    steps: int = _f(1000, "optimizer steps of the whole run (sets the LR schedule)")
    stop_at: int | None = _f(None, "stop this invocation after this step (the schedule still spans `steps`)")
    lr: float = _f(3e-4, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of `lr`")
    warmup_steps: int = _f(100, "linear warm-up steps before the cosine decay (at most `steps`)")
    weight_decay: float = _f(0.01, "AdamW weight decay (matrices only; norms and biases are not decayed)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this; 0 disables clipping")
    precision: str = _f("auto", "bf16 (autocast), fp32, or auto (bf16 on CUDA, fp32 elsewhere)")
    device: str = _f("auto", "torch device; auto = cuda if available else cpu")
    activation_checkpointing: bool = _f(False, "recompute each layer's activations in the backward pass")
    compile: bool = _f(False, "torch.compile the model")
    parallel: str = _f("ddp", "ddp or fsdp (FSDP2 fully_shard); used when launched with torchrun")
    seed: int = _f(0, "seed of the initialisation, data order and sampling")
    log_every: int = _f(10, "write a metrics line every this many steps")
    eval_every: int = _f(200, "validate every this many steps (and at the end); 0 = only at the end")
    eval_batches: int = _f(20, "micro-batches per validation, per rank")
    save_every: int = _f(500, "checkpoint every this many steps (and at the end); 0 = only at the end")
    keep_last: int = _f(2, "checkpoints to keep")
    max_nonfinite: int = _f(10, "stop with an error once this many steps had a non-finite loss or gradient")
    sample_prompt: str = _f("It was", "prompt of the sample generated at the end")
    sample_tokens: int = _f(200, "tokens of the sample generated at the end; 0 = no sample")
    peak_tflops: float | None = _f(None, "peak TFLOP/s per device for MFU; default: known GPUs in bf16")

    def __post_init__(self) -> None:
        _validate(self)

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from the JSON layout `{"description", "model", "train"}`."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"description", "model", "train"}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; expected 'description', 'model', 'train'")
        train = d.get("train", {})
        if not isinstance(train, dict):
            raise ValueError("'train' must be a JSON object")
        _check_names(train)
        if "description" in train or "model" in train:
            raise ValueError("'description' and 'model' belong at the top level, not under 'train'")
        return cls(description=d.get("description", ""), model=dict(d.get("model", {})), **train)

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout `from_dict` reads."""
        train = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in STRUCTURED_FIELDS}
        return {"description": self.description, "model": dict(self.model), "train": train}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def override(self, assignments: dict[str, Any] | list[str]) -> TrainConfig:
        """A copy with fields replaced. Keys are field names or `model.<GSAConfig field>`; string values
        (from the command line) are parsed by the field's type. A list of `key=value` strings also works."""
        if isinstance(assignments, list):
            assignments = parse_assignments(assignments)
        train: dict[str, Any] = {}
        model = dict(self.model)
        hints = _hints()
        for key, value in assignments.items():
            if key.startswith("model."):
                name = key[len("model.") :]
                model[name] = _parse_json_like(value) if isinstance(value, str) else value
            else:
                _check_names([key])
                if key in STRUCTURED_FIELDS:
                    raise ValueError(f"'{key}' cannot be overridden as a whole; set model.<field>=... instead")
                train[key] = _coerce(key, value, hints[key]) if isinstance(value, str) else value
        return dataclasses.replace(self, model=model, **train)

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one rank."""
        return self.seq_len * self.batch_size * self.grad_accum


def list_presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> TrainConfig:
    """The shipped preset `name` (tiny, 30m, 125m, 340m, 1.3b)."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return load_config(path)


def load_config(path: str | Path) -> TrainConfig:
    """A config from a JSON file (same layout as the presets)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`["a=1", "model.b=x"]` -> `{"a": "1", "model.b": "x"}`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = value
    return out


def model_field_names() -> list[str]:
    """Fields GSAConfig accepts (from its constructor)."""
    params = inspect.signature(GSAConfig.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_names(names) -> None:
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown training field(s) {unknown}; valid: {', '.join(sorted(valid))}")


def _parse_json_like(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _coerce(name: str, value: str, hint: Any) -> Any:
    """Parse a command-line string for field `name` of type `hint`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    target = args[0] if args else hint
    text = value.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if target is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if target is int:
            f = float(text)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if target is float:
            return float(text)
    except ValueError:
        raise ValueError(f"{name} expects {getattr(target, '__name__', target)}, got {value!r}") from None
    return value


def _validate(c: TrainConfig) -> None:
    hints = _hints()
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        hint = hints[f.name]
        allowed = typing.get_args(hint) or (hint,)
        if v is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(v, int) and not isinstance(v, bool):
            object.__setattr__(c, f.name, float(v))
            continue
        ok = isinstance(v, tuple(a for a in allowed if a is not type(None)))
        if ok and isinstance(v, bool) and bool not in allowed:
            ok = False
        if not ok:
            raise ValueError(f"{f.name} must be {_type_name(hint)}, got {v!r}")

    def positive(*names: str) -> None:
        for n in names:
            if getattr(c, n) <= 0:
                raise ValueError(f"{n} must be > 0, got {getattr(c, n)}")

    def non_negative(*names: str) -> None:
        for n in names:
            if getattr(c, n) < 0:
                raise ValueError(f"{n} must be >= 0, got {getattr(c, n)}")

    positive("seq_len", "batch_size", "grad_accum", "steps", "lr", "log_every", "eval_batches", "keep_last")
    non_negative("warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every", "max_nonfinite")
    non_negative("sample_tokens")
    if c.seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {c.seq_len}")
    for n in ("lr", "grad_clip", "weight_decay", "val_fraction", "min_lr_ratio"):
        if not math.isfinite(getattr(c, n)):
            raise ValueError(f"{n} must be finite, got {getattr(c, n)}")
    if not 0.0 < c.val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {c.val_fraction}")
    if not 0.0 <= c.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}")
    for n in ("beta1", "beta2"):
        if not 0.0 <= getattr(c, n) < 1.0:
            raise ValueError(f"{n} must be in [0, 1), got {getattr(c, n)}")
    if c.stop_at is not None and not 0 < c.stop_at <= c.steps:
        raise ValueError(f"stop_at must be in [1, steps={c.steps}], got {c.stop_at}")
    if c.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {c.precision!r}")
    if c.parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {c.parallel!r}")
    if c.peak_tflops is not None and not c.peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0, got {c.peak_tflops}")
    if c.device != "auto":
        try:
            torch.device(c.device)
        except RuntimeError:
            raise ValueError(f"device {c.device!r} is not a torch device (try cpu, cuda, cuda:1 or auto)") from None
    if not c.tokenizer:
        raise ValueError("tokenizer must be 'byte', a tokenizer folder or a .gguf file")
    _validate_model(c.model)


def _validate_model(model: dict) -> None:
    """Unknown names are errors here; values are checked by GSAConfig itself (vocab_size is not known yet)."""
    names = model_field_names()
    unknown = sorted(set(model) - set(names))
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; GSAConfig accepts: {', '.join(names)}")
    try:
        GSAConfig(**{"vocab_size": 1, **model})
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join("None" if a is type(None) else a.__name__ for a in args)
    return hint.__name__

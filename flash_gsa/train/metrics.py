"""Run metrics: model FLOPs per token (for MFU), device peaks, and the JSONL metrics log."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

LOG_FILE = "log.jsonl"

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name (first match wins).
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("4090", 165.2),
    ("3090", 71.0),
)


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the override, else the bf16 peak of a known GPU when training in bf16, else None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, approximately: 6 x (parameters used in matmuls) plus 3 x the token mixers' own
    forward work. Per layer and token, a GSA/ABC layer reads and writes two m x d states per head,
    4 m d (H_q + H_kv); a GLA layer does the same with a d x d state; softmax attention over an average causal
    context of T/2 costs 4 d H_q T/2."""
    cfg = model.config
    matmul = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    if not getattr(cfg, "tie_word_embeddings", False):
        matmul -= model.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    hidden, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    attn_layers = set(getattr(cfg, "attn_layers", None) or ())
    mixer_fwd = 0.0
    for i in range(n_layers):
        if cfg.mixer == "attention" or i in attn_layers:
            hq = getattr(cfg, "attn_num_heads", None) or cfg.num_heads
            mixer_fwd += 4 * (hidden // hq) * hq * seq_len / 2
        else:
            hq = cfg.num_heads
            hkv = getattr(cfg, "num_kv_heads", None) or hq
            d = hidden // hq
            m = d if cfg.mixer == "gla" else cfg.num_slots
            mixer_fwd += 4 * m * d * (hq + hkv)
    return 6.0 * matmul + 3.0 * mixer_fwd


class MetricsLog:
    """Appends one JSON object per line to `RUN/log.jsonl` (flushed per line)."""

    def __init__(self, run_dir: str | Path, truncate_after_step: int | None = None, fresh: bool = False) -> None:
        """`fresh` empties the log; `truncate_after_step` drops records past that step (a resumed run rewrites
        the steps it repeats)."""
        self.path = Path(run_dir) / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
        elif truncate_after_step is not None and self.path.exists():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's log (a truncated last line, from a killed run, is skipped)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {LOG_FILE}; is it a training run folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def throughput(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s of the training steps from a run's metrics log: from the first logged step to the last (the steps
    before the first log line, which compile and autotune, are left out), and over all steps."""
    logs = [r for r in records if r.get("tok_per_s") is not None and r.get("elapsed_s")]
    if not logs:
        return {"tokens_per_s": None, "tokens_per_s_all": None, "warmup_steps_excluded": 0, "mfu": None}
    first, last = logs[0], logs[-1]
    overall = last["tokens"] / last["elapsed_s"]
    if len(logs) >= 2 and last["elapsed_s"] > first["elapsed_s"]:
        steady = (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
        excluded = first["step"]
    else:
        steady, excluded = overall, 0
    # MFU as the training loop reckons it (flops_per_token / the device's bf16 peak); None where the peak is unknown.
    mfu = steady * last["mfu"] / last["tok_per_s"] if last.get("mfu") is not None else None
    return {"tokens_per_s": steady, "tokens_per_s_all": overall, "warmup_steps_excluded": excluded, "mfu": mfu}

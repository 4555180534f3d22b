"""Training: configs and presets, data pipeline, tokenizers, the training loop, checkpoints, sampling, plots.

from flash_gsa.train import load_preset, train
result = train(load_preset("tiny").override({"steps": 200}), "runs/tiny")
"""

from .config import TrainConfig, list_presets, load_config, load_preset
from .data import PackedData, token_cache
from .loop import NonFiniteLossError, Trainer, TrainResult, train
from .plot import plot_runs
from .sample import generate, load_run
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "NonFiniteLossError",
    "PackedData",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "generate",
    "list_presets",
    "load_config",
    "load_preset",
    "load_run",
    "load_tokenizer",
    "plot_runs",
    "token_cache",
    "train",
]

"""Checkpoints: atomic writes, keep-last-N, and the state a run needs to resume exactly.

A checkpoint is a folder `RUN/checkpoints/step_00001234/` holding the model as `save_pretrained` writes it
(safetensors + config.json, so `from_pretrained` loads it), `optimizer.pt` and `trainer_state.pt` (scheduler,
RNG states, data position, counters). It is written under a temporary name and renamed into place only when
complete: a crash during a save leaves the temporary folder behind (removed by the next save) and every earlier
checkpoint intact. Old checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_atomically(run_dir: str | Path, step: int, write: Callable[[Path], None], keep_last: int) -> Path:
    """Call `write(folder)` on a temporary folder, fsync it, rename it to `step_<step>`, then prune to `keep_last`."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. a resumed run that stopped where it started)
        old = root / f"{_TMP_PREFIX}old-{final.name}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """The torch RNG states of this process (CPU, and every CUDA device when CUDA is up)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_training_files(folder: Path, optimizer_state: dict, trainer_state: dict) -> None:
    """The non-model part of a checkpoint (the model is written by `save_pretrained`)."""
    torch.save(optimizer_state, folder / OPTIMIZER_FILE)
    torch.save(trainer_state, folder / STATE_FILE)


def read_training_files(folder: str | Path) -> tuple[dict, dict]:
    """(optimizer state, trainer state) of a checkpoint folder."""
    folder = Path(folder)
    for name in (OPTIMIZER_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {name}")
    optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    trainer_state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return optimizer_state, trainer_state

"""What every benchmark result carries: a stamp of where and what it ran on, and plain JSON files.

Nothing here touches CUDA at import; `stamp()` asks torch for the device name only when CUDA is available.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT_ENV = "FLASH_GSA_COMMIT"  # set this where the checkout has no .git (e.g. a copied working tree)


def device_name() -> str:
    """The CUDA device's name, else the CPU's (`platform.processor()`, or "cpu")."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or "cpu"


def device_slug(name: str | None = None) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"; any CPU -> "cpu"."""
    import torch

    if name is None:
        name = device_name() if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """HEAD of this checkout ("+dirty" when tracked files differ), else $FLASH_GSA_COMMIT, else "unknown"."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV, "unknown")


def stamp() -> dict[str, Any]:
    """Device, software versions, commit and UTC date of a run (no host name)."""
    import torch

    return {
        "device": device_name(),
        "device_slug": device_slug(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write `payload` as indented JSON, atomically (a temporary file renamed over the target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())

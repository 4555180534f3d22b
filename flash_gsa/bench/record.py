"""What every benchmark result carries: a stamp of where and what it ran on, and plain JSON files; and the worker
processes the benchmarks run each impl in (`run_worker`, `emit_record`, `worker_env`, `Skip`).

Nothing here touches CUDA at import; `stamp()` asks torch for the device name only when CUDA is available.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT_ENV = "FLASH_GSA_COMMIT"  # set this where the checkout has no .git (e.g. a copied working tree)
RECORD_PREFIX = "@@"  # a worker's stdout line that carries one JSON record
# Triton cache shared by the peers' workers across runs (fla autotunes for minutes on first use); ours get a fresh one.
PEER_CACHE_DIR = Path(tempfile.gettempdir()) / "flash_gsa_bench_triton_cache"


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
    """$FLASH_GSA_COMMIT when set (a copied tree's .git may be stale: the device tool's copy carried an older HEAD),
    else HEAD of this checkout ("+dirty" when tracked files differ), else "unknown"."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
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
        return "unknown"


def stamp() -> dict[str, Any]:
    """Device, software versions, commit and UTC date of a run (no host name), and the load average over the
    last minute against its CPU count: a busy host (other jobs compiling or training) slows launch-bound work."""
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
        "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }


def finite(x: Any) -> Any:
    """`x` with every non-finite float (JSON has no NaN or inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write `payload` as indented JSON (non-finite floats as null), atomically (a temporary file renamed over the
    target)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite(payload), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


# ---- worker processes -----------------------------------------------------------------------------------------------


class Skip(Exception):
    """The impl is not available here (a missing package or backend): recorded as status "skipped"."""


def emit_record(record: dict[str, Any]) -> None:
    """Worker side: hand one record to the parent (one `@@{json}` line on stdout)."""
    print(RECORD_PREFIX + json.dumps(record), flush=True)


def worker_env(device: str, cache_dir: str | os.PathLike) -> dict[str, str]:
    """The environment of a worker: this checkout importable, unbuffered output, its own Triton cache directory, and
    Triton's interpreter on the CPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    return env


def run_worker(
    module: str, job: dict[str, Any], timeout_s: float, env: dict[str, str], log: Callable[[str], None],
    label: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Run `python -m <module> --worker <job as JSON>` in its own session with a wall-clock limit.

    Returns (the records it emitted, a failure message or None): a non-zero exit or a timeout (the worker's whole
    process group is killed) is a failure; the records emitted before it are kept. Its other output goes to `log`,
    each line prefixed with `[label]`.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(job)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    records: list[dict[str, Any]] = []
    label = label if label is not None else f"{job.get('kind', '')}:{job.get('impl', '')}"

    def reader():
        for line in proc.stdout:
            if line.startswith(RECORD_PREFIX):
                records.append(json.loads(line[len(RECORD_PREFIX):]))
            else:
                log(f"  [{label}] {line.rstrip()}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        code = proc.wait(timeout=timeout_s)
        failure = None if code == 0 else f"worker exited with code {code}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        failure = f"timeout: worker killed after {timeout_s:.0f} s"
    thread.join(timeout=10)
    return records, failure

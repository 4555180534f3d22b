"""`torchrun -m flash_gsa.train` with 2 CPU processes (Gloo): DDP and FSDP2 train, agree with each other, and an FSDP2
run stopped and resumed matches an uninterrupted one bit for bit. (On CPU only; the NCCL/GPU path is the same code.)"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flash_gsa.train.data import DEFAULT_CORPUS
from flash_gsa.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def _torchrun(out: Path, data: Path, *extra: str, nproc: int = 2, batch_size: int = 2) -> None:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    args = [
        sys.executable, *launcher, "-m", "flash_gsa.train",
        "--out", str(out), "--data", str(data), "--cache-dir", str(data.parent / "cache"), "--device", "cpu",
        "--seq-len", "32", "--batch-size", str(batch_size), "--grad-accum", "2", "--steps", "4", "--warmup-steps", "1",
        "--eval-every", "2", "--eval-batches", "2", "--save-every", "0", "--sample-tokens", "0", "--log-every", "1",
        "--set", "model.hidden_size=32", "--set", "model.num_hidden_layers=2", "--set", "model.num_slots=8",
        "--set", "model.intermediate_size=64", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_ddp_and_fsdp2_on_two_processes(tmp_path):
    data = tmp_path / "austen.txt"
    with gzip.open(DEFAULT_CORPUS, "rt") as f:
        data.write_text(f.read(60_000))
    _torchrun(tmp_path / "ddp", data, "--parallel", "ddp")
    _torchrun(tmp_path / "fsdp", data, "--parallel", "fsdp")
    _torchrun(tmp_path / "fsdp-split", data, "--parallel", "fsdp", "--stop-at", "2")
    _torchrun(tmp_path / "fsdp-split", data, "--resume")

    ddp, fsdp, split = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp"), _losses(tmp_path / "fsdp-split")
    assert len(ddp) == 4 and ddp[-1] < ddp[0]
    assert fsdp == pytest.approx(ddp, rel=1e-5)
    assert split == fsdp  # resumed FSDP2 run, bit for bit
    assert (tmp_path / "fsdp-split" / "model.safetensors").is_file()


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    """2 ranks x batch 2 read the same rows per step as 1 process x batch 4: the loss curves agree up to reduction
    order, and `gsa bench scaling` reports that (the GPU run of benchmarks/run_scaling.sh does the same on NCCL)."""
    from flash_gsa.bench.scaling import compare_runs, main

    data = tmp_path / "austen.txt"
    with gzip.open(DEFAULT_CORPUS, "rt") as f:
        data.write_text(f.read(60_000))
    _torchrun(tmp_path / "single", data, nproc=1, batch_size=4)
    _torchrun(tmp_path / "ddp", data, "--parallel", "ddp")
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 4 and single[-1] < single[0]
    assert ddp == pytest.approx(single, rel=1e-5)

    report = compare_runs(tmp_path / "single", {"ddp": tmp_path / "ddp"}, devices=2)
    (row,) = report["parallel"]
    assert row["steps_compared"] == 4 and row["max_rel_loss_diff"] < 1e-5
    assert row["tokens_per_s"] > 0 and row["speedup"] > 0
    assert main(["--single", str(tmp_path / "single"), "--run", f"ddp={tmp_path / 'ddp'}",
                 "--results-dir", str(tmp_path / "results"), "--name", "scaling_test"]) == 0
    assert (tmp_path / "results" / "scaling_test.json").is_file()
    assert (tmp_path / "results" / "scaling_test.png").stat().st_size > 0
    with pytest.raises(ValueError, match="devices must be >= 2"):
        compare_runs(tmp_path / "single", {"ddp": tmp_path / "ddp"}, devices=1)

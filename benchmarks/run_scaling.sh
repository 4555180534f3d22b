#!/usr/bin/env bash
# Data-parallel scaling on one machine with 2 GPUs (device kind nvidia-h200-x2): the 30m preset trained for STEPS
# steps on one GPU at batch 2*B, then with torchrun on 2 GPUs at batch B per rank, DDP and FSDP2 (same seed, data
# and global batch), then `gsa bench scaling` compares the loss curves and throughput. About 3-5 minutes (estimate:
# 30m at 32K tokens per step is well under a second per step on one H200; compilation of the kernels dominates).
#
#   bash benchmarks/run_scaling.sh [more gsa train arguments for all three runs]
#
# Environment: STEPS (default 200), B (default 16 rows of 1024 tokens per rank), DATA (default: the embedded corpus).
# Writes benchmarks/results/scaling_<gpu>.json and .png and copies them, the three runs' logs and this log to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
RESULTS=benchmarks/results
RUNS=${RUNS:-/tmp/flash_gsa_scaling}
STEPS=${STEPS:-200}
B=${B:-16}
mkdir -p "$OUT" "$RESULTS" "$RUNS"
export PYTHONUNBUFFERED=1
common=(--preset 30m --steps "$STEPS" --warmup-steps 20 --eval-every 0 --save-every 0 --sample-tokens 0
        --log-every 10 --overwrite)
[ -n "${DATA:-}" ] && common+=(--data "$DATA")
{
    $PY -c 'import torch; print("devices:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
    CUDA_VISIBLE_DEVICES=0 $PY -m flash_gsa.train "${common[@]}" --batch-size $((2 * B)) --out "$RUNS/single" "$@"
    $PY -m torch.distributed.run --nproc_per_node 2 -m flash_gsa.train "${common[@]}" --batch-size "$B" \
        --parallel ddp --out "$RUNS/ddp" "$@"
    $PY -m torch.distributed.run --nproc_per_node 2 -m flash_gsa.train "${common[@]}" --batch-size "$B" \
        --parallel fsdp --out "$RUNS/fsdp" "$@"
    $PY -m flash_gsa.bench.scaling --single "$RUNS/single" --run "ddp=$RUNS/ddp" --run "fsdp=$RUNS/fsdp" \
        --devices 2 --results-dir "$RESULTS"
} 2>&1 | tee "$OUT/scaling.log"
for run in single ddp fsdp; do cp "$RUNS/$run/log.jsonl" "$OUT/scaling_$run.jsonl"; done
if [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then cp "$RESULTS"/scaling_* "$OUT"/; fi

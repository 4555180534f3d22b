#!/usr/bin/env bash
# The MQAR recall benchmark on one CUDA GPU (flash_gsa.eval.recall, `gsa mqar`): attention, gsa, gla and abc at
# d_model 64/128/256/512, three learning rates, for seq_len 512 with 64 key-value pairs and 256 with 16, in ONE
# command of about 8 minutes. Run from anywhere; it works in the repository root.
#
#   bash benchmarks/run_mqar.sh [more gsa mqar arguments, e.g. --steps 3000 or --set gsa.gate_logit_normalizer=4]
#
# Environment: BUDGET_S (default 420): wall seconds for training the whole grid; every cell gets a share of what is
# left and anneals its learning rate within it; cells that cannot start in time are recorded as skipped. Start-up,
# the last cells' evaluation and the plot come on top (about a minute). WORKERS (default 6): training processes
# sharing the GPUs (small models are launch-bound, so several processes keep a GPU busy); with several GPUs visible
# the cells are dealt round-robin over them (on nvidia-h200-x2, WORKERS=12 puts 6 on each).
# Writes benchmarks/results/mqar_<gpu>.json, .png, .md and copies them, with the logs, to $OUT (5 files).
# To give each setting a whole command: `--settings 512:64` in one call, `--settings 256:16` in the next, then join
# the two JSON files (renamed apart) with `gsa mqar --merge A.json B.json`.
# Needs: python3 with CUDA torch, triton, transformers, tqdm, matplotlib. The stamp's commit comes from git, or from
# $FLASH_GSA_COMMIT where the copied tree has no .git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
RESULTS=benchmarks/results
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1

$PY - <<'EOF' 2>&1 | tee "$OUT/mqar.log"
import torch, triton, transformers, tqdm, matplotlib
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")
EOF

touch /tmp/mqar_start
# Per-cell lines go to stdout (and mqar.log); the progress bar to mqar_progress.log. The table is printed last.
$PY -m flash_gsa.cli mqar --budget-s "${BUDGET_S:-420}" --workers "${WORKERS:-6}" --results-dir "$RESULTS" "$@" \
    2> "$OUT/mqar_progress.log" | tee -a "$OUT/mqar.log" || { tail -n 40 "$OUT/mqar_progress.log"; exit 1; }
if [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then
    find "$RESULTS" -maxdepth 1 -name 'mqar_*' -newer /tmp/mqar_start -exec cp {} "$OUT"/ \;
fi

#!/usr/bin/env bash
# The language-model comparison on one CUDA GPU (flash_gsa.bench.lm, `gsa bench lm`): gsa, attention and gla at the
# 30m preset (6 layers x 512, byte tokenizer, 32 x 1024 = 32,768 tokens per step), each trained from the same seed
# on the same tokens of GCIDE + Wikipedia summaries, then held-out perplexity on every 20th Wikipedia summary and on
# Austen (never trained on), tokens/s and peak memory. Run from anywhere; it works in the repository root.
#
#   bash benchmarks/run_lm.sh [more gsa bench lm arguments, e.g. --set lr=0.002]
#   STEPS=10 bash benchmarks/run_lm.sh --quick --device cpu      # a CPU smoke test of this script
#
# Environment:
#   CORPORA (default ../shared/corpora beside the repository): gcide.txt.gz, austen.txt.gz, wiki_summaries.jsonl.gz.
#   STEPS (default 1500): optimizer steps per mixer (1500 x 32,768 = 49M tokens, about 1.1 passes over the 44.6M
#     training tokens). This is an ESTIMATE, not a measurement: the 30m models cost about 126M FLOP per token
#     (flash_gsa.train.metrics.flops_per_token), 4.1 TFLOP per step. Assuming about 10% of the H100's bf16 peak in
#     eager mode, i.e. ~40 ms per step (~0.8M tokens/s) for gsa and attention, and gla twice as slow (in the MQAR
#     run in benchmarks/results gla was ~2x slower than gsa at the same width), training takes about 60 + 60 + 120 s,
#     plus about 90 s of start-up, data split and tokenizing (~45 MB), Triton compilation, the training loop's final
#     validation, checkpoint and held-out evaluation (~4.3M tokens per mixer): about 5.5 minutes. At 5% of peak it
#     would take about 9.5 minutes: BUDGET_S then cuts the last mixer. Read `tokens_per_s` of the first mixer in the
#     log (it is printed as soon as that mixer is done) to set STEPS for the next run.
#   MIXERS (default "gsa attention gla"): gla, the least certain in time, runs last, so a cut run loses it only.
#   BUDGET_S (default 540): hard wall limit for the benchmark command. The JSON is rewritten after each mixer, so a
#     run cut by the limit still leaves the mixers it finished (in the JSON, PNG and table).
#   WORK (default /tmp/flash_gsa_lm): data split, token cache and the three run folders.
# Writes benchmarks/results/lm_<gpu>.json, .png, .md and copies them, with lm.log and lm_progress.log, to $OUT.
# Needs: python3 with CUDA torch, triton, transformers, tqdm, matplotlib. The stamp's commit comes from git, or from
# $FLASH_GSA_COMMIT where the copied tree has no .git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
RESULTS=benchmarks/results
CORPORA=${CORPORA:-../shared/corpora}
WORK=${WORK:-/tmp/flash_gsa_lm}
mkdir -p "$OUT" "$RESULTS" "$WORK"
export PYTHONUNBUFFERED=1

$PY - <<'EOF' 2>&1 | tee "$OUT/lm.log"
import torch, triton, transformers, tqdm, matplotlib
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")
EOF

touch "$WORK/.start"
# Per-mixer lines and the table go to stdout (and lm.log); progress bars and the trainer's messages to
# lm_progress.log.
# shellcheck disable=SC2086
status=0
timeout -k 20 "${BUDGET_S:-540}" $PY -m flash_gsa.cli bench lm --corpora "$CORPORA" --work-dir "$WORK" \
    --results-dir "$RESULTS" --steps "${STEPS:-1500}" --mixers ${MIXERS:-gsa attention gla} "$@" \
    2> "$OUT/lm_progress.log" | tee -a "$OUT/lm.log" || status=$?
if [ "$status" -ne 0 ]; then
    echo "gsa bench lm exited with status $status (124: cut by BUDGET_S); last progress lines:" | tee -a "$OUT/lm.log"
    tail -n 40 "$OUT/lm_progress.log" | tee -a "$OUT/lm.log"
fi
if [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then
    find "$RESULTS" -maxdepth 1 -name 'lm_*' -newer "$WORK/.start" -exec cp {} "$OUT"/ \;
fi
exit "$status"

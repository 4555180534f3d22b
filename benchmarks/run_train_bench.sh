#!/usr/bin/env bash
# The training-throughput benchmark on a CUDA machine (flash_gsa.bench.train): tokens/s of a full training step
# (forward with loss, backward, AdamW) of our GSAForCausalLM at the 340m preset, T=4096, B=4, bf16 autocast, against
# fla 0.6.0's GSAForCausalLM of the same shape and a Llama of the same size (transformers, SDPA). Run from anywhere;
# it works in the repository root.
#
#   bash benchmarks/run_train_bench.sh [warmup|bench|all] [more flash_gsa.bench.train arguments]
#
#   warmup  fla's first training step only (--warmup-only --impls fla-GSAForCausalLM, 540 s limit). fla autotunes
#           every kernel on first use: at this shape its first step once ran past 9 minutes on an H100. The compiled
#           kernels and the autotuning results (fla's FLA_CACHE_RESULTS, on by default) go to the peers' Triton cache
#           (PEER_CACHE_DIR in flash_gsa/bench/record.py, under /tmp), which later runs on the same machine reuse; a
#           worker killed at the limit keeps what it had tuned, so running 'warmup' again goes on from there until
#           fla's record is "ok". Also packs that cache into $OUT/peer_triton_cache.tar.gz (when <= 16 MiB), which a
#           later fresh machine unpacks from .carry/peer_triton_cache.tar.gz if it is there (the op benchmark's
#           script packs the same cache under the same name).
#   bench   the timed run, all three models in one run (180 s limit per model: a cold fla becomes a "timeout"
#           record, saying to warm it up first): JSON + PNG in benchmarks/results/ and copies in $OUT, then the
#           table with both ratios.
#   all     warmup then bench. Can exceed a 10-minute command on a cold machine: then run 'warmup' and 'bench' as
#           two commands on the same (still warm) machine, or carry the packed cache.
#
# Needs: python3 with CUDA torch, triton, transformers, einops, matplotlib; the fla wheels (fla_core-*.whl and
# flash_linear_attention-*.whl: fla's models are in the second) in .carry/wheels, installed with --no-deps into
# /tmp/site when fla.models is not importable already. Without them fla is recorded as "skipped".
# The stamp's commit comes from git, or from $FLASH_GSA_COMMIT where the copied tree has no .git.
# Extra arguments go to flash_gsa.bench.train in both phases (not --results-dir: results go to benchmarks/results),
# e.g. `--batch 2` (keep them the same in both phases: fla tunes per shape); a later `--timeout-s S` overrides the
# limits above.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
RESULTS=benchmarks/results
mkdir -p "$OUT" "$RESULTS"
LOG="$OUT/train_bench.log"
phase=${1:-all}
[ $# -gt 0 ] && shift
case "$phase" in all|warmup|bench) ;; *) echo "usage: $0 [warmup|bench|all] [args]" >&2; exit 2 ;; esac
START=$(mktemp /tmp/train_bench_start.XXXXXX)  # results newer than this are this run's

# shellcheck source=benchmarks/peer_cache.sh
source benchmarks/peer_cache.sh
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! $PY -c 'import fla.models' >/dev/null 2>&1; then
    install_fla_wheels .carry/wheels/fla_core-*.whl .carry/wheels/flash_linear_attention-*.whl ||
        echo "no fla wheels in .carry/wheels: fla-GSAForCausalLM will be recorded as skipped" | tee -a "$LOG"
fi
export PYTHONUNBUFFERED=1

unpack_peer_cache
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, transformers, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")
try:
    import fla
    import fla.models  # noqa: F401
    print(f"fla {fla.__version__} (models importable)")
except ImportError as e:
    print(f"fla models not importable: {e}")
EOF

if [ "$phase" != bench ]; then
    echo "== warm-up: fla's first training step (compile + autotune) ==" | tee -a "$LOG"
    $PY -m flash_gsa.bench.train --warmup-only --impls fla-GSAForCausalLM --timeout-s 540 "$@" \
        --results-dir "$RESULTS" 2>&1 | tee -a "$LOG"
    pack_peer_cache
fi
if [ "$phase" != warmup ]; then
    echo "== timed run ==" | tee -a "$LOG"
    $PY -m flash_gsa.bench.train --timeout-s 180 "$@" --results-dir "$RESULTS" 2>&1 | tee -a "$LOG"
fi
if [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then
    find "$RESULTS" -maxdepth 1 -name 'train_*' -newer "$START" -exec cp {} "$OUT"/ \;
fi

#!/usr/bin/env bash
# The op benchmark on a CUDA machine (flash_gsa.bench.op): our Triton and chunk backends against fla 0.6.0's
# chunk_gsa and torch SDPA (flash), forward and forward+backward, plus the decoding step against fla's
# fused_recurrent_gsa. Run from anywhere; it works in the repository root.
#
#   bash benchmarks/run_op_bench.sh [all|warmup|bench] [more flash_gsa.bench.op arguments]
#
#   warmup  fla's first calls only. fla autotunes every kernel on first use (minutes per hidden size); its choices go
#           to a Triton cache that later runs on the same machine reuse (PEER_CACHE_DIR in op.py, under /tmp). Also
#           packs that cache into $OUT/peer_triton_cache.tar.gz (when <= 16 MiB), which a later fresh machine
#           unpacks from .carry/peer_triton_cache.tar.gz if it is there.
#   bench   the timed run: JSON + PNG in benchmarks/results/ and copies in $OUT, then the summary table.
#   all     warmup then bench (the default). Can exceed a 10-minute command on a cold machine: then run
#           'warmup' and 'bench' as two commands on the same (still warm) machine, or carry the packed cache.
#
# Needs: python3 with CUDA torch, triton, einops, matplotlib (the device image has them); the fla-core wheel in
# .carry/wheels (installed with --no-deps into /tmp/site; the flash-linear-attention wheel, fla's layers and models,
# is not needed and not installed). Without it the fla peers are recorded as "skipped".
# The stamp's commit comes from git, or from $FLASH_GSA_COMMIT where the copied tree has no .git.
# Extra arguments go to flash_gsa.bench.op in both phases (not --results-dir: results go to benchmarks/results),
# e.g. `bench --hidden 1024` then `bench --hidden 2048 --merge` splits the timed run in two; `--timeout S` is each
# worker's limit (default here 540 s for the warm-up, 240 s for the timed run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
RESULTS=benchmarks/results
mkdir -p "$OUT" "$RESULTS"
LOG="$OUT/op_bench.log"
phase=${1:-all}
[ $# -gt 0 ] && shift
case "$phase" in all|warmup|bench) ;; *) echo "usage: $0 [all|warmup|bench] [args]" >&2; exit 2 ;; esac

# shellcheck source=benchmarks/peer_cache.sh
source benchmarks/peer_cache.sh
install_fla_wheels .carry/wheels/fla_core-*.whl ||
    echo "no .carry/wheels/fla_core-*.whl: the fla peers will be recorded as skipped" | tee -a "$LOG"
export PYTHONUNBUFFERED=1
unpack_peer_cache
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}")
try:
    import fla
    print(f"fla {fla.__version__}")
except ImportError as e:
    print(f"fla not importable: {e}")
EOF

if [ "$phase" != bench ]; then
    echo "== warm-up: fla compiles and autotunes (first calls only) ==" | tee -a "$LOG"
    $PY -m flash_gsa.bench.op --warmup-only --impls fla-chunk_gsa --decode-impls fla-fused_recurrent_gsa \
        --timeout 540 "$@" 2>&1 | tee -a "$LOG"
    pack_peer_cache
fi
if [ "$phase" != warmup ]; then
    echo "== timed run ==" | tee -a "$LOG"
    touch /tmp/op_bench_start
    $PY -m flash_gsa.bench.op --timeout 240 --markdown "$@" --results-dir "$RESULTS" 2>&1 | tee -a "$LOG"
    if [ "$(realpath "$OUT")" != "$(realpath "$RESULTS")" ]; then
        find "$RESULTS" -maxdepth 1 -name 'op_*' -newer /tmp/op_bench_start -exec cp {} "$OUT"/ \;
    fi
fi

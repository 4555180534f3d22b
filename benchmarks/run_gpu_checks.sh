#!/usr/bin/env bash
# The test suite on a CUDA machine, as the kernels must be checked before any benchmark: the interpreter that CI uses
# cannot see errors of the compiled code (on 2026-11-30 it passed kernels that read invalid shared memory on an H200).
#
#   bash benchmarks/run_gpu_checks.sh          # about 3-4 minutes on an H200 (first compiles included)
#   FLA=1 bash benchmarks/run_gpu_checks.sh    # and the fla comparison after them: about 2.5 minutes more
#
# 1. the CUDA-relevant test files, compiled for the GPU (pytest-xdist, WORKERS processes; the slow CPU-process tests
#    and the fla comparison, which autotunes for minutes, are left out; run the latter alone with
#    `pytest tests/test_triton_chunk.py -k fla -s`);
# 2. the kernel tests once more under compute-sanitizer's memcheck (-x: the first bad access names kernel and line);
# 3. with two GPUs or more, the tests that put tensors on a GPU that is not the current one (both GPUs visible);
# 4. with FLA=1, after the others, the comparison with fla's chunk_gsa (fla-core from .carry/wheels, installed as the op
#    bench does; fla's Triton cache, with its autotuning results, from benchmarks/peer_cache.sh).
# Writes gpu_tests.log, memcheck.log (and multi_gpu.log) to $OUT (default: benchmarks/results/gpu_checks) and prints a summary.
# Steps 1 and 2 run side by side: one GPU each when there are two, else both on the one GPU (an H200 holds both).
# Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu_checks}
WORKERS=${WORKERS:-8}
export PYTHONUNBUFFERED=1
gpus=$($PY -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -lt 1 ]; then echo "no CUDA device: nothing to check here (CI covers the kernels through the interpreter)"; exit 2; fi
mkdir -p "$OUT"
second=$((gpus > 1 ? 1 : 0))

CUDA_VISIBLE_DEVICES=0 $PY -m pytest -p no:cacheprovider -n "$WORKERS" -m "not slow" -k "not fla" -rfE \
    tests/test_triton_chunk.py tests/test_triton_decode.py tests/test_compile.py tests/test_ops.py \
    tests/test_layer.py tests/test_model.py tests/test_mixers.py > "$OUT/gpu_tests.log" 2>&1 &
tests=$!
if command -v compute-sanitizer > /dev/null; then
    CUDA_VISIBLE_DEVICES=$second compute-sanitizer --tool memcheck --print-limit 8 \
        $PY -m pytest -x -p no:cacheprovider -p no:xdist tests/test_triton_chunk.py tests/test_triton_decode.py \
        -k "not real_size and not fla" > "$OUT/memcheck.log" 2>&1
    memcheck=$?
else
    echo "compute-sanitizer not found" > "$OUT/memcheck.log"
    memcheck=0
fi
wait "$tests"
tests_status=$?
multi=0
if [ "$gpus" -gt 1 ]; then
    $PY -m pytest -p no:cacheprovider -p no:xdist -rfE -k "not_current" tests/test_triton_chunk.py \
        tests/test_triton_decode.py > "$OUT/multi_gpu.log" 2>&1
    multi=$?
    echo "== two GPUs (exit $multi): $OUT/multi_gpu.log"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/multi_gpu.log" | cut -c1-240
fi

echo "== tests on the GPU (exit $tests_status): $OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR)|relative errors of|[0-9]+ (passed|failed)" "$OUT/gpu_tests.log" | cut -c1-240
echo "== memcheck (exit $memcheck): $OUT/memcheck.log"
grep -E "Invalid|^=========     at |ERROR SUMMARY|[0-9]+ (passed|failed)" "$OUT/memcheck.log" | head -n 12
fla=0
if [ "${FLA:-0}" = 1 ]; then
    LOG="$OUT/fla.log"
    # shellcheck source=benchmarks/peer_cache.sh
    source benchmarks/peer_cache.sh
    install_fla_wheels .carry/wheels/fla_core-*.whl || echo "no .carry/wheels/fla_core-*.whl" >> "$LOG"
    unpack_peer_cache
    TRITON_CACHE_DIR="$PEER_CACHE" $PY -m pytest -p no:cacheprovider -p no:xdist -s -rfEs -k fla \
        tests/test_triton_chunk.py >> "$LOG" 2>&1
    fla=$?
    echo "== fla comparison (exit $fla): $LOG"
    grep -E "ours .* fla |^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped)" "$LOG" | cut -c1-240
fi
[ "$tests_status" -eq 0 ] && [ "$memcheck" -eq 0 ] && [ "$multi" -eq 0 ] && [ "$fla" -eq 0 ]

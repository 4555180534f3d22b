# Sourced by run_op_bench.sh and run_train_bench.sh: fla's Triton cache (PEER_CACHE_DIR in flash_gsa/bench/record.py,
# under /tmp), which holds its autotuning choices, carried between machines as .carry/peer_triton_cache.tar.gz.
# Without one there, benchmarks/fla_autotune_nvidia-h200.tar.gz is unpacked instead: fla 0.6.0's autotuning results
# (*.autotune.json only) from an H200 with torch 2.11 and triton 3.6, for the op bench's hidden-1024 shapes and the
# decoding step (session 14). Triton finds them only where its cache keys match (same fla, triton and GPU
# architecture); other shapes are tuned on first use as before. They save a fresh machine minutes of fla's tuning.
# Also installs fla's carried wheels (install_fla_wheels). Needs $PY, $LOG and $OUT; sets $PEER_CACHE.

PEER_CACHE=$($PY -c 'from flash_gsa.bench.record import PEER_CACHE_DIR; print(PEER_CACHE_DIR)')

# Unpacks a carried cache into PEER_CACHE, unless this machine already has one.
unpack_peer_cache() {
    local packed
    for packed in .carry/peer_triton_cache.tar.gz benchmarks/fla_autotune_nvidia-h200.tar.gz; do
        if [ -f "$packed" ] && [ ! -d "$PEER_CACHE" ]; then
            mkdir -p "$PEER_CACHE" && tar -xzf "$packed" -C "$PEER_CACHE"
            echo "unpacked $packed into $PEER_CACHE" | tee -a "$LOG"
        fi
    done
}

# Packs PEER_CACHE into $OUT/peer_triton_cache.tar.gz when it is at most 16 MiB (what a device call brings back);
# when it is larger, packs only the autotuning results (*.autotune.json): a fresh machine then compiles fla's chosen
# configurations again (seconds each) but does not re-tune them (the minutes).
pack_peer_cache() {
    if [ -d "$PEER_CACHE" ]; then
        local limit=$((16 * 1024 * 1024)) size what="everything"
        tar -czf /tmp/peer_triton_cache.tar.gz -C "$PEER_CACHE" .
        size=$(stat -c %s /tmp/peer_triton_cache.tar.gz)
        if [ "$size" -gt "$limit" ]; then
            (cd "$PEER_CACHE" && find . -name '*.autotune.json' -print0 | tar -czf /tmp/peer_triton_cache.tar.gz --null -T -)
            size=$(stat -c %s /tmp/peer_triton_cache.tar.gz)
            what="autotuning results only"
        fi
        if [ "$size" -le "$limit" ]; then cp /tmp/peer_triton_cache.tar.gz "$OUT/"; else what="nothing (too big)"; fi
        echo "peer Triton cache: $(du -sh "$PEER_CACHE" | cut -f1), packed $((size / 1024)) KiB: $what" | tee -a "$LOG"
    fi
}

# Installs those of the given wheel files that exist into /tmp/site, with one pip call (fla-core and
# flash-linear-attention share the fla/ folder, which --target --upgrade replaces per call), and puts /tmp/site on
# PYTHONPATH (--no-deps: the machine's torch and triton stay). Returns 1 when none exists.
install_fla_wheels() {
    local wheels=() wheel
    for wheel in "$@"; do [ -f "$wheel" ] && wheels+=("$wheel"); done
    [ ${#wheels[@]} -gt 0 ] || return 1
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
    case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
}

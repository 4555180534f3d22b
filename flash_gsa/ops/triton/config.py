"""Every tunable of the Triton backend, in one place."""

CHUNK = {16: 64, 32: 64, 64: 64, 128: 64, 256: 16}  # tokens per chunk, by M (slots); states are stored at chunk ends
# Chosen from `gsa bench resources` (sm_90, K = V = 256 and 512): at M = 256 a 64-token chunk needs more shared memory
# than the H100 has and 32 tokens compile to kernels that spill 70 KB; 16 spill least. M = 128 fits at 64 tokens
# (120 KiB) and spills less there than at 32.
FAST_DECAY_LIMIT = 60.0  # chunk decay beyond which the exact (slow) intra-chunk path runs; exp(60) ~ 1e26. The fast
# path takes one matrix product per intra-chunk form, the exact path one pass per diagonal (intra.py).
EXACT_ITEMS = 4  # (chunk, kv-head) pairs per program of the exact path's launches (function._launch_both_paths). At
# 32K tokens and 4 kv-heads: 512 programs, about two per SM at the heavy kernels' 255 registers, so all-exact inputs
# still fill the GPU, and a launch with no flagged chunk starts two waves of programs rather than eight.
TILE = {"output": 128, "bwd_values": 64, "bwd_keys": 64}  # width of the K and V tiles each kernel's
# matrix products take (capped at K or V). From the H200 sweeps (benchmarks/tune_kernels.py, K = V = 256 and 512):
# 128 made output 6-28% faster; the token-gradient kernel of sessions 10-15 was 27-51% slower at 128 (more spills);
# session 16 (H200): bwd_values 0.386 -> 0.689 ms and bwd_keys 0.296 -> 0.427 ms at 128 (hidden 2048, T = 2048).
MIN_TILE_BYTES = 128  # smallest K / V tile row (masked past K or V): 64 columns of 16-bit inputs, 32 of fp32. As
# compiled by Triton 3.6 for an H200, narrower 16-bit tiles go wrong: 16 columns read invalid shared memory; 32
# columns gave wrong o / dv when the kernel's other loop took wider tiles (K = 64, V = 16 or 32; dq at K = 32, V = 64)
# and wrong dk / dv when the token-gradient kernel also formed dq (K = 32, grouped heads). The interpreter and
# memcheck saw nothing; tests/test_triton_chunk.py::test_head_dim_mixes covers these on a GPU.
BLOCK_SCAN = 64  # columns of the [M, K + V] state one scan program carries
BLOCK_SCAN_M = (32, 64)  # ... and slots (rows): the second when that still makes SCAN_MANY_PROGRAMS programs, else
SCAN_MANY_PROGRAMS = 256  # the first. H200, both scans, whose walks form each chunk's product on the tensor cores:
# 64 rows took 0.25 / 0.48 ms against 0.32 / 0.62 ms for 32 at T = 2048 (hidden 1024 / 2048; 512 / 1024 programs at
# 64 rows), 0.35 / 0.49 against 0.32 / 0.62 at T = 8192 (128 / 256 programs) and 1.19 / 1.21 against 0.92 / 0.99 at
# T = 32768 (32 / 64 programs): each walk is latency-bound, so the fewer the walks the more their tiles should split.
# (Tried on the H200 and dropped: a sequential walk per direction that builds each chunk's contribution on the way
# instead of chunk_local + the scan. Both directions took 0.82 / 1.29 ms at T = 2048 (hidden 1024 / 2048) against
# 0.27 / 0.49 ms for local + scan, and 2.5-2.7 ms at T = 32768. Again, forward only, with four chunks' loads issued
# ahead of the stores as in the scan (chunk_states, commit 1496c3c): 0.44 / 0.87 ms against 0.19 / 0.34 ms for local +
# forward scan; with two chunks per step 0.40 / 0.76 ms; with pipelined loads or 8 warps slower still.)

MAX_REGISTERS = {"output": 255, "bwd_values": 255, "bwd_keys": 255}  # per thread (ptxas' .maxnreg), as 255 is
# ptxas' own limit: without the cap, the fast-path slot-gradient kernel of sessions 12-15 at M = 256 (16-token
# chunks) was compiled to 32 registers and 40 KB of spill code (255 registers and 6 KB with it; `gsa bench
# resources`).
NUM_WARPS = {"local": 4, "scan": 4, "output": 4, "bwd_values": 4, "bwd_keys": 4}
NUM_STAGES = {"local": 1, "scan": 1, "output": 2, "bwd_values": 3, "bwd_keys": 3}
# (output 1 -> 2 and backward 2 -> 3 in the H200 sweep: fwd+bwd 1-5% faster. local has no loop; the scan's
# prefetched walk issues its loads ahead by hand, which leaves nothing for Triton's pipelining to take.)
# 4 warps everywhere: at 8 warps the heavy kernels as compiled by Triton 3.6 for an H200 went wrong at M = 16 and 32
# (invalid shared-memory reads in key_decay's tf32 product under compute-sanitizer; wrong dg at M = 32 with grouped
# heads), which the interpreter cannot see. (On an H100, 8 warps had been 15-25% faster at M = 64; on the H200, with
# one matrix product per intra-chunk form, 8 warps at M = 64 made fwd+bwd 2-16% slower.)
SCAN_STAGES = 6  # stages of the scan's pipelined walk (scan.py), taken when the state splits into at least
# SCAN_MANY_PROGRAMS tiles of 64 slots; otherwise each walk issues its loads two chunks ahead by hand. H200, hidden
# 2048: at T = 2048 (1024 / 512 programs) the pipelined walk took the forward / reverse scans from 0.174 / 0.084-0.090
# ms to 0.158 / 0.087 (4 stages) and 0.152 / 0.079-0.080 (6 stages); at T = 8192 the reverse scans (256 programs of 32
# slots) took 0.153 against 0.114-0.121 ms, and at T = 32768 all scans 1.52 against 1.03 ms (4 stages; 16-slot tiles
# did not help).
SCAN_SHARED_BYTES = 160 * 1024  # shared memory the pipelined scan's stages may take (fewer stages where they don't
# fit: fp32 tiles, grouped heads; the prefetched walk below two); an A100 has 163 KiB per block, an H100 227 KiB.

# bf16 operands for the intra-chunk products of 16-bit inputs (else fp32, i.e. tf32 on tensor cores). The H100
# benchmark in benchmarks/results was measured with both False; bf16 in the backward raised the gate gradient's
# error from ~2e-2 to ~4e-2 at T = 2048. H200, session 18 (bwd_values' four products): bwd_values 0.301 -> 0.270 ms
# (hidden 1024) and 0.385 -> 0.357 ms (hidden 2048) at T = 2048; errors against float64 at T = 8192 (the real-size
# test; before, the fla comparison's, whose g and s are bf16): dq 3.6e-3 -> 4.1e-3, dg 4.1e-3 -> 5.1e-3. Session 19
# (benchmarks/results/tune_kernels_nvidia-h200-session19.json): fwd+bwd 1.333 -> 1.303 ms at hidden 2048, T = 2048;
# taken for the backward, which the 3x-over-fla target needs there (fla took 3.95-4.04 ms in the last runs), where
# M and the chunk are at least 64 (function._sizes: narrower bf16 operands went wrong on the H200).
# (Also measured in session 19 and dropped: bwd_values split after its tile loop, the per-chunk epilogue in a kernel
# of its own, bwd_logits, 0.144 ms at 255 registers, latency-bound as before: the two took 0.37 against 0.385 ms,
# and bwd_keys 0.01 ms more for the values' state terms it then read; fwd+bwd 1.329 against 1.333 ms, 1.301 with bf16
# products.)
LOWP_FORWARD = False
LOWP_BACKWARD = True

# Decoding kernel (decode.py): one program per (sequence, kv-head) walks the state in tiles.
DECODE_PRODUCT = 8192  # fp32 elements of one tile's [query heads, K or V tile, M] product (64 registers at 4 warps)
DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 1

# Cross-entropy of the LM loss (cross_entropy.py): one program per row walks the vocabulary in blocks.
CE_BLOCK = 4096  # vocabulary entries per block (16 per thread at 8 warps)
CE_NUM_WARPS = 8
CE_NUM_STAGES = 3  # Triton's default for CUDA (the kernels' block loops are pipelined as before the launch cache)

# RMSNorm (rms_norm.py): a program takes whole rows, NORM_BLOCK values at a time (4 rows of 1024).
NORM_BLOCK = 4096
NORM_MAX_D = 8192  # widest row the kernels take (one row per program there); wider rows take the PyTorch path
NORM_NUM_WARPS = 4
NORM_NUM_STAGES = 3  # Triton's default for CUDA
NORM_BWD_PROGRAMS = 528  # backward programs (4 per SM of an H100/H200), each summing its rows' share of dw


def chunk_size(M: int) -> int:
    """Tokens per chunk for M slots (a power of two from 16 to 256). M may be a symbolic size (a fake implementation
    under torch.compile with dynamic shapes): int() specializes it, as the kernels do anyway."""
    return CHUNK[int(M)]


# Host-side size arithmetic. triton.cdiv and triton.next_power_of_2 are jit functions in Triton 3.6: calling them from
# Python costs about 2 us each, a good part of a decoding step's host time.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()

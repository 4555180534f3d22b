"""Every tunable of the Triton backend, in one place."""

CHUNK = 64  # tokens per chunk: states are stored at chunk boundaries
SUB = 16  # sub-chunk inside a chunk: pairs within one are taken exactly, across them through an anchor
FAST_DECAY_LIMIT = 60.0  # sub-chunk decay beyond which the exact (slow) intra-chunk path runs; exp(60) ~ 1e26
BLOCK_K = 64  # tile of the key dimension K in matrix products
BLOCK_V = 64  # tile of the value dimension V
BLOCK_SCAN = 64  # columns of the [M, K + V] state one scan program carries
BLOCK_SCAN_M = 16  # ... and slots (rows); small tiles give the latency-bound scan more programs

NUM_WARPS = {"local": 4, "scan": 4, "output": 8, "bwd_query": 8, "bwd_kv": 4, "bwd_gate": 8}
NUM_STAGES = {"local": 2, "output": 2, "bwd_query": 1, "bwd_kv": 2, "bwd_gate": 1}

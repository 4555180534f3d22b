"""Every tunable of the Triton backend, in one place."""

CHUNK = 64  # tokens per chunk: states are stored at chunk boundaries
SUB = 16  # sub-chunk inside a chunk: pairs within one are taken exactly, across them through an anchor
FAST_DECAY_LIMIT = 60.0  # sub-chunk decay beyond which the exact (slow) intra-chunk path runs; exp(60) ~ 1e26
BLOCK_K = 64  # tile of the key dimension K in matrix products
BLOCK_V = 64  # tile of the value dimension V
BLOCK_SCAN = 64  # columns of the [M, K + V] state one scan program carries
BLOCK_SCAN_M = 16  # ... and slots (rows); small tiles give the latency-bound scan more programs

NUM_WARPS = {"local": 4, "scan": 4, "output": 8, "bwd_query": 8, "bwd_kv": 4, "bwd_gate": 8}
NUM_STAGES = {"local": 2, "output": 1, "bwd_query": 2, "bwd_kv": 2, "bwd_gate": 2}
# Measured on an H100 (bf16, 32K tokens, H=4, M=64, K=V=256 and 512): 8 warps beat 4 by 15-25% on the three
# heavy kernels; stages barely matter.
# bf16 operands for the intra-chunk products in the forward (16-bit inputs); the backward keeps them in fp32
# (tf32), which holds the gate gradient's error near 1e-2 instead of 4e-2.
LOWP_FORWARD = True
LOWP_BACKWARD = False

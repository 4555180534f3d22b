"""The triton backend of `flash_gsa.gsa`: fused chunkwise kernels for training, a recurrent kernel for decoding."""

from .function import gsa_triton

__all__ = ["gsa_triton"]

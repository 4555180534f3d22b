"""The triton backend: fused chunked training kernels and the decoding kernel. `flash_gsa.gsa(..., backend="triton")`
reaches the training kernels through `flash_gsa.ops.custom_op`."""

from .decode import fused_recurrent_gsa

__all__ = ["fused_recurrent_gsa"]

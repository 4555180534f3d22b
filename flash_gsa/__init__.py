"""flash-gsa: Gated Slot Attention for real work."""

from .ops import gsa

__version__ = "0.1.0"
__all__ = ["gsa", "__version__"]

"""flash-gsa: Gated Slot Attention for real work."""

from .layers import GatedSlotAttention
from .models import GSAConfig, GSAForCausalLM
from .ops import gsa

__version__ = "0.1.0"
__all__ = ["GSAConfig", "GSAForCausalLM", "GatedSlotAttention", "gsa", "__version__"]

"""GSA language models for Hugging Face transformers. Importing this registers model_type "flash_gsa" with
AutoConfig, AutoModel and AutoModelForCausalLM."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import GSACache, LayerState
from .configuration_gsa import GSAConfig
from .modeling_gsa import GSAForCausalLM, GSAModel, GSAPreTrainedModel

AutoConfig.register(GSAConfig.model_type, GSAConfig, exist_ok=True)
AutoModel.register(GSAConfig, GSAModel, exist_ok=True)
AutoModelForCausalLM.register(GSAConfig, GSAForCausalLM, exist_ok=True)

__all__ = ["GSACache", "GSAConfig", "GSAForCausalLM", "GSAModel", "GSAPreTrainedModel", "LayerState"]

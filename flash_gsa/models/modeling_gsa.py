"""GSA language model: Llama-style blocks (pre-RMSNorm, token mixer, SwiGLU MLP), as Hugging Face models."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers import MIXERS, GatedSlotAttention, RMSNorm, ShortConvolution, SwiGLU
from .cache import GSACache
from .configuration_gsa import GSAConfig
from .loss import causal_lm_loss

try:  # transformers >= 5: these skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # older transformers initialise before loading
    from torch.nn import init


class GSABlock(nn.Module):
    """`h = x + mixer(RMSNorm(x))`, then `h + MLP(RMSNorm(h))`. The mixer is `MIXERS[config.layer_mixer(layer_idx)]`."""

    def __init__(self, config: GSAConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = MIXERS[config.layer_mixer(layer_idx)](config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        # transformers initialises leaf modules one by one, without their context: mark the special ones here.
        if isinstance(self.mixer, GatedSlotAttention):
            for proj in (self.mixer.q_proj, self.mixer.k_proj, self.mixer.v_proj, self.mixer.f_proj):
                proj.init_role = "xavier"
        for proj in (getattr(self.mixer, "o_proj", None), self.mlp.down_proj):
            if isinstance(proj, nn.Linear):
                proj.init_role = "residual"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: GSACache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        h = hidden_states + self.mixer(
            self.mixer_norm(hidden_states),
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return h + self.mlp(self.mlp_norm(h))


class GSAPreTrainedModel(PreTrainedModel):
    """Weight init and the Hugging Face plumbing shared by `GSAModel` and `GSAForCausalLM`."""

    config_class = GSAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GSABlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _is_stateful = True  # recurrent states cannot be rolled back (no assisted decoding)

    def _init_weights(self, module: nn.Module) -> None:
        """Embeddings and linear maps N(0, initializer_range); GSA's q, k, v, f projections Xavier-uniform with gain
        2^-2.5; every residual output projection (o_proj, down_proj) N(0, initializer_range / sqrt(2L)); norms 1."""
        std = self.config.initializer_range
        role = getattr(module, "init_role", None)  # set by GSABlock
        if isinstance(module, nn.Linear) and role == "xavier":
            init.xavier_uniform_(module.weight, gain=2**-2.5)
        elif isinstance(module, nn.Linear) and role == "residual":
            init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ShortConvolution):
            bound = 1 / math.sqrt(module.kernel_size)
            init.uniform_(module.weight, -bound, bound)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding of the base model (`GSAModel.embed_tokens`; for `GSAForCausalLM`, its `model`'s)."""
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embed_tokens = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """`generate()` must not build a DynamicCache: the model creates its own `GSACache`."""
        return False


def _cache_argument(past_key_values: GSACache | None, kwargs: dict) -> GSACache | None:
    """The cache passed in: transformers >= 5.24 names it `cache` (generate() passes it so), older versions
    `past_key_values`; both are accepted."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as past_key_values or as cache, not both")
    return past_key_values if cache is None else cache


def _output_cache(outputs) -> GSACache | None:
    """The cache of a model output, under either name (reading the old name warns on transformers >= 5.24)."""
    keys = outputs.keys()
    return outputs["cache"] if "cache" in keys else outputs["past_key_values"] if "past_key_values" in keys else None


class GSAModel(GSAPreTrainedModel):
    """Embedding, `num_hidden_layers` blocks, final RMSNorm."""

    def __init__(self, config: GSAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GSABlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: GSACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """See `GSAForCausalLM.forward` (position_ids is accepted and not read). `output_hidden_states` returns the
        input of every block and the final output."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must have shape [B, T, D], got {tuple(inputs_embeds.shape)}")
        B, T = inputs_embeds.shape[:2]
        past_key_values = _cache_argument(past_key_values, kwargs)
        if past_key_values is not None and not isinstance(past_key_values, GSACache):
            raise ValueError(f"past_key_values must be a GSACache, got {type(past_key_values).__name__}")
        if use_cache is None:
            use_cache = past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = GSACache()
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("pass either attention_mask (padded batch) or cu_seqlens (packed documents), not both")

        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must have shape [{B}, >= {T}], got {tuple(attention_mask.shape)}")
            # Earlier columns are cached tokens, whose padding the cache remembers. One host sync, after which
            # batches without padding among the new tokens (every decode step) take the dense path.
            new = attention_mask[:, attention_mask.shape[1] - T :]
            mask = None if bool(new.all()) else new
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        hidden_states, all_hidden = inputs_embeds, []
        for block in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if self.gradient_checkpointing and self.training and not use_cache:
                hidden_states = self._gradient_checkpointing_func(
                    block.__call__, hidden_states, mask, cu_seqlens, past_key_values, False
                )
            else:
                hidden_states = block(hidden_states, mask, cu_seqlens, past_key_values, use_cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if use_cache:
            past_key_values.seen_tokens += T
        # positional: the cache field is `past_key_values` before transformers 5.24 and `cache` since
        return BaseModelOutputWithPast(
            hidden_states, past_key_values if use_cache else None, tuple(all_hidden) if output_hidden_states else None
        )


class GSAForCausalLM(GSAPreTrainedModel, GenerationMixin):
    """`GSAModel` + a linear LM head (tied to the input embedding with `tie_word_embeddings`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GSAConfig) -> None:
        super().__init__(config)
        self.model = GSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: GSACache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """
        Args:
            input_ids: `[B, T]` token ids (or `inputs_embeds` `[B, T, D]`).
            attention_mask: `[B, T]` 1 = token, 0 = padding (anywhere; left padding for generation). A longer
                `[B, S]` mask (Hugging Face style, covering cached tokens too) is accepted; its last T columns are read.
            cu_seqlens: `[N + 1]` int offsets of N documents packed in one row (B == 1). No layer lets a document see
                another (GSA states restart, attention is block-diagonal with RoPE positions restarting).
            position_ids: accepted for Hugging Face compatibility (generate() passes them) and not read: RoPE
                positions are always a token's index among the real tokens of its sequence or document, which is what
                generate()'s position_ids hold for real tokens.
            past_key_values: a `GSACache` to continue from (it is updated in place when use_cache); also accepted
                as `cache`, the name transformers >= 5.24 uses.
            labels: `[B, T]` targets for the shifted next-token loss (-100 = ignore); needs logits_to_keep=0.
            use_cache: return the updated cache; default True iff past_key_values is given. A new cache is made
                when none is passed.
            logits_to_keep: 0 = logits for every position; n = the last n positions; a tensor = those positions.
            **kwargs: `return_dict`, `output_hidden_states`, `num_items_in_batch` (loss divisor) are honoured;
                `output_attentions=True` is a ValueError; other Hugging Face keywords are ignored.
        """
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported (GSA layers have no attention matrix)")
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: leave logits_to_keep=0")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            past_key_values=_cache_argument(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=kwargs.get("output_hidden_states"),
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
            loss = causal_lm_loss(logits, labels, cu_seqlens, kwargs.get("num_items_in_batch"))
        output = CausalLMOutputWithPast(loss, logits, _output_cache(outputs), outputs.hidden_states)
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = self.config.return_dict
        return output if return_dict else output.to_tuple()

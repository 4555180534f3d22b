"""`GSAConfig`: the Hugging Face configuration of a GSA language model."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PretrainedConfig

from ..layers import MIXERS
from ..layers.gsa import FEATURE_MAPS


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


class GSAConfig(PretrainedConfig):
    """Configuration of `GSAForCausalLM`. The defaults are the paper's 1.3B model (Mistral tokenizer).

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width D.
        num_hidden_layers: number of blocks L.
        num_heads: query heads of the recurrent mixer layers (gsa, abc, gla).
        num_kv_heads: key/value/gate heads of the gsa and abc layers; default num_heads.
        num_slots: memory slots M per kv head (gsa, abc).
        gate_logit_normalizer: tau in GSA's log forget gate `logsigmoid(f) / tau` (abc has no gate; gla keeps its
            own default, 16).
        feature_map: on GSA's q and k: "swish", "relu" or "identity".
        use_short_conv: causal short convolution on the q, k, v of the model's `mixer` (hybrid attention layers
            never have one).
        conv_size: its kernel size.
        intermediate_size: SwiGLU hidden size; default 8/3 * D rounded up to a multiple of 256 (as Llama).
        norm_eps: epsilon of every RMSNorm.
        attn_layers: indices of the layers that use causal softmax attention (hybrid model) instead of `mixer`.
        attn_num_heads: heads of the softmax-attention layers; default D / 128 when D is a multiple of 128 (head dim
            128 as in Transformer++), else num_heads.
        attn_num_kv_heads: their key/value heads; default attn_num_heads.
        rope_theta: RoPE base of the attention layers.
        max_position_embeddings: the context length the model is meant for: `generate()` caps its default length
            there and warns past it (GSA itself has no position limit).
        initializer_range: std of the N(0, std) init of embeddings and linear maps.
        tie_word_embeddings: share the input embedding with the output head.
        mixer: the token mixer of every layer not in attn_layers, a key of `flash_gsa.layers.MIXERS`: "gsa", or
            the baselines "abc" (GSA without forget gate), "gla" (gated linear attention; key dim D/2, value dim D,
            `num_heads` heads) and "attention" (softmax attention with RoPE, `attn_num_heads` heads).
        **kwargs: `PretrainedConfig` arguments (pad_token_id, bos_token_id, eos_token_id, ...).
    """

    model_type = "flash_gsa"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        num_slots: int = 64,
        gate_logit_normalizer: float = 8,
        feature_map: str = "swish",
        use_short_conv: bool = False,
        conv_size: int = 4,
        intermediate_size: int | None = None,
        norm_eps: float = 1e-5,
        attn_layers: Sequence[int] = (),
        attn_num_heads: int | None = None,
        attn_num_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        mixer: str = "gsa",
        **kwargs,
    ) -> None:
        for name, value in (
            ("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers),
            ("num_heads", num_heads), ("num_slots", num_slots), ("max_position_embeddings", max_position_embeddings),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        _positive("gate_logit_normalizer", gate_logit_normalizer)
        _positive("norm_eps", norm_eps)
        _positive("rope_theta", rope_theta)
        _positive("initializer_range", initializer_range)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        if conv_size < 2:
            raise ValueError(f"conv_size must be >= 2, got {conv_size}")
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {mixer!r}")
        if intermediate_size is None:
            intermediate_size = 256 * -(-8 * hidden_size // (3 * 256))
        if intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {intermediate_size}")

        attn_layers = sorted(int(i) for i in attn_layers)
        if len(set(attn_layers)) != len(attn_layers):
            raise ValueError(f"attn_layers has duplicates: {attn_layers}")
        if any(not 0 <= i < num_hidden_layers for i in attn_layers):
            raise ValueError(f"attn_layers must be layer indices in [0, {num_hidden_layers}), got {attn_layers}")
        if attn_num_heads is None:
            attn_num_heads = hidden_size // 128 if hidden_size % 128 == 0 else num_heads
        attn_num_kv_heads = attn_num_heads if attn_num_kv_heads is None else attn_num_kv_heads
        if attn_num_heads < 1 or hidden_size % attn_num_heads or (hidden_size // attn_num_heads) % 2:
            raise ValueError(
                f"attn_num_heads ({attn_num_heads}) must divide hidden_size ({hidden_size}) into an even head dim"
            )
        if attn_num_kv_heads < 1 or attn_num_heads % attn_num_kv_heads:
            raise ValueError(
                f"attn_num_heads ({attn_num_heads}) must be a multiple of attn_num_kv_heads ({attn_num_kv_heads})"
            )

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_slots = num_slots
        self.gate_logit_normalizer = gate_logit_normalizer
        self.feature_map = feature_map
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.intermediate_size = intermediate_size
        self.norm_eps = norm_eps
        self.attn_layers = attn_layers
        self.attn_num_heads = attn_num_heads
        self.attn_num_kv_heads = attn_num_kv_heads
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.mixer = mixer
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def layer_mixer(self, layer_idx: int) -> str:
        """The mixer name of layer `layer_idx`: "attention" for attn_layers, else `mixer`."""
        return "attention" if layer_idx in self.attn_layers else self.mixer

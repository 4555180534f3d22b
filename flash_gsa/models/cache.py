"""`GSACache`: what a GSA model carries from one forward call to the next while decoding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class LayerState:
    """The state of one layer, batch first (one row per sequence). Each mixer fills the fields it needs.

    Attributes:
        recurrent_state: GSA/ABC memory `(hk [B, H_kv, K, M], hv [B, H_kv, M, V])`, or GLA's `(S [B, H, K, V],)`;
            float32 (float64 for float64 models).
        slot_normalizer: ABC's running log-normalizer of the slot write weights, `log Z [B, H_kv, M]` (-inf: nothing
            written yet).
        conv_state: short-convolution windows by name ("q", "k", "v"), each `[B, C, conv_size - 1]`.
        keys, values: attention KV cache `[B, H_kv, S, d]` (keys after RoPE).
        key_mask: `[B, S]` bool, False where a cached token was padding.
    """

    recurrent_state: tuple[torch.Tensor, ...] | None = None
    slot_normalizer: torch.Tensor | None = None
    conv_state: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None

    def map_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replaces every tensor `x` held here by `fn(x)`."""
        if self.recurrent_state is not None:
            self.recurrent_state = tuple(fn(x) for x in self.recurrent_state)
        self.conv_state = {name: fn(x) for name, x in self.conv_state.items()}
        for name in ("slot_normalizer", "keys", "values", "key_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))


class GSACache:
    """Decoding cache of a GSA model: one `LayerState` per layer index, created empty on first access.

    `GSAForCausalLM` creates one when called with `use_cache=True` and returns it as `past_key_values`; pass it back
    with the next tokens to continue. It implements what `generate()` needs (`get_seq_length`, `reorder_cache` for
    beam search); recurrent states cannot be rolled back, so `crop` (assisted decoding) is not supported.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        self.layers: dict[int, LayerState] = {}
        self.seen_tokens = 0

    def __getitem__(self, layer_idx: int) -> LayerState:
        if layer_idx not in self.layers:
            self.layers[layer_idx] = LayerState()
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens (padding included) fed to the model so far; the same for every layer."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keeps batch rows `beam_idx` (in that order) in every layer's state (beam search)."""
        for state in self.layers.values():
            state.map_(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def reset(self) -> None:
        """Forgets everything."""
        self.layers.clear()
        self.seen_tokens = 0

    def __repr__(self) -> str:
        return f"GSACache(layers={sorted(self.layers)}, seen_tokens={self.seen_tokens})"

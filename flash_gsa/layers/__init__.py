"""Layers: token mixers (GSA; the baselines ABC, GLA and softmax attention) and the pieces of a block.

Mixer contract. Every token mixer is an `nn.Module` built by a registry entry `MIXERS[name](config, layer_idx)` and has

    forward(hidden_states, attention_mask=None, cu_seqlens=None, past_key_values=None, use_cache=False) -> output

- `hidden_states` `[B, T, D]` -> `output` `[B, T, D]`; outputs at padding positions are zeros, and real tokens never
  depend on padding or on other documents.
- `attention_mask` `[B, T]` (1 = token, 0 = padding, anywhere in a row); a longer `[B, S]` mask (S >= T) is accepted
  and only its last T columns are read. `cu_seqlens` `[N + 1]` int: N documents packed in one row (B == 1). Not both.
  See `flash_gsa.layers.varlen` (checks, `unpad`/`repad`).
- `past_key_values`: a `flash_gsa.models.GSACache`. The mixer reads its state from `past_key_values[layer_idx]`
  (a `LayerState`), continuing those sequences; with `use_cache=True` it writes its new state back there, in place.
  `use_cache=True` without a cache, or a cache with `layer_idx=None`, is a ValueError. (The model, not the mixer,
  advances the cache's token count `seen_tokens`.)
- `state_size(seq_len: int) -> int`: the numbers held per sequence in the mixer's recurrent state / KV cache after
  `seq_len` tokens (GSA: 2 * H_kv * M * d_head; ABC: that + H_kv * M; GLA: H * d_k * d_v; attention:
  2 * seq_len * H_kv * d_head).
- A classmethod `from_config(config, layer_idx)` is the usual registry builder.

Adding a mixer = one new module implementing this contract + one line in `MIXERS`. The built-in mixers subclass
`flash_gsa.layers.mixer.TokenMixer`, which implements `forward` and `from_config` once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from .abc import ABCAttention
from .attention import Attention
from .conv import ShortConvolution
from .gla import GatedLinearAttention
from .gsa import GatedSlotAttention
from .mlp import SwiGLU
from .norm import RMSNorm

if TYPE_CHECKING:
    from ..models.configuration_gsa import GSAConfig

MIXERS: dict[str, Callable[[GSAConfig, int], nn.Module]] = {
    "gsa": GatedSlotAttention.from_config,
    "abc": ABCAttention.from_config,
    "gla": GatedLinearAttention.from_config,
    "attention": Attention.from_config,
}


class _ReadRecorder:
    """Stands in for a config and notes every attribute read through it."""

    def __init__(self, config: GSAConfig) -> None:
        self._config, self.read = config, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self._config, name)


def mixer_config_fields(name: str, config: GSAConfig) -> frozenset[str]:
    """The config fields that the built-in mixer `name` reads when built from `config` (its `_config_kwargs`), so
    that callers can refuse settings a mixer would silently ignore (e.g. gla's gate normalizer, fixed at 16)."""
    builder = MIXERS[name]
    recorder = _ReadRecorder(config)
    builder.__self__._config_kwargs(recorder)  # a bound classmethod: __self__ is the mixer class
    return frozenset(recorder.read)

__all__ = [
    "MIXERS", "ABCAttention", "Attention", "GatedLinearAttention", "GatedSlotAttention", "RMSNorm", "ShortConvolution",
    "SwiGLU", "mixer_config_fields",
]

"""`TokenMixer`: the base class of the token mixers, holding what they share.

That is the mixer contract's `forward` (argument checks, the layer's cache state, packing a padded batch for mixers
that run on packed documents), `from_config`, the checks of the common constructor arguments, the q, k, v projections
(grouped-query heads included), and their optional short causal convolutions (modules, state size, application).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from .conv import ShortConvolution
from .varlen import check_mixer_inputs, repad, unpad

if TYPE_CHECKING:
    from ..models.cache import GSACache, LayerState
    from ..models.configuration_gsa import GSAConfig

MixerT = TypeVar("MixerT", bound="TokenMixer")


def check_heads(hidden_size: int, num_heads: int, num_kv_heads: int | None) -> int:
    """Validates a grouped-query head layout (D divisible by num_heads, a multiple of num_kv_heads); returns
    num_kv_heads, which defaults to num_heads."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if hidden_size < 1 or num_heads < 1 or num_kv_heads < 1:
        raise ValueError(
            f"hidden_size, num_heads and num_kv_heads must be >= 1, got {hidden_size}, {num_heads}, {num_kv_heads}"
        )
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return num_kv_heads


def xavier_init_(*projections: nn.Linear) -> None:
    """The recurrent mixers' projection init: Xavier-uniform weights with gain 2^-2.5."""
    for proj in projections:
        nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)


class TokenMixer(nn.Module):
    """Base of the token mixers (the contract is in `flash_gsa.layers`).

    A subclass validates its own arguments, then calls `TokenMixer.__init__` (which checks and stores the shared ones),
    builds its modules (`_add_qkv_projections` or `_add_gqa_projections`, and `_add_short_convs`, for the shared
    ones, each where it belongs in the layer's parameter order), and implements `_mix` and `_config_kwargs`.

    Class attribute `packs_padding`: the mixer runs on packed documents only; `forward` packs a padded batch into
    documents (`unpad`) before `_mix` and scatters the output back (`repad`), so `_mix` never gets a mask.
    """

    packs_padding: ClassVar[bool] = True

    def __init__(self, hidden_size: int, use_short_conv: bool, conv_size: int, layer_idx: int | None) -> None:
        if conv_size < 2:
            raise ValueError(f"conv_size must be >= 2, got {conv_size}")
        if layer_idx is not None and layer_idx < 0:
            raise ValueError(f"layer_idx must be >= 0, got {layer_idx}")
        super().__init__()
        self.hidden_size = hidden_size
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.layer_idx = layer_idx

    @classmethod
    def from_config(cls: type[MixerT], config: GSAConfig, layer_idx: int) -> MixerT:
        """The mixer-registry builder: a layer with the config's settings for this mixer (`_config_kwargs`)."""
        return cls(**cls._config_kwargs(config), layer_idx=layer_idx)

    @classmethod
    def _config_kwargs(cls, config: GSAConfig) -> dict[str, Any]:
        """The constructor arguments (all but layer_idx) that `from_config` takes from the config."""
        raise NotImplementedError

    def _add_qkv_projections(self, q_dim: int, k_dim: int, v_dim: int) -> None:
        """Bias-free projections `q_proj`, `k_proj`, `v_proj` from the model width."""
        self.q_proj = nn.Linear(self.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, k_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, v_dim, bias=False)

    def _add_gqa_projections(self, num_heads: int, num_kv_heads: int) -> None:
        """Grouped-query heads (layout checked by `check_heads`): sets `num_heads`, `num_kv_heads` and `head_dim`
        (D / num_heads), and adds the q, k, v projections to `num_heads` and `num_kv_heads` heads of `head_dim`."""
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = self.hidden_size // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self._add_qkv_projections(self.hidden_size, kv_dim, kv_dim)

    def _add_short_convs(self) -> None:
        """With `use_short_conv`: `q_conv`, `k_conv`, `v_conv`, one per projection, as wide as its output."""
        if self.use_short_conv:
            self.q_conv = ShortConvolution(self.q_proj.out_features, self.conv_size)
            self.k_conv = ShortConvolution(self.k_proj.out_features, self.conv_size)
            self.v_conv = ShortConvolution(self.v_proj.out_features, self.conv_size)

    def _conv_state_size(self) -> int:
        """Numbers held per sequence in the short-convolution windows (0 without short conv)."""
        if not self.use_short_conv:
            return 0
        widths = self.q_proj.out_features + self.k_proj.out_features + self.v_proj.out_features
        return (self.conv_size - 1) * widths

    def _short_convs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        state: LayerState | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The short convolutions of q, k, v (dense `[B, T, .]` or packed with `cu_seqlens`), continuing the cached
        windows. Returns the convolved q, k, v and the new windows by name, for the caller to cache; without short
        conv, q, k, v unchanged and no windows."""
        if not self.use_short_conv:
            return q, k, v, {}
        cached = state.conv_state if state is not None else {}
        out, windows = [], {}
        for name, conv, x in zip("qkv", (self.q_conv, self.k_conv, self.v_conv), (q, k, v), strict=True):
            y, windows[name] = conv(x, cu_seqlens, cached.get(name))
            out.append(y)
        return *out, windows

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: GSACache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """`[B, T, D] -> [B, T, D]`; see `flash_gsa.layers` for the arguments. Padding positions come out as zeros."""
        mask = check_mixer_inputs(
            hidden_states, self.hidden_size, attention_mask, cu_seqlens, past_key_values, use_cache, self.layer_idx
        )
        state = past_key_values[self.layer_idx] if past_key_values is not None else None
        if mask is None or not self.packs_padding:
            return self._mix(hidden_states, mask, cu_seqlens, state, use_cache)
        B, T, _ = hidden_states.shape  # padded batch -> one packed row, one document per batch row
        x, cu_seqlens, indices = unpad(hidden_states, mask)
        return repad(self._mix(x, None, cu_seqlens, state, use_cache), indices, B, T)

    def _mix(
        self, x: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, state: LayerState | None,
        use_cache: bool,
    ) -> torch.Tensor:
        """The mixer itself, on checked inputs: `x [B, T, D]`, the new tokens' padding mask `[B, T]` bool or None
        (always None with `packs_padding`), packed documents' `cu_seqlens`, this layer's cache state or None; with
        `use_cache`, writes the new state there."""
        raise NotImplementedError

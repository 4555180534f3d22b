"""The gated linear attention layer (GLA, Yang et al. 2023): the `gla` baseline mixer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gla
from .mixer import TokenMixer, xavier_init_
from .norm import RMSNorm

if TYPE_CHECKING:
    from ..models.cache import LayerState
    from ..models.configuration_gsa import GSAConfig


class GatedLinearAttention(TokenMixer):
    """Gated linear attention token mixer, as in the GLA paper's language models.

    Per token: bias-free projections q, k (hidden -> key dim = `expand_k` * hidden) and v (hidden -> hidden); a
    low-rank forget gate `g = logsigmoid(W_2 W_1 x + b) / gate_logit_normalizer` per key dimension
    (a = sigmoid(.)^(1/16) by default); optionally a short causal convolution on q, k and v; the GLA operator with
    scale head_k^-0.5; output `o_proj(RMSNorm_head(o) * SiLU(W_r x))` (RMSNorm over each head's values, weight shared
    by the heads). The recurrent state is `[head_k, head_v]` per head. Projections start Xavier-uniform with gain
    2^-2.5, the gate bias at zero (inside `GSAForCausalLM`, the model's `_init_weights` rules apply to the weights
    instead).

    Args:
        hidden_size: model width D (also the value dim).
        num_heads: heads; head_k = expand_k * D / num_heads, head_v = D / num_heads.
        expand_k: key dim / D.
        gate_low_rank_dim: inner rank of the gate projection.
        gate_logit_normalizer: divides the log gate; larger keeps more memory.
        use_short_conv: causal depthwise convolution (kernel `conv_size`) on the q, k and v projections.
        conv_size: kernel size of that convolution (>= 2).
        norm_eps: epsilon of the output RMSNorm.
        layer_idx: this layer's key in the cache (needed to decode with one).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        expand_k: float = 0.5,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16,
        use_short_conv: bool = False,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
    ) -> None:
        if hidden_size < 1 or num_heads < 1:
            raise ValueError(f"hidden_size and num_heads must be >= 1, got {hidden_size}, {num_heads}")
        key_dim = hidden_size * expand_k
        if not expand_k > 0 or key_dim != int(key_dim) or int(key_dim) % num_heads or hidden_size % num_heads:
            raise ValueError(
                f"expand_k * hidden_size ({key_dim}) and hidden_size ({hidden_size}) must be positive integers "
                f"divisible by num_heads ({num_heads})"
            )
        if gate_low_rank_dim < 1:
            raise ValueError(f"gate_low_rank_dim must be >= 1, got {gate_low_rank_dim}")
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
        super().__init__(hidden_size, use_short_conv, conv_size, layer_idx)
        self.num_heads = num_heads
        self.key_dim = int(key_dim)
        self.head_k = self.key_dim // num_heads
        self.head_v = hidden_size // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer

        self._add_qkv_projections(self.key_dim, self.key_dim, hidden_size)
        self.r_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # output gate
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, self.key_dim)
        )
        self._add_short_convs()
        self.g_norm = RMSNorm(self.head_v, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        xavier_init_(self.q_proj, self.k_proj, self.v_proj, self.r_proj, *self.gk_proj, self.o_proj)
        nn.init.zeros_(self.gk_proj[1].bias)

    @classmethod
    def _config_kwargs(cls, config: GSAConfig) -> dict[str, Any]:
        """`num_heads` heads, the config's short-conv and norm settings, GLA's defaults for the rest (key dim D/2,
        gate rank 16, gate normalizer 16)."""
        return dict(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            use_short_conv=config.use_short_conv,
            conv_size=config.conv_size,
            norm_eps=config.norm_eps,
        )

    def state_size(self, seq_len: int) -> int:
        """Numbers held per sequence between calls: H * head_k * head_v (plus the conv windows with short conv)."""
        return self.num_heads * self.head_k * self.head_v + self._conv_state_size()

    def _mix(
        self, x: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, state: LayerState | None,
        use_cache: bool,
    ) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v, windows = self._short_convs(q, k, v, cu_seqlens, state)
        q = q.unflatten(-1, (self.num_heads, self.head_k))
        k = k.unflatten(-1, (self.num_heads, self.head_k))
        v = v.unflatten(-1, (self.num_heads, self.head_v))
        f = self.gk_proj(x).unflatten(-1, (self.num_heads, self.head_k))
        g = F.logsigmoid(f.to(torch.promote_types(f.dtype, torch.float32))) / self.gate_logit_normalizer

        o, final_state = gla(
            q, k, v, g,
            initial_state=state.recurrent_state[0] if state is not None and state.recurrent_state else None,
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
        )
        if use_cache:
            state.recurrent_state = (final_state,)
            state.conv_state.update(windows)
        o = self.g_norm(o).flatten(-2) * F.silu(self.r_proj(x))
        return self.o_proj(o)

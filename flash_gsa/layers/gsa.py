"""The Gated Slot Attention layer (Zhang et al., NeurIPS 2024), as in the released models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import available_backends, gsa
from .mixer import TokenMixer, check_heads, xavier_init_
from .norm import RMSNorm

if TYPE_CHECKING:
    from ..models.cache import LayerState
    from ..models.configuration_gsa import GSAConfig

FEATURE_MAPS = {"swish": F.silu, "relu": F.relu, "identity": lambda x: x}
DECODE_KERNEL_MAX_STEPS = 64  # new tokens per call up to which a cached call takes the decoding kernel
_DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _decode_kernel_device(x: torch.Tensor) -> bool:
    """Whether the Triton decoding kernel runs where x is: where the triton backend does (CUDA, Triton installed;
    tests also run it on the CPU, through Triton's interpreter)."""
    return "triton" in available_backends(x.device)


class GatedSlotAttention(TokenMixer):
    """Gated Slot Attention token mixer.

    Per token: bias-free projections q, k, v and the gate logits f (hidden -> num_kv_heads * num_slots);
    optionally a short causal convolution on q, k and v; `feature_map` on q and k, SiLU on v;
    log forget gate `g = logsigmoid(f) / gate_logit_normalizer` and write weight `s = 1 - exp(g)`; the GSA operator
    with scale 1; output `o_proj(RMSNorm(SiLU(o)))`. The five projections start Xavier-uniform with gain 2^-2.5 (inside
    `GSAForCausalLM`, the model's `_init_weights` rules apply instead).

    Args:
        hidden_size: model width D.
        num_heads: query heads; head dim = D / num_heads.
        num_kv_heads: key/value/gate heads (grouped-query when fewer than num_heads); default num_heads.
        num_slots: memory slots M per kv head.
        gate_logit_normalizer: tau in `g = logsigmoid(f) / tau`; larger keeps more memory.
        feature_map: on q and k: "swish" (released models), "relu" or "identity".
        use_short_conv: causal depthwise convolution (kernel `conv_size`) on the q, k and v projections.
        conv_size: kernel size of that convolution (>= 2).
        norm_eps: epsilon of the output RMSNorm.
        layer_idx: this layer's key in the cache (needed to decode with one).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        num_slots: int = 64,
        gate_logit_normalizer: float = 8,
        feature_map: str = "swish",
        use_short_conv: bool = False,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
    ) -> None:
        num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if not gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        super().__init__(hidden_size, use_short_conv, conv_size, layer_idx)
        self.num_slots = num_slots
        self.gate_logit_normalizer = gate_logit_normalizer
        self.feature_map = feature_map

        self._add_gqa_projections(num_heads, num_kv_heads)
        self.f_proj = nn.Linear(hidden_size, num_kv_heads * num_slots, bias=False)
        self._add_short_convs()
        self.g_norm = RMSNorm(hidden_size, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        xavier_init_(self.q_proj, self.k_proj, self.v_proj, self.f_proj, self.o_proj)

    @classmethod
    def _config_kwargs(cls, config: GSAConfig) -> dict[str, Any]:
        """The config's GSA settings."""
        return dict(cls._slot_kwargs(config), gate_logit_normalizer=config.gate_logit_normalizer)

    @staticmethod
    def _slot_kwargs(config: GSAConfig) -> dict[str, Any]:
        """The settings GSA shares with ABC (all but the gate's)."""
        return dict(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            num_slots=config.num_slots,
            feature_map=config.feature_map,
            use_short_conv=config.use_short_conv,
            conv_size=config.conv_size,
            norm_eps=config.norm_eps,
        )

    def state_size(self, seq_len: int) -> int:
        """Numbers held per sequence between calls: 2 * H_kv * M * d_head (plus the conv windows with short conv)."""
        return 2 * self.num_kv_heads * self.num_slots * self.head_dim + self._conv_state_size()

    def _gates(
        self, f: torch.Tensor, cu_seqlens: torch.Tensor | None, state: LayerState | None, use_cache: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log forget gates g and write weights s (both `[B, T, H_kv, M]`) from the gate logits `f` (at least
        float32): `g = logsigmoid(f) / tau`, `s = 1 - exp(g)`. Subclasses with other gates (ABC) override this; they
        get the sequences' layout and their layer's cache state, and write their own gate state there when
        `use_cache`."""
        g = F.logsigmoid(f) / self.gate_logit_normalizer
        return g, -torch.expm1(g)  # s = 1 - exp(g), without cancellation when g is close to 0

    def _mix(
        self, x: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, state: LayerState | None,
        use_cache: bool,
    ) -> torch.Tensor:
        q, k, v, f = self.q_proj(x), self.k_proj(x), self.v_proj(x), self.f_proj(x)
        q, k, v, windows = self._short_convs(q, k, v, cu_seqlens, state)
        phi = FEATURE_MAPS[self.feature_map]
        q = phi(q.unflatten(-1, (self.num_heads, self.head_dim)))
        k = phi(k.unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = F.silu(v.unflatten(-1, (self.num_kv_heads, self.head_dim)))
        f = f.unflatten(-1, (self.num_kv_heads, self.num_slots))
        g, s = self._gates(f.to(torch.promote_types(f.dtype, torch.float32)), cu_seqlens, state, use_cache)

        if self._takes_decode_kernel(q, state, use_cache):
            o, final_state = self._decode(q, k, v, g, s, cu_seqlens, state)
        else:
            o, final_state = gsa(
                q, k, v, g, s,
                scale=1.0,
                initial_state=state.recurrent_state if state is not None else None,
                output_final_state=use_cache,
                cu_seqlens=cu_seqlens,
            )
        if use_cache:
            state.recurrent_state = final_state
            state.conv_state.update(windows)
        return self.o_proj(self.g_norm(F.silu(o.flatten(-2))))

    @staticmethod
    def _takes_decode_kernel(q: torch.Tensor, state: LayerState | None, use_cache: bool) -> bool:
        """A few new tokens continuing a cached state, without gradients, on CUDA: generate()'s steps."""
        return (
            use_cache
            and state is not None
            and state.recurrent_state is not None
            and q.shape[1] <= DECODE_KERNEL_MAX_STEPS
            and q.dtype in _DECODE_DTYPES
            and not (torch.is_grad_enabled() and q.requires_grad)
            and not torch.compiler.is_compiling()
            and _decode_kernel_device(q)
        )

    @staticmethod
    def _decode(q, k, v, g, s, cu_seqlens, state: LayerState):
        """The Triton decoding kernel, one launch, updating the cached state in place (made float32 and contiguous
        once, at the first step after a prefill)."""
        from ..ops.triton.decode import fused_recurrent_gsa

        hk, hv = (x.float().contiguous() for x in state.recurrent_state)
        o, _ = fused_recurrent_gsa(q, k, v, g, s, 1.0, (hk, hv), False, cu_seqlens, inplace=True)
        return o, (hk, hv)

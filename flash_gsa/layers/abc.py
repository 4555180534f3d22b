"""ABC (attention with bounded-memory control, Peng et al. 2022): the slot memory of GSA without its forget gate, the
`abc` baseline mixer.

Slots are written with weights normalized by a softmax over time: with e = W_phi x (one logit per slot) and
Z_t = sum_{j<=t} exp(e_j), the slot memories are sum_{j<=t} (exp(e_j) / Z_t) k_j and likewise for v. As a recurrence
this is GSA with

    a_t = Z_{t-1} / Z_t,    1 - a_t = exp(e_t) / Z_t,    i.e.  g_t = log a_t = logsigmoid(log Z_{t-1} - e_t),

so the layer only computes these gates and calls the GSA operator. Nothing is ever forgotten: the weight of a token
shrinks only as later tokens are written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .gsa import GatedSlotAttention
from .varlen import document_positions

if TYPE_CHECKING:
    from ..models.cache import LayerState
    from ..models.configuration_gsa import GSAConfig


def abc_gates(
    e: torch.Tensor, cu_seqlens: torch.Tensor | None = None, log_z0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ABC's gates from its slot logits.

    Args:
        e: slot logits `[B, T, H, M]` (B == 1 with `cu_seqlens`).
        cu_seqlens: `[N + 1]` offsets of N packed sequences; the running sum restarts at each.
        log_z0: `[N, H, M]` log Z carried from earlier tokens of each sequence (-inf: none); None = all -inf.

    Returns:
        `g` (log forget gate, <= 0) and `s` (write weight, = 1 - exp(g)), both shaped like `e`, and the final
        `log Z [N, H, M]`. A sequence's first token, with nothing before it, gets g = 0 and s = 1 (its state is
        zero, so its forget gate is irrelevant; 0 keeps the operator's cumulative log-gates finite).
    """
    B, T, H, M = e.shape
    if cu_seqlens is None:
        rows, lengths = e, torch.full((B,), T, device=e.device)  # [N, T, H, M]
    else:
        doc, pos = document_positions(cu_seqlens, T)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        width = max(int(lengths.max()), 1)
        rows = e.new_zeros(lengths.numel(), width, H, M).index_put((doc, pos), e[0])  # zeros past each end: unread
    N = rows.shape[0]
    if log_z0 is None:
        log_z0 = e.new_full((N, H, M), float("-inf"))
    log_z = rows.logcumsumexp(dim=1)
    log_z = torch.logaddexp(log_z, log_z0[:, None].to(log_z.dtype))
    full = torch.cat([log_z0[:, None].to(log_z.dtype), log_z], dim=1)  # full[:, t] = log Z before token t
    final = full[torch.arange(N, device=e.device), lengths]
    prev = full[:, :-1] if cu_seqlens is None else full[doc, pos][None]
    first = torch.isinf(prev)
    prev = torch.where(first, e, prev)  # any finite value: those entries are replaced below
    g = torch.where(first, torch.zeros_like(e), F.logsigmoid(prev - e))
    s = torch.where(first, torch.ones_like(e), torch.sigmoid(e - prev))
    return g, s, final


class ABCAttention(GatedSlotAttention):
    """The ABC token mixer: `GatedSlotAttention` (same projections, feature maps, output norm and state) whose gates
    come from a softmax over time instead of a learned forget gate (see the module docstring). `f_proj` gives the slot
    logits e. Besides the GSA memory, the cache carries log Z (`LayerState.slot_normalizer`).

    Args: as `GatedSlotAttention`, without `gate_logit_normalizer`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        num_slots: int = 64,
        feature_map: str = "swish",
        use_short_conv: bool = False,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(
            hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, num_slots=num_slots, feature_map=feature_map,
            use_short_conv=use_short_conv, conv_size=conv_size, norm_eps=norm_eps, layer_idx=layer_idx,
        )
        del self.gate_logit_normalizer  # no learned gate: nothing to normalize

    @classmethod
    def _config_kwargs(cls, config: GSAConfig) -> dict[str, Any]:
        """The config's GSA settings, without gate_logit_normalizer (no gate)."""
        return cls._slot_kwargs(config)

    def state_size(self, seq_len: int) -> int:
        """GSA's state plus log Z: 2 * H_kv * M * d_head + H_kv * M (plus the conv windows with short conv)."""
        return super().state_size(seq_len) + self.num_kv_heads * self.num_slots

    def _gates(
        self, f: torch.Tensor, cu_seqlens: torch.Tensor | None, state: LayerState | None, use_cache: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g, s, log_z = abc_gates(f, cu_seqlens, state.slot_normalizer if state is not None else None)
        if use_cache:
            state.slot_normalizer = log_z
        return g, s

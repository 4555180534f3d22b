"""Causal softmax attention with rotary position embeddings (Llama style), through PyTorch SDPA.

Used for the hybrid layers of a GSA model (`GSAConfig.attn_layers`) and as the "attention" mixer (a Transformer++).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .mixer import TokenMixer, check_heads
from .varlen import document_positions, repad, unpad

if TYPE_CHECKING:
    from ..models.cache import LayerState
    from ..models.configuration_gsa import GSAConfig


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotates `x [B, T, H, d]` by `positions [B, T]` (rotate-half convention, frequencies theta^(-2i/d))."""
    d = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=dt) / d)
    angles = positions.to(dt)[..., None] * inv_freq  # [B, T, d/2]
    cos = torch.cat([angles.cos()] * 2, dim=-1)[:, :, None, :]
    sin = torch.cat([angles.sin()] * 2, dim=-1)[:, :, None, :]
    x = x.to(dt)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(TokenMixer):
    """Multi-head (grouped-query when num_kv_heads < num_heads) causal softmax attention with RoPE.

    Bias-free q, k, v, o projections; RoPE position = a token's index among the real (non-padding) tokens of its
    sequence, restarting at every document with `cu_seqlens`, so padding never shifts positions. Padded batches and
    decoding with a cache use an explicit boolean mask; a plain batch and packed documents use SDPA's causal kernel.

    Args:
        hidden_size: model width D.
        num_heads: query heads; head dim = D / num_heads (must be even for RoPE).
        num_kv_heads: key/value heads; default num_heads.
        rope_theta: RoPE base.
        use_short_conv: causal depthwise convolution (kernel `conv_size`) on the q, k and v projections, over each
            sequence's real tokens (as in the recurrent mixers; used by the MQAR benchmark for equal footing).
        conv_size: kernel size of that convolution (>= 2).
        layer_idx: this layer's key in the cache (needed to decode with one).
    """

    packs_padding: ClassVar[bool] = False  # a padded batch stays padded: masked attention, RoPE positions skip padding

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        use_short_conv: bool = False,
        conv_size: int = 4,
        layer_idx: int | None = None,
    ) -> None:
        num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        if (hidden_size // num_heads) % 2:
            raise ValueError(f"the head dim ({hidden_size // num_heads}) must be even for RoPE")
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {rope_theta}")
        super().__init__(hidden_size, use_short_conv, conv_size, layer_idx)
        self.rope_theta = rope_theta

        self._add_gqa_projections(num_heads, num_kv_heads)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self._add_short_convs()

    @classmethod
    def _config_kwargs(cls, config: GSAConfig) -> dict[str, Any]:
        """The config's attention settings (attn_num_heads, ...). The short convolution is the config's only when
        attention is the model's `mixer` (hybrid attention layers never have one)."""
        return dict(
            hidden_size=config.hidden_size,
            num_heads=config.attn_num_heads,
            num_kv_heads=config.attn_num_kv_heads,
            rope_theta=config.rope_theta,
            use_short_conv=config.use_short_conv and config.mixer == "attention",
            conv_size=config.conv_size,
        )

    def state_size(self, seq_len: int) -> int:
        """Numbers held per sequence in the KV cache after `seq_len` tokens: 2 * seq_len * H_kv * d_head (plus the
        conv windows with short conv)."""
        return 2 * seq_len * self.num_kv_heads * self.head_dim + self._conv_state_size()

    def _mix(
        self, x: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, state: LayerState | None,
        use_cache: bool,
    ) -> torch.Tensor:
        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("attention layers cannot combine cu_seqlens (packed documents) with a cache")
            return self._forward_documents(x, cu_seqlens)
        B, T, _ = x.shape
        has_past = state is not None and state.keys is not None
        real = mask if mask is not None else x.new_ones(B, T, dtype=torch.bool)
        offset = state.key_mask.sum(dim=1, keepdim=True) if has_past else 0
        positions = (offset + real.long().cumsum(dim=1) - 1).clamp(min=0)

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = self._convolve(q, k, v, mask, state, use_cache)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        q = apply_rotary(q, positions, self.rope_theta).to(q.dtype).transpose(1, 2)  # [B, H, T, d]
        k = apply_rotary(k, positions, self.rope_theta).to(k.dtype).transpose(1, 2)
        v = v.transpose(1, 2)

        key_mask = real
        if has_past:
            k = torch.cat([state.keys, k], dim=2)
            v = torch.cat([state.values, v], dim=2)
            key_mask = torch.cat([state.key_mask, real], dim=1)
        if use_cache:
            state.keys, state.values, state.key_mask = k, v, key_mask

        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if mask is None and not has_past:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            S = k.shape[2]
            q_idx = torch.arange(S - T, S, device=q.device)[:, None]
            k_idx = torch.arange(S, device=q.device)[None, :]
            allowed = (k_idx <= q_idx) & key_mask[:, None, :]  # [B, T, S]
            allowed = allowed | (k_idx == q_idx)  # a padding query sees itself, so no row is empty (output dropped)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        o = o.transpose(1, 2).flatten(-2)
        if mask is not None:
            o = o * mask[..., None].to(o.dtype)
        return self.o_proj(o)

    def _convolve(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, state: LayerState | None,
        use_cache: bool,
    ) -> list[torch.Tensor]:
        """The short convolutions of q, k, v `[B, T, .]`, over each row's real tokens (padding skipped), continuing
        the cached windows; the new windows go to the cache when `use_cache`."""
        B, T = q.shape[:2]
        x, cu_seqlens, indices = torch.cat([q, k, v], dim=-1), None, None
        if mask is not None:
            x, cu_seqlens, indices = unpad(x, mask)
        *out, windows = self._short_convs(*x.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1), cu_seqlens, state)
        if use_cache:
            state.conv_state.update(windows)
        return [y if indices is None else repad(y, indices, B, T) for y in out]

    def _forward_documents(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Packed documents, computed as a right-padded batch with one document per row: plain causal attention is
        then block-diagonal (a real token never reaches its row's trailing padding), RoPE restarts at every document,
        and SDPA can use its causal kernel, without a [T, T] mask. Costs N * max_len instead of T token slots."""
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        width = int(lengths.max())
        doc, pos = document_positions(cu_seqlens, hidden_states.shape[1])
        index = doc * width + pos  # each token's slot in [N * width]
        rows = repad(hidden_states, index, lengths.numel(), width)
        return self(rows).flatten(0, 1)[index].unsqueeze(0)

"""Batches of sequences of different lengths: padding masks, packed documents, and moving between the two.

Besides a plain dense batch `[B, T, D]`, every mixer accepts one of

- `attention_mask` `[B, T]`: 1 = token, 0 = padding, anywhere in the row (left padding for generation, right padding
  for training). A longer mask `[B, S]` with S >= T (Hugging Face style, also covering cached tokens) is accepted and
  only its last T columns are read: the cache remembers which earlier tokens were padding.
- `cu_seqlens` `[N + 1]`: N documents packed back to back in one row (B == 1); nothing crosses a document boundary.

Recurrent mixers turn a padded batch into packed documents (`unpad`), run, and scatter the outputs back (`repad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.gsa import check_cu_seqlens


def check_mixer_inputs(
    hidden_states: torch.Tensor,
    hidden_size: int,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    past_key_values: object | None,
    use_cache: bool,
    layer_idx: int | None,
) -> torch.Tensor | None:
    """Validates the arguments every mixer takes. Returns the padding mask of the new tokens (`[B, T]` bool) or None."""
    if not isinstance(hidden_states, torch.Tensor):
        raise ValueError(f"hidden_states must be a tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have shape [B, T, {hidden_size}], got {tuple(hidden_states.shape)}")
    B, T, _ = hidden_states.shape
    if use_cache and past_key_values is None:
        raise ValueError("use_cache=True needs a cache object in past_key_values (flash_gsa.models.GSACache)")
    if past_key_values is not None and layer_idx is None:
        raise ValueError("a layer built without layer_idx cannot use a cache; pass layer_idx to the constructor")
    if cu_seqlens is not None:
        if attention_mask is not None:
            raise ValueError("pass either attention_mask (padded batch) or cu_seqlens (packed documents), not both")
        check_cu_seqlens(cu_seqlens, B, T, hidden_states.device)
        return None
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2-D [B, T] tensor of 1 (token) and 0 (padding)")
    if attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask must have shape [{B}, >= {T}], got {tuple(attention_mask.shape)}")
    return attention_mask[:, -T:].bool() if T else attention_mask[:, :0].bool()


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packs the tokens of a padded batch into one row.

    Args:
        x: `[B, T, ...]`.
        mask: `[B, T]` bool, True = token.

    Returns:
        `packed [1, L, ...]` (the L tokens in row order), `cu_seqlens [B + 1]` int32 (one document per row, possibly
        empty), and `indices [L]` (each token's flat position in `[B * T]`, for `repad`).
    """
    indices = mask.flatten().nonzero().squeeze(1)
    cu_seqlens = F.pad(mask.sum(dim=1).cumsum(dim=0), (1, 0)).to(torch.int32)
    return x.flatten(0, 1)[indices].unsqueeze(0), cu_seqlens, indices


def repad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Inverse of `unpad`: `[1, L, ...]` back to `[B, T, ...]`, zeros at the padding."""
    out = packed.new_zeros(batch * seq_len, *packed.shape[2:])
    out[indices] = packed[0]
    return out.view(batch, seq_len, *packed.shape[2:])


def document_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the `total` packed tokens: the index of its document, and its position inside it (0 at a start)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    return doc, torch.arange(total, device=cu.device) - cu[doc]

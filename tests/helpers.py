"""Helpers shared by the float64 layer tests (test_layer, test_mixers)."""

import torch

from flash_gsa.models import GSACache

TOL = dict(atol=1e-9, rtol=1e-9)  # float64: the same math in another order agrees to ~1e-13, so only a bug fails this


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    """Seeded float64 normal samples."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_left_padded_prefill_then_decode(layer: torch.nn.Module) -> None:
    """A left-padded prefill of two sequences (6 and 3 real tokens), then two cached decode steps with the HF-style
    mask that also covers the cached columns: every output equals that of the sequence run alone, unpadded."""
    D = layer.hidden_size
    seqs = [randn(1, 8, D, seed=30), randn(1, 5, D, seed=31)]
    prompt = torch.zeros(2, 6, D, dtype=torch.float64)
    prompt[0], prompt[1, 3:] = seqs[0][0, :6], seqs[1][0, :3]
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    cache = GSACache()
    out = [layer(prompt, attention_mask=mask, past_key_values=cache, use_cache=True)[:, -1]]
    for t in range(2):
        step = torch.stack([seqs[0][0, 6 + t], seqs[1][0, 3 + t]])[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out.append(layer(step, attention_mask=mask, past_key_values=cache, use_cache=True)[:, 0])
    for i, (s, last) in enumerate(((seqs[0], 6), (seqs[1], 3))):
        torch.testing.assert_close(torch.stack([o[i] for o in out]), layer(s[:, : last + 2])[0, last - 1 :], **TOL)

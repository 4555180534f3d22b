"""Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology"): the synthetic recall task, as seeded tensors.

A sequence of `seq_len` tokens holds `num_pairs` key-value pairs, then the queries:

    input_ids  k1 v1 k2 v2 ... kn vn | 0 0 k7 0  0 0 0 0 k2 0  0 ... 0 k5 0  0 0
    labels      .  .  .  . ...  .  . | . .  . v7 . . . .  . v2 . ... .  . v5 . .

- The vocabulary is split: token 0 is the blank filler, keys are `[1, 1 + n_keys)` and values the rest
  (`n_keys = (vocab_size - 1) // 2`). Each sequence draws its keys and its values without replacement.
- `num_queries` distinct keys (all of them by default), in random order, are asked after the pairs: each query key
  sits at a random even offset of the second part. Everything else is 0, the answer positions (right after each query
  key) included: answers are never shown, so the last queries cannot be answered by elimination.
- `labels` is -100 everywhere except at the answer positions, where it holds the answer (Hugging Face convention:
  the logits at a query key predict the label of the next position), so the loss covers exactly the answers.

A seed fixes the data: `mqar_dataset(spec, n, seed)` returns the same tensors on every machine (CPU generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class MQARSpec:
    """One MQAR setting.

    Args:
        vocab_size: tokens, including the filler 0; keys and values share the rest half and half.
        seq_len: tokens per sequence.
        num_pairs: key-value pairs per sequence.
        num_queries: keys asked per sequence (distinct); default num_pairs.
    """

    vocab_size: int = 8192
    seq_len: int = 512
    num_pairs: int = 64
    num_queries: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_queries is None:
            object.__setattr__(self, "num_queries", self.num_pairs)
        if not isinstance(self.num_queries, int) or not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(
                f"num_queries must be an int in [1, num_pairs = {self.num_pairs}], got {self.num_queries!r}"
            )
        if self.num_keys < self.num_pairs:
            raise ValueError(
                f"vocab_size {self.vocab_size} gives {self.num_keys} keys, fewer than num_pairs = {self.num_pairs}: "
                f"vocab_size must be >= {2 * self.num_pairs + 1}"
            )
        if 2 * self.num_pairs + 2 * self.num_queries > self.seq_len:
            raise ValueError(
                f"seq_len {self.seq_len} cannot hold {self.num_pairs} pairs and {self.num_queries} query-answer pairs "
                f"(needs >= {2 * self.num_pairs + 2 * self.num_queries} tokens)"
            )

    @property
    def num_keys(self) -> int:
        """Size of the key range `[1, 1 + num_keys)`; values are `[1 + num_keys, vocab_size)`."""
        return (self.vocab_size - 1) // 2


def _sample_without_replacement(rows: int, population: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`[rows, k]` distinct indices in `[0, population)` per row, in random order."""
    return torch.rand(rows, population, generator=generator).topk(k, dim=1).indices


def mqar_batch(spec: MQARSpec, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` fresh MQAR sequences drawn from `generator` (a CPU `torch.Generator`).

    Returns:
        `input_ids [B, T]` and `labels [B, T]` (int64, on the CPU).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (the data must not depend on the device)")
    B, T, n, nq, nk = batch_size, spec.seq_len, spec.num_pairs, spec.num_queries, spec.num_keys
    keys = 1 + _sample_without_replacement(B, nk, n, generator)
    values = 1 + nk + _sample_without_replacement(B, spec.vocab_size - 1 - nk, n, generator)
    asked = _sample_without_replacement(B, n, nq, generator)  # which pairs, in the order they are asked
    slots = _sample_without_replacement(B, (T - 2 * n) // 2, nq, generator).sort(dim=1).values
    query_pos = 2 * n + 2 * slots

    ids = torch.zeros(B, T, dtype=torch.long)
    ids[:, 0 : 2 * n : 2], ids[:, 1 : 2 * n : 2] = keys, values
    answers = values.gather(1, asked)
    ids.scatter_(1, query_pos, keys.gather(1, asked))
    labels = torch.full_like(ids, IGNORE)
    labels.scatter_(1, query_pos + 1, answers)
    return ids, labels


def mqar_dataset(spec: MQARSpec, num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_examples` sequences from a generator seeded with `seed`: identical for identical arguments."""
    return mqar_batch(spec, num_examples, torch.Generator().manual_seed(seed))


def answer_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the answers are read from: the `(row, position)` index pair of every query position (the logits there
    predict the answer), and the answers `[A]`. Position t reads `labels[:, t + 1]`."""
    nxt = labels[:, 1:]
    where = (nxt != IGNORE).nonzero(as_tuple=True)
    return where, nxt[where]

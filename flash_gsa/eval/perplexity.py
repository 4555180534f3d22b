"""Held-out perplexity of a causal language model, measured the way training reads text.

The text (a file or folder as `gsa train --data` takes it, or a list of strings) is split into documents and
tokenized exactly as training tokenizes (`flash_gsa.train.data`: each document BOS + text + EOS, back to back). The
token stream is cut into non-overlapping windows of `seq_len` tokens (the last one may be shorter); `batch_size`
windows are packed into one row with `cu_seqlens` at every window start and every document start, as training packs
its rows, so no token sees another window or another document. Every token except the first of each segment is
scored: its negative log-likelihood given the tokens before it in its window and document (so EOS predictions count,
BOS tokens and window starts are not predicted).

Returned numbers: `tokens` (scored tokens), `nll` (mean negative log-likelihood per scored token, nats),
`perplexity` = exp(nll), `bits_per_byte`: with a byte-level tokenizer, the NLL of the scored byte tokens (EOS
predictions excluded) / ln 2 / their count, exact; with another tokenizer, the NLL of the scored non-special tokens /
ln 2 / the UTF-8 bytes they stand for, estimated as (scored non-special tokens) x (bytes per non-special token of the
evaluated text) (`bits_per_byte_method` says which).

    python -m flash_gsa.eval.perplexity RUN_DIR --data held_out.jsonl [more files] [--seq-len N] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..train.data import IGNORE_INDEX, Batch, TokenData, encode_documents, iter_documents, list_data_files, pack_spans
from ..train.tokenizer import ByteTokenizer, HFTokenizer

PRECISIONS = ("auto", "bf16", "fp32")


def read_documents(path: str | Path) -> list[str]:
    """The documents of a file or folder, as training reads them (a text file is one document; a .jsonl file has one
    per line; .gz is read through)."""
    docs = []
    for f in list_data_files(path):
        docs.extend(iter_documents(f))
    return docs


def _token_data(
    path_or_texts: str | Path | Sequence[str], tokenizer: ByteTokenizer | HFTokenizer
) -> tuple[TokenData, str]:
    if isinstance(path_or_texts, (str, Path)):
        path = Path(path_or_texts)
        if not path.exists():
            raise FileNotFoundError(f"evaluation data {path} does not exist")
        docs, source = read_documents(path), str(path)
    elif isinstance(path_or_texts, Sequence) and all(isinstance(t, str) for t in path_or_texts):
        docs, source = list(path_or_texts), f"{len(path_or_texts)} text(s)"
    else:
        raise ValueError("path_or_texts must be a file or folder path, or a list of strings")
    data = encode_documents(docs, tokenizer)
    if len(data.tokens) < 2:
        raise ValueError(f"no text to evaluate in {source}")
    return data, source


def _is_byte_level(tokenizer: ByteTokenizer | HFTokenizer) -> bool:
    return isinstance(tokenizer, ByteTokenizer) or str(getattr(tokenizer, "fingerprint", "")).startswith("byte")


def _special_ids(tokenizer: ByteTokenizer | HFTokenizer) -> list[int]:
    ids = getattr(getattr(tokenizer, "hf", None), "all_special_ids", None) or []
    ids = set(ids) | {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    return sorted(ids)


def targets_of(batch: Batch) -> torch.Tensor:
    """The target of every position of a packed batch ([1, N]; -100 = not scored): the next token, except across a
    segment start (the same targets as the model's training loss, `causal_lm_loss`)."""
    targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    targets[:, batch.cu_seqlens[1:-1].long() - 1] = IGNORE_INDEX
    return targets


def windows(num_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """Non-overlapping [lo, hi) windows of `seq_len` tokens covering `num_tokens`; the last may be shorter (a last
    window of a single token predicts nothing and is dropped)."""
    spans = [(lo, min(lo + seq_len, num_tokens)) for lo in range(0, num_tokens, seq_len)]
    return [s for s in spans if s[1] - s[0] >= 2]


@torch.no_grad()
def perplexity(
    model,
    tokenizer: ByteTokenizer | HFTokenizer,
    path_or_texts: str | Path | Sequence[str],
    seq_len: int,
    batch_size: int,
    device: str | torch.device | None = None,
    max_tokens: int | None = None,
    precision: str = "auto",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on held-out text (see the module docstring for exactly what is scored).

    Args:
        model: a causal LM taking `input_ids` and `cu_seqlens` (a `GSAForCausalLM`); it is put in eval mode.
        tokenizer: the model's tokenizer (`flash_gsa.train.tokenizer`).
        path_or_texts: a text/.jsonl(.gz) file or a folder of them, or a list of document strings.
        seq_len: tokens per window (use the training seq_len).
        batch_size: windows per forward pass.
        device: where to run; default the model's device.
        max_tokens: evaluate only the first this many tokens of the token stream (None = all).
        precision: "bf16" autocast, "fp32", or "auto" (bf16 on CUDA, as training does, else fp32).
        show_progress: a tqdm bar over the windows.

    Returns: {"source", "tokens", "nll", "perplexity", "bits_per_byte", "bits_per_byte_method", "bytes",
    "windows", "documents", "seq_len", "seconds"}.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window of one token predicts nothing), got {seq_len}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens must be None or an int >= 2, got {max_tokens!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    data, source = _token_data(path_or_texts, tokenizer)
    n_tokens = len(data.tokens) if max_tokens is None else min(max_tokens, len(data.tokens))
    spans = windows(n_tokens, seq_len)
    documents = int(np.searchsorted(data.doc_offsets, n_tokens, side="left"))
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    byte_level = _is_byte_level(tokenizer)
    special = torch.tensor(_special_ids(tokenizer), dtype=torch.long, device=device)
    nll_all = torch.zeros((), dtype=torch.float64, device=device)
    nll_text = torch.zeros((), dtype=torch.float64, device=device)  # scored tokens that are text (not specials)
    n_all = n_text = 0
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not show_progress)
    try:
        for b in range(0, len(spans), batch_size):
            batch = pack_spans(data, spans[b : b + batch_size]).to(device)
            with autocast:
                logits = model(input_ids=batch.input_ids, cu_seqlens=batch.cu_seqlens).logits
            targets = targets_of(batch)[0]
            scored = targets != IGNORE_INDEX
            nll = F.cross_entropy(logits[0].float()[scored], targets[scored], reduction="none").double()
            text = ~torch.isin(targets[scored], special)
            nll_all += nll.sum()
            nll_text += nll[text].sum()
            n_all += int(scored.sum())
            n_text += int(text.sum())
            bar.update(len(spans[b : b + batch_size]))
    finally:
        bar.close()
        model.train(was_training)
    if n_all == 0:
        raise ValueError(f"nothing to score in {source}: give more text, or a larger max_tokens")
    nll_mean = nll_all.item() / n_all
    if byte_level:
        n_bytes, method = n_text, "exact: byte tokens"
    else:
        ids = np.asarray(data.tokens[:n_tokens], dtype=np.int64)
        text_tokens = int((~np.isin(ids, _special_ids(tokenizer))).sum())
        docs_bytes = _text_bytes(data, n_tokens, tokenizer)
        n_bytes = n_text * docs_bytes / max(text_tokens, 1)
        method = "estimated: scored text tokens x bytes per text token"
    return {
        "source": source,
        "tokens": n_all,
        "nll": nll_mean,
        "perplexity": math.exp(min(nll_mean, 700.0)),
        "bits_per_byte": nll_text.item() / math.log(2) / n_bytes if n_bytes else None,
        "bits_per_byte_method": method,
        "bytes": int(round(n_bytes)),
        "windows": len(spans),
        "documents": documents,
        "seq_len": seq_len,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _text_bytes(data: TokenData, n_tokens: int, tokenizer: ByteTokenizer | HFTokenizer) -> int:
    """UTF-8 bytes of the text in the first `n_tokens` tokens (decoded document by document, specials dropped)."""
    total = 0
    offs = data.doc_offsets
    for lo, hi in zip(offs[:-1], offs[1:], strict=True):
        if lo >= n_tokens:
            break
        ids = np.asarray(data.tokens[lo : min(hi, n_tokens)], dtype=np.int64).tolist()
        total += len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
    return total


# -- command line ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from ..train.config import load_config
    from ..train.distributed import resolve_device
    from ..train.loop import CONFIG_FILE
    from ..train.sample import load_run

    p = argparse.ArgumentParser(
        prog="python -m flash_gsa.eval.perplexity",
        description="Held-out perplexity of a trained run (a folder written by gsa train) on text files.",
    )
    p.add_argument("run_dir", help="a run folder written by gsa train (or one of its checkpoints)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="text/.jsonl(.gz) files or folders")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the run's training seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of each file")
    p.add_argument("--device", default="auto", help="torch device; auto = cuda if available else cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="bf16 autocast on CUDA by default")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    try:
        run = Path(a.run_dir)
        seq_len = a.seq_len
        if seq_len is None:
            cfg_dir = run if run.parent.name != "checkpoints" else run.parent.parent
            if not (cfg_dir / CONFIG_FILE).is_file():
                raise ValueError(f"{cfg_dir} has no {CONFIG_FILE}: give --seq-len")
            seq_len = load_config(cfg_dir / CONFIG_FILE).seq_len
        model, tokenizer = load_run(run, resolve_device(a.device))
        results = [
            perplexity(model, tokenizer, path, seq_len, a.batch_size, max_tokens=a.max_tokens, precision=a.precision)
            for path in a.data
        ]
    except (ValueError, FileNotFoundError) as e:
        print(f"perplexity: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        bpb = "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
        print(f"{r['source']}: perplexity {r['perplexity']:.4f} (nll {r['nll']:.4f} nats/token, {bpb} bits/byte) "
              f"over {r['tokens']:,} tokens in {r['windows']} windows of {r['seq_len']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"run_dir": str(run), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenizers for training: a built-in byte-level one, or any Hugging Face tokenizer (a folder or a GGUF file).

Both expose the small interface the data pipeline and sampling use: `encode`, `encode_batch`, `decode`,
`vocab_size`, `bos_token_id`, `eos_token_id`, `fingerprint` (identifies the vocabulary for the token cache) and
`save_pretrained`. `load_tokenizer` reads any of them back, including from a finished run's folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    fingerprint: str

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
    def save_pretrained(self, directory: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS (256) and EOS (257)."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257
    fingerprint = "byte-v1"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS first (as Hugging Face's Llama tokenizers do)."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. Special tokens are dropped or shown as <bos>/<eos>."""
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                pending.append(i)
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})")
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append("<bos>" if i == self.bos_token_id else "<eos>")
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "byte", "version": 1}) + "\n")

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer:
    """A Hugging Face tokenizer behind the same interface; `vocab_size` counts added tokens too."""

    def __init__(self, tokenizer) -> None:
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        if getattr(tokenizer, "is_fast", False):
            spec = tokenizer.backend_tokenizer.to_str()
        else:
            spec = json.dumps(sorted(tokenizer.get_vocab().items()))
        digest = hashlib.sha256(f"{spec}|{self.bos_token_id}|{self.eos_token_id}".encode()).hexdigest()[:16]
        self.fingerprint = f"hf-{digest}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer:
    """`"byte"`, a folder holding a saved tokenizer (byte or Hugging Face), or a `.gguf` file."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(spec)!r} not found: give 'byte', a tokenizer folder or a .gguf file")
    if path.is_dir() and (path / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"tokenizer file {path} is not a .gguf file; give a folder or a .gguf file")
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            hf = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ImportError) as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e
    return HFTokenizer(hf)

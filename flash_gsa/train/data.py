"""Training data: read documents, tokenize them once into a memory-mapped cache, pack them into rows.

Sources: a text file (one document), a `.jsonl` file (one document per line, in its "text" field), either one
gzipped (`.gz`), or a folder searched recursively for such files (`.txt`, `.text`, `.md`, `.jsonl`, plus `.gz`).

Cache: `<key>.bin` holds every document's tokens back to back (uint16, or uint32 for vocabularies over 65,536),
each document as BOS + text + EOS where the tokenizer has them; `<key>.idx` holds the int64 document offsets
[D + 1]; `<key>.json` is a small readable header written last, so a cache is complete exactly when its header
exists. The key hashes the tokenizer and the files' paths, sizes and modification times.

Packing: the token stream is cut into rows of `seq_len` tokens. A micro-batch of B rows becomes one packed row
of B * seq_len tokens with `cu_seqlens` marking every document start and every row start, and the label at each of
those starts set to -100, so no token is predicted from, or attends to, another document.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .tokenizer import ByteTokenizer, HFTokenizer

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "austen.txt.gz"
KINDS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl"}
CACHE_VERSION = 1
IGNORE_INDEX = -100


# -- reading ----------------------------------------------------------------------------------------------------


def _kind(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return KINDS.get(Path(name).suffix.lower())


def list_data_files(path: str | Path) -> list[Path]:
    """The files `path` stands for: itself, or the data files found recursively in a folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and _kind(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"no data files under {path}: expected .txt, .text, .md or .jsonl files, optionally .gz")
    return files


def iter_documents(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """The non-empty documents of one file. `progress(n)` is told the file's bytes read so far."""
    kind = _kind(path) or "text"  # a file named explicitly is read as text whatever its suffix
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
        try:
            if kind == "text":
                doc = text.read()
                if progress:
                    progress(raw.tell())
                if doc:
                    yield doc
                return
            for lineno, line in enumerate(text, 1):
                if progress and lineno % 256 == 0:
                    progress(raw.tell())
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                doc = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(doc, str):
                    raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
                if doc:
                    yield doc
            if progress:
                progress(raw.tell())
        except (gzip.BadGzipFile, EOFError) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None


# -- tokenize once, cache -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenData:
    """A tokenized corpus: `tokens` (memory-mapped, 1-D) and document offsets `doc_offsets` [D + 1]; `header` is
    the cache's header file (None for a corpus tokenized in memory by `encode_documents`)."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    vocab_size: int
    header: Path | None

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1


def _specials(tokenizer: ByteTokenizer | HFTokenizer) -> tuple[list[int], list[int]]:
    """([BOS] or [], [EOS] or []): what every document is wrapped in."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def encode_documents(docs: Sequence[str], tokenizer: ByteTokenizer | HFTokenizer) -> TokenData:
    """Tokenize `docs` in memory exactly as the cache does (each document BOS + text + EOS, back to back)."""
    bos, eos = _specials(tokenizer)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    pieces, offsets = [], [0]
    for ids in tokenizer.encode_batch([d for d in docs if d]):
        arr = np.asarray(bos + ids + eos, dtype=dtype)
        pieces.append(arr)
        offsets.append(offsets[-1] + len(arr))
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    return TokenData(tokens, np.asarray(offsets, dtype=np.int64), tokenizer.vocab_size, None)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLASH_GSA_CACHE", Path.home() / ".cache" / "flash_gsa"))


def cache_key(files: Sequence[Path], tokenizer: ByteTokenizer | HFTokenizer) -> str:
    """Hash of the tokenizer and each file's absolute path, size and modification time."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps({"version": CACHE_VERSION, "tokenizer": tokenizer.fingerprint, "files": stats})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def token_cache(
    data: str | Path | None,
    tokenizer: ByteTokenizer | HFTokenizer,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> TokenData:
    """Tokenize `data` (default: the embedded corpus) into the cache unless already there; open it."""
    files = list_data_files(DEFAULT_CORPUS if data is None else data)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    header = cache_dir / f"{cache_key(files, tokenizer)}.json"
    if not header.is_file():
        build_cache(files, tokenizer, header, show_progress)
    return open_cache(header)


def build_cache(
    files: Sequence[Path], tokenizer: ByteTokenizer | HFTokenizer, header: Path, show_progress: bool = True
) -> None:
    """Tokenize `files` into `header`'s .bin/.idx pair, with a progress bar over the input bytes."""
    header.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    stem = header.with_suffix("")
    tmp = f".tmp-{os.getpid()}"
    bin_path, idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
    bin_tmp, idx_tmp = Path(str(bin_path) + tmp), Path(str(idx_path) + tmp)
    bos, eos = _specials(tokenizer)
    offsets = [0]
    total_bytes = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress)
    try:
        with open(bin_tmp, "wb") as out:
            pending: list[str] = []

            def flush() -> None:
                for ids in tokenizer.encode_batch(pending):
                    arr = np.asarray(bos + ids + eos, dtype=dtype)
                    out.write(arr.tobytes())
                    offsets.append(offsets[-1] + len(arr))
                pending.clear()

            done = 0
            for path in files:
                seen = 0

                def progress(n: int) -> None:
                    nonlocal seen
                    bar.update(n - seen)
                    seen = n

                for doc in iter_documents(path, progress):
                    pending.append(doc)
                    if len(pending) >= 1024:
                        flush()
                flush()
                done += path.stat().st_size
                bar.update(done - bar.n)
        if offsets[-1] == 0:
            raise ValueError(f"no text found in {', '.join(map(str, files))}")
        np.asarray(offsets, dtype=np.int64).tofile(idx_tmp)
        os.replace(bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
        meta = {
            "version": CACHE_VERSION,
            "dtype": np.dtype(dtype).name,
            "num_tokens": offsets[-1],
            "num_docs": len(offsets) - 1,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.fingerprint,
            "bin": bin_path.name,
            "idx": idx_path.name,
            "sources": [str(p.resolve()) for p in files],
        }
        header_tmp = Path(str(header) + tmp)
        header_tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(header_tmp, header)
    finally:
        bar.close()
        for p in (bin_tmp, idx_tmp):
            p.unlink(missing_ok=True)


def open_cache(header: str | Path) -> TokenData:
    """Memory-map a finished cache."""
    header = Path(header)
    meta = json.loads(header.read_text())
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"token cache {header} has version {meta.get('version')}, expected {CACHE_VERSION}")
    tokens = np.memmap(header.parent / meta["bin"], dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    offsets = np.fromfile(header.parent / meta["idx"], dtype=np.int64)
    if len(offsets) != meta["num_docs"] + 1 or offsets[-1] != meta["num_tokens"]:
        raise ValueError(f"token cache {header} is inconsistent; delete its files to rebuild it")
    return TokenData(tokens, offsets, meta["vocab_size"], header)


# -- packing --------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One packed micro-batch: `input_ids` and `labels` [1, B * T], `cu_seqlens` int32 [N + 1]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    num_targets: int  # tokens whose label is predicted (labels != -100 after the model's shift)

    def to(self, device: torch.device | str) -> Batch:
        nb = torch.device(device).type == "cuda"
        return Batch(
            self.input_ids.to(device, non_blocking=nb),
            self.labels.to(device, non_blocking=nb),
            self.cu_seqlens.to(device, non_blocking=nb),
            self.num_targets,
        )


def segment_starts(doc_offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Offsets within the token span [lo, hi) where a segment starts: 0 and every document start inside it."""
    inner = doc_offsets[np.searchsorted(doc_offsets, lo, side="right") : np.searchsorted(doc_offsets, hi, side="left")]
    return np.concatenate([[0], inner - lo]).astype(np.int64)


def pack_spans(data: TokenData, spans: Sequence[tuple[int, int]]) -> Batch:
    """Pack the token spans [lo, hi) of `data` into one row with cu_seqlens at every span start and every document
    start, and the label at each of those starts set to -100 (training packs rows of seq_len this way)."""
    ids = np.concatenate([np.asarray(data.tokens[lo:hi], dtype=np.int64) for lo, hi in spans])
    starts, base = [], 0
    for lo, hi in spans:
        starts.append(segment_starts(data.doc_offsets, lo, hi) + base)
        base += hi - lo
    starts = np.concatenate(starts)
    input_ids = torch.from_numpy(ids).unsqueeze(0)
    labels = input_ids.clone()
    labels[0, torch.from_numpy(starts)] = IGNORE_INDEX
    cu = torch.from_numpy(np.append(starts, len(ids)).astype(np.int32))
    return Batch(input_ids, labels, cu, len(ids) - len(starts))


class PackedData:
    """Rows of `seq_len` tokens cut from a `TokenData`, split into train and validation rows.

    Validation rows are spread evenly over the corpus. Training rows are shuffled once per epoch (seeded) and dealt
    to ranks round-robin, so every rank reads its own shard and all ranks take the same number of micro-batches.
    """

    def __init__(
        self,
        data: TokenData,
        seq_len: int,
        val_fraction: float,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.data, self.seq_len, self.seed, self.rank, self.world_size = data, seq_len, seed, rank, world_size
        n_rows = len(data.tokens) // seq_len
        n_val = max(1, round(n_rows * val_fraction))
        if n_rows - n_val < world_size:
            raise ValueError(
                f"the data has {len(data.tokens):,} tokens = {n_rows} rows of {seq_len}: too few for a validation "
                f"split and {world_size} rank(s); give more data or a smaller seq_len"
            )
        val = np.floor((np.arange(n_val) + 0.5) * n_rows / n_val).astype(np.int64)
        mask = np.zeros(n_rows, dtype=bool)
        mask[val] = True
        self.val_rows = val
        self.train_rows = np.flatnonzero(~mask)
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    @property
    def rows_per_rank(self) -> int:
        return len(self.train_rows) // self.world_size

    def segment_starts(self, row: int) -> np.ndarray:
        """Offsets within `row` where a segment starts: 0 and every document start inside the row."""
        return segment_starts(self.data.doc_offsets, row * self.seq_len, (row + 1) * self.seq_len)

    def make_batch(self, rows: Sequence[int]) -> Batch:
        """Pack `rows` into one row of len(rows) * seq_len tokens with cu_seqlens and masked document starts."""
        T = self.seq_len
        return pack_spans(self.data, [(r * T, (r + 1) * T) for r in rows])

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's training rows in `epoch`, in reading order: a seeded shuffle of all training rows, dealt
        round-robin to the ranks and cut to an equal count per rank."""
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.train_rows)
            self._epoch, self._order = epoch, order[self.rank :: self.world_size][: self.rows_per_rank]
        return self._order

    def train_batch(self, index: int, batch_size: int) -> Batch:
        """This rank's micro-batch number `index` (counting across epochs) of `batch_size` rows."""
        epoch, j = divmod(index, self.batches_per_epoch(batch_size))
        return self.make_batch(self.epoch_rows(epoch)[j * batch_size : (j + 1) * batch_size])

    def batches_per_epoch(self, batch_size: int) -> int:
        n = self.rows_per_rank // batch_size
        if n == 0:
            raise ValueError(
                f"batch_size {batch_size} is larger than the {self.rows_per_rank} training rows per rank; "
                "give more data or lower batch_size/seq_len"
            )
        return n

    def val_batches(self, batch_size: int, max_batches: int) -> Iterator[Batch]:
        """This rank's validation micro-batches (the same ones every call); ranks get equal counts."""
        rows = self.val_rows
        if len(rows) >= self.world_size:
            rows = rows[self.rank :: self.world_size][: len(rows) // self.world_size]
        n = min(max_batches, -(-len(rows) // batch_size))
        for b in range(n):
            yield self.make_batch(rows[b * batch_size : (b + 1) * batch_size])

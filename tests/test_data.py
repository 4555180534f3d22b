"""Data pipeline: file formats, tokenizers, the token cache, packing into rows with cu_seqlens, splits and shards."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flash_gsa.train import data as data_mod
from flash_gsa.train.data import (
    DEFAULT_CORPUS,
    IGNORE_INDEX,
    PackedData,
    TokenData,
    iter_documents,
    list_data_files,
    token_cache,
)
from flash_gsa.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GGUF_PARTS = sorted((SHARED / "models" / "smollm2-135m-instruct").glob("*.gguf.part*"))


def _corpus(root: Path) -> Path:
    """A folder of every supported format, plus files that must be ignored."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("plain text document")
    with gzip.open(root / "sub" / "b.txt.gz", "wt") as f:
        f.write("gzipped text é")
    (root / "c.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n{"text": ""}\n')
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped line"}) + "\n")
    (root / "notes.md").write_text("markdown")
    (root / "table.csv").write_text("x,y\n1,2\n")  # not a data format: ignored in folders
    (root / ".hidden.txt").write_text("hidden")
    return root


def test_folder_lists_supported_files_only(tmp_path):
    root = _corpus(tmp_path / "corpus")
    names = [p.relative_to(root).as_posix() for p in list_data_files(root)]
    assert names == ["a.txt", "c.jsonl", "notes.md", "sub/b.txt.gz", "sub/d.jsonl.gz"]


def test_documents_of_each_format(tmp_path):
    root = _corpus(tmp_path / "corpus")
    docs = {p.name: list(iter_documents(p)) for p in list_data_files(root)}
    assert docs == {
        "a.txt": ["plain text document"],
        "c.jsonl": ["first", "second"],  # blank lines and empty texts are skipped
        "notes.md": ["markdown"],
        "b.txt.gz": ["gzipped text é"],
        "d.jsonl.gz": ["zipped line"],
    }
    # A file named explicitly is read as text whatever its suffix.
    assert list(iter_documents(root / "table.csv")) == ["x,y\n1,2\n"]


def test_missing_and_empty_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        list_data_files(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no data files under"):
        list_data_files(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no text found"):
        token_cache(tmp_path / "blank.txt", ByteTokenizer(), tmp_path / "cache", show_progress=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", r"bad\.jsonl:2: not valid JSON"), ('{"body": "x"}', r'bad\.jsonl:2: .*"text" field')],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        list(iter_documents(path))


def test_bad_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        list(iter_documents(path))


def test_byte_tokenizer_round_trip(tmp_path):
    tok = ByteTokenizer()
    text = "Mr. Darcy — naïve café 🙂"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and max(ids[1:]) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert tok.encode_batch([text, "x"]) == [ids[1:], [ord("x")]]
    assert tok.decode([0xE2, 0x80]) == "\ufffd"  # a cut UTF-8 sequence decodes without raising
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([300])
    tok.save_pretrained(tmp_path / "tok")
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "vocab.txt").write_text("a")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_tokenizer(tmp_path / "vocab.txt")


def _hf_tokenizer_folder(path: Path) -> Path:
    """A small BPE tokenizer trained here, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["It is a truth universally acknowledged, that a single man"] * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(path)
    return path


def test_hf_tokenizer_folder_and_cache(tmp_path):
    tok = load_tokenizer(_hf_tokenizer_folder(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer)
    text = "a single truth, universally"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    (tmp_path / "d.txt").write_text(text)
    cache = token_cache(tmp_path / "d.txt", tok, tmp_path / "cache", show_progress=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert cache.tokens.tolist() == [tok.bos_token_id, *ids, tok.eos_token_id]
    assert cache.vocab_size == tok.vocab_size
    # Saving and reloading keeps the vocabulary, so the cache key stays the same.
    tok.save_pretrained(tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").fingerprint == tok.fingerprint


@pytest.mark.skipif(not GGUF_PARTS, reason="the SmolLM2 GGUF parts are not in ../shared/models")
def test_tokenizer_from_gguf(tmp_path):
    pytest.importorskip("gguf", reason="reading a GGUF file needs the gguf package (pip install flash-gsa[dev])")
    path = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(path, "wb") as out:
        for part in GGUF_PARTS:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    tok = load_tokenizer(path)
    assert tok.vocab_size == 49152
    ids = tok.encode("It was a truth.", add_special_tokens=False)
    assert tok.decode(ids) == "It was a truth."
    assert len(ids) < len("It was a truth.")  # subwords, not bytes


def test_cache_is_built_once_and_rebuilt_when_data_changes(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_text('{"text": "ab"}\n{"text": "cde"}\n')
    tok = ByteTokenizer()
    first = token_cache(tmp_path / "d", tok, tmp_path / "cache", show_progress=False)
    assert first.tokens.dtype == np.uint16
    assert first.tokens.tolist() == [256, 97, 98, 257, 256, 99, 100, 101, 257]
    assert first.doc_offsets.tolist() == [0, 4, 9]
    header = json.loads(first.header.read_text())
    assert header["num_tokens"] == 9 and header["num_docs"] == 2 and header["tokenizer"] == "byte-v1"

    calls = []
    real_build = data_mod.build_cache
    monkeypatch.setattr(data_mod, "build_cache", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = token_cache(tmp_path / "d", tok, tmp_path / "cache", show_progress=False)
    assert calls == [] and again.header == first.header  # served from the cache

    (tmp_path / "d" / "x.jsonl").write_text('{"text": "changed"}\n')
    changed = token_cache(tmp_path / "d", tok, tmp_path / "cache", show_progress=False)
    assert calls == [1] and changed.header != first.header
    assert ByteTokenizer().decode(changed.tokens.tolist()) == "changed"


def test_default_corpus_is_embedded():
    assert DEFAULT_CORPUS.is_file()
    with gzip.open(DEFAULT_CORPUS, "rt") as f:
        assert "Jane Austen" in f.read(4000)


def _token_data(lengths: list[int], seed: int = 0) -> TokenData:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, 250, size=int(offsets[-1])).astype(np.uint16)
    return TokenData(tokens, offsets, 258, Path("memory"))


def test_packing_never_crosses_documents():
    lengths = [5, 1, 40, 3, 17, 64, 2, 9, 30, 11, 8, 50]
    data = _token_data(lengths)
    packed = PackedData(data, seq_len=16, val_fraction=0.1)
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    rows = [0, 3, 5, 7]
    batch = packed.make_batch(rows)
    cu = batch.cu_seqlens.tolist()
    assert batch.input_ids.shape == (1, 16 * len(rows)) and batch.cu_seqlens.dtype == torch.int32
    assert cu[0] == 0 and cu[-1] == 16 * len(rows)
    flat = np.concatenate([np.arange(r * 16, (r + 1) * 16) for r in rows])  # corpus position of each packed token
    assert np.array_equal(batch.input_ids[0].numpy(), data.tokens[flat])
    for a, b in zip(cu, cu[1:], strict=False):
        assert b > a
        assert len(set(doc_of[flat[a:b]])) == 1, "a segment spans two documents"
        assert np.all(np.diff(flat[a:b]) == 1), "a segment spans two rows"
    # Every document start inside the packed rows is a segment start, and so is every row start.
    for i in range(1, len(flat)):
        if doc_of[flat[i]] != doc_of[flat[i - 1]] or flat[i] != flat[i - 1] + 1:
            assert i in cu
    # Labels: the inputs, except -100 at each segment start (never predicted from the previous document).
    labels = batch.labels[0].numpy()
    starts = np.array(cu[:-1])
    assert np.all(labels[starts] == IGNORE_INDEX)
    rest = np.setdiff1d(np.arange(len(flat)), starts)
    assert np.array_equal(labels[rest], batch.input_ids[0].numpy()[rest])
    assert batch.num_targets == len(flat) - len(starts)


def test_split_and_shards():
    data = _token_data([37] * 100)  # 3700 tokens = 231 rows of 16
    packed = PackedData(data, seq_len=16, val_fraction=0.05, seed=3)
    n_rows = len(data.tokens) // 16
    assert len(packed.val_rows) == round(n_rows * 0.05)
    assert sorted([*packed.val_rows, *packed.train_rows]) == list(range(n_rows))
    assert np.all(np.diff(packed.val_rows) > 1)  # spread over the corpus, not one block

    world, bs = 3, 4
    shards = [PackedData(data, 16, 0.05, seed=3, rank=r, world_size=world) for r in range(world)]
    per_epoch = shards[0].batches_per_epoch(bs)
    seen = [set(shard.epoch_rows(0).tolist()) for shard in shards]
    assert all(len(s) == shards[0].rows_per_rank >= per_epoch * bs for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert set().union(*seen) <= set(packed.train_rows.tolist())
    # Deterministic given (seed, index); a new epoch is a new order.
    a, b = PackedData(data, 16, 0.05, seed=3), PackedData(data, 16, 0.05, seed=3)
    assert a.train_batch(5, bs).input_ids.equal(b.train_batch(5, bs).input_ids)
    n = a.batches_per_epoch(bs)
    assert not a.train_batch(0, bs).input_ids.equal(a.train_batch(n, bs).input_ids)
    # Validation batches are the same every call and split over ranks.
    v0 = [x.input_ids for x in shards[0].val_batches(bs, 10)]
    assert all(x.equal(y) for x, y in zip(v0, [x.input_ids for x in shards[0].val_batches(bs, 10)], strict=True))


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="too few for a validation split"):
        PackedData(_token_data([10]), seq_len=16, val_fraction=0.1)
    packed = PackedData(_token_data([100]), seq_len=16, val_fraction=0.1)
    with pytest.raises(ValueError, match="batch_size 64 is larger than"):
        packed.batches_per_epoch(64)


def test_tokenizing_shows_a_progress_bar(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello " * 1000)
    token_cache(tmp_path / "t.txt", ByteTokenizer(), tmp_path / "c", show_progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "100%" in err

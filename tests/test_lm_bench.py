"""The language-model benchmark (`gsa bench lm`, flash_gsa.bench.lm) and held-out perplexity
(flash_gsa.eval.perplexity) on CPU: the data split, perplexity against an independent computation from the model's
logits, the quick benchmark end to end, and errors of use."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flash_gsa.bench import lm
from flash_gsa.bench.record import REPO_ROOT
from flash_gsa.cli import main as gsa_main
from flash_gsa.eval import perplexity as ppl_mod
from flash_gsa.eval.perplexity import perplexity
from flash_gsa.models import GSAConfig, GSAForCausalLM
from flash_gsa.train.tokenizer import ByteTokenizer

REAL_CORPORA = REPO_ROOT.parent / "shared" / "corpora"
WORDS = "gate slot memory decay forget recall token state chunk query key value write read".split()


def _doc(i: int, n: int = 12) -> str:
    return f"doc {i}: " + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n)) + "."


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> Path:
    """A small stand-in for ../shared/corpora: 60 distinct summaries plus an early copy of the one that ends up at
    index 19 (held out), a dictionary of blank-line separated entries, and an Austen text."""
    root = tmp_path_factory.mktemp("corpora")
    wiki = [_doc(i) for i in range(60)]
    wiki.insert(5, wiki[18])  # after the insert, wiki[18] sits at index 19 (held out) and its copy at 5
    with gzip.open(root / "wiki_summaries.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in wiki)
    entries = [f"Word{i} \\Word{i}\\ n.\n   1. " + _doc(1000 + i, 20) for i in range(400)]
    with gzip.open(root / "gcide.txt.gz", "wt") as f:
        f.write("\n\n".join(entries) + "\n")
    with gzip.open(root / "austen.txt.gz", "wt") as f:
        f.write("EMMA\n\nEmma Woodhouse, handsome, clever, and rich, with a comfortable home. " * 40)
    return root


def _jsonl(path: str | Path) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]


# -- the data split ---------------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_held_out_documents_are_never_trained_on(corpora, tmp_path):
    a = lm.prepare_data(corpora, tmp_path / "a", heldout_every=20, log=lambda s: None)
    b = lm.prepare_data(corpora, tmp_path / "b", heldout_every=20, log=lambda s: None)
    assert {k: v["sha256"] for k, v in a["files"].items()} == {k: v["sha256"] for k, v in b["files"].items()}
    assert lm.prepare_data(corpora, tmp_path / "a", heldout_every=20) == a  # prepared once, then reused

    wiki = [json.loads(line)["text"] for line in gzip.open(corpora / "wiki_summaries.jsonl.gz", "rt")]
    heldout = _jsonl(a["heldout"]["wiki"])
    assert heldout == [wiki[19], wiki[39], wiki[59]]  # every 20th document, in file order
    train_files = sorted(Path(a["train_dir"]).iterdir())
    assert [p.name for p in train_files] == ["gcide.jsonl", "wiki_train.jsonl"]
    train_docs = [d for p in train_files for d in _jsonl(p)]
    assert not set(heldout) & set(train_docs)
    assert a["counts"]["train_wiki"] == {"docs": len(wiki) - 3 - 1, "chars": a["counts"]["train_wiki"]["chars"],
                                         "dropped_duplicates": 1}  # the early copy of wiki[19] is dropped too
    austen = Path(a["heldout"]["austen"]).read_text()
    assert austen == gzip.open(corpora / "austen.txt.gz", "rt").read()
    assert not any("Emma Woodhouse" in d for d in train_docs)
    gcide = "".join(_jsonl(Path(a["train_dir"]) / "gcide.jsonl"))
    assert gcide.strip() == gzip.open(corpora / "gcide.txt.gz", "rt").read().strip()  # all of it, in order

    c = lm.prepare_data(corpora, tmp_path / "a", heldout_every=10, slices=lm.DataSlices(wiki_docs=30))
    assert c["dir"] != a["dir"]  # other settings, another split beside the first
    assert _jsonl(c["heldout"]["wiki"]) == [wiki[9], wiki[19], wiki[29]]


def test_gcide_is_cut_at_blank_lines():
    text = "".join(f"entry {i}\nline\n\n" for i in range(100))
    pieces = lm._split_at_blank_lines(text, 50)
    assert "".join(pieces) == text
    assert all(p.endswith("\n\n") and len(p) >= 50 for p in pieces[:-1])


# -- perplexity -------------------------------------------------------------------------------------------------------


def _model(mixer: str) -> GSAForCausalLM:
    torch.manual_seed(0)
    cfg = GSAConfig(vocab_size=258, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8,
                    intermediate_size=64, mixer=mixer)
    return GSAForCausalLM(cfg).eval()


def _nll_of_sequence(model, ids: list[int]) -> torch.Tensor:
    """Per-token NLL of ids[1:] given the tokens before it, the sequence run alone (no packing)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")


@pytest.mark.parametrize("mixer", ["gsa", "gla", "attention"])
def test_perplexity_is_exp_of_the_mean_nll_from_the_logits(mixer):
    model, tok = _model(mixer), ByteTokenizer()
    docs = ["It was a truth universally acknowledged.", "Gated slots.", "x"]
    # One window holds all three documents: each is scored as if alone.
    r = perplexity(model, tok, docs, seq_len=128, batch_size=4, device="cpu", show_progress=False)
    seqs = [[tok.bos_token_id, *d.encode(), tok.eos_token_id] for d in docs]
    nll = torch.cat([_nll_of_sequence(model, s) for s in seqs])
    assert r["windows"] == 1 and r["documents"] == 3
    assert r["tokens"] == sum(len(s) - 1 for s in seqs) == len(nll)
    assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    assert r["nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    byte_nll = torch.cat([_nll_of_sequence(model, s)[:-1] for s in seqs])  # EOS predictions are not bytes
    assert r["bytes"] == sum(len(d.encode()) for d in docs)
    assert r["bits_per_byte"] == pytest.approx(byte_nll.mean().item() / math.log(2), rel=1e-5)

    # The same number as the model's own training loss on that packed window.
    from flash_gsa.train.data import encode_documents, pack_spans

    data = encode_documents(docs, tok)
    batch = pack_spans(data, [(0, len(data.tokens))])
    with torch.no_grad():
        loss = model(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens).loss
    assert r["nll"] == pytest.approx(loss.item(), rel=1e-5)


def test_windows_do_not_see_each_other_and_max_tokens_cuts_the_stream(tmp_path):
    model, tok = _model("gsa"), ByteTokenizer()
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"  # 67 bytes -> 69 tokens
    path = tmp_path / "held_out.txt"
    path.write_text(text)
    ids = [tok.bos_token_id, *text.encode(), tok.eos_token_id]
    r = perplexity(model, tok, path, seq_len=16, batch_size=2, device="cpu", show_progress=False)
    spans = [(lo, min(lo + 16, len(ids))) for lo in range(0, len(ids), 16)]  # 16, 16, 16, 16, 5
    nll = torch.cat([_nll_of_sequence(model, ids[lo:hi]) for lo, hi in spans])
    assert r["windows"] == 5 and r["tokens"] == len(ids) - 5 == len(nll)
    assert r["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert r["source"] == str(path)

    cut = perplexity(model, tok, path, seq_len=16, batch_size=3, device="cpu", max_tokens=32, show_progress=False)
    nll32 = torch.cat([_nll_of_sequence(model, ids[lo:lo + 16]) for lo in (0, 16)])
    assert cut["tokens"] == 30 and cut["windows"] == 2
    assert cut["nll"] == pytest.approx(nll32.mean().item(), rel=1e-5)


def test_perplexity_errors_are_clear(tmp_path):
    model, tok = _model("gsa"), ByteTokenizer()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        perplexity(model, tok, tmp_path / "missing.jsonl", 16, 2, show_progress=False)
    for kwargs, message in (
        ({"seq_len": 1, "batch_size": 2}, "seq_len must be >= 2"),
        ({"seq_len": 0, "batch_size": 2}, "seq_len must be an int >= 1"),
        ({"seq_len": 16, "batch_size": 0}, "batch_size must be an int >= 1"),
        ({"seq_len": 16, "batch_size": 2, "max_tokens": 1}, "max_tokens must be None or an int >= 2"),
        ({"seq_len": 16, "batch_size": 2, "precision": "fp8"}, "precision must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            perplexity(model, tok, ["some text"], show_progress=False, **kwargs)
    with pytest.raises(ValueError, match="no text to evaluate"):
        perplexity(model, tok, [""], 16, 2, show_progress=False)
    with pytest.raises(ValueError, match="list of strings"):
        perplexity(model, tok, [1, 2], 16, 2, show_progress=False)


# -- the benchmark ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, corpora):
    """`gsa bench lm --quick` on the CPU (the real corpora when present), 10 steps per mixer."""
    root = tmp_path_factory.mktemp("lm_quick")
    src = REAL_CORPORA if REAL_CORPORA.is_dir() else corpora
    argv = ["bench", "lm", "--quick", "--device", "cpu", "--steps", "10", "--corpora", str(src),
            "--work-dir", str(root / "work"), "--results-dir", str(root / "results"), "--no-progress"]
    rc = gsa_main(argv)
    return rc, root


def test_quick_benchmark_writes_a_record_per_mixer_and_a_png(quick_run):
    rc, root = quick_run
    assert rc == 0
    payload = json.loads((root / "results" / "lm_cpu-quick.json").read_text())
    assert payload["benchmark"] == "lm" and payload["stamp"]["device_slug"] == "cpu"
    s = payload["settings"]
    assert s["quick"] and s["preset"] == "tiny" and s["steps"] == 10 and s["mixers"] == list(lm.LM_MIXERS)
    records = payload["records"]
    assert [r["mixer"] for r in records] == list(lm.LM_MIXERS)
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert r["tokens"] == 10 * s["tokens_per_step"] == r["curve"][-1][1]  # the same tokens for every mixer
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_all"] > 0
        assert r["warmup_steps_excluded"] == 5  # the first logged window (log_every 5) is left out
        assert r["peak_mem_gib"] is None  # CPU
        assert math.isfinite(r["final_train_loss"]) and r["final_train_loss"] < math.log(258)
        assert set(r["heldout"]) == {"wiki", "austen"}
        for h in r["heldout"].values():
            assert math.isfinite(h["perplexity"]) and 1 < h["perplexity"] < 258
            assert h["perplexity"] == pytest.approx(math.exp(h["nll"]))
            assert 0 < h["tokens"] <= s["eval"]["max_tokens"]
            assert h["bits_per_byte"] > 0
    png = root / "results" / "lm_cpu-quick.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (root / "results" / "lm_cpu-quick.md").read_text()
    assert md == lm.render_markdown(payload)
    assert all(f"| {m} |" in md for m in lm.LM_MIXERS)


def test_perplexity_cli_on_a_benchmark_run_agrees_with_the_benchmark(quick_run, tmp_path, capsys):
    _, root = quick_run
    payload = json.loads((root / "results" / "lm_cpu-quick.json").read_text())
    record = payload["records"][0]
    wiki = record["heldout"]["wiki"]
    out = tmp_path / "ppl.json"
    rc = ppl_mod.main([record["run_dir"], "--data", wiki["source"], "--max-tokens", "4096", "--batch-size", "8",
                       "--device", "cpu", "--json", str(out)])
    assert rc == 0
    assert "perplexity" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert result["seq_len"] == payload["settings"]["seq_len"]  # taken from the run's training config
    assert result["tokens"] == wiki["tokens"]
    assert result["perplexity"] == pytest.approx(wiki["perplexity"], rel=1e-6)


def test_merge_joins_side_by_side_runs_and_refuses_other_settings(quick_run, tmp_path):
    """Runs made one mixer per GPU are joined into one result: records in input order, the same table as a run of
    all mixers; inputs with other settings or a repeated mixer are refused."""
    _, root = quick_run
    payload = json.loads((root / "results" / "lm_cpu-quick.json").read_text())
    paths = []
    for i, record in enumerate(payload["records"]):
        part = {**payload, "settings": {**payload["settings"], "mixers": [record["mixer"]], "device": f"cpu:{i}"},
                "records": [record]}
        paths.append(tmp_path / f"gpu{i}" / "lm_cpu-quick.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(part))
    out = tmp_path / "merged"
    assert lm.main(["--merge", *map(str, paths), "--results-dir", str(out)]) == 0
    merged = json.loads((out / "lm_cpu-quick.json").read_text())
    assert merged["records"] == payload["records"]
    assert merged["settings"]["mixers"] == list(lm.LM_MIXERS)
    assert merged["settings"]["device"] == "cpu:0, cpu:1, cpu:2" and len(merged["merged_from"]) == 3
    assert (out / "lm_cpu-quick.md").read_text() == lm.render_markdown(merged)
    assert (out / "lm_cpu-quick.png").stat().st_size > 10_000

    other = json.loads(paths[1].read_text())
    other["settings"]["steps"] += 1
    paths[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="not an lm result with the same settings"):
        lm.merge_results(paths, tmp_path / "bad")
    with pytest.raises(ValueError, match="more than one input"):
        lm.merge_results([paths[0], paths[0]], tmp_path / "bad")
    with pytest.raises(ValueError, match="at least two"):
        lm.merge_results(paths[:1], tmp_path / "bad")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mixers", "lstm"], "unknown mixer 'lstm'"),
        (["--mixers", "gsa", "gsa"], "mixers repeat"),
        (["--steps", "0"], "steps must be an int >= 1"),
        (["--set", "model.mixer=gla"], "not allowed here: use --mixers"),
        (["--set", "bogus=1"], "unknown training field"),
        (["--set", "lr=fast"], "lr expects float"),
        (["--preset", "7b"], "unknown preset '7b'"),
        (["--heldout-every", "1"], "heldout_every must be an int >= 2"),
        (["--eval-max-tokens", "0"], "eval_max_tokens must be None or an int >= 1"),
        (["--corpora", "/nonexistent/corpora"], "corpora folder /nonexistent/corpora does not exist"),
    ],
)
def test_bad_benchmark_arguments_are_one_clear_line(extra, message, corpora, tmp_path, capsys):
    argv = ["--quick", "--device", "cpu", "--corpora", str(corpora), "--work-dir", str(tmp_path / "w"),
            "--results-dir", str(tmp_path / "r"), "--no-progress", *extra]
    assert lm.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gsa bench lm: error: ") and message in err
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written


def test_missing_corpus_file_and_bad_run_dir(corpora, tmp_path, capsys):
    partial = tmp_path / "corpora"
    partial.mkdir()
    (partial / "gcide.txt.gz").write_bytes((corpora / "gcide.txt.gz").read_bytes())
    with pytest.raises(FileNotFoundError, match="missing corpus file"):
        lm.prepare_data(partial, tmp_path / "w")
    assert ppl_mod.main([str(tmp_path / "no_run"), "--data", str(tmp_path)]) == 2
    assert "has no train_config.json: give --seq-len" in capsys.readouterr().err
    assert ppl_mod.main([str(tmp_path / "no_run"), "--data", str(tmp_path), "--seq-len", "16"]) == 2
    assert "holds no model" in capsys.readouterr().err


def test_bits_per_byte_with_a_subword_tokenizer(tmp_path):
    """With a BPE tokenizer, bits per byte = NLL of the text tokens / ln 2 / their UTF-8 bytes (here all of them are
    scored, in one window, so the byte count is exact)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flash_gsa.train.tokenizer import load_tokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["It is a truth universally acknowledged, that a single man"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = GSAForCausalLM(GSAConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=2,
                                     num_slots=8, intermediate_size=64)).eval()
    docs = ["a truth universally acknowledged", "a single man, é"]
    r = perplexity(model, tok, docs, seq_len=64, batch_size=1, device="cpu", show_progress=False)
    seqs = [[tok.bos_token_id, *tok.encode(d, add_special_tokens=False), tok.eos_token_id] for d in docs]
    nll = [_nll_of_sequence(model, s) for s in seqs]
    assert r["tokens"] == sum(len(n) for n in nll)
    assert r["perplexity"] == pytest.approx(math.exp(torch.cat(nll).mean().item()), rel=1e-5)
    assert r["bits_per_byte_method"].startswith("estimated")
    assert r["bytes"] == sum(len(d.encode()) for d in docs)
    text_nll = torch.cat([n[:-1] for n in nll]).sum().item()  # EOS predictions excluded
    assert r["bits_per_byte"] == pytest.approx(text_nll / math.log(2) / r["bytes"], rel=1e-5)

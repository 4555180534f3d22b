"""Training library and `gsa` CLI on CPU: configs, exact resume, atomic checkpoints, non-finite steps, packing at the
model level, flags, and the train / generate / plot commands."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flash_gsa.cli import main
from flash_gsa.models import GSAConfig, GSAForCausalLM
from flash_gsa.train import TrainConfig, Trainer, list_presets, load_preset, train
from flash_gsa.train.checkpoint import latest_checkpoint, list_checkpoints, save_atomically
from flash_gsa.train.data import DEFAULT_CORPUS, PackedData, TokenData
from flash_gsa.train.loop import NonFiniteLossError
from flash_gsa.train.metrics import read_metrics
from flash_gsa.train.optim import lr_multiplier

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "num_slots": 8, "intermediate_size": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 kB of the embedded corpus."""
    path = tmp_path_factory.mktemp("corpus") / "austen.txt"
    with gzip.open(DEFAULT_CORPUS, "rt") as f:
        path.write_text(f.read(60_000))
    return path


def tiny(tmp_path: Path, corpus: Path, **train_fields) -> TrainConfig:
    """The tiny preset shrunk to a few milliseconds per step."""
    overrides = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    overrides.update(
        data=str(corpus), cache_dir=str(tmp_path / "cache"), device="cpu", seq_len=32, batch_size=2, steps=6,
        warmup_steps=2, log_every=1, eval_every=3, eval_batches=2, save_every=0, sample_tokens=0,
    )  # fmt: skip
    overrides.update(train_fields)
    return load_preset("tiny").override(overrides)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


# -- configs ------------------------------------------------------------------------------------------------------


def test_presets_load_and_the_1_3b_preset_is_the_paper_shape():
    assert set(list_presets()) >= {"tiny", "30m", "125m", "340m", "1.3b"}
    for name in list_presets():
        cfg = load_preset(name)
        GSAConfig(vocab_size=32000, **cfg.model)  # every model field is accepted
        assert cfg.description
    big = GSAConfig(vocab_size=32000, **load_preset("1.3b").model)
    assert (big.num_hidden_layers, big.hidden_size, big.num_heads, big.num_slots) == (24, 2048, 4, 64)
    assert (big.gate_logit_normalizer, big.intermediate_size) == (8, 5632)


def test_config_round_trip_and_overrides(tmp_path):
    cfg = load_preset("tiny").override(
        ["steps=12", "lr=1e-3", "compile=true", "stop_at=none", "model.attn_layers=[1]", "model.mixer=attention"]
    )
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.stop_at) == (12, 1e-3, True, None)
    assert cfg.model["attn_layers"] == [1] and cfg.model["mixer"] == "attention"
    cfg.save(tmp_path / "c.json")
    from flash_gsa.train import load_config

    assert load_config(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("steps=0", "steps must be > 0"),
        ("steps=1.5", "steps expects int"),
        ("lr=-1", "lr must be > 0"),
        ("lr=nan", "lr must be finite"),
        ("precision=fp16", "precision must be one of"),
        ("parallel=zero3", "parallel must be one of"),
        ("val_fraction=0.7", r"val_fraction must be in \(0, 0.5\)"),
        ("beta2=1", r"beta2 must be in \[0, 1\)"),
        ("compile=maybe", "compile expects bool"),
        ("stop_at=99999", "stop_at must be in"),
        ("device=gpu0", "is not a torch device"),
        ("bogus=1", "unknown training field"),
        ("model.mixer=rnn", "model: mixer must be one of"),
        ("model.hidden_size=-4", "model: hidden_size must be an int >= 1"),
        ("model.num_heads=3", r"model: hidden_size \(128\) must be divisible by num_heads \(3\)"),
        ("model.hidden_sise=64", "unknown model field"),
        ("model=1", "cannot be overridden as a whole"),
        ("steps", "expected key=value"),
    ],
)
def test_bad_config_values_are_clear_errors(assignment, message):
    with pytest.raises(ValueError, match=message):
        load_preset("tiny").override([assignment])


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'; available: 1.3b, 125m"):
        load_preset("huge")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from flash_gsa.train import load_config

        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"train": {"steps": "many"}}')
    with pytest.raises(ValueError, match="bad.json: steps must be int"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "worse.json").write_text('{"training": {}}')
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(tmp_path / "worse.json")


def test_lr_schedule():
    f = [lr_multiplier(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    assert f[13] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)


# -- the loop -----------------------------------------------------------------------------------------------------


def test_resume_is_bitwise_exact(tmp_path, corpus):
    """2n steps in one go == n steps, stop, resume for n more: same losses, same weights, bit for bit."""
    cfg = tiny(tmp_path, corpus, steps=6, grad_accum=2, save_every=2, keep_last=2)
    train(cfg, tmp_path / "full", show_progress=False)
    train(cfg.override({"stop_at": 3}), tmp_path / "split", show_progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000002", "step_00000003"]
    assert max(losses(tmp_path / "split")) == 3
    result = train(cfg, tmp_path / "split", resume=True, show_progress=False)
    assert result.step == 6
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert list(full) == list(split) == [1, 2, 3, 4, 5, 6]
    assert full == split  # exact float equality
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["step_00000004", "step_00000006"]  # keep_last


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    cfg = tiny(tmp_path, corpus)
    trainer = Trainer(cfg, tmp_path / "run", show_progress=False)
    trainer.train_step()
    trainer.train_step()
    good = trainer.save_checkpoint()
    saved = {k: v.clone() for k, v in trainer.hf_model.state_dict().items()}
    trainer.train_step()

    def crash(*args, **kwargs):  # the model is already written when the optimizer state is saved
        raise OSError("simulated crash in the middle of a save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    leftovers = list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()  # it failed half-way
    assert latest_checkpoint(tmp_path / "run") == good

    resumed = Trainer(cfg, tmp_path / "run", resume=True, show_progress=False)
    assert resumed.step == 2
    assert all(torch.equal(v, saved[k]) for k, v in resumed.hf_model.state_dict().items())
    resumed.train_step()
    resumed.save_checkpoint()
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # the next save clears the debris


def test_save_atomically_prunes_only_after_success(tmp_path):
    for step in (1, 2, 3):
        save_atomically(tmp_path, step, lambda d: (d / "f").write_text("x"), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]

    def fail(d):
        (d / "f").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomically(tmp_path, 4, fail, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    save_atomically(tmp_path, 3, lambda d: (d / "f").write_text("again"), keep_last=2)  # same step: replaced
    assert (tmp_path / "checkpoints" / "step_00000003" / "f").read_text() == "again"


def test_a_fresh_run_refuses_an_old_run_folder(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, steps=2, eval_every=0)
    train(cfg, tmp_path / "run", show_progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(cfg, tmp_path / "run", show_progress=False)
    train(cfg, tmp_path / "run", overwrite=True, show_progress=False)
    assert list(losses(tmp_path / "run")) == [1, 2]


def test_trains_on_a_folder_of_jsonl_and_gzipped_text(tmp_path, corpus):
    folder = tmp_path / "mixed"
    folder.mkdir()
    text = corpus.read_text()
    with gzip.open(folder / "part1.txt.gz", "wt") as f:
        f.write(text[:30_000])
    lines = [json.dumps({"text": text[i : i + 3000]}) for i in range(30_000, 60_000, 3000)]
    (folder / "part2.jsonl").write_text("\n".join(lines) + "\n")
    result = train(tiny(tmp_path, corpus, data=str(folder), steps=2), tmp_path / "run", show_progress=False)
    assert result.step == 2 and math.isfinite(result.val_loss)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, corpus):
    trainer = Trainer(tiny(tmp_path, corpus, max_nonfinite=2), tmp_path / "run", show_progress=False)
    poison = {"on": False}
    trainer.hf_model.lm_head.register_forward_hook(lambda m, i, out: out * math.nan if poison["on"] else None)
    assert not trainer.train_step().skipped
    before = {k: v.clone() for k, v in trainer.hf_model.state_dict().items()}
    poison["on"] = True
    stats = trainer.train_step()
    assert stats.skipped and trainer.nonfinite == 1 and trainer.step == 2
    assert all(torch.equal(v, before[k]) for k, v in trainer.hf_model.state_dict().items())  # weights untouched
    poison["on"] = False
    stats = trainer.train_step()
    assert not stats.skipped and math.isfinite(stats.loss)
    assert all(torch.isfinite(p).all() for p in trainer.hf_model.parameters())
    poison["on"] = True
    with pytest.raises(NonFiniteLossError, match="2 steps had a non-finite loss"):
        trainer.fit()
    events = [r for r in read_metrics(tmp_path / "run") if r.get("event") == "nonfinite"]
    assert [e["nonfinite"] for e in events] == [2]


def test_accumulation_matches_one_big_batch(tmp_path, corpus):
    """grad_accum=2 of batch 2 == batch 4 in one micro-batch: the loss is weighted by predicted tokens."""
    a = Trainer(tiny(tmp_path, corpus, batch_size=4, grad_accum=1), tmp_path / "a", show_progress=False)
    b = Trainer(tiny(tmp_path, corpus, batch_size=2, grad_accum=2), tmp_path / "b", show_progress=False)
    assert np.array_equal(a.data.epoch_rows(0), b.data.epoch_rows(0))  # same rows, read 4 at once or 2 + 2
    sa, sb = a.train_step(), b.train_step()
    assert sa.loss == pytest.approx(sb.loss, rel=1e-6) and sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-5)


def test_flags_activation_checkpointing_bf16_compile_mfu(tmp_path, corpus, monkeypatch):
    plain = Trainer(tiny(tmp_path, corpus), tmp_path / "plain", show_progress=False)
    ckpt = Trainer(tiny(tmp_path, corpus, activation_checkpointing=True), tmp_path / "ac", show_progress=False)
    assert ckpt.hf_model.model.gradient_checkpointing
    s1, s2 = plain.train_step(), ckpt.train_step()
    assert s1.loss == pytest.approx(s2.loss, rel=1e-6) and s1.grad_norm == pytest.approx(s2.grad_norm, rel=1e-5)

    bf16 = Trainer(tiny(tmp_path, corpus, precision="bf16"), tmp_path / "bf16", show_progress=False)
    assert bf16.precision == "bf16" and math.isfinite(bf16.train_step().loss)
    assert next(bf16.hf_model.parameters()).dtype == torch.float32  # autocast, fp32 master weights

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    Trainer(tiny(tmp_path, corpus, compile=True), tmp_path / "compiled", show_progress=False)
    assert compiled == ["GSAForCausalLM"]

    train(tiny(tmp_path, corpus, steps=2, peak_tflops=0.001), tmp_path / "mfu", show_progress=False)
    assert all(r["mfu"] > 0 for r in read_metrics(tmp_path / "mfu") if "loss" in r)


@pytest.mark.parametrize("mixer", ["gsa", "attention"])
def test_a_documents_loss_is_the_same_alone_or_packed(mixer):
    torch.manual_seed(0)
    model = GSAForCausalLM(GSAConfig(vocab_size=258, mixer=mixer, **TINY_MODEL)).eval()
    lengths = [7, 20, 3, 41, 12, 30, 9]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.random.default_rng(0).integers(0, 258, size=int(offsets[-1])).astype(np.uint16)
    packed = PackedData(TokenData(tokens, offsets, 258, Path("-")), seq_len=24, val_fraction=0.1)
    batch = packed.make_batch([0, 1, 2, 4])
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
        cu = batch.cu_seqlens.tolist()
        total, count = 0.0, 0
        for a, b in zip(cu, cu[1:], strict=False):
            alone = model(input_ids=batch.input_ids[:, a:b], labels=batch.input_ids[:, a:b])
            torch.testing.assert_close(out.logits[:, a:b], alone.logits, rtol=1e-4, atol=1e-5)
            if b - a > 1:
                total, count = total + alone.loss.item() * (b - a - 1), count + (b - a - 1)
    assert len(cu) > 5  # the rows really hold several documents
    assert count == batch.num_targets
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


# -- the command line ---------------------------------------------------------------------------------------------


def _cli_train_args(tmp_path: Path, corpus: Path, out: Path) -> list[str]:
    model = [f"--set=model.{k}={v}" for k, v in TINY_MODEL.items()]
    return [
        "train", "--preset", "tiny", "--out", str(out), "--steps", "4", "--data", str(corpus), "--device", "cpu",
        "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "2", "--sample-tokens", "12",
        "--cache-dir", str(tmp_path / "cache"), "--no-compile", *model,
    ]  # fmt: skip


def test_cli_train_resume_generate_plot(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(_cli_train_args(tmp_path, corpus, out)) == 0
    printed = capsys.readouterr().out
    assert "validation perplexity:" in printed and "sample: It was" in printed
    for name in ("model.safetensors", "config.json", "log.jsonl", "loss.png", "train_config.json"):
        assert (out / name).is_file(), name
    model = GSAForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 258
    assert json.loads((out / "train_config.json").read_text())["train"]["steps"] == 4

    assert main(_cli_train_args(tmp_path, corpus, out)) == 2
    assert "already holds a run" in capsys.readouterr().err

    assert main(["train", "--out", str(out), "--resume", "--steps", "6", "--sample-tokens", "0"]) == 0
    assert max(losses(out)) == 6
    capsys.readouterr()

    assert main(["generate", str(out), "--prompt", "Mr", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Mr")
    ckpt = list_checkpoints(out)[-1]  # a checkpoint folder works too (its tokenizer is the run's)
    assert main(["generate", str(ckpt), "--prompt", "Mr", "--max-new-tokens", "4", "--top-k", "0"]) == 0
    assert capsys.readouterr().out.startswith("Mr")
    png = tmp_path / "curves.png"
    assert main(["plot", str(out), str(out), "--out", str(png), "--x", "tokens"]) == 0
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "no/such/file.txt"], "data path no/such/file.txt does not exist"),
        (["--tokenizer", "no/such/tokenizer"], "tokenizer 'no/such/tokenizer' not found"),
        (["--steps", "ten"], "steps expects int, got 'ten'"),
        (["--set", "lr=0"], "lr must be > 0"),
        (["--set", "model.mixer=rnn"], "model: mixer must be one of"),
        (["--preset", "7b"], "unknown preset '7b'"),
        (["--config", "no/such.json"], "config file no/such.json does not exist"),
        (["--device", "gpu0"], "device 'gpu0' is not a torch device"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, extra, message, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_device_choice():
    from flash_gsa.train.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")

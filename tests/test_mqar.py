"""MQAR: the data generator, the recall harness (grid, records, files, CLI) and one learning run, on CPU."""

import json

import pytest
import torch

from flash_gsa.cli import main
from flash_gsa.eval.mqar import IGNORE, MQARSpec, answer_targets, mqar_batch, mqar_dataset
from flash_gsa.eval.recall import (
    QUICK_GRID,
    MQARGrid,
    best_runs,
    grid_from_options,
    mqar_model_config,
    render_markdown,
    run_mqar,
    train_cell,
)
from flash_gsa.models import GSAForCausalLM

SPEC = MQARSpec(vocab_size=41, seq_len=48, num_pairs=6, num_queries=4)


def test_generator_structure():
    ids, labels = mqar_dataset(SPEC, 50, seed=3)
    n, nk = SPEC.num_pairs, SPEC.num_keys
    assert ids.shape == labels.shape == (50, 48) and ids.dtype == labels.dtype == torch.long
    keys, values = ids[:, 0 : 2 * n : 2], ids[:, 1 : 2 * n : 2]
    assert ((keys >= 1) & (keys <= nk)).all() and ((values > nk) & (values < SPEC.vocab_size)).all()
    for row in range(50):
        assert len(set(keys[row].tolist())) == n and len(set(values[row].tolist())) == n
        pairs = dict(zip(keys[row].tolist(), values[row].tolist(), strict=True))
        answer_pos = (labels[row] != IGNORE).nonzero().flatten().tolist()
        assert len(answer_pos) == SPEC.num_queries  # the loss covers exactly the answers
        asked = [ids[row, p - 1].item() for p in answer_pos]
        assert len(set(asked)) == SPEC.num_queries and all(p >= 2 * n + 1 for p in answer_pos)
        for p, key in zip(answer_pos, asked, strict=True):
            assert labels[row, p] == pairs[key]  # the answer is the value of the key right before it
            assert ids[row, p] == 0  # and is never shown
        rest = torch.ones(48, dtype=torch.bool)
        rest[: 2 * n] = False
        rest[[p - 1 for p in answer_pos]] = False
        assert (ids[row, rest] == 0).all()  # everything else is the blank filler


def test_generator_is_deterministic_by_seed():
    a, b, c = mqar_dataset(SPEC, 8, seed=1), mqar_dataset(SPEC, 8, seed=1), mqar_dataset(SPEC, 8, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(mqar_batch(SPEC, 8, gen)[0], a[0])


def test_answer_targets_align_logits_with_answers():
    ids, labels = mqar_dataset(SPEC, 3, seed=0)
    (rows, pos), answers = answer_targets(labels)
    assert torch.equal(answers, labels[rows, pos + 1])
    assert (ids[rows, pos] >= 1).all() and (ids[rows, pos] <= SPEC.num_keys).all()  # read at the query keys


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_pairs": 0}, "num_pairs"),
        ({"num_queries": 7}, "num_queries"),
        ({"vocab_size": 12}, "vocab_size must be >= 13"),
        ({"seq_len": 23}, "cannot hold"),
    ],
)
def test_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARSpec(**{"vocab_size": 41, "seq_len": 48, "num_pairs": 6, **kwargs})


def test_batch_errors():
    with pytest.raises(ValueError, match="batch_size"):
        mqar_batch(SPEC, 0, torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        mqar_batch(SPEC, 2, None)


def test_model_shapes_give_equal_recurrent_state():
    sizes = {}
    for mixer in ("gsa", "gla", "abc", "attention"):
        model = GSAForCausalLM(mqar_model_config(mixer, 64, 32, seq_len=128))
        sizes[mixer] = model.model.layers[0].mixer.state_size(128)
        assert model.config.num_hidden_layers == 2
    conv = 3 * 64  # the windows of a kernel-4 convolution, per channel of q, k and v
    assert sizes["gsa"] == 64 * 32 + 3 * conv and sizes["gla"] == 64 * 32 + 2 * conv  # gla's q and k are D/2 wide
    assert sizes["abc"] == sizes["gsa"] + 2 * 16
    assert sizes["attention"] == 2 * 128 * 64 + 3 * conv


def test_grid_options_and_errors():
    grid = grid_from_options(True, {"settings": ["32:2", "64:4"], "lrs": [1e-3], "steps": None},
                             ["gsa.num_slots=16", "gsa.feature_map=relu"])
    assert grid.settings == ((32, 2), (64, 4)) and grid.lrs == (1e-3,) and grid.steps == QUICK_GRID.steps
    assert grid.overrides == {"gsa": {"num_slots": 16, "feature_map": "relu"}}
    assert MQARGrid(overrides={"gsa": {"gate_logit_normalizer": 32}, "gla": {"num_hidden_layers": 3}}).overrides
    assert len(grid.cells()) == 2 * len(grid.d_models) * 4
    with pytest.raises(ValueError, match="T:PAIRS"):
        grid_from_options(True, {"settings": ["32"]})
    with pytest.raises(ValueError, match="MIXER.FIELD=VALUE"):
        grid_from_options(True, {}, ["num_slots=3"])
    for kwargs, match in [({"mixers": ("rnn",)}, "unknown mixers"), ({"d_models": (30,)}, "multiple of 8"),
                          ({"settings": ((16, 8),)}, "cannot hold"), ({"lrs": (0.0,)}, "learning rates"),
                          ({"overrides": {"gsa": {"slots": 3}}}, "does not have"), ({"budget_s": 0}, "budget_s"),
                          ({"mixers": ("gla",), "overrides": {"gsa": {}}}, "not in the grid"),
                          # gla keeps its own gate normalizer (16) and abc has no gate: a silent no-op otherwise
                          ({"overrides": {"gla": {"gate_logit_normalizer": 4}}}, "gla does not use"),
                          ({"overrides": {"abc": {"gate_logit_normalizer": 4}}}, "abc does not use"),
                          ({"overrides": {"gsa": {"attn_num_heads": 4}}}, "gsa does not use"),
                          ({"workers": 0}, "workers")]:
        with pytest.raises(ValueError, match=match):
            MQARGrid(**kwargs)


def test_records_best_runs_and_table():
    grid = MQARGrid(settings=((32, 2),), d_models=(16,), mixers=("gsa", "attention"), lrs=(1e-3, 3e-3), vocab_size=16,
                    steps=3, batch_size=4, eval_examples=8, budget_s=600)
    record = train_cell(grid.cells()[0], grid, "cpu")
    for key in ("mixer", "d_model", "state_size", "seq_len", "num_pairs", "lr", "accuracy", "steps", "seconds"):
        assert key in record
    assert record["status"] == "ok" and record["steps"] == 3 and 0 <= record["accuracy"] <= 1
    runs = [dict(record, lr=1e-3, accuracy=0.5), dict(record, lr=3e-3, accuracy=0.7),
            dict(record, mixer="attention", accuracy=1.0, state_size=2048), {**grid.cells()[3], "status": "error"}]
    best = best_runs(runs)
    assert [(r["mixer"], r["lr"]) for r in best] == [("attention", 1e-3), ("gsa", 3e-3)]
    table = render_markdown({"best": best, "grid": {**grid.__dict__, "settings": [[32, 2]]}})
    assert "| gsa | 70.0% (" in table and "| attention | 100.0% (2K) |" in table


def test_run_writes_results_and_skips_past_the_budget(tmp_path):
    grid = MQARGrid(settings=((32, 2),), d_models=(16,), mixers=("gla", "abc"), lrs=(1e-2,), vocab_size=16, steps=2,
                    batch_size=4, eval_examples=8)
    payload = run_mqar(grid, tmp_path, device="cpu", quick=True, log=lambda s: None)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["mqar_cpu-quick.json", "mqar_cpu-quick.md", "mqar_cpu-quick.png"]
    saved = json.loads((tmp_path / "mqar_cpu-quick.json").read_text())
    assert [r["mixer"] for r in saved["runs"]] == ["gla", "abc"] and len(saved["best"]) == 2
    assert saved["stamp"]["device"] and saved["grid"]["quick"] is True
    assert payload["markdown"] == (tmp_path / "mqar_cpu-quick.md").read_text()
    tight = MQARGrid(**{**grid.__dict__, "budget_s": 1e-3})
    runs = run_mqar(tight, tmp_path, device="cpu", log=lambda s: None)["runs"]
    assert [r["status"] for r in runs] == ["skipped", "skipped"]


def test_merge_joins_learning_rates_and_picks_the_best_again(tmp_path):
    """Two real (tiny) runs of the same grid with different learning rates join into one file whose best cell is
    chosen over both; a run of another setting joins as its own table; runs whose grids differ otherwise, or that
    repeat a cell, are refused."""
    from flash_gsa.eval.recall import merge_mqar

    base = dict(settings=((32, 2),), d_models=(16,), mixers=("gla",), vocab_size=16, steps=2, batch_size=4,
                eval_examples=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run_mqar(MQARGrid(**base, lrs=(1e-2,)), tmp_path / "a", device="cpu", log=lambda s: None)
    run_mqar(MQARGrid(**base, lrs=(1e-3,)), tmp_path / "b", device="cpu", log=lambda s: None)
    a, b = tmp_path / "a" / "mqar_cpu.json", tmp_path / "b" / "mqar_cpu.json"
    # make the second run's cell the better one, so that the choice is visible
    payload_b = json.loads(b.read_text())
    payload_b["runs"][0]["accuracy"] = 2.0
    b.write_text(json.dumps(payload_b))
    merged = merge_mqar([a, b], tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "mqar_cpu.json").read_text())
    assert sorted(saved["grid"]["lrs"]) == [1e-3, 1e-2] and len(saved["runs"]) == 2
    assert [r["lr"] for r in saved["best"]] == [1e-3] and merged["best"] == saved["best"]
    assert [m["file"] for m in saved["merged_from"]] == ["mqar_cpu.json", "mqar_cpu.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mqar_cpu.json", "mqar_cpu.md", "mqar_cpu.png"]
    with pytest.raises(ValueError, match="more than one input"):
        merge_mqar([a, a], tmp_path / "out")
    (tmp_path / "c").mkdir()
    run_mqar(MQARGrid(**{**base, "settings": ((16, 1),)}, lrs=(1e-2,)), tmp_path / "c", device="cpu",
             log=lambda s: None)
    merged = merge_mqar([a, b, tmp_path / "c" / "mqar_cpu.json"], tmp_path / "out")
    assert [tuple(x) for x in merged["grid"]["settings"]] == [(32, 2), (16, 1)]
    assert sorted((r["seq_len"], r["lr"]) for r in merged["best"]) == [(16, 1e-2), (32, 1e-3)]
    assert "seq_len 16" in merged["markdown"] and "seq_len 32" in merged["markdown"]
    payload_b["grid"]["steps"] = 3
    b.write_text(json.dumps(payload_b))
    with pytest.raises(ValueError, match="grid differs"):
        merge_mqar([a, b], tmp_path / "out")
    with pytest.raises(ValueError, match="at least two"):
        merge_mqar([a])


def test_workers_are_dealt_over_every_visible_gpu(monkeypatch):
    """A plain "cuda" device spreads cells round-robin over the GPUs; an explicit index or the CPU is kept."""
    from flash_gsa.eval.recall import _worker_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [_worker_device(torch.device("cuda"), i) for i in range(5)] == ["cuda:0", "cuda:1"] * 2 + ["cuda:0"]
    assert _worker_device(torch.device("cuda:1"), 4) == "cuda:1"
    assert _worker_device(torch.device("cpu"), 3) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _worker_device(torch.device("cuda"), 3) == "cuda"


def test_cli(tmp_path, capsys):
    code = main(["mqar", "--quick", "--mixers", "gsa", "--d-models", "16", "--lrs", "1e-2", "--steps", "2",
                 "--eval-examples", "8", "--settings", "32:2", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "| gsa |" in out and (tmp_path / "mqar_cpu-quick.png").exists()
    assert main(["mqar", "--quick", "--settings", "8:8", "--results-dir", str(tmp_path)]) == 2


def test_attention_learns_a_tiny_instance():
    """The pipeline can learn: 2-layer softmax attention recalls 2 pairs out of 32 tokens (chance: ~50%)."""
    grid = MQARGrid(settings=((32, 2),), d_models=(64,), mixers=("attention",), lrs=(1e-3,), vocab_size=32,
                    steps=600, batch_size=32, eval_examples=256, target_accuracy=0.99, check_every=20)
    record = train_cell(grid.cells()[0], grid, "cpu")
    assert record["accuracy"] > 0.9, record

"""The training benchmark (flash_gsa.bench.train): its quick run end to end (worker processes, JSON, plot, table),
the peers' configurations at the 340m shape, the failure records, and argument errors."""

import importlib.util
import json
import math
import statistics

import pytest
import torch

from flash_gsa.bench import train
from flash_gsa.bench.record import device_slug, read_json

HAS_CUDA = torch.cuda.is_available()
HAS_FLA = importlib.util.find_spec("fla") is not None
STAMP_FIELDS = {"device", "device_slug", "torch", "triton", "transformers", "python", "commit", "date_utc"}


def test_quick_run(tmp_path):
    # On a GPU fla would spend minutes autotuning even at the quick shape: leave it out there.
    impls = [train.OURS, train.LLAMA] + ([] if HAS_CUDA else [train.FLA])
    lines = []
    results = train.run_train_benchmark(tmp_path, quick=True, impls=impls, log=lines.append)
    json_path, png_path = train.results_paths(tmp_path, device_slug(), quick=True)
    assert json_path.name == f"train_{device_slug()}-quick.json"
    if not HAS_CUDA:
        assert json_path.name == "train_cpu-quick.json"
    assert png_path.stat().st_size > 1000
    data = read_json(json_path)
    assert data == json.loads(json.dumps(results))
    assert data["benchmark"] == "train" and STAMP_FIELDS <= set(data["stamp"])
    s = data["settings"]
    assert (s["B"], s["T"], s["steps"], s["warmup"], s["vocab"]) == (2, 256, 2, 1, 1024) and s["quick"]

    recs = {r["impl"]: r for r in data["records"]}
    assert list(recs) == impls
    for r in data["records"]:
        assert set(train.RECORD_FIELDS) <= set(r)
        assert (r["B"], r["T"]) == (2, 256)
    for impl in (train.OURS, train.LLAMA):
        r = recs[impl]
        assert r["status"] == "ok", r["reason"]
        assert r["reason"] is None
        assert len(r["step_ms_all"]) == 2 and r["step_ms"] == pytest.approx(statistics.median(r["step_ms_all"]))
        assert r["tokens_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 256 / (r["step_ms"] / 1e3))
        assert r["first_step_s"] > 0
        # a fresh model predicts nearly uniformly: the first loss is close to ln(vocab); the steps keep it finite
        assert r["loss_first"] == pytest.approx(math.log(1024), abs=0.3)
        assert math.isfinite(r["loss_last"])
        assert (r["peak_gib"] is not None) == HAS_CUDA
    ours, llama = recs[train.OURS], recs[train.LLAMA]
    # the quick model: 2 layers of hidden 128, SwiGLU 352, vocabulary 1024 (untied), GSA with 4 x 16 slots
    emb = 2 * 1024 * 128
    layer = 4 * 128 * 128 + 128 * 64 + 3 * 128 * 352 + 3 * 128
    assert ours["params"] == emb + 2 * layer + 128 and ours["params_non_embedding"] == ours["params"] - emb
    assert llama["params"] == pytest.approx(ours["params"], rel=0.05)
    assert ours["triton_cache"] == "cold"

    ratios = data["ratios"]
    assert ratios["vs_llama"] == pytest.approx(ours["tokens_per_s"] / llama["tokens_per_s"])
    assert data["targets"] == {"vs_fla": 1.3, "vs_llama": 1.0}
    assert data["targets_met"]["vs_llama"] == (ratios["vs_llama"] >= 1.0)
    assert data["at_target_setting"] is False
    assert data["models"][train.LLAMA]["num_attention_heads"] == 2 and data["models"][train.LLAMA]["head_dim"] == 64
    if not HAS_CUDA:
        fla = recs[train.FLA]
        assert fla["status"] == "skipped" and "CUDA" in fla["reason"]
        assert fla["tokens_per_s"] is None and ratios["vs_fla"] is None and data["targets_met"]["vs_fla"] is None

    md = train.render_markdown(data)
    assert "| model | params | status | step ms | tokens/s | peak GiB | first step s | ours / model |" in md
    assert f"| {train.OURS} | 0.7M | ok |" in md and f"| {train.LLAMA} | 0.7M | ok |" in md
    assert f"- ours / {train.LLAMA}: {ratios['vs_llama']:.2f}x (target >= 1.0: " in md
    assert "this run is not that setting" in md


def test_340m_configs_match():
    """The peers get the 340m preset's shape; ours and fla have the same parameters, the Llama about as many."""
    fields = train.preset_model_fields("340m")
    models = train.model_kwargs(fields, 32000, 4096)
    ours, fla, llama = models[train.OURS], models[train.FLA], models[train.LLAMA]
    assert ours == dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=4, num_slots=64,
                        gate_logit_normalizer=8, intermediate_size=2816, mixer="gsa")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_slots", "gate_logit_normalizer",
                "intermediate_size"):
        assert fla[key] == ours[key], key
    # our GSAConfig defaults, carried over: no short conv, swish feature map, eps 1e-5, untied, as many kv heads
    assert (fla["use_short_conv"], fla["feature_map"], fla["norm_eps"], fla["tie_word_embeddings"]) == (
        False, "swish", 1e-5, False)
    assert fla["num_kv_heads"] == 4 and fla["use_output_gate"] is False and fla["use_norm"] is True
    assert fla["exapnd_k"] == fla["exapnd_v"] == 1 and fla["attn"] is None
    assert (llama["num_attention_heads"], llama["num_key_value_heads"], llama["head_dim"]) == (16, 16, 64)
    assert (llama["hidden_size"], llama["intermediate_size"], llama["num_hidden_layers"], llama["vocab_size"]) == (
        1024, 2816, 24, 32000)
    assert llama["attn_implementation"] == "sdpa" and llama["max_position_embeddings"] >= 4096
    json.dumps(models)  # the workers get them as JSON

    from transformers import LlamaConfig, LlamaForCausalLM

    from flash_gsa.models import GSAConfig, GSAForCausalLM

    with torch.device("meta"):
        n_ours = train.count_params(GSAForCausalLM(GSAConfig(**ours)))
        n_llama = train.count_params(LlamaForCausalLM(LlamaConfig(**llama)))
    assert n_ours == (380_183_552, 380_183_552 - 2 * 32000 * 1024)
    assert n_llama[0] == pytest.approx(n_ours[0], rel=0.02)
    if HAS_FLA:
        from fla.models import GSAConfig as FlaConfig
        from fla.models import GSAForCausalLM as FlaModel

        with torch.device("meta"):
            assert train.count_params(FlaModel(FlaConfig(**fla))) == n_ours


def _job(impl, **models):
    kwargs = train.model_kwargs(train.QUICK_MODEL, 64, 32)
    kwargs.update(models)
    return dict(impl=impl, device="cpu", B=1, T=32, vocab=64, steps=1, warmup=1, warmup_only=False, models=kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="fla runs where there is CUDA")
def test_fla_is_skipped_without_cuda():
    rec = train.run_train_job(_job(train.FLA))
    assert rec["status"] == "skipped" and "CUDA" in rec["reason"] and rec["tokens_per_s"] is None


def test_failures_become_records(tmp_path):
    # an exception inside the worker: its record says which
    bad = dict(train.model_kwargs(train.QUICK_MODEL, 64, 32)[train.OURS], num_heads=3)
    rec = train.run_train_job(_job(train.OURS, **{train.OURS: bad}))
    assert rec["status"] == "error" and "ValueError" in rec["reason"] and "num_heads" in rec["reason"]
    # a worker that overruns its limit is killed and recorded as a timeout; the run still writes its JSON
    lines = []
    results = train.run_train_benchmark(tmp_path, quick=True, impls=[train.LLAMA], timeout_s=0.5, log=lines.append)
    (rec,) = results["records"]
    assert rec["status"] == "timeout" and "killed after" in rec["reason"] and rec["tokens_per_s"] is None
    assert results["ratios"] == {"vs_fla": None, "vs_llama": None}
    assert read_json(train.results_paths(tmp_path, device_slug(), quick=True)[0])["records"][0]["status"] == "timeout"


def test_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown impl"):
        train.run_train_benchmark(tmp_path, quick=True, impls=["nope"])
    with pytest.raises(ValueError, match="no impl"):
        train.run_train_benchmark(tmp_path, quick=True, impls=[])
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        train.run_train_benchmark(tmp_path, quick=True, batch=0)
    with pytest.raises(ValueError, match="steps must be"):
        train.run_train_benchmark(tmp_path, quick=True, steps=-1)
    with pytest.raises(ValueError, match="unknown preset"):
        train.run_train_benchmark(tmp_path, preset="nope")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="needs CUDA"):
            train.run_train_benchmark(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was written

    with pytest.raises(SystemExit) as e:
        train.main(["--quick", "--impls", "flash_gsa,nope", "--results-dir", str(tmp_path)])
    assert e.value.code == 2 and "unknown impl(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--quick", "--batch", "two"])
    assert e.value.code == 2 and "--batch" in capsys.readouterr().err

    from flash_gsa.cli import main as gsa

    with pytest.raises(SystemExit) as e:
        gsa(["bench", "train", "--quick", "--warmup", "0", "--results-dir", str(tmp_path)])
    assert e.value.code == 2 and "warmup must be an integer >= 1" in capsys.readouterr().err


def test_render_markdown_ratios():
    rec = dict(B=4, T=4096, params=380_183_552, peak_gib=30.0, first_step_s=12.0, reason=None, status="ok")
    payload = {
        "stamp": dict(device="NVIDIA H100 80GB HBM3", torch="2.x", triton="3.x", commit="0123456789abcdef",
                      date_utc="2026-01-01T00:00:00Z"),
        "settings": dict(quick=False, preset="340m", B=4, T=4096, vocab=32000, steps=10, warmup=3,
                         precision="bf16 autocast, fp32 parameters"),
        "records": [dict(rec, impl=train.OURS, step_ms=200.0, tokens_per_s=81920.0),
                    dict(rec, impl=train.FLA, step_ms=300.0, tokens_per_s=54613.3),
                    dict(rec, impl=train.LLAMA, status="timeout", step_ms=None, tokens_per_s=None, peak_gib=None,
                         first_step_s=None, reason="timeout: worker killed after 540 s")],
        "ratios": {"vs_fla": 1.5, "vs_llama": None},
        "targets": {"vs_fla": 1.3, "vs_llama": 1.0},
        "targets_met": {"vs_fla": True, "vs_llama": None},
        "at_target_setting": True,
    }
    md = train.render_markdown(payload)
    assert "| flash_gsa | 380.2M | ok | 200.0 | 81,920 | 30 | 12.0 | — |" in md
    assert "| fla-GSAForCausalLM | 380.2M | ok | 300.0 | 54,613 | 30 | 12.0 | 1.50 |" in md
    assert "| llama-sdpa | 380.2M | timeout: timeout: worker killed after 540 s | — | — | — | — | — |" in md
    assert "- ours / fla-GSAForCausalLM: 1.50x (target >= 1.3: met)" in md
    assert "- ours / llama-sdpa: — (target >= 1.0: —)" in md
    assert "median of 10 timed steps after 3 warm-up steps" in md and "not that setting" not in md

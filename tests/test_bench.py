"""The op benchmark's quick path end to end (worker processes, JSON, plot, tables) and its roofline arithmetic."""

import importlib.util
import json
import re
import socket

import pytest

from flash_gsa.bench import op
from flash_gsa.bench.record import device_slug, read_json, stamp, write_json

OP_FIELDS = {"kind", "impl", "mode", "hidden", "B", "T", "H", "K", "V", "M", "dtype", "ms", "tokens_per_s", "peak_gib",
             "first_call_s", "flops", "bytes", "tflops", "hbm_frac", "status", "error"}
DECODE_FIELDS = {"kind", "impl", "shape", "B", "T", "HQ", "H", "K", "V", "M", "ms", "host_us", "first_call_s", "bytes",
                 "hbm_frac", "status", "error"}
STAMP_FIELDS = {"device", "device_slug", "torch", "triton", "transformers", "python", "commit", "date_utc"}
HAS_FLA = importlib.util.find_spec("fla") is not None


def test_roofline_matches_kernel_notes():
    """shared/docs/kernel_notes.md: hidden 1024 at 32K tokens moves ~0.84 GB fused fwd+bwd, ~26 / ~61 GFLOP."""
    fwd_b, all_b = op.gsa_bytes(1, 32768, 4, 4, 256, 256, 64)
    assert all_b == 32768 * 2 * (3 * (3 * 1024 + 2 * 4 * 64) + 2 * 1024) == 838_860_800  # inputs x3, o and do
    assert fwd_b == 32768 * 2 * (3 * 1024 + 2 * 4 * 64 + 1024)
    assert op.gsa_bytes(1, 32768, 4, 4, 512, 512, 64)[1] == pytest.approx(1.6e9, rel=0.02)
    f_fwd, f_bwd = op.gsa_flops(1, 32768, 4, 4, 256, 256, 64)
    assert f_fwd == pytest.approx(26e9, rel=0.1) and f_bwd == pytest.approx(61e9, rel=0.1)
    f_fwd, f_bwd = op.gsa_flops(1, 32768, 4, 4, 512, 512, 64)
    assert f_fwd == pytest.approx(52e9, rel=0.1) and f_bwd == pytest.approx(121e9, rel=0.1)
    # B and T enter only through the token count
    assert op.gsa_flops(16, 2048, 4, 4, 256, 256, 64) == op.gsa_flops(1, 32768, 4, 4, 256, 256, 64)


def test_stamp_and_json(tmp_path):
    st = stamp()
    assert STAMP_FIELDS <= set(st)
    assert not any("host" in key for key in st)
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in json.dumps(st)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", st["date_utc"])
    assert st["load_1min"] >= 0 and st["cpu_count"] >= 1  # how busy the host was (Linux has getloadavg)
    assert re.fullmatch(r"[a-z0-9-]+", device_slug("NVIDIA H100 80GB HBM3")) and device_slug("A/B  c") == "a-b-c"
    path = write_json(tmp_path / "sub" / "x.json", {"a": [1, None]})
    assert read_json(path) == {"a": [1, None]}


def test_quick_run(tmp_path):
    # fla, when installed, would spend minutes autotuning: then leave it out; when not, check its skip records.
    impls = ["flash_gsa-chunk"] + ([] if HAS_FLA else ["fla-chunk_gsa"])
    dec = ["flash_gsa-decode"] + ([] if HAS_FLA else ["fla-fused_recurrent_gsa"])
    lines = []
    results = op.run_op_benchmark(tmp_path, quick=True, impls=impls, seq_lens=[64], decode_impls=dec,
                                  decode_batches=[2], timeout_s=300, log=lines.append)
    json_path, png_path = op.results_paths(tmp_path, device_slug(), quick=True)
    assert json_path.name == f"op_{device_slug()}-quick.json"
    assert json_path.exists() and png_path.stat().st_size > 1000
    data = read_json(json_path)
    assert data == json.loads(json.dumps(results))
    assert STAMP_FIELDS <= set(data["stamp"])
    assert data["hbm"]["status"] == "ok" and data["hbm"]["bytes_per_s"] > 0

    recs = {(r["impl"], r["mode"]): r for r in data["records"]}
    assert set(recs) == {(i, m) for i in impls for m in op.MODES}
    for r in data["records"]:
        assert OP_FIELDS <= set(r)
        assert (r["hidden"], r["B"], r["T"]) == (64, 1, 64)
        assert r["flops"] > 0 and r["bytes"] > 0
    for mode in op.MODES:
        r = recs[("flash_gsa-chunk", mode)]
        assert r["status"] == "ok", r["error"]
        assert r["ms"] > 0 and r["first_call_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(64 / (r["ms"] / 1e3))
        assert r["hbm_frac"] == pytest.approx(r["bytes"] / (r["ms"] / 1e3) / data["hbm"]["bytes_per_s"])
        if not HAS_FLA:
            assert recs[("fla-chunk_gsa", mode)]["status"] == "skipped"
            assert "fla" in recs[("fla-chunk_gsa", mode)]["error"]
    assert data["roofline"][0]["bytes_fwdbwd"] == recs[("flash_gsa-chunk", "fwdbwd")]["bytes"]

    decs = {r["impl"]: r for r in data["decode"]}
    assert set(decs) == set(dec)
    for r in data["decode"]:
        assert DECODE_FIELDS <= set(r) and (r["B"], r["T"]) == (2, 1)
    assert decs["flash_gsa-decode"]["status"] == "ok" and decs["flash_gsa-decode"]["ms"] > 0

    md = op.render_markdown(data)
    assert "| hidden | T | B | mode |" in md and "| decode shape | B |" in md and "GFLOP" in md
    assert "flash_gsa-chunk" in op.summary_table(data)

    # A worker that overruns its limit becomes error records; --merge keeps what the new run did not redo.
    op.run_op_benchmark(tmp_path, quick=True, impls=["flash_gsa-chunk"], modes=["fwd"], seq_lens=[64],
                        decode_impls=[], timeout_s=0.5, merge=True, log=lines.append)
    data = read_json(json_path)
    recs = {(r["impl"], r["mode"]): r for r in data["records"]}
    assert recs[("flash_gsa-chunk", "fwd")]["status"] == "error"
    assert "timeout" in recs[("flash_gsa-chunk", "fwd")]["error"]
    assert recs[("flash_gsa-chunk", "fwdbwd")]["status"] == "ok"
    assert {r["impl"] for r in data["decode"]} == set(dec)
    assert data["hbm"]["bytes_per_s"] > 0  # kept from the first run when the new one has none


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown impl"):
        op.run_op_benchmark(tmp_path, quick=True, impls=["nope"])
    with pytest.raises(ValueError, match="divide"):
        op.run_op_benchmark(tmp_path, quick=True, seq_lens=[48])

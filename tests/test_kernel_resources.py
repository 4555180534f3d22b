"""Every kernel of the triton backend (training, decoding, the LM loss) can launch on an H100 at the largest
supported sizes.

The kernels are compiled for sm_90 on this (GPU-less) machine by `gsa bench resources` (Triton and its bundled ptxas
need no device), in a subprocess because the test session runs Triton in interpreter mode. A kernel whose shared
memory exceeds the H100's 227 KiB per block fails at launch with OutOfResources, which the interpreter never shows:
before chunk sizes depended on M, M = 128 with K = V = 256 needed 320 KiB in bwd_query (an earlier backward kernel);
with float32 inputs there, chunk_output needed 256 KiB at its two pipeline stages (the records are the kernels as they
launch: `launch.launch` compiles a kernel that does not fit again with fewer stages, and `gsa bench resources` does
the same).
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build has no bundled ptxas")
@pytest.mark.parametrize(("dtype", "shapes"), [
    ("bf16", ["512,512,256", "256,256,128", "512,512,64", "512,16,16"]),
    ("fp32", ["512,512,256", "256,256,128"]),  # fp32 tiles: twice the bytes of shared memory
])
def test_largest_shapes_fit_h100_shared_memory(tmp_path, dtype, shapes):
    # The shapes are split among up to one compiling process per CPU core (ptxas is single-threaded): on CI's two
    # cores that halves the test's time.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    n = min(len(shapes), os.cpu_count() or 1)
    runs = []
    for i, group in enumerate(shapes[i::n] for i in range(n)):
        out = tmp_path / f"resources{i}.json"
        cmd = [sys.executable, "-m", "flash_gsa.bench.resources", "--json", str(out), "--dtype", dtype]
        for shape in group:
            cmd += ["--shape", shape]
        proc = subprocess.Popen(cmd, env={**env, "TRITON_CACHE_DIR": str(tmp_path / f"cache{i}")},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((out, proc))
    records, failed = [], []
    for out, proc in runs:
        stdout, stderr = proc.communicate(timeout=600)
        assert out.exists(), stderr[-3000:]
        payload = json.loads(out.read_text())
        assert payload["target"] == "sm_90" and "commit" in payload["stamp"]
        records += payload["records"]
        failed += [stdout[-3000:]] if proc.returncode else []
    heavy = {"chunk_output_kernel", "bwd_values_kernel"}  # each compiled for both intra-chunk paths
    kernels = {"chunk_local_kernel", "chunk_scan_kernel", "bwd_keys_kernel", "_gsa_decode_kernel"} | heavy
    kernels |= {f"{name} (exact path)" for name in heavy}
    for shape in shapes:
        K, V, M = (int(x) for x in shape.split(","))
        found = {r["kernel"] for r in records if (r["K"], r["V"], r["M"]) == (K, V, M)}
        # the scan's pipelined walk (many programs of 64-slot tiles) exists from M = 64 on
        expected = kernels | ({"chunk_scan_kernel (pipelined)"} if M >= 64 else set())
        assert found == expected, f"{shape}: compiled {sorted(found)}"
    model_kernels = {"cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel", "rms_norm_fwd_kernel",
                     "rms_norm_bwd_kernel"}
    assert model_kernels <= {r["kernel"] for r in records}
    too_big = [(r["kernel"], r["K"], r["V"], r["M"], r["shared_bytes"]) for r in records if r["shared_bytes"] > 232448]
    assert not too_big, f"shared memory above the H100 limit: {too_big}"
    assert all(r["registers"] > 0 for r in records), "ptxas reported no register counts"
    assert not failed, failed


def test_blocks_per_sm_counts_registers_and_shared_memory():
    from flash_gsa.bench.resources import SHARED_PER_SM, KernelResources

    def blocks(registers: int, shared_kib: int) -> int:
        record = KernelResources("k", 64, 64, 64, 4, shared_kib * 1024, registers, 0, 0, True, SHARED_PER_SM[90])
        return record.blocks_per_sm

    assert blocks(255, 96) == 2  # 128 threads x 255 registers: 2 in 64K; 2 x (96 + 1) KiB fit in 228 KiB
    assert blocks(255, 120) == 1  # 2 x (120 + 1) KiB do not: shared memory, not registers, is the limit
    assert blocks(128, 8) == 4  # registers: 65536 / (128 x 128)
    assert blocks(64, 60) == 3  # shared memory: 228 // 61

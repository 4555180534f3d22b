"""The Triton decoding kernel against the reference recurrence (the spec).

Runs on CUDA when there is one, else on the CPU through Triton's interpreter (tests/conftest.py switches it on), so
sizes stay tiny. Inputs are fresh random draws on every run (the seed is in each failure message); every tensor the
kernel allocates is filled with NaN first, so an element it fails to write fails the comparison.
"""


import pytest
import torch
import torch.nn.functional as F

import flash_gsa.ops.triton.decode as decode
from flash_gsa.ops.reference import gsa_reference

# fp32 inputs: both sides compute in fp32 / fp64 from the same values; after <= 64 steps of the recurrence and a
# softmax the fp32 kernel stays within ~1e-6 of the fp64 reference, so 1e-4 leaves room without hiding a bug.
TOL_FP32 = dict(rtol=1e-4, atol=1e-4)
# bf16/fp16 inputs: the reference runs on the very same (already rounded) inputs and the kernel computes in fp32, so
# the only extra error is the conversion of o to 8 (bf16) / 11 (fp16) significant bits: at most one ulp, 2^-7 / 2^-10
# relative (Triton's interpreter truncates; the GPU rounds to nearest, half that). Allow 2 ulps, and as much absolute
# for outputs near 0 (|o| is O(1) here). The state stays fp32: TOL_FP32.
TOL_OUT = {torch.bfloat16: dict(rtol=2**-6, atol=2**-6), torch.float16: dict(rtol=2**-9, atol=2**-9)}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every tensor the kernel allocates starts as NaN."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(decode, "_empty", nan_empty)


def make_inputs(B, T, HQ, H, K, V, M, device, dtype=torch.float32, n_state=None):
    q = torch.randn(B, T, HQ, K, device=device)
    k = torch.randn(B, T, H, K, device=device)
    v = torch.randn(B, T, H, V, device=device)
    g = F.logsigmoid(torch.randn(B, T, H, M, device=device) + 1.0)  # decays from strong to none
    s = torch.rand(B, T, H, M, device=device)
    n = B if n_state is None else n_state
    h0 = (torch.randn(n, H, K, M, device=device), torch.randn(n, H, M, V, device=device))
    return tuple(x.to(dtype) for x in (q, k, v, g, s)), h0


def reference(inputs, scale, h0, cu_seqlens=None):
    """The spec in float64 on the CPU, on exactly the values the kernel sees."""
    x64 = [x.detach().cpu().double() for x in inputs]
    h64 = None if h0 is None else tuple(x.detach().cpu().double() for x in h0)
    cu = None if cu_seqlens is None else cu_seqlens.cpu()
    return gsa_reference(*x64, scale, h64, True, cu)


def close(actual, expected, seed, what, **tol):
    actual = actual.detach().cpu().double()
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what} (seed {seed}): {m}")


@pytest.mark.parametrize(
    "T, M",
    [(1, 16), (1, 32), (1, 64), (1, 128), (1, 256), (17, 16), (17, 128), (17, 256), (64, 32), (64, 64)],
)
def test_matches_reference(device, seed, T, M):
    # K != V, neither a power of two nor a multiple of the tile: masked edges and several tiles along K and V.
    B, HQ, H, K, V = 2, 4, 2, 40, 24
    inputs, h0 = make_inputs(B, T, HQ, H, K, V, M, device)
    scale = 0.3
    o, (hk, hv) = decode.fused_recurrent_gsa(*inputs, scale, h0, True)
    ro, (rk, rv) = reference(inputs, scale, h0)
    assert o.shape == (B, T, HQ, V) and o.dtype == torch.float32
    close(o, ro, seed, "o", **TOL_FP32)
    close(hk, rk, seed, "hk", **TOL_FP32)
    close(hv, rv, seed, "hv", **TOL_FP32)


def test_grouped_heads_share_kv(device, seed):
    """G = 4 query heads per kv-head, no initial state, default s = 1 - exp(g) and default scale."""
    B, T, HQ, H, K, V, M = 1, 5, 8, 2, 32, 16, 32
    (q, k, v, g, _), _ = make_inputs(B, T, HQ, H, K, V, M, device)
    o, (hk, hv) = decode.fused_recurrent_gsa(q, k, v, g, output_final_state=True)
    s = -torch.expm1(g)
    ro, (rk, rv) = reference((q, k, v, g, s), K**-0.5, None)
    close(o, ro, seed, "o", **TOL_FP32)
    close(hk, rk, seed, "hk", **TOL_FP32)
    close(hv, rv, seed, "hv", **TOL_FP32)
    o2, state = decode.fused_recurrent_gsa(q, k, v, g)
    assert state is None
    close(o2, ro, seed, "o without final state", **TOL_FP32)


def test_varlen(device, seed):
    """Packed sequences of lengths 3, 0, 17, 1 (an empty one keeps its initial state)."""
    lengths = [3, 0, 17, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    HQ, H, K, V, M = 4, 2, 24, 40, 64
    inputs, h0 = make_inputs(1, sum(lengths), HQ, H, K, V, M, device, n_state=len(lengths))
    o, (hk, hv) = decode.fused_recurrent_gsa(*inputs, 0.5, h0, True, cu)
    ro, (rk, rv) = reference(inputs, 0.5, h0, cu)
    close(o, ro, seed, "o", **TOL_FP32)
    close(hk, rk, seed, "hk", **TOL_FP32)
    close(hv, rv, seed, "hv", **TOL_FP32)
    close(hk[1], h0[0][1].cpu().double(), seed, "empty sequence hk", rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 17])
def test_inplace(device, seed, T):
    """inplace=True writes the final state into the caller's tensors and returns those very objects."""
    B, HQ, H, K, V, M = 3, 2, 2, 16, 48, 32
    inputs, h0 = make_inputs(B, T, HQ, H, K, V, M, device)
    ro, (rk, rv) = reference(inputs, 0.25, h0)
    hk0, hv0 = h0
    o, state = decode.fused_recurrent_gsa(*inputs, 0.25, h0, True, None, inplace=True)
    assert state[0] is hk0 and state[1] is hv0
    close(o, ro, seed, "o", **TOL_FP32)
    close(hk0, rk, seed, "hk in place", **TOL_FP32)
    close(hv0, rv, seed, "hv in place", **TOL_FP32)

    # Without output_final_state the state is still updated in place, and None is returned.
    cache = (hk0.clone(), hv0.clone())
    _, none = decode.fused_recurrent_gsa(*inputs, 0.25, cache, False, None, inplace=True)
    _, (rk2, rv2) = reference(inputs, 0.25, (hk0, hv0))
    assert none is None
    close(cache[0], rk2, seed, "hk updated without output_final_state", **TOL_FP32)
    close(cache[1], rv2, seed, "hv updated without output_final_state", **TOL_FP32)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_a_device_that_is_not_current(seed):
    """Tensors and state on cuda:1 while cuda:0 is current: the launches follow the tensors (the first call compiles,
    the second launches directly from the launch cache)."""
    torch.cuda.set_device(0)
    for _ in range(2):
        inputs, h0 = make_inputs(2, 3, 4, 2, 32, 16, 32, "cuda:1")
        ro, (rk, rv) = reference(inputs, 0.5, h0)
        o, (hk, hv) = decode.fused_recurrent_gsa(*inputs, 0.5, h0, True, None, inplace=True)
        assert torch.cuda.current_device() == 0 and o.device == torch.device("cuda:1")
        close(o, ro, seed, "o", **TOL_FP32)
        close(hk, rk, seed, "hk", **TOL_FP32)
        close(hv, rv, seed, "hv", **TOL_FP32)


def test_not_inplace_leaves_initial_state(device, seed):
    inputs, h0 = make_inputs(2, 3, 2, 1, 16, 16, 16, device)
    before = tuple(x.clone() for x in h0)
    _, (hk, hv) = decode.fused_recurrent_gsa(*inputs, 1.0, h0, True)
    assert hk is not h0[0] and hv is not h0[1]
    assert torch.equal(h0[0], before[0]) and torch.equal(h0[1], before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 17])
def test_half_precision_inputs(device, seed, dtype, T):
    B, HQ, H, K, V, M = 2, 4, 2, 32, 48, 64
    inputs, h0 = make_inputs(B, T, HQ, H, K, V, M, device, dtype=dtype)
    if dtype == torch.bfloat16:  # as the layer calls it: q, k, v in bf16, gates in fp32
        inputs = (*inputs[:3], inputs[3].float(), inputs[4].float())
    o, (hk, hv) = decode.fused_recurrent_gsa(*inputs, 0.2, h0, True)
    ro, (rk, rv) = reference(inputs, 0.2, h0)
    assert o.dtype == dtype and hk.dtype == torch.float32 and hv.dtype == torch.float32
    close(o, ro, seed, "o", **TOL_OUT[dtype])
    close(hk, rk, seed, "hk", **TOL_FP32)
    close(hv, rv, seed, "hv", **TOL_FP32)


def test_rejects_misuse(device):
    (q, k, v, g, s), (hk, hv) = make_inputs(1, 1, 2, 1, 16, 16, 16, device)
    with pytest.raises(ValueError, match="multiple"):
        two = (x.expand(1, 1, 2, 16) for x in (k, v, g))
        decode.fused_recurrent_gsa(torch.cat([q, q[:, :, :1]], dim=2), *two)
    with pytest.raises(ValueError, match="k must have shape"):
        decode.fused_recurrent_gsa(q, k[..., :8], v, g)
    with pytest.raises(ValueError, match="needs one"):
        decode.fused_recurrent_gsa(q, k, v, g, s, inplace=True)
    with pytest.raises(ValueError, match="float32 contiguous"):
        decode.fused_recurrent_gsa(q, k, v, g, s, 1.0, (hk.double(), hv), True, inplace=True)
    with pytest.raises(ValueError, match="shape"):
        decode.fused_recurrent_gsa(q, k, v, g, s, 1.0, (hk[..., :8], hv))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        decode.fused_recurrent_gsa(q.double(), k, v, g)
    with pytest.raises(ValueError, match="B == 1"):
        q2, k2, v2, g2 = (torch.cat([x, x]) for x in (q, k, v, g))
        decode.fused_recurrent_gsa(q2, k2, v2, g2, cu_seqlens=torch.tensor([0, 1], device=device))
    with pytest.raises(ValueError, match="forward only"):
        decode.fused_recurrent_gsa(q.requires_grad_(), k, v, g)

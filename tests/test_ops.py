"""`flash_gsa.gsa`: the chunk backend against the reference recurrence (the spec), and the operator's contract.

Inputs are fresh random draws on every run (the seed is in each failure message). The reference is a Python loop over
the tokens, so sizes stay small: B * H * T of a few hundred at most.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import flash_gsa
from flash_gsa.ops import available_backends, default_backend

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# Tolerances, as a fraction of the largest |expected| entry of each tensor (outputs, states and gradients are O(1..10)).
# float64: both backends compute in float64 from the same values and differ only in the order of operations (the
#   chunk form takes exp of differences of cumulative log-gates): round-off ~1e-15, so 1e-10 catches any real error.
# float32: the chunk backend computes in float32 against the float64 reference; measured ~1e-6 after 300 tokens.
# bfloat16: the chunk backend computes in float32 from bfloat16 inputs, then rounds o and the gradients to 8
#   significant bits (2^-9 relative each): compared in relative Frobenius norm, measured ~5e-3, allowed 1e-2. The
#   reference runs in float64 on the very same (already rounded) inputs, so input rounding is not counted.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
TOL_NORM_BF16 = 1e-2


def make_inputs(B, T, HQ, H, K, V, M, dtype=torch.float64, n_state=None, gates="normal"):
    """q, k, v, g, s and an initial state (hk0, hv0), generated in float64 and then cast to `dtype`."""
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(B, T, HQ, K, **f64), torch.randn(B, T, H, K, **f64)
    v = torch.randn(B, T, H, V, **f64)
    if gates == "normal":  # decays from strong to none
        g = F.logsigmoid(torch.randn(B, T, H, M, **f64) + 1.0)
    elif gates == "extreme":  # per slot: near 0 (keeps everything), or near -30 (forgets everything at once)
        near_zero = -1e-6 * torch.rand(B, T, H, M, **f64)
        near_minus_30 = -30.0 + torch.rand(B, T, H, M, **f64)
        g = torch.where(torch.rand(M) < 0.5, near_zero, near_minus_30)
    s = torch.rand(B, T, H, M, **f64)
    n = B if n_state is None else n_state
    h0 = (torch.randn(n, H, K, M, **f64), torch.randn(n, H, M, V, **f64))
    return [x.to(dtype) for x in (q, k, v, g, s)], h0


def run(backend, inputs, h0=None, *, scale=None, cu_seqlens=None, weights=None, final=True):
    """Forward and backward. Returns (o, hk, hv) and the gradients of (q, k, v, g, s[, hk0, hv0]) for the loss
    sum(o * w_o) + sum(hk * w_hk) + sum(hv * w_hv) with random weights (float64, cast to each output's dtype)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    hs = None if h0 is None else tuple(x.detach().clone().requires_grad_() for x in h0)
    o, state = flash_gsa.gsa(
        *xs, scale=scale, initial_state=hs, output_final_state=final, cu_seqlens=cu_seqlens, backend=backend
    )
    outs = [o, *state] if final else [o]
    loss = sum((y * w.to(y.dtype)).sum() for y, w in zip(outs, weights, strict=False))
    grads = torch.autograd.grad(loss, xs + ([] if hs is None else list(hs)), materialize_grads=True)
    return outs, list(grads)


def random_weights(outs):
    return [torch.randn(y.shape, dtype=torch.float64) for y in outs]


def check(actual, expected, seed, what, tol):
    """|actual - expected| <= tol * max|expected| everywhere, and nothing inf/NaN."""
    assert torch.isfinite(actual).all(), f"{what} (seed {seed}): not finite"
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=0, atol=tol * max(scale, 1e-30), msg=lambda m: f"{what} (seed {seed}): {m}"
    )


def check_norm(actual, expected, seed, what, tol):
    """Relative Frobenius norm of the difference <= tol, and nothing inf/NaN."""
    assert torch.isfinite(actual).all(), f"{what} (seed {seed}): not finite"
    actual, expected = actual.detach().double(), expected.detach().double()
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{what} (seed {seed}): relative error {err:.2e} > {tol:.0e}"


NAMES = ["o", "hk", "hv", "dq", "dk", "dv", "dg", "ds", "dhk0", "dhv0"]


def compare(actual, expected, seed, tol, norm=False, names=NAMES):
    """Outputs then gradients, as `run` returns them, named in order by `names` (no dhk0, dhv0 without init)."""
    actual, expected = [*actual[0], *actual[1]], [*expected[0], *expected[1]]
    assert len(actual) == len(expected) <= len(names)
    for name, a, e in zip(names, actual, expected, strict=False):
        (check_norm if norm else check)(a, e, seed, name, tol)


def reference_on(inputs, h0, **kw):
    """The spec in float64 on exactly the values the backend sees."""
    x64 = [x.double() for x in inputs]
    h64 = None if h0 is None else tuple(x.double() for x in h0)
    return run("reference", x64, h64, **kw)


# B, T, HQ, H, K, V, M: T not a multiple of the chunk (16) nor of anything, K != V, HQ = 2H, every M.
CASES = [
    (2, 1, 2, 1, 8, 4, 16),
    (1, 63, 4, 2, 6, 10, 32),
    (2, 65, 2, 1, 12, 8, 64),
    (1, 300, 2, 1, 4, 6, 128),
]


@pytest.mark.parametrize("with_init", [True, False], ids=["init", "zero-init"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-HQ{}-H{}-K{}-V{}-M{}".format(*c))
def test_chunk_matches_reference_float64(seed, case, with_init):
    B, T, HQ, H, K, V, M = case
    inputs, h0 = make_inputs(*case)
    h0 = h0 if with_init else None
    weights = random_weights([torch.empty(B, T, HQ, V), torch.empty(B, H, K, M), torch.empty(B, H, M, V)])
    ref = reference_on(inputs, h0, scale=0.7, weights=weights)
    out = run("chunk", inputs, h0, scale=0.7, weights=weights)
    assert out[0][0].shape == (B, T, HQ, V) and out[0][1].shape == (B, H, K, M) and out[0][2].shape == (B, H, M, V)
    assert all(y.dtype == torch.float64 for y in out[0])
    compare(out, ref, seed, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 65, 4, 2, 8, 12, 32), (1, 300, 2, 1, 4, 6, 16)], ids=["T65", "T300"])
def test_chunk_low_precision(seed, case, dtype):
    """Low-precision inputs with a float32 initial state (as a model keeps it): o in the input dtype, the final state
    in float32, gradients in each input's dtype."""
    B, T, HQ, H, K, V, M = case
    inputs, h0 = make_inputs(*case, dtype=dtype)
    h0 = tuple(x.float() for x in h0)
    weights = random_weights([torch.empty(B, T, HQ, V), torch.empty(B, H, K, M), torch.empty(B, H, M, V)])
    out = run("chunk", inputs, h0, weights=weights)
    ref = reference_on(inputs, h0, weights=weights)
    assert out[0][0].dtype == dtype and out[0][1].dtype == out[0][2].dtype == torch.float32
    assert [x.dtype for x in out[1]] == [dtype] * 5 + [torch.float32] * 2
    if dtype == torch.bfloat16:
        compare(out, ref, seed, TOL_NORM_BF16, norm=True)
    else:
        compare(out, ref, seed, TOL[dtype])


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_varlen_equals_separate_calls(seed, backend):
    """Packed sequences (one empty: it keeps its initial state) against one call per sequence: outputs, final states
    and every gradient, initial states included."""
    lengths = [17, 1, 0, 40, 33]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    HQ, H, K, V, M = 4, 2, 6, 5, 32
    inputs, h0 = make_inputs(1, sum(lengths), HQ, H, K, V, M, n_state=len(lengths))
    weights = random_weights([torch.empty(1, sum(lengths), HQ, V), *h0])
    (o, hk, hv), grads = run(backend, inputs, h0, cu_seqlens=cu, weights=weights)

    pieces = []
    for n, (lo, hi) in enumerate(zip(cu.tolist(), cu.tolist()[1:], strict=False)):
        part = [x[:, lo:hi] for x in inputs]
        part_h0 = tuple(x[n : n + 1] for x in h0)
        part_w = [weights[0][:, lo:hi], weights[1][n : n + 1], weights[2][n : n + 1]]
        pieces.append(run(backend, part, part_h0, weights=part_w))
    tol = TOL[torch.float64]
    check(o, torch.cat([p[0][0] for p in pieces], dim=1), seed, "o", tol)
    check(hk, torch.cat([p[0][1] for p in pieces]), seed, "hk", tol)
    check(hv, torch.cat([p[0][2] for p in pieces]), seed, "hv", tol)
    for i, name in enumerate(NAMES[3:8]):
        check(grads[i], torch.cat([p[1][i] for p in pieces], dim=1), seed, name, tol)
    check(hk[2], h0[0][2], seed, "hk of the empty sequence", 0)
    for i, name in ((5, "dhk0"), (6, "dhv0")):
        check(grads[i], torch.cat([p[1][i] for p in pieces]), seed, name, tol)


@pytest.mark.parametrize("split", [0, 1, 37, 64])
def test_state_carry_equals_one_call(seed, split):
    """Two calls, the second starting from the first one's final state, equal one call over the whole sequence: the
    outputs, the final state and the gradients, which flow back through the carried state."""
    B, T, HQ, H, K, V, M = 2, 80, 2, 1, 5, 7, 16
    inputs, h0 = make_inputs(B, T, HQ, H, K, V, M)
    xs = [x.clone().requires_grad_() for x in (*inputs, *h0)]
    o, (hk, hv) = flash_gsa.gsa(*xs[:5], initial_state=tuple(xs[5:]), output_final_state=True, backend="chunk")
    o1, state = flash_gsa.gsa(*(x[:, :split] for x in xs[:5]), initial_state=tuple(xs[5:]), output_final_state=True)
    o2, (hk2, hv2) = flash_gsa.gsa(*(x[:, split:] for x in xs[:5]), initial_state=state, output_final_state=True)
    o12 = torch.cat([o1, o2], dim=1)
    tol = TOL[torch.float64]
    check(o12, o, seed, "o", tol)
    check(hk2, hk, seed, "hk", tol)
    check(hv2, hv, seed, "hv", tol)
    w = random_weights([o, hk, hv])
    one = torch.autograd.grad(sum((y * w_).sum() for y, w_ in zip((o, hk, hv), w, strict=True)), xs)
    two = torch.autograd.grad(sum((y * w_).sum() for y, w_ in zip((o12, hk2, hv2), w, strict=True)), xs)
    for name, a, e in zip(["dq", "dk", "dv", "dg", "ds", "dhk0", "dhv0"], two, one, strict=True):
        check(a, e, seed, name, tol)


@pytest.mark.parametrize("default_s", [False, True], ids=["s", "s=1-exp(g)"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_gates(seed, dtype, default_s):
    """Gates near 0 (s near 0 by default: the slot keeps everything) and near -30 (exp(g) ~ 1e-13: it forgets
    everything at every step): no inf or NaN anywhere, and the same values as the reference."""
    B, T, HQ, H, K, V, M = 1, 150, 2, 1, 8, 6, 32
    inputs, h0 = make_inputs(B, T, HQ, H, K, V, M, dtype=dtype, gates="extreme")
    if default_s:
        inputs = inputs[:4]
    h0 = tuple(x.to(dtype) for x in h0)
    weights = random_weights([torch.empty(B, T, HQ, V), *h0])
    out = run("chunk", inputs, h0, weights=weights)
    ref = reference_on(inputs, h0, weights=weights)
    compare(out, ref, seed, TOL[dtype], names=NAMES[:7] + NAMES[8:] if default_s else NAMES)  # no s: no ds


def test_no_tokens(seed):
    """T = 0: an empty output, and the final state is the initial one (a copy)."""
    inputs, h0 = make_inputs(2, 0, 2, 1, 4, 6, 16)
    for backend in ("reference", "chunk"):
        o, (hk, hv) = flash_gsa.gsa(*inputs, initial_state=h0, output_final_state=True, backend=backend)
        assert o.shape == (2, 0, 2, 6)
        assert torch.equal(hk, h0[0]) and torch.equal(hv, h0[1])
        assert hk.data_ptr() != h0[0].data_ptr(), backend
        o, (hk, hv) = flash_gsa.gsa(*inputs, output_final_state=True, backend=backend)
        assert not hk.any() and not hv.any()


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_inputs_never_modified(seed, backend):
    inputs, h0 = make_inputs(1, 40, 2, 1, 4, 6, 16, n_state=2, dtype=torch.float32)
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)
    everything = [*inputs, *h0, cu]
    before = [x.clone() for x in everything]
    xs = [x.requires_grad_() for x in inputs]
    o, (hk, hv) = flash_gsa.gsa(*xs, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend)
    (o.sum() + hk.sum() + hv.sum()).backward()
    o2, _ = flash_gsa.gsa(*xs[:4], cu_seqlens=cu, backend=backend)
    o2.sum().backward()
    for x, b in zip(everything, before, strict=True):
        assert torch.equal(x, b)


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_defaults(seed, backend):
    """s defaults to 1 - exp(g), scale to K ** -0.5; no final state unless asked for; o in q's dtype."""
    inputs, _ = make_inputs(2, 20, 4, 2, 9, 5, 16, dtype=torch.float32)
    q, k, v, g, _ = inputs
    o, state = flash_gsa.gsa(q, k, v, g, backend=backend)
    assert state is None and o.dtype == torch.float32
    explicit, _ = flash_gsa.gsa(q, k, v, g, 1 - g.exp(), scale=9**-0.5, backend=backend)
    torch.testing.assert_close(o, explicit, rtol=1e-5, atol=1e-6)
    other_scale, _ = flash_gsa.gsa(q, k, v, g, 1 - g.exp(), scale=1.0, backend=backend)
    assert not torch.allclose(o, other_scale, rtol=1e-3, atol=1e-3)  # the scale does matter here
    _, (hk, hv) = flash_gsa.gsa(*[x.double() for x in inputs], output_final_state=True, backend=backend)
    assert hk.dtype == hv.dtype == torch.float64


def test_default_backend_on_cpu(seed):
    assert available_backends("cpu") == ["reference", "chunk"]
    assert default_backend("cpu") == "chunk"
    inputs, _ = make_inputs(1, 20, 2, 1, 4, 6, 16, dtype=torch.float32)
    o, _ = flash_gsa.gsa(*inputs)
    o_chunk, _ = flash_gsa.gsa(*inputs, backend="chunk")
    assert torch.equal(o, o_chunk)


def test_default_backend_falls_back_to_chunk_for_sizes_triton_does_not_take(monkeypatch, seed, device):
    """Where triton is the default (CUDA; forced on the CPU without one, where the interpreter runs it), backend=None
    takes the chunk backend for sizes the kernels do not take (M = 8, or K < 16) instead of failing, and triton
    otherwise."""
    import flash_gsa.ops.custom_op as custom_op

    gsa_module = importlib.import_module("flash_gsa.ops.gsa")  # the module (flash_gsa.ops.gsa is also the function)
    monkeypatch.setattr(gsa_module, "default_backend", lambda device: "triton")
    taken = []
    real = custom_op.gsa_triton_op
    monkeypatch.setattr(gsa_module, "gsa_triton_op", lambda *a: taken.append(a[3].shape[-1]) or real(*a))
    for K, M, triton in ((16, 8, False), (8, 16, False), (16, 16, True)):
        inputs, _ = make_inputs(1, 5, 2, 1, K, 16, M, dtype=torch.float32)
        inputs = [x.to(device) for x in inputs]
        o, _ = flash_gsa.gsa(*inputs)
        o_chunk, _ = flash_gsa.gsa(*inputs, backend="chunk")
        # fp32 both; the kernels sum in another order, and on a GPU take their products in tf32 (10-bit mantissa)
        tol = 1e-2 if device.type == "cuda" else 1e-3
        torch.testing.assert_close(o, o_chunk, rtol=tol, atol=tol)
        assert bool(taken) == triton
        taken.clear()


# ---- misuse ---------------------------------------------------------------------------------------------------------


def _valid():
    """Arguments of a valid call: B=1, T=6, HQ=4, H=2, K=3, V=5, M=16; cu_seqlens for two sequences."""
    inputs, (hk, hv) = make_inputs(1, 6, 4, 2, 3, 5, 16, dtype=torch.float32, n_state=2)
    q, k, v, g, s = inputs
    return dict(q=q, k=k, v=v, g=g, s=s, initial_state=(hk, hv), cu_seqlens=torch.tensor([0, 2, 6]))


def _with(**changes):
    def make():
        args = _valid()
        for key, fn in changes.items():
            args[key] = fn(args)
        return args

    return make


META = torch.device("meta")
MISUSE = [
    # (what changes, expected message)
    (_with(q=lambda a: a["q"][0]), "q must have 4 dimensions"),
    (_with(k=lambda a: a["k"][..., None]), "k must have 4 dimensions"),
    (_with(q=lambda a: a["q"].tolist()), "q must be a torch.Tensor"),
    (_with(v=lambda a: a["v"].long()), "v must be a floating-point tensor"),
    (_with(g=lambda a: a["g"][:, :5]), "must agree on \\[B, T\\]"),
    (_with(k=lambda a: a["k"][..., :2]), "k's head dim 2 differs from q's 3"),
    (_with(v=lambda a: a["v"][:, :, :1]), "same number of heads"),
    (_with(q=lambda a: a["q"][:, :, :3]), "must be a multiple of k's heads"),
    (_with(s=lambda a: a["s"][..., :8]), "s must have g's shape"),
    (_with(s=lambda a: a["s"][0]), "s must have 4 dimensions"),
    (_with(k=lambda a: a["k"].to(META)), "k is on meta"),
    (_with(s=lambda a: a["s"].to(META)), "s is on meta"),
    (_with(cu_seqlens=lambda a: a["cu_seqlens"].to(META)), "cu_seqlens is on meta"),
    (_with(initial_state=lambda a: (a["initial_state"][0].to(META), a["initial_state"][1])), "hk is on meta"),
    (_with(cu_seqlens=lambda a: a["cu_seqlens"].float()), "int32 or int64"),
    (_with(cu_seqlens=lambda a: [0, 2, 6]), "int32 or int64"),
    (_with(cu_seqlens=lambda a: a["cu_seqlens"][None]), "shape \\[N \\+ 1\\]"),
    (_with(cu_seqlens=lambda a: a["cu_seqlens"][:1]), "shape \\[N \\+ 1\\]"),
    (_with(cu_seqlens=lambda a: torch.tensor([1, 2, 6])), "start at 0 and end at T"),
    (_with(cu_seqlens=lambda a: torch.tensor([0, 2, 5])), "start at 0 and end at T"),
    (_with(cu_seqlens=lambda a: torch.tensor([0, 4, 2, 6])), "non-decreasing"),
    (_with(initial_state=lambda a: a["initial_state"][0]), "must be a tuple"),
    (_with(initial_state=lambda a: (*a["initial_state"], a["initial_state"][0])), "must be a tuple"),
    (_with(initial_state=lambda a: (a["initial_state"][0][:1], a["initial_state"][1])), "hk must have shape"),
    (_with(initial_state=lambda a: (a["initial_state"][0], a["initial_state"][1][..., :4])), "hv must have shape"),
    (_with(initial_state=lambda a: (a["initial_state"][0], a["initial_state"][1].tolist())), "hv must have shape"),
]


@pytest.mark.parametrize("make, match", MISUSE, ids=[m for _, m in MISUSE])
def test_rejects_misuse(make, match):
    args = make()
    with pytest.raises(ValueError, match=match):
        flash_gsa.gsa(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("s"), **args)


def test_rejects_batch_with_cu_seqlens():
    args = _valid()
    q, k, v, g, s = (torch.cat([args[n], args[n]]) for n in "qkvgs")
    with pytest.raises(ValueError, match="needs a packed batch"):
        flash_gsa.gsa(q, k, v, g, s, cu_seqlens=args["cu_seqlens"])


@pytest.mark.parametrize("scale", ["0.5", torch.tensor(0.5), [0.5]], ids=["str", "tensor", "list"])
def test_rejects_scale_type(scale):
    args = _valid()
    with pytest.raises(ValueError, match="scale must be a number"):
        flash_gsa.gsa(args["q"], args["k"], args["v"], args["g"], scale=scale)


def test_rejects_backend(monkeypatch):
    args = _valid()
    q, k, v, g = (args[n] for n in "qkvg")
    with pytest.raises(ValueError, match="backend must be one of"):
        flash_gsa.gsa(q, k, v, g, backend="cuda")
    monkeypatch.setattr(importlib.import_module("flash_gsa.ops.gsa"), "_triton_backend", lambda: None)
    with pytest.raises(ValueError, match="needs the triton package"):
        flash_gsa.gsa(q, k, v, g, backend="triton")

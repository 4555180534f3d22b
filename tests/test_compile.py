"""torch.compile through `flash_gsa.gsa`: the chunk and triton backends are custom ops (flash_gsa/ops/custom_op.py),
so that a model calling the operator compiles into one graph. `fullgraph=True` makes any graph break an error.

On the CPU the compiled graphs run with backend="aot_eager" (the same graph capture, AOT autograd and fake-tensor
shape propagation as inductor, without its C++ code generation, which costs ~5 s per graph here) except for one
inductor case; on CUDA everything runs through inductor. The triton backend runs on the CPU through Triton's
interpreter (tests/conftest.py). `torch.library.opcheck` checks each op's schema, fake implementation (shapes,
dtypes, strides against the real one) and autograd registration.
"""


import pytest
import torch
import torch.nn.functional as F

import flash_gsa
from flash_gsa.layers import GatedSlotAttention
from flash_gsa.ops import custom_op

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_backend(device) -> str:
    return "inductor" if torch.device(device).type == "cuda" else "aot_eager"


def grads_of(fn, inputs, *args):
    """fn(*inputs, *args) -> scalar loss; returns the loss and the gradients of all inputs."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*xs, *args)
    return loss.detach(), torch.autograd.grad(loss, xs)


def assert_same(eager, compiled, seed, norm_tol=None, **tol):
    """Same loss and gradients: elementwise (assert_close, `tol`), or in relative Frobenius norm below `norm_tol`."""
    (l0, g0), (l1, g1) = eager, compiled
    pairs = [("loss", l1, l0)] + [(f"gradient {i}", a, b) for i, (a, b) in enumerate(zip(g1, g0, strict=True))]
    for what, a, b in pairs:
        assert torch.isfinite(a).all(), f"{what} (seed {seed}): not finite"
        if norm_tol is None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, what=what: f"{what} (seed {seed}): {m}")
        else:
            err = ((a.double() - b.double()).norm() / b.double().norm()).item()
            assert err < norm_tol, f"{what} (seed {seed}): relative error {err:.1e}"


def inputs_for(B, T, HQ, H, K, V, M, N, device, dtype=torch.float32):
    xs = [torch.randn(B, T, HQ, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V), torch.randn(B, T, H, M)]
    h0 = [torch.randn(N, H, K, M), torch.randn(N, H, M, V)]
    return [x.to(device, dtype) for x in xs] + [x.to(device) for x in h0]


def loss_fn(backend):
    """Every argument of the operator in play: gates from logits, default s, an initial state whose gradient flows,
    the final state in the loss, optional cu_seqlens."""

    def fn(q, k, v, f, hk0, hv0, cu_seqlens):
        g = F.logsigmoid(f.float()) / 4
        o, (hk, hv) = flash_gsa.gsa(
            F.silu(q), k, v, g, scale=0.5, initial_state=(hk0, hv0), output_final_state=True, cu_seqlens=cu_seqlens,
            backend=backend,
        )
        return (o.float() ** 2).mean() + hk.square().mean() + hv.mean()

    return fn


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_chunk_fullgraph(seed, varlen):
    """The chunk backend compiles without graph breaks, matches eager, and recompiles for a new length with dynamic
    shapes (the fake implementations handle symbolic sizes)."""
    fn = loss_fn("chunk")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for T in (37, 20):
        cu = torch.tensor([0, 5, 5, T]) if varlen else None
        B, N = (1, 3) if varlen else (2, 2)
        inputs = inputs_for(B, T, 4, 2, 8, 6, 16, N, "cpu")
        assert_same(grads_of(fn, inputs, cu), grads_of(compiled, inputs, cu), seed)


def test_layer_fullgraph_inductor(seed):
    """A GatedSlotAttention layer (with short convolutions) through inductor: one graph, the same output and
    parameter gradients as eager. (Packed sequences are covered at the operator level above: the layer's own
    cu_seqlens check reads the values, a graph break under fullgraph.)"""
    layer = GatedSlotAttention(hidden_size=32, num_heads=2, num_slots=16, use_short_conv=True)
    x = torch.randn(2, 24, 32)

    def run(module):
        out = module(x)
        loss = out.square().mean()
        return loss.detach(), torch.autograd.grad(loss, list(layer.parameters()))

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="inductor"))
    assert_same(eager, compiled, seed, rtol=1e-4, atol=1e-5)


def test_model_with_loss_fullgraph(seed):
    """The whole causal LM with its loss (RMSNorm, SwiGLU and the chunked cross-entropy are autograd Functions with
    their own backward): one graph, the same loss and parameter gradients as eager (float32: assert_close defaults)."""
    from flash_gsa import GSAConfig, GSAForCausalLM

    model = GSAForCausalLM(GSAConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8,
                                     intermediate_size=48))
    ids = torch.randint(0, 64, (2, 24))

    def run(module):
        loss = module(ids, labels=ids).loss
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))

    assert_same(run(model), run(torch.compile(model, fullgraph=True, backend="aot_eager")), seed)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_triton_fullgraph(device, seed, varlen):
    """The triton backend compiles without graph breaks and matches eager (on the CPU: the interpreter)."""
    fn = loss_fn("triton")
    T = 20
    cu = torch.tensor([0, 5, 5, T], device=device) if varlen else None
    B, N = (1, 3) if varlen else (2, 2)
    inputs = inputs_for(B, T, 4, 2, 16, 32, 16, N, device)
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend(device))
    assert_same(grads_of(fn, inputs, cu), grads_of(compiled, inputs, cu), seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (on the CPU, test_triton_fullgraph covers the triton backend)")
def test_layer_triton_bf16_fullgraph_on_gpu(device, seed):
    """A bf16 layer on the GPU through inductor, the triton backend chosen by default."""
    layer = GatedSlotAttention(hidden_size=256, num_heads=4, num_slots=64, use_short_conv=True)
    layer = layer.to(device, torch.bfloat16)
    x = torch.randn(2, 512, 256, device=device, dtype=torch.bfloat16)

    def run(module):
        loss = module(x).float().square().mean()
        return loss.detach(), torch.autograd.grad(loss, list(layer.parameters()))

    # bf16: inductor fuses the elementwise work around the op differently, so results differ by bf16 roundings.
    assert_same(run(layer), run(torch.compile(layer, fullgraph=True)), seed, norm_tol=2e-2)


# ---- the ops themselves ---------------------------------------------------------------------------------------------


def op_args(device, dtype, varlen, T):
    B, HQ, H, K, V, M = 1, 4, 2, 16, 32, 16
    q, k, v = (torch.randn(B, T, n, d, device=device, dtype=dtype) for n, d in ((HQ, K), (H, K), (H, V)))
    g = F.logsigmoid(torch.randn(B, T, H, M, device=device))
    s = torch.rand(B, T, H, M, device=device)
    cu = torch.tensor([0, 5, 5, T], device=device) if varlen else None
    N = 3 if varlen else B
    hk0, hv0 = torch.randn(N, H, K, M, device=device), torch.randn(N, H, M, V, device=device)
    return [x.requires_grad_() for x in (q, k, v, g, s, hk0, hv0)], cu


CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck_chunk(seed, varlen):
    (q, k, v, g, s, hk0, hv0), cu = op_args("cpu", torch.float64, varlen, 37)
    torch.library.opcheck(custom_op.chunk_fwd, (q, k, v, g, s, 0.5, hk0, hv0, cu), test_utils=CHECKS)
    torch.library.opcheck(custom_op.chunk_fwd, (q, k, v, g, s, 0.5, None, None, cu), test_utils=CHECKS)
    do = torch.randn(*q.shape[:3], v.shape[3], dtype=q.dtype)
    dhk, dhv = torch.randn_like(hk0), torch.randn_like(hv0)
    args = (do, dhk, dhv, *(x.detach() for x in (q, k, v, g, s)), 0.5, hk0.detach(), hv0.detach(), cu)
    torch.library.opcheck(custom_op.chunk_bwd, args, test_utils=CHECKS)


@pytest.mark.parametrize(
    "varlen, dtype", [(False, torch.float32), (True, torch.bfloat16)], ids=["dense-fp32", "varlen-bf16"]
)
def test_opcheck_triton(device, seed, varlen, dtype):
    """The fake implementation of triton_fwd mirrors the buffers the kernels save (their number of chunks depends on
    cu_seqlens' values; the states' dtype on the inputs')."""
    (q, k, v, g, s, hk0, hv0), cu = op_args(device, dtype, varlen, 20)
    init = torch.cat([hk0.transpose(-1, -2), hv0], dim=-1).detach().requires_grad_()
    torch.library.opcheck(custom_op.triton_fwd, (q, k, v, g, s, 0.5, init, cu), test_utils=CHECKS)
    with torch.no_grad():
        o, final, saved = custom_op.triton_fwd(q, k, v, g, s, 0.5, None, cu)
    args = (q, k, v, s, torch.randn_like(o), torch.randn_like(final), saved, 0.5, cu, g.dtype)
    torch.library.opcheck(custom_op.triton_bwd, tuple(x.detach() if torch.is_tensor(x) else x for x in args),
                          test_utils=("test_schema", "test_faketensor"))

"""Layers: GatedSlotAttention, Attention and their pieces, on CPU.

Exactness checks run in float64: the same math computed in another order (token by token, packed, padded) agrees to
~1e-13 there, so a tolerance of 1e-9 can only fail on a real bug, never on rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, check_left_padded_prefill_then_decode, randn

from flash_gsa.layers import MIXERS, Attention, GatedSlotAttention, RMSNorm, ShortConvolution, SwiGLU
from flash_gsa.layers.varlen import check_mixer_inputs, document_positions, repad, unpad
from flash_gsa.models import GSACache, GSAConfig

D = 32


def gsa_layer(seed: int = 0, **kw) -> GatedSlotAttention:
    torch.manual_seed(seed)
    kw = {"num_heads": 2, "num_slots": 8, "layer_idx": 0, **kw}
    return GatedSlotAttention(kw.pop("hidden_size", D), **kw).double()


def attn_layer(seed: int = 0, **kw) -> Attention:
    torch.manual_seed(seed)
    kw = {"num_heads": 4, "layer_idx": 0, **kw}
    return Attention(kw.pop("hidden_size", D), **kw).double()


LAYERS = {
    "gsa": lambda: gsa_layer(),
    "gsa_conv": lambda: gsa_layer(use_short_conv=True, conv_size=3),
    "gsa_gqa": lambda: gsa_layer(num_heads=4, num_kv_heads=2, feature_map="relu"),
    "attention": lambda: attn_layer(),
    "attention_gqa": lambda: attn_layer(num_kv_heads=2),
}


@pytest.mark.parametrize("name", LAYERS)
def test_cached_decode_matches_full_forward(name):
    layer = LAYERS[name]()
    x = randn(2, 11, D)
    full = layer(x)
    cache = GSACache()
    pieces, t = [], 0
    for step in (4, 1, 1, 3, 1, 1):  # a prefill, single tokens, a multi-token chunk
        pieces.append(layer(x[:, t : t + step], past_key_values=cache, use_cache=True))
        t += step
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


@pytest.mark.parametrize("name", LAYERS)
def test_padded_batch_matches_unpadded_sequences(name):
    layer = LAYERS[name]()
    lengths, T = [7, 4, 9], 9
    seqs = [randn(1, n, D, seed=10 + i) for i, n in enumerate(lengths)]
    for side in ("left", "right"):
        x, mask = torch.zeros(3, T, D, dtype=torch.float64), torch.zeros(3, T, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
            sl = slice(T - n, T) if side == "left" else slice(0, n)
            x[i, sl], mask[i, sl] = s[0], 1
        out = layer(x, attention_mask=mask)
        for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
            sl = slice(T - n, T) if side == "left" else slice(0, n)
            torch.testing.assert_close(out[i, sl], layer(s)[0], **TOL)
        assert out[mask == 0].abs().max() == 0  # padding comes out as zeros


@pytest.mark.parametrize("name", LAYERS)
def test_packed_documents_match_separate_sequences(name):
    layer = LAYERS[name]()
    lengths = [5, 1, 8, 3]
    docs = [randn(1, n, D, seed=20 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, 5, 6, 14, 17], dtype=torch.int32)
    out = layer(torch.cat(docs, dim=1), cu_seqlens=cu)
    torch.testing.assert_close(out, torch.cat([layer(d) for d in docs], dim=1), **TOL)


@pytest.mark.parametrize("name", LAYERS)
def test_left_padded_prefill_then_decode_matches_unpadded(name):
    check_left_padded_prefill_then_decode(LAYERS[name]())


def test_cache_read_without_update():
    layer = gsa_layer()
    x = randn(1, 6, D)
    cache = GSACache()
    layer(x[:, :4], past_key_values=cache, use_cache=True)
    before = [t.clone() for t in cache[0].recurrent_state]
    once = layer(x[:, 4:], past_key_values=cache)  # use_cache=False: read the state, leave it alone
    assert all(torch.equal(a, b) for a, b in zip(before, cache[0].recurrent_state, strict=True))
    torch.testing.assert_close(once, layer(x)[:, 4:], **TOL)


def test_gsa_packed_documents_with_cache():
    layer = gsa_layer(use_short_conv=True)
    docs = [randn(1, 6, D, seed=40), randn(1, 4, D, seed=41)]
    cache = GSACache()
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    prompt = torch.cat([docs[0][:, :4], docs[1][:, :3]], dim=1)
    first = layer(prompt, cu_seqlens=cu, past_key_values=cache, use_cache=True)
    nxt = layer(torch.cat([docs[0][:, 4:5], docs[1][:, 3:4]]), past_key_values=cache, use_cache=True)
    torch.testing.assert_close(first[:, :4], layer(docs[0][:, :4]), **TOL)
    torch.testing.assert_close(nxt[0, 0], layer(docs[0][:, :5])[0, 4], **TOL)
    torch.testing.assert_close(nxt[1, 0], layer(docs[1])[0, 3], **TOL)


def test_gsa_matches_the_paper_formula():
    """The layer is exactly o_proj(RMSNorm(SiLU(GSA(swish q, swish k, SiLU v, g = logsigmoid(f)/tau, s = 1 - e^g))))."""
    layer = gsa_layer(gate_logit_normalizer=4)
    x = randn(1, 5, D)
    H, dh, M = 2, D // 2, 8
    q = F.silu(layer.q_proj(x)).view(1, 5, H, dh)
    k = F.silu(layer.k_proj(x)).view(1, 5, H, dh)
    v = F.silu(layer.v_proj(x)).view(1, 5, H, dh)
    g = F.logsigmoid(layer.f_proj(x)).view(1, 5, H, M) / 4
    hk, hv, outs = torch.zeros(H, dh, M, dtype=x.dtype), torch.zeros(H, M, dh, dtype=x.dtype), []
    for t in range(5):
        a, s = g[0, t].exp(), 1 - g[0, t].exp()
        hk = hk * a[:, None, :] + k[0, t, :, :, None] * s[:, None, :]
        hv = hv * a[:, :, None] + s[:, :, None] * v[0, t, :, None, :]
        p = torch.einsum("hk,hkm->hm", q[0, t], hk).softmax(-1)  # scale 1
        outs.append(torch.einsum("hm,hmv->hv", p, hv).flatten())
    o = torch.stack(outs)[None]
    rms = F.silu(o) * torch.rsqrt(F.silu(o).pow(2).mean(-1, keepdim=True) + 1e-5) * layer.g_norm.weight
    torch.testing.assert_close(layer(x), layer.o_proj(rms), **TOL)


def test_short_conv_is_a_causal_depthwise_conv():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 3).double()
    x = randn(2, 7, 6)
    y, state = conv(x)
    ref = F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), conv.weight[:, None], groups=6).transpose(1, 2)
    torch.testing.assert_close(y, ref, **TOL)
    torch.testing.assert_close(state, x[:, -2:].transpose(1, 2), **TOL)
    short, state2 = conv(x[:, :1], state=state)  # shorter than the window: the old window shifts in
    torch.testing.assert_close(state2, torch.cat([state[:, :, 1:], x[:, :1].transpose(1, 2)], dim=-1), **TOL)


def test_varlen_helpers():
    x = randn(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    packed, cu, idx = unpad(x, mask)
    assert packed.shape == (1, 6, 3) and cu.tolist() == [0, 2, 6]
    back = repad(packed, idx, 2, 4)
    torch.testing.assert_close(back[mask], x[mask])
    assert back[~mask].abs().max() == 0
    doc, pos = document_positions(torch.tensor([0, 2, 2, 5]), 5)
    assert doc.tolist() == [0, 0, 2, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2]


def test_state_size():
    assert gsa_layer(num_heads=4, num_kv_heads=2).state_size(100) == 2 * 2 * 8 * 8
    assert gsa_layer(use_short_conv=True, conv_size=3).state_size(5) == 2 * 2 * 8 * 16 + 2 * (D + 2 * D)
    assert attn_layer(num_kv_heads=2).state_size(10) == 2 * 10 * 2 * 8
    # The 1.3B model: 2 * 64 * 512 * 4 = 262,144 numbers per layer, as in the notes.
    assert GatedSlotAttention(2048, num_heads=4).state_size(1) == 262_144


def test_mixer_registry_builds_every_mixer():
    config = GSAConfig(vocab_size=10, hidden_size=D, num_hidden_layers=2, num_heads=2, num_slots=4, attn_num_heads=4)
    gsa, attn = MIXERS["gsa"](config, 1), MIXERS["attention"](config, 0)
    assert isinstance(gsa, GatedSlotAttention) and gsa.layer_idx == 1 and gsa.num_slots == 4
    assert isinstance(attn, Attention) and attn.num_heads == 4 and attn.layer_idx == 0


# Every constructor argument has an effect: on parameter shapes, or on the output with the same weights.


def _outputs_differ(a, b, x) -> bool:
    b.load_state_dict(a.state_dict())
    return not torch.allclose(a(x), b(x))


@pytest.mark.parametrize(
    "change",
    [
        {"num_slots": 4},
        {"num_kv_heads": 1},
        {"num_heads": 4},
        {"hidden_size": 16},
        {"use_short_conv": True},
        {"conv_size": 2, "use_short_conv": True},
    ],
)
def test_gsa_shape_arguments(change):
    base = {"use_short_conv": True} if "conv_size" in change else {}
    a, b = gsa_layer(**base), gsa_layer(**change)
    assert {k: v.shape for k, v in a.state_dict().items()} != {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize("change", [{"gate_logit_normalizer": 1}, {"feature_map": "relu"}, {"feature_map": "identity"},
                                    {"norm_eps": 10.0}])
def test_gsa_value_arguments(change):
    assert _outputs_differ(gsa_layer(), gsa_layer(**change), randn(1, 6, D))


def test_layer_idx_is_the_cache_key():
    cache = GSACache()
    gsa_layer(layer_idx=3)(randn(1, 2, D), past_key_values=cache, use_cache=True)
    attn_layer(layer_idx=5)(randn(1, 2, D), past_key_values=cache, use_cache=True)
    assert sorted(cache.layers) == [3, 5]
    assert cache[3].recurrent_state is not None and cache[5].keys.shape == (1, 4, 2, 8)


def test_attention_arguments():
    x = randn(1, 6, D)
    assert _outputs_differ(attn_layer(), attn_layer(rope_theta=100.0), x)
    assert attn_layer(num_kv_heads=2).k_proj.weight.shape == (16, D)
    assert _outputs_differ(attn_layer(num_heads=4), attn_layer(num_heads=2), x)  # same shapes, other head split


# Every ValueError.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0}, ">= 1"),
        ({"hidden_size": 30, "num_heads": 4}, "divisible"),
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple"),
        ({"num_slots": 0}, "num_slots"),
        ({"gate_logit_normalizer": 0}, "gate_logit_normalizer"),
        ({"feature_map": "elu"}, "feature_map"),
        ({"conv_size": 1}, "conv_size"),
        ({"layer_idx": -1}, "layer_idx"),
        ({"norm_eps": 0}, "eps"),
    ],
)
def test_gsa_constructor_errors(kwargs, match):
    kwargs = {"hidden_size": D, **kwargs}
    with pytest.raises(ValueError, match=match):
        GatedSlotAttention(kwargs.pop("hidden_size"), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 0}, ">= 1"),
        ({"num_heads": 3}, "divisible"),
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple"),
        ({"hidden_size": 12, "num_heads": 4}, "even"),
        ({"num_heads": 4, "rope_theta": 0}, "rope_theta"),
        ({"num_heads": 4, "layer_idx": -2}, "layer_idx"),
    ],
)
def test_attention_constructor_errors(kwargs, match):
    kwargs = {"hidden_size": D, **kwargs}
    with pytest.raises(ValueError, match=match):
        Attention(kwargs.pop("hidden_size"), **kwargs)


def test_building_block_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(4, eps=-1)
    with pytest.raises(ValueError, match="intermediate_size"):
        SwiGLU(4, 0)
    with pytest.raises(ValueError, match="channels"):
        ShortConvolution(0, 3)
    with pytest.raises(ValueError, match="kernel size"):
        ShortConvolution(4, 1)
    with pytest.raises(ValueError, match="conv state"):
        ShortConvolution(4, 3)(torch.zeros(2, 5, 4), state=torch.zeros(2, 4, 3))


MASK_OK = torch.ones(1, 4, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_states": [1.0]}, "must be a tensor"),
        ({"hidden_states": torch.zeros(4, D)}, r"\[B, T, 32\]"),
        ({"hidden_states": torch.zeros(1, 4, D + 1)}, r"\[B, T, 32\]"),
        ({"use_cache": True}, "use_cache=True needs a cache"),
        ({"past_key_values": GSACache(), "layer_idx": None}, "layer_idx"),
        ({"attention_mask": MASK_OK, "cu_seqlens": torch.tensor([0, 4])}, "not both"),
        ({"cu_seqlens": torch.tensor([0.0, 4.0])}, "int32 or int64"),
        ({"cu_seqlens": torch.tensor([4])}, r"\[N \+ 1\]"),
        ({"hidden_states": torch.zeros(2, 4, D), "cu_seqlens": torch.tensor([0, 4])}, "B == 1"),
        ({"cu_seqlens": torch.tensor([1, 4])}, "start at 0"),
        ({"cu_seqlens": torch.tensor([0, 3])}, "end at T"),
        ({"cu_seqlens": torch.tensor([0, 3, 2, 4])}, "non-decreasing"),
        ({"attention_mask": torch.ones(4)}, "2-D"),
        ({"attention_mask": torch.ones(1, 3)}, r"\[1, >= 4\]"),
        ({"attention_mask": torch.ones(2, 4)}, r"\[1, >= 4\]"),
    ],
)
def test_mixer_input_errors(kwargs, match):
    args = {"hidden_states": torch.zeros(1, 4, D), "hidden_size": D, "attention_mask": None, "cu_seqlens": None,
            "past_key_values": None, "use_cache": False, "layer_idx": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_mixer_inputs(**args)
    if kwargs.get("layer_idx", 0) is not None:  # the layers raise the same
        layer_args = {k: args[k] for k in ("attention_mask", "cu_seqlens", "past_key_values", "use_cache")}
        for layer in (gsa_layer(), attn_layer()):
            with pytest.raises(ValueError, match=match):
                layer(args["hidden_states"], **layer_args)


def test_attention_rejects_packed_documents_with_a_cache():
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn_layer()(randn(1, 4, D), cu_seqlens=torch.tensor([0, 2, 4]), past_key_values=GSACache())


def test_gradients_reach_every_parameter_with_padding():
    layer = gsa_layer(use_short_conv=True)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    layer(randn(2, 4, D), attention_mask=mask).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_rmsnorm_and_swiglu_backwards_are_exact():
    """RMSNorm and SwiGLU keep fewer tensors for the backward and recompute the rest: their gradients must be the
    plain formulas' (float64, numerical gradcheck, and autograd through the formula on fresh random inputs)."""
    from flash_gsa.layers.mlp import _SiLUMul
    from flash_gsa.layers.norm import _RMSNormFunction

    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5, x.dtype), (x, w))
    gate, up = (torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(_SiLUMul.apply, (gate, up))

    norm, mlp = RMSNorm(8).double(), SwiGLU(8, 12).double()
    with torch.no_grad():
        norm.weight.normal_()
    y = torch.randn(2, 3, 8, dtype=torch.float64)
    for module, plain in (
        (norm, lambda v: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight),
        (mlp, lambda v: mlp.down_proj(F.silu(mlp.gate_proj(v)) * mlp.up_proj(v))),
    ):
        params = list(module.parameters())
        a, b = (y.clone().requires_grad_() for _ in range(2))
        dy = torch.randn(2, 3, 8, dtype=torch.float64)
        ga = torch.autograd.grad((module(a) * dy).sum(), [a, *params])
        gb = torch.autograd.grad((plain(b) * dy).sum(), [b, *params])
        torch.testing.assert_close(module(a), plain(b), **TOL)
        for u, v in zip(ga, gb, strict=True):
            torch.testing.assert_close(u, v, **TOL)


def test_rmsnorm_keeps_the_input_dtype_and_computes_in_float32():
    x = torch.randn(4, 16).bfloat16()
    norm = RMSNorm(16)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=2**-8)  # one bf16 rounding of the result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_rmsnorm_kernels_match_the_formula(monkeypatch, dtype, autocast):
    """The Triton RMSNorm (on CUDA, or forced on the CPU through the interpreter) against the formula in float64 on
    the same values: output, dx and dw, outputs poisoned with NaN first. 11 rows of 12 in blocks of 4 rows (the last
    one short), a 16-wide block masked past 12, 2 backward programs that take 2 blocks each. Under autocast (bf16) the
    output is bf16, else x's dtype. float32 results: fp32 sums in another order (1e-5); bf16 results: one rounding of
    a value computed in fp32 (2^-8 relative, 2 ulps allowed)."""
    import flash_gsa.layers.norm as norm_module
    import flash_gsa.ops.triton.rms_norm as kernels
    from flash_gsa.ops.triton import config as triton_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setattr(norm_module, "_kernel_device", lambda x: True)
    monkeypatch.setattr(triton_config, "NORM_BLOCK", 64)
    monkeypatch.setattr(triton_config, "NORM_BWD_PROGRAMS", 2)
    monkeypatch.setattr(kernels, "empty", lambda *shape, **kw: torch.full(shape, float("nan"), **kw))
    calls = []
    real = kernels.rms_norm_forward
    monkeypatch.setattr(kernels, "rms_norm_forward", lambda *a: calls.append(1) or real(*a))

    norm = RMSNorm(12).to(device)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(11, 12, device=device).to(dtype).requires_grad_()
    dy = torch.randn(11, 12, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
    dx, dw = torch.autograd.grad(y, [x, norm.weight], dy.to(y.dtype))
    assert calls and y.dtype == (torch.bfloat16 if autocast else dtype) and dx.dtype == dtype

    xd, wd = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm.eps) * wd
    dx_want, dw_want = torch.autograd.grad(want, [xd, wd], dy.to(y.dtype).double())
    for got, ref, out_dtype in ((y, want, y.dtype), (dx, dx_want, dtype), (dw, dw_want, torch.float32)):
        tol = 1e-5 if out_dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def abc_layer() -> torch.nn.Module:
    from flash_gsa.layers import ABCAttention

    torch.manual_seed(0)
    return ABCAttention(D, num_heads=2, num_slots=8, layer_idx=0)


DECODE_LAYERS = {
    "gsa": lambda: gsa_layer(),
    "gsa_gqa_conv": lambda: gsa_layer(num_heads=4, num_kv_heads=2, use_short_conv=True, conv_size=3),
    "abc": abc_layer,
}


@pytest.mark.parametrize("name", DECODE_LAYERS)
def test_cached_steps_take_the_decoding_kernel(monkeypatch, name):
    """With a cache and no gradients, a few new tokens go through the Triton decoding kernel (on CUDA, or forced on
    the CPU through Triton's interpreter), which updates the cached state in place. float32 throughout: on the CPU the
    kernel and the chunk backend compute in fp32 from the same values, so steps agree with the full forward to ~1e-6
    (allowed 1e-4); on CUDA the full forward and the prefill run the triton backend, whose fp32 products are tf32
    (10 mantissa bits): allowed 1e-2. With a padded batch (one packed row of documents under the hood) too."""
    import flash_gsa.layers.gsa as gsa_module
    from flash_gsa.ops.triton import decode

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    real = decode.fused_recurrent_gsa
    monkeypatch.setattr(decode, "fused_recurrent_gsa", lambda *a, **k: calls.append(k) or real(*a, **k))
    if device == "cpu":
        monkeypatch.setattr(gsa_module, "_decode_kernel_device", lambda x: True)
    layer = DECODE_LAYERS[name]().float().to(device)
    x = randn(2, 9, D).float().to(device)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[1, :2] = 0  # left padding, as generate() makes it
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        for m in (None, mask):
            full = layer(x, attention_mask=m)
            cache = GSACache()
            pieces, t, before = [], 0, len(calls)
            for step in (5, 1, 1, 2):  # a prefill (chunk backend), then cached steps (the kernel)
                mt = None if m is None else m[:, : t + step]
                pieces.append(layer(x[:, t : t + step], attention_mask=mt, past_key_values=cache, use_cache=True))
                if step == 1:
                    state = cache[0].recurrent_state
                    assert all(s.is_contiguous() and s.dtype == torch.float32 for s in state)
                t += step
            out = torch.cat(pieces, dim=1)
            if m is not None:
                out, full = out[m.bool()], full[m.bool()]
            torch.testing.assert_close(out, full, **tol)
            assert len(calls) - before == 3 and all(c["inplace"] for c in calls[before:])
            # the last steps wrote into the very tensors the cache holds
            assert cache[0].recurrent_state[0].data_ptr() == state[0].data_ptr()

"""The baseline mixers (ABC, GLA) and the mixer contract for all four registered mixers, on CPU.

Exactness checks run in float64, where the same math computed in another order agrees to ~1e-13: a tolerance of 1e-9
can only fail on a real bug.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, check_left_padded_prefill_then_decode, randn

from flash_gsa.layers import MIXERS, ABCAttention, GatedLinearAttention, GatedSlotAttention
from flash_gsa.layers.abc import abc_gates
from flash_gsa.models import GSACache, GSAConfig, GSAForCausalLM
from flash_gsa.ops import gla, gsa

D = 32
CONFIG = dict(vocab_size=40, hidden_size=D, num_hidden_layers=2, num_heads=2, num_slots=8, intermediate_size=48,
              attn_num_heads=4, pad_token_id=0)


def mixer(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return MIXERS[name](GSAConfig(**{**CONFIG, "mixer": name, **kw}), 0).double()


NAMES = ["gsa", "abc", "gla", "attention"]
LAYERS = {name: (name, {}) for name in NAMES} | {
    "abc_conv": ("abc", {"use_short_conv": True, "conv_size": 3}),
    "gla_conv": ("gla", {"use_short_conv": True, "conv_size": 3}),
    "attention_conv": ("attention", {"use_short_conv": True, "conv_size": 3}),
}


# -- the GLA operator ---------------------------------------------------------------------------------------------


def gla_inputs(B=2, T=37, H=3, K=8, V=5, seed=0):
    q, k, v = randn(B, T, H, K, seed=seed), randn(B, T, H, K, seed=seed + 1), randn(B, T, H, V, seed=seed + 2)
    g = F.logsigmoid(3 * randn(B, T, H, K, seed=seed + 3)) * 2  # strong decays too: up to ~e^-20 per step
    return q, k, v, g


def test_gla_recurrent_is_the_formula():
    q, k, v, g = gla_inputs(B=1, T=6, H=1)
    o, final = gla(q, k, v, g, scale=0.5, output_final_state=True, backend="recurrent")
    S, outs = torch.zeros(8, 5, dtype=torch.float64), []
    for t in range(6):
        S = torch.diag(g[0, t, 0].exp()) @ S + torch.outer(k[0, t, 0], v[0, t, 0])
        outs.append(0.5 * S.T @ q[0, t, 0])
    torch.testing.assert_close(o[0, :, 0], torch.stack(outs), **TOL)
    torch.testing.assert_close(final[0, 0], S, **TOL)


@pytest.mark.parametrize("T", [1, 16, 37, 150])  # 150: two whole chunks of 64 and a partial one
def test_gla_chunk_matches_recurrence_with_state_and_gradients(T):
    inputs = [x.requires_grad_() for x in gla_inputs(T=T)]
    h0 = randn(2, 3, 8, 5, seed=9).requires_grad_()
    results = []
    for backend in ("recurrent", "chunk"):
        o, final = gla(*inputs, initial_state=h0, output_final_state=True, backend=backend)
        grads = torch.autograd.grad((o * randn(*o.shape, seed=5)).sum() + final.sum(), [*inputs, h0])
        results.append((o, final, grads))
    (o1, f1, g1), (o2, f2, g2) = results
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(f2, f1, **TOL)
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_gla_packed_sequences_match_separate_ones(backend):
    q, k, v, g = gla_inputs(B=1, T=40)
    cu = torch.tensor([0, 5, 5, 22, 40])
    h0 = randn(4, 3, 8, 5, seed=7)
    o, final = gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend)
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        o_n, f_n = gla(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], initial_state=h0[n : n + 1],
                       output_final_state=True, backend="recurrent")
        torch.testing.assert_close(o[:, lo:hi], o_n, **TOL)
        torch.testing.assert_close(final[n : n + 1], f_n, **TOL)


def test_gla_chunk_stays_finite_with_extreme_gates():
    q, k, v, _ = (x.float() for x in gla_inputs(T=64))
    g = torch.full_like(q, -80.0)  # exp(+80 * 16) would overflow anything that multiplied exp(-b_j) by exp(b_i)
    o, final = gla(q, k, v, g, output_final_state=True, backend="chunk")
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    torch.testing.assert_close(o[:, 5], (q[:, 5, :, :, None] * k[:, 5, :, :, None] * v[:, 5, :, None, :]).sum(-2)
                               * 8**-0.5)


def test_gla_default_backend_and_dtype():
    q, k, v, g = (x.to(torch.bfloat16) for x in gla_inputs(T=1))
    o, final = gla(q, k, v, g, output_final_state=True)  # one token: the recurrent step
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32


@pytest.mark.parametrize(
    "change, match",
    [
        ({"q": torch.zeros(2, 3, 1)}, "4 dimensions"),
        ({"g": torch.zeros(2, 37, 3, 4, dtype=torch.float64)}, "same shape"),
        ({"v": torch.zeros(2, 36, 3, 5, dtype=torch.float64)}, r"\[B, T, H, V\]"),
        ({"initial_state": torch.zeros(2, 3, 8, 4)}, "initial_state"),
        ({"cu_seqlens": torch.tensor([0, 37])}, "B == 1"),
        ({"backend": "triton"}, "backend"),
        ({"scale": "1"}, "scale"),
    ],
)
def test_gla_errors(change, match):
    q, k, v, g = gla_inputs()
    args = {"q": q, "k": k, "v": v, "g": g, **change}
    with pytest.raises(ValueError, match=match):
        gla(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), **args)


# -- ABC ----------------------------------------------------------------------------------------------------------


def test_abc_gates_give_softmax_over_time_weights():
    """The GSA recurrence with ABC's gates holds exactly sum_j exp(e_j) / Z_t x_j in every slot."""
    e, x = 3 * randn(1, 9, 2, 4, seed=3), randn(1, 9, 2, 1, seed=4)
    g, s, log_z = abc_gates(e)
    assert (g <= 0).all() and (g[:, 0] == 0).all() and (s[:, 0] == 1).all()  # first token: nothing to forget
    torch.testing.assert_close(s[:, 1:], -torch.expm1(g[:, 1:]), **TOL)
    mem = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(9):
        mem = mem * g[0, t].exp() + s[0, t] * x[0, t]
        w = e[0, : t + 1].softmax(dim=0)  # [t+1, H, M]: the weights of ABC
        torch.testing.assert_close(mem, (w * x[0, : t + 1]).sum(0), **TOL)
    torch.testing.assert_close(log_z, e[0].logsumexp(dim=0)[None], **TOL)


def test_abc_gates_restart_per_document_and_continue_from_a_carried_normalizer():
    e = randn(1, 12, 2, 4, seed=5)
    cu = torch.tensor([0, 3, 3, 12])
    g, s, log_z = abc_gates(e, cu)
    for lo, hi in ((0, 3), (3, 12)):
        g_n, s_n, _ = abc_gates(e[:, lo:hi])
        torch.testing.assert_close(g[:, lo:hi], g_n, **TOL)
        torch.testing.assert_close(s[:, lo:hi], s_n, **TOL)
    assert torch.isinf(log_z[1]).all() and (log_z[1] < 0).all()  # the empty document: nothing written
    _, _, z_head = abc_gates(e[:, :5])
    g_tail, s_tail, z_all = abc_gates(e[:, 5:], log_z0=z_head[0:1].expand(1, 2, 4))
    g_full, s_full, z_full = abc_gates(e)
    torch.testing.assert_close(g_tail, g_full[:, 5:], **TOL)
    torch.testing.assert_close(s_tail, s_full[:, 5:], **TOL)
    torch.testing.assert_close(z_all, z_full, **TOL)


def test_abc_layer_is_gsa_with_abc_gates():
    layer = mixer("abc")
    x = randn(2, 7, D)
    H, dh, M = 2, D // 2, 8
    q = F.silu(layer.q_proj(x)).view(2, 7, H, dh)
    k = F.silu(layer.k_proj(x)).view(2, 7, H, dh)
    v = F.silu(layer.v_proj(x)).view(2, 7, H, dh)
    g, s, _ = abc_gates(layer.f_proj(x).view(2, 7, H, M))
    o, _ = gsa(q, k, v, g, s, scale=1.0, backend="reference")
    torch.testing.assert_close(layer(x), layer.o_proj(layer.g_norm(F.silu(o.flatten(-2)))), **TOL)
    assert isinstance(layer, GatedSlotAttention) and not hasattr(layer, "gate_logit_normalizer")


# -- GLA layer ----------------------------------------------------------------------------------------------------


def test_gla_layer_is_the_paper_formula():
    layer = mixer("gla")
    x = randn(1, 5, D)
    H, dk, dv = 2, D // 4, D // 2
    q, k = layer.q_proj(x).view(5, H, dk), layer.k_proj(x).view(5, H, dk)
    v = layer.v_proj(x).view(5, H, dv)
    a = torch.sigmoid(layer.gk_proj(x)).view(5, H, dk) ** (1 / 16)
    S, outs = torch.zeros(H, dk, dv, dtype=x.dtype), []
    for t in range(5):
        S = a[t, :, :, None] * S + k[t, :, :, None] * v[t, :, None, :]
        o = torch.einsum("hk,hkv->hv", q[t] * dk**-0.5, S)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.g_norm.weight
        outs.append(o.flatten() * F.silu(layer.r_proj(x[0, t])))
    torch.testing.assert_close(layer(x), layer.o_proj(torch.stack(outs))[None], **TOL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_heads": 0}, ">= 1"),
        ({"num_heads": 3}, "divisible"),
        ({"expand_k": 0.3}, "divisible"),
        ({"expand_k": -0.5}, "divisible"),
        ({"gate_low_rank_dim": 0}, "gate_low_rank_dim"),
        ({"gate_logit_normalizer": 0}, "gate_logit_normalizer"),
        ({"conv_size": 1}, "conv_size"),
        ({"layer_idx": -1}, "layer_idx"),
    ],
)
def test_gla_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedLinearAttention(D, **kwargs)


@pytest.mark.parametrize(
    "change", [{"expand_k": 0.25}, {"gate_low_rank_dim": 4}, {"use_short_conv": True}, {"num_heads": 2}]
)
def test_gla_shape_arguments(change):
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(GatedLinearAttention(D)) != shapes(GatedLinearAttention(D, **change))


@pytest.mark.parametrize("change", [{"gate_logit_normalizer": 2}, {"norm_eps": 10.0}])
def test_gla_value_arguments(change):
    torch.manual_seed(0)
    a, b = GatedLinearAttention(D), GatedLinearAttention(D, **change)
    b.load_state_dict(a.state_dict())
    x = randn(1, 6, D).float()
    assert not torch.allclose(a(x), b(x))


# -- the mixer contract, for every mixer -------------------------------------------------------------------------


def test_registry_and_state_sizes():
    assert set(NAMES) <= set(MIXERS)
    layers = {name: mixer(name) for name in NAMES}
    assert isinstance(layers["abc"], ABCAttention) and isinstance(layers["gla"], GatedLinearAttention)
    assert layers["gsa"].state_size(100) == 2 * 2 * 8 * 16
    assert layers["abc"].state_size(100) == 2 * 2 * 8 * 16 + 2 * 8
    assert layers["gla"].state_size(100) == 2 * 8 * 16  # H * (D/2 / H) * (D / H)
    assert layers["attention"].state_size(100) == 2 * 100 * D
    assert mixer("gla", use_short_conv=True, conv_size=3).state_size(1) == 2 * 8 * 16 + 2 * (D + D // 2 * 2)
    assert mixer("attention", use_short_conv=True, conv_size=3).state_size(10) == 2 * 10 * D + 2 * 3 * D


def test_short_conv_reaches_attention_only_as_the_models_mixer():
    conv = dict(CONFIG, use_short_conv=True, attn_layers=[1])
    assert MIXERS["attention"](GSAConfig(**conv, mixer="attention"), 0).use_short_conv
    assert not MIXERS["attention"](GSAConfig(**conv, mixer="gsa"), 1).use_short_conv  # a hybrid layer
    with pytest.raises(ValueError, match="conv_size"):
        MIXERS["attention"](GSAConfig(**CONFIG), 0).__class__(D, 4, conv_size=1)


@pytest.mark.parametrize("name", LAYERS)
def test_forward_backward(name):
    layer = mixer(LAYERS[name][0], **LAYERS[name][1])
    x = randn(2, 9, D).requires_grad_()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    out = layer(x, attention_mask=mask)
    assert out.shape == x.shape and out[0, :2].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0, :2].abs().max() == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("name", LAYERS)
def test_cached_decode_matches_full_forward(name):
    layer = mixer(LAYERS[name][0], **LAYERS[name][1])
    x = randn(2, 11, D)
    full = layer(x)
    cache, pieces, t = GSACache(), [], 0
    for step in (4, 1, 1, 3, 1, 1):
        pieces.append(layer(x[:, t : t + step], past_key_values=cache, use_cache=True))
        t += step
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


@pytest.mark.parametrize("name", LAYERS)
def test_padded_and_packed_match_separate_sequences(name):
    layer = mixer(LAYERS[name][0], **LAYERS[name][1])
    lengths = [7, 4, 9]
    seqs = [randn(1, n, D, seed=10 + i) for i, n in enumerate(lengths)]
    x, mask = torch.zeros(3, 9, D, dtype=torch.float64), torch.zeros(3, 9, dtype=torch.long)
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        x[i, 9 - n :], mask[i, 9 - n :] = s[0], 1
    out = layer(x, attention_mask=mask)
    packed = layer(torch.cat(seqs, dim=1), cu_seqlens=torch.tensor([0, 7, 11, 20], dtype=torch.int32))
    for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        alone = layer(s)[0]
        torch.testing.assert_close(out[i, 9 - n :], alone, **TOL)
        torch.testing.assert_close(packed[0, sum(lengths[:i]) : sum(lengths[: i + 1])], alone, **TOL)


@pytest.mark.parametrize("name", ["abc", "gla", "abc_conv", "gla_conv", "attention_conv"])
def test_left_padded_prefill_then_decode(name):
    check_left_padded_prefill_then_decode(mixer(LAYERS[name][0], **LAYERS[name][1]))


@pytest.mark.parametrize("name", NAMES)
def test_model_decode_matches_full_forward_and_reorders(name):
    torch.manual_seed(0)
    model = GSAForCausalLM(GSAConfig(**{**CONFIG, "mixer": name})).double().eval()
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for t in range(5, 9):
        logits.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, **TOL)
    cache.reorder_cache(torch.tensor([2, 0]))  # beam search keeps rows 2 and 0, every state field included
    nxt = torch.randint(3, 40, (2, 1), generator=torch.Generator().manual_seed(2))
    got = model(nxt, past_key_values=cache).logits[:, -1]
    want = model(torch.cat([ids[[2, 0]], nxt], dim=1)).logits[:, -1]
    torch.testing.assert_close(got, want, **TOL)

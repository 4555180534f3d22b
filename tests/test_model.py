"""GSAConfig, GSAForCausalLM, GSACache and their Hugging Face integration, on CPU with tiny models.

Exactness checks run in float64: the same math computed in another order (cached decode, packed, padded) agrees to
~1e-12 there, so a tolerance of 1e-9 can only fail on a real bug, never on rounding.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import flash_gsa
from flash_gsa import GSAConfig, GSAForCausalLM
from flash_gsa.models import GSACache, GSAModel

TOL = dict(atol=1e-9, rtol=1e-9)  # float64, see the module docstring
V = 40
TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8, intermediate_size=48,
            pad_token_id=0)  # no eos: generate() runs for exactly max_new_tokens
VARIANTS = {
    "gsa": {},
    "short_conv": {"use_short_conv": True, "conv_size": 3},
    "hybrid": {"num_hidden_layers": 3, "attn_layers": [1], "attn_num_heads": 4, "attn_num_kv_heads": 2},
    "gqa_tied": {"num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": True},
    "attention": {"mixer": "attention", "attn_num_heads": 4},
}


def make(seed: int = 0, dtype=torch.float64, **kw) -> GSAForCausalLM:
    torch.manual_seed(seed)
    return GSAForCausalLM(GSAConfig(**{**TINY, **kw})).to(dtype).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def left_pad(seqs: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :], mask[i, T - len(s) :] = s, 1
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_matches_full_forward(variant):
    model = make(**VARIANTS[variant])
    ids = tokens(2, 10)
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    assert isinstance(cache, GSACache) and cache.get_seq_length() == 4
    for t in range(4, 10):
        out = model(ids[:, t : t + 1], past_key_values=cache)  # use_cache defaults to True with a cache
        logits.append(out.logits)
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat(logits, dim=1), full, **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_matches_unpadded_sequences(variant):
    model = make(**VARIANTS[variant])
    seqs = [tokens(7, seed=2), tokens(3, seed=3), tokens(9, seed=4)]
    ids, mask = left_pad(seqs)
    logits = model(ids, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i, -len(s) :], model(s[None]).logits[0], **TOL)
    right = model(ids.flip(1), attention_mask=mask.flip(1)).logits  # right padding (each row reversed)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(right[i, : len(s)], model(s.flip(0)[None]).logits[0], **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_match_separate_sequences(variant):
    model = make(**VARIANTS[variant])
    docs = [tokens(6, seed=5), tokens(2, seed=6), tokens(9, seed=7)]
    cu = torch.tensor([0, 6, 8, 17], dtype=torch.int32)
    packed = torch.cat(docs)[None]
    out = model(packed, cu_seqlens=cu, labels=packed)
    torch.testing.assert_close(out.logits, torch.cat([model(d[None]).logits for d in docs], dim=1), **TOL)
    # The loss never asks a document to predict the next one's first token: it is the mean over all documents.
    losses = [model(d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    torch.testing.assert_close(out.loss, sum(losses) / (17 - 3), **TOL)


@pytest.mark.parametrize("variant", ["gsa", "short_conv", "hybrid"])
def test_left_padded_prefill_then_decode_matches_unpadded(variant):
    model = make(**VARIANTS[variant])
    seqs = [tokens(9, seed=8), tokens(5, seed=9)]
    ids, mask = left_pad([seqs[0][:6], seqs[1][:2]])
    out = model(ids, attention_mask=mask, use_cache=True)
    cache, last = out.past_key_values, [out.logits[:, -1]]
    for t in range(3):
        step = torch.stack([seqs[0][6 + t], seqs[1][2 + t]])[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        last.append(model(step, attention_mask=mask, past_key_values=cache).logits[:, 0])
    for i, n in enumerate((6, 2)):
        want = model(seqs[i][None, : n + 3]).logits[0, n - 1 :]
        torch.testing.assert_close(torch.stack([x[i] for x in last]), want, **TOL)


def _greedy_reference(model, seq: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full forward passes, no cache, no padding."""
    for _ in range(steps):
        seq = torch.cat([seq, model(seq[None]).logits[0, -1].argmax()[None]])
    return seq


@pytest.mark.parametrize("variant", ["gsa", "short_conv", "hybrid"])
def test_generate_greedy_left_padded_batch(variant):
    model = make(**VARIANTS[variant])
    seqs = [tokens(6, seed=10), tokens(3, seed=11)]
    ids, mask = left_pad(seqs)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 6 + 5)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(out[i, 6 - len(s) :], _greedy_reference(model, s, 5), rtol=0, atol=0)


def test_generate_sampling():
    model = make(**VARIANTS["hybrid"], dtype=torch.float32)
    ids, mask = left_pad([tokens(5, seed=12), tokens(2, seed=13)])
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0)
    torch.manual_seed(0)
    a = model.generate(ids, **kw)
    torch.manual_seed(0)
    b = model.generate(ids, **kw)
    torch.manual_seed(1)
    c = model.generate(ids, **kw)
    assert a.shape == (2, 11) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :5], ids) and a.min() >= 0 and a.max() < V


def test_cache_keyword_of_either_transformers_generation():
    """transformers >= 5.24 passes the cache as `cache=`, older versions as `past_key_values=`: both continue the same
    state (the same logits as one forward over the whole sequence); passing both is an error."""
    model = make()
    ids = tokens(2, 7, seed=15)
    full = model(ids).logits[:, -1]
    for name in ("cache", "past_key_values"):
        cache = model(ids[:, :5], use_cache=True).past_key_values
        step = model(ids[:, 5:], use_cache=True, **{name: cache})
        torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="not both"):
        model(ids, past_key_values=GSACache(), cache=GSACache())


def test_generate_beam_search_and_returned_cache():
    model = make(dtype=torch.float32)
    ids = tokens(2, 4, seed=14)
    out = model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape == (2, 7)
    res = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(res.past_key_values, GSACache) and res.past_key_values.get_seq_length() == 6


def test_save_load_round_trip(tmp_path):
    for i, tie in enumerate((False, True)):
        model = make(**VARIANTS["hybrid"], use_short_conv=True, tie_word_embeddings=tie, dtype=torch.float32)
        path = tmp_path / str(i)
        model.save_pretrained(path)
        assert (path / "model.safetensors").exists()
        assert json.loads((path / "config.json").read_text())["model_type"] == "flash_gsa"
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert isinstance(loaded, GSAForCausalLM) and loaded.config.attn_layers == [1]
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
        ids = tokens(2, 7)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_auto_classes_resolve_after_import():
    assert flash_gsa.GSAConfig is GSAConfig
    config = AutoConfig.for_model("flash_gsa", **TINY)
    assert isinstance(config, GSAConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), GSAForCausalLM)
    assert isinstance(AutoModel.from_config(config), GSAModel)


def test_loss_is_shifted_cross_entropy():
    model = make()
    ids = tokens(2, 8)
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, want, **TOL)
    summed = model(ids, labels=labels, num_items_in_batch=100).loss
    torch.testing.assert_close(summed, want * 13 / 100, **TOL)  # 14 targets - 1 ignored


def test_logits_to_keep_inputs_embeds_and_outputs():
    model = make(**VARIANTS["hybrid"])
    ids = tokens(2, 6)
    full = model(ids).logits
    torch.testing.assert_close(model(ids, logits_to_keep=2).logits, full[:, -2:], **TOL)
    torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]], **TOL)
    torch.testing.assert_close(model(inputs_embeds=model.model.embed_tokens(ids)).logits, full, **TOL)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 + 1 and out.past_key_values is None
    assert isinstance(model(ids, return_dict=False), tuple)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = make(**VARIANTS["hybrid"]).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.model.gradient_checkpointing
        ids = tokens(2, 6)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_init():
    model = make(dtype=torch.float32, hidden_size=256, num_heads=2, intermediate_size=512, num_hidden_layers=2)
    layer = model.model.layers[0]
    xavier = 2**-2.5 * math.sqrt(2 / (256 + 256))  # std of Xavier-uniform with gain 2^-2.5
    residual = 0.02 / math.sqrt(2 * 2)
    for weight, std in [(layer.mixer.q_proj.weight, xavier), (layer.mixer.o_proj.weight, residual),
                        (layer.mlp.down_proj.weight, residual), (layer.mlp.up_proj.weight, 0.02),
                        (model.model.embed_tokens.weight, 0.02), (model.lm_head.weight, 0.02)]:
        assert abs(weight.std().item() / std - 1) < 0.1  # >= 8k samples: the sample std is within ~2% of std
    assert torch.equal(layer.mixer_norm.weight, torch.ones(256))


def test_cache_object():
    model = make(**VARIANTS["hybrid"])
    ids = tokens(3, 5)
    cache = model(ids, use_cache=True).past_key_values
    assert len(cache) == 3 and cache[1].keys.shape == (3, 2, 5, 8) and cache[0].recurrent_state[0].shape[0] == 3
    cache.reorder_cache(torch.tensor([2, 0]))
    assert cache[1].keys.shape[0] == 2 and cache[0].recurrent_state[1].shape[0] == 2
    cont = model(ids[[2, 0], :1], past_key_values=cache).logits
    torch.testing.assert_close(cont[:, 0], model(torch.cat([ids, ids[:, :1]], 1)[[2, 0]]).logits[:, -1], **TOL)
    cache.reset()
    assert len(cache) == 0 and cache.get_seq_length() == 0


# GSAConfig: defaults, and every argument has an effect.


def test_config_defaults_are_the_1_3b_model():
    c = GSAConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.num_kv_heads, c.num_slots) == (2048, 24, 4, 4, 64)
    assert (c.intermediate_size, c.vocab_size, c.gate_logit_normalizer, c.attn_num_heads) == (5632, 32000, 8, 16)
    with torch.device("meta"):
        n = sum(p.numel() for p in GSAForCausalLM(c).parameters())
    assert 1.3e9 < n < 1.45e9  # the notes: ~1.38B


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


ATTN = {"attn_layers": [0], "attn_num_heads": 4}


@pytest.mark.parametrize(
    "base, change",
    [({}, {"vocab_size": 41}), ({}, {"hidden_size": 64}), ({}, {"num_hidden_layers": 3}), ({}, {"num_heads": 4}),
     ({}, {"num_kv_heads": 1}), ({}, {"num_slots": 4}), ({}, {"use_short_conv": True}),
     ({"use_short_conv": True}, {"conv_size": 2}), ({}, {"intermediate_size": 40}), ({}, {"attn_layers": [0]}),
     (ATTN, {"attn_num_kv_heads": 2}), ({}, {"mixer": "attention"})],
)
def test_config_shape_arguments(base, change):
    assert _shapes(make(**base)) != _shapes(make(**base, **change))


@pytest.mark.parametrize(
    "base, change",
    [({}, {"gate_logit_normalizer": 1}), ({}, {"feature_map": "relu"}), ({}, {"norm_eps": 10.0}),
     (ATTN, {"rope_theta": 50.0}), ({"attn_layers": [0]}, {"attn_num_heads": 4})],  # 4 heads of 8 = 2 heads of 16
)
def test_config_value_arguments(base, change):
    a, b = make(**base), make(**base, **change)
    b.load_state_dict(a.state_dict())
    ids = tokens(1, 8)
    assert not torch.allclose(a(ids).logits, b(ids).logits)


def test_config_other_arguments():
    assert make(initializer_range=0.2).model.embed_tokens.weight.std() > 0.1
    tied = make(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert make().lm_head.weight is not make().model.embed_tokens.weight
    # generate() caps its default length at max_position_embeddings.
    out = make(max_position_embeddings=7, dtype=torch.float32).generate(tokens(1, 4))
    assert out.shape == (1, 7)
    assert GSAConfig(attn_num_heads=None, hidden_size=96, num_heads=3).attn_num_heads == 3  # 96 % 128 != 0
    assert GSAConfig(hidden_size=64, num_heads=2).intermediate_size == 256


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_slots": 0}, "num_slots"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"num_heads": 3}, "divisible"),
        ({"num_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"gate_logit_normalizer": 0}, "gate_logit_normalizer"),
        ({"norm_eps": 0}, "norm_eps"),
        ({"rope_theta": -1}, "rope_theta"),
        ({"initializer_range": 0}, "initializer_range"),
        ({"feature_map": "elu"}, "feature_map"),
        ({"conv_size": 1}, "conv_size"),
        ({"mixer": "mamba"}, "mixer"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"attn_layers": [1, 1]}, "duplicates"),
        ({"attn_layers": [2]}, r"\[0, 2\)"),
        ({"attn_num_heads": 3}, "attn_num_heads"),
        ({"attn_num_heads": 4, "attn_num_kv_heads": 3}, "attn_num_kv_heads"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSAConfig(**{**TINY, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long), "inputs_embeds": torch.zeros(2, 3, 32)}, "exactly one"),
        ({"input_ids": torch.ones(3, dtype=torch.long)}, "input_ids"),
        ({"inputs_embeds": torch.zeros(3, 32)}, "inputs_embeds"),
        ({"past_key_values": object()}, "GSACache"),
        ({"attention_mask": torch.ones(1, 3), "cu_seqlens": torch.tensor([0, 3])}, "not both"),
        ({"attention_mask": torch.ones(2, 3)}, "attention_mask"),
        ({"output_attentions": True}, "output_attentions"),
        ({"labels": torch.ones(1, 3, dtype=torch.long), "logits_to_keep": 1}, "logits_to_keep"),
        ({"labels": torch.ones(1, 4, dtype=torch.long)}, "labels"),
    ],
)
def test_forward_errors(kwargs, match):
    if not any(k in kwargs for k in ("input_ids", "inputs_embeds")) and kwargs:
        kwargs = {"input_ids": torch.ones(1, 3, dtype=torch.long), **kwargs}
    with pytest.raises(ValueError, match=match):
        make(dtype=torch.float32)(**kwargs)


@pytest.mark.parametrize("path, dtype", [("torch", torch.float64), ("torch", torch.bfloat16),
                                         ("triton", torch.float32), ("triton", torch.bfloat16)])
def test_loss_matches_cross_entropy(monkeypatch, path, dtype):
    """The loss keeps no float32 copy of the logits: PyTorch over row chunks (here 3 rows each, forced small), or
    the Triton kernels (on CUDA, or forced on the CPU through the interpreter; vocabulary blocks of 4 so that a row
    takes two, the second masked). Value and gradient must be F.cross_entropy's on the same logits, with ignored
    targets, packed documents and an explicit divisor. float64: agreement to rounding (1e-9); float32 kernels: fp32
    sums in another order (1e-6 relative). bf16 logits: both compute in float32 from the same values and round the
    gradient to bf16 (2^-8 relative): allow 2 ulps."""
    import flash_gsa.models.loss as loss_module
    import flash_gsa.ops.triton.cross_entropy as kernels
    from flash_gsa.ops.triton import config as triton_config

    calls = []
    real = kernels.cross_entropy_forward
    monkeypatch.setattr(kernels, "cross_entropy_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 7)
    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setattr(loss_module, "_kernel_device", lambda x: path == "triton")
    monkeypatch.setattr(triton_config, "CE_BLOCK", 4)
    logits = torch.randn(2, 5, 7, dtype=torch.float64).to(device, dtype)
    labels = torch.randint(0, 7, (2, 5), device=device)
    labels[0, 2] = -100
    cu = torch.tensor([0, 2, 5], device=device)
    for cu_seqlens, items in ((None, None), (cu, None), (None, 11)):
        a, b = (logits.detach().clone().requires_grad_() for _ in range(2))
        got = loss_module.causal_lm_loss(a, labels, cu_seqlens, items)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if cu_seqlens is not None:
            targets[:, cu_seqlens[1:-1] - 1] = -100
        want = F.cross_entropy(b.double().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction="mean" if items is None else "sum")
        want = want if items is None else want / items
        ga, gb = torch.autograd.grad(got, a)[0], torch.autograd.grad(want, b)[0]
        assert got.dtype == torch.float64 if dtype == torch.float64 else got.dtype == torch.float32
        assert ga.dtype == dtype
        if dtype == torch.float64:
            value_tol = grad_tol = TOL
        else:
            value_tol = dict(rtol=1e-6, atol=1e-6)
            grad_tol = (dict(rtol=1e-6, atol=1e-6 * gb.abs().max().item()) if dtype == torch.float32
                        else dict(rtol=2**-7, atol=2**-7 * gb.abs().max().item()))
        torch.testing.assert_close(got.double(), want, **value_tol)
        torch.testing.assert_close(ga.double(), gb.double(), **grad_tol)
        assert ga.device == a.device
    assert bool(calls) == (path == "triton")
    if path == "triton":  # a target outside the vocabulary: NaN, not a read out of bounds
        bad = labels.clone()
        bad[1, 3] = 7
        assert torch.isnan(loss_module.causal_lm_loss(logits, bad))

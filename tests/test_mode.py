"""The ``dms`` Model Optimizer mode: conversion, guards, layer selection, entry points."""

from __future__ import annotations

import copy

import modelopt.torch.opt as mto
import pytest
import torch
from conftest import tiny_model
from modelopt.torch.opt.conversion import ApplyModeError
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaAttention

import modelopt_dms as dms
from modelopt_dms.nn.attention import DMSAttention

SUPPORTED = ["LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"]


def snapshot(model: nn.Module):
    return {
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
    }


def assert_unchanged(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after["classes"] == before["classes"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert not dms.is_dms_model(model)
    if mto.ModeloptStateManager.is_converted(model):
        assert mto.modelopt_state(model)["modelopt_state_dict"] == []


def ids(t=12, bsz=2, seed=0):
    return torch.randint(0, 128, (bsz, t), generator=torch.Generator().manual_seed(seed))


def modes(model):
    return [name for name, _ in mto.modelopt_state(model)["modelopt_state_dict"]]


# --------------------------------------------------------------------------- conversion
def test_convert_every_family(family):
    model = dms.apply_dms(tiny_model(family), {"window_size": 4})
    attns = [layer.self_attn for layer in model.model.layers]
    assert all(isinstance(a, DMSAttention) for a in attns)
    assert [int(m.layer_idx) for m in dms.dms_modules(model)] == [0, 1]
    assert modes(model) == ["dms"]
    state = mto.modelopt_state(model)["modelopt_state_dict"][0][1]
    assert state["config"]["window_size"] == 4
    assert state["metadata"]["dms_layers"] == [0, 1]
    assert state["metadata"]["dms_format_version"] == dms.DMS_FORMAT_VERSION
    # adapter: exactly H_kv x hidden new projection weights per layer (plus the norm weight)
    for a in attns:
        assert a.dms_adapter.proj.weight.shape == (2, 64)
        assert torch.count_nonzero(a.dms_adapter.proj.weight) == 0
    with torch.no_grad():
        out = model(ids()).logits
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- double apply
@pytest.mark.parametrize("how", ["apply_dms", "apply_mode"])
def test_double_apply_raises_apply_mode_error_and_model_stays_usable(how):
    model = dms.apply_dms(tiny_model("llama"), {"window_size": 4})
    with torch.no_grad():
        before = model(ids()).logits
    state_before = copy.deepcopy(mto.modelopt_state(model))
    with pytest.raises(Exception) as err:
        if how == "apply_dms":
            dms.apply_dms(model, {"window_size": 8})
        else:
            mto.apply_mode(model, [("dms", {"window_size": 8})])
    # the model is untouched and still usable
    assert mto.modelopt_state(model) == state_before
    assert all(m.dms_config.window_size == 4 for m in dms.dms_modules(model))
    with torch.no_grad():
        after = model(ids()).logits
    assert torch.equal(before, after)
    # ... and the error is the documented ApplyModeError with a helpful message
    assert isinstance(err.value, ApplyModeError), f"got {type(err.value).__name__}: {err.value}"
    msg = str(err.value).lower()
    assert "dms" in msg and "already" in msg


# --------------------------------------------------------------------------- unsupported models
def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize(
    "make", [_gpt2, lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU())], ids=["gpt2", "sequential"]
)
def test_unsupported_model_raises_and_is_left_unmodified(make):
    model = make()
    before = snapshot(model)
    with pytest.raises(ApplyModeError) as err:
        dms.apply_dms(model)
    msg = str(err.value)
    for name in SUPPORTED:
        assert name in msg
    assert_unchanged(model, before)
    if isinstance(model, GPT2LMHeadModel):
        assert "GPT2Attention" in msg  # says what it found
        with torch.no_grad():
            model(ids(bsz=1, t=8) % 64)


# --------------------------------------------------------------------------- layer selection
@pytest.mark.parametrize("layers", [[0], [1]])
def test_layers_subset_converts_only_those(layers):
    model = dms.apply_dms(tiny_model("llama", num_hidden_layers=3), {"layers": layers, "window_size": 2})
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if i in layers:
            assert isinstance(attn, DMSAttention)
            assert len(layer._forward_pre_hooks) == 1
        else:
            assert type(attn) is LlamaAttention
            assert not hasattr(attn, "dms_adapter")
            assert len(layer._forward_pre_hooks) == 0
    assert [int(m.layer_idx) for m in dms.dms_modules(model)] == layers
    assert mto.modelopt_state(model)["modelopt_state_dict"][0][1]["metadata"]["dms_layers"] == layers
    with torch.no_grad():
        model(ids())
    assert sorted(dms.collect_decisions(model)) == layers
    model.train()
    dms.set_step(model, 1)
    model(ids(), use_cache=False).logits.sum().backward()


def test_layers_subset_untouched_layers_are_exact():
    original = tiny_model("qwen3", num_hidden_layers=3)
    model = dms.apply_dms(copy.deepcopy(original), {"layers": [1], "window_size": 2})
    with torch.no_grad():
        ref = original(ids()).logits
        got = model(ids()).logits
    assert (got - ref).abs().max() <= 1e-5  # untrained adapter on layer 1, originals elsewhere


@pytest.mark.parametrize("layers", [[2], [0, 5]])
def test_invalid_layer_index_raises_and_leaves_model_unmodified(layers):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ApplyModeError) as err:
        dms.apply_dms(model, {"layers": layers})
    assert str(max(layers)) in str(err.value)
    assert "0..1" in str(err.value)
    assert_unchanged(model, before)
    # a valid conversion still works afterwards
    model = dms.apply_dms(model, {"layers": [0]})
    assert modes(model) == ["dms"]


# --------------------------------------------------------------------------- entry points
def test_apply_dms_equals_apply_mode():
    cfg = {"window_size": 3, "granularity": "layer", "noise_seed": 5, "layers": [1, 0]}
    a = dms.apply_dms(tiny_model("qwen2"), cfg)
    b = mto.apply_mode(tiny_model("qwen2"), [("dms", cfg)])
    c = dms.apply_dms(tiny_model("qwen2"), dms.DMSConfig(**cfg))
    state = mto.modelopt_state(a)
    assert state == mto.modelopt_state(b) == mto.modelopt_state(c)
    assert state["modelopt_state_dict"][0][1]["config"]["layers"] == [0, 1]
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert sd_a.keys() == sd_b.keys() == sd_c.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) and torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    for m in (a, b, c):
        m.train()
        dms.set_step(m, 4)
    with torch.no_grad():
        out = [m(ids(), use_cache=False).logits for m in (a, b, c)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_apply_dms_default_config():
    model = dms.apply_dms(tiny_model("llama"))
    cfg = mto.modelopt_state(model)["modelopt_state_dict"][0][1]["config"]
    assert cfg == dms.DMSConfig().model_dump()


def test_restore_from_modelopt_state_roundtrip():
    model = dms.apply_dms(tiny_model("qwen3"), {"window_size": 2, "layers": [1]})
    with torch.no_grad():
        for m in dms.dms_modules(model):
            m.dms_adapter.proj.weight.normal_(0, 0.01)
        ref = model(ids()).logits
    state, weights = mto.modelopt_state(model), model.state_dict()
    fresh = mto.restore_from_modelopt_state(tiny_model("qwen3", seed=1), state)
    fresh.load_state_dict(weights)
    fresh.eval()
    assert [int(m.layer_idx) for m in dms.dms_modules(fresh)] == [1]
    with torch.no_grad():
        got = fresh(ids()).logits
    assert torch.equal(got, ref)


def test_controls_require_a_dms_model():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="dms"):
        dms.set_step(model, 0)
    with pytest.raises(ValueError, match="dms"):
        with dms.eviction_disabled(model):
            pass
    converted = dms.apply_dms(tiny_model("llama"))
    with pytest.raises(ValueError):
        dms.set_step(converted, -1)

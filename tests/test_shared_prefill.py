"""The shared press prefill: replaying each kvpress press's own hook on one recorded prefill gives
exactly the cache (and DMSPress masks) of the press's hooked prefill, which is the oracle here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from modelopt_dms.evaluation.config import PRESS_NAMES
from modelopt_dms.evaluation.methods import PressMethod, make_press
from modelopt_dms.evaluation.shared_prefill import SharedPrefill

pytest.importorskip("kvpress", reason="kvpress is in the bench extra")


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", attn="sdpa", seed=3)


def _masks(model) -> list:
    return [layer.self_attn.masked_key_indices for layer in model.model.layers]


def _reset_masks(model) -> None:
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None


def _hooked_prefill(model, press, ids):
    """kvpress's own pipeline: the press hooks a real prefill."""
    from transformers import DynamicCache

    _reset_masks(model)
    cache = DynamicCache()
    with press(model):
        model.model(input_ids=ids, past_key_values=cache)
    masks = _masks(model)
    _reset_masks(model)
    return cache, masks


def _press(name: str, model, ids):
    if name != "dms_press":
        return make_press(name, compression_ratio=0.6)
    press = make_press(name, window=16)  # threshold: the median score outside the window
    scores, score = [], press.press.score

    def recording(*args):
        s = score(*args)
        scores.append(s[..., :-16].reshape(-1))
        return s

    press.press.score = recording
    _hooked_prefill(model, press, ids)
    press.press.score = score
    press.threshold = float(torch.cat(scores).median())
    return press


@torch.inference_mode()
def test_every_press_replayed_on_one_record_equals_its_hooked_prefill(base):
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    shared = SharedPrefill(base)
    for name in PRESS_NAMES:
        press = _press(name, base, ids)
        ref, ref_masks = _hooked_prefill(base, press, ids)
        _reset_masks(base)
        got = shared.cache_for(press, ids)
        masks = _masks(base)
        _reset_masks(base)
        for layer_ref, layer_got in zip(ref.layers, got.layers, strict=True):
            assert torch.equal(layer_got.keys, layer_ref.keys), name
            assert torch.equal(layer_got.values, layer_ref.values), name
        for m_ref, m_got in zip(ref_masks, masks, strict=True):
            assert (m_ref is None) == (m_got is None), name
            if m_ref is not None:
                assert all(torch.equal(a, b) for a, b in zip(m_ref, m_got, strict=True)), name
        if name == "dms_press":  # the comparison is not vacuous: entries were masked / dropped
            assert all(m is not None and len(m[0]) > 0 for m in masks)
        else:
            assert got.layers[0].keys.shape[-2] == math.floor(150 * 0.4)
    assert shared.prefills == 1  # seven presses, one forward


@torch.inference_mode()
def test_record_is_reused_only_for_the_same_context(base):
    shared = SharedPrefill(base)
    a = torch.arange(40).unsqueeze(0)
    press = make_press("knorm", compression_ratio=0.5)
    shared.cache_for(press, a)
    shared.cache_for(press, a.clone())
    assert shared.prefills == 1
    shared.cache_for(press, a.flip(-1))
    shared.cache_for(press, a[:, :30])
    assert shared.prefills == 3
    ref, _ = _hooked_prefill(base, press, a[:, :30])  # the latest record answers for its own context
    assert torch.equal(shared.cache_for(press, a[:, :30]).layers[1].keys, ref.layers[1].keys)


def test_press_method_refuses_a_record_of_another_model(base):
    with pytest.raises(ValueError, match="same model"):
        PressMethod(base, None, "knorm", "cr4", 4.0, shared=SharedPrefill(tiny_model("llama", seed=4)))

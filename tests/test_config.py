"""DMSConfig validation: defaults from DESIGN.md §2 and every invalid value rejected by name."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError

import modelopt_dms as dms
from modelopt_dms import DMSConfig


def test_defaults_follow_the_design():
    cfg = DMSConfig()
    assert cfg.decision == "adapter"
    assert cfg.granularity == "head"
    assert cfg.temperature == 0.1
    assert cfg.logit_scale == 100.0
    assert cfg.logit_offset == 5.0
    assert cfg.window_size >= 1
    assert cfg.target_compression_ratio >= 1.0
    assert cfg.layers is None


def test_valid_values_are_kept():
    cfg = DMSConfig(
        window_size=1,
        decision="borrowed_neuron",
        granularity="layer",
        temperature=1e-4,
        logit_scale=1.0,
        logit_offset=-2.0,
        target_compression_ratio=1.0,
        layers=[3, 0, 1],
        noise_seed=42,
    )
    assert cfg.window_size == 1
    assert cfg.decision == "borrowed_neuron"
    assert cfg.granularity == "layer"
    assert cfg.layers == [0, 1, 3]  # sorted
    assert cfg.noise_seed == 42
    # round trip through the dict form modelopt stores
    assert DMSConfig(**cfg.model_dump()) == cfg


INVALID = [
    ("window_size", 0),
    ("window_size", -3),
    ("window_size", 2.5),
    ("window_size", "big"),
    ("temperature", 0.0),
    ("temperature", -0.1),
    ("logit_scale", -1.0),
    ("logit_scale", 0.0),
    ("decision", "foo"),
    ("granularity", "x"),
    ("target_compression_ratio", 0.5),
    ("target_compression_ratio", 0.0),
    ("layers", []),
    ("layers", [-1]),
    ("layers", [0, 2, 0]),
    ("layers", "all"),
    ("noise_seed", -1),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_rejected_naming_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        DMSConfig(**{field: value})
    assert field in str(err.value)
    assert err.value.errors()[0]["loc"][0] == field


def test_unknown_key_rejected():
    with pytest.raises(ValidationError) as err:
        DMSConfig(window=8)
    assert "window" in str(err.value)
    assert err.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    "bad",
    [{"window_size": 0}, {"decision": "foo"}, {"layers": []}, {"unknown_key": 1}],
    ids=["window_size", "decision", "layers", "unknown_key"],
)
def test_apply_rejects_invalid_config_and_leaves_model_unmodified(bad):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValidationError) as err:
        dms.apply_dms(model, bad)
    assert next(iter(bad)) in str(err.value)
    assert not dms.is_dms_model(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(len(layer._forward_pre_hooks) for layer in model.model.layers)

"""DMSConfig validation: defaults from docs/design.md §2 and every invalid value rejected by name."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError

import modelopt_dms as dms
from modelopt_dms import DMSConfig
from modelopt_dms.config import DMS_BLOCK_FORMAT_VERSION, DMSBlockError


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


# ------------------------------------------------------------------ the config.json block round trip


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"window_size": 64, "target_compression_ratio": 4.0},
        {"decision": "borrowed_neuron", "granularity": "layer", "temperature": 0.5, "noise_seed": 7},
        {"logit_scale": 50.0, "logit_offset": -2.5, "layers": [0, 2]},
    ],
)
def test_block_round_trip_through_dmsconfig(cfg):
    config = DMSConfig(**cfg)
    layers = config.layers if config.layers is not None else [0, 1, 2]
    block = config.to_block(layers, fp8_kv=True)
    assert block["format_version"] == DMS_BLOCK_FORMAT_VERSION and block["kv_cache"]["fp8"] is True
    # every DMSConfig field is in the block: a new setting needs no writer/reader change
    assert set(DMSConfig.model_fields) <= set(block)
    back = DMSConfig.from_block(json.loads(json.dumps(block)), num_layers=3)
    assert back == config
    assert DMSConfig.from_block(block).layers == layers  # without the layer count: explicit list


def _block(**changes):
    block = DMSConfig(window_size=16).to_block([0, 1])
    for key, value in changes.items():
        if value is _DROP:
            block.pop(key)
        else:
            block[key] = value
    return block


_DROP = object()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"window_size": _DROP}, r"lacks the key\(s\) \['window_size'\]"),
        ({"surprise": 1}, r"dms_config\.surprise: unknown key"),
        ({"decision": "neuron"}, r"dms_config\.decision"),
        ({"window_size": True}, r"dms_config\.window_size"),
        ({"window_size": "64"}, r"dms_config\.window_size"),
        ({"format_version": 1.0}, r"format version 1\.0"),
        ({"format_version": True}, r"format version True"),
        ({"format_version": 2}, r"format version 2"),
        ({"method": "h2o"}, r"method"),
        ({"kv_cache": _DROP}, r"kv_cache"),
    ],
)
def test_bad_blocks_are_refused_naming_the_key(changes, match):
    with pytest.raises(DMSBlockError, match=match):
        DMSConfig.from_block(_block(**changes), where="x/config.json")


def test_a_block_that_is_not_a_mapping_is_refused():
    with pytest.raises(DMSBlockError, match="must be a mapping, got list"):
        DMSConfig.from_block([1, 2])


def test_config_is_frozen_and_strict():
    cfg = DMSConfig(window_size=8)
    with pytest.raises(ValidationError):
        cfg.window_size = 9
    with pytest.raises(ValidationError, match="window_size"):
        DMSConfig(window_size=True)
    assert DMSConfig(temperature=1).temperature == 1  # an int is a valid float

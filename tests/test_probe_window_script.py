"""benchmarks/probe_window.py: ``set_window`` changes the window every DMS layer runs with."""

from __future__ import annotations

import pytest
import torch
from conftest import benchmark_script, tiny_model

import modelopt_dms as dms
from modelopt_dms.cache import DMSCache, cache_stats


@pytest.fixture
def probe(monkeypatch):
    return benchmark_script("probe_window", monkeypatch, "common")


def _run(model, ids):
    cache = DMSCache()
    with dms.fixed_eviction(model, 3):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    return logits, cache_stats(cache)


def test_set_window_moves_every_layer_and_the_cache_follows(probe):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 40))
    model = dms.apply_dms(tiny_model("llama"), {"window_size": 4})
    with dms.eviction_disabled(model):
        dense = model(input_ids=ids, use_cache=False).logits
    short, short_stats = _run(model, ids)
    assert float(short_stats["compression_ratio"]) > 1.5  # keep 1 of 3 beyond a 5-token window
    assert not torch.allclose(short, dense, atol=1e-4)

    probe.set_window(model, 64)  # longer than the text: nothing can leave the window
    assert {m.dms_config.window_size for m in dms.dms_modules(model)} == {64}
    assert dms.dms_config(model).logit_offset == 5.0  # only the window changed
    wide, wide_stats = _run(model, ids)
    assert float(wide_stats["compression_ratio"]) == pytest.approx(1.0)
    torch.testing.assert_close(wide, dense, atol=1e-5, rtol=1e-5)

    probe.set_window(model, 4)
    again, _ = _run(model, ids)
    torch.testing.assert_close(again, short)

"""ONNX step-graph export, the ONNX Runtime driver with its compact cache, and the serving bundles.

The ORT driver is compared with PyTorch: the eval-mode masked reference ``model(ids).logits`` for one
step, and ``model.generate`` (which uses ``DMSCache``) for greedy decoding, token by token, logits at every
step and per-row kept counts. Adapters are randomised with window 3 so that many tokens are evicted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model

import modelopt_dms as dms
from modelopt_dms.export.onnx import ONNX_FORMAT, export_onnx, onnx_io_names
from modelopt_dms.export.onnx_runtime import OnnxDMSGenerator

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 3
ATOL = 1e-4


def dms_model(family="llama", decision="adapter", granularity="head", layers=None, seed=0):
    model = dms.apply_dms(
        tiny_model(family, seed=seed),
        {"window_size": WINDOW, "decision": decision, "granularity": granularity, "layers": layers},
    )
    torch.manual_seed(seed + 100)
    for m in dms.dms_modules(model):
        if decision == "adapter":
            torch.nn.init.normal_(m.dms_adapter.proj.weight, std=0.05)
    model.generation_config.eos_token_id = None  # always decode the full number of steps
    model.generation_config.pad_token_id = 0
    return model


def prompt(length, seed=1, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=gen)


_EXPORTS: dict[tuple, tuple] = {}


def exported(tmp_path_factory, family="llama", **kw):
    """(model, onnx path), exported once per configuration for the whole module."""
    key = (family, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _EXPORTS:
        model = dms_model(family, **kw)
        path = tmp_path_factory.mktemp("onnx") / f"{family}.onnx"
        export_onnx(model, path)
        _EXPORTS[key] = (model, path)
    return _EXPORTS[key]


def hf_greedy(model, ids, steps):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),  # no token is padding (pad id 0 may occur in prompts)
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    logits = [x.float().numpy() for x in out.logits]
    return tokens, logits, dms.cache_stats(out.past_key_values)


def empty_cache_feeds(model, ids):
    cfg = model.config
    feeds = {"input_ids": ids.numpy(), "position_ids": np.arange(ids.shape[1])[None].repeat(ids.shape[0], 0)}
    for i in range(cfg.num_hidden_layers):
        kv = (ids.shape[0], cfg.num_key_value_heads, 0, cfg.head_dim)
        row = kv[:3]
        feeds |= {
            f"past_key_{i}": np.zeros(kv, np.float32),
            f"past_value_{i}": np.zeros(kv, np.float32),
            f"past_pos_{i}": np.zeros(row, np.int64),
            f"past_flag_{i}": np.zeros(row, bool),
            f"past_valid_{i}": np.zeros(row, bool),
            f"past_last_{i}": np.zeros(row, bool),
        }
    return feeds


# ------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_one_step_matches_masked_reference(tmp_path_factory, family):
    import onnxruntime as ort

    model, path = exported(tmp_path_factory, family)
    ids = prompt(24)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    decisions = dms.collect_decisions(model)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, empty_cache_feeds(model, ids)), strict=True))
    assert out["logits"].shape == ref.shape
    np.testing.assert_allclose(out["logits"], ref, atol=ATOL, rtol=0)
    for i, dec in decisions.items():
        assert np.array_equal(out[f"decisions_{i}"], dec.bool().numpy())
    assert 0.2 < np.mean([out[f"decisions_{i}"].mean() for i in decisions]) < 0.8  # real eviction


def test_graph_io_and_metadata(tmp_path_factory):
    model, path = exported(tmp_path_factory, "llama")
    proto = onnx.load(str(path), load_external_data=False)
    inputs, outputs = onnx_io_names(model.config.num_hidden_layers)
    assert [i.name for i in proto.graph.input] == inputs
    assert [o.name for o in proto.graph.output] == outputs
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["format"] == ONNX_FORMAT
    assert int(meta["window_size"]) == WINDOW and int(meta["num_layers"]) == 2
    assert json.loads(meta["dms_config"])["decision"] == "adapter"
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert dims["past_key_1"] == ["batch", 2, "past_len_1", 16]
    assert dims["input_ids"] == ["batch", "new_tokens"]
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types["past_flag_0"] == onnx.TensorProto.BOOL and types["past_pos_0"] == onnx.TensorProto.INT64


# ------------------------------------------------------------------------------------- driver vs PyTorch
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_decode_matches_pytorch_dmscache(tmp_path_factory, family):
    model, path = exported(tmp_path_factory, family)
    ids = prompt(12, seed=2)
    tokens, logits, stats = hf_greedy(model, ids, 32)
    gen = OnnxDMSGenerator(path, window_size=WINDOW, num_layers=2)
    res = gen.generate(ids.numpy(), max_new_tokens=32)
    assert np.array_equal(res.tokens, tokens)
    assert len(res.step_logits) == len(logits) == 32
    for a, b in zip(res.step_logits, logits, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    assert np.array_equal(res.tokens_kept, stats["tokens_kept"].numpy())
    assert np.array_equal(res.tokens_seen, stats["tokens_seen"].numpy())
    assert res.compression_ratio == pytest.approx(stats["compression_ratio"])
    assert res.compression_ratio > 1.3  # tokens really were evicted
    assert (res.tokens_kept > WINDOW + 1).all()  # the window itself is always kept


def test_chunked_prefill_equals_one_shot_and_pytorch(tmp_path_factory):
    model, path = exported(tmp_path_factory, "llama")
    ids = prompt(23, seed=3)
    tokens, logits, stats = hf_greedy(model, ids, 8)
    for chunk in (1, 4, 7):
        res = OnnxDMSGenerator(path, prefill_chunk_size=chunk).generate(ids.numpy(), max_new_tokens=8)
        assert np.array_equal(res.tokens, tokens), chunk
        np.testing.assert_allclose(np.stack(res.step_logits), np.stack(logits), atol=ATOL, rtol=0)
        assert np.array_equal(res.tokens_kept, stats["tokens_kept"].numpy()), chunk


def test_ragged_batch_equals_single_rows(tmp_path_factory):
    _, path = exported(tmp_path_factory, "llama")
    rows = [prompt(9, seed=4)[0].tolist(), prompt(15, seed=5)[0].tolist()]
    gen = OnnxDMSGenerator(path, prefill_chunk_size=6)
    both = gen.generate(rows, max_new_tokens=10)
    for b, row in enumerate(rows):
        single = OnnxDMSGenerator(path).generate([row], max_new_tokens=10)
        assert np.array_equal(both.tokens[b], single.tokens[0])
        assert np.array_equal(both.tokens_kept[:, b], single.tokens_kept[:, 0])
        for x, y in zip(both.step_logits, single.step_logits, strict=True):
            np.testing.assert_allclose(x[b], y[0], atol=ATOL, rtol=0)


def test_multi_turn_carries_pending_flags(tmp_path_factory):
    _, path = exported(tmp_path_factory, "llama")
    p1, p2 = prompt(10, seed=6)[0].tolist(), prompt(5, seed=7)[0].tolist()
    gen = OnnxDMSGenerator(path)
    first = gen.generate([p1], max_new_tokens=6)
    second = gen.generate([p2], max_new_tokens=6, continue_cache=True)
    whole = p1 + first.tokens[0].tolist() + p2
    ref = OnnxDMSGenerator(path, prefill_chunk_size=4).generate([whole], max_new_tokens=6)
    assert np.array_equal(second.tokens, ref.tokens)
    assert np.array_equal(second.tokens_kept, ref.tokens_kept)
    assert int(second.tokens_seen[0, 0, 0]) == len(whole) + 5


def test_borrowed_neuron_layer_granularity(tmp_path_factory):
    model, path = exported(tmp_path_factory, "mistral", decision="borrowed_neuron", granularity="layer")
    ids = prompt(10, seed=8)
    tokens, logits, stats = hf_greedy(model, ids, 16)
    res = OnnxDMSGenerator(path).generate(ids.numpy(), max_new_tokens=16)
    assert np.array_equal(res.tokens, tokens)
    np.testing.assert_allclose(np.stack(res.step_logits), np.stack(logits), atol=ATOL, rtol=0)
    assert np.array_equal(res.tokens_kept, stats["tokens_kept"].numpy())
    assert (res.tokens_kept == res.tokens_kept[:, :, :1]).all()  # layer granularity: equal rows
    assert res.compression_ratio > 1.0


def test_partial_layers(tmp_path_factory):
    model, path = exported(tmp_path_factory, "qwen2", layers=[1])
    ids = prompt(10, seed=9)
    tokens, logits, stats = hf_greedy(model, ids, 12)
    res = OnnxDMSGenerator(path).generate(ids.numpy(), max_new_tokens=12)
    assert np.array_equal(res.tokens, tokens)
    np.testing.assert_allclose(np.stack(res.step_logits), np.stack(logits), atol=ATOL, rtol=0)
    assert res.tokens_kept.shape == tuple(stats["tokens_kept"].shape) == (1, 1, 2)
    assert np.array_equal(res.tokens_kept, stats["tokens_kept"].numpy())


def test_refuses_non_dms_and_quantized(tmp_path):
    with pytest.raises(ValueError, match="DMS"):
        export_onnx(tiny_model("llama"), tmp_path / "plain.onnx")
    from modelopt_dms import quantize_fp8

    model = quantize_fp8(dms_model("llama"), [prompt(8)])
    with pytest.raises(ValueError, match="quantized"):
        export_onnx(model, tmp_path / "fp8.onnx")
    assert not (tmp_path / "plain.onnx").exists() and not (tmp_path / "fp8.onnx").exists()


def test_driver_checks_arguments(tmp_path_factory):
    _, path = exported(tmp_path_factory, "llama")
    with pytest.raises(ValueError, match="window_size"):
        OnnxDMSGenerator(path, window_size=WINDOW + 1)
    with pytest.raises(ValueError, match="num_layers"):
        OnnxDMSGenerator(path, num_layers=3)
    gen = OnnxDMSGenerator(path)
    gen.step(np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match="batch"):
        gen.step(np.zeros((2, 1), np.int64))


def test_driver_binds_the_cache_tensors_in_place_and_shares_the_torch_bookkeeping(tmp_path_factory):
    """The graph reads each layer's own storage (no per-step copy of the cache), and the driver's
    cache is the PyTorch cache layer (the same batched bookkeeping, no per-row Python loop)."""
    from modelopt_dms.cache.layer import DMSCacheLayer

    _, path = exported(tmp_path_factory, "llama")
    gen = OnnxDMSGenerator(path, prefill_chunk_size=4)
    gen.generate(prompt(9, batch=3), max_new_tokens=5)
    for i, layer in enumerate(gen._layers):
        assert isinstance(layer, DMSCacheLayer)
        past = gen._past(i, layer)
        assert past[f"past_key_{i}"] is layer.kv.k and past[f"past_value_{i}"] is layer.kv.v
        assert past[f"past_pos_{i}"] is layer.book.pos and past[f"past_flag_{i}"] is layer.book.flag
    bound = []
    real_bind = type(gen.session.io_binding()).bind_input

    def spy(self, name, device, device_id, element_type, shape, ptr):
        bound.append((name, ptr))
        return real_bind(self, name, device, device_id, element_type, shape, ptr)

    import onnxruntime as ort

    ort.IOBinding.bind_input, saved = spy, ort.IOBinding.bind_input
    try:
        gen.step(np.ones((3, 1), np.int64))
    finally:
        ort.IOBinding.bind_input = saved
    ptrs = dict(bound)
    assert any(name.startswith("past_key_") for name in ptrs), "the cache must be bound by address"
    for i, layer in enumerate(gen._layers):
        if f"past_key_{i}" in ptrs:
            assert ptrs[f"past_key_{i}"] == layer.kv.k.data_ptr()

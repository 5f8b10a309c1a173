"""FP8 quantization of DMS models and the deployable Hugging Face export.

* ``mtq.quantize`` gives every DMS attention FP8 ``k_bmm_quantizer`` / ``v_bmm_quantizer`` (and the
  decision adapters no quantizer at all);
* a :class:`~modelopt_dms.DMSCache` of a KV-quantized model stores ``float8_e4m3fn`` and still matches
  the masked reference;
* ``dms -> quantize -> calibrate`` survives ``mto.save``/``mto.restore`` and HF checkpointing, also in a
  fresh process; quantize-then-dms is refused;
* ``export_hf_checkpoint`` round trips (plain ``from_pretrained`` for unquantized exports,
  ``load_exported`` for FP8 ones), refuses what it must, leaves nothing behind on failure, and is
  reachable from the ``modelopt-dms export`` command.

All models are tiny (2 layers) and their decision adapters are random, so tokens really get evicted.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import pytest
import torch
from conftest import run_fresh_script, tiny_model, write_tiny_workspace
from modelopt.torch.opt.conversion import ApplyModeError
from modelopt.torch.quantization.nn import TensorQuantizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import modelopt_dms as dms
from modelopt_dms import config as dms_config_module
from modelopt_dms import fileio
from modelopt_dms.cli import main as cli_main
from modelopt_dms.plugins.quantization import QuantDMSAttention, kv_fp8_scales

FAMILIES = ["llama", "qwen3"]
WINDOW = 3
FP8_MAX = 448.0
BLOCK_KEYS = {"format_version", "decision", "window_size", "logit_scale", "logit_offset", "granularity"}
BLOCK_KEYS |= {"layers"}
CHAIN_MODES = ["dms", "quantize", "max_calibrate"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:  # overrides conftest's (all four families): llama and qwen3 here
    return request.param


# ------------------------------------------------------------------------------------ helpers
def _dms_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny DMS model (window 3) whose adapters are random, so that it evicts in eval mode."""
    model = tiny_model(family, seed=seed)
    dms.apply_dms(model, {"window_size": WINDOW})
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in dms.dms_modules(model):
            torch.nn.init.normal_(m.dms_adapter.proj.weight, std=0.05, generator=gen)
    return model.eval()


def _inputs(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def _calib() -> list[torch.Tensor]:
    return [torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(s)) for s in (100, 101)]


def _forward_loop(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for ids in _calib():
            model(input_ids=ids, use_cache=False)


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return logits, {k: v.clone().contiguous() for k, v in dms.collect_decisions(model).items()}


def _assert_same(ref, got, atol: float = 0.0) -> None:
    (ref_logits, ref_dec), (logits, dec) = ref, got
    diff = (ref_logits - logits).abs().max().item()
    if atol == 0.0:
        assert torch.equal(ref_logits, logits), f"logits differ: max abs diff {diff}"
    else:
        assert diff <= atol, f"logits differ: max abs diff {diff} > {atol}"
    assert sorted(ref_dec) == sorted(dec)
    for layer in ref_dec:
        assert torch.equal(ref_dec[layer], dec[layer]), f"decisions of layer {layer} differ"


def _assert_evicts(decisions: dict[int, torch.Tensor]) -> None:
    rate = torch.stack(list(decisions.values())).mean().item()
    assert 0.05 < rate < 0.95, f"eviction rate {rate}: the test model must evict some but not all tokens"


def _kv_quantizers(model: torch.nn.Module) -> list[TensorQuantizer]:
    return [q for m in dms.dms_modules(model) for q in (m.k_bmm_quantizer, m.v_bmm_quantizer)]


def _enabled_quantizer_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def _cache_run(model: torch.nn.Module, ids: torch.Tensor, prefill: int = 15):
    """Prefill ``prefill`` tokens into a DMSCache, then decode the rest one token at a time."""
    cache = dms.DMSCache(block_size=4)
    with torch.no_grad():
        parts = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            parts.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(parts, dim=1), cache


def _stored_dtypes(model: torch.nn.Module, cache: dms.DMSCache, batch: int = 2) -> set[torch.dtype]:
    dtypes = set()
    for m in dms.dms_modules(model):
        for b in range(batch):
            for h in range(m.num_kv_heads):
                row = cache.row_state(int(m.layer_idx), b, h)
                dtypes |= {row["k"].dtype, row["v"].dtype}
    return dtypes


def _fp8_model(family: str = "llama", weights: bool = True, kv_cache: bool = True) -> torch.nn.Module:
    return dms.quantize_fp8(_dms_model(family), _calib(), weights=weights, kv_cache=kv_cache)


def _modes(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in mto.modelopt_state(model)["modelopt_state_dict"]]


def _save_expected(result, path: Path) -> None:
    logits, decisions = result
    save_file({"logits": logits, **{f"dec.{k}": v for k, v in decisions.items()}}, str(path))


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ------------------------------------------------------------------------------------ 1. quantizers
def test_fp8_quantize_gives_dms_attention_kv_quantizers(family):
    model = _dms_model(family)
    ids = _inputs()
    ref_logits, ref_dec = _run(model, ids)
    _assert_evicts(ref_dec)
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if "dms_adapter" in n}

    model = mtq.quantize(model, dms.fp8_config(), _forward_loop)
    assert _modes(model) == CHAIN_MODES
    mods = dms.dms_modules(model)
    assert [int(m.layer_idx) for m in mods] == [0, 1]
    for m in mods:
        assert isinstance(m, QuantDMSAttention) and isinstance(m, dms.DMSAttention)
        for q in (m.k_bmm_quantizer, m.v_bmm_quantizer):
            assert isinstance(q, TensorQuantizer)
            assert q.is_enabled and q.num_bits == (4, 3)
            assert q.amax is not None and q.amax.numel() == 1
            assert torch.isfinite(q.amax).all() and float(q.amax) > 0, "calibration must set amax"
        assert kv_fp8_scales(m) == pytest.approx(
            (float(m.k_bmm_quantizer.amax) / FP8_MAX, float(m.v_bmm_quantizer.amax) / FP8_MAX)
        )

    # the decision adapters hold no quantizer and were not modified
    for m in mods:
        assert not any(isinstance(sub, TensorQuantizer) for sub in m.dms_adapter.modules())
    for name, sub in model.named_modules():
        assert not ("dms_adapter" in name and isinstance(sub, TensorQuantizer)), name
    for n, p in model.named_parameters():
        if "dms_adapter" in n:
            assert torch.equal(p, adapters_before[n]), n

    q_logits, q_dec = _run(model, ids)
    # the layer-0 decisions come from the (unquantized) embeddings: quantization cannot change them
    assert torch.equal(q_dec[0], ref_dec[0])
    assert not torch.equal(q_logits, ref_logits)

    for q in _kv_quantizers(model):
        q.disable()
    no_kv_logits, _ = _run(model, ids)
    assert (no_kv_logits - q_logits).abs().max().item() > 1e-5, "the k/v quantizers must be applied"
    for q in _kv_quantizers(model):
        q.enable()
    _assert_same((q_logits, q_dec), _run(model, ids))


def test_kv_only_fp8_leaves_decisions_and_disables_cleanly(family):
    plain = _dms_model(family)
    ids = _inputs()
    ref = _run(plain, ids)

    model = _fp8_model(family, weights=False, kv_cache=True)
    expected = {f"model.layers.{i}.self_attn.{w}_bmm_quantizer" for i in (0, 1) for w in "kv"}
    assert _enabled_quantizer_names(model) == expected, "KV-only FP8 must enable only the k/v quantizers"
    q_logits, q_dec = _run(model, ids)
    assert torch.equal(q_dec[0], ref[1][0]), "layer-0 decisions are computed before attention"
    assert not torch.equal(q_logits, ref[0]), "FP8 keys/values must change the logits"

    for q in _kv_quantizers(model):
        q.disable()
    _assert_same(ref, _run(model, ids))  # nothing else is quantized: disabled == unquantized exactly
    for q in _kv_quantizers(model):
        q.enable()
    _assert_same((q_logits, q_dec), _run(model, ids))


# ------------------------------------------------------------------------------------ 2. FP8 KV storage
def test_dms_cache_stores_fp8_and_matches_masked_reference(family):
    model = _fp8_model(family, weights=False, kv_cache=True)
    ids = _inputs()
    ref, dec = _run(model, ids)
    _assert_evicts(dec)
    got, cache = _cache_run(model, ids)
    assert _stored_dtypes(model, cache) == {torch.float8_e4m3fn}
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, f"FP8 DMSCache vs masked reference: max abs diff {diff}"
    stats = dms.cache_stats(cache)
    assert (stats["tokens_kept"] < stats["tokens_seen"]).any(), "the cache must have evicted tokens"
    head_dim = dms.dms_modules(model)[0].head_dim
    assert stats["kv_bytes_kept"] == 2 * int(stats["tokens_kept"].sum()) * head_dim * 1  # one byte each


def test_dms_cache_without_kv_quantization_stays_fp32():
    model = _fp8_model("llama", weights=True, kv_cache=False)
    assert not any(q.is_enabled for q in _kv_quantizers(model))
    ids = _inputs()
    ref, _ = _run(model, ids)
    got, cache = _cache_run(model, ids)
    assert _stored_dtypes(model, cache) == {torch.float32}
    assert (got - ref).abs().max().item() <= 1e-4


def test_fp8_cache_bytes_are_a_quarter(family):
    """Same kept tokens (fixed eviction pattern): FP8 storage holds exactly 1/4 of the fp32 bytes."""
    ids = _inputs()
    fp8 = _fp8_model(family, weights=False, kv_cache=True)
    plain = _dms_model(family)
    with dms.fixed_eviction(fp8, 2), dms.fixed_eviction(plain, 2):
        _, c8 = _cache_run(fp8, ids)
        _, c32 = _cache_run(plain, ids)
    s8, s32 = dms.cache_stats(c8), dms.cache_stats(c32)
    assert torch.equal(s8["tokens_seen"], s32["tokens_seen"])
    assert torch.equal(s8["tokens_kept"], s32["tokens_kept"])
    assert (s8["tokens_kept"] < s8["tokens_seen"]).all()
    assert s8["kv_bytes_allocated"] * 4 == s32["kv_bytes_allocated"]
    assert s8["kv_bytes_kept"] * 4 == s32["kv_bytes_kept"]
    # the dense baseline counts the fp32 compute dtype for both (FP8 storage is a further saving)
    layers, (batch, seq), kv_heads, head_dim = 2, ids.shape, 2, 16
    dense = layers * batch * kv_heads * 2 * seq * head_dim * 4
    assert s8["kv_bytes_dense"] == s32["kv_bytes_dense"] == dense
    assert s8["compression_ratio"] == pytest.approx(s32["compression_ratio"])


# ------------------------------------------------------------------------------------ 3. chained save/restore
def _amax(model: torch.nn.Module) -> list[float]:
    return [float(q.amax) for q in _kv_quantizers(model)]


def test_chain_mto_save_restore(family, tmp_path):
    model = _fp8_model(family)
    ids = _inputs()
    ref = _run(model, ids)
    mto.save(model, tmp_path / "model.pth")
    fresh = mto.restore(tiny_model(family, seed=99), tmp_path / "model.pth").eval()
    assert dms.is_dms_model(fresh)
    assert _modes(fresh) == CHAIN_MODES
    assert _enabled_quantizer_names(fresh) == _enabled_quantizer_names(model)
    assert _amax(fresh) == _amax(model)
    _assert_same(ref, _run(fresh, ids))
    _, cache = _cache_run(fresh, ids)
    assert _stored_dtypes(fresh, cache) == {torch.float8_e4m3fn}


def test_chain_hf_save_pretrained_from_pretrained(family, tmp_path):
    mto.enable_huggingface_checkpointing()
    model = _fp8_model(family)
    ids = _inputs()
    ref = _run(model, ids)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "modelopt_state.pth").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert dms.is_dms_model(fresh)
    assert _amax(fresh) == _amax(model)
    _assert_same(ref, _run(fresh, ids))


# ------------------------------------------------------------------------------------ 4. quantize-then-dms
@pytest.mark.parametrize("cfg_name", ["fp8_weights_kv", "fp8_weights_only"])
def test_quantize_then_dms_is_refused(cfg_name, family):
    model = tiny_model(family)
    cfg = dms.fp8_config() if cfg_name == "fp8_weights_kv" else mtq.FP8_DEFAULT_CFG
    model = mtq.quantize(model, cfg, _forward_loop)
    ids = _inputs()
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    modes = _modes(model)
    with pytest.raises(ApplyModeError, match=r"apply 'dms' first"):
        dms.apply_dms(model, {"window_size": WINDOW})
    assert not dms.is_dms_model(model)
    assert _modes(model) == modes
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)
    assert not any("dms_adapter" in n for n, _ in model.named_modules())
    with torch.no_grad():
        after = model(ids, use_cache=False).logits
    assert torch.equal(before, after), "a refused apply_dms must leave the model usable and unchanged"


# ------------------------------------------------------------------------------------ 5. export round trips
def _check_block(block: dict, fp8: bool) -> None:
    assert BLOCK_KEYS <= set(block)
    assert block["format_version"] == dms_config_module.DMS_BLOCK_FORMAT_VERSION == 1
    assert block["method"] == "dms"
    assert block["decision"] == "adapter"
    assert block["window_size"] == WINDOW
    assert block["logit_scale"] == 100.0 and block["logit_offset"] == 5.0
    assert block["granularity"] == "head"
    assert block["layers"] == [0, 1]
    assert block["kv_cache"]["fp8"] is fp8


def test_export_unquantized_round_trip(family, tmp_path):
    model = _dms_model(family)
    ids = _inputs()
    ref = _run(model, ids)
    _assert_evicts(ref[1])
    out = dms.export_hf_checkpoint(model, tmp_path / "export", tokenizer=None)
    assert out == tmp_path / "export"
    assert _siblings(out) == ["export"], "no temp folder may be left behind"
    files = sorted(os.listdir(out))
    assert "config.json" in files and "model.safetensors" in files
    assert "hf_quant_config.json" not in files and "modelopt_state.pth" not in files
    cfg = json.loads((out / "config.json").read_text())
    _check_block(cfg["dms_config"], fp8=False)
    assert cfg["architectures"] == [type(model).__name__]
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.dms_adapter.proj.weight" in tensors
    _assert_same(ref, _run(model, ids))  # exporting did not touch the model

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no remote code
    assert type(loaded).__name__ == type(model).__name__
    assert dms.is_dms_model(loaded)
    assert [m.dms_config.window_size for m in dms.dms_modules(loaded)] == [WINDOW, WINDOW]
    _assert_same(ref, _run(loaded, ids))

    reloaded, tok = dms.load_exported(out)
    assert tok is None
    _assert_same(ref, _run(reloaded, ids))


def test_exported_model_saves_and_reloads_with_hf_checkpointing(tmp_path):
    """A model loaded from an export can be saved again (modelopt state) without applying DMS twice."""
    mto.enable_huggingface_checkpointing()
    model = _dms_model("llama")
    ids = _inputs()
    ref = _run(model, ids)
    dms.export_hf_checkpoint(model, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert len(dms.dms_modules(again)) == 2
    _assert_same(ref, _run(again, ids))
    dms.export_hf_checkpoint(again, tmp_path / "export2")
    _assert_same(ref, _run(AutoModelForCausalLM.from_pretrained(tmp_path / "export2").eval(), ids))


def test_export_fp8_round_trip(family, tmp_path):
    model = _fp8_model(family, weights=True, kv_cache=True)
    ids = _inputs()
    ref = _run(model, ids)
    enabled = _enabled_quantizer_names(model)
    out = dms.export_hf_checkpoint(model, tmp_path / "export")
    assert _siblings(out) == ["export"]
    _assert_same(ref, _run(model, ids))  # the exporter works on a copy
    assert _enabled_quantizer_names(model) == enabled

    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and quant["kv_cache_quant_algo"] == "FP8"
    cfg = json.loads((out / "config.json").read_text())
    _check_block(cfg["dms_config"], fp8=True)
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.dms_adapter.proj.weight"].dtype == torch.float32
    for i, m in enumerate(dms.dms_modules(model)):
        k_scale = tensors[f"model.layers.{i}.self_attn.k_proj.k_scale"]
        v_scale = tensors[f"model.layers.{i}.self_attn.v_proj.v_scale"]
        assert float(k_scale) == pytest.approx(float(m.k_bmm_quantizer.amax) / FP8_MAX, rel=1e-6)
        assert float(v_scale) == pytest.approx(float(m.v_bmm_quantizer.amax) / FP8_MAX, rel=1e-6)

    loaded, tok = dms.load_exported(out)
    assert tok is None and not loaded.training
    assert dms.is_dms_model(loaded)
    assert _enabled_quantizer_names(loaded) == enabled
    for a, b in zip(_kv_quantizers(model), _kv_quantizers(loaded), strict=True):
        assert b.is_enabled and b.num_bits == (4, 3)
        assert float(b.amax) == pytest.approx(float(a.amax), rel=1e-6)
    _assert_same(ref, _run(loaded, ids), atol=1e-5)

    got, cache = _cache_run(loaded, ids)
    assert _stored_dtypes(loaded, cache) == {torch.float8_e4m3fn}
    assert (got - ref[0]).abs().max().item() <= 1e-4


def test_export_kv_only_fp8_round_trip(tmp_path):
    """KV-only FP8 (``quantize_fp8(weights=False)``, CLI ``--quantize fp8-kv``) must load back too."""
    model = _fp8_model("llama", weights=False, kv_cache=True)
    ids = _inputs()
    ref = _run(model, ids)
    out = dms.export_hf_checkpoint(model, tmp_path / "export")
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["kv_cache_quant_algo"] == "FP8"
    assert json.loads((out / "config.json").read_text())["dms_config"]["kv_cache"]["fp8"] is True
    loaded, _ = dms.load_exported(out)
    assert _enabled_quantizer_names(loaded) == _enabled_quantizer_names(model)
    _assert_same(ref, _run(loaded, ids), atol=1e-5)
    _, cache = _cache_run(loaded, ids)
    assert _stored_dtypes(loaded, cache) == {torch.float8_e4m3fn}


# ------------------------------------------------------------------------------------ 3+5. fresh process
_FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import modelopt.torch.opt as mto
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import modelopt_dms as dms

    root = Path(sys.argv[1])
    ids = load_file(str(root / "inputs.safetensors"))["ids"]
    results = {}

    def check(key, load, expected, fp8_cache):
        try:
            model = load().eval()
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits
            dec = dms.collect_decisions(model)
            same = sorted(f"dec.{k}" for k in dec) == sorted(k for k in expected if k != "logits")
            same = same and all(torch.equal(v, expected[f"dec.{k}"]) for k, v in dec.items())
            cache = dms.DMSCache(block_size=4)
            with torch.no_grad():
                model(ids, past_key_values=cache, use_cache=True)
            dtypes = sorted({str(layer.kv.codec.dtype) for layer in cache.dms_layers().values()})
            results[key] = {
                "is_dms": dms.is_dms_model(model),
                "logits_max_diff": (logits - expected["logits"]).abs().max().item(),
                "logits_equal": torch.equal(logits, expected["logits"]),
                "decisions_equal": same,
                "cache_dtypes": dtypes,
                "fp8_cache_expected": fp8_cache,
                "error": None,
            }
        except Exception as err:  # reported per case by the parent
            results[key] = {"error": f"{type(err).__name__}: {err}"}

    families = sys.argv[2:]
    # 1. plain transformers on an unquantized export (before any modelopt HF patching)
    for fam in families:
        d = root / fam
        plain = load_file(str(d / "expected_plain.safetensors"))
        check(f"{fam}/export_from_pretrained", lambda: AutoModelForCausalLM.from_pretrained(d / "export"),
              plain, False)
        check(f"{fam}/export_load_exported", lambda: dms.load_exported(d / "export")[0], plain, False)
        fp8 = load_file(str(d / "expected_fp8.safetensors"))
        check(f"{fam}/export_fp8_load_exported", lambda: dms.load_exported(d / "export_fp8")[0], fp8, True)
    # 2. the dms -> quantize -> calibrate chain through modelopt and HF checkpoints
    mto.enable_huggingface_checkpointing()
    for fam in families:
        d = root / fam
        fp8 = load_file(str(d / "expected_fp8.safetensors"))

        def blank():
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d / "base"))

        check(f"{fam}/chain_mto_restore", lambda: mto.restore(blank(), d / "chain.pth"), fp8, True)
        check(f"{fam}/chain_hf", lambda: AutoModelForCausalLM.from_pretrained(d / "chain_hf"), fp8, True)
    (root / "results.json").write_text(json.dumps(results))
    """
)

FRESH_CASES = [
    ("export_from_pretrained", 0.0),
    ("export_load_exported", 0.0),
    ("export_fp8_load_exported", 1e-5),
    ("chain_mto_restore", 0.0),
    ("chain_hf", 0.0),
]


@pytest.fixture(scope="module")
def fresh_results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fresh")
    ids = _inputs()
    save_file({"ids": ids}, str(root / "inputs.safetensors"))
    mto.enable_huggingface_checkpointing()
    for fam in FAMILIES:
        d = root / fam
        d.mkdir()
        tiny_model(fam).save_pretrained(d / "base")
        plain = _dms_model(fam)
        _save_expected(_run(plain, ids), d / "expected_plain.safetensors")
        dms.export_hf_checkpoint(plain, d / "export")
        quant = _fp8_model(fam)
        _save_expected(_run(quant, ids), d / "expected_fp8.safetensors")
        dms.export_hf_checkpoint(quant, d / "export_fp8")
        mto.save(quant, d / "chain.pth")
        quant.save_pretrained(d / "chain_hf")
    return run_fresh_script(root, _FRESH_SCRIPT, list(FAMILIES), timeout=300, OMP_NUM_THREADS="1")


@pytest.mark.parametrize(("case", "atol"), FRESH_CASES, ids=[c for c, _ in FRESH_CASES])
def test_fresh_process_round_trip(fresh_results, family, case, atol):
    result = fresh_results[f"{family}/{case}"]
    assert result["error"] is None, result["error"]
    assert result["is_dms"]
    if atol == 0.0:
        assert result["logits_equal"], f"max abs diff {result['logits_max_diff']}"
    else:
        assert result["logits_max_diff"] <= atol
    assert result["decisions_equal"]
    want = "torch.float8_e4m3fn" if result["fp8_cache_expected"] else "torch.float32"
    assert result["cache_dtypes"] == [want]


# ------------------------------------------------------------------------------------ 6. refusals
def test_export_never_replaces_a_users_folder_and_overwrites_only_its_own(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "user.txt").write_text("keep me")
    model = _dms_model("llama")
    for overwrite in (False, True):  # a user's folder is refused even with overwrite=True
        with pytest.raises(ValueError, match=r"not a hf_checkpoint folder written by modelopt-dms") as err:
            dms.export_hf_checkpoint(model, target, overwrite=overwrite)
        assert str(target) in str(err.value)
        assert os.listdir(target) == ["user.txt"] and (target / "user.txt").read_text() == "keep me"
        assert _siblings(target) == ["export"]

    mine = tmp_path / "mine"
    dms.export_hf_checkpoint(model, mine)
    with pytest.raises(FileExistsError, match="overwrite=True"):  # our own export: needs overwrite
        dms.export_hf_checkpoint(model, mine)
    other = _dms_model("llama", seed=3)  # a second overwrite replaces the first export
    dms.export_hf_checkpoint(other, mine, overwrite=True)
    assert sorted(_siblings(mine)) == ["export", "mine"]
    ids = _inputs()
    _assert_same(_run(other, ids), _run(AutoModelForCausalLM.from_pretrained(mine).eval(), ids))
    (mine / "notes.md").write_text("my notes")  # a user file added to an export makes it the user's
    with pytest.raises(ValueError, match=r"holds files modelopt-dms did not write \(notes.md\)"):
        dms.export_hf_checkpoint(model, mine, overwrite=True)
    assert (mine / "notes.md").read_text() == "my notes"


def test_export_into_existing_empty_directory(tmp_path):
    (tmp_path / "export").mkdir()
    dms.export_hf_checkpoint(_dms_model("llama"), tmp_path / "export")
    assert (tmp_path / "export" / "config.json").is_file()
    assert _siblings(tmp_path / "export") == ["export"]


def test_export_never_replaces_a_file(tmp_path):
    target = tmp_path / "export"
    target.write_text("not a folder")
    model = _dms_model("llama")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="exists and is not a folder"):
            dms.export_hf_checkpoint(model, target, overwrite=overwrite)
        assert target.read_text() == "not a folder"
    assert _siblings(target) == ["export"]


def _broken_save_pretrained(self, save_directory, *args, **kwargs):
    Path(save_directory).mkdir(parents=True, exist_ok=True)
    (Path(save_directory) / "model.safetensors").write_bytes(b"partial")
    raise OSError("disk full")


def _broken_mo_export(model, dtype=None, export_dir=".", **kwargs):
    Path(export_dir).mkdir(parents=True, exist_ok=True)
    (Path(export_dir) / "model.safetensors").write_bytes(b"partial")
    raise OSError("disk full")


@pytest.mark.parametrize("quantized", [False, True], ids=["unquantized", "fp8"])
def test_failed_export_leaves_nothing(quantized, tmp_path, monkeypatch):
    model = _fp8_model("llama") if quantized else _dms_model("llama")
    if quantized:
        import modelopt.torch.export

        monkeypatch.setattr(modelopt.torch.export, "export_hf_checkpoint", _broken_mo_export)
    else:
        monkeypatch.setattr(type(model), "save_pretrained", _broken_save_pretrained)
    with pytest.raises(OSError, match="disk full"):
        dms.export_hf_checkpoint(model, tmp_path / "sub" / "export")
    leftovers = sorted(p.name for p in (tmp_path / "sub").iterdir()) if (tmp_path / "sub").exists() else []
    assert leftovers == [], f"a failed export left {leftovers}"


def test_failed_overwrite_keeps_previous_export(tmp_path, monkeypatch):
    target = tmp_path / "export"
    first = _dms_model("llama", seed=0)
    dms.export_hf_checkpoint(first, target)
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    monkeypatch.setattr(type(first), "save_pretrained", _broken_save_pretrained)
    with pytest.raises(OSError, match="disk full"):
        dms.export_hf_checkpoint(_dms_model("llama", seed=3), target, overwrite=True)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    assert _siblings(target) == ["export"]


def test_interrupted_publish_keeps_previous_export(tmp_path, monkeypatch):
    """Where the file system swaps folders atomically an interrupt leaves the previous export in
    place; where it cannot, an interrupt between moving the old export aside and moving the new one
    in is repaired by the next export into the same place (the old one is put back first)."""
    target = tmp_path / "export"
    first = _dms_model("llama", seed=0)
    dms.export_hf_checkpoint(first, target)
    before = {f.name: f.read_bytes() for f in target.iterdir()}

    def interrupt(a, b):
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(fileio, "_exchange", interrupt)  # the atomic swap itself is interrupted
    with pytest.raises(KeyboardInterrupt):
        dms.export_hf_checkpoint(_dms_model("llama", seed=3), target, overwrite=True)
    monkeypatch.undo()
    assert _siblings(target) == ["export"]
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before

    real_replace = os.replace

    def replace_then_die(src, dst):
        if Path(dst) == target:  # the process "dies" once the previous export was moved aside:
            raise SystemExit("killed")  # neither the new one nor the restore reaches the target
        real_replace(src, dst)

    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)  # a file system without exchange
    monkeypatch.setattr(fileio.os, "replace", replace_then_die)
    with pytest.raises(SystemExit):
        fileio.publish_dir(fileio.staging_dir(target), target)  # no except-restore for a kill
    monkeypatch.undo()
    assert not target.exists() and any(".old" in n for n in _siblings(target))
    from modelopt_dms.outputs import clean_leftovers

    clean_leftovers(target)  # what the next export does first, under the lock
    assert _siblings(target) == ["export"]
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before


def _set_block_version(export_dir: Path, version) -> None:
    cfg_path = export_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dms_config"]["format_version"] = version
    cfg_path.write_text(json.dumps(cfg))


def test_unknown_block_version_is_refused(tmp_path):
    plain = dms.export_hf_checkpoint(_dms_model("llama"), tmp_path / "plain")
    fp8 = dms.export_hf_checkpoint(_fp8_model("llama"), tmp_path / "fp8")
    for d in (plain, fp8):
        _set_block_version(d, 999)
        with pytest.raises(ValueError, match=r"format version 999"):
            dms.load_exported(d)
    with pytest.raises(ValueError, match=r"format version 999"):
        AutoModelForCausalLM.from_pretrained(plain)


def test_export_refuses_non_dms_model(tmp_path):
    with pytest.raises(ValueError, match="apply the 'dms' mode"):
        dms.export_hf_checkpoint(tiny_model("llama"), tmp_path / "export")
    quantized = mtq.quantize(tiny_model("llama"), mtq.FP8_DEFAULT_CFG, _forward_loop)
    with pytest.raises(ValueError, match="apply the 'dms' mode"):
        dms.export_hf_checkpoint(quantized, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_load_exported_refuses_non_exports(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dms.load_exported(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dms.load_exported(tmp_path / "empty")
    tiny_model("llama").save_pretrained(tmp_path / "plain_hf")
    with pytest.raises(ValueError, match="no 'dms_config' block"):
        dms.load_exported(tmp_path / "plain_hf")


# ------------------------------------------------------------------------------------ 7. CLI
@pytest.fixture
def tiny_hf_dir(tmp_path, monkeypatch) -> tuple[Path, str]:
    """A local HF model directory (tiny llama + tiny tokenizer) and a glob of real text files."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # load_model sets it; restored afterwards
    return write_tiny_workspace(tmp_path)


def test_cli_export_unquantized(tiny_hf_dir, tmp_path):
    model_dir, _ = tiny_hf_dir
    out = tmp_path / "cli_export"
    assert cli_main(["export", "--model", str(model_dir), "--out", str(out), "--quantize", "none"]) == 0
    assert not (out / "hf_quant_config.json").exists()
    loaded, tok = dms.load_exported(out)
    assert tok is not None and len(tok) <= 128
    assert dms.is_dms_model(loaded)
    assert [m.dms_config.window_size for m in dms.dms_modules(loaded)] == [64, 64]  # the CLI default window
    ref_model, ref_tok = dms.load_model(model_dir)
    assert tok("def wrap(text):")["input_ids"] == ref_tok("def wrap(text):")["input_ids"]
    dms.apply_dms(ref_model, {"window_size": 64})
    ids = _inputs()
    _assert_same(_run(ref_model, ids), _run(loaded, ids))
    # refuses to overwrite without --overwrite (exit code 2, one line), overwrites with it
    assert cli_main(["export", "--model", str(model_dir), "--out", str(out)]) == 2
    assert cli_main(["export", "--model", str(model_dir), "--out", str(out), "--overwrite"]) == 0
    assert _siblings(out) == sorted(["cli_export", "text", "tiny_model"])


@pytest.mark.parametrize("quantize", ["fp8", "fp8-kv"])
def test_cli_export_trained_adapters_fp8(quantize, tiny_hf_dir, tmp_path):
    model_dir, text_glob = tiny_hf_dir
    trained = _dms_model("llama")  # same base weights as tiny_model("llama") in model_dir
    dms.save_adapters(trained, tmp_path / "adapters")
    out = tmp_path / "cli_fp8"
    argv = ["export", "--model", str(model_dir), "--adapters", str(tmp_path / "adapters"), "--out", str(out)]
    argv += ["--quantize", quantize, "--calib-glob", text_glob, "--calib-sequences", "2"]
    assert cli_main(argv) == 0
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["kv_cache_quant_algo"] == "FP8"
    assert quant["quant_algo"] == ("FP8" if quantize == "fp8" else None)

    # the same pipeline in Python
    from modelopt_dms.corpus import build_token_sequences

    ref_model, tok = dms.load_model(model_dir)
    dms.load_adapters(ref_model, tmp_path / "adapters")
    seqs = build_token_sequences(tok, text_glob, 256, "train", max_sequences=2)
    calib = [seqs[i : i + 1] for i in range(seqs.shape[0])]
    dms.quantize_fp8(ref_model, calib, weights=quantize == "fp8", kv_cache=True)
    ids = _inputs()
    ref = _run(ref_model, ids)
    _assert_evicts(ref[1])

    loaded, tok2 = dms.load_exported(out)
    assert tok2 is not None
    assert _amax(loaded) == pytest.approx(_amax(ref_model), rel=1e-6)
    _assert_same(ref, _run(loaded, ids), atol=1e-5)
    _, cache = _cache_run(loaded, ids)
    assert _stored_dtypes(loaded, cache) == {torch.float8_e4m3fn}

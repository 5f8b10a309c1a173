"""The serving-side scripts in ``deploy/``: the TensorRT engine build (refuses cleanly without TensorRT)
and the TensorRT-LLM bundle made from a unified HF export (contents, FP8-KV detection, refusals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_model
from test_onnx import dms_model, exported, prompt

import modelopt_dms as dms

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, env=None):
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_build_engine_reports_missing_tensorrt(tmp_path_factory):
    _, path = exported(tmp_path_factory, "llama")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; the missing-TensorRT path cannot be exercised")
    except ImportError:
        pass
    proc = run_script(ROOT / "deploy/tensorrt/build_engine.py", path, "--engine", path.with_suffix(".plan"))
    assert proc.returncode == 2, proc.stderr
    assert "tensorrt" in proc.stderr.lower() and "not" in proc.stderr.lower()
    assert not path.with_suffix(".plan").exists()


def test_build_engine_profiles():
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("build_engine", ROOT / "deploy/tensorrt/build_engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    opts = SimpleNamespace(
        max_batch=None,
        opt_batch=2,
        max_new_tokens=64,
        opt_new_tokens=1,
        min_past=0,
        opt_past=None,
        max_past=None,
    )
    ranges = mod.axis_ranges(opts, {"max_batch": 4, "max_past": 1000})
    assert ranges == {"batch": (1, 2, 4), "new_tokens": (1, 1, 64), "past": (0, 500, 1000)}
    lo, opt, hi = mod.profile_shape("past_key_3", (-1, 2, -1, 16), ranges)
    assert (lo, opt, hi) == ((1, 2, 0, 16), (2, 2, 500, 16), (4, 2, 1000, 16))
    assert mod.profile_shape("input_ids", (-1, -1), ranges) == ((1, 1), (2, 1), (4, 64))
    assert mod.profile_shape("past_flag_0", (-1, 2, -1), ranges)[2] == (4, 2, 1000)
    with pytest.raises(ValueError, match="unexpected"):
        mod.profile_shape("attention_mask", (-1, -1), ranges)


def _bundle_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bundle", ROOT / "deploy/tensorrt_llm/make_bundle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fp8", [False, True])
def test_make_bundle(tmp_path, fp8):
    model = dms_model("llama")
    if fp8:
        from modelopt_dms import quantize_fp8

        model = quantize_fp8(model, [prompt(8)])
    export_dir = dms.export_hf_checkpoint(model, tmp_path / "export")
    proc = run_script(ROOT / "deploy/tensorrt_llm/make_bundle.py", export_dir, tmp_path / "bundle")
    assert proc.returncode == 0, proc.stderr
    bundle = tmp_path / "bundle"
    assert (bundle / "checkpoint" / "config.json").is_file()
    assert (bundle / "README.md").is_file()
    config = json.loads((export_dir / "config.json").read_text())
    opts = yaml.safe_load((bundle / "llm_api_options.yaml").read_text())
    plain = yaml.safe_load((bundle / "llm_api_options.trtllm.yaml").read_text()) or {}
    custom = _bundle_module().DMS_YAML_KEY
    assert opts[custom]["dms_config"] == config["dms_config"]
    assert custom not in plain
    if fp8:
        assert opts["kv_cache_config"]["dtype"] == "fp8" and plain["kv_cache_config"]["dtype"] == "fp8"
    else:
        assert "kv_cache_config" not in opts or "dtype" not in opts["kv_cache_config"]
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["kv_cache_fp8"] is fp8


def test_make_bundle_strip_adapters_and_refusals(tmp_path):
    from safetensors import safe_open

    export_dir = dms.export_hf_checkpoint(dms_model("llama"), tmp_path / "export")
    mod = _bundle_module()
    out = mod.make_bundle(export_dir, tmp_path / "bundle", checkpoint_mode="strip-adapters")
    ckpt = out / "checkpoint"
    assert not ckpt.is_symlink()
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "dms_adapter" in k]
    with safe_open(str(out / "dms" / "dms_adapters.safetensors"), "pt") as f:
        assert len([k for k in f.keys() if "dms_adapter" in k]) == 4
    with pytest.raises(FileExistsError):
        mod.make_bundle(export_dir, out)
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    with pytest.raises(ValueError, match="dms_config"):
        mod.make_bundle(plain, tmp_path / "bundle2")
    proc = run_script(ROOT / "deploy/tensorrt_llm/make_bundle.py", plain, tmp_path / "bundle3")
    assert proc.returncode == 2 and "dms_config" in proc.stderr


def test_symlink_bundle_points_at_export(tmp_path):
    export_dir = dms.export_hf_checkpoint(dms_model("llama"), tmp_path / "export")
    out = _bundle_module().make_bundle(export_dir, tmp_path / "bundle")
    assert (out / "checkpoint").is_symlink()
    assert os.path.realpath(out / "checkpoint") == os.path.realpath(export_dir)

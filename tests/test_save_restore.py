"""Save/restore of DMS models: modelopt checkpoints, HF checkpoints, adapter-only artifacts.

Every round trip must reproduce logits and hard decisions bit for bit, in this process and in a fresh
one, after the adapters were set to values that make the model evict.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import modelopt.torch.opt as mto
import pytest
import torch
from conftest import run_fresh_script, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import modelopt_dms as dms
from modelopt_dms import fileio

KINDS = ["adapter", "borrowed_neuron"]
WINDOW = 3


def _config(kind: str) -> dict:
    return {"window_size": WINDOW, "decision": kind}


def _trained(kind: str, family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A DMS model whose adapters (if any) are set to random values, so that it evicts in eval mode."""
    model = tiny_model(family, seed=seed, **overrides)
    dms.apply_dms(model, _config(kind))
    gen = torch.Generator().manual_seed(1234 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dms_adapter.proj" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "dms_adapter.norm_weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7))


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return logits, {k: v.clone().contiguous() for k, v in dms.collect_decisions(model).items()}


def _assert_same(ref, got) -> None:
    (ref_logits, ref_dec), (logits, dec) = ref, got
    assert torch.equal(ref_logits, logits), f"max abs diff {(ref_logits - logits).abs().max().item()}"
    assert sorted(ref_dec) == sorted(dec)
    for layer in ref_dec:
        assert torch.equal(ref_dec[layer], dec[layer]), f"decisions of layer {layer} differ"


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def reference(kind):
    model = _trained(kind)
    ids = _inputs()
    return model, ids, _run(model, ids)


def test_reference_is_nontrivial(reference):
    model, ids, (logits, decisions) = reference
    stacked = torch.stack(list(decisions.values()))
    assert 0.05 < stacked.mean().item() < 0.95, "some but not all tokens must be evicted"
    with dms.eviction_disabled(model), torch.no_grad():
        teacher = model(ids, use_cache=False).logits
    assert (teacher - logits).abs().max().item() > 1e-3, "eviction must change the logits"


# ------------------------------------------------------------------------------------ modelopt checkpoints
def test_mto_save_restore(reference, tmp_path):
    model, ids, ref = reference
    mto.save(model, tmp_path / "model.pth")
    fresh = mto.restore(tiny_model("llama", seed=99), tmp_path / "model.pth")
    assert dms.is_dms_model(fresh)
    _assert_same(ref, _run(fresh, ids))


def test_modelopt_state_and_state_dict(reference):
    model, ids, ref = reference
    state = mto.modelopt_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = mto.restore_from_modelopt_state(tiny_model("llama", seed=99), state)
    fresh.load_state_dict(weights)
    _assert_same(ref, _run(fresh.eval(), ids))


def test_hf_save_pretrained_from_pretrained(reference, tmp_path):
    model, ids, ref = reference
    mto.enable_huggingface_checkpointing()
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "modelopt_state.pth").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert dms.is_dms_model(fresh)
    _assert_same(ref, _run(fresh, ids))


def test_restore_refuses_altered_format_version():
    model = _trained("adapter")
    state = mto.modelopt_state(model)
    (name, mode_state), *_ = state["modelopt_state_dict"]
    assert name == "dms"
    mode_state["metadata"]["dms_format_version"] = 99
    with pytest.raises(Exception, match=r"format version 99.*reads version 1"):
        mto.restore_from_modelopt_state(tiny_model("llama"), state)


def test_qwen3_mto_round_trip(tmp_path):
    """A family with q/k norms (the borrowed neuron is read after q-norm)."""
    for kind in KINDS:
        model, ids = _trained(kind, family="qwen3"), _inputs()
        ref = _run(model, ids)
        mto.save(model, tmp_path / f"{kind}.pth")
        fresh = mto.restore(tiny_model("qwen3", seed=5), tmp_path / f"{kind}.pth")
        _assert_same(ref, _run(fresh, ids))


# ------------------------------------------------------------------------------------ adapter artifacts
def test_adapters_round_trip_onto_unconverted(reference, kind, tmp_path):
    model, ids, ref = reference
    out = dms.save_adapters(model, tmp_path / "adapters")
    assert sorted(os.listdir(out)) == ["dms_adapters.json", "dms_adapters.safetensors"]
    fresh = tiny_model("llama")  # same base weights (same seed), no DMS
    assert dms.load_adapters(fresh, out) is fresh
    assert dms.is_dms_model(fresh)
    assert mto.modelopt_state(fresh)["modelopt_state_dict"][0][1]["config"]["window_size"] == WINDOW
    _assert_same(ref, _run(fresh, ids))


def test_adapters_round_trip_onto_converted(reference, kind, tmp_path):
    model, ids, ref = reference
    dms.save_adapters(model, tmp_path / "a")
    other = _trained(kind, seed=0)
    if kind == "adapter":  # make sure the values really get overwritten
        with torch.no_grad():
            for name, p in other.named_parameters():
                if "dms_adapter" in name:
                    p.zero_()
        assert not torch.equal(_run(other, ids)[0], ref[0])
    dms.load_adapters(other, tmp_path / "a")
    _assert_same(ref, _run(other, ids))


def test_adapters_subset_of_layers(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    dms.apply_dms(model, {"window_size": WINDOW, "layers": [1]})
    with torch.no_grad():
        model.model.layers[1].self_attn.dms_adapter.proj.weight.normal_(0, 0.02)
    ids = _inputs()
    ref = _run(model, ids)
    assert sorted(ref[1]) == [1]
    dms.save_adapters(model, tmp_path / "a")
    record = json.loads((tmp_path / "a" / "dms_adapters.json").read_text())
    assert record["dms_layers"] == [1] and record["dms_config"]["layers"] == [1]
    fresh = dms.load_adapters(tiny_model("llama", num_hidden_layers=3), tmp_path / "a")
    assert [int(m.layer_idx) for m in dms.dms_modules(fresh)] == [1]
    _assert_same(ref, _run(fresh, ids))


def test_adapters_bfloat16(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    dms.apply_dms(model, _config("adapter"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "dms_adapter.proj" in name:
                p.normal_(0, 0.02)
    ids = _inputs()
    ref = _run(model, ids)
    dms.save_adapters(model, tmp_path / "a")
    record = json.loads((tmp_path / "a" / "dms_adapters.json").read_text())
    assert set(record["dtypes"].values()) == {"bfloat16"}
    fresh = dms.load_adapters(tiny_model("llama").to(torch.bfloat16), tmp_path / "a")
    assert all(p.dtype == torch.bfloat16 for p in fresh.parameters())
    _assert_same(ref, _run(fresh, ids))


def test_adapters_file_contents(reference, kind, tmp_path):
    model, _, _ = reference
    out = dms.save_adapters(model, tmp_path / "a")
    tensors = load_file(str(out / "dms_adapters.safetensors"))
    record = json.loads((out / "dms_adapters.json").read_text())
    expected = {n: p for n, p in model.named_parameters() if "dms_adapter" in n}
    assert sorted(tensors) == sorted(expected)
    if kind == "borrowed_neuron":
        assert tensors == {}
    else:
        assert len(tensors) == 4  # 2 layers x (norm weight, projection)
        for name, t in tensors.items():
            assert torch.equal(t, expected[name].detach())
    assert record["format_version"] == dms.DMS_FORMAT_VERSION
    assert record["model_class"] == "LlamaForCausalLM"
    assert record["dms_layers"] == [0, 1]
    assert record["dms_config"] == mto.modelopt_state(model)["modelopt_state_dict"][0][1]["config"]
    assert record["params"] == {n: list(p.shape) for n, p in expected.items()}
    # Only safetensors and JSON: no pickle protocol header anywhere.
    for f in out.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"


def test_adapters_overwrite_keeps_other_files(tmp_path):
    ids = _inputs()
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "README.txt").write_text("user file")
    dms.save_adapters(_trained("adapter", seed=1), target)
    second = _trained("adapter", seed=2)
    dms.save_adapters(second, target)
    assert (target / "README.txt").read_text() == "user file"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary directory may be left behind"
    fresh = dms.load_adapters(tiny_model("llama", seed=2), target)
    _assert_same(_run(second, ids), _run(fresh, ids))


def test_save_failure_leaves_no_artifact(tmp_path, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fileio, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        dms.save_adapters(_trained("adapter"), tmp_path / "a")
    assert list(tmp_path.iterdir()) == []


def test_save_failure_keeps_previous_artifact(tmp_path, monkeypatch):
    ids = _inputs()
    first = _trained("adapter", seed=0)
    dms.save_adapters(first, tmp_path / "a")
    before = {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()}

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fileio, "save_file", broken_save)
    with pytest.raises(OSError):
        dms.save_adapters(_trained("adapter", seed=3), tmp_path / "a")
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    _assert_same(_run(first, ids), _run(dms.load_adapters(tiny_model("llama"), tmp_path / "a"), ids))


def test_interrupted_replace_is_detected(tmp_path, monkeypatch):
    """In a folder with other files the two files are replaced one by one: a crash between the two
    renames leaves new tensors with the old JSON, and loading must refuse."""
    dms.save_adapters(_trained("adapter", seed=0), tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("user file")
    real_replace, calls = os.replace, []

    def replace_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        dms.save_adapters(_trained("adapter", seed=1), tmp_path / "a")
    monkeypatch.undo()
    fresh = tiny_model("llama")
    with pytest.raises(ValueError, match="SHA-256 differs"):
        dms.load_adapters(fresh, tmp_path / "a")
    assert not dms.is_dms_model(fresh)
    assert (tmp_path / "a" / "notes.txt").read_text() == "user file"


def test_interrupted_save_into_an_artifact_folder_keeps_the_previous_artifact(tmp_path, monkeypatch):
    """A folder holding only an earlier artifact is swapped atomically: an interrupt anywhere leaves
    the previous artifact, complete and loadable."""
    ids = _inputs()
    first = _trained("adapter", seed=0)
    dms.save_adapters(first, tmp_path / "a")
    for n_calls in (1, 2, 3):
        real_replace, calls = os.replace, []

        def replace_then_crash(src, dst, n_calls=n_calls, calls=calls, real_replace=real_replace):
            calls.append(dst)
            if len(calls) == n_calls:
                raise KeyboardInterrupt("power cut")
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace_then_crash)
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            dms.save_adapters(_trained("adapter", seed=1), tmp_path / "a")
        monkeypatch.undo()
        _assert_same(_run(first, ids), _run(dms.load_adapters(tiny_model("llama"), tmp_path / "a"), ids))
        assert [p.name for p in tmp_path.iterdir()] == ["a"]


# ------------------------------------------------------------------------------------ refusals
@pytest.fixture
def saved(tmp_path) -> Path:
    return dms.save_adapters(_trained("adapter"), tmp_path / "a")


def _edit_json(path: Path, **changes) -> None:
    record = json.loads((path / "dms_adapters.json").read_text())
    record.update(changes)
    (path / "dms_adapters.json").write_text(json.dumps(record))


def _rewrite_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a self-consistent artifact with other tensors (as a differently built model would)."""
    save_file(tensors, str(path / "dms_adapters.safetensors"))
    _edit_json(
        path,
        params={n: list(t.shape) for n, t in tensors.items()},
        safetensors_sha256=fileio.file_sha256(path / "dms_adapters.safetensors"),
    )


def _assert_untouched(model: torch.nn.Module) -> None:
    assert not dms.is_dms_model(model)
    assert not mto.ModeloptStateManager.is_converted(model)


def test_refuses_other_format_version(saved):
    _edit_json(saved, format_version=2)
    fresh = tiny_model("llama")
    with pytest.raises(ValueError, match=r"format version 2.*reads format version 1.*save_adapters"):
        dms.load_adapters(fresh, saved)
    _assert_untouched(fresh)


def test_refuses_shape_mismatch(saved):
    fresh = tiny_model("llama", hidden_size=32)
    with pytest.raises(
        ValueError,
        match=r"Shape mismatch for DMS parameter model\.layers\.0\.self_attn\.dms_adapter\.\w+(\.weight)?: "
        r"saved \((2, )?64,?\), model \((2, )?32,?\)",
    ):
        dms.load_adapters(fresh, saved)
    _assert_untouched(fresh)  # refused before converting


def test_refuses_shape_mismatch_on_converted(saved):
    fresh = tiny_model("llama", num_key_value_heads=4)
    dms.apply_dms(fresh, _config("adapter"))
    with pytest.raises(ValueError, match=r"dms_adapter\.proj\.weight: saved \(2, 64\), model \(4, 64\)"):
        dms.load_adapters(fresh, saved)


def test_refuses_missing_and_unexpected_params(saved):
    tensors = load_file(str(saved / "dms_adapters.safetensors"))
    dropped = "model.layers.1.self_attn.dms_adapter.proj.weight"
    _rewrite_tensors(saved, {n: t for n, t in tensors.items() if n != dropped})
    with pytest.raises(ValueError, match=rf"DMS parameter {dropped} .* is missing from"):
        dms.load_adapters(tiny_model("llama"), saved)
    _rewrite_tensors(saved, {**tensors, "model.layers.0.self_attn.dms_adapter.extra": torch.zeros(3)})
    with pytest.raises(
        ValueError, match=r"holds DMS parameter model\.layers\.0\.self_attn\.dms_adapter\.extra"
    ):
        dms.load_adapters(tiny_model("llama"), saved)


def test_refuses_other_layers(saved):
    fresh = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"saved for DMS layers \[0, 1\], but this model has DMS on layers"):
        dms.load_adapters(fresh, saved)
    _assert_untouched(fresh)


def test_refuses_config_mismatch_on_converted(saved):
    fresh = tiny_model("llama")
    dms.apply_dms(fresh, {"window_size": WINDOW + 2, "decision": "adapter"})
    with pytest.raises(ValueError, match=r"different config.*window_size: saved 3 vs model 5"):
        dms.load_adapters(fresh, saved)


@pytest.mark.parametrize("missing", ["dms_adapters.json", "dms_adapters.safetensors"])
def test_refuses_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(ValueError, match=rf"{missing} is missing from .*save_adapters"):
        dms.load_adapters(tiny_model("llama"), saved)


def test_refuses_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*save_adapters"):
        dms.load_adapters(tiny_model("llama"), tmp_path / "nope")


def test_refuses_malformed_files(saved):
    good_json = (saved / "dms_adapters.json").read_text()
    (saved / "dms_adapters.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        dms.load_adapters(tiny_model("llama"), saved)
    (saved / "dms_adapters.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="no 'format_version'"):
        dms.load_adapters(tiny_model("llama"), saved)
    (saved / "dms_adapters.json").write_text(good_json)
    _edit_json(saved, params=[1, 2])
    with pytest.raises(ValueError, match="'params' is missing or not a dict"):
        dms.load_adapters(tiny_model("llama"), saved)
    (saved / "dms_adapters.json").write_text(good_json)
    (saved / "dms_adapters.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="SHA-256 differs"):
        dms.load_adapters(tiny_model("llama"), saved)
    _edit_json(saved, safetensors_sha256=fileio.file_sha256(saved / "dms_adapters.safetensors"))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dms.load_adapters(tiny_model("llama"), saved)


def test_refuses_invalid_saved_config(saved):
    record = json.loads((saved / "dms_adapters.json").read_text())
    _edit_json(saved, dms_config={**record["dms_config"], "window_size": 0})
    fresh = tiny_model("llama")
    with pytest.raises(ValueError, match="window_size"):
        dms.load_adapters(fresh, saved)
    _assert_untouched(fresh)


def test_save_refusals(tmp_path):
    with pytest.raises(ValueError, match="apply the 'dms' mode first"):
        dms.save_adapters(tiny_model("llama"), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        dms.save_adapters(_trained("adapter"), tmp_path / "file")


def test_warns_on_other_model_class(saved):
    with pytest.warns(UserWarning, match="saved from a LlamaForCausalLM, not a MistralForCausalLM"):
        dms.load_adapters(tiny_model("mistral"), saved)


# ------------------------------------------------------------------------------------ fresh process
METHODS = ["mto_save", "modelopt_state", "hf", "adapters"]

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
    mto.enable_huggingface_checkpointing()
    results = {}
    for kind in sys.argv[2:]:
        d = root / kind
        expected = load_file(str(d / "expected.safetensors"))

        def blank():
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d / "base")).eval()

        loaders = {
            "mto_save": lambda: mto.restore(blank(), d / "model.pth"),
            "modelopt_state": lambda: mto.restore_from_modelopt_state(
                blank(), modelopt_state_path=d / "modelopt_state.pth"
            ),
            "hf": lambda: AutoModelForCausalLM.from_pretrained(d / "hf"),
            "adapters": lambda: dms.load_adapters(
                AutoModelForCausalLM.from_pretrained(d / "base"), d / "adapters"
            ),
        }
        for method, load in loaders.items():
            try:
                model = load()
                if method == "modelopt_state":
                    model.load_state_dict(load_file(str(d / "weights.safetensors")))
                model.eval()
                with torch.no_grad():
                    logits = model(ids, use_cache=False).logits
                dec = dms.collect_decisions(model)
                same_dec = sorted(f"dec.{k}" for k in dec) == sorted(k for k in expected if k != "logits")
                same_dec = same_dec and all(torch.equal(v, expected[f"dec.{k}"]) for k, v in dec.items())
                results[f"{kind}/{method}"] = {
                    "logits_max_diff": (logits - expected["logits"]).abs().max().item(),
                    "logits_equal": torch.equal(logits, expected["logits"]),
                    "decisions_equal": same_dec,
                    "evicted": float(torch.stack(list(dec.values())).mean()),
                    "error": None,
                }
            except Exception as err:  # reported per case by the parent
                results[f"{kind}/{method}"] = {"error": f"{type(err).__name__}: {err}"}
    (root / "results.json").write_text(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def fresh_process_results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fresh")
    ids = _inputs()
    save_file({"ids": ids}, str(root / "inputs.safetensors"))
    mto.enable_huggingface_checkpointing()
    for kind in KINDS:
        d = root / kind
        d.mkdir()
        tiny_model("llama").save_pretrained(d / "base")  # the original (unconverted) checkpoint
        model = _trained(kind)
        logits, decisions = _run(model, ids)
        save_file(
            {"logits": logits, **{f"dec.{k}": v for k, v in decisions.items()}},
            str(d / "expected.safetensors"),
        )
        mto.save(model, d / "model.pth")
        torch.save(mto.modelopt_state(model), d / "modelopt_state.pth")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "weights.safetensors"))
        model.save_pretrained(d / "hf")
        dms.save_adapters(model, d / "adapters")
    return run_fresh_script(root, _FRESH_SCRIPT, list(KINDS), timeout=600)


@pytest.mark.parametrize("method", METHODS)
def test_fresh_process_round_trip(fresh_process_results, kind, method):
    result = fresh_process_results[f"{kind}/{method}"]
    assert result["error"] is None, result["error"]
    assert result["logits_equal"], f"max abs diff {result['logits_max_diff']}"
    assert result["decisions_equal"]
    assert 0.05 < result["evicted"] < 0.95

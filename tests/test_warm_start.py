"""Warm start (``train.init_adapters``): a new run starts from another run's adapters and LoRA deltas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model, write_tiny_workspace
from safetensors.torch import load_file
from train_worker import build

import modelopt_dms as dms
from modelopt_dms.export.adapters import init_trainable_from
from modelopt_dms.nn.lora import attach_lora, has_lora, lora_deltas
from modelopt_dms.pipelines.train import run_recipe
from modelopt_dms.training.config import TrainConfig
from modelopt_dms.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"


def _trainable(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "dms_adapter" in n.split(".") or "dms_lora" in n.split(".")
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with rank-2 LoRA trained a few steps, its adapters saved (deltas unmerged)."""
    out = tmp_path_factory.mktemp("source")
    model, seqs = build()
    cfg = TrainConfig(steps=3, lr=1e-2, lora_rank=2, lora_lr=1e-2, batch_size=2, checkpoint_every=0)
    train(model, seqs, cfg, str(out / "run"), progress=False)
    dms.save_adapters(model, out / "heads")
    assert all(d.lora_b.abs().max() > 0 for d in lora_deltas(model).values())
    return model, seqs, out / "heads"


def test_init_gives_the_saved_values_and_the_same_outputs(trained):
    source, seqs, heads = trained
    model, _ = build()
    attach_lora(model, rank=2, alpha=16.0)
    init_trainable_from(model, heads)
    want = _trainable(source)
    got = _trainable(model)
    assert set(got) == set(want) and len(want) > 0
    for n, t in want.items():
        assert torch.equal(got[n], t), n
    assert has_lora(model)  # nothing merged: the deltas go on training
    source.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=seqs[:2], use_cache=False).logits,
            source(input_ids=seqs[:2], use_cache=False).logits,
            rtol=0,
            atol=0,
        )


def test_a_warm_started_run_starts_where_the_artifact_left_off(trained, tmp_path):
    source, seqs, heads = trained
    model, _ = build()
    cfg = TrainConfig(steps=1, lr=1e-9, lora_rank=2, lora_lr=1e-9, batch_size=2, checkpoint_every=0)
    train(
        model, seqs, cfg.model_copy(update={"init_adapters": str(heads)}), str(tmp_path / "w"), progress=False
    )
    cold, _ = build()
    train(cold, seqs, cfg, str(tmp_path / "c"), progress=False)
    want, got, zero = _trainable(source), _trainable(model), _trainable(cold)
    for n, t in want.items():
        torch.testing.assert_close(got[n], t, rtol=0, atol=1e-7)
    assert any(not torch.allclose(zero[n], t, atol=1e-3) for n, t in want.items())


def test_a_resumed_warm_run_continues_its_checkpoint_not_the_artifact(trained, tmp_path):
    _, seqs, heads = trained
    own = tmp_path / "heads"
    shutil.copytree(heads, own)

    def run(out, steps):
        model, _ = build()
        cfg = TrainConfig(
            steps=steps, lr=1e-2, lora_rank=2, batch_size=2, checkpoint_every=2, init_adapters=str(own)
        )
        return model, train(model, seqs, cfg, str(out), progress=False)

    straight, h_straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    shutil.rmtree(own)  # resuming reads the checkpoint only
    resumed, h_resumed = run(tmp_path / "b", 4)
    assert [r["loss"] for r in h_resumed] == pytest.approx([r["loss"] for r in h_straight], rel=1e-6)
    want = _trainable(straight)
    for n, p in _trainable(resumed).items():
        torch.testing.assert_close(p, want[n], rtol=1e-6, atol=1e-7)


def test_artifact_without_lora_leaves_attached_deltas_at_zero(tmp_path):
    plain, _ = build(seed=1)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "dms_adapter" in n:
                p.add_(0.5)
    dms.save_adapters(plain, tmp_path / "plain")
    model, _ = build()
    attach_lora(model, rank=2, alpha=16.0)
    init_trainable_from(model, tmp_path / "plain")
    for n, t in _trainable(plain).items():
        assert torch.equal(dict(model.named_parameters())[n], t)
    assert all(d.lora_b.abs().max() == 0 for d in lora_deltas(model).values())


def test_a_new_target_or_window_may_start_from_other_heads(trained):
    """Heads trained towards one CR (or window) start a run towards another; another offset is refused."""
    source, seqs, heads = trained
    assert dms.dms_config(source).target_compression_ratio != 16.0
    model = dms.apply_dms(tiny_model("llama", seed=0), {"window_size": 4, "target_compression_ratio": 16.0})
    attach_lora(model, rank=2, alpha=16.0)
    init_trainable_from(model, heads)
    for n, t in _trainable(source).items():
        assert torch.equal(dict(model.named_parameters())[n], t), n
    assert dms.dms_config(model).target_compression_ratio == 16.0
    wider = dms.apply_dms(tiny_model("llama", seed=0), {"window_size": 8})  # a run that trains another window
    attach_lora(wider, rank=2, alpha=16.0)
    init_trainable_from(wider, heads)
    for n, t in _trainable(source).items():
        assert torch.equal(dict(wider.named_parameters())[n], t), n
    assert dms.dms_config(wider).window_size == 8 != dms.dms_config(source).window_size
    other_offset = dms.apply_dms(tiny_model("llama", seed=0), {"window_size": 4, "logit_offset": 6.0})
    attach_lora(other_offset, rank=2, alpha=16.0)
    _refused(other_offset, heads, r"logit_offset: saved 5\.0 vs run 6\.0")


def _refused(model, heads, match: str) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        init_trainable_from(model, heads)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_mismatches_are_refused_and_change_nothing(trained, tmp_path):
    _, _, heads = trained
    no_lora, _ = build()
    _refused(no_lora, heads, r"set train\.lora_rank: 2")
    other_rank, _ = build()
    attach_lora(other_rank, rank=4, alpha=16.0)
    _refused(other_rank, heads, "lora_rank, lora_alpha and lora_targets")
    other_base, _ = build(seed=5)
    attach_lora(other_base, rank=2, alpha=16.0)
    _refused(other_base, heads, "other base weights")
    model = dms.apply_dms(tiny_model("llama", seed=0), {"window_size": 4, "temperature": 0.2})
    attach_lora(model, rank=2, alpha=16.0)
    _refused(model, heads, r"temperature: saved 0\.1 vs run 0\.2")  # the window may differ, the rest not
    _refused(no_lora, tmp_path / "missing", "does not exist")


def _recipe(ws: Path, name: str, **train) -> Path:
    data = yaml.safe_load(TINY_RECIPE.read_text())
    data["train"].update(train)
    data["output"] = {"dir": name, "adapters_dir": f"{name}/adapters"}
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_recipe_goes_on_from_another_runs_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    quiet = {"progress": False, "log": lambda line: None}
    with pytest.raises(ValueError, match="missing.*does not exist"):
        run_recipe(str(_recipe(tmp_path, "bad", init_adapters="missing")), **quiet)
    assert not (tmp_path / "bad").exists()  # refused before a run folder or a model
    run_recipe(str(_recipe(tmp_path, "first")), **quiet)
    run_recipe(str(_recipe(tmp_path, "second", init_adapters="first/adapters", steps=1, lr=1e-9)), **quiet)
    first = load_file(tmp_path / "first" / "adapters" / "dms_adapters.safetensors")
    second = load_file(tmp_path / "second" / "adapters" / "dms_adapters.safetensors")
    assert set(first) == set(second)
    for n, t in first.items():
        torch.testing.assert_close(second[n], t, rtol=0, atol=1e-7)
    assert any(t.abs().max() > 1e-3 for t in first.values())  # trained away from the zero start


def test_a_recipe_resumes_without_the_artifact_it_started_from(tmp_path, monkeypatch):
    """Once a warm-started run has a checkpoint, the run goes on from it even if the artifact is gone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    quiet = {"progress": False, "log": lambda line: None}
    run_recipe(str(_recipe(tmp_path, "first", steps=3)), **quiet)
    second = _recipe(tmp_path, "second", init_adapters="first/adapters", steps=3, checkpoint_every=3)
    run_recipe(str(second), **quiet)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    longer = _recipe(tmp_path, "second", init_adapters="first/adapters", steps=6, checkpoint_every=3)
    run_recipe(str(longer), **quiet)
    log = (tmp_path / "second" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="does not exist"):  # a fresh start still needs it
        run_recipe(str(longer), restart=True, **quiet)
    assert (tmp_path / "second" / "train_log.jsonl").read_text().splitlines() == log  # refused, unchanged

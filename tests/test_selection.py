"""Adapter snapshots during training and ``modelopt-dms select`` (the snapshot for a target CR)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model, write_tiny_workspace
from pydantic import ValidationError
from safetensors.torch import load_file

import modelopt_dms as dms
from modelopt_dms.cli import main
from modelopt_dms.nn.divergence import kl_per_token
from modelopt_dms.training.config import TrainConfig
from modelopt_dms.training.selection import (
    SnapshotScore,
    drop_snapshots_after,
    list_snapshots,
    pareto_front,
    pick_snapshot,
    score_snapshot,
    snapshot_path,
)

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def _evicting(window: int = 4, seed: int = 0) -> torch.nn.Module:
    """A tiny DMS model whose adapters evict (random projection weights)."""
    model = dms.apply_dms(tiny_model(seed=seed), {"window_size": window})
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight") and "dms_adapter" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    return model


@pytest.mark.parametrize("key", ["train_all_weights", "fsdp"])
def test_snapshots_need_adapter_only_single_process_training(key):
    with pytest.raises(ValidationError, match="snapshot_every"):
        TrainConfig(snapshot_every=5, **{key: True})
    TrainConfig(snapshot_every=5)  # adapters, one process: fine


def test_drop_snapshots_after_removes_only_later_steps(tmp_path):
    for step in (2, 4, 6):
        snapshot_path(tmp_path, step).mkdir(parents=True)
    (tmp_path / "snapshots" / "notes.txt").write_text("mine")  # not a snapshot: kept
    assert drop_snapshots_after(tmp_path, 4) == [6]
    assert [s for s, _ in list_snapshots(tmp_path)] == [2, 4]
    assert (tmp_path / "snapshots" / "notes.txt").read_text() == "mine"


def test_pick_is_the_lowest_kl_at_or_above_the_target():
    scores = [
        SnapshotScore(10, "a", 3.5, 0.01),
        SnapshotScore(20, "b", 4.1, 0.05),
        SnapshotScore(30, "c", 4.6, 0.04),
        SnapshotScore(40, "d", 5.2, 0.04),  # same KL as c: the later step wins
    ]
    assert pick_snapshot(scores, 4.0).step == 40
    assert pick_snapshot(scores, 5.0).step == 40
    assert pick_snapshot(scores, 1.0).step == 10
    with pytest.raises(ValueError, match=r"no snapshot reaches CR 6.0: the highest is 5.20 \(step 40\)"):
        pick_snapshot(scores, 6.0)


def test_pareto_front_keeps_the_snapshots_no_other_beats_on_cr_and_kl():
    # the CR-8 warm-start run's scan (steps 250-600), rounded: 400/450/500 are beaten by 550 or 600
    scan = [(250, 8.26, 0.0755), (300, 8.90, 0.0785), (350, 9.42, 0.0873), (400, 9.52, 0.0899),
            (450, 9.77, 0.0916), (500, 9.94, 0.0901), (550, 10.08, 0.0886), (600, 9.87, 0.0871)]  # fmt: skip
    scores = [SnapshotScore(step, str(step), cr, kl) for step, cr, kl in scan]
    assert [s.step for s in pareto_front(scores, 8.0)] == [250, 300, 550, 600]
    assert [s.step for s in pareto_front(scores, 9.0)] == [550, 600]  # 350 is beaten by 600
    assert pareto_front(scores, 11.0) == []
    twins = [SnapshotScore(1, "a", 5.0, 0.1), SnapshotScore(2, "b", 5.0, 0.1)]
    assert [s.step for s in pareto_front(twins, 4.0)] == [1, 2]  # equal scores: neither beats the other


def test_score_matches_the_cache_stats_and_the_masked_reference():
    model = _evicting()
    rows = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    cr, kl, reference = score_snapshot(model, rows, window=4)
    seen = kept = 0
    kls = []
    with torch.inference_mode():
        for row in rows:
            cache = dms.DMSCache()
            model(input_ids=row[None], past_key_values=cache, use_cache=True)
            st = dms.cache_stats(cache)
            seen, kept = seen + int(st["tokens_seen"].sum()), kept + int(st["tokens_kept"].sum())
            with dms.eviction_disabled(model):
                teacher = model(input_ids=row[None], use_cache=False).logits
            masked = model(input_ids=row[None], use_cache=False).logits  # dense attention, hard DMS mask
            kls.append(kl_per_token(teacher.double(), masked.double())[0, 5:])
    assert cr == pytest.approx(seen / kept) and cr > 1.2  # the adapters do evict
    assert kl == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4, abs=1e-7) and kl > 0
    # a second call reuses the reference logits and gives the same numbers
    assert score_snapshot(model, rows, 4, reference)[:2] == pytest.approx((cr, kl))


def test_untrained_adapters_score_cr_1_and_kl_0():
    model = dms.apply_dms(tiny_model(), {"window_size": 4})  # zero-init projection: nothing evicted
    cr, kl, _ = score_snapshot(model, torch.randint(0, 128, (1, 40)), window=4)
    assert cr == 1.0 and kl == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ end to end
def _train_tiny(tmp_path, monkeypatch, **train):
    """recipes/tiny_test.yaml with ``train`` overrides, trained in a temp workspace; the recipe path."""
    import inspect
    import textwrap

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_workspace(tmp_path, {"wrap.txt": inspect.getsource(textwrap)})
    raw = yaml.safe_load(TINY.read_text())
    raw["train"].update(train)
    recipe = tmp_path / "tiny_test.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe), "--no-progress"]) == 0
    return recipe


@pytest.fixture
def snapshot_run(tmp_path, monkeypatch):
    """recipes/tiny_test.yaml with snapshots every 2 steps, trained in a temp workspace."""
    return tmp_path, _train_tiny(tmp_path, monkeypatch, snapshot_every=2)


def test_training_writes_snapshots_and_select_saves_the_chosen_one(snapshot_run, capsys):
    root, recipe = snapshot_run
    run = root / "run"
    steps = [s for s, _ in list_snapshots(run)]
    assert steps == [2, 4, 6]
    final = load_file(run / "checkpoint" / "trainable.safetensors")
    last = load_file(snapshot_path(run, 6) / "dms_adapters.safetensors")
    assert set(last) == set(final) and all(torch.equal(last[k], final[k]) for k in final)

    out = root / "chosen"
    assert main(["select", str(recipe), "--target", "1.0", "--out", str(out), "--context", "64"]) == 0
    record = json.loads((run / "selection_cr1.json").read_text())
    scores = record["snapshots"]
    assert [s["step"] for s in scores] == [2, 4, 6]
    best = min(scores, key=lambda s: (s["kl"], -s["step"]))
    assert record["chosen"]["step"] == best["step"]
    chosen = load_file(out / "dms_adapters.safetensors")
    snap = load_file(snapshot_path(run, best["step"]) / "dms_adapters.safetensors")
    assert all(torch.equal(chosen[k], snap[k]) for k in snap)
    assert "[select] step" in capsys.readouterr().out

    # a target no snapshot reaches: exit 2, a message with the fix, nothing written
    bad = root / "none"
    assert main(["select", str(recipe), "--target", "1000", "--out", str(bad), "--context", "64"]) == 2
    assert "no snapshot reaches CR 1000" in capsys.readouterr().err
    assert not bad.exists()


def test_select_keeps_the_lora_deltas_of_the_chosen_snapshot(tmp_path, monkeypatch):
    """Scoring merges a LoRA snapshot into the weights; the artifact must still hold the deltas
    (saving the merged model's adapters would silently drop them)."""
    recipe = _train_tiny(tmp_path, monkeypatch, snapshot_every=2, lora_rank=2)
    out = tmp_path / "chosen"
    assert main(["select", str(recipe), "--target", "1.0", "--out", str(out), "--context", "64"]) == 0
    record = json.loads((tmp_path / "run" / "selection_cr1.json").read_text())
    snap = snapshot_path(tmp_path / "run", record["chosen"]["step"])
    assert "lora" in json.loads((out / "dms_adapters.json").read_text())
    chosen, saved = load_file(out / "dms_adapters.safetensors"), load_file(snap / "dms_adapters.safetensors")
    assert set(chosen) == set(saved) and any("lora" in k for k in chosen)
    assert all(torch.equal(chosen[k], saved[k]) for k in saved)


def test_restarting_a_run_drops_its_old_snapshots(snapshot_run):
    root, recipe = snapshot_run
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update(snapshot_every=3, seed=1)
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe), "--no-progress", "--restart"]) == 0
    assert [s for s, _ in list_snapshots(root / "run")] == [3, 6]


def test_select_without_snapshots_names_the_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_workspace(tmp_path, {})
    recipe = tmp_path / "tiny_test.yaml"
    recipe.write_text(TINY.read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["select", str(recipe), "--target", "2", "--out", "x"]) == 2
    assert "train.snapshot_every" in capsys.readouterr().err


def test_snapshots_can_be_turned_on_in_a_running_run(snapshot_run):
    root, recipe = snapshot_run
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update(snapshot_every=4, steps=8)  # not part of the run's fingerprint: it resumes
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    assert [s for s, _ in list_snapshots(root / "run")] == [2, 4, 6, 8]


def test_select_from_step_scores_only_the_later_snapshots(snapshot_run, capsys):
    """A run made longer: ``--from-step`` scores only the snapshots it added; past the last, a clear error."""
    root, recipe = snapshot_run
    out = root / "chosen"
    args = ["select", str(recipe), "--target", "1.0", "--context", "64"]
    assert main([*args, "--out", str(out), "--from-step", "4"]) == 0
    record = json.loads((root / "run" / "selection_cr1.json").read_text())
    assert [s["step"] for s in record["snapshots"]] == [4, 6] and record["from_step"] == 4
    assert record["chosen"]["step"] in (4, 6)
    assert "[select] 2 snapshots of" in capsys.readouterr().out
    assert main([*args, "--out", str(root / "none"), "--from-step", "7"]) == 2
    assert "no snapshot at step >= 7 (the last is step 6): lower --from-step" in capsys.readouterr().err
    assert not (root / "none").exists()

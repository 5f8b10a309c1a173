"""The decision threshold (``logit_offset``): set on a trained model it changes what is evicted, and
every saved form (modelopt state, adapters, HF export) reproduces the calibrated model; calibration
finds the largest offset that still reaches a CR; ``select --calibrate`` publishes it."""

from __future__ import annotations

import json

import modelopt.torch.opt as mto
import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_selection import _evicting, _train_tiny

import modelopt_dms as dms
from modelopt_dms.cli import main
from modelopt_dms.export.adapters import ADAPTERS_SAFETENSORS, copy_adapters
from modelopt_dms.export.hf_checkpoint import export_hf_checkpoint, load_exported
from modelopt_dms.training.calibration import calibrate_decision_offset
from modelopt_dms.training.selection import (
    SnapshotScore,
    pareto_front,
    score_snapshot,
    snapshot_path,
    uncompressed_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n=2, t=48, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _cached_logits(model, rows):
    """Logits of each row through a fresh DMSCache (the path where decisions evict)."""
    return [model(input_ids=r[None], past_key_values=dms.DMSCache(), use_cache=True).logits for r in rows]


def test_the_offset_moves_the_threshold_and_every_saved_form_carries_it(tmp_path):
    model, rows = _evicting(), _rows()
    cr_default, _, _ = score_snapshot(model, rows, 4)
    config = dms.set_decision_offset(model, 9.0)
    assert config.logit_offset == 9.0 and dms.dms_config(model).logit_offset == 9.0
    assert all(m.dms_config.logit_offset == 9.0 for m in dms.dms_modules(model))
    (state,) = [s for name, s in mto.modelopt_state(model)["modelopt_state_dict"] if name == "dms"]
    assert state["config"]["logit_offset"] == 9.0
    cr_high, _, _ = score_snapshot(model, rows, 4)
    assert cr_high < cr_default  # a larger offset evicts fewer tokens
    expected = _cached_logits(model, rows)

    # mto.save / mto.restore
    mto.save(model, tmp_path / "model.pth")
    restored = mto.restore(tiny_model(seed=7), tmp_path / "model.pth")
    assert dms.dms_config(restored).logit_offset == 9.0
    # adapters onto the original base weights
    dms.save_adapters(model, tmp_path / "adapters")
    loaded = dms.load_adapters(tiny_model(), tmp_path / "adapters")
    # the HF export
    export_hf_checkpoint(model, tmp_path / "export")
    exported, _ = load_exported(tmp_path / "export")
    for other in (restored, loaded, exported):
        assert dms.dms_config(other).logit_offset == 9.0
        for a, b in zip(expected, _cached_logits(other, rows), strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_set_decision_offset_needs_the_top_level_model():
    model = _evicting()
    with pytest.raises(ValueError, match="top-level model"):
        dms.set_decision_offset(model.model, 6.0)
    with pytest.raises(ValueError, match="apply the 'dms' mode first"):
        dms.set_decision_offset(tiny_model(), 6.0)


@pytest.mark.parametrize("target", [1.2, 2.2])  # below / above the CR at the starting offset
def test_calibration_picks_the_largest_offset_that_reaches_the_goal(target):
    model, rows = _evicting(), _rows()
    start_cr, _, reference = score_snapshot(model, rows, 4)
    assert (target < start_cr) == (target == 1.2), start_cr  # one case brackets upward, one downward
    logs = []
    cal = calibrate_decision_offset(
        model, rows, target, 4, reference, margin=0.0, resolution=1 / 16, log=logs.append
    )
    assert dms.dms_config(model).logit_offset == cal.offset
    assert cal.compression_ratio >= target
    cr_now, kl_now, _ = score_snapshot(model, rows, 4, reference)
    assert cr_now == pytest.approx(cal.compression_ratio) and kl_now == pytest.approx(cal.kl)
    # a probe just above the chosen offset misses the goal: the offset is the largest within resolution
    above = [p for p in cal.probes if cal.offset < p["logit_offset"] <= cal.offset + 1 / 16]
    assert above and all(p["compression_ratio"] < target for p in above)
    assert len(logs) == len(cal.probes)


def test_calibration_refuses_a_goal_no_offset_reaches():
    model, rows = _evicting(), _rows(t=16)
    reference = uncompressed_logits(model, rows)
    with pytest.raises(ValueError, match="no decision offset reaches CR"):
        calibrate_decision_offset(model, rows, 50.0, 4, reference, log=lambda _: None)


def test_copy_adapters_records_a_new_threshold_and_keeps_the_tensors(tmp_path):
    model = _evicting()
    dms.save_adapters(model, tmp_path / "snap")
    calibrated = dms.dms_config(model).model_copy(update={"logit_offset": 7.5})
    copy_adapters(tmp_path / "snap", tmp_path / "out", config=calibrated)
    record = json.loads((tmp_path / "out" / "dms_adapters.json").read_text())
    assert record["dms_config"]["logit_offset"] == 7.5
    src = (tmp_path / "snap" / ADAPTERS_SAFETENSORS).read_bytes()
    assert (tmp_path / "out" / ADAPTERS_SAFETENSORS).read_bytes() == src
    assert dms.dms_config(dms.load_adapters(tiny_model(), tmp_path / "out")).logit_offset == 7.5
    with pytest.raises(ValueError, match="changes window_size"):
        bad = calibrated.model_copy(update={"window_size": 8})
        copy_adapters(tmp_path / "snap", tmp_path / "bad", config=bad)
    assert not (tmp_path / "bad").exists()


def test_select_calibrate_publishes_the_calibrated_threshold(tmp_path, monkeypatch, capsys):
    recipe = _train_tiny(tmp_path, monkeypatch, snapshot_every=2, lora_rank=2)
    out = tmp_path / "chosen"
    args = ["select", str(recipe), "--target", "1.0", "--out", str(out), "--context", "64", "--calibrate"]
    assert main([*args, "--margin", "0.1"]) == 0
    record = json.loads((tmp_path / "run" / "selection_cr1.json").read_text())
    cal = record["calibration"]
    assert cal["compression_ratio"] >= 1.1 and cal["goal_compression_ratio"] == pytest.approx(1.1)
    saved = json.loads((out / "dms_adapters.json").read_text())
    assert saved["dms_config"]["logit_offset"] == cal["logit_offset"] and "lora" in saved
    chosen = load_file(out / ADAPTERS_SAFETENSORS)
    snap = load_file(snapshot_path(tmp_path / "run", record["chosen"]["step"]) / ADAPTERS_SAFETENSORS)
    assert set(chosen) == set(snap) and all(torch.equal(chosen[k], snap[k]) for k in snap)
    assert "[select] calibrated logit_offset" in capsys.readouterr().out
    beside = json.loads((out / "selection.json").read_text())  # the record travels with the artifact
    assert beside["calibration"] == cal and beside["chosen"] == record["chosen"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert beside["tokens"] == summary["tokens"] * record["chosen"]["step"] // summary["steps"]
    # every snapshot on the CR/KL front was calibrated; the lowest calibrated KL won
    front = pareto_front([SnapshotScore(**s) for s in record["snapshots"]], 1.0)
    tried = record["calibrated_candidates"]
    assert [c["step"] for c in tried] == [s.step for s in front] and len(tried) >= 1
    best = min(tried, key=lambda c: (c["kl"], -c["step"]))
    assert record["chosen"]["step"] == best["step"]
    assert {k: best[k] for k in cal} == cal


def test_select_candidate_cr_calibrates_snapshots_under_the_target(tmp_path, monkeypatch, capsys):
    """A run whose snapshots all sit under the target at their trained threshold: plain selection is
    refused; ``--candidate-cr`` lets calibration lower the threshold of each front snapshot to reach it."""
    recipe = _train_tiny(tmp_path, monkeypatch, snapshot_every=2)
    base_args = ["select", str(recipe), "--out", str(tmp_path / "probe"), "--context", "64"]
    assert main([*base_args, "--target", "1.0"]) == 0
    record = json.loads((tmp_path / "run" / "selection_cr1.json").read_text())
    scores = [SnapshotScore(**s) for s in record["snapshots"]]
    top = max(s.compression_ratio for s in scores)
    target = round(top * 1.1, 3)  # no snapshot reaches it at its trained threshold
    args = ["select", str(recipe), "--target", str(target), "--out", str(tmp_path / "out"), "--context", "64"]
    assert main([*args, "--calibrate", "--margin", "0"]) == 2  # names the highest CR, writes nothing
    assert "no snapshot reaches CR" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main([*args, "--candidate-cr", "1.0"]) == 2  # only with --calibrate
    assert "needs --calibrate" in capsys.readouterr().err

    assert main([*args, "--calibrate", "--margin", "0", "--candidate-cr", "1.0"]) == 0
    record = json.loads((tmp_path / "run" / f"selection_cr{target:g}.json").read_text())
    assert record["candidate_cr"] == 1.0 and "--candidate-cr" in record["rule"]
    tried = record["calibrated_candidates"]
    assert [c["step"] for c in tried] == [s.step for s in pareto_front(scores, 1.0)]
    cal = record["calibration"]
    assert cal["compression_ratio"] >= target > top
    saved = json.loads((tmp_path / "out" / "dms_adapters.json").read_text())["dms_config"]
    snap = snapshot_path(tmp_path / "run", record["chosen"]["step"]) / "dms_adapters.json"
    trained = json.loads(snap.read_text())["dms_config"]["logit_offset"]
    assert saved["logit_offset"] == cal["logit_offset"] < trained  # lowered: more evictions
    # loading the artifact carries the calibrated threshold
    model = dms.load_adapters(tiny_model(), tmp_path / "out")
    assert dms.dms_config(model).logit_offset == cal["logit_offset"]
    # a goal no threshold reaches: every candidate is skipped with its reason, then refused, nothing written
    none = str(tmp_path / "none")
    unreachable = ["select", str(recipe), "--target", "50", "--out", none, "--context", "64"]
    assert main([*unreachable, "--calibrate", "--candidate-cr", "1.0"]) == 2
    out, err = capsys.readouterr()
    assert "skipped: no decision offset reaches CR" in out
    assert "no candidate snapshot calibrates to CR 52.50" in err and not (tmp_path / "none").exists()

"""benchmarks/plot_run.py: a run's log in windows and its scored snapshots, from the run folder."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


def _import(monkeypatch):
    return benchmark_script("plot_run", monkeypatch)


def _record(step: int) -> dict:
    return {
        "step": step,
        "kl": step / 100,
        "eviction_rate": 0.5,
        "target_eviction_rate": 0.25 * (step > 2),
        "target_cr": 1.0 + step,
        "tokens_per_s": 10.0 * step,
    }


def test_windows_selection_and_outputs(tmp_path, monkeypatch):
    plot_run = _import(monkeypatch)
    run = tmp_path / "my_run"
    run.mkdir()
    # a resumed run rewrote step 3: the last record of a step counts
    lines = [_record(s) for s in (1, 2, 3)] + [{**_record(3), "kl": 0.5}] + [_record(s) for s in (4, 5)]
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    snaps = [
        {"step": 2, "path": "a", "compression_ratio": 3.5, "kl": 0.01},
        {"step": 4, "path": "b", "compression_ratio": 4.2, "kl": 0.03},
    ]
    sel = {
        "target_compression_ratio": 4.0,
        "context": 2048,
        "rows": 2,
        "rule": "lowest KL",
        "chosen": snaps[1],
        "snapshots": snaps,
    }
    (run / "selection_cr4.json").write_text(json.dumps(sel))
    calibrated = {"step": 4, "logit_offset": 4.5, "compression_ratio": 4.2, "kl": 0.035}
    (run / "selection_cr4_later.json").write_text(
        json.dumps({**sel, "from_step": 4, "snapshots": snaps[1:], "calibrated_candidates": [calibrated]})
    )
    out = tmp_path / "res" / "curve.json"
    payload = plot_run.main([str(run), "--every", "2", "--out", str(out)])
    first, second, third = payload["windows"]
    assert (first["first_step"], first["last_step"], third["last_step"]) == (1, 2, 5)
    assert first["kl"] == pytest.approx(0.015) and second["kl"] == pytest.approx((0.5 + 0.04) / 2)
    assert second["target_eviction_rate"] == pytest.approx(0.25) and second["target_cr"] == 5.0
    assert payload["steps"] == 5
    md = (tmp_path / "res" / "curve.md").read_text()
    assert "| 4 | 4.20 | 0.0300 |  | chosen |" in md and "| 2 | 3.50 | 0.0100 |  |  |" in md
    assert "| 4 | 4.20 | 0.0300 | +4.500, 4.20, 0.0350 | chosen |" in md  # the calibrated record
    assert md.index("record `selection_cr4.json`") < md.index("record `selection_cr4_later.json`")
    assert (tmp_path / "res" / "curve.png").stat().st_size > 1000


def test_a_folder_without_a_log_is_refused(tmp_path, monkeypatch):
    plot_run = _import(monkeypatch)
    with pytest.raises(SystemExit, match="train_log.jsonl does not exist"):
        plot_run.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="--every must be >= 1"):
        plot_run.main([str(tmp_path), "--every", "0"])

"""benchmarks/profile_decode.py: the dry run on CPU writes a table whose op counts are real."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


@pytest.fixture
def profile_decode(monkeypatch):
    return benchmark_script("profile_decode", monkeypatch, "common")


def test_cpu_dry_run_counts_more_ops_for_dms_and_the_same_count_at_every_batch(profile_decode, tmp_path):
    out = tmp_path / "p.json"
    argv = ["--shape", "small", "--layers", "2", "--context", "300", "--batches", "1", "3"]
    argv += ["--device", "cpu", "--dtype", "float32", "--timed", "2", "--out", str(out)]
    assert profile_decode.main(argv) == 0
    rows = {(r["batch"], r["cache"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(1, "dynamic"), (1, "dms"), (3, "dynamic"), (3, "dms")}
    for bsz in (1, 3):  # DMS's bookkeeping adds ops; no kernels on a CPU
        assert rows[bsz, "dms"]["aten_ops"] > rows[bsz, "dynamic"]["aten_ops"] > 0
        assert rows[bsz, "dms"]["kernels"] == 0 and rows[bsz, "dms"]["step_ms_median"] > 0
        assert rows[bsz, "dms"]["top"] and rows[bsz, "dms"]["top"][0]["name"].startswith("aten::")
    # no loop over rows: the DMS step dispatches the same number of ops at batch 1 and 3
    assert rows[3, "dms"]["aten_ops"] == rows[1, "dms"]["aten_ops"]
    assert "| 3 | dms |" in (tmp_path / "p.md").read_text()

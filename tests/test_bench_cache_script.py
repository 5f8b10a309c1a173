"""benchmarks/bench_cache.py: a CPU dry run on a tiny random model writes every kind of row."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


@pytest.fixture
def bench_cache(monkeypatch):
    return benchmark_script("bench_cache", monkeypatch, "common")


def test_dry_run_with_graphs_reports_the_graph_decoder_next_to_the_dense_caches(bench_cache, tmp_path):
    out = tmp_path / "c.json"
    argv = ["--model", "tiny-random", "--contexts", "200", "--batches", "1", "2", "--decode-tokens", "5"]
    argv += ["--repeats", "1", "--window", "16", "--block-size", "16", "--graphs", "--out", str(out)]
    assert bench_cache.main(argv) == 0
    payload = json.loads(out.read_text())
    assert [r["batch"] for r in payload["rows"]] == [1, 2]
    for row in payload["rows"]:
        for kind in ("dynamic", "static", "dms", "dms-graph"):
            run = row[kind]
            assert run["decode_tok_s"] > 0 and run["first_step_ms"] > 0 and run["ops_per_decode_step"] > 0
        # keep 1 of 8 outside a 16-token window, at 200 tokens: far fewer bytes than dense
        assert row["dms-graph"]["compression_ratio"] > 3 and row["dms"]["compression_ratio"] > 3
        assert row["decode_speedup_graph"] > 0
    targets = [t["target"] for t in payload["targets"]]
    assert any("GraphDecoder" in t for t in targets)
    md = (tmp_path / "c.md").read_text()
    assert "| 2 | 200 | dms-graph |" in md and (tmp_path / "c.png").stat().st_size > 0

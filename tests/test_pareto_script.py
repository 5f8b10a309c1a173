"""benchmarks/pareto.py: heads and ablation results against the issue's quality targets; heads are
labelled by result file and their tokens come only from what the result recorded or ``--tokens``
(never from a folder that may now hold other heads)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import benchmark_script


def _method(cr: float, kl: float, match: float, keys: dict[str, float]) -> dict:
    fid = {"src": {"2048": {"compression_ratio": cr, "kl_per_token": kl, "token_match": match}}}
    return {"fidelity": fid, "passkey": {c: {"accuracy": a} for c, a in keys.items()}}


def test_points_and_verdicts(tmp_path, monkeypatch):
    pareto = benchmark_script("pareto", monkeypatch)

    unc = {"1024": {"accuracy": 1.0}, "2048": {"accuracy": 0.5}, "4096": {"accuracy": 0.5}}
    heads = {
        "passkey_uncompressed": unc,
        "methods": {
            "good4": _method(4.2, 0.03, 0.96, {"1024": 0.98, "2048": 0.5}),
            "bad8": _method(8.1, 0.2, 0.85, {"1024": 0.5, "2048": 0.25}),
            "low": _method(3.5, 0.01, 0.99, {"1024": 1.0, "2048": 0.5}),
            # CR 8's pass-key target is at 1K and 2K only; CR 4's includes 4K
            "good8_weak4k": _method(8.2, 0.09, 0.91, {"1024": 0.95, "2048": 0.45, "4096": 0.1}),
            "cr4_weak4k": _method(4.2, 0.03, 0.96, {"1024": 1.0, "2048": 0.5, "4096": 0.1}),
            "cr4_all": _method(4.2, 0.03, 0.96, {"1024": 0.96, "2048": 0.5, "4096": 0.5}),
            "fidelity_only": _method(8.3, 0.06, 0.92, {}),
        },
    }
    (tmp_path / "heads.json").write_text(json.dumps(heads))
    row = {
        "variant": "v",
        "tokens": 1000,
        "passkey_uncompressed": unc,
        **_method(5.0, 0.05, 0.9, {"1024": 1.0}),
    }
    (tmp_path / "abl.json").write_text(json.dumps({"rows": [row]}))
    out = tmp_path / "res" / "pareto.json"
    payload = pareto.main(
        ["--heads", str(tmp_path / "heads.json"), "--ablation", str(tmp_path / "abl.json"), "--out", str(out)]
    )
    verdicts = {p["label"]: pareto.verdict(p) for p in payload["points"]}
    assert verdicts["good4 [heads]"] == "CR 4: meets where measured; no pass keys at 4096"
    assert verdicts["bad8 [heads]"] == "CR 8: misses KL 0.200 > 0.1, match 0.85 < 0.9, pass key -50 pts"
    assert verdicts["low [heads]"] == "below CR 4 (3.50)"
    assert verdicts["good8_weak4k [heads]"] == "CR 8: meets"
    assert verdicts["cr4_weak4k [heads]"] == "CR 4: misses pass key -40 pts"
    assert verdicts["cr4_all [heads]"] == "CR 4: meets"
    assert verdicts["fidelity_only [heads]"] == "CR 8: meets where measured; no pass keys at 1024, 2048"
    assert (
        verdicts["ablation:v"]
        == "CR 4: misses KL 0.050 > 0.04, match 0.90 < 0.95; no pass keys at 2048, 4096"
    )
    assert {p["label"]: p["tokens"] for p in payload["points"]}["ablation:v"] == 1000
    md = out.with_suffix(".md").read_text()
    assert "| good4 [heads] |" in md and out.with_suffix(".png").exists()


def _import(monkeypatch):
    return benchmark_script("pareto", monkeypatch)


def _fid(cr, kl, match):
    return {"2048": {"compression_ratio": cr, "kl_per_token": kl, "token_match": match}}


def _heads(path: Path, tokens=None) -> Path:
    method = {
        "adapters": "artifacts/x",
        "fidelity": {"a": _fid(4.2, 0.03, 0.96), "b": _fid(4.0, 0.05, 0.94)},
        "passkey": {"1024": {"accuracy": 0.9}, "2048": {"accuracy": 0.5}},
    }
    if tokens:
        method["training_tokens"] = tokens
    unc = {"1024": {"accuracy": 0.95}, "2048": {"accuracy": 0.5}}
    path.write_text(json.dumps({"methods": {"x": method}, "passkey_uncompressed": unc}))
    return path


def test_points_labels_tokens_and_verdict(tmp_path, monkeypatch):
    pareto = _import(monkeypatch)
    recorded = _heads(tmp_path / "new_eval.json", tokens=1000)
    old = _heads(tmp_path / "old_eval.json")
    (a,) = pareto.points_from_heads(recorded, {"x [old_eval]": 5})
    (b,) = pareto.points_from_heads(old, {"x [new_eval]": 5})
    (c,) = pareto.points_from_heads(recorded, {"x [new_eval]": 5})
    assert a["label"] == "x [new_eval]" and a["tokens"] == 1000  # recorded; --tokens names another result
    assert c["tokens"] == 5  # --tokens replaces what a result recorded (a warm start's earlier tokens)
    assert b["label"] == "x [old_eval]" and b["tokens"] is None  # unknown, not guessed
    assert abs(a["compression_ratio"] - 4.1) < 1e-9 and abs(a["kl"] - 0.04) < 1e-9
    assert abs(a["passkey_gap"]["1024"] + 0.05) < 1e-9 and a["passkey_gap"]["2048"] == 0.0
    assert pareto.verdict(a) == "CR 4: meets where measured; no pass keys at 4096"
    assert pareto.verdict({**a, "kl": 0.06}) == "CR 4: misses KL 0.060 > 0.04; no pass keys at 4096"
    out = tmp_path / "res" / "p.json"
    pareto.main(["--heads", str(old), "--tokens", "x [old_eval]=77", "--out", str(out)])
    assert json.loads(out.read_text())["points"][0]["tokens"] == 77
    assert (tmp_path / "res" / "p.png").stat().st_size > 1000

"""benchmarks/eval_heads.py end to end on a tiny model: fidelity per source, pass keys with intervals."""

from __future__ import annotations

import json
import math

import pytest
from conftest import benchmark_script, stdlib_texts, tiny_chat_tokenizer, tiny_model

import modelopt_dms as dms

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_heads_reports_every_source_and_wilson_intervals(tmp_path, monkeypatch):
    texts = stdlib_texts()
    for folder, names in (("a", list(texts)[:2]), ("b", list(texts)[1:])):
        (tmp_path / folder).mkdir()
        for i, name in enumerate(names):
            for k in range(3):  # several files per source: each source has its own held-out file
                (tmp_path / folder / f"{i}_{k}_{name}").write_text(f"Part {k} of {name}.\n" + texts[name])
    tok = tiny_chat_tokenizer(list(texts.values()))
    model = tiny_model("llama", max_position_embeddings=1024)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    dms_model = dms.apply_dms(tiny_model("llama", max_position_embeddings=1024), dms.DMSConfig(window_size=4))
    dms.save_adapters(dms_model, tmp_path / "heads")

    monkeypatch.chdir(tmp_path)
    eval_heads = benchmark_script("eval_heads", monkeypatch)

    out = tmp_path / "res" / "heads.json"
    argv = ["--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "heads")]
    argv += ["--sources", str(tmp_path / "a" / "*"), str(tmp_path / "b" / "*"), "--contexts", "64"]
    argv += ["--texts", "1", "--generate", "4", "--passkey-source", str(tmp_path / "a" / "*")]
    argv += ["--passkey-contexts", "700", "--passkey-depths", "0.5", "--passkey-seeds", "3"]
    argv += ["--threads", "1", "--out", str(out)]
    res = eval_heads.main(argv)

    saved = json.loads(out.read_text())
    entry = saved["methods"]["heads"]
    assert set(entry["fidelity"]) == {str(tmp_path / "a" / "*"), str(tmp_path / "b" / "*")}
    for by_ctx in entry["fidelity"].values():
        r = by_ctx["64"]
        assert r["n"] == 1 and math.isfinite(r["kl_per_token"]) and r["compression_ratio"] >= 1
    for r in (entry["passkey"]["700"], saved["passkey_uncompressed"]["700"]):
        assert r["n"] == 3
        lo, hi = r["ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1 and hi - lo > 0.4  # 3 answers: a wide interval
    md = out.with_suffix(".md").read_text()
    assert "95% CI" in md and f"{entry['passkey']['700']['correct']}/3" in md
    assert out.with_suffix(".png").stat().st_size > 0
    assert res["methods"]["heads"]["window_size"] == 4

    # the flag alone: fidelity only, no pass-key table
    only = tmp_path / "res" / "fidelity_only.json"
    argv = [*argv[: argv.index("--passkey-contexts") + 1], *argv[argv.index("--passkey-depths") :]]
    eval_heads.main([*argv[:-1], str(only)])
    saved = json.loads(only.read_text())
    assert saved["methods"]["heads"]["passkey"] == {} and "passkey_uncompressed" not in saved
    assert saved["methods"]["heads"]["fidelity"] == entry["fidelity"]
    assert "pass-key" not in only.with_suffix(".md").read_text()

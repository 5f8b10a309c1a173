"""benchmarks/bench_layouts.py on a tiny model with ragged per-head decisions: the paged layout holds
the kept tokens plus at most part of a page per (row, head); the blocked one pads to the longest."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import benchmark_script, stdlib_texts, tiny_chat_tokenizer, tiny_model

import modelopt_dms as dms

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layouts_bench_reports_paged_within_a_page_per_head_of_kept(tmp_path, monkeypatch):
    texts = stdlib_texts()
    (tmp_path / "text").mkdir()
    for i, (name, text) in enumerate(texts.items()):
        for k in range(3):
            (tmp_path / "text" / f"{i}_{k}_{name}").write_text(f"Part {k} of {name}.\n" + text * 3)
    tok = tiny_chat_tokenizer(list(texts.values()))
    model = tiny_model("llama", max_position_embeddings=1024, num_key_value_heads=4, num_attention_heads=8)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    heads = dms.apply_dms(
        tiny_model("llama", max_position_embeddings=1024, num_key_value_heads=4, num_attention_heads=8),
        dms.DMSConfig(window_size=4),
    )
    with torch.no_grad():  # ragged per-head retention: head h evicts more the larger h is
        for m in dms.dms_modules(heads):
            m.dms_adapter.proj.weight.zero_()
            m.dms_adapter.norm_weight.fill_(1.0)
            m.dms_adapter.proj.weight[:, 0] = torch.tensor([-1.0, 0.0, 1.0, 2.0]) * 0.5
            m.dms_adapter.proj.weight[:, 1] = torch.tensor([0.0, 0.3, 0.6, 0.9])
    dms.save_adapters(heads, tmp_path / "heads")

    monkeypatch.chdir(tmp_path)
    bench_layouts = benchmark_script("bench_layouts", monkeypatch)

    out = tmp_path / "res" / "layouts.json"
    argv = ["--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "heads")]
    argv += ["--source", str(tmp_path / "text" / "*"), "--contexts", "300", "--page-sizes", "4", "16"]
    argv += ["--decode", "5", "--threads", "1", "--out", str(out)]
    bench_layouts.main(argv)

    saved = json.loads(out.read_text())
    rows = {(r["layout"], r["page_size"]): r for r in saved["rows"]}
    assert set(rows) == {("blocked", None), ("paged", 4), ("paged", 16)}
    kept = {r["after_decode"]["kept_mib"] for r in rows.values()}
    assert len(kept) == 1, "the layouts must keep the same tokens"
    layers, kv_heads, head_dim = 2, 4, 16
    for page in (4, 16):
        for when in ("after_prefill", "after_decode"):
            b = rows[("paged", page)][when]
            # live pages: kept + < 1 page per (row, head); then at most one free page per (row, head)
            # and the trash page per layer; fp32 K and V
            slack = layers * (2 * kv_heads + 1) * page * head_dim * 2 * 4 / 2**20
            assert b["kept_mib"] <= b["alloc_mib"] <= b["kept_mib"] + slack + 1e-3, (page, when, b)
    ragged = rows[("blocked", None)]["after_prefill"]
    assert ragged["alloc_over_kept"] > rows[("paged", 4)]["after_prefill"]["alloc_over_kept"]
    md = out.with_suffix(".md").read_text()
    assert "| 300 | paged | 4 |" in md and "| 300 | blocked | - |" in md

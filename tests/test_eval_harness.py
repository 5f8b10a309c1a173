"""The comparison harness: metrics vs hand computations, task construction, method adapters
(dense, DMS, kvpress) on a tiny model against independent references, budget matching, reports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_chat_tokenizer, tiny_model

import modelopt_dms as dms
from modelopt_dms.evaluation.config import EvalConfig as EvalSection
from modelopt_dms.evaluation.harness import evaluate_sample, task_cells
from modelopt_dms.evaluation.methods import DenseMethod, DMSMethod, PressMethod, make_press
from modelopt_dms.evaluation.metrics import (
    mean_kl,
    needle_recall,
    perplexity,
    top1_agreement,
    wilson_interval,
)
from modelopt_dms.evaluation.report import (
    goal_checks,
    render_markdown,
    summarize,
    update_readme,
    write_report,
)
from modelopt_dms.evaluation.tasks import (
    EvalSample,
    make_fidelity_sample,
    make_multi_turn_sample,
    make_needle_sample,
)

kvpress = pytest.importorskip("kvpress", reason="kvpress is in the bench extra")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. 0123456789 "
    "user assistant system door code pass key locker remember answer question document "
    "What is the pass key? Answer with the 5-digit number only. There is a pass key hidden in the "
    "following text. Find it and remember it. Door codes are hidden. What is the code for the red "
    "door? My locker code is 7311. Please remember it. Okay, I will remember it. Here is a document: "
    "Did you read it? Yes, I have read the document. What is my locker code? Your locker code is "
)


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer([TEXT * 20])


@pytest.fixture(scope="module")
def stream(tok):
    return tok(TEXT * 60, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- metrics vs hand computations


def test_mean_kl_hand_case():
    ref = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]]))
    new = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]]]))
    # position 0: 0.5 ln2 + 0.25 ln(1/2) + 0 = 0.25 ln 2; position 1: 0
    assert mean_kl(ref, new) == pytest.approx(0.125 * math.log(2), abs=1e-6)
    assert mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(ref, new + 7.0) == pytest.approx(0.125 * math.log(2), abs=1e-6)  # shift invariant
    with pytest.raises(ValueError, match="shapes differ"):
        mean_kl(ref, new[:, :1])


def test_top1_agreement_hand_case():
    ref = torch.tensor([[[3.0, 1, 0], [0, 2, 1], [0, 0, 1]]])
    new = torch.tensor([[[2.0, 1, 0], [0, 1, 2], [0, 0, 5]]])
    assert top1_agreement(ref, new) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        top1_agreement(ref, new[:, :2])


def test_perplexity_hand_cases():
    assert perplexity(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0])) == pytest.approx(4.0)
    logits = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-30], [0.25, 0.25, 0.5]]))
    # p(label) = 0.5 and 0.25 -> exp(-(ln .5 + ln .25) / 2) = 2 ** 1.5
    assert perplexity(logits, torch.tensor([0, 1])) == pytest.approx(2**1.5, rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        perplexity(torch.zeros(3, 4), torch.tensor([0, 1]))


def test_needle_recall_counts_whole_numbers():
    assert needle_recall("The pass key is 12345.", ["12345"]) == 1.0
    assert needle_recall("123456", ["12345"]) == 0.0  # a longer number is not the key
    assert needle_recall("key 1234 then 12345", ["12345", "54321"]) == 0.5
    assert needle_recall("12345 12345", ["12345", "54321"]) == 0.5
    assert needle_recall("no digits", ["1"]) == 0.0
    with pytest.raises(ValueError):
        needle_recall("x", [])


# ---------------------------------------------------------------- tasks


def test_needle_sample_layout(tok, stream):
    s = make_needle_sample(tok, stream, 300, 1, seed=3, depth=0.5)
    assert s.input_tokens == 300 and len(s.segments) == 2 and s.task == "needle"
    text = tok.decode(s.segments[0][0])
    key = s.answers[0]
    assert len(key) == 5 and f"The pass key is {key}." in text
    question = tok.decode(s.segments[1][0])
    assert key not in question and "What is the pass key?" in question
    assert question.rstrip().endswith("<|im_start|>assistant")
    # the needle sits at about half of the filler
    pos = text.index(f"The pass key is {key}")
    assert 0.35 < pos / len(text) < 0.65
    again = make_needle_sample(tok, stream, 300, 1, seed=3, depth=0.5)
    assert torch.equal(again.segments[0], s.segments[0])  # deterministic


def test_multi_needle_sample_has_distractors(tok, stream):
    s = make_needle_sample(tok, stream, 320, 3, seed=5)
    ctx = tok.decode(s.segments[0][0])
    q = tok.decode(s.segments[1][0])
    assert s.task == "multi_needle" and s.input_tokens == 320 and len(s.answers) == 1
    assert ctx.count("The code for the") == 3
    door = q.split("What is the code for the ")[1].split(" door")[0]
    assert f"The code for the {door} door is {s.answers[0]}." in ctx
    assert q.endswith(f"The code for the {door} door is")
    assert sorted(s.depths) == s.depths and all(0 < d < 1 for d in s.depths)


def test_multi_turn_sample_segments_are_the_conversation(tok, stream):
    s = make_multi_turn_sample(tok, stream, 300, seed=1)
    assert s.task == "multi_turn" and len(s.segments) == 3 and s.prefix_segments == 2
    assert s.input_tokens == 300
    t1, t2, t3 = (tok.decode(x[0]) for x in s.segments)
    assert f"My locker code is {s.answers[0]}" in t1 and "<|im_start|>assistant" in t1
    assert "Here is a document" in t2 and s.answers[0] not in t2
    assert t3.endswith("Your locker code is") and "What is my locker code?" in t3


def test_fidelity_sample_and_errors(tok, stream):
    row = torch.tensor(stream[:100])
    s = make_fidelity_sample(row, 80, "f")
    assert s.segments[0].shape == (1, 80) and s.scored.shape == (1, 20)
    assert torch.equal(torch.cat([s.segments[0], s.scored], 1)[0], row)
    with pytest.raises(ValueError, match="too short"):
        make_fidelity_sample(row, 99, "f")
    with pytest.raises(ValueError, match="too short"):
        make_needle_sample(tok, stream, 40, 1, seed=0)
    with pytest.raises(ValueError, match="filler"):
        make_needle_sample(tok, stream[:50], 300, 1, seed=0)


# ---------------------------------------------------------------- method adapters


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", attn="sdpa", seed=1)


def _sample(tok, stream, n_ctx=120, n_q=9, scored=False) -> EvalSample:
    ids = torch.tensor([stream[: n_ctx + n_q]])
    if scored:
        return EvalSample("fidelity", "f", [ids[:, :n_ctx]], n_ctx, scored=ids[:, n_ctx:])
    return EvalSample(
        "needle", "q", [ids[:, :n_ctx], ids[:, n_ctx:]], n_ctx + n_q, answers=["1"], max_new_tokens=6
    )


def test_dense_method_matches_hf_generate(base, tok, stream):
    s = _sample(tok, stream)
    res = DenseMethod(base, tok).run(s)
    full = torch.cat(s.segments, 1)
    ref = base.generate(
        input_ids=full,
        attention_mask=torch.ones_like(full),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )[0, full.shape[1] :]
    assert res.generated == ref.tolist()[: len(res.generated)]
    cfg = base.config
    assert res.kept_tokens == full.shape[1]
    assert res.kv_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * full.shape[1] * 16 * 4


def test_press_without_compression_equals_dense(base, tok, stream):
    s = _sample(tok, stream, scored=True)
    dense = DenseMethod(base, tok).run(s)
    press = PressMethod(base, tok, "knorm", "cr4", 4.0).run(s, kept_target=float(s.input_tokens))
    assert press.kept_tokens == s.input_tokens
    torch.testing.assert_close(press.scored_logits, dense.scored_logits, atol=1e-5, rtol=0)


def test_streaming_llm_matches_masked_dense_reference(base, tok, stream):
    """StreamingLLM keeps 4 sink + the last tokens of the context: the question's logits must equal
    a full forward whose 4D mask hides the evicted context tokens from the question positions."""
    n_ctx, n_q, keep = 120, 9, 40
    s = _sample(tok, stream, n_ctx, n_q)
    method = PressMethod(base, tok, "streaming_llm", "cr4", 4.0)
    captured = {}
    step = method._step

    def spy(cache, ids, pos):
        out = step(cache, ids, pos)
        captured.setdefault("logits", out)
        return out

    method._step = spy
    res = method.run(s, kept_target=float(keep + n_q))
    assert res.kept_tokens == keep + n_q and res.target_kept == keep + n_q
    kept_ctx = list(range(4)) + list(range(n_ctx - (keep - 4), n_ctx))
    total = n_ctx + n_q
    mask = torch.full((1, 1, total, total), torch.finfo(torch.float32).min)
    for i in range(total):
        visible = range(i + 1) if i < n_ctx else [*kept_ctx, *range(n_ctx, i + 1)]
        mask[0, 0, i, list(visible)] = 0.0
    with torch.no_grad():
        ref = base(input_ids=torch.cat(s.segments, 1), attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(captured["logits"][0], ref[0, n_ctx:], atol=1e-4, rtol=0)
    cfg = base.config
    assert res.kv_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (keep + n_q) * 16 * 4


@pytest.mark.parametrize("name", ["snapkv", "tova", "expected_attention", "keydiff", "dms_press"])
def test_every_press_hits_its_kept_token_target(base, tok, stream, name):
    s = _sample(tok, stream, 160, 9)
    res = PressMethod(base, tok, name, "cr4", 4.0, window=16).run(s, kept_target=69.0)
    # DMSPress masks whole (layer, head, token) entries: exact up to one entry per head
    assert res.kept_tokens == pytest.approx(69.0, abs=0.5 if name == "dms_press" else 0.0)
    assert len(res.generated) >= 1
    full = 2 * 2 * 2 * s.input_tokens * 16 * 4
    assert res.kv_bytes == (full if name == "dms_press" else full * 69 // s.input_tokens)


def test_press_nominal_budget_and_infeasible_target(base, tok, stream):
    s = _sample(tok, stream, 120, 9)
    res = PressMethod(base, tok, "knorm", "cr4", 4.0).run(s)  # no DMS to match: input / 4
    assert res.target_kept == pytest.approx(129 / 4) and res.feasible
    assert res.kept_tokens == round(129 / 4 - 9) + 9
    res = PressMethod(base, tok, "knorm", "cr4", 4.0).run(s, kept_target=5.0)  # < question length
    assert not res.feasible and res.kept_tokens == 1 + 9
    with pytest.raises(ValueError, match="unknown press"):
        make_press("nope")


def test_dms_method_and_budget_matching(base, tok, stream):
    model = dms.apply_dms(tiny_model("llama", attn="sdpa", seed=1), {"window_size": 8})
    s = _sample(tok, stream, 120, 9)
    with dms.fixed_eviction(model, keep_every=4):
        method = DMSMethod(model, tok, "dms@cr4", "cr4")
        res = method.run(s)
        cache = dms.DMSCache()
        for seg in s.segments:
            model(input_ids=seg, past_key_values=cache)
        assert res.kept_tokens == pytest.approx(float(dms.cache_stats(cache)["tokens_kept"].float().mean()))
        assert res.kept_tokens < s.input_tokens / 2
        methods = [
            DenseMethod(base, tok),
            method,
            PressMethod(base, tok, "knorm", "cr4", 4.0),
            PressMethod(base, tok, "tova", "cr8", 8.0),
        ]
        recs = evaluate_sample(s, methods, tok)
    by = {r["method"]: r for r in recs}
    assert by["knorm@cr4"]["target_kept"] == pytest.approx(by["dms@cr4"]["kept_tokens"], abs=0.01)
    assert by["knorm@cr4"]["kept_tokens"] == pytest.approx(by["dms@cr4"]["kept_tokens"], abs=1.0)
    assert by["tova@cr8"]["target_kept"] == pytest.approx(129 / 8, abs=0.01)  # no DMS at cr8: nominal
    assert by["uncompressed"]["compression_ratio"] == 1.0
    assert all(r["score"] in (0.0, 1.0) for r in recs)


def test_fidelity_records_compare_to_the_reference(base, tok, stream):
    s = _sample(tok, stream, 100, 30, scored=True)
    recs = evaluate_sample(s, [DenseMethod(base, tok), PressMethod(base, tok, "knorm", "cr4", 4.0)], tok)
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and recs[0]["top1"] == 1.0
    assert recs[1]["kl"] > 0 and 0 <= recs[1]["top1"] <= 1 and recs[1]["ppl"] > 1


# ---------------------------------------------------------------- reports, config


def _rec(task, method, family, budget, score, kept=100.0, **extra):
    return {
        "task": task,
        "method": method,
        "family": family,
        "budget": budget,
        "score": score,
        "compression_ratio": 400 / kept,
        "kept_tokens": kept,
        "input_tokens": 400,
        "kv_bytes": int(kept * 1024),
        "budget_feasible": True,
        "context_tokens": 400,
        **extra,
    }


_META = {
    "model": "m",
    "cpu": "x",
    "threads": 2,
    "torch": "t",
    "rounds_completed": 2,
    "seconds": 60.0,
    "command": "modelopt-dms eval r.yaml",
}


def test_summary_goal_checks_markdown_and_plots(tmp_path):
    records = [
        _rec("needle", "uncompressed", "dense", None, 1.0, 400),
        _rec("needle", "uncompressed", "dense", None, 1.0, 400),
        _rec("needle", "dms@cr4", "dms", "cr4", 1.0),
        _rec("needle", "dms@cr4", "dms", "cr4", 0.5),
        _rec("needle", "snapkv@cr4", "kvpress", "cr4", 0.0),
        _rec("needle", "snapkv@cr4", "kvpress", "cr4", 1.0),
        _rec("fidelity", "uncompressed", "dense", None, 1.0, 400, kl=0.0, ppl=5.0),
        _rec("fidelity", "dms@cr4", "dms", "cr4", 0.9, kl=0.1, ppl=6.0),
        _rec("fidelity", "snapkv@cr4", "kvpress", "cr4", 0.95, kl=0.05, ppl=5.5),
        _rec("multi_turn", "dms@cr4", "dms", "cr4", 0.0),
        _rec("multi_turn", "knorm@cr4", "kvpress", "cr4", 0.0),
    ]
    summary = summarize(records)
    row = {r["method"]: r for r in summary["needle"]}
    assert row["dms@cr4"]["score"] == 0.75 and row["dms@cr4"]["n"] == 2
    assert row["snapkv@cr4"]["score"] == 0.5 and row["uncompressed"]["kv_mib"] == 400 * 1024 / 2**20
    checks = {(c["task"], c["check"]): c["pass"] for c in goal_checks(summary)}
    assert checks[("needle", "dms@cr4 >= best press at cr4")] is True
    assert checks[("needle", "dms@cr4 within 5 points of uncompressed")] is False
    assert checks[("fidelity", "dms@cr4 >= best press at cr4")] is False
    assert checks[("multi_turn", "dms@cr4 >= best press at cr4")] is None  # both 0: no verdict
    results = {"meta": _META, "records": records}
    md = render_markdown(results)
    assert row["dms@cr4"]["ci95"] == list(wilson_interval(1.5, 2)) and "fidelity" not in [
        t for t, rows in summary.items() if "ci95" in rows[0]
    ]
    assert (
        "| dms@cr4 | 2 | 75.0 (20\u201397) |" in md
        and "Wilson 95%" in md
        and "FAIL" in md
        and "KL (nats)" in md
        and "n/a (both 0)" in md
    )
    paths = write_report(results, str(tmp_path))
    assert (tmp_path / "pareto_needle.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["goal_checks"]
    assert open(paths["markdown"]).read() == md


def test_goal_checks_follow_the_retrofit_targets_per_budget():
    """CR 4: CR, top-1 >= 95%, KL <= 0.04, pass keys within 5 points at 1K/2K/4K (8K unchecked),
    multi-turn >= uncompressed; CR 8: top-1 >= 90%, KL <= 0.10, within 10 points at 1K/2K only."""
    records = []
    for ctx, dense, cr4, cr8 in (
        (1024, 1.0, 0.95, 0.9),
        (2048, 1.0, 0.9, 0.85),
        (4096, 0.5, 0.5, 0.0),
        (8192, 1.0, 0.0, 0.0),
    ):
        for method, family, budget, score in (
            ("uncompressed", "dense", None, dense),
            ("dms@cr4", "dms", "cr4", cr4),
            ("dms@cr8", "dms", "cr8", cr8),
        ):
            records.append(_rec("needle", method, family, budget, score, context_tokens=ctx))
    records += [
        _rec("fidelity", "uncompressed", "dense", None, 1.0, 400, kl=0.0, ppl=5.0),
        _rec("fidelity", "dms@cr4", "dms", "cr4", 0.95, 90.0, kl=0.04, ppl=5.1),  # CR 4.44
        _rec("fidelity", "dms@cr8", "dms", "cr8", 0.91, 51.0, kl=0.11, ppl=5.9),  # CR 7.84
        _rec("multi_turn", "uncompressed", "dense", None, 0.5),
        _rec("multi_turn", "dms@cr4", "dms", "cr4", 0.5),
        _rec("multi_turn", "dms@cr8", "dms", "cr8", 0.0),
    ]
    checks = {(c["task"], c["check"]): c for c in goal_checks(summarize(records))}
    verdicts = {k: c["pass"] for k, c in checks.items()}
    assert verdicts == {
        ("needle", "dms@cr4 within 5 points of uncompressed at 1024"): True,
        ("needle", "dms@cr4 within 5 points of uncompressed at 2048"): False,
        ("needle", "dms@cr4 within 5 points of uncompressed at 4096"): True,
        ("needle", "dms@cr8 within 10 points of uncompressed at 1024"): True,
        ("needle", "dms@cr8 within 10 points of uncompressed at 2048"): False,
        ("fidelity", "dms@cr4 achieved CR >= 4"): True,
        ("fidelity", "dms@cr4 top-1 >= 95%"): True,
        ("fidelity", "dms@cr4 KL <= 0.04"): True,
        ("fidelity", "dms@cr8 achieved CR >= 8"): False,
        ("fidelity", "dms@cr8 top-1 >= 90%"): True,
        ("fidelity", "dms@cr8 KL <= 0.1"): False,
        ("multi_turn", "dms@cr4 >= uncompressed"): True,
    }
    md = render_markdown({"meta": _META, "records": records})
    assert "| fidelity | dms@cr8 KL <= 0.1 | 0.110 | 0.100 (target) | FAIL |" in md
    assert "| fidelity | dms@cr8 achieved CR >= 8 | 7.84 | 8.00 (target) | FAIL |" in md
    assert (
        "| needle | dms@cr4 within 5 points of uncompressed at 2048 | 90.0 | 100.0 (uncompressed) | FAIL |"
        in md
    )


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- comparison:start -->\nold\n<!-- comparison:end -->\noutro\n")
    update_readme(str(readme), "NEW TABLE", ["a/pareto_needle.png"])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n")
    assert "NEW TABLE" in text and "old" not in text and "![pareto_needle.png](a/pareto_needle.png)" in text
    readme.write_text("a\n<!-- short:start -->\n<!-- short:end -->\n" + readme.read_text())
    update_readme(str(readme), "SHORT", [], block="short")
    assert "SHORT" in readme.read_text() and "NEW TABLE" in readme.read_text()
    bare = tmp_path / "B.md"
    bare.write_text("no markers")
    with pytest.raises(ValueError, match="comparison:start"):
        update_readme(str(bare), "x", [])


def test_eval_section_validation():
    cfg = EvalSection(adapters={"cr4": "a"}, fp8_kv=["cr4"])
    assert [c[0] for c in task_cells(cfg)].count("needle") == len(cfg.needle_contexts)
    with pytest.raises(ValueError, match="no entry in budgets"):
        EvalSection(adapters={"cr16": "a"})
    with pytest.raises(ValueError, match="not an adapters label"):
        EvalSection(fp8_kv=["cr4"])
    with pytest.raises(ValueError):
        EvalSection(presses=["snapkv", "h2o"])
    with pytest.raises(ValueError, match=">= 1"):
        EvalSection(budgets={"cr4": 0.5})
    with pytest.raises(ValueError, match="too short"):
        EvalSection(needle_contexts=[64])


def test_committed_eval_recipe_validates():
    from modelopt_dms.evaluation.config import load_eval_recipe as load_recipe

    r = load_recipe("recipes/eval_smollm2_135m.yaml")
    assert r.eval is not None and set(r.eval.adapters) == {"cr4", "cr8"}
    assert load_recipe("recipes/eval_smollm2_135m_short.yaml").eval.rounds >= 6
    assert len(r.eval.presses) == 7 and max(r.eval.needle_contexts) == 8192
    multi_turn = load_recipe("recipes/eval_smollm2_135m_multi_turn.yaml").eval
    assert multi_turn.rounds >= 24 and task_cells(multi_turn) == [("multi_turn", 1024)]


def test_dms_press_needs_patched_attention_and_cleans_up(base, tok, stream):
    with pytest.raises(ValueError, match="sdpa"):
        PressMethod(tiny_model("llama", attn="eager"), tok, "dms_press", "cr4", 4.0)
    s = _sample(tok, stream, 160, 9)
    masked = PressMethod(base, tok, "dms_press", "cr4", 4.0, window=16).run(s, kept_target=69.0)
    assert all(layer.self_attn.masked_key_indices is None for layer in base.model.layers)
    # the masks change what the question sees: a different answer distribution than dense
    s_scored = _sample(tok, stream, 160, 9, scored=True)
    dense = DenseMethod(base, tok).run(s_scored)
    press = PressMethod(base, tok, "dms_press", "cr4", 4.0, window=16).run(s_scored, kept_target=60.0)
    assert masked.kept_tokens == pytest.approx(69.0, abs=0.5)
    assert mean_kl(dense.scored_logits, press.scored_logits) > 1e-6


def _tiny_eval_workspace(tmp_path, monkeypatch, tok) -> None:
    """A local tiny model, its text, trained-looking adapters and ``eval.yaml`` in ``tmp_path`` (cwd)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    for i in range(4):
        (tmp_path / "text" / f"doc{i}.txt").write_text(TEXT * (12 + i))
    base = tiny_model("llama", attn="sdpa", seed=2)
    base.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model = dms.apply_dms(tiny_model("llama", attn="sdpa", seed=2), {"window_size": 16})
    with torch.no_grad():  # random decisions that evict a fair share
        for m in dms.dms_modules(model):
            m.dms_adapter.proj.weight.normal_(0, 0.02)
    dms.save_adapters(model, tmp_path / "adapters")
    (tmp_path / "README.md").write_text("# x\n<!-- comparison:start -->\n<!-- comparison:end -->\n")
    (tmp_path / "eval.yaml").write_text(
        "model: {name_or_path: ./tiny}\n"
        "eval:\n"
        "  adapters: {cr4: adapters}\n"
        "  fp8_kv: [cr4]\n"
        "  presses: [streaming_llm, dms_press]\n"
        "  budgets: {cr4: 4.0, cr8: 8.0}\n"
        "  fidelity_contexts: [200]\n"
        "  continuation_tokens: 16\n"
        "  needle_contexts: [200, 300]\n"
        "  multi_needle_contexts: [400]\n"
        "  multi_turn_contexts: [400]\n"
        "  rounds: 2\n"
        "  press_window: 16\n"
        "  calib_sequences: 2\n"
        "  text_glob: text/*.txt\n"
        "  heldout_fraction: 0.25\n"
        "  out_dir: out\n"
    )


def test_cli_eval_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, tok, capsys):
    """`modelopt-dms eval` on a local tiny model: every file it promises, README block updated."""
    from modelopt_dms.cli import main

    _tiny_eval_workspace(tmp_path, monkeypatch, tok)
    assert main(["eval", "eval.yaml", "--no-progress", "--rounds", "1", "--readme", "README.md"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["rounds_completed"] == 1
    methods = {r["method"] for r in results["records"]}
    assert methods == {
        "uncompressed",
        "dms@cr4",
        "dms+fp8kv@cr4",
        "streaming_llm@cr4",
        "dms_press@cr4",
        "streaming_llm@cr8",
        "dms_press@cr8",
    }
    assert {r["task"] for r in results["records"]} == {"fidelity", "needle", "multi_needle", "multi_turn"}
    fp8 = [r for r in results["records"] if r["method"] == "dms+fp8kv@cr4"]
    bf = {r["sample"]: r for r in results["records"] if r["method"] == "dms@cr4"}
    assert all(r["kv_bytes"] < bf[r["sample"]]["kv_bytes"] for r in fp8)  # FP8 storage holds fewer bytes
    for task in ("fidelity", "needle", "multi_needle", "multi_turn"):
        assert (tmp_path / "out" / f"pareto_{task}.png").stat().st_size > 1000
    readme = (tmp_path / "README.md").read_text()
    assert "### Single-needle retrieval" in readme and "pareto_needle.png" in readme
    assert "| dms@cr4 |" in capsys.readouterr().out
    # the report re-renders from results.json alone
    (tmp_path / "out" / "comparison.md").unlink()
    assert main(["eval", "eval.yaml", "--report-only", "--readme", "README.md"]) == 0
    assert (tmp_path / "out" / "comparison.md").read_text() in (tmp_path / "README.md").read_text()
    # a recipe without an eval section, or a bad override, is a clear error (exit code 2)
    (tmp_path / "noeval.yaml").write_text("model: {name_or_path: ./tiny}\n")
    assert main(["eval", "noeval.yaml"]) == 2
    assert main(["eval", "eval.yaml", "--time-budget-min", "-1"]) == 2
    assert "no eval section" in capsys.readouterr().err


def test_cli_eval_resumes_after_the_last_finished_round(tmp_path, monkeypatch, tok, capsys):
    """A comparison killed in round 2 continues there: the records equal an uninterrupted run's,
    round 1 is not recomputed, and other heads (changed adapter bytes) start from round 1."""
    from modelopt_dms.cli import main
    from modelopt_dms.evaluation import harness

    _tiny_eval_workspace(tmp_path, monkeypatch, tok)
    (tmp_path / "eval.yaml").write_text(  # two tasks, one press: enough to see what is resumed
        "model: {name_or_path: ./tiny}\n"
        "eval: {adapters: {cr4: adapters}, presses: [streaming_llm], budgets: {cr4: 4.0},\n"
        "  fidelity_contexts: [200], continuation_tokens: 16, needle_contexts: [200],\n"
        "  multi_needle_contexts: [], multi_turn_contexts: [], rounds: 2, press_window: 16,\n"
        "  text_glob: text/*.txt, heldout_fraction: 0.25, out_dir: out}\n"
    )
    args = ["eval", "eval.yaml", "--no-progress", "--rounds", "2"]
    assert main([*args, "--out", "whole"]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert not (tmp_path / "whole" / harness.PARTIAL_NAME).exists()  # finished: no partial left

    make_sample, seen = harness._make_sample, []

    def dies_in_round_2(cell, rnd, *a, **kw):
        seen.append(rnd)
        if rnd == 1:
            raise RuntimeError("killed")  # what a kill mid-round leaves: round 1's records only
        return make_sample(cell, rnd, *a, **kw)

    monkeypatch.setattr(harness, "_make_sample", dies_in_round_2)
    with pytest.raises(RuntimeError, match="killed"):
        main([*args, "--out", "cut"])
    partial = json.loads((tmp_path / "cut" / harness.PARTIAL_NAME).read_text())
    assert partial["rounds_completed"] == 1 and not (tmp_path / "cut" / "results.json").exists()
    # --report-only renders the finished round; the partial run stays for the resume below
    assert main(["eval", "eval.yaml", "--report-only", "--out", "cut"]) == 0
    assert "unfinished run: rendering its 1 finished round(s) of 2" in capsys.readouterr().out
    shown = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert shown["meta"]["rounds_completed"] == 1 and shown["meta"]["from_partial"]
    assert shown["records"] == partial["records"] and (tmp_path / "cut" / harness.PARTIAL_NAME).exists()
    assert "the first 1 of 2 rounds of an unfinished run" in (tmp_path / "cut" / "comparison.md").read_text()

    def counted(cell, rnd, *a, **kw):
        seen.append(rnd)
        return make_sample(cell, rnd, *a, **kw)

    monkeypatch.setattr(harness, "_make_sample", counted)
    seen.clear()
    assert main([*args, "--out", "cut"]) == 0
    assert set(seen) == {1}, "round 1 was run again"
    assert "resuming after round 1 of 2" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["meta"]["resumed_after_round"] == 1 and resumed["meta"]["key"] == whole["meta"]["key"]
    method_min = sum(r["seconds"] for r in resumed["records"]) / 60  # both legs' rounds, not the last leg's
    header = (tmp_path / "cut" / "comparison.md").read_text().splitlines()[0]
    assert f"2 round(s) run in legs ({method_min:.1f} min of method runs in all)" in header
    assert "the last leg resumed after round 1" in header
    assert "run in legs" not in (tmp_path / "whole" / "comparison.md").read_text()
    drop = ("seconds",)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in drop} for r in recs]  # noqa: E731
    assert strip(resumed["records"]) == strip(whole["records"])
    assert not (tmp_path / "cut" / harness.PARTIAL_NAME).exists()

    # other cr4 heads: only the reference's finished round is reused
    monkeypatch.setattr(harness, "_make_sample", dies_in_round_2)
    with pytest.raises(RuntimeError, match="killed"):
        main([*args, "--out", "other"])
    model = dms.load_adapters(tiny_model("llama", attn="sdpa", seed=2), tmp_path / "adapters")
    with torch.no_grad():
        dms.dms_modules(model)[0].dms_adapter.proj.weight.mul_(2.0)
    dms.save_adapters(model, tmp_path / "adapters")
    seen.clear()
    monkeypatch.setattr(harness, "_make_sample", counted)
    assert main([*args, "--out", "other"]) == 0
    out = capsys.readouterr().out
    assert "the heads of cr4 changed" in out and "resuming after round 0 of 2" in out
    assert set(seen) == {0, 1}  # the cr4 methods run round 1 again (only the reference is kept)
    other = json.loads((tmp_path / "other" / "results.json").read_text())
    assert other["meta"]["resumed_after_round"] == 0 and other["meta"]["key"] != whole["meta"]["key"]

    # other settings: nothing is reused
    monkeypatch.setattr(harness, "_make_sample", dies_in_round_2)
    with pytest.raises(RuntimeError, match="killed"):
        main([*args, "--out", "settings"])
    recipe = (tmp_path / "eval.yaml").read_text()
    (tmp_path / "eval.yaml").write_text(recipe.replace("press_window: 16", "press_window: 8"))
    monkeypatch.setattr(harness, "_make_sample", make_sample)
    capsys.readouterr()
    assert main([*args, "--out", "settings"]) == 0
    out = capsys.readouterr().out
    assert "from another comparison" in out and "resuming" not in out


def test_wilson_interval_matches_the_textbook_values():
    # Newcombe (1998) / any statistics table: 5/10 -> (0.2366, 0.7634), 0/10 -> (0, 0.2775)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    assert wilson_interval(3, 3) == pytest.approx((0.43849, 1.0), abs=1e-5)
    lo, hi = wilson_interval(24, 24)
    assert hi == 1.0 and 0.86 < lo < 0.87  # 24 keys: a 100% score still only proves > 86%
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(4, 3)


def test_new_heads_for_one_label_recompute_only_that_labels_methods(tmp_path, monkeypatch, tok, capsys):
    """Heads of cr8 replaced after round 1 of 2: the resumed run recomputes round 1 for dms@cr8 and
    the presses at cr8 only (the reference runs again only where a scored sample needs its logits),
    keeps the reference and cr4 records, and ends with the records of an uninterrupted run with the
    new heads."""
    import shutil

    from modelopt_dms.cli import main
    from modelopt_dms.evaluation import harness

    _tiny_eval_workspace(tmp_path, monkeypatch, tok)
    shutil.copytree(tmp_path / "adapters", tmp_path / "adapters8")
    (tmp_path / "eval.yaml").write_text(
        "model: {name_or_path: ./tiny}\n"
        "eval: {adapters: {cr4: adapters, cr8: adapters8}, presses: [streaming_llm],\n"
        "  budgets: {cr4: 4.0, cr8: 8.0}, fidelity_contexts: [200], continuation_tokens: 16,\n"
        "  needle_contexts: [200], multi_needle_contexts: [], multi_turn_contexts: [], rounds: 2,\n"
        "  press_window: 16, text_glob: text/*.txt, heldout_fraction: 0.25, out_dir: out}\n"
    )
    args = ["eval", "eval.yaml", "--no-progress", "--rounds", "2"]
    make_sample, evaluate = harness._make_sample, harness.evaluate_sample
    current, runs = {}, []

    def tracked(cell, rnd, *a, **kw):
        if rnd == current.get("die_at"):
            raise RuntimeError("killed")  # what a kill mid-round leaves: round 1's records only
        current["round"] = rnd
        return make_sample(cell, rnd, *a, **kw)

    def counted(sample, methods, *a, **kw):
        runs.extend((current["round"], sample.task, m.name) for m in methods)
        return evaluate(sample, methods, *a, **kw)

    monkeypatch.setattr(harness, "_make_sample", tracked)
    monkeypatch.setattr(harness, "evaluate_sample", counted)
    current["die_at"] = 1
    with pytest.raises(RuntimeError, match="killed"):
        main([*args, "--out", "cut"])
    before = json.loads((tmp_path / "cut" / harness.PARTIAL_NAME).read_text())["records"]

    model = dms.load_adapters(tiny_model("llama", attn="sdpa", seed=2), tmp_path / "adapters8")
    with torch.no_grad():  # other cr8 heads
        for m in dms.dms_modules(model):
            m.dms_adapter.proj.weight.mul_(3.0)
    dms.save_adapters(model, tmp_path / "adapters8")

    current["die_at"], runs[:] = None, []
    capsys.readouterr()
    assert main([*args, "--out", "cut"]) == 0
    out = capsys.readouterr().out
    assert "the heads of cr8 changed" in out and "resuming after round 0 of 2" in out
    all_methods = {"uncompressed", "dms@cr4", "dms@cr8", "streaming_llm@cr4", "streaming_llm@cr8"}
    assert {(t, m) for r, t, m in runs if r == 0} == {
        ("fidelity", "uncompressed"),  # reference logits only: its record is kept from before
        ("fidelity", "dms@cr8"),
        ("fidelity", "streaming_llm@cr8"),
        ("needle", "dms@cr8"),
        ("needle", "streaming_llm@cr8"),
    }
    assert {(t, m) for r, t, m in runs if r == 1} == {
        (t, m) for t in ("fidelity", "needle") for m in all_methods
    }
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["meta"]["rounds_completed"] == 2

    runs[:] = []
    assert main([*args, "--out", "whole"]) == 0  # the same comparison uninterrupted, new heads
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert strip(resumed["records"]) == strip(whole["records"])
    assert resumed["meta"]["key"] == whole["meta"]["key"]
    # round 1 of the groups whose heads stayed: the records computed before the change
    assert strip([r for r in resumed["records"] if r["round"] == 0 and r["budget"] != "cr8"]) == strip(
        [r for r in before if r["budget"] != "cr8"]
    )
    old = {(r["task"], r["method"]): r for r in before if r["budget"] == "cr8"}
    new = {
        (r["task"], r["method"]): r for r in resumed["records"] if r["round"] == 0 and r["budget"] == "cr8"
    }
    assert old.keys() == new.keys() and old != new  # the cr8 records are the new heads'


def test_a_partial_run_from_before_groups_resumes_only_under_its_own_key(tmp_path):
    """A ``results.partial.json`` without per-group keys (written before they existed) resumes every
    group when the whole-comparison key matches, and nothing otherwise."""
    from modelopt_dms.evaluation import harness

    path = tmp_path / harness.PARTIAL_NAME
    records = [{"round": r, "budget": b, "method": m} for r in (0, 1) for b, m in ((None, "u"), ("cr4", "d"))]
    path.write_text(json.dumps({"key": "k", "rounds_completed": 2, "records": records}))
    keys = {"uncompressed": "u1", "cr4": "c1"}
    got, done = harness._resume(str(path), "k", keys, 3, log=lambda _m: None)
    assert done == {"uncompressed": 2, "cr4": 2} and got == records
    got, done = harness._resume(str(path), "k", keys, 1, log=lambda _m: None)  # fewer rounds asked
    assert done == {"uncompressed": 1, "cr4": 1} and got == records[:2]
    got, done = harness._resume(str(path), "other", keys, 3, log=lambda _m: None)
    assert done == {"uncompressed": 0, "cr4": 0} and got == []

"""What ``make demo`` reports (run on a tiny local model), and the one pass-key scoring rule that the
demo, the heads evaluation and the kvpress comparison share."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_chat_tokenizer, tiny_model

import modelopt_dms as dms
from modelopt_dms.evaluation import retrieval
from modelopt_dms.evaluation.harness import evaluate_sample
from modelopt_dms.evaluation.methods import DMSMethod, RunResult
from modelopt_dms.evaluation.metrics import needle_recall
from modelopt_dms.pipelines.demo import DemoOptions, run_demo

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. 0123456789 "
    "There is a pass key hidden in the following text. Find it and remember it. The pass key is "
    "What is the pass key? Answer with the 5-digit number only. Remember it. is the pass key. "
)


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer([TEXT * 20])


@pytest.fixture
def workdir(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text").mkdir()
    for i in range(20):
        (tmp_path / "text" / f"doc{i:02d}.txt").write_text(TEXT * (30 + i))
    base = tiny_model("llama", seed=1)
    base.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    trained = dms.apply_dms(tiny_model("llama", seed=1), {"window_size": 8})
    with torch.no_grad():  # decisions that evict a fair share
        for m in dms.dms_modules(trained):
            m.dms_adapter.proj.weight.normal_(0, 0.05)
    dms.save_adapters(trained, tmp_path / "heads")
    return tmp_path


def _demo(root, adapters, lines):
    opts = DemoOptions(
        model=str(root / "tiny"),
        adapters=adapters,
        window=8,
        context=256,
        new_tokens=6,
        json=str(root / "demo.json"),
        text_glob=str(root / "text" / "*.txt"),
    )
    return run_demo(opts, log=lines.append)


def test_demo_reports_identity_fidelity_passkeys_and_answer(workdir):
    lines: list[str] = []
    result = _demo(workdir, str(workdir / "heads"), lines)
    assert json.loads((workdir / "demo.json").read_text()) == json.loads(json.dumps(result))
    assert result["max_abs_diff_eviction_off"] == 0.0  # adapters only: exact with eviction off
    assert result["window_size"] == 8 and result["heads"] == str(workdir / "heads")
    fid = result["fidelity"]
    assert fid["context_tokens"] == 256 and fid["generated_tokens"] == 6
    assert fid["compression_ratio"] > 1.2  # the random heads evict
    assert fid["kl_per_token"] > 0 and 0 <= fid["token_match"] <= 1
    assert fid["kv_bytes_allocated"] < fid["kv_bytes_dense"]
    assert result["passkey"]["n"] == 3 and 0 <= result["passkey"]["dms"] <= 1
    text = "\n".join(lines)
    # the terminal shows what the JSON holds, one line per step (no per-tensor progress spam)
    assert f"{fid['kl_per_token']:.4f}" in text and f"{fid['compression_ratio']:.2f}x" in text
    assert "max |logit diff| vs the original model = 0.00e+00" in text
    assert sum("[" in ln and "/5]" in ln for ln in lines) == 5


def test_demo_with_lora_heads_compares_with_the_original_model(workdir):
    from modelopt_dms.nn.lora import attach_lora, lora_deltas

    trained = dms.apply_dms(tiny_model("llama", seed=1), {"window_size": 8})
    attach_lora(trained, rank=2, alpha=4.0)
    with torch.no_grad():
        for m in dms.dms_modules(trained):
            m.dms_adapter.proj.weight.normal_(0, 0.05)
        for d in lora_deltas(trained).values():
            d.lora_b.normal_(0, 0.05)
    dms.save_adapters(trained, workdir / "lora_heads")
    lines: list[str] = []
    result = _demo(workdir, str(workdir / "lora_heads"), lines)
    assert result["max_abs_diff_eviction_off"] == 0.0  # the reference: the original model, exactly
    # the fidelity KL is taken against the original: recompute it from the merged model's compact cache
    from modelopt_dms.evaluation.fidelity import fidelity_on_text

    original = dms.apply_dms(tiny_model("llama", seed=1), {"window_size": 8})
    merged = dms.load_adapters(tiny_model("llama", seed=1), workdir / "lora_heads")
    text = dms.corpus.build_token_sequences(
        dms.load_model(str(workdir / "tiny"))[1],
        str(workdir / "text" / "*.txt"),
        256,
        "heldout",
        max_sequences=1,
        cache_dir=dms.corpus.DEFAULT_CACHE_DIR,
    )
    want = fidelity_on_text(merged, text, 8, generate_tokens=6, reference=original)
    assert result["fidelity"]["kl_per_token"] == pytest.approx(want.kl_per_token, rel=1e-5)
    own = fidelity_on_text(merged, text, 8, generate_tokens=6)
    assert own.kl_per_token != pytest.approx(want.kl_per_token, rel=1e-3)


def test_demo_without_adapters_evicts_nothing_and_refuses_a_typo(workdir):
    lines: list[str] = []
    result = _demo(workdir, None, lines)
    assert result["fidelity"]["compression_ratio"] == pytest.approx(1.0, abs=0.01)
    assert result["fidelity"]["kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="does not exist"):
        _demo(workdir, str(workdir / "haeds"), [])


def test_passkey_scoring_is_the_comparisons_rule(tok, monkeypatch):
    """The demo / heads-evaluation pass key (retrieval) and the comparison (harness) score one way:
    needle_recall on whole numbers, so an answer with a longer number does not count."""
    stream = tok(TEXT * 80, add_special_tokens=False)["input_ids"]
    samples = retrieval.passkey_samples(tok, stream, [200, 240], [0.2, 0.8], seeds=2, seed=3)
    assert len(samples) == 8 and {s.task for s in samples} == {"needle"}
    answers = {}
    for i, s in enumerate(samples):  # right, wrong, longer number, key inside other text
        key = s.answers[0]
        answers[s.key] = [f"{key}", "00000", f"{key}7", f"The pass key is {key}."][i % 4]

    class Scripted(DMSMethod):
        def run(self, sample, kept_target=None):
            ids = tok(answers[sample.key], add_special_tokens=False)["input_ids"]
            return RunResult(kept_tokens=10.0, input_tokens=sample.input_tokens, kv_bytes=1, generated=ids)

    monkeypatch.setattr(retrieval, "DMSMethod", Scripted)
    got = retrieval.passkey_accuracy(tiny_model(), tok, samples)
    assert got["correct"] == 4 and got["accuracy"] == 0.5
    expected = [needle_recall(answers[s.key], s.answers) for s in samples]
    harness = [evaluate_sample(s, [Scripted(tiny_model(), tok, "dms")], tok)[0]["score"] for s in samples]
    assert harness == expected == [1.0, 0.0, 0.0, 1.0] * 2

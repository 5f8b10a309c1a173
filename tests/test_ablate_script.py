"""benchmarks/ablate.py on a tiny model: variants at an equal token budget, resumable, one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import benchmark_script, stdlib_texts, tiny_chat_tokenizer, tiny_model

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ablate(tmp_path, monkeypatch):
    texts = stdlib_texts()
    (tmp_path / "text").mkdir()
    for name, text in texts.items():
        for k in range(3):
            (tmp_path / "text" / f"{k}_{name}").write_text(f"Part {k}.\n" + text)
    tok = tiny_chat_tokenizer(list(texts.values()))
    tiny_model("llama", max_position_embeddings=1024).save_pretrained(tmp_path / "tiny_model")
    tok.save_pretrained(tmp_path / "tiny_model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return benchmark_script("ablate", monkeypatch, "eval_heads", "common"), tmp_path


EVAL = ["--sources", "text/*", "--contexts", "64", "--texts", "1", "--generate", "4"]
EVAL += ["--passkey-source", "text/*", "--passkey-contexts", "700", "--passkey-depths", "0.5"]
EVAL += ["--passkey-seeds", "2", "--threads", "1"]


def test_ablation_trains_each_variant_once_and_tables_them(ablate):
    mod, root = ablate
    spec = {
        "base": str(TINY),
        "root": "abl",
        "eval": EVAL,
        "variants": {"base": {}, "window2": {"dms.window_size": 2}, "lr": {"train.lr": 0.01}},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = root / "res" / "abl.json"
    payload = mod.main(["spec.yaml", "--out", str(out), "--threads", "1"])
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"base", "window2", "lr"}
    assert len({r["tokens"] for r in rows.values()}) == 1 and rows["base"]["tokens"] == 6 * 2 * 32
    assert all(r["train_seconds"] > 0 and r["passkey"]["700"]["n"] == 2 for r in rows.values()), rows
    trained = {n: json.loads((root / "abl" / n / "adapters" / "dms_adapters.json").read_text()) for n in rows}
    assert trained["window2"]["dms_config"]["window_size"] == 2
    assert trained["base"]["dms_config"]["window_size"] == 4
    md = out.with_suffix(".md").read_text()
    assert "| window2 | dms.window_size=2 |" in md and "95% CI" in md and out.with_suffix(".png").exists()

    # a second invocation retrains nothing and reuses every evaluation
    stamps = {n: (root / "abl" / n / "eval.json").stat().st_mtime_ns for n in rows}
    log = (root / "abl" / "base" / "train_log.jsonl").read_text()
    again = mod.main(["spec.yaml", "--out", str(out), "--threads", "1"])
    assert {n: (root / "abl" / n / "eval.json").stat().st_mtime_ns for n in rows} == stamps
    assert (root / "abl" / "base" / "train_log.jsonl").read_text() == log
    assert [r["kl_mean"] for r in again["rows"]] == [r["kl_mean"] for r in payload["rows"]]


def test_a_variant_with_another_token_budget_is_refused(ablate):
    mod, root = ablate
    spec = {"base": str(TINY), "root": "abl", "variants": {"base": {}, "long": {"data.seq_len": 64}}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"'long' trains 768 tokens, the first variant 384.*train.steps"):
        mod.main(["spec.yaml", "--out", str(root / "x.json")])
    assert not (root / "abl" / "base").exists()  # refused before anything trained


def test_overrides_set_nested_keys_and_remove_with_null(ablate):
    mod, _ = ablate
    raw = {"data": {"text_glob": "a", "seq_len": 8}, "train": {"lr": 1}}
    out = mod.apply_overrides(raw, {"data.text_glob": None, "data.sources": {"x": 1}, "train.lr": 2})
    assert out == {"data": {"seq_len": 8, "sources": {"x": 1}}, "train": {"lr": 2}}
    assert raw["data"]["text_glob"] == "a"
    with pytest.raises(ValueError, match="not a section"):
        mod.apply_overrides(raw, {"train.lr.x": 1})


def test_a_select_variant_evaluates_the_chosen_snapshot(ablate):
    from safetensors.torch import load_file

    mod, root = ablate
    spec = {
        "base": str(TINY),
        "root": "abl",
        "eval": EVAL,
        "variants": {"overshoot": {"select": True, "train.cr_end": 1.5, "train.snapshot_every": 2}},
    }
    # the tiny recipe targets CR 2, which 6 steps of a tiny model do not reach: select for CR 1
    recipe = yaml.safe_load(TINY.read_text())
    recipe["dms"]["target_compression_ratio"] = 1.0
    (root / "base.yaml").write_text(yaml.safe_dump(recipe))
    spec["base"] = "base.yaml"
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    payload = mod.main(["spec.yaml", "--out", str(root / "res" / "abl.json"), "--threads", "1"])
    row = payload["rows"][0]
    assert row["overrides"] == {"train.cr_end": 1.5, "train.snapshot_every": 2}
    run = root / "abl" / "overshoot"
    record = json.loads((run / "selection_cr1.json").read_text())
    assert [s["step"] for s in record["snapshots"]] == [2, 4, 6]
    assert row["selected"] == record["chosen"]
    chosen = load_file(run / "selected" / "dms_adapters.safetensors")
    snap = load_file(Path(record["chosen"]["path"]) / "dms_adapters.safetensors")
    assert all(chosen[k].equal(snap[k]) for k in snap)
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["adapters_sha256"] == mod._tensors_digest(run / "selected" / "dms_adapters.safetensors")


def test_lora_and_all_weights_variants_are_evaluated_against_the_original(ablate):
    import subprocess

    import torch

    import modelopt_dms as dms

    mod, root = ablate
    spec = {
        "base": str(TINY),
        "root": "abl",
        "eval": EVAL,
        "variants": {"lora": {"train.lora_rank": 2}, "all": {"train.train_all_weights": True}},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    payload = mod.main(["spec.yaml", "--out", str(root / "res" / "abl.json"), "--threads", "1"])
    assert {r["variant"] for r in payload["rows"]} == {"lora", "all"}
    record = json.loads((root / "abl" / "lora" / "adapters" / "dms_adapters.json").read_text())
    assert record["lora"]["rank"] == 2
    assert "exported" in json.loads((root / "abl" / "all" / "eval.json").read_text())["methods"]["export"]
    # the all-weights run's checkpoint and export stay out of git; the LoRA run's checkpoint does not
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    ignored = subprocess.run(
        [
            "git",
            "check-ignore",
            "abl/all/checkpoint/state.json",
            "abl/all/export/config.json",
            "abl/lora/checkpoint/state.json",
            "abl/all/train_log.jsonl",
        ],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == ["abl/all/checkpoint/state.json", "abl/all/export/config.json"]
    # the reference of an all-weights export is the original model, not the export without eviction
    import eval_heads

    base, _ = dms.load_model(str(root / "tiny_model"))
    model, reference = eval_heads._heads_model(base, "exported", str(root / "abl" / "all" / "export"))
    ids = torch.randint(0, 100, (1, 20))
    with torch.no_grad(), dms.eviction_disabled(reference), dms.eviction_disabled(model):
        want = base(input_ids=ids).logits
        torch.testing.assert_close(reference(input_ids=ids).logits, want, rtol=0, atol=0)
        assert (model(input_ids=ids).logits - want).abs().max() > 1e-4
    # a fresh clone has neither: the table keeps the committed evaluation of the export
    import shutil

    shutil.rmtree(root / "abl" / "all" / "export")
    shutil.rmtree(root / "abl" / "all" / "checkpoint")
    args = ["spec.yaml", "--out", str(root / "res" / "abl.json"), "--threads", "1", "--only", "none"]
    again = mod.main(args)
    assert again["rows"] == payload["rows"]

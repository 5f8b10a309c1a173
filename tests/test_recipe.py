"""YAML recipes: validation messages that name the key path, the committed recipes, and an end-to-end
``modelopt-dms run`` of recipes/tiny_test.yaml on a tiny local Hugging Face model and real text."""

from __future__ import annotations

import copy
import glob
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_tiny_workspace
from safetensors.torch import load_file

import modelopt_dms as dms
from modelopt_dms.cli import main
from modelopt_dms.evaluation.config import load_eval_recipe
from modelopt_dms.schema import RecipeError
from modelopt_dms.training.recipe import load_train_recipe as load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = RECIPES / "tiny_test.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_dict() -> dict:
    return yaml.safe_load(TINY.read_text())


def _write(tmp_path: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _with(path: str, value) -> dict:
    """The tiny recipe with ``path`` (dotted) set to ``value``."""
    data = copy.deepcopy(_tiny_dict())
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        # unknown / misspelled keys
        ("train.stpes", 10, "train.stpes"),
        ("data.seq_lenght", 64, "data.seq_lenght"),
        ("model.nme", "x", "model.nme"),
        ("output.dirr", "x", "output.dirr"),
        ("trian", {"steps": 1}, "trian"),
        ("dms.windw_size", 4, "dms.windw_size"),
        # bad values
        ("dms.window_size", 0, "dms.window_size"),
        ("dms.window_size", "big", "dms.window_size"),
        ("dms.decision", "neuron", "dms.decision"),
        ("dms.granularity", "token", "dms.granularity"),
        ("dms.temperature", -1.0, "dms.temperature"),
        ("dms.layers", [], "dms.layers"),
        ("data.seq_len", 4, "data.seq_len"),
        ("data.seq_len", "long", "data.seq_len"),
        ("data.heldout_fraction", 1.5, "data.heldout_fraction"),
        ("data.max_sequences", 0, "data.max_sequences"),
        ("model.dtype", "int8", "model.dtype"),
        ("model.device", "gpu", "model.device"),
        ("model.device", "cuda:x", "model.device"),
        ("train.steps", 0, "train.steps"),
        ("train.steps", 1.5, "train.steps"),
        ("train.lr", 0, "train.lr"),
        ("train.cr_start", 0.5, "train.cr_start"),
        ("train.grad_accum", 0, "train.grad_accum"),
        ("train.kl_direction", "both", "train.kl_direction"),
        ("train.betas", [0.9], "train.betas"),
        ("train.checkpoint_every", -1, "train.checkpoint_every"),
        # a section that is not a mapping
        ("train", 5, "train"),
        ("dms", [1, 2], "dms"),
    ],
)
def test_bad_key_or_value_is_rejected_with_its_key_path(tmp_path, key, value, expect):
    path = _write(tmp_path, _with(key, value))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg
    lines = [line.strip() for line in msg.splitlines()]
    assert any(line.startswith((expect + ":", expect + ".")) for line in lines), msg


def test_unknown_key_message_says_so(tmp_path):
    for key in ("train.stpes", "dms.windw_size"):
        with pytest.raises(RecipeError, match=r"unknown key") as err:
            load_recipe(_write(tmp_path, _with(key, 1)))
        assert key in str(err.value)


def test_every_error_of_a_section_is_listed(tmp_path):
    data = _with("train.stpes", 10)
    data["train"]["lr"] = -1
    data["data"]["seq_len"] = 2
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    msg = str(err.value)
    for key in ("train.stpes", "train.lr", "data.seq_len"):
        assert key in msg, msg


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: [unclosed\n  dms: {", "not valid YAML"),
        ("model:\n  name_or_path: a\n bad_indent: 1\n", "not valid YAML"),
        ("- model\n- train\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        ("42\n", "must be a mapping"),
    ],
)
def test_malformed_or_non_mapping_file(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_write(tmp_path, text))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RecipeError, match="not found") as err:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path)
    assert issubclass(RecipeError, ValueError)


def test_empty_file_or_missing_sections_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(_write(tmp_path, ""))
    with pytest.raises(RecipeError, match="no dms, train section"):
        load_recipe(_write(tmp_path, {"model": {"name_or_path": "x"}}))
    explicit = load_recipe(_write(tmp_path, "model:\ndms:\ntrain:\n"))  # empty sections = defaults
    assert explicit.dms == dms.DMSConfig() and explicit.dms.window_size == 256
    assert explicit.schedule.cr_end == explicit.dms.target_compression_ratio


def test_cli_reports_a_bad_recipe_with_exit_code_2(tmp_path, capsys):
    path = _write(tmp_path, _with("train.stpes", 3))
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "unknown key" in err
    assert main(["run", str(tmp_path / "missing.yaml"), "--no-progress"]) == 2
    assert "not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ base: recipes
def test_a_recipe_overrides_its_base_key_by_key(tmp_path):
    base = _tiny_dict()
    base["data"]["sources"] = {"a/*.txt": 1.0, "b/*.txt": 2.0}
    del base["data"]["text_glob"]
    base["train"]["init_adapters"] = "warm/adapters"
    (tmp_path / "common").mkdir()
    _write(tmp_path / "common", base, "base.yaml")
    child = {
        "base": "common/base.yaml",  # relative to the child's folder, not the working directory
        "dms": {"window_size": 4},
        "data": {"sources": {"c/*.txt": 1.0}},  # a mapping value replaces the base's whole
        "train": {"init_adapters": None, "steps": 7},  # null replaces too
    }
    got = load_recipe(_write(tmp_path, child, "child.yaml"))
    want = copy.deepcopy(base)
    want["dms"]["window_size"] = 4
    want["data"]["sources"] = {"c/*.txt": 1.0}
    want["train"].update(init_adapters=None, steps=7)
    assert got == load_recipe(_write(tmp_path, want, "written_out.yaml"))
    assert got != load_recipe(tmp_path / "common" / "base.yaml")

    # a chain of bases: the grandchild sees the child's overrides and its own
    grandchild = {"base": "child.yaml", "train": {"steps": 9}}
    want["train"]["steps"] = 9
    assert load_recipe(_write(tmp_path, grandchild, "grandchild.yaml")) == load_recipe(
        _write(tmp_path, want, "written_out_2.yaml")
    )


def test_a_base_supplies_the_required_sections_and_the_merge_is_validated(tmp_path):
    _write(tmp_path, _tiny_dict(), "base.yaml")
    only_base = load_recipe(_write(tmp_path, {"base": "base.yaml"}, "same.yaml"))
    assert only_base == load_recipe(TINY)
    with pytest.raises(
        RecipeError, match=r"typo\.yaml \(on base .*base\.yaml\)(.|\n)*train\.stpes.*unknown key"
    ):
        load_recipe(_write(tmp_path, {"base": "base.yaml", "train": {"stpes": 3}}, "typo.yaml"))
    # an empty section in the recipe overrides nothing (without a base it would mean defaults)
    empty = load_recipe(_write(tmp_path, "base: base.yaml\ntrain:\ndms:\n", "empty.yaml"))
    assert empty == only_base and empty.train != load_recipe(_write(tmp_path, "model:\ndms:\ntrain:\n")).train


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"r.yaml": {"base": "missing.yaml", "train": {}}}, r"missing\.yaml.*the base of .*r\.yaml"),
        ({"r.yaml": {"base": 3}}, "base must be the path of another recipe file"),
        ({"r.yaml": {"base": "s.yaml"}, "s.yaml": {"base": "r.yaml"}}, "base chain loops"),
        ({"r.yaml": {"base": "r.yaml"}}, "base chain loops"),
        ({"r.yaml": {"base": "s.yaml"}, "s.yaml": "[1, 2]\n"}, "must be a mapping of sections"),
    ],
)
def test_bad_base_chains_are_refused(tmp_path, files, match):
    for name, data in files.items():
        _write(tmp_path, data, name)
    with pytest.raises(RecipeError, match=match):
        load_recipe(tmp_path / "r.yaml")


def test_an_eval_recipe_can_have_a_base(tmp_path):
    committed = RECIPES / "eval_smollm2_135m.yaml"
    raw = yaml.safe_load(committed.read_text())
    _write(tmp_path, raw, "base.yaml")
    got = load_eval_recipe(_write(tmp_path, {"base": "base.yaml", "eval": {"rounds": 3}}, "e.yaml"))
    assert got.eval.rounds == 3
    same = load_eval_recipe(committed).eval.model_dump(exclude={"rounds"})
    assert got.eval.model_dump(exclude={"rounds"}) == same


def test_the_committed_eval_subsets_are_cells_of_the_full_comparison():
    """The 1K-2K and multi-turn recipes inherit the full comparison and only drop cells or presses."""
    full = load_eval_recipe(RECIPES / "eval_smollm2_135m.yaml").eval
    for name, changed in [
        ("eval_smollm2_135m_short.yaml", {"needle_contexts", "time_budget_min", "out_dir"}),
        (
            "eval_smollm2_135m_multi_turn.yaml",
            {"fp8_kv", "presses", "fidelity_contexts", "needle_contexts", "multi_needle_contexts"}
            | {"time_budget_min", "out_dir"},
        ),
    ]:
        part = load_eval_recipe(RECIPES / name).eval
        assert part.model_dump(exclude=changed) == full.model_dump(exclude=changed), name
        assert set(part.needle_contexts) <= set(full.needle_contexts)
        assert set(part.presses) <= set(full.presses) and part.out_dir != full.out_dir


@pytest.mark.parametrize("path", sorted(glob.glob(str(RECIPES / "*.yaml"))), ids=lambda p: Path(p).name)
def test_committed_recipes_validate(path):
    if Path(path).name.startswith("eval_"):  # comparison recipes: they name committed adapters
        recipe = load_eval_recipe(path)
        assert all((RECIPES.parent / p).is_dir() for p in recipe.eval.adapters.values())
        with pytest.raises(RecipeError, match="no dms, train section"):
            load_recipe(path)
        return
    recipe = load_recipe(path)
    cfg = recipe.dms
    # the trainer anneals towards the ratio the DMS config documents, or past it with snapshots to
    # select from (an overshoot without snapshots would leave only heads above the target)
    assert recipe.schedule.cr_end >= cfg.target_compression_ratio - 1e-6
    if recipe.schedule.cr_end > cfg.target_compression_ratio + 1e-6:
        assert recipe.train.snapshot_every > 0
    assert recipe.train.anneal_steps <= recipe.train.steps
    assert cfg.window_size < recipe.data.seq_len


_TRAIN_RECIPES = [p for p in sorted(glob.glob(str(RECIPES / "*.yaml"))) if "eval_" not in Path(p).name]


@pytest.mark.parametrize("path", _TRAIN_RECIPES, ids=lambda p: Path(p).name)
def test_committed_recipes_still_resume_their_committed_runs(path):
    """A recipe edit (a base: rewrite, a new default) must not orphan the run folder it trains into."""
    from modelopt_dms.outputs import read_marker
    from modelopt_dms.pipelines.train import _fingerprint, _fingerprint_defaults
    from modelopt_dms.training.run_folder import RunFolder

    recipe = load_recipe(path)
    folder = RECIPES.parent / recipe.output.dir
    marker = read_marker(folder)
    if marker is None:
        assert not folder.exists() or Path(path) == TINY
        return
    fingerprint = _fingerprint(recipe, marker["fingerprint"]["world_size"])
    run = RunFolder(folder, fingerprint, recipe.train.steps, defaults=_fingerprint_defaults())
    assert run.changed_settings() == []  # the check RunFolder.open refuses a resume on


def test_tiny_recipe_is_committed():
    assert TINY.is_file()
    assert Path(glob.glob(str(RECIPES / "*.yaml"))[0]).parent == RECIPES


# ------------------------------------------------------------------------------ end to end
@pytest.fixture
def tiny_workdir(tmp_path, monkeypatch):
    """A temp dir laid out as recipes/tiny_test.yaml expects, and made the working directory."""
    import this  # noqa: F401 - prints the Zen once; its text is ROT13 in this.s

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # load_model sets it; restore afterwards
    zen = "".join(this.d.get(c, c) for c in this.s)
    assert len(zen) < 2000  # skipped by the data loader
    write_tiny_workspace(tmp_path, {"zen.txt": zen})
    recipe = tmp_path / "tiny_test.yaml"
    recipe.write_text(TINY.read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path, recipe


def test_run_tiny_recipe_end_to_end(tiny_workdir, capsys):
    root, recipe_path = tiny_workdir
    recipe = load_recipe(recipe_path)
    steps, bs, seq = recipe.train.steps, recipe.train.batch_size, recipe.data.seq_len

    # the local directory loads as a model + tokenizer
    base, tok = dms.load_model(root / "tiny_model")
    assert len(tok) <= 128 and max(tok("def wrap(text):")["input_ids"]) < 128

    assert main(["run", str(recipe_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[data]" in out and "[done]" in out

    run = root / "run"
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == steps
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in log)
    assert log == state["history"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["tokens"] == steps * recipe.train.grad_accum * bs * seq
    assert summary["final"] == log[-1]
    assert Path(summary["adapters"]) == Path("run/adapters")
    assert json.loads((run / "train_config.json").read_text())["steps"] == steps
    assert glob.glob(str(root / "cache" / "tokens-train-*.safetensors"))

    adapters = run / "adapters"
    assert adapters.is_dir()
    trained = load_file(run / "checkpoint" / "trainable.safetensors")
    loaded = dms.load_adapters(base, adapters)
    assert dms.is_dms_model(loaded)
    assert dms.dms_config(loaded).window_size == recipe.dms.window_size
    got = {n: p.detach() for n, p in loaded.named_parameters() if "dms_adapter" in n}
    assert set(got) == set(trained)
    for n, t in trained.items():
        assert torch.equal(got[n], t), n
    assert any(t.abs().sum() > 0 for n, t in trained.items() if n.endswith("proj.weight"))

    # running the finished recipe again resumes from its checkpoint: nothing left to train
    assert main(["run", str(recipe_path), "--no-progress"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["final"] == summary["final"]
    # the training time is the run's steps', not this (empty) session's
    assert summary["train_seconds"] > 0
    assert again["train_seconds"] == summary["train_seconds"] == round(sum(r["seconds"] for r in log), 3)
    assert [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] == log


def test_run_a_recipe_on_a_mixture_of_sources(tiny_workdir, capsys):
    import inspect
    import shlex
    import string

    root, recipe_path = tiny_workdir
    (root / "more").mkdir()
    for mod in (shlex, string):
        (root / "more" / f"{mod.__name__}.txt").write_text(inspect.getsource(mod))
    raw = yaml.safe_load(recipe_path.read_text())
    del raw["data"]["text_glob"]
    raw["data"]["sources"] = {"text/*.txt": 3.0, "more/*.txt": 1.0}
    raw["data"]["max_sequences"] = 8
    raw["train"]["steps"] = 2
    recipe_path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    data_line = next(line for line in out.splitlines() if line.startswith("[data]"))
    assert "8 training sequences" in data_line and "rows more/*.txt 2, text/*.txt 6" in data_line, data_line
    assert (root / "run" / "adapters").is_dir()


def test_an_all_weights_recipe_must_export_the_whole_model(tiny_workdir, capsys):
    root, recipe_path = tiny_workdir
    raw = yaml.safe_load(recipe_path.read_text())
    raw["train"].update(train_all_weights=True, steps=2)
    recipe_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"train_all_weights.*adapters artifact.*export.hf_dir"):
        load_recipe(recipe_path)
    assert main(["run", str(recipe_path), "--no-progress"]) == 2
    assert "export.hf_dir" in capsys.readouterr().err and not (root / "run").exists()

    raw["export"] = {"hf_dir": "exported"}
    recipe_path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe_path), "--no-progress"]) == 0
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["adapters"] is None and not (root / "run" / "adapters").exists()
    trained = load_file(root / "run" / "checkpoint" / "trainable.safetensors")
    exported, _ = dms.load_exported(root / "exported")
    got = dict(exported.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(got[name].detach(), trained[name])  # the export is the trained model

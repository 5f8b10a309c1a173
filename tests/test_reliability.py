"""Nothing silently wrong, nothing of the user's deleted: loads, exports and runs done as a user would.

Each test drives the public API or the ``modelopt-dms`` command in a subprocess, asserts the message
the user sees, and checks that the user's files are unchanged. Numbers refer to the cases of the
reliability issue (1: FP8 export through from_pretrained, 2: overwrite, 3: run folders, 4: tampered
exports, 5: destination checks first, 6: permissions, 7: one CLI error convention, 8: the rest).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from cli_zygote import CliRun
from conftest import tiny_model, write_tiny_workspace
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import modelopt_dms as dms
from modelopt_dms.config import DMSBlockError
from modelopt_dms.outputs import OutputError

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny_test.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ helpers
def cli(*args: str, cwd: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """``modelopt-dms ARGS`` in a new process, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "modelopt_dms.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **env},
    )


def assert_bad_input(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    """Exit code 2, one error line naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])
    return proc.stderr


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder`` (what must not change)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    """Temp, moved-aside and lock files anywhere below ``root``."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")
    )


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("the user's notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.csv").write_text("1,2,3\n")
    return path


def trained(seed: int = 0, window: int = 4) -> torch.nn.Module:
    model = dms.apply_dms(tiny_model("llama"), {"window_size": window})
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in dms.dms_modules(model):
            m.dms_adapter.proj.weight.normal_(0, 0.05)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace: tiny model, real text, the tiny recipe; the working directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_workspace(tmp_path)
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE.read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


_RECIPES = iter(range(10**6))


def recipe(ws: Path, name: str | None = None, **changes) -> Path:
    """The tiny recipe with dotted keys changed (``train__steps=3`` sets train.steps), in a new file."""
    data = yaml.safe_load(TINY_RECIPE.read_text())
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = ws / (name or f"recipe_{next(_RECIPES)}.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------ 1
def test_1_from_pretrained_of_an_fp8_export_is_refused_and_load_exported_rebuilds_it(tmp_path):
    model = trained()
    q = dms.quantize_fp8(model, [IDS])
    out = dms.export_hf_checkpoint(q, tmp_path / "fp8")
    before = snapshot(out)
    with pytest.raises(DMSBlockError, match=r"modelopt-quantized \(FP8\).*modelopt_dms\.load_exported"):
        AutoModelForCausalLM.from_pretrained(out)
    assert snapshot(out) == before
    loaded, _ = dms.load_exported(out)
    assert torch.allclose(logits(q, IDS), logits(loaded, IDS), atol=1e-5)


# ------------------------------------------------------------------------------------------ 2
def test_2_overwrite_never_deletes_a_users_folder(ws):
    target = user_folder(ws / "project")
    before = snapshot(target)
    with pytest.raises(OutputError, match="not a hf_checkpoint folder written by modelopt-dms"):
        dms.export_hf_checkpoint(trained(), target, overwrite=True)
    proc = cli("export", "--model", "tiny_model", "--out", str(target), "--overwrite", cwd=ws)
    assert_bad_input(proc, str(target), "nothing in it is touched")
    path = recipe(ws, export={"hf_dir": str(target), "overwrite": True})
    assert_bad_input(cli("run", str(path), "--no-progress", cwd=ws), str(target))
    assert snapshot(target) == before
    assert not (ws / "run").exists(), "the refusal must come before training"


# ------------------------------------------------------------------------------------------ 3
def test_3_a_changed_recipe_never_resumes_another_run(ws):
    assert cli("run", "recipe.yaml", "--no-progress", cwd=ws).returncode == 0
    run = ws / "run"
    first = snapshot(run)
    cases = [
        (recipe(ws, dms__window_size=8), ["dms.window_size: 4 -> 8", "--restart"]),
        (recipe(ws, train__steps=3), ["checkpoint at step 6, past train.steps = 3"]),
        (recipe(ws, data__seq_len=60000), ["data.seq_len: 32 -> 60000"]),
        (recipe(ws, model__name_or_path="./other_model"), ["model.name_or_path"]),
    ]
    for path, phrases in cases:
        assert_bad_input(cli("run", str(path), "--no-progress", cwd=ws), *phrases)
        assert snapshot(run) == first
    # a longer run continues the same curve; --restart and train.resume: false start over
    assert cli("run", str(recipe(ws, train__steps=8)), "--no-progress", cwd=ws).returncode == 0
    log = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 9))
    assert (
        cli("run", str(recipe(ws, dms__window_size=8)), "--no-progress", "--restart", cwd=ws).returncode == 0
    )
    assert dms.dms_config(dms.load_adapters(tiny_model("llama"), run / "adapters")).window_size == 8
    path = recipe(ws, dms__window_size=16, train__resume=False)
    assert cli("run", str(path), "--no-progress", cwd=ws).returncode == 0
    assert [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()] == list(
        range(1, 7)
    )
    assert leftovers(ws) == []


def test_3_seq_len_beyond_the_model_is_refused_before_training(ws):
    path = recipe(ws, data__seq_len=60000, output={"dir": "run_long"})
    assert_bad_input(
        cli("run", str(path), "--no-progress", cwd=ws), "exceeds the model's max_position_embeddings"
    )
    assert not (ws / "run_long" / "checkpoint").exists()


def test_3_two_runs_never_share_a_folder(ws):
    slow = recipe(ws, train__steps=400, train__checkpoint_every=1)
    first = subprocess.Popen(
        [sys.executable, "-m", "modelopt_dms.cli", "run", str(slow), "--no-progress"],
        cwd=ws,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.time() + 120
        while (
            not (ws / "run" / "train_log.jsonl").exists() or not (ws / "run" / "train_log.jsonl").read_text()
        ):
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.2)
        second = cli("run", str(slow), "--no-progress", cwd=ws)
        assert_bad_input(second, "in use by another modelopt-dms process", f"PID {first.pid}")
        assert first.poll() is None, "the first run must be unaffected"
    finally:
        first.kill()
        first.wait()
    steps = [json.loads(x)["step"] for x in (ws / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps))
    # the killed run's lock is stale now: a new run takes it over and resumes
    assert cli("run", str(recipe(ws, train__steps=max(steps) + 2)), "--no-progress", cwd=ws).returncode == 0
    assert leftovers(ws) == []


# ------------------------------------------------------------------------------------------ 4
def _export(tmp_path: Path, name: str = "exp") -> Path:
    return dms.export_hf_checkpoint(trained(), tmp_path / name)


def test_4_an_export_without_its_adapter_tensors_is_refused(tmp_path):
    out = _export(tmp_path)
    st = out / "model.safetensors"
    tensors = load_file(st)
    save_file({k: v for k, v in tensors.items() if "dms_adapter" not in k}, st, metadata={"format": "pt"})
    with pytest.raises(
        DMSBlockError, match=r"lacks the DMS adapter tensor\(s\) \['model.layers.0.self_attn.dms_adapter"
    ):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(DMSBlockError, match="lacks the DMS adapter"):
        dms.load_exported(out)


def _edit_block(out: Path, **changes) -> None:
    cfg = json.loads((out / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg["dms_config"].pop(k)
        else:
            cfg["dms_config"][k] = v
    (out / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"decision": "borrowed_neuron"}, r"holds DMS adapter tensor\(s\).*that its DMS config does not use"),
        ({"window_size": None}, r"lacks the key\(s\) \['window_size'\]"),
        ({"window_size": True}, r"dms_config\.window_size"),
        ({"granularity": "token"}, r"dms_config\.granularity"),
    ],
)
def test_4_an_edited_config_block_is_refused_naming_the_key(tmp_path, changes, match):
    out = _export(tmp_path)
    _edit_block(out, **changes)
    with pytest.raises(DMSBlockError, match=match):
        AutoModelForCausalLM.from_pretrained(out)


def test_4_a_block_that_is_a_list_is_refused(tmp_path):
    out = _export(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dms_config"] = [cfg["dms_config"]]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DMSBlockError, match="must be a mapping, got list"):
        AutoModelForCausalLM.from_pretrained(out)


# ------------------------------------------------------------------------------------------ 5
def test_5_destinations_are_checked_before_loading_calibration_or_training(ws, monkeypatch):
    occupied = user_folder(ws / "occupied")
    before = snapshot(occupied)
    # the model does not exist: had it been loaded first, the error would be about the model
    proc = cli("export", "--model", "no_such_model_dir/", "--quantize", "fp8", "--out", str(occupied), cwd=ws)
    assert_bad_input(proc, f"Export target {occupied}")
    path = recipe(ws, export={"hf_dir": str(occupied)})
    assert_bad_input(cli("run", str(path), "--no-progress", cwd=ws), f"Export target {occupied}")
    assert not (ws / "run").exists()
    import modelopt_dms.export.onnx as onnx_export

    def must_not_run(*a, **k):
        raise AssertionError("the ONNX exporter ran before the destination was checked")

    monkeypatch.setattr(onnx_export, "_export_to", must_not_run)
    with pytest.raises(OutputError, match="is a folder; export_onnx writes a file"):
        dms.export_onnx(trained(), occupied)
    (ws / "user.onnx").write_text("not ours")
    with pytest.raises(OutputError, match="not a step graph written by modelopt-dms"):
        dms.export_onnx(trained(), ws / "user.onnx", overwrite=True)
    assert (ws / "user.onnx").read_text() == "not ours"
    assert snapshot(occupied) == before


def test_5_no_space_is_found_before_the_export_is_written(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match="MiB are free there"):
        dms.export_hf_checkpoint(trained(), tmp_path / "exp")
    assert not (tmp_path / "exp").exists() and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ 6
def test_6_outputs_get_the_umask_permissions(ws):
    old = os.umask(0o022)
    try:
        exp = dms.export_hf_checkpoint(trained(), ws / "exp")
        adapters = dms.save_adapters(trained(), ws / "adapters")
        onnx_file = dms.export_onnx(trained(), ws / "step.onnx")
        assert cli("run", "recipe.yaml", "--no-progress", cwd=ws).returncode == 0
    finally:
        os.umask(old)
    for folder in (exp, adapters, ws / "run", ws / "run" / "checkpoint", ws / "run" / "adapters"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
    for f in [*exp.iterdir(), *adapters.iterdir(), onnx_file, *(ws / "run" / "checkpoint").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ------------------------------------------------------------------------------------------ 7
def test_7_every_subcommand_reports_bad_input_the_same_way(ws):
    assert_bad_input(cli("export", "--model", "./nope", "--out", "x", cwd=ws), "not found")
    assert_bad_input(cli("demo", "--model", "./nope", "--no-adapters", cwd=ws), "not found")
    assert_bad_input(cli("demo", cwd=ws), "artifacts/smollm2_135m_dms_cr4 does not exist")
    assert_bad_input(
        cli("demo", "--model", "tiny_model", "--adapters", "artifacts/typo", cwd=ws), "does not exist"
    )
    assert_bad_input(cli("run", "missing.yaml", cwd=ws), "not found")
    assert_bad_input(cli("eval", "missing.yaml", cwd=ws), "not found")
    assert_bad_input(
        cli("run", str(recipe(ws, data__text_glob="nothing/*.txt")), cwd=ws), "No text files match"
    )
    assert_bad_input(cli("run", str(recipe(ws, dms__window_size=True)), cwd=ws), "dms.window_size")
    debug = cli("--debug", "run", "missing.yaml", cwd=ws)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_7_static_cache_generation_is_refused_with_a_message():
    model = trained()
    with pytest.raises(ValueError, match=r"cache_implementation='static'.*DMSCache"):
        model.generate(input_ids=IDS, max_new_tokens=2, cache_implementation="static")
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(ValueError, match="got a StaticCache"):
        model(input_ids=IDS, past_key_values=cache, use_cache=True)


def test_7_a_damaged_checkpoint_and_early_divergence_say_what_to_do(ws, tmp_path):
    assert cli("run", "recipe.yaml", "--no-progress", cwd=ws).returncode == 0
    ckpt = ws / "run" / "checkpoint" / "trainable.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:50])
    proc = cli("run", str(recipe(ws, train__steps=8)), "--no-progress", cwd=ws)
    assert_bad_input(proc, "is damaged (trainable.safetensors", "--restart")

    from modelopt_dms.training import TrainConfig, TrainingDivergedError, train

    model = trained()
    with torch.no_grad():
        dms.dms_modules(model)[0].dms_adapter.norm_weight.fill_(float("nan"))
    seqs = torch.randint(0, 128, (4, 16))
    with pytest.raises(TrainingDivergedError, match="step 0.*no checkpoint was written yet"):
        train(model, seqs, TrainConfig(steps=2, checkpoint_every=1), str(tmp_path / "div"), progress=False)


# ------------------------------------------------------------------------------------------ 8
def test_8_leftovers_of_a_killed_export_are_cleaned_by_the_next(tmp_path):
    target = _export(tmp_path)
    (tmp_path / ".exp.tmp-abc12345").mkdir()
    (tmp_path / ".exp.tmp-abc12345" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".exp.old.tmp-deadbeef").mkdir()
    (tmp_path / ".exp.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    dms.export_hf_checkpoint(trained(seed=1), target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["exp"]


def test_8_small_things(tmp_path, monkeypatch):
    meta_model = copy.deepcopy(tiny_model("llama")).to("meta")
    saved = dms.save_adapters(trained(), tmp_path / "a")
    with pytest.raises(ValueError, match="meta device"):
        dms.load_adapters(meta_model, saved)
    record = json.loads((saved / "dms_adapters.json").read_text())
    for bad in (1.0, True, "1"):
        (saved / "dms_adapters.json").write_text(json.dumps({**record, "format_version": bad}))
        with pytest.raises(ValueError, match="format version"):
            dms.load_adapters(tiny_model("llama"), saved)
    with pytest.raises(ValueError, match="window_size"):
        dms.DMSConfig(window_size=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    dms.save_adapters(trained(), "~/x")
    assert (tmp_path / "home" / "x" / "dms_adapters.json").is_file() and not (tmp_path / "~").exists()
    (tmp_path / "empty.yaml").write_text("")
    assert_bad_input(cli("run", "empty.yaml", cwd=tmp_path), "is empty")


# ------------------------------------------------------------------------------------------ fault injection
def _kill_at(args: list[str], cwd: Path, start_line: str, delay: float) -> None:
    """Start ``modelopt-dms ARGS``; ``delay`` s after it prints ``start_line``, SIGKILL it."""
    run = CliRun(args, cwd, cwd.parent / "killed_run.log")
    run.wait_for(start_line)
    time.sleep(delay)
    run.kill()


def _timed(args: list[str], cwd: Path, start_line: str, end_line: str) -> float:
    """Seconds from ``start_line`` to ``end_line`` (the work, not start-up or shutdown) of a run."""
    run = CliRun(args, cwd, cwd.parent / "timed_run.log")
    t0 = run.wait_for(start_line)
    t1 = run.wait_for(end_line)
    assert run.wait() == 0 and t0 is not None and t1 is not None, run.log.read_text()[-2000:]
    return t1 - t0


def _check_run_state(ws: Path) -> tuple:
    """A run folder after a kill: every artifact present is complete and loadable. Returns which
    are present (checkpoint step, adapters, export) so the test can see where the kills landed."""
    from modelopt_dms.training.checkpoint import latest_checkpoint, load_checkpoint

    run, step = ws / "run", None
    if latest_checkpoint(str(run)) is not None:
        model = dms.apply_dms(tiny_model("llama"), {"window_size": 4, "target_compression_ratio": 2.0})
        params = [p for n, p in model.named_parameters() if "dms_adapter" in n]
        step, _ = load_checkpoint(str(run), model, torch.optim.AdamW(params))
    if (run / "adapters").exists():
        dms.load_adapters(tiny_model("llama"), run / "adapters")
    if (ws / "exp").exists():
        dms.load_exported(ws / "exp")
    return step, (run / "adapters").exists(), (ws / "exp").exists()


@pytest.mark.parametrize("seed", [0])
def test_sigkill_anywhere_in_run_keeps_complete_states_and_a_rerun_finishes(ws, seed):
    import random

    steps = 60
    path = recipe(
        ws, train__steps=steps, train__checkpoint_every=1, export={"hf_dir": "exp", "overwrite": True}
    )
    duration = _timed(["run", str(path), "--no-progress"], ws, "[recipe]", "[done]")
    rng = random.Random(seed)
    states = []
    for _ in range(20):
        if (ws / "run" / "summary.json").exists():  # the chain finished a run: start a new one
            subprocess.run(["rm", "-rf", str(ws / "run"), str(ws / "exp")], check=True)
        _kill_at(["run", str(path), "--no-progress"], ws, "[recipe]", rng.uniform(0, duration))
        states.append(_check_run_state(ws))  # the next killed run resumes from this state
    mid_run = [st for st in states if st[0] is not None and st[0] < steps]
    finished = [st for st in states if st[0] == steps and st[1] and st[2]]
    assert mid_run and finished, f"the kills did not spread over the run: {states}"
    assert cli("run", str(path), "--no-progress", cwd=ws).returncode == 0
    _check_run_state(ws)
    logged = [json.loads(x)["step"] for x in (ws / "run" / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    assert leftovers(ws) == []


@pytest.mark.parametrize("seed", [0])
def test_sigkill_anywhere_in_export_leaves_the_previous_or_the_new_export(ws, seed):
    import random

    heads = []
    for s in (1, 2):
        heads.append(dms.save_adapters(trained(seed=s), ws / f"heads{s}"))
    want = {str(h): logits(dms.load_adapters(tiny_model("llama"), h), IDS) for h in heads}
    args = ["export", "--model", "tiny_model", "--out", "exp", "--overwrite", "--adapters"]
    duration = _timed([*args, str(heads[0])], ws, "[export]", "unified HF checkpoint ->")
    rng = random.Random(seed)
    previous = str(heads[0])
    for i in range(20):
        new = str(heads[(i + 1) % 2])
        _kill_at([*args, new], ws, "[export]", rng.uniform(0, duration))
        got = logits(dms.load_exported(ws / "exp")[0], IDS)  # never missing, never half-written
        matches = [h for h, w in want.items() if torch.allclose(got, w, atol=1e-5)]
        assert matches in ([previous], [new]), "the export is neither the previous nor the new one"
        previous = matches[0]
    final = str(heads[1])
    assert cli(*args, final, cwd=ws).returncode == 0
    assert torch.allclose(logits(dms.load_exported(ws / "exp")[0], IDS), want[final], atol=1e-5)
    assert leftovers(ws) == []

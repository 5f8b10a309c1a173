"""LoRA deltas on the attention projections: the math against hand-merged weights, the teacher, the
trainer (moves only the deltas and adapters, resumes), the adapters artifact (merge on load, refusal of
another or an already-merged base) and snapshot selection."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError
from train_worker import build

import modelopt_dms as dms
from modelopt_dms.evaluation import fidelity_on_text
from modelopt_dms.nn.divergence import kl_per_token
from modelopt_dms.nn.lora import (
    LORA_ATTR,
    attach_lora,
    base_weights_digest,
    has_lora,
    lora_deltas,
    lora_disabled,
    merge_lora,
    target_weights,
)
from modelopt_dms.training.config import TrainConfig
from modelopt_dms.training.selection import select_snapshot, snapshot_path
from modelopt_dms.training.teacher import teacher_mode
from modelopt_dms.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=IDS):
    with torch.no_grad(), dms.eviction_disabled(model):
        return model(input_ids=ids, use_cache=False).logits


def _randomise(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every delta a non-zero B (attaching leaves B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in lora_deltas(model).values():
            delta.lora_b.copy_(torch.randn(delta.lora_b.shape, generator=gen) * std)


def _lora_model(targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank: int = 4):
    model = dms.apply_dms(tiny_model(), {"window_size": 4})
    original = copy.deepcopy(model)
    attach_lora(model, rank=rank, alpha=8.0, targets=targets)
    _randomise(model)
    return model, original


def test_attached_deltas_start_at_zero_and_match_hand_merged_weights():
    model = dms.apply_dms(tiny_model(), {"window_size": 4})
    before = _logits(model)
    params = attach_lora(model, rank=4, alpha=8.0)
    assert len(params) == 2 * 4 * 2  # (A, B) x 4 projections x 2 layers
    assert all(p.dtype == torch.float32 for p in params)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # B = 0: nothing changes
    _randomise(model)
    # reference: a copy whose weights are W + (alpha / r) B A, computed in float64
    ref = dms.apply_dms(tiny_model(), {"window_size": 4})
    weights = dict(ref.named_parameters())
    with torch.no_grad():
        for name, d in lora_deltas(model).items():
            delta = (8.0 / 4) * (d.lora_b.double() @ d.lora_a.double())
            weights[name].copy_((weights[name].double() + delta).float())
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-5, atol=1e-5)
    assert (_logits(model) - before).abs().max() > 1e-3
    with lora_disabled(model):  # the teacher: the original weights exactly
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=1e-5, atol=1e-5)  # restored


def test_merge_folds_the_deltas_and_leaves_a_plain_dms_model():
    model, original = _lora_model()
    want = _logits(model)
    merge_lora(model)
    assert not has_lora(model)
    assert set(model.state_dict()) == set(original.state_dict())
    assert not any(LORA_ATTR in n for n, _ in model.named_modules())
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)
    # the hooks are gone: a second forward does not add the deltas again
    torch.testing.assert_close(_logits(model), want, rtol=1e-5, atol=1e-5)


def test_teacher_mode_runs_the_original_model_and_restores_both_switches():
    model, original = _lora_model()
    with torch.no_grad(), dms.fixed_eviction(model, 2), dms.fixed_eviction(original, 2):  # evict a lot
        student = model(input_ids=IDS, use_cache=False).logits
        with teacher_mode(model):
            teacher = model(input_ids=IDS, use_cache=False).logits
            assert all(m.dms_switches.eviction_disabled for m in dms.dms_modules(model))
            assert not any(d.enabled for d in lora_deltas(model).values())
        plain = original(input_ids=IDS, use_cache=False).logits
        with dms.eviction_disabled(original):
            want = original(input_ids=IDS, use_cache=False).logits
        again = model(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(teacher, want, rtol=0, atol=0)
    assert (teacher - plain).abs().max() > 1e-4  # eviction really was off (not only the deltas)
    assert all(d.enabled for d in lora_deltas(model).values())
    assert not any(m.dms_switches.eviction_disabled for m in dms.dms_modules(model))
    torch.testing.assert_close(again, student, rtol=0, atol=0)


def test_deep_copies_carry_their_own_deltas():
    model, _ = _lora_model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for d in lora_deltas(twin).values():
            d.lora_b.zero_()
    assert (_logits(model) - _logits(twin)).abs().max() > 1e-3  # the copy's hooks use the copy's B


def test_attach_creates_parameters_on_the_model_device():
    model = dms.apply_dms(tiny_model(), {"window_size": 4})
    torch.set_default_device("meta")
    try:
        params = attach_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    finally:
        torch.set_default_device("cpu")
    assert all(p.device.type == "cpu" for p in params)


def test_bad_targets_and_double_attach_are_refused():
    model = dms.apply_dms(tiny_model(), {"window_size": 4})
    with pytest.raises(ValueError, match="not a linear layer"):
        attach_lora(model, rank=2, alpha=4.0, targets=("q_proj", "rotary"))
    assert not has_lora(model)  # nothing half-attached
    attach_lora(model, rank=2, alpha=4.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        attach_lora(model, rank=2, alpha=4.0)
    with pytest.raises(ValueError, match="no DMS attention"):
        attach_lora(tiny_model(), rank=2, alpha=4.0)


def test_digest_ignores_the_load_dtype_but_not_the_values():
    a = dms.apply_dms(tiny_model(), {"window_size": 4})
    with torch.no_grad():  # float32 weights that are exactly bfloat16 values (a bf16 checkpoint)
        for p in a.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    b = copy.deepcopy(a).to(torch.bfloat16)
    names = ("q_proj", "v_proj")
    assert base_weights_digest(target_weights(a, names)) == base_weights_digest(target_weights(b, names))
    with torch.no_grad():
        target_weights(b, names)["model.layers.1.self_attn.v_proj.weight"][0, 0] += 0.5
    assert base_weights_digest(target_weights(a, names)) != base_weights_digest(target_weights(b, names))


@pytest.mark.parametrize("key", ["train_all_weights", "fsdp"])
def test_lora_config_needs_frozen_base_and_data_parallel(key):
    with pytest.raises(ValidationError, match="lora_rank"):
        TrainConfig(lora_rank=4, **{key: True})
    with pytest.raises(ValidationError, match="lora_targets"):
        TrainConfig(lora_rank=4, lora_targets=())
    TrainConfig(lora_rank=4)


# ------------------------------------------------------------------------------ the artifact
def test_adapters_with_lora_load_merged_onto_the_original_base(tmp_path):
    model, original = _lora_model(targets=("q_proj", "v_proj"))
    want = _logits(model)
    dms.save_adapters(model, tmp_path / "heads")
    record = json.loads((tmp_path / "heads" / "dms_adapters.json").read_text())
    assert record["lora"]["rank"] == 4 and record["lora"]["targets"] == ["q_proj", "v_proj"]
    assert record["lora"]["scale"] == pytest.approx(2.0)
    fresh = tiny_model()  # no DMS yet: load applies the mode, copies adapters, merges the deltas
    dms.load_adapters(fresh, tmp_path / "heads")
    assert not has_lora(fresh)
    torch.testing.assert_close(_logits(fresh), want, rtol=1e-5, atol=1e-5)
    # the decisions too: the adapters and the adapted queries evict the same tokens
    with torch.no_grad():
        a = model(input_ids=IDS, use_cache=False).logits
        b = fresh(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (_logits(original) - want).abs().max() > 1e-3


def test_loading_lora_twice_or_onto_other_weights_is_refused_and_changes_nothing(tmp_path):
    model, _ = _lora_model()
    dms.save_adapters(model, tmp_path / "heads")
    once = tiny_model()
    dms.load_adapters(once, tmp_path / "heads")
    state = {k: v.clone() for k, v in once.state_dict().items()}
    with pytest.raises(ValueError, match="already"):
        dms.load_adapters(once, tmp_path / "heads")
    assert all(torch.equal(state[k], v) for k, v in once.state_dict().items())
    other = tiny_model(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="other base weights"):
        dms.load_adapters(other, tmp_path / "heads")
    assert not dms.is_dms_model(other)  # refused before the mode was applied
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="LoRA deltas attached"):
        dms.load_adapters(model, tmp_path / "heads")


def test_adapters_without_lora_have_no_lora_record(tmp_path):
    model = dms.apply_dms(tiny_model(), {"window_size": 4})
    dms.save_adapters(model, tmp_path / "heads")
    assert "lora" not in json.loads((tmp_path / "heads" / "dms_adapters.json").read_text())


# ------------------------------------------------------------------------------ training
def test_lora_training_moves_deltas_and_adapters_but_not_the_base(tmp_path):
    model, seqs = build()
    base0 = {n: p.detach().clone() for n, p in model.named_parameters() if "dms_adapter" not in n}
    cfg = TrainConfig(
        steps=4,
        lr=1e-2,
        lora_rank=4,
        lora_lr=1e-2,
        batch_size=2,
        cr_end=4.0,
        anneal_steps=2,
        checkpoint_every=0,
    )
    hist = train(model, seqs, cfg, str(tmp_path), progress=False)
    assert has_lora(model)
    params = dict(model.named_parameters())
    for n, p in base0.items():
        assert torch.equal(params[n], p), n
    assert all(d.lora_b.abs().max() > 0 for d in lora_deltas(model).values())
    # step 1 starts from B = 0, so its KL equals the adapter-only run's first step
    plain, seqs2 = build()
    ref = train(
        plain, seqs2, cfg.model_copy(update={"lora_rank": 0}), str(tmp_path / "plain"), progress=False
    )
    assert hist[0]["kl"] == pytest.approx(ref[0]["kl"], rel=1e-6, abs=1e-9)
    assert hist[-1]["kl"] != pytest.approx(ref[-1]["kl"], rel=1e-4)


def test_lora_teacher_is_the_original_model(tmp_path, monkeypatch):
    from modelopt_dms.training import trainer as trainer_mod

    model, seqs = build()
    original = copy.deepcopy(model)
    seen = []
    real = trainer_mod.fused_head_kl

    def spy(hidden, teacher, *a, **k):
        seen.append(teacher.detach().clone())
        return real(hidden, teacher, *a, **k)

    monkeypatch.setattr(trainer_mod, "fused_head_kl", spy)
    cfg = TrainConfig(steps=3, lr=1e-2, lora_rank=4, lora_lr=5e-2, batch_size=2, checkpoint_every=0)
    train(model, seqs, cfg, str(tmp_path), progress=False)
    hidden = {}
    handle = original.model.norm.register_forward_hook(lambda m, a, out: hidden.setdefault("h", out))
    with torch.no_grad(), dms.eviction_disabled(original):
        original(input_ids=seqs[4:6], use_cache=False)  # the rows of step 3
    handle.remove()
    torch.testing.assert_close(seen[-1], hidden["h"], rtol=1e-5, atol=1e-5)


def test_lora_run_resumes_to_the_same_state(tmp_path):
    def run(out, steps, resume=True):
        model, seqs = build()
        cfg = TrainConfig(steps=steps, lr=1e-2, lora_rank=2, batch_size=2, checkpoint_every=2)
        hist = train(model, seqs, cfg, str(out), resume=resume, progress=False)
        return model, hist

    straight, h_straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, h_resumed = run(tmp_path / "b", 4)
    assert [r["loss"] for r in h_resumed] == pytest.approx([r["loss"] for r in h_straight], rel=1e-6)
    want = dict(straight.named_parameters())
    for n, p in resumed.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ evaluation
def test_selection_scores_lora_snapshots_against_the_original_model(tmp_path):
    model, seqs = build()
    cfg = TrainConfig(
        steps=4,
        lr=1e-2,
        lora_rank=4,
        lora_lr=5e-2,
        batch_size=2,
        cr_end=4.0,
        anneal_steps=4,
        checkpoint_every=0,
        snapshot_every=2,
    )
    train(model, seqs, cfg, str(tmp_path), progress=False)
    rows = seqs[:2]
    base, _ = build()  # the base with the DMS config, no adapters trained
    original = copy.deepcopy(base)
    choice, scores = select_snapshot(base, tmp_path, rows, target=1.0, window=4, log=lambda _: None)
    assert [s.step for s in scores] == [2, 4]
    for s in scores:  # each snapshot scored alone on a fresh base, against the original logits
        fresh, _ = build()
        dms.load_adapters(fresh, snapshot_path(tmp_path, s.step))
        kls = []
        for r in rows:
            with torch.no_grad():
                got = fresh(input_ids=r[None], past_key_values=dms.DMSCache(), use_cache=True).logits
            kls.append(kl_per_token(_logits(original, r[None]), got)[0, 5:])
        assert s.kl == pytest.approx(float(torch.cat(kls).mean()), rel=1e-5)
        with dms.eviction_disabled(fresh):  # not the adapted model's own uncompressed logits
            own = [kl_per_token(_logits(fresh, r[None]), got)[0, 5:] for r in rows[1:]]
        assert float(torch.cat(own).mean()) != pytest.approx(float(kls[-1].mean()), rel=1e-3)
    fresh, _ = build()
    dms.load_adapters(fresh, choice.path)
    torch.testing.assert_close(_logits(base, rows), _logits(fresh, rows), rtol=1e-6, atol=1e-6)
    untouched, _ = build()  # load_choice=False: LoRA snapshots were scored on copies, base stays
    same, _ = select_snapshot(untouched, tmp_path, rows, 1.0, 4, lambda _: None, load_choice=False)
    assert same == choice
    torch.testing.assert_close(_logits(untouched, rows), _logits(original, rows), rtol=0, atol=0)


def test_fidelity_reference_is_what_the_kl_is_taken_against():
    model, original = _lora_model()
    merge_lora(model)
    ids = IDS[:1]
    same = fidelity_on_text(model, ids, 4, generate_tokens=4)
    as_self = fidelity_on_text(model, ids, 4, generate_tokens=4, reference=copy.deepcopy(model))
    assert as_self.kl_per_token == pytest.approx(same.kl_per_token, rel=1e-6, abs=1e-9)
    vs_original = fidelity_on_text(model, ids, 4, generate_tokens=4, reference=original)
    with torch.no_grad():
        student = model(
            input_ids=ids, past_key_values=dms.DMSCache(prefill_chunk_size=256), use_cache=True
        ).logits
    want = float(kl_per_token(_logits(original, ids), student)[0].mean())
    assert vs_original.kl_per_token == pytest.approx(want, rel=1e-5)
    assert vs_original.kl_per_token > same.kl_per_token


def test_lora_heads_are_refused_by_a_model_with_quantized_weights(tmp_path):
    model, _ = _lora_model()
    dms.save_adapters(model, tmp_path / "heads")
    calib = [IDS[:1]]
    kv_only = dms.quantize_fp8(
        dms.apply_dms(tiny_model(), {"window_size": 4}), calib, weights=False, kv_cache=True
    )
    dms.load_adapters(kv_only, tmp_path / "heads")  # weights not quantized: the deltas merge
    fp8 = dms.quantize_fp8(
        dms.apply_dms(tiny_model(), {"window_size": 4}), calib, weights=True, kv_cache=True
    )
    before = {k: v.clone() for k, v in fp8.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="already quantized"):
        dms.load_adapters(fp8, tmp_path / "heads")
    assert all(torch.equal(before[k], v) for k, v in fp8.state_dict().items() if k in before)


def test_bf16_model_keeps_fp32_deltas_that_train(tmp_path):
    model, seqs = build()
    model.to(torch.bfloat16)
    cfg = TrainConfig(steps=2, lr=1e-2, lora_rank=2, lora_lr=1e-2, batch_size=2, checkpoint_every=0)
    train(model, seqs, cfg, str(tmp_path), progress=False)
    deltas = list(lora_deltas(model).values())
    assert all(d.lora_a.dtype == torch.float32 and d.lora_b.dtype == torch.float32 for d in deltas)
    assert all(d.lora_b.abs().max() > 0 for d in deltas)
    with torch.no_grad():
        out = model(input_ids=seqs[:1], use_cache=False).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_export_and_quantize_refuse_attached_deltas(tmp_path):
    model, _ = _lora_model()
    with pytest.raises(ValueError, match="merge_lora"):
        dms.export_hf_checkpoint(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="merge_lora"):
        dms.quantize_fp8(model, [IDS[:1]], weights=True, kv_cache=True)
    assert not (tmp_path / "hf").exists()
    want = _logits(model)
    merge_lora(model)
    dms.export_hf_checkpoint(model, tmp_path / "hf")
    back, _ = dms.load_exported(tmp_path / "hf")
    torch.testing.assert_close(_logits(back), want, rtol=1e-5, atol=1e-5)

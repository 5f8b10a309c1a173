"""The trainer where users train: device-clean steps, fp32 trainable parameters in a bf16 model,
one flat all-reduce, per-row noise, gradient checkpointing, the fused lm_head + KL, the flex
attention kernel, packing with document boundaries, KL beyond the window and the teacher cache."""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import modelopt_dms as dms
from modelopt_dms.nn.memo import LastForTensor
from modelopt_dms.training import TrainConfig, distillation_kl, train
from modelopt_dms.training import trainer as trainer_mod
from modelopt_dms.training.fused_kl import TopKTeacher, fused_head_kl, topk_kl
from modelopt_dms.training.packing import PackedRows, pack_documents, row_inputs
from modelopt_dms.training.teacher_cache import TeacherCache

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def dms_model(window=3, std=0.05, seed=0, dtype=torch.float32, **cfg):
    model = dms.apply_dms(
        tiny_model("llama", seed=seed, **cfg), {"window_size": window, "target_compression_ratio": 2.0}
    )
    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for m in dms.dms_modules(model):
            m.dms_adapter.proj.weight.normal_(0, std, generator=gen)
    return model.to(dtype)


def rows(n=8, t=24, seed=0):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = dict(steps=3, lr=1e-3, batch_size=2, checkpoint_every=0, anneal_steps=2)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ devices
def test_a_training_step_creates_every_tensor_on_the_models_device(tmp_path):
    """With the default device set to meta, a tensor made without the model's device lands on meta
    and the step fails; the step runs and the adapters move."""
    model = dms_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "dms_adapter" in n}
    seqs = rows()
    torch.set_default_device("meta")
    try:
        hist = train(model, seqs, cfg(steps=2), str(tmp_path / "run"), progress=False)
    finally:
        torch.set_default_device("cpu")
    assert len(hist) == 2 and all(r["loss"] == r["loss"] for r in hist)
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_no_hard_coded_cpu_in_the_training_path():
    pattern = re.compile(r"""["']cpu["']""")
    allowed = {"devices.py", "teacher_cache.py"}  # the device spec parser; cached files live on disk
    offenders = []
    for path in (ROOT / "modelopt_dms" / "training").glob("*.py"):
        if path.name not in allowed and pattern.search(path.read_text()):
            offenders.append(path.name)
    assert offenders == []


def test_trainable_parameters_stay_fp32_in_a_bf16_model_and_the_norm_weight_moves(tmp_path):
    model = dms_model(dtype=torch.bfloat16)
    norm = dms.dms_modules(model)[0].dms_adapter.norm_weight
    start = norm.detach().float().clone()
    train(model, rows(), cfg(steps=3, lr=1e-4, autocast_bf16=True), str(tmp_path / "run"), progress=False)
    adapter_params = [p for n, p in model.named_parameters() if "dms_adapter" in n]
    assert all(p.dtype == torch.float32 for p in adapter_params)
    moved = (dms.dms_modules(model)[0].dms_adapter.norm_weight.detach() - start).abs().max().item()
    assert 0 < moved < 2**-7, "steps of ~lr must survive: bf16 spacing at 1.0 (2**-7) would round them away"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the base stays bf16


# ------------------------------------------------------------------------------------------ distributed
def test_one_flat_all_reduce_per_step_averages_grads_and_metrics(monkeypatch):
    import torch.distributed as dist

    from modelopt_dms.training.distributed import all_reduce_mean

    calls = []
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: (calls.append(t.numel()), t.mul_(2)))
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([1.0, 2.0, 3.0]), torch.ones(2, 2)
    totals = torch.tensor([0.5, 0.25])
    all_reduce_mean([a, b], totals)
    assert calls == [3 + 4 + 2], "one all-reduce of one flat buffer"
    assert torch.equal(a.grad, torch.tensor([1.0, 2.0, 3.0])) and torch.equal(b.grad, torch.ones(2, 2))
    assert torch.equal(totals, torch.tensor([0.5, 0.25]))


def test_the_noise_of_a_row_is_the_same_wherever_it_lands(tmp_path, monkeypatch):
    seen = []
    real = trainer_mod.set_step
    monkeypatch.setattr(
        trainer_mod, "set_step", lambda m, s, rows=None: (seen.append(rows.tolist()), real(m, s, rows=rows))
    )
    train(
        dms_model(), rows(n=6), cfg(steps=2, batch_size=2, grad_accum=2), str(tmp_path / "a"), progress=False
    )
    assert seen == [[0, 1], [2, 3], [4, 5], [0, 1]], "global row ids, wrapping over the data"


# ------------------------------------------------------------------------------------------ memory
def _grads(model, seqs, **kw):
    model.zero_grad(set_to_none=True)
    config = cfg(**kw).with_target(2.0)
    batch = trainer_mod._micro_batch(seqs, 0, config, torch.device("cpu"), torch.float32)
    dms.set_step(model, 0, rows=batch["rows"])
    hidden = trainer_mod._FinalHidden(model)
    model.train()
    try:
        loss, *_ = trainer_mod._losses(model, batch, config, 0.3, hidden, None)
        loss.backward()
    finally:
        hidden.handle.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    model, seqs = dms_model(), rows()
    for p in model.parameters():
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_("dms_adapter" in n)
    loss_a, grads_a = _grads(model, seqs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_b, grads_b = _grads(model, seqs)
    model.gradient_checkpointing_disable()
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize(("chunk", "sharpness"), [(5, 1.0), (16, 1.0), (1000, 1.0), (16, 12.0)])
def test_fused_head_kl_equals_the_unfused_loss_and_gradients(chunk, sharpness):
    gen = torch.Generator().manual_seed(chunk)
    hs = (torch.randn(2, 23, 16, generator=gen) * sharpness).requires_grad_()
    ht = torch.randn(2, 23, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    valid = torch.rand(2, 23, generator=gen) > 0.3
    fused = fused_head_kl(hs, ht, weight, valid, chunk=chunk)  # 46 rows: a tail chunk for 5 and 16
    g_fused = torch.autograd.grad(fused, [hs, weight])
    ref = distillation_kl(hs @ weight.T, ht @ weight.T, valid)
    g_ref = torch.autograd.grad(ref, [hs, weight])
    assert abs(fused.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))  # fp32 sums
    for a, b in zip(g_fused, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_the_trainer_default_kl_is_the_fused_one_and_equals_the_unfused_path():
    model, seqs = dms_model(), rows()
    for n, p in model.named_parameters():
        p.requires_grad_("dms_adapter" in n)
    loss_f, grads_f = _grads(model, seqs, fused_kl=True)
    loss_u, grads_u = _grads(model, seqs, fused_kl=False)
    assert abs(loss_f.item() - loss_u.item()) <= 1e-5
    for n in grads_f:
        assert torch.allclose(grads_f[n], grads_u[n], atol=1e-5, rtol=1e-4), n


def test_flex_training_kernel_equals_the_eager_soft_bias_forward():
    model = dms_model(window=2)
    ids = rows(n=2, t=20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0
    model.train()
    dms.set_step(model, 3)
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=False).logits
        for m in dms.dms_modules(model):
            m.dms_switches.training_kernel = "flex"
        flex = model(ids, attention_mask=mask, use_cache=False).logits
    assert (eager[1] - flex[1]).abs().max() <= 1e-5 and (eager[0, 5:] - flex[0, 5:]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no backward on CPU"):
        train(model, ids, cfg(attention="flex"), "unused", progress=False)


def test_flex_kernel_builds_the_causal_block_mask_once_per_forward_not_once_per_layer(monkeypatch):
    from modelopt_dms.nn import flex_training

    made = []
    real_flex = flex_training._flex

    def counting():
        flex, create = real_flex()

        def create_counted(*a, **kw):
            made.append(a[3:5])
            return create(*a, **kw)

        return flex, create_counted

    monkeypatch.setattr(flex_training, "_flex", counting)
    monkeypatch.setattr(flex_training, "_CAUSAL_BLOCK_MASK", [None])
    monkeypatch.setattr(flex_training, "_MASK_BLOCK_MASK", LastForTensor())
    model = dms_model(window=2)
    assert len(dms.dms_modules(model)) >= 2
    ids = rows(n=2, t=20)
    model.train()
    dms.set_step(model, 3)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        for m in dms.dms_modules(model):
            m.dms_switches.training_kernel = "flex"
        flex = model(ids, use_cache=False).logits
        assert made == [(20, 20)]  # every layer reused the first layer's causal block mask
        assert (eager - flex).abs().max() <= 1e-5
        model(rows(n=2, t=16), use_cache=False)  # another length: a new mask, built once
        assert made == [(20, 20), (16, 16)]
        pad = torch.ones(2, 20, dtype=torch.long)
        pad[0, :5] = 0  # the model's 4D mask: the layers share its visibility, so one build too
        flex_pad = model(ids, attention_mask=pad, use_cache=False).logits
        for m in dms.dms_modules(model):
            m.dms_switches.training_kernel = "eager"
        eager_pad = model(ids, attention_mask=pad, use_cache=False).logits
    assert made == [(20, 20), (16, 16), (20, 20)]
    assert (eager_pad[1] - flex_pad[1]).abs().max() <= 1e-5
    assert (eager_pad[0, 5:] - flex_pad[0, 5:]).abs().max() <= 1e-5
    # a given mask tensor hits only while it is the same, unchanged tensor
    vis = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    create = lambda *a, **kw: made.append("built") or object()  # noqa: E731
    first = flex_training._block_mask(create, vis, 1, 8, torch.device("cpu"))
    assert flex_training._block_mask(create, vis, 1, 8, torch.device("cpu")) is first
    vis[0, 0, 3, 1] = False  # edited in place: its version moved
    assert flex_training._block_mask(create, vis, 1, 8, torch.device("cpu")) is not first
    other = vis.clone()
    assert flex_training._block_mask(create, other, 1, 8, torch.device("cpu")) is not first
    assert made.count("built") == 3


def test_the_one_slot_mask_memo_lets_a_replaced_mask_go():
    """Values that view the mask (as ``visible`` does) must not keep it alive once replaced."""
    memo, made = LastForTensor(), []

    def view_of(m):
        return lambda: made.append(1) or (m[..., :3], m.sum())

    first = torch.ones(4, 4, dtype=torch.bool)
    gone = weakref.ref(first)
    value = memo.get(first, "k", view_of(first))
    assert memo.get(first, "k", view_of(first)) is value and len(made) == 1
    assert memo.get(first, "other", view_of(first)) is not value and len(made) == 2
    second = torch.zeros(4, 4, dtype=torch.bool)
    memo.get(second, "k", view_of(second))
    del first, value
    gc.collect()
    assert gone() is None  # replaced in the slot: freed, no cycle left behind


# ------------------------------------------------------------------------------------------ packing
def test_packed_rows_equal_the_same_documents_run_separately():
    docs = [rows(n=1, t=n, seed=n)[0].tolist() for n in (9, 14, 6)]
    packed = pack_documents(docs, 32)
    assert packed.shape == (1, 32) and packed.doc_ids[0].tolist() == [0] * 9 + [1] * 14 + [2] * 6 + [-1] * 3
    model = dms_model(window=2, std=0.1).eval()
    inputs = row_inputs(packed.doc_ids, torch.float32)
    assert inputs["position_ids"][0, 9:12].tolist() == [0, 1, 2]
    kw = {"position_ids": inputs["position_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        out = model(packed.input_ids, use_cache=False, **kw).logits
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc]), use_cache=False).logits
            assert torch.allclose(out[0, start : start + len(doc)], alone[0], atol=1e-5)
            start += len(doc)


def test_packed_training_matches_separate_documents_without_noise(monkeypatch):
    import modelopt_dms.nn.attention as attention

    monkeypatch.setattr(attention, "row_noise", lambda seed, r, h, t: torch.zeros(r.shape[0], h, t))
    docs = [rows(n=1, t=n, seed=n)[0].tolist() for n in (11, 8)]
    packed = pack_documents(docs, 19)
    model = dms_model(window=2, std=0.1)
    model.train()
    inputs = row_inputs(packed.doc_ids, torch.float32)
    with torch.no_grad():
        out = model(
            packed.input_ids,
            position_ids=inputs["position_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
        ).logits
        first = model(torch.tensor([docs[0]]), use_cache=False).logits
        second = model(torch.tensor([docs[1]]), use_cache=False).logits
    assert torch.allclose(out[0, :11], first[0], atol=1e-5)
    assert torch.allclose(out[0, 11:], second[0], atol=1e-5), "the shift must be cut at the document end"


def test_training_on_packed_rows_runs(tmp_path):
    docs = [rows(n=1, t=n, seed=n)[0].tolist() for n in (5, 9, 12, 7, 20, 3, 11)]
    packed = pack_documents(docs, 24)
    hist = train(dms_model(), packed, cfg(steps=2), str(tmp_path / "p"), progress=False)
    assert len(hist) == 2 and isinstance(packed, PackedRows)


# ------------------------------------------------------------------------------------------ CPU speed-ups
def _kl(model, seqs, **kw):
    config = cfg(**kw).with_target(2.0)
    batch = trainer_mod._micro_batch(seqs, 0, config, torch.device("cpu"), torch.float32)
    dms.set_step(model, 1, rows=batch["rows"])
    hidden = trainer_mod._FinalHidden(model)
    model.train()
    try:
        with torch.no_grad():
            return trainer_mod._losses(model, batch, config, 0.3, hidden, None)[1].item()
    finally:
        hidden.handle.remove()


def test_kl_is_exactly_zero_inside_the_window_so_kl_beyond_window_only_renormalises():
    window, t = 4, 30
    model, seqs = dms_model(window=window), rows(n=2, t=t)
    model.train()
    dms.set_step(model, 1)
    with torch.no_grad():
        with dms.eviction_disabled(model):
            teacher = model(seqs, use_cache=False).logits
        student = model(seqs, use_cache=False).logits
    from modelopt_dms.nn.divergence import kl_per_token

    per_pos = kl_per_token(teacher, student)
    assert per_pos[:, : window + 1].abs().max() <= 1e-6, "positions t <= w see only window keys"
    assert per_pos[:, window + 1 :].max() > 1e-4
    full, beyond = _kl(model, seqs), _kl(model, seqs, kl_beyond_window=True)
    assert beyond == pytest.approx(full * t / (t - window - 1), rel=1e-4)


def test_topk_teacher_kl_is_a_lower_bound_and_exact_without_a_tail():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen) * 2
    full = distillation_kl(s[None], t[None])
    lp = torch.log_softmax(t, -1)
    for k in (5, 15, 30):
        top, idx = lp.topk(k, -1)
        tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
        approx = topk_kl(s, TopKTeacher(top, idx, tail))
        assert approx <= full + 1e-6
    assert abs(approx - full) <= 1e-4  # k = vocab: the same distribution


def test_teacher_cache_training_follows_the_full_kl_curve(tmp_path):
    """Tolerance: with a peaked teacher (lm_head x8) and the top 96 of 128 tokens kept, the logged
    KL_k stays within 10% below the full KL at every step (KL_k is a lower bound; see TopKTeacher)."""

    def model():
        m = dms_model()
        with torch.no_grad():
            m.lm_head.weight.mul_(8)
        return m

    seqs = rows(n=4, t=24)
    full = train(model(), seqs, cfg(steps=6), str(tmp_path / "full"), progress=False)
    cache = TeacherCache(tmp_path / "teacher", k=96)
    cached = train(model(), seqs, cfg(steps=6), str(tmp_path / "cached"), progress=False, teacher_cache=cache)
    assert cache.misses == 4 and cache.hits == 8, "every row's teacher is computed once (4 rows, 3 epochs)"
    for a, b in zip(full, cached, strict=True):
        assert 0.9 * a["kl"] <= b["kl"] <= a["kl"] + 1e-6, (a["step"], a["kl"], b["kl"])
    with pytest.raises(ValueError, match="frozen base weights"):
        train(
            dms_model(),
            seqs,
            cfg(steps=1, train_all_weights=True),
            str(tmp_path / "x"),
            progress=False,
            teacher_cache=cache,
        )


@pytest.mark.parametrize("sharpness", [1.0, 12.0])  # 12: student probabilities of teacher tokens underflow
def test_fused_topk_kl_equals_the_unfused_topk_loss_and_gradients(sharpness):
    gen = torch.Generator().manual_seed(1)
    hs = (torch.randn(2, 19, 16, generator=gen) * sharpness).requires_grad_()
    weight = torch.randn(40, 16, generator=gen)
    t_logits = torch.randn(2 * 19, 40, generator=gen) * 3
    lp = torch.log_softmax(t_logits, -1)
    top, idx = lp.topk(12, -1)
    teacher = TopKTeacher(top, idx, torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7)))
    valid = torch.rand(2, 19, generator=gen) > 0.2
    fused = fused_head_kl(hs, teacher, weight, valid, chunk=7)
    (g_fused,) = torch.autograd.grad(fused, [hs])
    ref = topk_kl(hs @ weight.T, teacher, valid)
    (g_ref,) = torch.autograd.grad(ref, [hs])
    assert abs(fused.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))  # fp32 sums
    if sharpness == 1.0:  # sharper: rows whose student tail is below the fp32 floor (both clamp it)
        assert torch.allclose(g_fused, g_ref, atol=1e-5, rtol=1e-4)

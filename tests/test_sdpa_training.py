"""The fused-SDPA training attention against the eager soft-bias oracle (float64): outputs and the
gradients of q, k, v and the decision logits, with GQA, any window, lengths that do not fill the
last query block, padding anywhere and packed documents; and the trainer's choice of kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainer_scaling import cfg, dms_model, rows

import modelopt_dms as dms
from modelopt_dms.nn.masks import document_continuation, grouped_attention, soft_eviction_bias
from modelopt_dms.nn.sdpa_training import sdpa_training_attention
from modelopt_dms.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(bsz, hkv, group, t, dim, seed):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    q, k, v = rnd(bsz, hkv * group, t, dim), rnd(bsz, hkv, t, dim), rnd(bsz, hkv, t, dim)
    return q, k, v, rnd(bsz, hkv, t, scale=3.0)


def _masks(bsz, t, layout, seed):
    """(visible (B,1,T,T) or None, valid (B,T) or None, cont or None) for one mask layout."""
    gen = torch.Generator().manual_seed(seed)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if layout == "causal":
        return None, None, None
    if layout == "padding":  # random padding anywhere (also between real tokens), >= 1 real token
        valid = torch.rand(bsz, t, generator=gen) > 0.3
        valid[:, -1] = True
        visible = causal[None] & valid[:, None, :]
        valid_q = visible & valid[:, :, None]
        return valid_q[:, None], valid, None
    # packed: documents of random lengths, block-diagonal causal
    doc = torch.zeros(bsz, t, dtype=torch.long)
    for b in range(bsz):
        cuts = torch.randperm(t - 1, generator=gen)[:2] + 1
        for c in cuts.tolist():
            doc[b, c:] += 1
    visible = (causal[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]
    return visible, None, document_continuation(visible, None)


def _check(bsz, hkv, group, t, dim, window, layout, seed):
    q, k, v, z = _inputs(bsz, hkv, group, t, dim, seed)
    visible, valid, cont = _masks(bsz, t, layout, seed)
    scale = dim**-0.5
    ref = grouped_attention(q, k, v, scale, mask=visible, bias=soft_eviction_bias(z, window, valid, cont))
    out = sdpa_training_attention(q, k, v, z, window, scale, visible, valid, cont)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-10
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * weight).sum(), (q, k, v, z))
    g_out = torch.autograd.grad((out * weight).sum(), (q, k, v, z))
    for a, b in zip(g_ref, g_out, strict=True):
        assert torch.isfinite(b).all() and (a - b).abs().max() <= 1e-9


@pytest.mark.parametrize("layout", ["causal", "padding", "packed"])
@pytest.mark.parametrize("t", [7, 64, 150])
def test_sdpa_kernel_equals_the_eager_oracle(layout, t):
    _check(2, 2, 3, t, 8, 4, layout, seed=t)


@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(
    bsz=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    t=st.integers(1, 140),
    dim=st.sampled_from([4, 8, 16]),
    window=st.integers(0, 40),
    layout=st.sampled_from(["causal", "padding", "packed"]),
    seed=st.integers(0, 2**16),
)
def test_sdpa_kernel_equals_the_eager_oracle_on_random_shapes(bsz, hkv, group, t, dim, window, layout, seed):
    if layout == "packed" and t < 3:
        layout = "causal"
    _check(bsz, hkv, group, t, dim, window, layout, seed)


def test_the_trainer_uses_the_sdpa_kernel_on_cpu_and_it_trains_like_the_eager_one(tmp_path, monkeypatch):
    import modelopt_dms.nn.attention as attention_mod

    calls = []
    original = attention_mod.sdpa_training_attention
    monkeypatch.setattr(
        attention_mod, "sdpa_training_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    seqs = rows(n=4, t=40)
    hist = {}
    for kernel in ("eager", "auto"):
        calls.clear()
        model = dms_model(window=4)
        run = cfg(steps=3, attention=kernel)
        hist[kernel] = train(model, seqs, run, str(tmp_path / kernel), progress=False)
        assert len(calls) == (0 if kernel == "eager" else 3 * len(dms.dms_modules(model))), kernel
    for a, b in zip(hist["eager"], hist["auto"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["eviction_rate"] - b["eviction_rate"]) <= 1e-5

"""DMS mask math (docs/design.md §2) against naive float64 references written from the spec.

The references below deliberately do not call anything in ``modelopt_dms.nn.masks``: they are plain
Python loops over (batch, head, query, key) implementing the text of §2.
"""

from __future__ import annotations

import math

import pytest
import torch

from modelopt_dms.nn.decisions import logistic_noise, relaxed_decisions
from modelopt_dms.nn.masks import grouped_attention, hard_visibility, soft_eviction_bias

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- naive references
def naive_logsigmoid(x: float) -> float:
    # log(sigmoid(x)) computed stably in float64 Python arithmetic.
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def naive_soft_bias(z: torch.Tensor, w: int) -> torch.Tensor:
    """§2 training mask: -inf if k > q; 0 if q - k <= w; else log(1 - sigmoid(z_{k+1}))."""
    bsz, heads, t = z.shape
    out = torch.empty(bsz, heads, t, t, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            for q in range(t):
                for k in range(t):
                    if k > q:
                        out[b, h, q, k] = NEG_INF
                    elif q - k <= w:
                        out[b, h, q, k] = 0.0
                    else:
                        # key k is governed by the decision emitted at k + 1 (k + 1 <= q exists here)
                        out[b, h, q, k] = naive_logsigmoid(-float(z[b, h, k + 1]))
    return out


def naive_hard_visible(d: torch.Tensor, w: int, q_positions: list[int] | None = None) -> torch.Tensor:
    """§2 inference rule: k visible to q iff k <= q and not (d_{k+1} = 1 and q - k >= w + 1).

    The newest key (no d_{k+1} yet) is pending, i.e. never evicted.
    """
    bsz, heads, t = d.shape
    qs = list(range(t)) if q_positions is None else q_positions
    out = torch.zeros(bsz, heads, len(qs), t, dtype=torch.bool)
    for b in range(bsz):
        for h in range(heads):
            for i, q in enumerate(qs):
                for k in range(t):
                    flagged = k + 1 < t and bool(d[b, h, k + 1])
                    out[b, h, i, k] = k <= q and not (flagged and q - k >= w + 1)
    return out


def naive_gqa_attention(query, key, value, scaling, mask=None, bias=None) -> torch.Tensor:
    """float64 softmax attention, query head h reads KV head h // G; rows seeing nothing give 0."""
    bsz, hq, tq, dim = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    group = hq // hkv
    out = torch.zeros(bsz, tq, hq, dim, dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            g = h // group
            for i in range(tq):
                scores = []
                for k in range(tk):
                    s = float((query[b, h, i].double() * key[b, g, k].double()).sum()) * scaling
                    if bias is not None:
                        s += float(bias[b, g, i, k])
                    if mask is not None and not bool(mask[b, g, i, k]):
                        s = NEG_INF
                    scores.append(s)
                m = max(scores)
                if m == NEG_INF:
                    continue
                weights = [math.exp(s - m) if s != NEG_INF else 0.0 for s in scores]
                total = sum(weights)
                for k in range(tk):
                    out[b, i, h] += weights[k] / total * value[b, g, k].double()
    return out


# --------------------------------------------------------------------------- soft training mask
@pytest.mark.parametrize("w", [1, 2, 5])
@pytest.mark.parametrize("t", [1, 2, 9])
def test_soft_eviction_bias_matches_naive(w, t):
    gen = torch.Generator().manual_seed(100 * w + t)
    z = torch.randn(2, 3, t, generator=gen, dtype=torch.float64) * 8
    got = soft_eviction_bias(z, w)
    ref = naive_soft_bias(z, w)
    assert got.shape == (2, 3, t, t)
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite].double(), ref[finite], atol=1e-6, rtol=1e-6)


def test_soft_bias_shift_by_one_and_window():
    # Only the decision emitted at position t0 is "evict": it must hit key t0 - 1, and only for
    # queries further than w tokens away from that key.
    t, w, t0 = 10, 2, 4
    z = torch.full((1, 1, t), -1e4, dtype=torch.float64)
    z[0, 0, t0] = 3.0
    bias = soft_eviction_bias(z, w)[0, 0].double()
    expected = naive_logsigmoid(-3.0)
    for q in range(t):
        for k in range(q + 1):
            val = float(bias[q, k])
            if k == t0 - 1 and q - k > w:
                assert val == pytest.approx(expected, abs=1e-6), (q, k)
            else:
                assert abs(val) < 1e-30, (q, k, val)
        for k in range(q + 1, t):
            assert bias[q, k] == NEG_INF


def test_soft_bias_last_decision_pending():
    # The decision of the newest token governs nothing inside the sequence.
    t, w = 6, 1
    z = torch.full((1, 2, t), -30.0)
    z2 = z.clone()
    z2[..., -1] = 30.0
    assert torch.equal(soft_eviction_bias(z, w), soft_eviction_bias(z2, w))
    # ... and the first decision (emitted by token 0) governs no key either.
    z3 = z.clone()
    z3[..., 0] = 30.0
    assert torch.equal(soft_eviction_bias(z, w), soft_eviction_bias(z3, w))


# --------------------------------------------------------------------------- hard inference mask
@pytest.mark.parametrize("w", [1, 3, 4])
@pytest.mark.parametrize("t", [1, 2, 11])
def test_hard_visibility_matches_naive(w, t):
    gen = torch.Generator().manual_seed(7 * w + t)
    d = torch.rand(2, 3, t, generator=gen) > 0.5
    got = hard_visibility(d, w)
    assert got.dtype == torch.bool
    assert torch.equal(got, naive_hard_visible(d, w))


def test_hard_visibility_query_subset():
    gen = torch.Generator().manual_seed(3)
    t, w = 12, 2
    d = torch.rand(2, 2, t, generator=gen) > 0.4
    qs = [9, 10, 11]
    got = hard_visibility(d, w, torch.tensor(qs))
    assert torch.equal(got, naive_hard_visible(d, w, qs))


def test_hard_visibility_all_evicting_keeps_exactly_the_window():
    t, w = 12, 3
    d = torch.ones(1, 1, t, dtype=torch.bool)
    vis = hard_visibility(d, w)[0, 0]
    for q in range(t):
        visible = [k for k in range(t) if vis[q, k]]
        assert visible == list(range(max(0, q - w), q + 1))  # itself + w earlier = W = w + 1


@pytest.mark.parametrize("w", [1, 2, 5])
def test_hard_visibility_last_row_is_cache_length_formula(w):
    # §2: L = min(T, W) + #{k < T - W : d_{k+1} = 0}, W = w + 1.
    gen = torch.Generator().manual_seed(w)
    for t in range(1, 15):
        d = torch.rand(3, 2, t, generator=gen) > 0.5
        lengths = hard_visibility(d, w)[..., -1, :].sum(-1)
        big_w = w + 1
        for b in range(3):
            for h in range(2):
                expected = min(t, big_w) + sum(1 for k in range(t - big_w) if not d[b, h, k + 1])
                assert int(lengths[b, h]) == expected, (t, b, h)


# --------------------------------------------------------------------------- tau -> 0 limit
@pytest.mark.parametrize("w", [1, 3])
def test_soft_mask_tends_to_hard_mask_as_tau_goes_to_zero(w):
    gen = torch.Generator().manual_seed(11)
    t = 13
    logits = torch.randn(2, 2, t, generator=gen) * 4
    logits = torch.where(logits.abs() < 0.05, torch.full_like(logits, 0.5), logits)  # avoid ties at 0
    z, hard = relaxed_decisions(logits, temperature=1e-5, noise=None)
    assert torch.equal(hard.bool(), logits > 0)
    soft = soft_eviction_bias(z, w).exp()
    hard_mask = naive_hard_visible(logits > 0, w).to(soft.dtype)
    torch.testing.assert_close(soft, hard_mask, atol=1e-6, rtol=0)

    # Attention outputs agree too.
    q = torch.randn(2, 4, t, 8, generator=gen)
    k = torch.randn(2, 2, t, 8, generator=gen)
    v = torch.randn(2, 2, t, 8, generator=gen)
    out_soft = grouped_attention(q, k, v, 8**-0.5, bias=soft_eviction_bias(z, w))
    out_hard = grouped_attention(q, k, v, 8**-0.5, mask=hard_visibility(logits > 0, w))
    torch.testing.assert_close(out_soft, out_hard, atol=1e-6, rtol=1e-6)


def test_soft_bias_close_to_zero_for_confident_keep():
    # logit = -5 (init) and tau = 0.1: z = -50, the soft mask barely moves the scores.
    z, _ = relaxed_decisions(torch.full((1, 1, 8), -5.0), temperature=0.1, noise=None)
    bias = soft_eviction_bias(z, 1)
    finite = torch.isfinite(bias)
    assert bias[finite].abs().max() < 1e-20


# --------------------------------------------------------------------------- grouped attention
@pytest.mark.parametrize("group", [1, 3])
def test_grouped_attention_matches_naive_gqa(group):
    gen = torch.Generator().manual_seed(group)
    bsz, hkv, t, dim = 2, 2, 7, 4
    q = torch.randn(bsz, hkv * group, t, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(bsz, hkv, t, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(bsz, hkv, t, dim, generator=gen, dtype=torch.float64)
    d = torch.rand(bsz, hkv, t, generator=gen) > 0.5
    z = torch.randn(bsz, hkv, t, generator=gen, dtype=torch.float64) * 3
    bias = naive_soft_bias(z, 1)
    mask = naive_hard_visible(d, 1)
    # query row 0 of batch 1 sees nothing: must give zeros, not NaN
    mask[1, :, 0, :] = False
    scaling = dim**-0.5
    got_b = grouped_attention(q, k, v, scaling, bias=bias)
    got_m = grouped_attention(q, k, v, scaling, mask=mask)
    assert got_b.shape == (bsz, t, hkv * group, dim)
    torch.testing.assert_close(
        got_b.double(), naive_gqa_attention(q, k, v, scaling, bias=bias), atol=1e-6, rtol=1e-6
    )
    ref_m = naive_gqa_attention(q, k, v, scaling, mask=mask)
    assert torch.isfinite(got_m).all()
    torch.testing.assert_close(got_m.double(), ref_m, atol=1e-6, rtol=1e-6)
    assert torch.equal(got_m[1, 0], torch.zeros_like(got_m[1, 0]))


def test_grouped_attention_shares_mask_across_group():
    # Every query head of a group must see the same keys: with identical queries in one group the
    # outputs of its heads are identical, and a mask change on KV head 1 leaves group 0 untouched.
    gen = torch.Generator().manual_seed(5)
    q0 = torch.randn(1, 1, 6, 4, generator=gen)
    q = torch.cat([q0, q0, q0 * 0.5, q0 * 0.5], dim=1)  # G = 2, 2 KV heads
    k = torch.randn(1, 2, 6, 4, generator=gen)
    v = torch.randn(1, 2, 6, 4, generator=gen)
    mask = naive_hard_visible(torch.zeros(1, 2, 6, dtype=torch.bool), 1)
    out = grouped_attention(q, k, v, 0.5, mask=mask)
    assert torch.equal(out[:, :, 0], out[:, :, 1])
    mask2 = mask.clone()
    mask2[0, 1, 5, 0] = False
    out2 = grouped_attention(q, k, v, 0.5, mask=mask2)
    assert torch.equal(out[:, :, :2], out2[:, :, :2])
    assert not torch.equal(out[:, 5, 2:], out2[:, 5, 2:])


# --------------------------------------------------------------------------- relaxation and noise
def test_relaxed_decisions_forward_and_straight_through_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 17, generator=gen) * 2).requires_grad_(True)
    noise = torch.randn(2, 3, 17, generator=gen)
    tau = 0.1
    z, hard = relaxed_decisions(logits, tau, noise)
    torch.testing.assert_close(z, (logits.detach() + noise) / tau)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.detach(), ((logits.detach() + noise) / tau > 0).float())

    weights = torch.randn(2, 3, 17, generator=gen)
    (grad_st,) = torch.autograd.grad((hard * weights).sum(), logits)
    ref_logits = logits.detach().double().requires_grad_(True)
    prob = torch.sigmoid((ref_logits + noise.double()) / tau)
    (grad_ref,) = torch.autograd.grad((prob * weights.double()).sum(), ref_logits)
    torch.testing.assert_close(grad_st.double(), grad_ref, atol=1e-6, rtol=1e-5)


def test_logistic_noise_deterministic_and_logistic():
    a = logistic_noise((3, 4, 5), seed=123)
    b = logistic_noise((3, 4, 5), seed=123)
    c = logistic_noise((3, 4, 5), seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    n = logistic_noise((1_000_000,), seed=9).double()
    assert torch.isfinite(n).all()
    assert abs(float(n.mean())) < 0.02  # std of the mean: 1.81 / 1000
    assert float(n.var()) == pytest.approx(math.pi**2 / 3, rel=0.02)
    # the init eviction probability: P(g > 5) = sigmoid(-5) ~ 0.0067 (std 8e-5 at 1e6 samples)
    assert float((n > 5).double().mean()) == pytest.approx(1 / (1 + math.exp(5)), abs=6e-4)


def test_row_noise_is_a_function_of_the_row_id_and_standard_logistic():
    from modelopt_dms.nn.decisions import row_noise

    rows = torch.tensor([5, 9, 5])
    a = row_noise(11, rows, 3, 40)
    assert a.shape == (3, 3, 40) and a.dtype == torch.float32
    assert torch.equal(a[0], a[2]), "the same row id draws the same noise in any batch position"
    assert not torch.equal(a[0], a[1])
    assert torch.equal(row_noise(11, rows[1:2], 3, 40)[0], a[1]), "independent of the batch it is in"
    assert not torch.equal(row_noise(12, rows, 3, 40), a)
    n = row_noise(3, torch.arange(1000), 10, 100).double().flatten()  # 1e6 samples
    assert torch.isfinite(n).all()
    assert abs(float(n.mean())) < 0.02
    assert float(n.var()) == pytest.approx(math.pi**2 / 3, rel=0.02)
    for q in (-2.0, 0.0, 1.0, 5.0):
        assert float((n <= q).double().mean()) == pytest.approx(1 / (1 + math.exp(-q)), abs=2e-3)

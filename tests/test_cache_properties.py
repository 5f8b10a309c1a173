"""Property tests of the batched ``DMSCache.dms_attend`` against an independent naive list reference
and against the previous per-row cache (``tests/oracle_cache.py``).

No model is involved: random float64 q/k/v and random decisions are fed to ``dms_attend`` in
random sequences of calls (a prefill, 1-token decode steps, more prefills = multi-turn, beam
reorders and ``num_return_sequences`` repeats), each call with random LEFT padding given as a 2D or
4D mask, with random ``prefill_chunk_size``, both storage layouts and random block / page sizes.
The reference (docs/design.md §2) keeps, per (layer, batch row, KV head), plain Python
lists of every real token's q/k/v and decision; positions count real tokens of that row only.

* output of a real query at position ``q``: softmax over keys ``k <= q`` with NOT
  (``d_{k+1} == 1`` and ``q - k >= w + 1``); query head ``j`` reads KV head ``j // G``;
  padded query positions are exactly zero;
* row state after ``T`` real tokens: the ``W = w + 1`` newest positions plus the older ``k`` with
  ``d_{k+1} = 0``; flags ``d_{k+1}`` (newest pending = False); stored k/v equal the inputs;
* memory: the layer capacity is whole blocks/pages with at most one granule above the longest
  row (+ its scratch slot); paged rows hold at most one page beyond their length; ``cache_stats``
  equals own accounting; the per-row oracle's outputs and kept sets are the same;
* ``release(batch_index=b)`` frees exactly that row, ``release()`` everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle_cache import PerRowDMSCache

from modelopt_dms import DMSCache, cache_stats

FAST = settings(
    max_examples=1000,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
SLOW = settings(FAST, max_examples=4000)

EVICT_RATES = [0.9, 0.9, 0.9, 0.5, 0.1, 0.0, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add sync cost


# --------------------------------------------------------------------------- scenario
@dataclass
class Call:
    length: int  # new tokens passed in (padding included)
    pads: list[int]  # left padding per batch row (0..length)
    mask_kind: str  # "none" | "2d_new" | "2d_full" | "4d_bool" | "4d_float"
    rows: list[int] | None = None  # instead of tokens: reorder/repeat batch rows (beams)


@dataclass
class Scenario:
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    window: int
    evict_rate: float
    block_size: int
    chunk: int | None
    layers: list[int]
    dtype: torch.dtype
    calls: list[Call]
    seed: int
    release_row: int | None = None
    layout: str = "blocked"


@st.composite
def scenarios(draw, max_calls: int = 14) -> Scenario:
    batch = draw(st.integers(1, 3))
    lengths: list[int] = [draw(st.integers(1, 12))]  # first prefill
    for _ in range(draw(st.integers(0, max_calls - 1))):
        kind = draw(st.sampled_from(["decode", "decode", "decode", "prefill"]))
        lengths.append(1 if kind == "decode" else draw(st.integers(1, 8)))
    calls = []
    for length in lengths:
        padded = draw(st.sampled_from([False, True, True]))
        if padded:
            # mostly partial padding; occasionally a row gets no real token in this call
            pads = [draw(st.integers(0, length)) for _ in range(batch)]
        else:
            pads = [0] * batch
        kinds = ["2d_new", "2d_full", "4d_bool", "4d_float"] + (["none"] if not any(pads) else [])
        calls.append(Call(length, pads, draw(st.sampled_from(kinds))))
        if draw(st.integers(0, 9)) == 0:  # a beam reorder / repeat of the rows (keeps the batch size)
            rows = [draw(st.integers(0, batch - 1)) for _ in range(batch)]
            calls.append(Call(0, [], "none", rows=rows))
    n_layers = draw(st.sampled_from([1, 1, 2]))
    layers = draw(st.lists(st.integers(0, 4), min_size=n_layers, max_size=n_layers, unique=True))
    return Scenario(
        batch=batch,
        kv_heads=draw(st.integers(1, 3)),
        group=draw(st.integers(1, 3)),
        head_dim=draw(st.integers(2, 8)),
        window=draw(st.integers(1, 6)),
        evict_rate=draw(st.sampled_from(EVICT_RATES)),
        block_size=draw(st.sampled_from([1, 2, 3, 4, 8, 64])),
        chunk=draw(st.sampled_from([None, None, 1, 2, 3, 5])),
        layers=layers,
        dtype=draw(st.sampled_from([torch.float64, torch.float64, torch.float64, torch.float32])),
        calls=calls,
        seed=draw(st.integers(0, 2**31 - 1)),
        release_row=draw(st.one_of(st.none(), st.integers(0, batch - 1))),
        layout=draw(st.sampled_from(["blocked", "paged"])),
    )


# --------------------------------------------------------------------------- naive reference
@dataclass
class RefRow:
    """All real tokens of one (layer, batch row, KV head), in order."""

    q: list[torch.Tensor] = field(default_factory=list)  # each (G, D)
    k: list[torch.Tensor] = field(default_factory=list)  # each (D,)
    v: list[torch.Tensor] = field(default_factory=list)
    d: list[bool] = field(default_factory=list)


def ref_output(row: RefRow, q_pos: int, window: int, scaling: float) -> torch.Tensor:
    """Float64 softmax attention of the query at row position ``q_pos``; returns (G, D)."""
    keys, vals = [], []
    for k in range(q_pos + 1):
        next_decision = row.d[k + 1] if k + 1 < len(row.d) else False  # pending: not evicted
        if next_decision and q_pos - k >= window + 1:
            continue
        keys.append(row.k[k].double())
        vals.append(row.v[k].double())
    keys_t, vals_t = torch.stack(keys), torch.stack(vals)
    scores = row.q[q_pos].double() @ keys_t.T * scaling  # (G, n)
    return torch.softmax(scores, dim=-1) @ vals_t


def expected_kept(d: list[bool], window: int) -> tuple[set[int], dict[int, bool]]:
    """Positions a row keeps after ``len(d)`` tokens and their flags (docs/design.md §2)."""
    total, big_w = len(d), window + 1
    kept = set(range(max(0, total - big_w), total))
    kept |= {k for k in range(max(0, total - big_w)) if not d[k + 1]}
    flags = {k: (d[k + 1] if k + 1 < total else False) for k in kept}
    return kept, flags


def build_mask(kind: str, real: torch.Tensor, history: torch.Tensor, dtype: torch.dtype):
    """The attention mask of one call. ``real``: (B, T) bool; ``history``: (B, past) bool."""
    bsz, length = real.shape
    past = history.shape[1]
    full = torch.cat([history, real], dim=1)  # (B, past + T)
    if kind == "none":
        return None
    if kind == "2d_new":
        return real.long()
    if kind == "2d_full":
        return full.long()
    q_abs = torch.arange(past, past + length)[:, None]
    k_abs = torch.arange(past + length)[None, :]
    mask4 = (k_abs <= q_abs)[None, None] & full[:, None, None, :]  # (B, 1, T, past + T)
    if kind == "4d_bool":
        return mask4
    zero = torch.zeros((), dtype=dtype)
    return torch.where(mask4, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


# --------------------------------------------------------------------------- the property
def check_row_state(cache, layer, b, h, ref: RefRow, window: int, dtype) -> int:
    state = cache.row_state(layer, b, h)
    pos = state["pos"].tolist()
    assert state["seen"] == len(ref.d), (layer, b, h)
    assert len(pos) == len(set(pos)), f"duplicate positions {pos}"
    kept, flags = expected_kept(ref.d, window)
    total, big_w = len(ref.d), window + 1
    # formula L = min(T, W) + #{k < T - W : d_{k+1} = 0}
    formula = min(total, big_w) + sum(1 for k in range(max(0, total - big_w)) if not ref.d[k + 1])
    assert len(pos) == formula == len(kept), (layer, b, h, sorted(pos), sorted(kept))
    assert set(pos) == kept, (layer, b, h, sorted(pos), sorted(kept))
    for slot, p in enumerate(pos):
        assert bool(state["flag"][slot]) == flags[p], (layer, b, h, p)
        assert torch.equal(state["k"][slot], ref.k[p].to(dtype)), (layer, b, h, p)
        assert torch.equal(state["v"][slot], ref.v[p].to(dtype)), (layer, b, h, p)
    return len(pos)


def _select_rows_everywhere(cache, oracle, refs, rows: list[int]) -> dict:
    """Beam reorder / repeat of the batch rows in the cache, the oracle and the naive reference."""
    import copy as _copy

    index = torch.tensor(rows)
    cache.reorder_cache(index)
    for li, layer_rows in oracle._rows.items():
        oracle._rows[li] = [[_copy.deepcopy(r) for r in layer_rows[i]] for i in rows]
    return {li: [[_copy.deepcopy(r) for r in refs[li][i]] for i in rows] for li in refs}


def run_scenario(sc: Scenario) -> int:
    """Run every call of ``sc`` and check all properties after each; returns #checked calls."""
    gen = torch.Generator().manual_seed(sc.seed)
    bsz, hkv, grp, dim, w = sc.batch, sc.kv_heads, sc.group, sc.head_dim, sc.window
    hq = hkv * grp
    elem = torch.empty((), dtype=sc.dtype).element_size()
    tol = 1e-6 if sc.dtype == torch.float64 else 2e-4
    scaling = float(torch.empty(()).uniform_(0.2, 1.5, generator=gen)) / math.sqrt(dim)
    cache = DMSCache(
        layout=sc.layout, block_size=sc.block_size, page_size=sc.block_size, prefill_chunk_size=sc.chunk
    )
    oracle = PerRowDMSCache(block_size=sc.block_size, prefill_chunk_size=sc.chunk)
    refs = {li: [[RefRow() for _ in range(hkv)] for _ in range(bsz)] for li in sc.layers}
    history = torch.zeros(bsz, 0, dtype=torch.bool)
    logical = 0
    for call in sc.calls:
        if call.rows is not None:
            if cache.dms_layers():
                refs = _select_rows_everywhere(cache, oracle, refs, call.rows)
                history = history[call.rows]
            continue
        length = call.length
        real = torch.ones(bsz, length, dtype=torch.bool)
        for b, pad in enumerate(call.pads):
            real[b, :pad] = False
        mask = build_mask(call.mask_kind, real, history, sc.dtype)
        for li in sc.layers:
            q = torch.randn(bsz, hq, length, dim, generator=gen, dtype=torch.float64).to(sc.dtype)
            k = torch.randn(bsz, hkv, length, dim, generator=gen, dtype=torch.float64).to(sc.dtype)
            v = torch.randn(bsz, hkv, length, dim, generator=gen, dtype=torch.float64).to(sc.dtype)
            dec = torch.rand(bsz, hkv, length, generator=gen) < sc.evict_rate
            out = cache.dms_attend(li, q, k, v, dec, mask, scaling, w)
            want_oracle = oracle.dms_attend(li, q, k, v, dec, mask, scaling, w)
            assert out.shape == (bsz, length, hq, dim)
            assert out.dtype == sc.dtype
            assert (out.double() - want_oracle.double()).abs().max().item() <= tol, (
                "differs from the per-row oracle"
            )
            for b in range(bsz):
                idx = real[b].nonzero().flatten().tolist()
                pad_idx = (~real[b]).nonzero().flatten()
                assert torch.all(out[b, pad_idx] == 0), "padded query positions must be exactly zero"
                for h in range(hkv):
                    ref = refs[li][b][h]
                    heads = slice(h * grp, (h + 1) * grp)
                    for t in idx:
                        ref.q.append(q[b, heads, t].clone())
                        ref.k.append(k[b, h, t].clone())
                        ref.v.append(v[b, h, t].clone())
                        ref.d.append(bool(dec[b, h, t]))
                    first = len(ref.d) - len(idx)
                    for j, t in enumerate(idx):
                        want = ref_output(ref, first + j, w, scaling)
                        got = out[b, t, heads].double()
                        err = (got - want).abs().max().item()
                        assert err <= tol, f"layer {li} row {b} head {h} query pos {first + j}: err {err:.3g}"
        logical += length
        history = torch.cat([history, real], dim=1)
        check_memory(cache, oracle, sc, refs, logical, elem)
    if sc.release_row is not None and cache.dms_layers():
        check_release_row(cache, sc, refs, sc.release_row, elem)
    cache.release()
    assert cache_stats(cache)["kv_bytes_allocated"] == 0
    return len(sc.calls)


def check_memory(cache, oracle, sc: Scenario, refs, logical: int, elem: int) -> None:
    seen_exp, kept_exp = [], []
    alloc = kept_bytes = dense = 0
    granule = sc.block_size
    for li in sorted(sc.layers):
        assert cache.get_seq_length(li) == logical
        layer = cache.dms_layer(li)
        seen_l, kept_l = [], []
        for b in range(sc.batch):
            seen_r, kept_r = [], []
            for h in range(sc.kv_heads):
                ref = refs[li][b][h]
                n_kept = check_row_state(cache, li, b, h, ref, sc.window, sc.dtype)
                o = oracle.row_state(li, b, h)
                mine = cache.row_state(li, b, h)
                assert sorted(mine["pos"].tolist()) == sorted(o["pos"].tolist())
                if sc.layout == "paged":
                    pages = int(layer.kv.npages[b, h])
                    need = -(-n_kept // granule)
                    assert need <= pages <= need + 1, (li, b, h, pages, n_kept, granule)
                seen_r.append(len(ref.d))
                kept_r.append(n_kept)
                kept_bytes += n_kept * 2 * sc.head_dim * elem
                dense += logical * 2 * sc.head_dim * elem
            seen_l.append(seen_r)
            kept_l.append(kept_r)
        longest = max(max(r) for r in kept_l)
        cap = layer.book.capacity
        assert cap % granule == 0, f"capacity {cap} not whole granules of {granule}"
        assert longest <= cap < longest + 1 + granule, (li, cap, longest, granule)
        if sc.layout == "blocked":
            alloc += sc.batch * sc.kv_heads * cap * 2 * sc.head_dim * elem
        else:
            alloc += layer.kv.pool_k.shape[0] * granule * 2 * sc.head_dim * elem
            # the pool holds the rows' pages, at most one free page per (row, head), and page 0
            held, pool = int(layer.kv.npages.sum()), layer.kv.pool_pages
            assert held <= pool <= held + sc.batch * sc.kv_heads, (li, pool, held)
        seen_exp.append(seen_l)
        kept_exp.append(kept_l)
    stats = cache_stats(cache)
    assert stats["tokens_seen"].tolist() == seen_exp
    assert stats["tokens_kept"].tolist() == kept_exp
    total_seen = sum(x for layer in seen_exp for row in layer for x in row)
    total_kept = sum(x for layer in kept_exp for row in layer for x in row)
    if total_kept:
        assert stats["compression_ratio"] == pytest.approx(total_seen / total_kept, rel=1e-12)
    else:
        assert math.isnan(stats["compression_ratio"])
    assert stats["kv_bytes_allocated"] == alloc
    assert stats["kv_bytes_kept"] == kept_bytes
    assert stats["kv_bytes_dense"] == dense


def check_release_row(cache, sc: Scenario, refs, row: int, elem: int) -> None:
    before = {
        (li, b, h): cache.row_state(li, b, h)
        for li in sc.layers
        for b in range(sc.batch)
        for h in range(sc.kv_heads)
    }
    cache.release(batch_index=row)
    for (li, b, h), old in before.items():
        new = cache.row_state(li, b, h)
        if b == row:
            assert new["pos"].numel() == 0 and new["seen"] == 0
        else:
            order_old, order_new = old["pos"].argsort(), new["pos"].argsort()
            assert torch.equal(new["pos"][order_new], old["pos"][order_old])
            assert torch.equal(new["flag"][order_new], old["flag"][order_old])
            assert torch.equal(new["k"][order_new], old["k"][order_old])
            assert torch.equal(new["v"][order_new], old["v"][order_old])
            assert new["seen"] == old["seen"]
    for li in sc.layers:
        layer = cache.dms_layer(li)
        longest = int(layer.book.length.max())
        assert layer.book.capacity < longest + 1 + sc.block_size  # the freed row gives its room back
        if sc.layout == "paged":
            assert int(layer.kv.npages[row].sum()) == 0


# --------------------------------------------------------------------------- tests
@FAST
@given(scenarios())
def test_dms_attend_matches_naive_reference(sc: Scenario) -> None:
    run_scenario(sc)


@pytest.mark.slow
@SLOW
@given(scenarios(max_calls=30))
def test_dms_attend_matches_naive_reference_long(sc: Scenario) -> None:
    run_scenario(sc)


def _seeded_scenarios(count: int, seed: int, evict_rate: float | None = None):
    """Plain seeded generator (no hypothesis): long multi-turn sequences, bigger chunks."""
    rng = torch.Generator().manual_seed(seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    for i in range(count):
        batch = ri(1, 3)
        calls = []
        for turn in range(ri(2, 4)):
            length = ri(3, 20) if turn == 0 else ri(1, 10)
            calls.append(Call(length, [ri(0, length // 2) for _ in range(batch)], "4d_bool"))
            for _ in range(ri(0, 8)):
                calls.append(Call(1, [0] * batch, ["2d_full", "4d_float", "none"][ri(0, 2)]))
        rate = evict_rate if evict_rate is not None else [0.9, 0.7, 0.3][i % 3]
        yield Scenario(
            batch=batch,
            kv_heads=ri(1, 3),
            group=ri(1, 3),
            head_dim=ri(2, 8),
            window=ri(1, 6),
            evict_rate=rate,
            block_size=[1, 2, 4, 5, 16][ri(0, 4)],
            chunk=[None, 2, 4, 7][ri(0, 3)],
            layers=[ri(0, 2)],
            dtype=torch.float64,
            calls=calls,
            seed=ri(0, 2**30),
            release_row=ri(0, batch - 1),
        )


def test_seeded_multi_turn_sequences_at_90_percent_eviction() -> None:
    checked = sum(run_scenario(sc) for sc in _seeded_scenarios(40, seed=1234, evict_rate=0.9))
    assert checked > 200


@pytest.mark.slow
def test_seeded_multi_turn_sequences_many() -> None:
    checked = sum(run_scenario(sc) for sc in _seeded_scenarios(600, seed=99))
    assert checked > 3000


# --------------------------------------------------------------------------- small fixed cases
def test_formula_after_long_decode_at_full_eviction() -> None:
    """d = 1 everywhere: only the W newest tokens survive, forever; memory stays bounded."""
    cache = DMSCache(block_size=4)
    w, dim = 3, 4
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 10, dim, generator=gen, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cache.dms_attend(0, q, k, v, torch.ones(1, 1, 10, dtype=torch.bool), None, 1.0, w)
    for _ in range(50):
        x = torch.randn(1, 1, 1, dim, generator=gen, dtype=torch.float64)
        cache.dms_attend(0, x, x, x, torch.ones(1, 1, 1, dtype=torch.bool), None, 1.0, w)
    state = cache.row_state(0, 0, 0)
    assert sorted(state["pos"].tolist()) == list(range(60 - (w + 1), 60))
    # W slots plus the one a decode step may append (the host cannot know it will not), whole blocks
    assert state["capacity"] == 8
    assert cache_stats(cache)["compression_ratio"] == pytest.approx(60 / (w + 1))


def test_dense_layers_count_in_stats_and_release() -> None:
    """Layers without DMS go through ``update`` and are counted as dense in ``cache_stats``."""
    cache = DMSCache(block_size=2)
    k = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    cache.update(k, k, 1)
    q = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    cache.dms_attend(0, q, q, q, torch.zeros(2, 3, 5, dtype=torch.bool), None, 0.5, 2)
    stats = cache_stats(cache)
    dense_layer = 2 * k.numel() * 8
    dms_rows = 2 * 3 * 6 * 2 * 4 * 8  # capacity 6 (5 kept + the scratch slot, 3 blocks of 2) per row
    assert stats["kv_bytes_allocated"] == dense_layer + dms_rows
    assert stats["kv_bytes_dense"] == dense_layer + 2 * 3 * 5 * 2 * 4 * 8
    cache.release()
    assert cache_stats(cache)["kv_bytes_allocated"] == 0

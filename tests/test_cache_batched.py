"""The batched DMSCache where serving needs it: flat op counts, no host syncs, every attention
implementation, generate features (left padding, sampling, num_return_sequences, beams, release),
tensors on the model's device, FP8 clamping and bf16 without fp32 copies of the cache."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from modelopt.torch.opt.conversion import ApplyModeError
from test_cache_generation import assert_close_on_real, full_logits, incremental_logits, padded_batch, pieces
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import modelopt_dms as dms
from modelopt_dms import DMSCache, cache_stats

pytestmark = pytest.mark.usefixtures("one_thread")

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")


class OpCounter(TorchDispatchMode):
    """aten ops dispatched while active (by name), and the output tensors they made."""

    def __init__(self, keep_outputs: bool = False) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.keep_outputs = keep_outputs
        self.outputs: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops[name] += 1
        if self.keep_outputs:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.outputs.append((name, t.dtype, t.numel()))
        return out

    @property
    def total(self) -> int:  # noqa: D102
        return sum(self.ops.values())

    @property
    def syncs(self) -> dict[str, int]:  # noqa: D102
        return {k: v for k, v in self.ops.items() if any(s in k for s in SYNC_OPS)}


def dms_model(attn="sdpa", window=4, std=0.05, seed=0, dtype=torch.float32, **cfg):
    model = dms.apply_dms(tiny_model("llama", attn=attn, seed=seed, **cfg), {"window_size": window}).to(dtype)
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for m in dms.dms_modules(model):
            m.dms_adapter.proj.weight.normal_(0, std, generator=gen)
    return model


# ------------------------------------------------------------------------------------------ ops and syncs
@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_decode_step_ops_do_not_grow_with_the_batch_and_never_sync(layout):
    kv = {"num_key_value_heads": 4, "num_attention_heads": 8}
    model = dms_model(**kv)
    counts = {}
    for bsz in (1, 16):
        ids = torch.randint(3, 128, (bsz, 40), generator=torch.Generator().manual_seed(bsz))
        # storage steps of 64 slots: the counted step is not one where a layer grows (see below)
        cache = DMSCache(layout=layout, block_size=64, page_size=64)
        with torch.no_grad():
            tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            model(tok, past_key_values=cache, use_cache=True)
            counter = OpCounter()
            with counter:
                model(tok, past_key_values=cache, use_cache=True)
        assert counter.syncs == {}, f"host syncs in a decode step: {counter.syncs}"
        counts[bsz] = counter.total
    assert counts[16] <= 2 * counts[1], counts
    # the dense cache for scale: DMS stays within a small constant factor of it
    base = tiny_model("llama", **kv)
    cache = DynamicCache()
    with torch.no_grad():
        tok = base(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        dense = OpCounter()
        with dense:
            base(tok, past_key_values=cache, use_cache=True)
    assert counts[16] <= 4 * dense.total, (counts, dense.total)


def test_padding_is_read_off_the_mask_once_per_forward(monkeypatch):
    """Every layer gets the same mask object: the real tokens are derived once, not per layer."""
    from modelopt_dms.cache import dms_cache as cache_mod

    calls = []
    real_fn = cache_mod.diagonal_validity

    def spy(*a, **k):
        calls.append(a[1:])
        return real_fn(*a, **k)

    monkeypatch.setattr(cache_mod, "diagonal_validity", spy)
    model = dms_model(num_hidden_layers=3)
    ids, mask = padded_batch([5, 9], 9)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 13)
    assert len(calls) == 4  # prefill + 3 decode steps through the cache: once each, not x 3 layers
    assert len({c for c in calls}) == 4  # each with its own (q_len, past, batch)


def test_many_decode_steps_sync_only_when_the_storage_grows():
    model = dms_model(window=2, std=0.0)  # untrained: nothing evicted, every step appends
    ids = torch.randint(3, 128, (4, 20))
    cache = DMSCache(block_size=16)
    syncing = 0
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(48):
            counter = OpCounter()
            with counter:
                tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            syncing += bool(counter.syncs)
    layers = len(cache.dms_layers())
    assert syncing <= 48 // 16 + 1, f"{syncing} of 48 steps synced ({layers} layers, block 16)"


# ---------------------------------------------------------------------------------- attention implementations
def fake_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A stand-in for flash_attention_2 on CPU: 2D padding masks, causal, GQA (what FA2 gets)."""
    bsz, heads, t, _ = query.shape
    s = key.shape[2]
    group = heads // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    visible = (torch.arange(s)[None, :] <= (torch.arange(t) + s - t)[:, None])[None, None]
    if attention_mask is not None:
        assert attention_mask.dim() == 2, "FA2 receives 2D padding masks"
        visible = visible & attention_mask[:, None, None, :].bool()
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scaling)
    return out.transpose(1, 2), None


@pytest.fixture
def fa2_registered(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", fake_flash_attention)


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flash_attention_2", "flex_attention"])
def test_every_attention_implementation_matches_the_masked_reference(attn, request):
    if attn == "flash_attention_2":
        request.getfixturevalue("fa2_registered")
        model = dms_model("sdpa")
        model.config._attn_implementation = "flash_attention_2"
    else:
        model = dms_model(attn)
    ids, mask = padded_batch([14, 9], 14, seed=3)
    cuts = pieces(14, 5, 4)
    ids_all, mask_all = padded_batch([23, 18], 23, seed=3)
    got = incremental_logits(model, ids_all, mask_all, cuts, DMSCache(prefill_chunk_size=4))
    want = full_logits(model, ids_all, mask_all)
    assert_close_on_real(got, want, mask_all, 1e-5)
    # the same model, generating with left padding, equals each row generated alone
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = model.generate(ids, attention_mask=mask, **kw)
        alone = model.generate(ids[1:, -9:], attention_mask=mask[1:, -9:], **kw)
    assert torch.equal(both[1, -6:], alone[0, -6:])


def test_an_unsupported_attention_implementation_is_refused_at_apply_time():
    model = tiny_model("llama")
    model.config._attn_implementation = "paged_attention"
    with pytest.raises(
        ApplyModeError, match="attn_implementation='paged_attention'.*attn_implementation='sdpa'"
    ):
        dms.apply_dms(model, {"window_size": 4})
    assert not dms.is_dms_model(model)


# ------------------------------------------------------------------------------------------ generate features
@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_beam_search_and_num_return_sequences(layout):
    model = dms_model(window=3)
    ids, mask = padded_batch([12, 8], 12, seed=9)
    kw = dict(max_new_tokens=8, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        beams = model.generate(
            ids, num_beams=3, do_sample=False, past_key_values=DMSCache(layout=layout), **kw
        )
        ref = model.generate(ids, num_beams=3, do_sample=False, cache_implementation="dynamic", **kw)
        assert torch.equal(beams, ref), "beam search through DMSCache must equal the masked reference"
        greedy = model.generate(ids, do_sample=False, **kw)
        torch.manual_seed(0)
        repeated = model.generate(
            ids,
            do_sample=True,
            top_k=1,
            num_return_sequences=3,
            past_key_values=DMSCache(layout=layout),
            **kw,
        )
    assert repeated.shape[0] == 6
    assert torch.equal(repeated, greedy.repeat_interleave(3, dim=0))


def test_sampling_uses_the_dms_cache_and_is_seeded():
    model = dms_model(window=3)
    ids, mask = padded_batch([10, 10], 10, seed=2)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                max_new_tokens=6,
                pad_token_id=0,
                return_dict_in_generate=True,
            )
        assert isinstance(out.past_key_values, DMSCache)
        outs.append(out.sequences)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_release_frees_a_finished_row_and_the_others_continue_unchanged(layout):
    model = dms_model(window=3)
    ids = torch.randint(3, 128, (3, 30), generator=torch.Generator().manual_seed(4))
    ids[0, :] = ids[0, :].flip(0)  # row 0 differs in length of what it keeps
    caches = [DMSCache(layout=layout, block_size=8, page_size=8) for _ in range(2)]
    steps = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for cache in caches:
            model(ids, past_key_values=cache, use_cache=True)
        before = cache_stats(caches[1])
        caches[1].release(batch_index=0)
        after = cache_stats(caches[1])
        outs = []
        for cache in caches:
            logits = [
                model(steps[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(12)
            ]
            outs.append(torch.cat(logits, 1))
    assert after["tokens_kept"][:, 0].sum() == 0 and torch.equal(
        after["tokens_kept"][:, 1:], before["tokens_kept"][:, 1:]
    )
    assert after["kv_bytes_allocated"] <= before["kv_bytes_allocated"]
    assert torch.allclose(outs[0][1:], outs[1][1:], atol=1e-5), "other rows must not notice the release"
    assert int(cache_stats(caches[1])["tokens_kept"][:, 0].max()) <= 12  # row 0 starts over


@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_decode_visibility_follows_every_edit_of_the_book(layout):
    """Decode steps stored without attention (the ONNX driver), a batch reorder and a release in
    between attending steps: every attending step equals a fresh layer built from the same tokens
    by prefill (whose mask is built from the book, never kept)."""
    from modelopt_dms.cache.layer import DMSCacheLayer

    gen = torch.Generator().manual_seed(21)
    bsz, heads, group, dim, w, steps = 3, 2, 2, 8, 3, 14
    q = torch.randn(bsz, heads * group, steps, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(bsz, heads, steps, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(bsz, heads, steps, dim, generator=gen, dtype=torch.float64)
    d = torch.rand(bsz, heads, steps, generator=gen) < 0.6
    kept = DMSCacheLayer(w, layout=layout, block_size=4, page_size=4)
    edits = {3: "store", 5: "reorder", 7: "store", 8: "store", 10: "release"}
    order, released = torch.arange(bsz), None
    checked = 0
    for t in range(steps):
        rows = order
        real = torch.ones(bsz, 1, dtype=torch.bool)
        if released is not None:
            real[released] = False
        step = (k[rows, :, t : t + 1], v[rows, :, t : t + 1], d[rows, :, t : t + 1], real)
        if edits.get(t) == "store":
            kept.store(*step)
        else:
            out = kept.attend(q[rows, :, t : t + 1], *step[:3], real, 0.3)
            # reference: one prefill of the row's tokens so far, the last query's output
            for b in range(bsz):
                if released is not None and b == released:
                    continue
                ref = DMSCacheLayer(w, layout=layout, block_size=4, page_size=4)
                r = rows[b]
                ref_out = ref.attend(
                    q[r : r + 1, :, : t + 1],
                    k[r : r + 1, :, : t + 1],
                    v[r : r + 1, :, : t + 1],
                    d[r : r + 1, :, : t + 1],
                    None,
                    0.3,
                )
                torch.testing.assert_close(out[b, :, 0], ref_out[0, :, -1], rtol=0, atol=1e-10)
                checked += 1
        if edits.get(t) == "reorder":
            index = torch.tensor([2, 0, 1])
            kept.select_rows(index)
            order = order[index]
        if edits.get(t) == "release":
            released = 1
            kept.release(released)
    assert checked > 20


# ---------------------------------------------------------------------------------- devices and precision
@pytest.mark.parametrize("layout", ["blocked", "paged"])
def test_every_tensor_is_created_on_the_models_device(layout):
    """With the default device set to meta, any tensor made without an explicit device would land
    on meta and the step would fail (or give meta outputs)."""
    model = dms_model(window=3)
    ids, mask = padded_batch([16, 11], 16, seed=1)
    want = full_logits(model, ids, mask)
    torch.set_default_device("meta")
    try:
        cache = DMSCache(layout=layout, prefill_chunk_size=5)
        got = incremental_logits(model, ids, mask, pieces(10, 4, 2), cache)
    finally:
        torch.set_default_device("cpu")
    assert got.device.type == "cpu"
    assert_close_on_real(got, want, mask, 1e-5)


def test_fp8_storage_clamps_values_beyond_the_calibrated_range():
    from modelopt_dms.cache.storage import FP8_E4M3_MAX, KVCodec

    codec = KVCodec(torch.float32, (0.01, 0.02))
    x = torch.tensor([1.0, 4.48, 100.0, -1e6, float("inf")])
    stored = codec.encode(x, 0)
    assert stored.dtype == torch.float8_e4m3fn
    back = codec.decode(stored, 0, torch.float32)
    assert torch.isfinite(back).all(), "out-of-range values must not become NaN"
    assert back[2:4].tolist() == pytest.approx([FP8_E4M3_MAX * 0.01, -FP8_E4M3_MAX * 0.01])
    assert back[1].item() == pytest.approx(4.48, rel=0.07)


def test_bf16_decode_makes_no_fp32_copy_of_the_cache():
    model = dms_model(window=4, std=0.0, dtype=torch.bfloat16, num_key_value_heads=2)
    ids = torch.randint(3, 128, (4, 200))
    cache = DMSCache(block_size=16)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        model(tok, past_key_values=cache, use_cache=True)
        layer = next(iter(cache.dms_layers().values()))
        cache_elems = layer.kv.k.numel()
        counter = OpCounter(keep_outputs=True)
        with counter:
            model(tok, past_key_values=cache, use_cache=True)
    big_fp32 = [(n, d, c) for n, d, c in counter.outputs if d == torch.float32 and c >= cache_elems // 2]
    assert big_fp32 == [], f"fp32 tensors as large as the cache in a bf16 decode step: {big_fp32[:3]}"
    assert layer.kv.k.dtype == torch.bfloat16

"""GraphDecoder: decode steps replayed from a captured graph equal eager decoding.

CUDA graphs cannot run here, so the CPU stand-in ``graph_replay.ReplayGraph`` replays the captured
aten ops on the same tensors without re-running Python, which is what a CUDA graph does; a step that
rebinds a state tensor, reads the host or leans on Python state gives different logits under it
(the first test shows the stand-in catches both). ``tests/test_cuda.py`` runs the real thing.
"""

from __future__ import annotations

import pytest
import torch
from graph_replay import ReplayGraph
from test_cache_generation import dms_model, padded_batch

from modelopt_dms import DMSCache
from modelopt_dms.cache.graphs import GraphDecoder

pytestmark = pytest.mark.usefixtures("one_thread")


def _prefill(model, ids, mask, **cache_kw):
    cache = DMSCache(**cache_kw)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        )
    return cache, out.logits[:, -1:].argmax(-1)


def _eager(model, cache, tok, first_pos, steps):
    logits, pos = [], first_pos.clone()
    with torch.inference_mode():
        for _ in range(steps):
            out = model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits
            logits.append(out.clone())
            tok, pos = out.argmax(-1), pos + 1
    return logits, tok


def _graphed(decoder, tok, steps):
    logits = []
    for _ in range(steps):
        out = decoder.step(tok)
        logits.append(out.clone())
        tok = out.argmax(-1)
    return logits, tok


def _same_rows(a: DMSCache, b: DMSCache) -> None:
    """Every (layer, row, head) holds the same positions, flags and keys/values; same lengths."""
    assert a.get_seq_length() == b.get_seq_length()
    for la, lb in zip(a.dms_layers().values(), b.dms_layers().values(), strict=True):
        assert torch.equal(la.book.length, lb.book.length) and torch.equal(la.book.seen, lb.book.seen)
        for row in range(la.book.batch):
            for head in range(la.book.heads):
                ra, rb = la.row_state(row, head), lb.row_state(row, head)
                assert torch.equal(ra["pos"], rb["pos"]) and torch.equal(ra["flag"], rb["flag"])
                torch.testing.assert_close(ra["k"].float(), rb["k"].float(), rtol=0, atol=1e-5)  # sum order
                torch.testing.assert_close(ra["v"].float(), rb["v"].float(), rtol=0, atol=1e-5)


def test_the_stand_in_catches_a_rebound_state_tensor_and_a_host_read():
    state = {"x": torch.zeros(2)}

    def rebinding_step():
        state["x"] = state["x"] + 1

    graph = ReplayGraph()
    with graph.capture():
        rebinding_step()
    for _ in range(3):
        graph.replay()
    assert state["x"].tolist() == [1.0, 1.0]  # eager: 4.0 after four steps; the graph never reads it again

    inplace = torch.zeros(2)
    graph = ReplayGraph()
    with graph.capture():
        inplace.add_(1)
    assert inplace.tolist() == [0.0, 0.0]  # capturing does not run the step
    for _ in range(3):
        graph.replay()
    assert inplace.tolist() == [3.0, 3.0]

    with pytest.raises(RuntimeError, match="host read"), ReplayGraph().capture():
        int(torch.ones(()).sum())


@pytest.mark.parametrize("reserve", [1, 5, 64])
def test_replayed_decode_equals_eager_with_padding_eviction_and_recaptures(reserve):
    model = dms_model(std=0.5, window=3).eval()
    ids, mask = padded_batch([20, 13, 17], 20, seed=1)
    cache_ref, tok = _prefill(model, ids, mask, block_size=4)
    ref, _ = _eager(model, cache_ref, tok, mask.sum(-1, keepdim=True), 24)

    cache, tok = _prefill(model, ids, mask, block_size=4)
    decoder = GraphDecoder(model, cache, reserve=reserve, graph_factory=ReplayGraph)
    got, _ = _graphed(decoder, tok, 24)

    # the reserve runs out and capacity grows (small reserves) or one graph holds every step
    assert decoder.captures >= 2 if reserve < 24 else decoder.captures == 1
    for step, (a, b) in enumerate(zip(ref, got, strict=True)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"step {step}")
    _same_rows(cache_ref, cache)


def test_generate_returns_the_greedy_tokens_of_eager_decoding():
    model = dms_model(std=0.5, window=3).eval()
    ids, mask = padded_batch([12, 7], 12, seed=8)
    cache_ref, tok = _prefill(model, ids, mask, block_size=4)
    ref, _ = _eager(model, cache_ref, tok, mask.sum(-1, keepdim=True), 9)
    cache, tok = _prefill(model, ids, mask, block_size=4)
    got = GraphDecoder(model, cache, reserve=3, graph_factory=ReplayGraph).generate(tok, 9)
    assert torch.equal(got, torch.cat([step.argmax(-1) for step in ref], dim=-1))


def test_a_second_turn_prefilled_between_replays_resyncs_positions_and_recaptures():
    model = dms_model(std=0.5, window=3).eval()
    ids, mask = padded_batch([12, 9], 12, seed=2)
    turn2 = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))

    def run(graphed: bool):
        cache, tok = _prefill(model, ids, mask, block_size=4)
        decoder = GraphDecoder(model, cache, reserve=4, graph_factory=ReplayGraph) if graphed else None
        first = mask.sum(-1, keepdim=True)
        a, tok = _graphed(decoder, tok, 6) if graphed else _eager(model, cache, tok, first, 6)
        seen = cache.dms_layer(0).book.seen[:, None].clone()
        with torch.inference_mode():  # the next user turn, outside the decoder
            pos = seen + torch.arange(turn2.shape[1])
            out = model(input_ids=turn2, position_ids=pos, past_key_values=cache, use_cache=True).logits
        tok = out[:, -1:].argmax(-1)
        b, _ = _graphed(decoder, tok, 6) if graphed else _eager(model, cache, tok, seen + turn2.shape[1], 6)
        return a + b, cache, decoder

    ref, cache_ref, _ = run(False)
    got, cache, decoder = run(True)
    assert decoder.captures >= 3
    for step, (a, b) in enumerate(zip(ref, got, strict=True)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=f"step {step}")
    _same_rows(cache_ref, cache)


def test_a_beam_reorder_between_steps_permutes_the_positions_too():
    model = dms_model(std=0.5, window=3).eval()
    ids, mask = padded_batch([14, 8, 11], 14, seed=7)
    order = torch.tensor([2, 2, 0])

    cache_ref, tok = _prefill(model, ids, mask, block_size=4)
    first = mask.sum(-1, keepdim=True)
    ref, tok_ref = _eager(model, cache_ref, tok, first, 5)
    cache_ref.reorder_cache(order)
    more, _ = _eager(model, cache_ref, tok_ref[order], (first + 5)[order], 5)

    cache, tok = _prefill(model, ids, mask, block_size=4)
    decoder = GraphDecoder(model, cache, reserve=16, graph_factory=ReplayGraph)
    got, tok = _graphed(decoder, tok, 5)
    cache.reorder_cache(order)
    got_more, _ = _graphed(decoder, tok[order], 5)
    assert decoder.captures == 2  # the reorder moved the cache's tensors: captured again
    for a, b in zip(ref + more, got + got_more, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    _same_rows(cache_ref, cache)
    with pytest.raises(ValueError, match="one token per row"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))


def test_fp8_storage_replays_too():
    import modelopt_dms as dms

    model = dms_model(std=0.5, window=3).eval()
    calib = [torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = dms.quantize_fp8(model, calib, weights=False, kv_cache=True)
    ids, mask = padded_batch([16, 11], 16, seed=6)
    cache_ref, tok = _prefill(model, ids, mask, block_size=4)
    assert {layer.kv.k.dtype for layer in cache_ref.dms_layers().values()} == {torch.float8_e4m3fn}
    ref, _ = _eager(model, cache_ref, tok, mask.sum(-1, keepdim=True), 12)
    cache, tok = _prefill(model, ids, mask, block_size=4)
    decoder = GraphDecoder(model, cache, reserve=4, graph_factory=ReplayGraph)
    got, _ = _graphed(decoder, tok, 12)
    assert decoder.captures >= 2
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    _same_rows(cache_ref, cache)


def test_eager_mode_on_cpu_and_tensors_made_on_the_model_device():
    model = dms_model(std=0.5, window=3).eval()
    ids, mask = padded_batch([10, 7], 10, seed=4)
    cache_ref, tok = _prefill(model, ids, mask)
    ref, _ = _eager(model, cache_ref, tok, mask.sum(-1, keepdim=True), 5)
    cache, tok = _prefill(model, ids, mask)
    decoder = GraphDecoder(model, cache)
    assert not decoder.enabled  # CPU, no stand-in: plain eager steps on the same buffers
    got, _ = _graphed(decoder, tok, 2)
    torch.set_default_device("meta")  # a tensor created without the model's device fails
    try:
        graphed = GraphDecoder(model, cache, graph_factory=ReplayGraph)
        more, _ = _graphed(graphed, got[-1].argmax(-1), 3)
    finally:
        torch.set_default_device(None)
    for a, b in zip(ref, got + more, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_refusals_name_the_problem():
    model = dms_model(window=3).eval()
    ids, mask = padded_batch([6, 6], 6)
    with pytest.raises(ValueError, match="prefill the prompt first"):
        GraphDecoder(model, DMSCache())
    paged, _ = _prefill(model, ids, mask, layout="paged")
    with pytest.raises(ValueError, match="layout='blocked'"):
        GraphDecoder(model, paged)
    cache, _ = _prefill(model, ids, mask)
    with pytest.raises(ValueError, match="need the model on CUDA"):
        GraphDecoder(model, cache, enabled=True)
    with pytest.raises(ValueError, match=r"position_ids must be \(2, 1\)"):
        GraphDecoder(model, cache, position_ids=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="needs a DMSCache"):
        GraphDecoder(model, object())
    partial = dms_model(window=3, layers=[0]).eval()
    mixed, _ = _prefill(partial, ids, mask)
    with pytest.raises(ValueError, match="not a started DMS layer"):
        GraphDecoder(partial, mixed)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_other_families_replay_too(family):
    model = dms_model(family, std=0.5, window=2).eval()
    ids, mask = padded_batch([9, 6], 9, seed=5)
    cache_ref, tok = _prefill(model, ids, mask, block_size=4)
    ref, _ = _eager(model, cache_ref, tok, mask.sum(-1, keepdim=True), 10)
    cache, tok = _prefill(model, ids, mask, block_size=4)
    got, _ = _graphed(GraphDecoder(model, cache, reserve=3, graph_factory=ReplayGraph), tok, 10)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)

"""Mixture-of-experts under a RAM budget: experts read on demand into an expert cache
smaller than the experts, tokens identical to the in-RAM run, read errors surface."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
from synth import greedy_run, tiny_moe_store

from flashlm.errors import BudgetError, OffloadError
from flashlm.models import build_model
from flashlm.offload.budget import Layout, make_plan
from flashlm.offload.io import StoreFile
from flashlm.offload.prefetch import ExpertCache, ReadPool
from flashlm.offload.streaming import StreamingWeights
from flashlm.runtime.backend import KernelBackend, NumpyBackend

GiB = 1 << 30


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return tiny_moe_store(tmp_path_factory.mktemp("moe"), n_layers=3, n_experts=8, k=2)


def moe_plan(store, *, slots, resident=(), head=False):
    layout = Layout.of(store)
    p = make_plan(layout, store.config, budget=8 * GiB, baseline=0, ctx=64, force_stream=True)
    p = p.with_resident(layout, resident, head)
    return replace(p, expert_slots=slots, expert_slot_bytes=layout.expert_bytes)


def run(model, steps=4, seed=0):
    return greedy_run(model, prompt=7, steps=steps, seed=seed)


def test_layout_of_a_moe_store(moe):
    layout = Layout.of(moe)
    assert layout.moe_layers == (0, 1, 2) and layout.n_experts == 8 and layout.top_k == 2
    for i in range(3):
        # the streamed part of a layer ends before its first expert
        _, first, _ = moe.expert_span(i, 0)
        assert layout.layer_bytes[i] <= first < moe.files[f"layer_{i:03d}.bin"]["size"]
    assert layout.expert_bytes >= max(moe.expert_span(i, e)[2] for i in range(3) for e in range(8))


@pytest.mark.parametrize("backend", [KernelBackend, NumpyBackend])
@pytest.mark.parametrize("slots", [8, 13])  # one layer's experts; fewer than the 24 experts
def test_streamed_moe_equals_in_ram(moe, backend, slots):
    ref = run(build_model(moe.config, moe, backend()))
    with StreamingWeights(moe, moe_plan(moe, slots=slots)) as sw:
        got = run(build_model(moe.config, sw, backend()))
        st = sw.stats()
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    assert st["expert_requests"] > 0 and 0 <= st["expert_hits"] < st["expert_requests"]
    assert st["expert_bytes_read"] > 0
    # the next block's router on this block's rows started reads ahead (timing only: same bits)
    assert st["expert_prefetched"] > 0 and st["expert_prefetch_hits"] <= st["expert_hits"]


def test_expert_read_error_surfaces(moe, monkeypatch):
    real = StoreFile.read_into
    _, off, _ = moe.expert_span(1, 3)

    def failing(self, buf, offset):
        if self.path.name == "layer_001.bin" and offset == off:
            raise OffloadError(f"read error in {self.path} at offset {offset}: Input/output error")
        return real(self, buf, offset)

    monkeypatch.setattr(StoreFile, "read_into", failing)
    sw = StreamingWeights(moe, moe_plan(moe, slots=8))
    model = build_model(moe.config, sw, KernelBackend())
    with pytest.raises(OffloadError, match=r"expert 3 of layer 1 .*layer_001\.bin.*Input/output error"):
        for s in range(5):  # until the router picks expert 3 of layer 1 (it does for this seed)
            run(model, steps=3, seed=s)
    sw.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("flashlm-reader")]


@pytest.fixture
def three_slots(tmp_path):
    """(file bytes, an ExpertCache of 3 one-page slots over 10 one-page experts of layer 0)."""
    data = np.arange(10 * 4096, dtype=np.uint8) % 251
    p = tmp_path / "e.bin"
    p.write_bytes(data.tobytes())
    spans = {(0, e): (p, e * 4096, 4096) for e in range(10)}
    pool = ReadPool("buffered", readers=2)
    try:
        yield data, ExpertCache(pool, n_slots=3, slot_bytes=4096, spans=spans)
    finally:
        pool.close()


def test_expert_cache_keeps_the_frequent_and_recent(three_slots):
    data, c = three_slots
    v = c.get(0, [1, 2])
    assert np.array_equal(v[1], data[4096:8192]) and np.array_equal(v[2], data[8192:12288])
    c.get(0, [1])  # 1 used twice
    c.get(0, [3])  # fills the third slot
    c.get(0, [4])  # evicts the least used, least recent: 2
    assert set(c._where) == {(0, 1), (0, 3), (0, 4)}
    assert c.stats.requests == 5 and c.stats.hits == 1
    v = c.get(0, [1, 3, 4])  # all hits, pinned together
    assert c.stats.hits == 4 and np.array_equal(v[4], data[4 * 4096:5 * 4096])
    with pytest.raises(RuntimeError, match="4 experts asked for at once"):
        c.get(0, [5, 6, 7, 8])


def test_plan_reserves_an_expert_cache(moe):
    layout = Layout.of(moe)
    total = sum(layout.layer_bytes) + layout.head_bytes
    small = make_plan(layout, moe.config, budget=8 * GiB, baseline=0, ctx=64, force_stream=True)
    assert small.expert_slots == layout.experts_total and small.expert_read_per_token == 0
    # a budget where only part of the experts fit
    base = 100 << 20
    kw = dict(baseline=base, ctx=64, force_stream=True, prefill_rows=16)
    need = make_plan(layout, moe.config, budget=8 * GiB, **kw)
    mid = make_plan(layout, moe.config, budget=need.planned_bytes - 10 * layout.expert_bytes, **kw)
    assert mid.streams and mid.expert_slots == layout.experts_total - 10 >= layout.n_experts
    assert 0 < mid.expert_read_per_token and mid.planned_bytes <= mid.budget
    assert mid.streamed_bytes_per_token >= mid.expert_read_per_token
    with pytest.raises(BudgetError, match="expert slots"):
        make_plan(layout, moe.config, budget=base + (1 << 20), **kw)
    assert total > 0


def test_expert_prefetch_reads_ahead_without_evicting_pinned(three_slots):
    data, c = three_slots
    c.get(0, [1, 2])  # pinned until the next get
    assert c.prefetch(0, [1, 5, 6]) == 1  # 1 is cached; one free slot for 5; 6 finds no unpinned slot
    assert (0, 5) in c._where and (0, 6) not in c._where and {(0, 1), (0, 2)} <= set(c._where)
    v = c.get(0, [5, 2])  # 5 arrives (or already has): a hit, and a used prediction
    assert np.array_equal(v[5], data[5 * 4096:6 * 4096])
    assert c.stats.hits == 2 and c.stats.prefetched == 1 and c.stats.prefetch_hits == 1
    c.get(0, [7])  # a miss: evicts 1 (unpinned now), never 5 or 2 asked in the same call
    assert c.prefetch(0, [8, 9]) == 2 and c.stats.prefetched == 3  # 7 pinned: 5 and 2 make room
    assert (0, 7) in c._where


def test_expert_read_pass_replays_the_logged_reads(three_slots):
    data, c = three_slots
    c.log = []
    c.get(0, [1, 2])
    c.prefetch(0, [3])
    c.get(0, [1, 4])  # 1 a hit: not read again, not logged
    assert c.log == [(0, 1), (0, 2), (0, 3), (0, 4)]
    bw = c.read_pass(c.log * 3)  # waits for the prefetch; more reads than slots: slots reused as reads finish
    assert bw > 0 and c.stats.bytes_read == 4 * 4096  # the pass is not counted as the cache's reads
    assert not c._where  # emptied; the cache works on afterwards
    v = c.get(0, [7, 1])
    assert np.array_equal(v[7], data[7 * 4096:8 * 4096]) and np.array_equal(v[1], data[4096:8192])
    assert c.read_pass([]) == 0.0


def test_expert_read_pass_error_is_an_offload_error(three_slots, monkeypatch):
    _, c = three_slots

    def fail(self, buf, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(StoreFile, "read_into", fail)
    with pytest.raises(OffloadError, match="re-reading experts failed"):
        c.read_pass([(0, 1), (0, 2)])

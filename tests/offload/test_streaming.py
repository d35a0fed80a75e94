"""StreamingWeights: a model over streamed weights computes exactly what it computes over
the store in RAM (bit for bit, both backends), reuses its buffers, reads embedding rows
only, gives up resident layers under memory pressure, and reports read errors."""
from __future__ import annotations

import threading
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from synth import greedy_run
from synth import tiny_store as make_tiny_store

from flashlm.errors import OffloadError
from flashlm.models import build_model
from flashlm.offload.budget import Layout, make_plan
from flashlm.offload.io import StoreFile
from flashlm.offload.streaming import StreamedMatrix, StreamingWeights
from flashlm.runtime.backend import KernelBackend, NumpyBackend

GiB = 1 << 30


def stream_plan(store, *, resident=(1, 4), head=False, n_slots=2):
    p = make_plan(Layout.of(store), store.config, budget=8 * GiB, baseline=0, ctx=64, force_stream=True)
    p = p.with_resident(Layout.of(store), [r for r in resident if r < store.n_layers], head)
    return replace(p, n_slots=n_slots)


def run(model, steps=3, seed=0):
    """Logits of a 9-token prefill (all positions) and ``steps`` greedy decode steps."""
    return greedy_run(model, prompt=9, steps=steps, seed=seed)


def reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("flashlm-reader")]


BACKENDS = {"kernels": KernelBackend, "numpy": NumpyBackend}


@pytest.fixture(scope="module")
def tied_store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("tied"), arch="llama", n_layers=4, hidden=128, ffn=256, tied=True,
                      fmt="Q4_0", extra_tensor_fmt={"token_embd.weight": "Q8_0"})


@pytest.fixture(scope="module")
def f16_store(tmp_path_factory):
    """F16 matrices (and a qwen3's q/k norms): the numpy backend would cache f32 copies by address."""
    return make_tiny_store(tmp_path_factory.mktemp("f16"), arch="qwen3", n_layers=5, hidden=128, ffn=256, fmt="F16")


@pytest.fixture(scope="module")
def slabbed_store(tmp_path_factory):
    """Rows of 3200 weights: every Q8_0 matrix (and the head) is kept in column slabs."""
    return make_tiny_store(tmp_path_factory.mktemp("slab"), arch="llama", n_layers=2, hidden=3200, ffn=64, n_heads=25, n_kv=5,
                      fmt="Q8_0")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("head", [False, True], ids=["head-streamed", "head-resident"])
@pytest.mark.parametrize("which", ["tiny_store", "tied_store", "f16_store"])
def test_streamed_equals_in_ram_bit_for_bit(request, which, head, backend):
    store = request.getfixturevalue(which)
    ref = run(build_model(store.config, store, BACKENDS[backend]()))
    with StreamingWeights(store, stream_plan(store, head=head), readers=2) as sw:
        got = run(build_model(store.config, sw, BACKENDS[backend]()))
        st = sw.stats()
    for j, (a, b) in enumerate(zip(got, ref)):
        np.testing.assert_array_equal(a, b, err_msg=f"forward {j}")
    assert st["steps"] == 4 and st["bytes_read"] >= 4 * sum(store.layer_nbytes(i) for i in (0, 2, 3))
    assert not reader_threads()


def test_slabbed_head_blocks_and_embedding_rows(slabbed_store):
    store = slabbed_store
    assert store.tensor_info["output.weight"]["format"] == "Q8_0S"
    plan = stream_plan(store, resident=())
    plan = replace(plan, slot_bytes=plan.slot_bytes)  # the head (268 x 3400 B) comes in several blocks
    with StreamingWeights(store, plan) as sw:
        head = sw.tensor("output.weight")
        assert isinstance(head, StreamedMatrix) and len(head.row_blocks) >= 1
        be = KernelBackend()
        x = np.random.default_rng(0).standard_normal((2, 3200)).astype(np.float32)
        np.testing.assert_array_equal(be.linear(x, head), be.linear(x, store.tensor("output.weight")))
        emb = sw.tensor("token_embd.weight")
        ids = np.array([5, 0, 267, 5])
        np.testing.assert_array_equal(be.embed(emb, ids), be.embed(store.tensor("token_embd.weight"), ids))
        assert sw.embed_bytes_read == 3 * store.tensor_info["token_embd.weight"]["nbytes"] // 268
        ref = run(build_model(store.config, store, KernelBackend()), steps=1)
        got = run(build_model(store.config, sw, KernelBackend()), steps=1)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_head_in_several_blocks(tiny_store):
    store = tiny_store
    plan = replace(stream_plan(store), slot_bytes=max(Layout.of(store).layer_bytes))
    rb = store.tensor_info["output.weight"]["nbytes"] // store.config.vocab_size
    small = replace(plan, slot_bytes=plan.slot_bytes)
    with StreamingWeights(store, small) as sw:
        n_blocks = len(sw.tensor("output.weight").row_blocks)
        assert n_blocks == -(-store.config.vocab_size // ((plan.slot_bytes - 8192) // rb))
        ref = run(build_model(store.config, store, KernelBackend()))
        got = run(build_model(store.config, sw, KernelBackend()))
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_streamed_layers_reuse_the_window(tiny_store):
    store = tiny_store
    with StreamingWeights(store, stream_plan(store, resident=(2,))) as sw:
        slots = {s.view.ctypes.data for s in sw.prefetcher._slots}
        seen = []
        for _ in range(3):
            addrs = set()
            for i in range(store.n_layers):
                w = sw.layer(i)
                q = w["attn_q.weight"]
                if i == 2:
                    assert q.stable  # resident
                    continue
                assert not q.stable
                base = q.data.ctypes.data - store.tensor_info[f"blk.{i}.attn_q.weight"]["offset"]
                addrs.add(base)
                assert w["attn_norm.weight"].stable and w["attn_q.bias"].stable  # vectors are resident
            sw.tensor("output_norm.weight")  # end of the step: the last layer is given back
            seen.append(addrs)
        assert all(a <= slots for a in seen) and set().union(*seen) == slots  # only ever the window's two slots


def test_embedding_rows_are_read_on_demand(tiny_store):
    store = tiny_store
    with StreamingWeights(store, stream_plan(store)) as sw:
        emb = sw.tensor("token_embd.weight")
        assert isinstance(emb, StreamedMatrix)
        model = build_model(store.config, sw, KernelBackend())
        model.forward(np.array([3, 4, 3]), None, model.make_cache(8))
        row = store.tensor_info["token_embd.weight"]["nbytes"] // store.config.vocab_size
        assert sw.embed_bytes_read == 2 * row


class FakeVM:
    def __init__(self, available):
        self.available, self.total = available, 8 * GiB

    def __call__(self):
        return SimpleNamespace(available=self.available, total=self.total)


def test_memory_watch_gives_up_resident_layers(tiny_store, monkeypatch):
    store = tiny_store
    monkeypatch.setattr("flashlm.offload.streaming.WATCH_S", 0.0)
    vm = FakeVM(4 * GiB)
    plan = stream_plan(store, resident=(0, 1, 3, 4))
    ref = run(build_model(store.config, store, KernelBackend()), steps=4)
    with StreamingWeights(store, plan, vm=vm, rss=lambda: 0) as sw:
        model = build_model(store.config, sw, KernelBackend())
        ids = np.random.default_rng(0).integers(0, store.config.vocab_size, 9)
        cache = model.make_cache(32)
        out = [model.forward(ids, None, cache, all_logits=True)]
        assert len(sw.plan.resident_layers) == 4 and not sw.notices
        vm.available = 10 << 20  # the machine runs short
        tok = int(np.argmax(out[0][-1]))
        for _ in range(4):
            out.append(model.forward(np.array([tok]), None, cache))
            tok = int(np.argmax(out[-1]))
        assert len(sw.plan.resident_layers) == 0 and sw.notices and "memory is short" in sw.notices[0]
        layout = Layout.of(store)
        assert sw.plan.streamed_bytes_per_token == sum(layout.layer_bytes) + layout.head_bytes
        assert plan.streamed_bytes_per_token == sw.plan.streamed_bytes_per_token - sum(layout.layer_bytes[i]
                                                                                    for i in (0, 1, 3, 4))
        assert set(sw.prefetcher.keys) >= {("layer", i) for i in range(store.n_layers)}
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(a, b)


def test_rss_over_budget_also_gives_up_layers(tiny_store, monkeypatch):
    store = tiny_store
    monkeypatch.setattr("flashlm.offload.streaming.WATCH_S", 0.0)
    plan = stream_plan(store, resident=(0, 1, 3, 4))
    with StreamingWeights(store, plan, vm=FakeVM(4 * GiB), rss=lambda: plan.budget + 1) as sw:
        sw.layer(0)
        assert 0 < len(sw.notices) and len(sw.plan.resident_layers) < 4


def test_read_error_surfaces_from_forward(tiny_store, monkeypatch):
    store = tiny_store
    real = StoreFile.read_into
    bad = str(store.path / "layer_003.bin")

    def failing(self, buf, offset):
        if str(self.path) == bad and len(buf) > 16384:  # the layer's read, not its norms' at start
            raise OffloadError(f"read error in {self.path} at offset {offset}: Input/output error")
        return real(self, buf, offset)

    monkeypatch.setattr(StoreFile, "read_into", failing)
    sw = StreamingWeights(store, stream_plan(store))
    model = build_model(store.config, sw, KernelBackend())
    with pytest.raises(OffloadError, match=r"layer_003\.bin .*Input/output error"):
        model.forward(np.array([1, 2]), None, model.make_cache(8))
    sw.close()
    assert not reader_threads()

"""The engine loop of the server (runtime/scheduler.py) on a tiny model: requests join a
running batch at step boundaries and get the tokens they get alone, leave when done or
cancelled, a failed step fails its requests and the loop goes on, the queue is bounded,
close drains; and when weights stream, a step reads each layer once for all sequences."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from synth import write_tiny_gguf

import flashlm
from flashlm.errors import OffloadError
from flashlm.runtime.engine import Event
from flashlm.runtime.sampler import SamplingParams
from flashlm.runtime.scheduler import Failure, QueueFullError, Scheduler, ShuttingDownError

TIMEOUT = 60


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from flashlm.models.gguf_import import import_gguf

    d = tmp_path_factory.mktemp("sched")
    return import_gguf(write_tiny_gguf(d / "t.gguf", arch="qwen2", hidden=64, ffn=128, n_layers=3), d / "store")


@pytest.fixture(scope="module")
def llm(store):
    with flashlm.load(store, threads=2, ctx=96, batch=4) as llm:
        yield llm


class Collector:
    """A request's sink: its events (and a Failure), and an Event set when it ends."""

    def __init__(self, on_event=None):
        self.events, self.failure, self.ended = [], None, threading.Event()
        self.on_event = on_event

    def __call__(self, item):
        if isinstance(item, Failure):
            self.failure = item
            self.ended.set()
            return
        self.events.append(item)
        if self.on_event is not None:
            self.on_event(self, item)
        if item.finished:
            self.ended.set()

    @property
    def tokens(self):
        return [e.token for e in self.events if e.token is not None]

    def wait(self):
        assert self.ended.wait(TIMEOUT), "the request never ended"
        return self


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, 250, k)) for k in rng.integers(3, 30, n)]


def alone(llm, ids, params):
    return [ev.token for ev in llm.engine.generate([ids], params) if ev.token is not None]


def counting_steps(engine, monkeypatch):
    """Record the number of live sequences of every step."""
    real, sizes = engine.step, []

    def step(seqs, **kw):
        sizes.append(sum(not s.done for s in seqs))
        return real(seqs, **kw)

    monkeypatch.setattr(engine, "step", step)
    return sizes


@pytest.mark.parametrize("mix", [True, False], ids=["mixed-steps", "prefill-steps"])
def test_requests_joining_a_running_batch_get_their_tokens_alone(llm, monkeypatch, mix):
    params = SamplingParams.greedy(max_tokens=20)
    ps = prompts(5)
    want = [alone(llm, p, params) for p in ps]
    sched = Scheduler(llm.engine, max_batch=3, max_queue=8, mix=mix)
    sizes = counting_steps(llm.engine, monkeypatch)
    late = [Collector() for _ in ps[1:]]

    def join_later(c, ev):  # on the loop thread, after the first request's 3rd token: mid-run
        if len(c.events) == 3:
            for p, lc in zip(ps[1:], late):
                sched.submit(p, params, lc)

    first = Collector(join_later)
    sched.start()
    try:
        sched.submit(ps[0], params, first)
        got = [first.wait().tokens] + [c.wait().tokens for c in late]
    finally:
        sched.close()
    assert got == want
    assert max(sizes) == 3  # never more than max_batch at once, and requests did share steps
    assert sizes[0] == 1 and sizes[-1] < 3  # the first ran alone before the others joined; they left
    c = sched.counts()
    assert c["served"] == 5 and c["running"] == c["waiting"] == 0 and not sched.alive


def test_sampled_requests_keep_their_seed_in_a_batch(llm):
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=s, max_tokens=12) for s in (1, 2, 3)]
    ps = prompts(3, seed=4)
    want = [alone(llm, p, q) for p, q in zip(ps, params)]
    sched = Scheduler(llm.engine, max_batch=3)
    sched.start()
    cs = [Collector() for _ in ps]
    for p, q, c in zip(ps, params, cs):
        sched.submit(p, q, c)
    got = [c.wait().tokens for c in cs]
    sched.close()
    assert got == want


def test_a_cancelled_request_leaves_at_the_next_step(llm):
    sched = Scheduler(llm.engine, max_batch=2)
    holder = {}

    def cancel_after_two(c, ev):
        if len(c.events) == 2:
            sched.cancel(holder["req"])

    c = Collector(cancel_after_two)
    other = Collector()
    # both are queued before the loop starts, so they run in one batch (submitted after
    # start, the second could arrive after the cancel and reuse the first one's cache)
    holder["req"] = sched.submit(prompts(1)[0], SamplingParams.greedy(max_tokens=60), c)
    second = sched.submit(prompts(1, seed=3)[0], SamplingParams.greedy(max_tokens=30), other)
    sched.start()
    other.wait()
    sched.close()
    assert len(c.events) == 2 and not c.ended.is_set()  # nothing after the cancel
    assert len(other.events) > 2 and other.ended.is_set()  # the other one ran on to its end
    assert sched.counts()["cancelled"] == 1 and not sched._live
    free = [id(k) for k in sched._caches]  # both caches are free again
    assert len(free) == 2 and id(holder["req"].seq.cache) in free and id(second.seq.cache) in free


def test_a_failed_step_fails_its_requests_and_the_next_one_runs(llm, monkeypatch):
    real = llm.engine.step
    armed = {"n": 1}
    both = threading.Event()  # no step runs before both requests are queued: b is in a's failing step

    def failing(seqs, **kw):
        assert both.wait(TIMEOUT)
        if armed["n"] and any(s.tokens for s in seqs):  # in the middle of a generation
            armed["n"] -= 1
            raise OffloadError("read error in layer_001.bin at offset 0 (4096 bytes): Input/output error")
        return real(seqs, **kw)

    monkeypatch.setattr(llm.engine, "step", failing)
    sched = Scheduler(llm.engine, max_batch=2)
    sched.start()
    a, b = Collector(), Collector()
    sched.submit(prompts(1)[0], SamplingParams.greedy(max_tokens=8), a)
    sched.submit(prompts(1, seed=1)[0], SamplingParams.greedy(max_tokens=8), b)
    both.set()
    a.wait(), b.wait()
    after = Collector()
    sched.submit(prompts(1, seed=2)[0], SamplingParams.greedy(max_tokens=8), after)
    after.wait()
    sched.close()
    assert a.failure is not None and a.failure.status == 500 and "Input/output error" in a.failure.message
    assert b.failure is not None  # it was in the same pass over the weights
    assert after.failure is None and after.events[-1].finished
    assert after.tokens == alone(llm, prompts(1, seed=2)[0], SamplingParams.greedy(max_tokens=8))


def hold_steps(llm, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make every engine step wait for ``gate``; ``entered`` is set when one starts."""
    gate, entered = threading.Event(), threading.Event()
    real = llm.engine.step

    def blocked(seqs, **kw):
        entered.set()
        assert gate.wait(TIMEOUT)
        return real(seqs, **kw)

    monkeypatch.setattr(llm.engine, "step", blocked)
    return gate, entered


def test_queue_is_bounded_and_close_refuses_new_requests(llm, monkeypatch):
    gate, entered = hold_steps(llm, monkeypatch)
    sched = Scheduler(llm.engine, max_batch=1, max_queue=1)
    sched.start()
    a, b = Collector(), Collector()
    sched.submit([1, 2, 3], SamplingParams.greedy(max_tokens=3), a)
    assert entered.wait(TIMEOUT)  # a is in a step
    sched.submit([4, 5, 6], SamplingParams.greedy(max_tokens=3), b)
    with pytest.raises(QueueFullError, match="--max-queue 1"):
        sched.submit([7, 8], SamplingParams.greedy(max_tokens=3), Collector())
    closer = threading.Thread(target=sched.close)  # drains: a and b still finish
    closer.start()
    with pytest.raises(ShuttingDownError):
        for _ in range(200):  # close() marks the scheduler closing at once
            sched.submit([7, 8], SamplingParams.greedy(max_tokens=3), Collector())
            threading.Event().wait(0.01)
    gate.set()
    closer.join(TIMEOUT)
    assert a.wait().failure is None and b.wait().failure is None and not sched.alive


def test_close_without_drain_fails_what_is_left(llm, monkeypatch):
    gate, entered = hold_steps(llm, monkeypatch)
    sched = Scheduler(llm.engine, max_batch=1, max_queue=2)
    sched.start()
    a, b = Collector(), Collector()
    sched.submit([1, 2, 3], SamplingParams.greedy(max_tokens=30), a)
    assert entered.wait(TIMEOUT)
    sched.submit([4, 5, 6], SamplingParams.greedy(max_tokens=3), b)
    closer = threading.Thread(target=sched.close, kwargs={"drain": False})
    closer.start()
    threading.Event().wait(0.2)
    gate.set()
    closer.join(TIMEOUT)
    assert a.wait().failure.status == 503 and b.wait().failure.status == 503 and not sched.alive


def test_a_prompt_that_does_not_fit_is_refused_at_submit(llm):
    sched = Scheduler(llm.engine, max_batch=1)
    with pytest.raises(flashlm.errors.InputError, match="does not fit the context of 96"):
        sched.submit(list(range(96)), SamplingParams.greedy(), Collector())


def test_streamed_weights_are_read_once_per_step_for_all_sequences(store):
    """4 requests decoding together: the bytes read per step are one pass over the streamed
    layers, not one per sequence, and a step yields several tokens."""
    with flashlm.load(store, threads=2, ctx=96, batch=4, stream=True, draft="none") as llm:
        w = llm.weights
        w.give_up_layers(len(w.plan.resident_layers), "test")  # every layer streams
        per_step = w.plan.streamed_bytes_per_token
        assert len(w.plan.streamed_layers) == 3 and per_step > 0
        sched = Scheduler(llm.engine, max_batch=4)
        r0, s0 = w.prefetcher.stats.bytes_read, w.steps
        cs = [Collector() for _ in range(4)]
        for p, c in zip(prompts(4, seed=7), cs):
            sched.submit(p, SamplingParams.greedy(max_tokens=16), c)
        sched.start()
        for c in cs:
            c.wait()
        sched.close()
        steps = w.steps - s0
        read = w.prefetcher.stats.bytes_read - r0
        tokens = sum(len(c.events) for c in cs)
    assert all(c.failure is None for c in cs)
    assert steps == sched.steps and tokens >= 3 * steps
    # what the readers fetched: a pass per step, plus at most a window read ahead
    assert read <= (steps + 1) * per_step, (read, steps, per_step)

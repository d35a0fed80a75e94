"""Continuous batching: the one engine loop of a server.

One thread owns the model. Requests come in through :meth:`Scheduler.submit` from any
thread and wait in a queue; at every step boundary the loop admits waiting requests
into the running batch while it has fewer than ``max_batch`` live sequences (each gets
one of ``max_batch`` KV caches, made once and reused), runs :meth:`Engine.step` over
all live sequences (one pass over the weights for all of them: when weights stream from
disk, each layer is read once per step whatever the number of sequences), and hands
every event to its request's sink. A finished or cancelled request leaves at the next
boundary and its cache goes to the next one.

A step that raises (a disk read error while weights stream, say) fails the requests in
that step with a message; the loop goes on with the next requests.

Example:
    >>> sched = Scheduler(llm.engine, max_batch=8)
    >>> sched.start()
    >>> req = sched.submit(ids, SamplingParams.greedy(max_tokens=16), sink=print)
    >>> sched.close()
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from flashlm.errors import FlashlmError, InputError
from flashlm.runtime.engine import Engine, Event, Seq, Stats
from flashlm.runtime.sampler import SamplingParams


class QueueFullError(FlashlmError):
    """The server has ``max_batch`` requests running and ``max_queue`` waiting: try again later."""


class ShuttingDownError(FlashlmError):
    """The server is stopping and takes no new requests."""


@dataclass
class Failure:
    """What a request's sink gets when the request fails: an HTTP-like status and a message."""

    status: int
    message: str
    kind: str = "server_error"


Sink = Callable[[object], None]  # gets Event objects, then possibly a Failure; called on the loop thread


@dataclass
class Request:
    """A request in the scheduler. ``sink`` receives its events (the last has finished=True)
    or a Failure; nothing after either."""

    id: int
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    seq: Seq | None = None
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.tokens) if self.seq is not None else 0


class Scheduler:
    """The engine loop. Thread-safe: submit() and cancel() from any thread.

    Args:
        engine: the Engine (its model is used only by the loop thread from start() on).
        max_batch: most sequences decoded together (KV caches held).
        max_queue: most requests waiting for a place in the batch; more get QueueFullError.
        mix: prompt chunks of joining requests share steps with the decode rows of the
            running ones (else a step with prompt rows has no decode rows).
    """

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, mix: bool = True) -> None:
        if max_batch < 1:
            raise InputError(f"--max-batch {max_batch} is invalid: use 1 or more")
        if max_queue < 0:
            raise InputError(f"--max-queue {max_queue} is invalid: use 0 or more")
        self.engine, self.max_batch, self.max_queue, self.mix = engine, int(max_batch), int(max_queue), mix
        self.max_rows = self.max_batch * (engine.draft_max + 1)
        engine.stats = Stats()  # counts every step of the server's life
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._live: list[Request] = []
        self._caches: list = []  # free KV caches (made on demand, at most max_batch)
        self._ids = itertools.count(1)
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.served = 0
        self.failed = 0
        self.cancelled = 0

    # ---- any thread ----

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> Request:
        """Queue a request; its sink gets its events from the loop thread.

        Raises:
            InputError: the prompt does not fit the context (or is empty, or has bad ids).
            QueueFullError: max_batch running and max_queue waiting already.
            ShuttingDownError: close() was called.
        """
        ids = self.engine._check_prompt(prompt, 0)
        with self._cv:
            if self._closing:
                raise ShuttingDownError("the server is shutting down; it takes no new requests")
            if len(self._live) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise QueueFullError(f"the server is busy: {len(self._live)} requests running and "
                                     f"{len(self._waiting)} waiting (--max-batch {self.max_batch}, --max-queue "
                                     f"{self.max_queue}); retry later")
            req = Request(next(self._ids), ids, params, sink)
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Drop ``req`` at the next step boundary (the client went away); its sink gets nothing more."""
        with self._cv:
            if not req.finished and not (req.seq is not None and req.seq.done):  # not once its last event is out
                req.cancelled = True
                self._cv.notify_all()

    def counts(self) -> dict:
        with self._cv:
            return {"running": len(self._live), "waiting": len(self._waiting), "steps": self.steps,
                    "served": self.served, "failed": self.failed, "cancelled": self.cancelled}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="flashlm-engine", daemon=True)
            self._thread.start()

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish those running and waiting first, else
        fail them (503). Joins the loop thread."""
        with self._cv:
            self._closing = True
            if not drain:
                for req in list(self._waiting) + self._live:
                    req.cancelled = True
                    self._fail(req, Failure(503, "the server is shutting down"))
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loop thread ----

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._drop_cancelled()
                self._admit()
                if not self._live:
                    if self._closing and not self._waiting:
                        return
                    self._cv.wait()
                    continue
                live = list(self._live)
            try:
                events = self.engine.step([r.seq for r in live], mix=self.mix, max_rows=self.max_rows)
            except Exception as e:  # noqa: BLE001 - the requests in this step fail; the server goes on
                msg = str(e) if isinstance(e, FlashlmError) else f"internal error: {type(e).__name__}: {e}"
                with self._cv:
                    for req in live:
                        self._fail(req, Failure(500, f"generation failed: {msg}"))
                    self._release(live)
                continue
            by_id = {r.id: r for r in live}
            for ev in events:
                req = by_id[ev.seq]
                if not req.cancelled:
                    self._send(req, ev)
            with self._cv:
                self.steps += 1
                done = [r for r in live if r.seq.done]
                for r in done:
                    r.finished = True
                    self.served += not r.cancelled
                self._release(done)

    def _admit(self) -> None:
        while self._waiting and len(self._live) < self.max_batch:
            req = self._waiting.popleft()
            if req.cancelled:
                self.cancelled += 1
                req.finished = True
                continue
            cache = self._caches.pop() if self._caches else None
            try:
                req.seq = self.engine.add(req.prompt, req.params, index=req.id, cache=cache)
            except FlashlmError as e:
                if cache is not None:
                    self._caches.append(cache)
                self._fail(req, Failure(400, str(e), "invalid_request_error"))
                continue
            except Exception as e:  # noqa: BLE001 - e.g. out of memory making a cache
                if cache is not None:
                    self._caches.append(cache)
                self._fail(req, Failure(500, f"cannot start the request: {type(e).__name__}: {e}"))
                continue
            self._live.append(req)

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._live if r.cancelled]
        for r in gone:
            if r.seq is not None and not r.seq.done:
                self.engine.finish(r.seq)
            r.finished = True
            self.cancelled += 1
        self._release(gone)

    def _release(self, reqs: list[Request]) -> None:
        for r in reqs:
            if r in self._live:
                self._live.remove(r)
                if r.seq is not None:
                    self._caches.append(r.seq.cache)

    def _send(self, req: Request, item: object) -> None:
        try:
            req.sink(item)
        except Exception:  # noqa: BLE001 - a consumer that is gone must not stop the loop
            req.cancelled = True

    def _fail(self, req: Request, failure: Failure) -> None:
        if req.finished:
            return
        req.finished = True
        self.failed += 1
        if req.seq is not None and not req.seq.done:
            req.seq.done, req.seq.finish_reason = True, "error"
        if req in self._waiting:
            self._waiting.remove(req)
        self._send(req, failure)

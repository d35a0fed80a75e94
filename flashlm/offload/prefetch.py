"""The prefetcher: reader threads fill a fixed window of aligned slots ahead of the compute.

Mechanism only (the planner in :mod:`flashlm.offload.budget` decides what streams and
how many slots): a list of :class:`Segment` s in the order the model asks for them
(layer 0, 1, ..., the head's row blocks; then again for the next token), one
anonymous page-aligned slab of ``n_slots x slot_bytes`` allocated once, and reader
threads that read segments into free slots, several requests in flight.

The compute side calls ``get(key)`` and ``release(key)``:

    READY    -> handed out at once (a prefetch hit)
    LOADING  -> wait for the reads in flight
    absent   -> the schedule was mispredicted: start here (evicting a slot that was
                read ahead but not handed out), then wait

The compute thread never reads a file. A slot is refilled only after ``release``: the
kernels reading it have returned (they are synchronous), so no read ever overwrites
bytes in use. After each release the next segments in order go into the free slots,
wrapping around to layer 0 for the next token; a segment is never in two slots.

A read error is stored with its slot and raised by ``get`` as an OffloadError that
names the file, the offset and the OS error; ``close`` stops and joins every reader
(also after an error), so no thread outlives the prefetcher.

Example:
    >>> pf = Prefetcher(segments, n_slots=2, slot_bytes=32 << 20)
    >>> buf = pf.get(("layer", 0))   # np.uint8 view of the slot
    >>> ...                          # compute on views of buf
    >>> pf.release(("layer", 0))     # the slot may now be refilled
    >>> pf.close()
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from flashlm.errors import OffloadError
from flashlm.offload.io import ALIGN, StoreFile, aligned_buffer, default_mode

FREE, LOADING, READY, HELD = "free", "loading", "ready", "held"


@dataclass(frozen=True)
class Segment:
    """Byte ranges of one store file that stream together into one slot.

    Attributes:
        key: what the compute side asks for, e.g. ("layer", 3) or ("head", 0).
        path: the store file.
        ranges: (file offset, nbytes, offset in the slot) triples, all 4096-aligned.
    """

    key: Hashable
    path: Path
    ranges: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n, _ in self.ranges)

    @property
    def span(self) -> int:
        """Bytes of slot the segment occupies."""
        return max(s + n for _, n, s in self.ranges)


@dataclass
class PrefetchStats:
    """What the prefetcher did since it started (or since :meth:`Prefetcher.reset_stats`)."""

    bytes_read: int = 0
    segments_read: int = 0
    read_s: float = 0.0  # wall time with at least one read in flight
    io_wait_s: float = 0.0  # time the compute side waited in get()
    gets: int = 0
    hits: int = 0  # get() found the segment already read
    misses: int = 0  # get() found it not even requested (schedule mispredicted)

    @property
    def read_gb_s(self) -> float:
        return self.bytes_read / self.read_s / 1e9 if self.read_s else 0.0

    @property
    def overlap(self) -> float:
        """Fraction of read time hidden under compute (not waited for)."""
        return max(0.0, 1.0 - self.io_wait_s / self.read_s) if self.read_s else 0.0

    def as_dict(self) -> dict:
        return {"bytes_read": self.bytes_read, "segments_read": self.segments_read,
                "read_s": round(self.read_s, 4), "read_GB_s": round(self.read_gb_s, 3),
                "io_wait_s": round(self.io_wait_s, 4), "overlap": round(self.overlap, 3),
                "gets": self.gets, "hits": self.hits, "misses": self.misses}


@dataclass
class _Slot:
    index: int
    view: np.ndarray  # (slot_bytes,) uint8
    state: str = FREE
    key: Hashable = None
    error: BaseException | None = None
    t_submit: float = 0.0
    gen: int = 0


class _Request:
    """The chunks of one read request still in flight, and what to call when they are done."""

    __slots__ = ("pending", "error", "on_done")

    def __init__(self, pending: int, on_done) -> None:
        self.pending, self.error, self.on_done = pending, None, on_done


class ReadPool:
    """Reader threads that fill buffers from store files, several requests in flight.

    ``submit`` (called with ``cv`` held) cuts a request into ``chunk``-byte reads for the
    queue; when the last chunk of a request is done, ``on_done(error or None)`` runs with
    ``cv`` held and waiters are notified. The Prefetcher and the ExpertCache share one pool
    (its ``cv`` is their lock), so the disk sees one queue.

    Args:
        mode: read mode ("direct", "buffered", "mmap"; see :mod:`flashlm.offload.io`).
        readers: reader threads.
        chunk: bytes per read request.
    """

    def __init__(self, mode: str | None = None, *, readers: int = 2, chunk: int = 4 << 20) -> None:
        if chunk <= 0 or chunk % ALIGN:
            raise ValueError(f"chunk must be a positive multiple of {ALIGN}, got {chunk}")
        self.mode = mode or default_mode()
        self.chunk = int(chunk)
        self.cv = threading.Condition()
        self.closed = False
        self.bytes_read = 0
        self._read_s = 0.0
        self._inflight = 0
        self._busy_since = 0.0
        self._files: dict[Path, StoreFile] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # reads the compute side will wait for
        self._later: queue.SimpleQueue = queue.SimpleQueue()  # background reads (predictions): after those
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()  # one per queued read (None: stop)
        self._threads = [threading.Thread(target=self._reader, name=f"flashlm-reader-{i}", daemon=True)
                         for i in range(max(1, int(readers)))]
        for t in self._threads:
            t.start()

    @property
    def read_s(self) -> float:
        """Wall time with at least one read in flight (including the reads in flight now)."""
        return self._read_s + (time.perf_counter() - self._busy_since if self._inflight else 0.0)

    def submit(self, path: Path, ranges, dst: np.ndarray, on_done, *, background: bool = False) -> None:
        """Read ``ranges`` ((file offset, nbytes, offset in dst) triples) of ``path`` into ``dst``
        (uint8); ``on_done(error or None)`` when all are in. Call with ``cv`` held. A
        ``background`` request (a guess: an expert read ahead) is taken by the readers only
        when no other request waits."""
        f = self._files.get(path)
        if f is None:
            try:
                f = self._files[path] = StoreFile(path, self.mode)
            except OffloadError as e:
                on_done(e)
                return
        mv = memoryview(dst)
        jobs = []
        for off, n, at in ranges:
            for c in range(0, n, self.chunk):
                m = min(self.chunk, n - c)
                jobs.append((f, off + c, mv[at + c:at + c + m]))
        if not jobs:
            on_done(None)
            return
        req = _Request(len(jobs), on_done)
        q = self._later if background else self._jobs
        for f, off, buf in jobs:
            q.put((req, f, off, buf))
            self._tokens.put(True)

    def _reader(self) -> None:
        while True:
            if self._tokens.get() is None:
                return
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                try:
                    job = self._later.get_nowait()
                except queue.Empty:  # dropped by close()
                    continue
            req, f, off, buf = job
            with self.cv:
                if self._inflight == 0:
                    self._busy_since = time.perf_counter()
                self._inflight += 1
            err = None
            try:
                if req.error is None:
                    f.read_into(buf, off)
            except BaseException as e:  # noqa: BLE001 - handed to on_done, raised by the caller
                err = e
            with self.cv:
                self._inflight -= 1
                if self._inflight == 0:
                    self._read_s += time.perf_counter() - self._busy_since
                if err is not None and req.error is None:
                    req.error = err
                elif err is None:
                    self.bytes_read += len(buf)
                req.pending -= 1
                if req.pending == 0:
                    req.on_done(req.error)
                    self.cv.notify_all()

    def close(self) -> None:
        """Stop the readers after the reads in flight; drop queued ones. Idempotent."""
        with self.cv:
            if self.closed:
                return
            self.closed = True
            self.cv.notify_all()
        for jobs in (self._jobs, self._later):
            try:
                while True:
                    req = jobs.get_nowait()[0]
                    with self.cv:
                        req.pending -= 1
                        if req.error is None:
                            req.error = OffloadError("the weight reader was closed")
                        if req.pending == 0:
                            req.on_done(req.error)
            except queue.Empty:
                pass
        for _ in self._threads:
            self._tokens.put(None)
        for t in self._threads:
            t.join()
        for f in self._files.values():
            f.close()
        self._files.clear()
        with self.cv:
            self.cv.notify_all()

    @property
    def threads_alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)


class Prefetcher:
    """Reader threads streaming ``schedule`` through ``n_slots`` aligned slots.

    Args:
        schedule: segments in the order they are used; the order repeats (next token).
        n_slots: slots in the window (at least 1; 2 keeps the disk busy while one computes).
        slot_bytes: bytes per slot (>= the largest segment's span).
        mode: read mode ("direct", "buffered", "mmap"; see :mod:`flashlm.offload.io`).
        readers: reader threads.
        chunk: bytes per read request (a segment is cut into chunks for queue depth).
        trace: keep (key, submit time, done time) of every segment read in ``self.trace``.
    """

    def __init__(self, schedule: Sequence[Segment], *, n_slots: int, slot_bytes: int, mode: str | None = None,
                 readers: int = 2, chunk: int = 4 << 20, trace: bool = False, pool: ReadPool | None = None) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self._own_pool = pool is None
        self.pool = pool or ReadPool(mode, readers=readers, chunk=chunk)
        self.mode = self.pool.mode
        self.slot_bytes = -(-int(slot_bytes) // ALIGN) * ALIGN
        self._stats = PrefetchStats()
        self._read_s0 = self.pool.read_s
        self.trace: list[tuple[Hashable, float, float]] | None = [] if trace else None
        self._cv = self.pool.cv
        self._closed = False
        try:
            self._buf = aligned_buffer(n_slots * self.slot_bytes)
            whole = np.frombuffer(self._buf, np.uint8)
            self._slots = [_Slot(i, whole[i * self.slot_bytes:(i + 1) * self.slot_bytes]) for i in range(n_slots)]
            self._where: dict[Hashable, _Slot] = {}
            self._set_schedule(schedule)
        except BaseException:
            if self._own_pool:
                self.pool.close()
            raise
        with self._cv:
            self._fill()

    # ---- schedule ----

    def _set_schedule(self, schedule: Sequence[Segment]) -> None:
        self._order = list(schedule)
        self._pos = {s.key: i for i, s in enumerate(self._order)}
        if len(self._pos) != len(self._order):
            raise ValueError("prefetch schedule has a key twice")
        for s in self._order:
            if s.span > self.slot_bytes:
                raise ValueError(f"segment {s.key} needs {s.span} bytes, more than a slot ({self.slot_bytes})")
        self._next = 0

    def set_schedule(self, schedule: Sequence[Segment]) -> None:
        """Replace the schedule (e.g. when resident layers are given up). Slots read ahead
        for keys no longer scheduled are dropped; held slots stay held until released."""
        with self._cv:
            self._set_schedule(schedule)
            for s in self._slots:
                if s.state == READY and s.key not in self._pos:
                    self._free(s)
            self._fill()

    @property
    def keys(self) -> list[Hashable]:
        return [s.key for s in self._order]

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    # ---- compute side ----

    def get(self, key: Hashable, on_wait=None) -> np.ndarray:
        """The slot holding segment ``key`` (uint8, ``slot_bytes``), once read. Hold it until
        :meth:`release`. ``on_wait()`` is called (without the lock) before waiting for a
        read, e.g. to send spinning compute threads to sleep so the readers get the cores.

        Raises:
            OffloadError: its read failed (file, offset, OS error), or the prefetcher is closed.
            KeyError: ``key`` is not in the schedule.
        """
        if key not in self._pos:
            raise KeyError(f"segment {key!r} is not in the prefetch schedule")
        t0 = time.perf_counter()
        if on_wait is not None:
            with self._cv:
                slot = self._where.get(key)
                ready = slot is not None and slot.state == READY
            if not ready:
                on_wait()
        with self._cv:
            self._stats.gets += 1
            first = True
            while True:
                if self._closed:
                    raise OffloadError("the weight prefetcher is closed")
                slot = self._where.get(key)
                if slot is None:
                    if first:
                        self._stats.misses += 1
                    self._next = self._pos[key]  # mispredicted (or the first call): start here
                    self._fill()
                    if self._where.get(key) is None and not self._evict_for(key):
                        if not any(s.state == LOADING for s in self._slots):
                            raise RuntimeError("every prefetch slot is held: release a segment before getting another")
                        self._cv.wait()
                elif slot.state == READY:
                    if first:
                        self._stats.hits += 1
                    if slot.error is not None:
                        err = slot.error
                        self._free(slot)
                        self._fill()
                        if isinstance(err, OffloadError):
                            raise OffloadError(str(err)) from None
                        raise OffloadError(f"reading {key} failed: {err!r}") from err
                    slot.state = HELD
                    self._stats.io_wait_s += time.perf_counter() - t0
                    return slot.view
                elif slot.state == HELD:
                    raise RuntimeError(f"segment {key!r} is already held: release it first")
                else:
                    self._cv.wait()
                first = False

    def release(self, key: Hashable) -> None:
        """Give back the slot of ``key``: nothing reads it any more, it may be refilled."""
        with self._cv:
            slot = self._where.get(key)
            if slot is None or slot.state != HELD:
                raise RuntimeError(f"segment {key!r} is not held")
            self._free(slot)
            self._fill()

    def held(self) -> list[Hashable]:
        with self._cv:
            return [s.key for s in self._slots if s.state == HELD]

    # ---- internals (called with the lock held) ----

    def _free(self, slot: _Slot) -> None:
        self._where.pop(slot.key, None)
        slot.state, slot.key, slot.error = FREE, None, None

    def _fill(self) -> None:
        """Submit the next scheduled segments into free slots, in order, wrapping around,
        never a segment that is already in a slot."""
        if self._closed or not self._order:
            return
        for _ in range(len(self._order)):
            free = next((s for s in self._slots if s.state == FREE), None)
            if free is None:
                return
            seg = self._order[self._next]
            if seg.key in self._where:
                return  # wrapped around to what is already read or in use
            self._submit(seg, free)
            self._next = (self._next + 1) % len(self._order)

    def _evict_for(self, key: Hashable) -> bool:
        """Free a slot read ahead but not handed out (the one used furthest from ``key``)."""
        ready = [s for s in self._slots if s.state == READY]
        if not ready:
            return False
        n, at = len(self._order), self._pos[key]
        victim = max(ready, key=lambda s: (self._pos.get(s.key, at) - at) % n if s.key in self._pos else n)
        self._free(victim)
        self._fill()
        return True

    def _submit(self, seg: Segment, slot: _Slot) -> None:
        slot.state, slot.key, slot.error = LOADING, seg.key, None
        slot.t_submit = time.perf_counter()
        slot.gen += 1
        self._where[seg.key] = slot
        self.pool.submit(seg.path, seg.ranges, slot.view, partial(self._done, slot, slot.gen, seg.nbytes))

    def _done(self, slot: _Slot, gen: int, nbytes: int, err: BaseException | None) -> None:
        """A segment's reads are in (called by the pool with the lock held)."""
        if slot.gen != gen or slot.state != LOADING:
            return
        slot.state, slot.error = READY, err
        if err is None:
            self._stats.bytes_read += nbytes
            self._stats.segments_read += 1
        if self.trace is not None:
            self.trace.append((slot.key, slot.t_submit, time.perf_counter()))

    # ---- lifetime ----

    @property
    def stats(self) -> PrefetchStats:
        """A snapshot of the counters (read time: the pool's, including the reads in flight now)."""
        with self._cv:
            snap = replace(self._stats)
            snap.read_s = self.pool.read_s - self._read_s0
            return snap

    def reset_stats(self) -> None:
        with self._cv:
            self._stats = PrefetchStats()
            self._read_s0 = self.pool.read_s

    def close(self) -> None:
        """Stop the readers (after the reads in flight end) when the pool is this prefetcher's own. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        if self._own_pool:
            self.pool.close()

    @property
    def threads_alive(self) -> int:
        return self.pool.threads_alive

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ---- experts ----


@dataclass
class ExpertStats:
    """What the expert cache did since it started."""

    requests: int = 0  # experts asked for
    hits: int = 0  # already in the cache (or on their way)
    bytes_read: int = 0
    io_wait_s: float = 0.0
    prefetched: int = 0  # reads started by a prediction (prefetch)
    prefetch_hits: int = 0  # of those, asked for afterwards

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def as_dict(self) -> dict:
        return {"expert_requests": self.requests, "expert_hits": self.hits, "expert_hit_rate": round(self.hit_rate, 4),
                "expert_bytes_read": self.bytes_read, "expert_io_wait_s": round(self.io_wait_s, 4),
                "expert_prefetched": self.prefetched, "expert_prefetch_hits": self.prefetch_hits}


@dataclass
class _ExpertSlot:
    view: np.ndarray
    key: Hashable = None
    state: str = FREE
    error: BaseException | None = None
    uses: float = 0.0  # frequency, halved every `age_every` requests
    last: int = 0  # recency: the request counter at the last use
    pinned: bool = False
    prefetched: bool = False  # read on a prediction, not asked for since
    gen: int = 0


class ExpertCache:
    """Experts of mixture-of-experts layers, read on demand into a fixed set of slots.

    ``get(layer, ids)`` returns a slot per expert: the experts already there are hits; the
    others are read now, all requests in flight at once (one contiguous aligned range each),
    into slots whose experts are the least used (frequency, aged, then recency). The slots
    handed out stay pinned until the next ``get`` or ``release``, so a layer's experts are
    never overwritten while its kernels run; the cache needs at least as many slots as the
    most experts one call asks for.

    Args:
        pool: the ReadPool (shared with the layers' prefetcher).
        n_slots: slots.
        slot_bytes: bytes per slot (>= the largest expert).
        spans: (layer, expert) -> (path, file offset, nbytes) of each expert.
    """

    def __init__(self, pool: ReadPool, *, n_slots: int, slot_bytes: int, spans: dict) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {n_slots}")
        self.pool, self._cv = pool, pool.cv
        self.slot_bytes = -(-int(slot_bytes) // ALIGN) * ALIGN
        self.spans = spans
        for k, (_, off, n) in spans.items():
            if off % ALIGN or n > self.slot_bytes:
                raise ValueError(f"expert {k}: span ({off}, {n}) is not aligned or is larger than a slot")
        self._buf = aligned_buffer(n_slots * self.slot_bytes)
        whole = np.frombuffer(self._buf, np.uint8)
        self._slots = [_ExpertSlot(whole[i * self.slot_bytes:(i + 1) * self.slot_bytes]) for i in range(n_slots)]
        self._where: dict[Hashable, _ExpertSlot] = {}
        self._tick = 0
        self.age_every = 4 * n_slots
        self.stats = ExpertStats()
        self.log: list | None = None  # when a list: every (layer, expert) read is appended (benchmarks)

    @property
    def n_slots(self) -> int:
        return len(self._slots)

    def release(self) -> None:
        """Unpin every slot (its experts may be replaced from now on)."""
        with self._cv:
            for s in self._slots:
                s.pinned = False

    def get(self, layer: int, ids, on_wait=None, on_submit=None) -> dict[int, np.ndarray]:
        """Slots (uint8 views) holding experts ``ids`` of ``layer``, read now if missing.
        ``on_submit()`` runs once the misses are queued (and the hits pinned), before the wait:
        the place to start reads ahead (:meth:`prefetch`) that must not delay these.

        Raises:
            OffloadError: a read failed (file, offset, OS error).
            RuntimeError: more experts asked for than the cache has slots.
        """
        ids = [int(e) for e in ids]
        if len(ids) > len(self._slots):
            raise RuntimeError(f"{len(ids)} experts asked for at once, the cache has {len(self._slots)} slots")
        t0 = time.perf_counter()
        with self._cv:
            for s in self._slots:
                s.pinned = False
            found = {}
            for e in ids:  # hits first, pinned, so that no miss of this call evicts one of them
                slot = self._where.get((layer, e))
                if slot is not None and slot.error is None:
                    slot.pinned = True
                    found[e] = slot
            want = []
            for e in ids:
                key = (layer, e)
                self._tick += 1
                self.stats.requests += 1
                slot = found.get(e)
                if slot is not None:
                    self.stats.hits += 1
                    if slot.prefetched:
                        self.stats.prefetch_hits += 1
                else:
                    slot = self._where.get(key)
                    if slot is not None:  # a failed read: try again
                        self._drop(slot)
                    slot = self._victim()
                    self._load(slot, key)
                slot.pinned = True
                slot.prefetched = False
                slot.uses += 1
                slot.last = self._tick
                want.append((e, slot))
                if self._tick % self.age_every == 0:
                    for s in self._slots:
                        s.uses *= 0.5
        if on_submit is not None:
            on_submit()
            t0 = time.perf_counter()
        if on_wait is not None and any(s.state == LOADING for _, s in want):
            on_wait()
        with self._cv:
            while any(s.state == LOADING for _, s in want):
                if self.pool.closed:
                    raise OffloadError("the weight reader is closed")
                self._cv.wait()
            self.stats.io_wait_s += time.perf_counter() - t0
            for e, s in want:
                if s.error is not None:
                    err = s.error
                    self._drop(s)
                    raise OffloadError(f"reading expert {e} of layer {layer} failed: {err}") from None
            return {e: s.view for e, s in want}

    def prefetch(self, layer: int, ids) -> int:
        """Start reading the experts ``ids`` of ``layer`` that are not cached (a prediction), into
        slots of the least used unpinned experts; nothing waits. Returns the reads started
        (fewer when every other slot is pinned or loading)."""
        started = 0
        with self._cv:
            for e in ids:
                key = (layer, int(e))
                if key in self._where:
                    continue
                try:
                    slot = self._victim()
                except RuntimeError:
                    break
                self._load(slot, key, background=True)
                slot.last, slot.prefetched = self._tick, True
                started += 1
            self.stats.prefetched += started
        return started

    def read_pass(self, keys) -> float:
        """Bytes/s of reading experts ``keys`` ((layer, expert) pairs, e.g. the ``log`` of a
        decode) again with no compute, as many in flight as there are slots: the disk's
        ceiling for the reads a run made. Empties the cache; call with no forward running.

        Raises:
            OffloadError: a read failed.
        """
        keys = list(keys)
        if not keys:
            return 0.0
        got, errors = [0], []
        with self._cv:
            while any(s.state == LOADING for s in self._slots):
                self._cv.wait()
            for s in self._slots:
                self._drop(s)
                s.gen += 1
            free = list(self._slots)

            def done(slot, n, err):
                if err is None:
                    got[0] += n
                else:
                    errors.append(err)
                free.append(slot)

            t0 = time.perf_counter()
            for key in keys:
                while not free:
                    self._cv.wait()
                slot = free.pop()
                self._submit(slot, key, partial(done, slot, self.spans[key][2]))
            while len(free) < len(self._slots):
                self._cv.wait()
            dt = time.perf_counter() - t0
        if errors:
            raise OffloadError(f"re-reading experts failed: {errors[0]}")
        return got[0] / dt if dt > 0 else 0.0

    # -- internals, with the lock held --

    def _drop(self, slot: _ExpertSlot) -> None:
        self._where.pop(slot.key, None)
        slot.key, slot.state, slot.error, slot.uses, slot.pinned, slot.prefetched = None, FREE, None, 0.0, False, False

    def _victim(self) -> _ExpertSlot:
        free = [s for s in self._slots if s.state == FREE]
        if free:
            return free[0]
        cand = [s for s in self._slots if not s.pinned and s.state == READY]
        if not cand:
            raise RuntimeError("every expert slot is pinned or loading: the cache is too small for one call")
        victim = min(cand, key=lambda s: (s.uses, s.last))
        self._drop(victim)
        return victim

    def _load(self, slot: _ExpertSlot, key, background: bool = False) -> None:
        n = self.spans[key][2]
        slot.key, slot.state, slot.error = key, LOADING, None
        slot.gen += 1
        self._where[key] = slot
        if self.log is not None:
            self.log.append(key)
        self._submit(slot, key, partial(self._done, slot, slot.gen, n), background)

    def _submit(self, slot: _ExpertSlot, key, on_done, background: bool = False) -> None:
        """Queue the read of expert ``key`` into ``slot``: one aligned range (the slot's start
        is the page holding the expert's first byte)."""
        path, off, n = self.spans[key]
        lo = off - off % ALIGN
        self.pool.submit(path, ((lo, -(-(off + n - lo) // ALIGN) * ALIGN, 0),), slot.view, on_done,
                         background=background)

    def _done(self, slot: _ExpertSlot, gen: int, nbytes: int, err: BaseException | None) -> None:
        if slot.gen != gen:
            return
        slot.state, slot.error = READY, err
        if err is None:
            self.stats.bytes_read += nbytes

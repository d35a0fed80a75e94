"""A persistent thread pool that splits a row range across threads.

``pool.run(fn, n, *args)`` cuts ``[0, n)`` into ``n_threads`` contiguous chunks and
calls ``fn(*args, r0, r1)`` on each, the calling thread taking the first chunk.
``fn`` is meant to be a ``@njit(nogil=True)`` kernel, so the threads really run in
parallel and other Python threads (offloader readers) keep running meanwhile.

Dispatch: every worker waits on its own ``threading.Lock`` (the cheapest blocking
primitive in CPython, a futex underneath). ``run`` releases the start locks of the
workers that have work, computes its own chunk, then acquires their done locks.
No thread is created per call.

Measured with ``python perf/bench_matmul.py --extra`` on the 2-core AMD EPYC while
three other heavy processes ran (load average 6-7, so absolute figures are noisy):
- ``run`` overhead with a near-empty kernel and 2 threads: 18.7 us per call
  (direct call 0.6 us); 18-22 us in a separate loop of 2000 calls. The caller
  computes its chunk while the worker wakes, so part of it overlaps real work.
- Q8_0 GEMV, 2 threads, pool vs Numba ``prange`` (default threading layer):
  151936x896 10.8 vs 6.0 GB/s; 8960x1536 17.1 vs 34.3; 1536x8960 8.0 vs 1.0;
  896x896 10.1 vs 27.5; 4864x896 13.9 vs 0.3 GB/s.
  ``prange`` won twice and collapsed three times (its workers spin and lose the
  core to other processes); the pool was kept: it never collapsed, it lets
  other Python threads run (kernels are nogil; covered by a test), and
  Numba's default workqueue layer must not be entered from two Python threads at
  once, which the offloader's threads would risk.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from flashlm.kernels import sync

try:
    import psutil
except ImportError:  # psutil is a dependency, but keep the pool usable without it
    psutil = None


# How long an idle worker spins before it sleeps: long enough to span the Python
# work between two matmuls of a decode step, short enough to go quiet between requests.
SPIN_US = 2000.0
_SPIN_NS = 30.0  # about one pause + atomic load on Zen 3


def default_threads() -> int:
    """Physical cores (psutil), else logical cores, at least 1."""
    n = psutil.cpu_count(logical=False) if psutil is not None else None
    return max(1, int(n or os.cpu_count() or 1))


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) as ``min(parts, n)`` contiguous chunks whose sizes differ by at most 1."""
    parts = max(1, min(parts, n))
    q, rem = divmod(n, parts)
    out, r0 = [], 0
    for i in range(parts):
        r1 = r0 + q + (1 if i < rem else 0)
        out.append((r0, r1))
        r0 = r1
    return out


class ThreadPool:
    """Persistent worker threads running row-range kernels.

    Args:
        n_threads: total threads including the caller; default physical cores.

    Example:
        >>> with ThreadPool(2) as pool:
        ...     pool.run(gemv_q8_0, rows, w, x, out)   # gemv_q8_0(w, x, out, r0, r1)
    """

    def __init__(self, n_threads: int | None = None, *, spin_us: float = SPIN_US) -> None:
        n = default_threads() if n_threads is None else int(n_threads)
        if n < 1:
            raise ValueError(f"ThreadPool: n_threads must be >= 1, got {n_threads}")
        self.n_threads = n
        nw = n - 1
        self._call_lock = threading.Lock()  # one run() at a time
        self._closed = False
        self._tasks: list[tuple[Callable[..., Any], list[tuple[int, int]], tuple[Any, ...]]] = []
        self._errors: list[BaseException | None] = [None] * n
        # ctl[0]: task generation; ctl[1..nw]: generation each worker finished;
        # ctl[1+nw..2nw]: 1 while that worker sleeps on its semaphore.
        self._ctl = np.zeros(1 + 2 * nw, np.int64)
        self._gen = 0
        self._spins = max(1, int(spin_us * 1000 / _SPIN_NS))
        self._wake = [threading.Semaphore(0) for _ in range(nw)]
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name=f"flashlm-pool-{i + 1}") for i in range(nw)]
        for t in self._threads:
            t.start()

    def _worker(self, i: int) -> None:
        ctl, nw, wake = self._ctl, self.n_threads - 1, self._wake[i]
        last = 0
        while True:
            g = sync.spin_while_equal(ctl, 0, last, self._spins)  # nogil: others run meanwhile
            if g == last:  # idle for a while: sleep until run() wakes us
                sync.store(ctl, 1 + nw + i, 1)
                if sync.load(ctl, 0) == last:
                    wake.acquire()
                sync.store(ctl, 1 + nw + i, 0)
                continue
            last = g
            if self._closed:
                sync.store(ctl, 1 + i, g)
                return
            try:
                for fn, chunks, args in self._tasks:
                    r0, r1 = chunks[i + 1]
                    if r1 > r0:
                        fn(*args, r0, r1)
            except BaseException as e:  # handed to the caller of run()
                self._errors[i + 1] = e
            finally:
                sync.store(ctl, 1 + i, g)

    def _publish(self) -> int:
        """Start a new generation and wake sleeping workers; returns the generation."""
        ctl, nw = self._ctl, self.n_threads - 1
        self._gen += 1
        sync.store(ctl, 0, self._gen)
        for i in range(nw):
            if sync.load(ctl, 1 + nw + i):
                self._wake[i].release()
        return self._gen

    def _wait(self, g: int) -> None:
        nw = self.n_threads - 1
        while not sync.spin_until_all(self._ctl, 1, 1 + nw, g, self._spins):
            time.sleep(0)  # a worker lost its core: let it run

    def run(self, fn: Callable[..., Any], n: int, *args: Any) -> None:
        """Call ``fn(*args, r0, r1)`` over contiguous chunks of ``[0, n)`` in parallel.

        Args:
            fn: a row-range kernel (nogil for real parallelism).
            n: size of the range to split.
            *args: arguments passed before ``r0, r1``.

        Raises:
            The first exception raised by any chunk (in chunk order), after all
            chunks have finished.
        """
        self.run_many([(fn, n, args)])

    def run_many(self, tasks: Sequence[tuple[Callable[..., Any], int, tuple[Any, ...]]]) -> None:
        """Several row-range calls in one dispatch: thread t runs chunk t of each task in turn.

        Used for matrices that share an input (q/k/v, gate/up): one wake-up and one
        wait instead of one per matrix.

        Args:
            tasks: (fn, n, args) triples, as for :meth:`run`.
        """
        tasks = [(fn, n, args) for fn, n, args in tasks if n > 0]
        if not tasks:
            return
        with self._call_lock:
            if self._closed:
                raise RuntimeError("ThreadPool.run called after close()")
            nt = self.n_threads
            if nt == 1 or all(n == 1 for _, n, _ in tasks):
                for fn, n, args in tasks:
                    fn(*args, 0, n)
                return
            planned = []
            for fn, n, args in tasks:
                chunks = split(n, nt)
                chunks += [(n, n)] * (nt - len(chunks))
                planned.append((fn, chunks, args))
            self._tasks = planned
            g = self._publish()
            try:
                for fn, chunks, args in planned:
                    r0, r1 = chunks[0]
                    fn(*args, r0, r1)
            except BaseException as e:
                self._errors[0] = e
            self._wait(g)
            self._tasks = []
            errors = [e for e in self._errors if e is not None]
            self._errors = [None] * nt
            if errors:
                raise errors[0]

    def close(self) -> None:
        """Stop and join the worker threads (idempotent)."""
        with self._call_lock:
            if self._closed:
                return
            self._closed = True
            if self._threads:
                self._publish()
            for t in self._threads:
                t.join()

    def __enter__(self) -> "ThreadPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"ThreadPool(n_threads={self.n_threads})"

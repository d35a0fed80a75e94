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
from typing import Any, Callable

try:
    import psutil
except ImportError:  # psutil is a dependency, but keep the pool usable without it
    psutil = None


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

    def __init__(self, n_threads: int | None = None) -> None:
        n = default_threads() if n_threads is None else int(n_threads)
        if n < 1:
            raise ValueError(f"ThreadPool: n_threads must be >= 1, got {n_threads}")
        self.n_threads = n
        self._call_lock = threading.Lock()  # one run() at a time
        self._closed = False
        self._task: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._chunks: list[tuple[int, int]] = []
        self._errors: list[BaseException | None] = [None] * n
        self._start = [threading.Lock() for _ in range(n - 1)]
        self._done = [threading.Lock() for _ in range(n - 1)]
        for lk in self._start + self._done:
            lk.acquire()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name=f"flashlm-pool-{i + 1}") for i in range(n - 1)]
        for t in self._threads:
            t.start()

    def _worker(self, i: int) -> None:
        start, done = self._start[i], self._done[i]
        while True:
            start.acquire()
            if self._closed:
                done.release()
                return
            fn, args = self._task  # type: ignore[misc]
            r0, r1 = self._chunks[i + 1]
            try:
                fn(*args, r0, r1)
            except BaseException as e:  # handed to the caller of run()
                self._errors[i + 1] = e
            finally:
                done.release()

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
        if n <= 0:
            return
        with self._call_lock:
            if self._closed:
                raise RuntimeError("ThreadPool.run called after close()")
            chunks = split(n, self.n_threads)
            if len(chunks) == 1:
                fn(*args, 0, n)
                return
            self._task, self._chunks = (fn, args), chunks
            woken = range(len(chunks) - 1)
            for i in woken:
                self._start[i].release()
            try:
                fn(*args, *chunks[0])
            except BaseException as e:
                self._errors[0] = e
            for i in woken:
                self._done[i].acquire()
            self._task = None
            errors = [e for e in self._errors if e is not None]
            self._errors = [None] * self.n_threads
            if errors:
                raise errors[0]

    def close(self) -> None:
        """Stop and join the worker threads (idempotent)."""
        with self._call_lock:
            if self._closed:
                return
            self._closed = True
            for lk in self._start:
                lk.release()
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

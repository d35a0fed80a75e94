"""ThreadPool: same results as one thread, errors reach the caller, clean shutdown."""
from __future__ import annotations

import threading

import numba
import numpy as np
import pytest

from flashlm.runtime.threadpool import ThreadPool, split


@numba.njit(nogil=True, cache=True)
def _square_rows(x, out, r0, r1):  # x (n,), out (n,)
    for r in range(r0, r1):
        out[r] = x[r] * x[r] + r


@numba.njit(nogil=True, cache=True)
def _fail_from(limit, out, r0, r1):
    for r in range(r0, r1):
        if r >= limit:
            raise ValueError("row over the limit")
        out[r] = 1.0


@numba.njit(nogil=True, cache=True)
def _spin(n_iter, out, r0, r1):  # busy loop without the GIL
    s = 0.0
    for i in range(n_iter):
        s += np.sqrt(i + 1.0)
    for r in range(r0, r1):
        out[r] = s


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flashlm-pool")]


@pytest.mark.parametrize("n_threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000])
def test_results_identical_to_single_thread(n_threads: int, n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n)
    ref = np.empty(n)
    _square_rows(x, ref, 0, n)
    with ThreadPool(n_threads) as pool:
        for _ in range(3):
            out = np.full(n, np.nan)
            pool.run(_square_rows, n, x, out)
            np.testing.assert_array_equal(out, ref)


def test_split_covers_range() -> None:
    for n in (1, 5, 16, 101):
        for parts in (1, 2, 3, 8):
            chunks = split(n, parts)
            assert chunks[0][0] == 0 and chunks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
            sizes = [b - a for a, b in chunks]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("limit", [0, 60])  # error in the caller's chunk / in a worker's
def test_worker_exception_reaches_caller(limit: int) -> None:
    with ThreadPool(3) as pool:
        out = np.zeros(90)
        with pytest.raises(ValueError, match="over the limit"):
            pool.run(_fail_from, 90, limit, out)
        pool.run(_square_rows, 90, np.ones(90), out)  # still usable afterwards
        assert out[89] == 90.0


def test_close_leaves_no_thread() -> None:
    before = len(_pool_threads())
    pool = ThreadPool(4)
    assert len(_pool_threads()) == before + 3
    pool.run(_square_rows, 10, np.ones(10), np.zeros(10))
    pool.close()
    pool.close()  # idempotent
    assert len(_pool_threads()) == before
    with pytest.raises(RuntimeError):
        pool.run(_square_rows, 10, np.ones(10), np.zeros(10))
    with ThreadPool(2):
        pass
    assert len(_pool_threads()) == before


def test_default_size_and_bad_size() -> None:
    with ThreadPool() as pool:
        assert pool.n_threads >= 1
    with pytest.raises(ValueError):
        ThreadPool(0)


def test_other_python_threads_run_during_kernels() -> None:
    """Kernels run without the GIL: a plain Python thread keeps counting meanwhile."""
    count = [0]
    stop = threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1

    _spin(10, np.zeros(2), 0, 2)  # compile first
    t = threading.Thread(target=counter)
    t.start()
    try:
        with ThreadPool(2) as pool:
            c0 = count[0]
            pool.run(_spin, 2, 30_000_000, np.zeros(2))  # tens of ms of nogil work per thread
            c1 = count[0]
    finally:
        stop.set()
        t.join()
    assert c1 - c0 > 1000  # the counting thread ran while both pool threads computed


def test_concurrent_run_calls_are_serialized() -> None:
    x = np.arange(500, dtype=np.float64)
    ref = np.empty(500)
    _square_rows(x, ref, 0, 500)
    errors = []
    with ThreadPool(2) as pool:
        def job() -> None:
            for _ in range(50):
                out = np.zeros(500)
                pool.run(_square_rows, 500, x, out)
                if not np.array_equal(out, ref):
                    errors.append("mismatch")
        threads = [threading.Thread(target=job) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors

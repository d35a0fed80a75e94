"""Causal GQA attention over a KV cache against softmax(QK^T/sqrt(D) + mask) V in
float64, decode and prefill, with and without a thread pool; kv_write."""
from __future__ import annotations

import math
import queue
import threading

import numpy as np
import pytest

from flashlm.kernels.ops import attention, attention_batch, kv_write, kv_write_batch


def nerr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int) -> np.ndarray:
    n, hq, d = q.shape
    grp = hq // k.shape[0]
    t = n_past + n
    mask = np.where(np.arange(t)[None, :] > n_past + np.arange(n)[:, None], -np.inf, 0.0)
    out = np.empty((n, hq, d))
    for h in range(hq):
        kk = k[h // grp, :t].astype(np.float64)
        vv = v[h // grp, :t].astype(np.float64)
        s = q[:, h].astype(np.float64) @ kk.T / math.sqrt(d) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ vv
    return out


class TinyPool:
    """The duck-typed pool interface: run(fn, n, *args) calls fn(*args, start, stop)."""

    def __init__(self, n_threads: int) -> None:
        self.n = n_threads
        self.jobs: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(n_threads)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while True:
            fn, args, done, errs = self.jobs.get()
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in run()
                errs.append(e)
            done.release()

    def run(self, fn, n: int, *args) -> None:
        done, errs = threading.Semaphore(0), []
        bounds = [n * i // self.n for i in range(self.n + 1)]
        for i in range(self.n):
            self.jobs.put((fn, (*args, bounds[i], bounds[i + 1]), done, errs))
        for _ in range(self.n):
            done.acquire()
        if errs:
            raise errs[0]


@pytest.fixture(scope="module")
def pools() -> list[TinyPool]:
    return [TinyPool(2), TinyPool(3)]


def make(hq: int, hkv: int, d: int, n: int, n_past: int, seed: int = 0, t_max: int | None = None):
    rng = np.random.default_rng(seed)
    t_max = t_max or n_past + n + 5
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    k = rng.standard_normal((hkv, t_max, d)).astype(np.float32)
    v = rng.standard_normal((hkv, t_max, d)).astype(np.float32)
    k[:, n_past + n:] = np.nan  # positions past the sequence must never be read
    v[:, n_past + n:] = np.nan
    return q, k, v


@pytest.mark.parametrize("hq,hkv", [(14, 2), (12, 2), (9, 3)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n,n_past", [(1, 0), (1, 999), (17, 0), (17, 5)])
def test_attention_matches_reference(hq: int, hkv: int, d: int, n: int, n_past: int, pools) -> None:
    q, k, v = make(hq, hkv, d, n, n_past, seed=hq * d + n + n_past)
    ref = attention_ref(q, k, v, n_past)
    out = attention(q, k, v, n_past)
    assert out.shape == (n, hq, d) and np.isfinite(out).all()
    assert nerr(out, ref) < 2e-6
    for pool in pools:  # heads split across threads, also across kv-head groups
        pooled = np.full_like(out, np.nan)
        attention(q, k, v, n_past, out=pooled, pool=pool)
        np.testing.assert_array_equal(pooled, out)


def test_single_key_returns_value() -> None:
    q, k, v = make(4, 2, 64, 1, 0)
    out = attention(q, k, v, 0)
    np.testing.assert_allclose(out[0], v[[0, 0, 1, 1], 0], rtol=1e-6)


def test_causal_mask_in_prefill() -> None:
    """Prefill row i equals a decode step at position n_past + i."""
    q, k, v = make(6, 2, 64, 33, 4)
    full = attention(q, k, v, 4)
    for i in (0, 1, 16, 32):
        one = attention(np.ascontiguousarray(q[i:i + 1]), k, v, 4 + i)
        np.testing.assert_allclose(one, full[i:i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (12, 2, 128), (9, 3, 64), (10, 2, 40), (6, 1, 24), (5, 5, 36)])
@pytest.mark.parametrize("f16", [False, True])
def test_a_row_has_the_same_bits_in_every_tile(hq, hkv, d, f16, pools) -> None:
    """Rows go in tiles of up to 4 (a prompt's tokens x a group's heads; a thread's share of the
    heads), with 16-, 8- and 1-wide parts of the head dimension (d = 40, 24, 36): every row has
    the bits of the one-token call at its position, on any split of the heads."""
    n, n_past = 9, 21
    q, k, v = make(hq, hkv, d, n, n_past, seed=d + hq)
    if f16:
        k = np.where(np.isnan(k), 0, k).astype(np.float16).view(np.uint16)  # (rows past the end: never read)
        v = np.where(np.isnan(v), 0, v).astype(np.float16).view(np.uint16)
    full = attention(q, k, v, n_past)
    for i in range(n):
        np.testing.assert_array_equal(attention(np.ascontiguousarray(q[i:i + 1]), k, v, n_past + i), full[i:i + 1])
    for pool in pools:
        np.testing.assert_array_equal(attention(q, k, v, n_past, pool=pool), full)
        np.testing.assert_array_equal(attention(np.ascontiguousarray(q[-1:]), k, v, n_past + n - 1, pool=pool),
                                      full[-1:])


def test_long_prefill_and_large_scores(pools) -> None:
    q, k, v = make(14, 2, 64, 200, 300, seed=3)
    q *= 30.0  # scores in the thousands: needs the max subtraction
    ref = attention_ref(q, k, v, 300)
    out = attention(q, k, v, 300)
    assert np.isfinite(out).all()
    assert nerr(out, ref) < 1e-5
    np.testing.assert_array_equal(attention(q, k, v, 300, pool=pools[0]), out)


def test_kv_write_then_attention() -> None:
    rng = np.random.default_rng(4)
    hkv, d, t_max = 2, 64, 40
    kc = np.zeros((hkv, t_max, d), np.float32)
    vc = np.zeros((hkv, t_max, d), np.float32)
    ks = rng.standard_normal((12, hkv, d)).astype(np.float32)
    vs = rng.standard_normal((12, hkv, d)).astype(np.float32)
    kv_write(kc, vc, ks[:9], vs[:9], 0)  # prefill 9
    kv_write(kc, vc, ks[9:], vs[9:], 9)  # then 3 more
    np.testing.assert_array_equal(kc[:, :12], ks.transpose(1, 0, 2))
    np.testing.assert_array_equal(vc[:, :12], vs.transpose(1, 0, 2))
    assert not kc[:, 12:].any()
    q = rng.standard_normal((3, 8, d)).astype(np.float32)
    assert nerr(attention(q, kc, vc, 9), attention_ref(q, kc, vc, 9)) < 2e-6
    with pytest.raises(ValueError):
        kv_write(kc, vc, ks, vs, 30)


def test_attention_rejects_bad_input() -> None:
    q, k, v = make(14, 2, 64, 2, 3)
    with pytest.raises(ValueError):
        attention(q, k, v[:1].copy(), 3)  # k and v caches differ
    with pytest.raises(ValueError):
        attention(np.ones((2, 5, 64), np.float32), k, v, 3)  # 5 heads over 2 kv heads
    with pytest.raises(ValueError):
        attention(q, k, v, k.shape[1])  # past the end of the cache
    with pytest.raises(TypeError):
        attention(q.astype(np.float64), k, v, 3)
    with pytest.raises(ValueError):
        attention(q, k, v, 3, out=np.empty((2, 14, 32), np.float32))


@pytest.mark.parametrize("n,n_past", [(1, 999), (17, 5)])
def test_attention_on_thread_pool_table(n, n_past):
    """The flashlm ThreadPool runs attention as a nogil table task; same result as one thread."""
    from flashlm.runtime.threadpool import ThreadPool

    rng = np.random.default_rng(3)
    hq, hkv, d, tmax = 14, 2, 64, 1024
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    k = rng.standard_normal((hkv, tmax, d)).astype(np.float32)
    v = rng.standard_normal((hkv, tmax, d)).astype(np.float32)
    ref = attention(q, k, v, n_past)
    with ThreadPool(2) as pool:
        got = attention(q, k, v, n_past, pool=pool)
    # The same kernel compiled inside the executor and split at head 7 (row tiles of 4 fall
    # differently): no reassociation anywhere, so bit for bit.
    np.testing.assert_array_equal(got, ref)


@pytest.fixture(scope="module")
def flash_pool():
    from flashlm.runtime.threadpool import ThreadPool

    with ThreadPool(2) as p:
        yield p


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (12, 2, 128), (9, 3, 64), (4, 2, 36)])
@pytest.mark.parametrize("n,n_past", [(2, 0), (9, 5), (17, 300)])
def test_rows_of_a_multi_token_call_equal_one_token_calls(hq, hkv, d, n, n_past, pools, flash_pool) -> None:
    """Row i of n new tokens (a draft verification) equals the one-token call at position
    n_past + i bit for bit, in this thread, on a pool (heads split) and as a table task."""
    q, k, v = make(hq, hkv, d, n, n_past, seed=n + d)
    full = attention(q, k, v, n_past)
    for p in (None, pools[1], flash_pool):
        np.testing.assert_array_equal(attention(q, k, v, n_past, pool=p), full)
        for i in range(n):
            one = attention(np.ascontiguousarray(q[i:i + 1]), k, v, n_past + i, pool=p)
            np.testing.assert_array_equal(one, full[i:i + 1], err_msg=f"token {i} pool {p}")


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (12, 2, 128), (9, 3, 64), (4, 2, 16)])
@pytest.mark.parametrize("nb", [1, 2, 8])
def test_attention_batch_equals_each_sequence_alone(hq, hkv, d, nb, pools, flash_pool) -> None:
    """B sequences, one new token each, different cache lengths and sizes, in one dispatch:
    row b equals the sequence's own one-token attention bit for bit, and the reference."""
    rng = np.random.default_rng(nb * d + hq)
    n_past = [int(p) for p in rng.integers(0, 700, nb)]
    q = rng.standard_normal((nb, hq, d)).astype(np.float32)
    ks, vs = [], []
    for p in n_past:
        _, k, v = make(hq, hkv, d, 1, p, seed=p, t_max=p + 1 + int(rng.integers(0, 9)))
        ks.append(k)
        vs.append(v)
    alone = np.concatenate([attention(np.ascontiguousarray(q[b:b + 1]), ks[b], vs[b], n_past[b]) for b in range(nb)])
    for b in range(nb):
        assert nerr(alone[b:b + 1], attention_ref(q[b:b + 1], ks[b], vs[b], n_past[b])) < 2e-6
    for p in (None, pools[0], pools[1], flash_pool):
        out = attention_batch(q, ks, vs, n_past, pool=p)
        np.testing.assert_array_equal(out, alone, err_msg=f"pool {p}")


def test_attention_batch_rejects_bad_input() -> None:
    q, k, v = make(14, 2, 64, 2, 3)
    with pytest.raises(ValueError):
        attention_batch(q, [k], [v], [3])  # 2 queries, 1 cache
    with pytest.raises(ValueError):
        attention_batch(q, [k, k], [v, v[:1].copy()], [3, 3])  # k and v caches differ
    with pytest.raises(ValueError):
        attention_batch(q, [k, k], [v, v], [3, k.shape[1]])  # past the end of a cache
    with pytest.raises(ValueError):
        attention_batch(q, [k, k[:, :, :32].copy()], [v, v[:, :, :32].copy()], [3, 3])  # head_dim


def test_kv_write_batch_equals_kv_write_of_each() -> None:
    rng = np.random.default_rng(9)
    hkv, d = 2, 64
    caches = [(rng.standard_normal((hkv, t, d)).astype(np.float32), rng.standard_normal((hkv, t, d)).astype(np.float32))
              for t in (5, 40, 17)]
    expect = [(k.copy(), v.copy()) for k, v in caches]
    pos = [4, 0, 9]
    k = rng.standard_normal((3, hkv, d)).astype(np.float32)
    v = rng.standard_normal((3, hkv, d)).astype(np.float32)
    for b, (kc, vc) in enumerate(expect):
        kv_write(kc, vc, k[b:b + 1], v[b:b + 1], pos[b])
    kv_write_batch([c[0] for c in caches], [c[1] for c in caches], k, v, pos)
    for (kc, vc), (ke, ve) in zip(caches, expect):
        np.testing.assert_array_equal(kc, ke)
        np.testing.assert_array_equal(vc, ve)
    with pytest.raises(ValueError):
        kv_write_batch([c[0] for c in caches], [c[1] for c in caches], k, v, [5, 0, 9])  # past a cache


def test_attention_tasks_compile_per_cache_type() -> None:
    # pool=None runs the same C-callable task as the pool's table, one per (kind, cache dtype)
    from flashlm.kernels import executor

    q = np.ones((1, 4, 16), np.float32)
    k = np.zeros((2, 4, 16), np.uint16)
    attention(q, k, k, 0)
    assert (executor.ATTENTION, True) in executor._attention_compiled
    assert executor.attention_address(executor.ATTENTION, True) == executor.attention_address(executor.ATTENTION, True)
    assert executor.attention_address(executor.ATTENTION, True) != executor.attention_address(executor.ATTENTION,
                                                                                              False)

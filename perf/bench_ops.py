"""Speed of the non-matmul kernels (flashlm/kernels/ops.py) against numpy in the same run.

Attention decode at T = 256 / 1024 / 4096 and prefill of 512 tokens (14 query heads,
2 kv heads, head_dim 64: Qwen2.5-0.5B), on 1 thread and on 2 threads through a pool,
next to a numpy/BLAS formulation of the same math; rmsnorm, rope, silu_mul.

  python perf/bench_ops.py [--trials 20]        # prints a table
  python -m pytest perf/bench_ops.py            # pytest-benchmark
"""
from __future__ import annotations

import argparse
import math
import queue
import threading
import time

import numpy as np
import pytest

from flashlm.kernels import ops

HQ, HKV, D = 14, 2, 64
DECODE_T = [256, 1024, 4096]
PREFILL_N = 512


class _Pool:
    """Persistent worker threads with the pool interface run(fn, n, *args)."""

    def __init__(self, n_threads: int) -> None:
        self.n = n_threads
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n_threads - 1):
            threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            fn, args, done = self.jobs.get()
            fn(*args)
            done.release()

    def run(self, fn, n: int, *args) -> None:
        b = [n * i // self.n for i in range(self.n + 1)]
        done = threading.Semaphore(0)
        for i in range(1, self.n):
            self.jobs.put((fn, (*args, b[i], b[i + 1]), done))
        fn(*args, b[0], b[1])  # the caller takes the first share
        for _ in range(1, self.n):
            done.acquire()


def make_pool(n_threads: int):
    try:
        from flashlm.runtime.threadpool import ThreadPool  # the project's pool, once it exists
        return ThreadPool(n_threads)
    except Exception:  # noqa: BLE001 - not there yet: use the local one
        return _Pool(n_threads)


def attention_numpy(q, k, v, n_past):
    """The same math with BLAS matmuls per query head (numpy's OpenBLAS threads)."""
    n, hq, d = q.shape
    t = n_past + n
    grp = hq // k.shape[0]
    out = np.empty_like(q)
    mask = None
    if n > 1:
        mask = np.where(np.arange(t)[None, :] > n_past + np.arange(n)[:, None], -np.inf, 0)
        mask = mask.astype(np.float32)
    for h in range(hq):
        s = (q[:, h] @ k[h // grp, :t].T) * np.float32(1 / math.sqrt(d))
        if mask is not None:
            s += mask
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(-1, keepdims=True)
        out[:, h] = s @ v[h // grp, :t]
    return out


def rmsnorm_numpy(x, w, eps):
    return x * (1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)) * w


def attn_inputs(n: int, n_past: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t_max = n_past + n
    q = rng.standard_normal((n, HQ, D), dtype=np.float32)
    k = rng.standard_normal((HKV, t_max, D), dtype=np.float32)
    v = rng.standard_normal((HKV, t_max, D), dtype=np.float32)
    return q, k, v, np.empty_like(q)


def cases(pool2):
    """(name, fn, work) with work = (flop, bytes read) for the derived columns."""
    out = []
    for t in DECODE_T:
        q, k, v, o = attn_inputs(1, t - 1)
        fl, by = 4 * HQ * D * t, 2 * HKV * t * D * 4
        out += [(f"attn decode T={t} 1 thread", lambda q=q, k=k, v=v, o=o, t=t: ops.attention(q, k, v, t - 1, o), (fl, by)),
                (f"attn decode T={t} 2 threads", lambda q=q, k=k, v=v, o=o, t=t: ops.attention(q, k, v, t - 1, o, pool=pool2), (fl, by)),
                (f"attn decode T={t} numpy", lambda q=q, k=k, v=v, t=t: attention_numpy(q, k, v, t - 1), (fl, by))]
    q, k, v, o = attn_inputs(PREFILL_N, 0)
    n = PREFILL_N
    fl, by = 4 * HQ * D * n * (n + 1) / 2, 0  # compute-bound: no GB/s column
    out += [(f"attn prefill n={n} 1 thread", lambda: ops.attention(q, k, v, 0, o), (fl, by)),
            (f"attn prefill n={n} 2 threads", lambda: ops.attention(q, k, v, 0, o, pool=pool2), (fl, by)),
            (f"attn prefill n={n} numpy", lambda: attention_numpy(q, k, v, 0), (fl, by))]
    rng = np.random.default_rng(1)
    for rows in (1, PREFILL_N):
        x = rng.standard_normal((rows, 896), dtype=np.float32)
        w = rng.standard_normal(896, dtype=np.float32)
        y = np.empty_like(x)
        by = 2 * x.nbytes
        out += [(f"rmsnorm ({rows}, 896)", lambda x=x, w=w, y=y: ops.rmsnorm(x, w, 1e-6, y), (0, by)),
                (f"rmsnorm ({rows}, 896) numpy", lambda x=x, w=w: rmsnorm_numpy(x, w, 1e-6), (0, by))]
        qr = rng.standard_normal((rows, HQ, D), dtype=np.float32)
        pos = np.arange(1000, 1000 + rows)
        out += [(f"rope ({rows}, {HQ}, {D}) neox", lambda qr=qr, pos=pos: ops.rope(qr, pos, 1e6, "neox"), (0, 2 * qr.nbytes))]
        g = rng.standard_normal((rows, 4864), dtype=np.float32)
        u = rng.standard_normal((rows, 4864), dtype=np.float32)
        go = np.empty_like(g)
        out += [(f"silu_mul ({rows}, 4864)", lambda g=g, u=u, go=go: ops.silu_mul(g, u, go), (0, 3 * g.nbytes)),
                (f"silu_mul ({rows}, 4864) numpy", lambda g=g, u=u: g / (1 + np.exp(-g)) * u, (0, 3 * g.nbytes))]
    return out


def timeit(fn, trials: int) -> float:
    fn()  # compile / warm up
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


# ---- pytest-benchmark ----

_POOL = None
_CASES = None


def _case(name):
    global _POOL, _CASES
    if _CASES is None:
        _POOL = make_pool(2)
        _CASES = {c[0]: c[1] for c in cases(_POOL)}
    return _CASES[name]


_NAMES = [c[0] for c in cases(None)]


@pytest.mark.parametrize("name", _NAMES)
def test_ops(benchmark, name):
    fn = _case(name)
    fn()
    benchmark(fn)


# ---- script ----

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    pool2 = make_pool(2)
    print(f"{'case':36s} {'ms':>9s} {'GFLOP/s':>8s} {'GB/s':>7s}")
    for name, fn, (fl, by) in cases(pool2):
        t = timeit(fn, args.trials if "prefill" not in name else max(3, args.trials // 4))
        gf = f"{fl / t / 1e9:8.1f}" if fl else " " * 8
        gb = f"{by / t / 1e9:7.1f}" if by else ""
        print(f"{name:36s} {t * 1e3:9.4f} {gf} {gb}")


if __name__ == "__main__":
    main()

"""GEMV / GEMM throughput of the K-quant kernels (flashlm/kernels/gemv_kquant.py).

Prints GB/s of weight bytes at 1 and 2 threads for the real model shapes, next to the
machine's read bandwidth (numpy sum over 256 MB, 1 and 2 threads) and numpy f32 ``W @ x``
on the dequantized matrix, all measured in the same run.

  python perf/bench_kquant.py [--impl simd|plain] [--trials 15] [--mb 128] [--gemm]
  OPENBLAS_NUM_THREADS=1 python perf/bench_kquant.py --incache
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from flashlm.kernels.gemv_kquant import BLOCK_BYTES, IMPLS

SHAPES = [("Q4_K", 8960, 1536), ("Q4_K", 1536, 8960), ("Q6_K", 1536, 8960), ("Q5_K", 1536, 8960),
          ("Q6_K", 896, 4864)]


def random_weight(fmt: str, rows: int, cols: int, rng) -> np.ndarray:
    nb, bb = cols // 256, BLOCK_BYTES[fmt]
    w = rng.integers(0, 256, (rows, nb, bb), dtype=np.uint8)
    d = (rng.standard_normal((rows, nb, 2)) * 1e-3).astype(np.float16).view(np.uint8)
    if fmt == "Q6_K":
        w[..., 208:210] = d[..., 0:2]
    else:
        w[..., 0:4] = d
    return w.reshape(rows, nb * bb)


def run_threads(fn, n_threads: int) -> None:
    """Call fn(t, n_threads) on n_threads Python threads (kernels are nogil)."""
    if n_threads == 1:
        fn(0, 1)
        return
    ts = [threading.Thread(target=fn, args=(t, n_threads)) for t in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def best_time(fn, trials: int) -> float:
    """Shortest of ``trials`` timed calls after a warm-up (the machine is shared: the
    minimum is the least disturbed run)."""
    fn()
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts))


def read_bandwidth(trials: int) -> dict[int, float]:
    buf = np.ones(256 << 20 >> 2, np.float32)
    res = {}
    for nt in (1, 2):
        parts = np.array_split(buf, nt)
        t = best_time(lambda: run_threads(lambda i, n: parts[i].sum(), nt), trials)
        res[nt] = buf.nbytes / t / 1e9
    return res


def incache(trials: int) -> None:
    """One thread, weights in L2 (~250 KB), CPU time of the calling thread: the compute
    ceiling per core, little disturbed by other processes on a shared machine."""
    rng = np.random.default_rng(0)
    rows, cols = 128, 2048
    x = rng.standard_normal(cols).astype(np.float32)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    out = np.zeros(rows, np.float32)

    def cpu_time(fn, reps):
        fn()
        best = 1e9
        for _ in range(trials):
            t0 = time.thread_time()
            for _ in range(reps):
                fn()
            best = min(best, (time.thread_time() - t0) / reps)
        return best

    t_np = cpu_time(lambda: W[:, :1024] @ x[:1024], 300)  # 512 KB f32 (set OPENBLAS_NUM_THREADS=1)
    print(f"in-cache, 1 thread: numpy f32 W @ x {rows * 1024 / t_np / 1e9:.1f} G weights/s")
    for fmt in ("Q4_K", "Q5_K", "Q6_K"):
        w = random_weight(fmt, rows, cols, rng)
        for impl in IMPLS:
            t = cpu_time(lambda: IMPLS[impl][fmt][0](w, x, out, 0, rows), 300 if impl == "simd" else 20)
            nblk = rows * cols // 256
            print(f"  {fmt} {impl:5}: {t / nblk * 1e9:6.1f} ns/block  {w.nbytes / t / 1e9:5.1f} GB/s  "
                  f"{rows * cols / t / 1e9:5.1f} G weights/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="simd", choices=list(IMPLS))
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--mb", type=int, default=128, help="weights streamed per timed call (> L3)")
    ap.add_argument("--gemm", action="store_true", help="also time GEMM at n=8 (2 threads)")
    ap.add_argument("--incache", action="store_true", help="only the in-L2 one-thread ceiling")
    args = ap.parse_args()
    if args.incache:
        incache(args.trials)
        return
    rng = np.random.default_rng(0)
    bw = read_bandwidth(args.trials)
    print(f"read bandwidth (numpy sum, 256 MB): 1 thread {bw[1]:.1f} GB/s, 2 threads {bw[2]:.1f} GB/s")
    print(f"GEMV, {args.impl}; every timed call streams >= {args.mb} MB (copies of the matrix), "
          "so the weights come from DRAM as in decode")
    print(f"{'format':6} {'rows x cols':>12} {'MB':>5} | {'1 thr GB/s':>10} {'2 thr GB/s':>10} "
          f"{'% bw(2)':>7} | {'np f32 GB/s(w)':>14} {'speedup':>7}")
    for fmt, rows, cols in SHAPES:
        gemv, gemm, deq = IMPLS[args.impl][fmt]
        w0 = random_weight(fmt, rows, cols, rng)
        ws = [w0.copy() for _ in range(max(2, -(-args.mb * 2**20 // w0.nbytes)))]
        nbytes = sum(w.nbytes for w in ws)
        x = rng.standard_normal(cols).astype(np.float32)
        out = np.zeros(rows, np.float32)

        def part(t, n):
            r0, r1 = rows * t // n, rows * (t + 1) // n
            for w in ws:
                gemv(w, x, out, r0, r1)

        gbs = {nt: nbytes / best_time(lambda: run_threads(part, nt), args.trials) / 1e9 for nt in (1, 2)}
        Ws = []
        for _ in range(max(2, -(-args.mb * 2**20 // (rows * cols * 4)))):
            Ws.append(np.empty((rows, cols), np.float32))
            deq(w0, Ws[-1], 0, rows)
        t_np = best_time(lambda: [W @ x for W in Ws], args.trials) / len(Ws)  # numpy's own threads
        t_k = w0.nbytes / gbs[2] / 1e9
        print(f"{fmt:6} {rows:>5}x{cols:<6} {w0.nbytes / 1e6:5.1f} | {gbs[1]:10.1f} {gbs[2]:10.1f} "
              f"{100 * gbs[2] / bw[2]:6.0f}% | {w0.nbytes / t_np / 1e9:14.1f} {t_np / t_k:6.1f}x")
        if args.gemm:
            X = rng.standard_normal((8, cols)).astype(np.float32)
            O = np.zeros((8, rows), np.float32)

            def gpart(t, n):
                for w in ws:
                    gemm(w, X, O, rows * t // n, rows * (t + 1) // n)

            tg = best_time(lambda: run_threads(gpart, 2), max(3, args.trials // 4)) / len(ws)
            tb = best_time(lambda: [X @ W.T for W in Ws], max(3, args.trials // 4)) / len(Ws)
            print(f"    gemm n=8, 2 threads: {w0.nbytes / tg / 1e9:.1f} GB/s of weights, "
                  f"{tg / (8 * t_k):.2f} x the time of 8 GEMVs, {tg / tb:.2f} x numpy f32 X @ W.T")
        del ws, Ws


if __name__ == "__main__":
    main()

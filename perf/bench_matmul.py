"""Matmul benchmark: GB/s of weight bytes per format and shape, against memory bandwidth
and numpy f32 ``X @ W.T`` on the dequantized matrix, measured in the same run.

    python perf/bench_matmul.py                    # full table (a few minutes)
    python perf/bench_matmul.py --quick            # big shapes, GEMV only
    python perf/bench_matmul.py --extra            # + pool overhead, pool vs prange, GEMM vs BLAS
    python perf/bench_matmul.py --smalln           # n = 1, 2, 4, 8, 16, 32 rows on the 1.5B's shapes
    python perf/bench_matmul.py --smalln --formats Q4_KR,Q6_KR --shapes 8960x1536,1536x8960
    python perf/bench_matmul.py --paths            # integer path vs exact kernels, n = 1 .. 32
    python perf/bench_matmul.py --exact ...        # the tables on the exact float32 kernels
    pytest perf/bench_matmul.py --benchmark-only   # pytest-benchmark, a subset

Q5_0R is Q5_0 as a store keeps it (kernels/repacked.py: imported GGUF Q5_0 tensors are
rewritten into it), 70 bytes per 96 weights against Q5_0's 66; the Gw/s column (weights
per second) compares the two by time.

Columns: GB/s = weight bytes / time (median); Gw/s = weights / time; bw = read
bandwidth (a Numba read kernel over 256 MB on the same threads), measured in ROUNDS rounds
alternating with the kernel's timing, median; %bw = the median over the rounds of the
round's GB/s / the round's bw (so a drift of the shared machine's bandwidth during a row
moves both); %pk = GB/s / the highest bandwidth pass of the whole run (the machine's peak);
L3 = GB/s of the same GEMV on one copy of a matrix that fits in L3 (``-`` for those that do
not): when GB/s from memory is about the L3 figure, the kernel is compute-bound, not
memory-bound; x np = numpy f32 time / our time. Each call reads its weights from memory,
not from L3: the timing cycles through copies of the matrix that together exceed 128 MB
(``dram_copies``), as a decode step meets each matrix once per token. After the table:
the spread of every bandwidth pass of the run (this VM's 2-thread read bandwidth moves
between ~25 and ~47 GB/s over seconds to minutes).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numba
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))

from _blocks import random_weights, valid_cols  # noqa: E402

from flashlm.kernels import matmul as mm  # noqa: E402
from flashlm.kernels import simd  # noqa: E402
from flashlm.kernels.formats import QTensor  # noqa: E402
from flashlm.runtime.threadpool import ThreadPool  # noqa: E402

FMTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_0R", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q6_KR", "Q4_KR",
        "Q4_1R", "Q8_0S", "Q4_0S", "Q5_1S", "Q5_KS")
SHAPES = ((896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896),
          (1536, 8960), (8960, 1536), (576, 1536), (1536, 1536))
# (151936, 1536): the 1.5B's output head, only for formats that cannot have 896-wide rows (K-quants)
BIG = ((151936, 896), (151936, 1536), (8960, 1536), (1536, 8960))
BATCHES = (1, 8, 64)


# ---- helpers ----


@numba.njit(nogil=True, cache=True, fastmath=True)
def _read_kernel(a, out, r0, r1):  # a (rows, 4096) float32: sum rows [r0, r1)
    s = np.float32(0.0)
    for r in range(r0, r1):
        for j in range(a.shape[1]):
            s += a[r, j]
    out[r0] = s


@numba.njit(nogil=True, cache=True, parallel=True)
def _gemv_q8_0_prange(w, x, out):  # same kernel as gemv_q8_0_simd, rows split by prange
    nb = x.shape[0] // 32
    rb = w.strides[0]
    for r in numba.prange(w.shape[0]):
        out[r] = simd.dot_q8_0(w, r * rb, x, 0, x, nb)


def timeit(fn, min_time: float = 0.25, min_runs: int = 5) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return float(np.median(times))


@functools.cache
def _bw_buffer() -> np.ndarray:
    """256 MB of float32 (larger than L3), allocated once per process."""
    return np.ones((256 << 20) // 4, np.float32).reshape(-1, 4096)


def bandwidth(pool, runs: int = 6, stat=min) -> float:
    """GB/s reading a 256 MB float32 buffer with ``pool``'s threads (``stat`` of ``runs``
    passes after a warm-up pass)."""
    a = _bw_buffer()
    out = np.zeros(a.shape[0], np.float32)
    pool.run(_read_kernel, a.shape[0], a, out)
    t = stat([_t(lambda: pool.run(_read_kernel, a.shape[0], a, out)) for _ in range(runs)])
    return a.nbytes / t / 1e9


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dram_copies(qt: QTensor, min_bytes: int = 128 << 20) -> list[QTensor]:
    """``qt`` and enough copies of it that together they exceed L3 4x over (128 MB): a
    benchmark that cycles through them reads the weights from memory, as a decode step
    does (28 layers of other weights pass through the cache between two uses of one
    matrix). Timing one 8 MB matrix over and over would read it from L3."""
    n = max(1, -(-min_bytes // max(qt.nbytes, 1)))
    return [qt] + [QTensor(qt.data.copy(), qt.fmt, qt.shape) for _ in range(n - 1)]


def cycling(fn, items):
    """A no-argument callable that calls ``fn(item)`` on the next item of ``items`` each time."""
    state = [0]

    def call():
        item = items[state[0] % len(items)]
        state[0] += 1
        return fn(item)

    return call


def make_weight(fmt: str, rows: int, cols: int, seed: int = 0) -> QTensor:
    w = random_weights(fmt, rows, cols, np.random.default_rng(seed), extreme=False)
    return QTensor(w, fmt, (rows, cols))


# ---- tables ----


ROUNDS = 9  # bandwidth probe / kernel timing pairs per row
PROBES: list[float] = []  # every bandwidth pass of the run's table, GB/s
L3_MAX = 16 << 20  # matrices up to this size also get a timing from cache


def paired(pool, fn, nbytes: int, rounds: int = ROUNDS) -> tuple[float, float, float]:
    """(median seconds per call, median bandwidth GB/s, median of the rounds' GB/s / bw):
    ``rounds`` rounds of one bandwidth pass then ~60 ms of calls to ``fn``, so that each
    ratio compares the kernel with the bandwidth of the same moment."""
    ts, bws = [], []
    for _ in range(rounds):
        bws.append(bandwidth(pool, 1))
        PROBES.append(bws[-1])
        ts.append(timeit(fn, 0.06, 5))
    ratios = [nbytes / t / 1e9 / b for t, b in zip(ts, bws)]
    return float(np.median(ts)), float(np.median(bws)), float(np.median(ratios))


def main_table(pool, fmts, shapes, batches, rounds: int = ROUNDS) -> None:
    """One row per format, shape and batch. ``bw`` and %bw come from :func:`paired`:
    on a shared VM the bandwidth itself drifts by 15-50 % within a run, and a probe taken
    once before the row (as this script did before) was often 20-40 % off the kernel's
    moment.

    numpy runs after all of our measurements: OpenBLAS keeps its threads spinning for up
    to ~0.2 s after a call; the read bandwidth measured right after one numpy matvec was
    19-27 GB/s against 28-32 just before (no drop with OPENBLAS_THREAD_TIMEOUT=4), which
    would charge BLAS's spinning to whichever kernel came next."""
    weights: dict[tuple, QTensor] = {}  # made once, used by every batch and by numpy
    results: dict[tuple, list] = {}
    for n in batches:  # GEMV first: the GEMM path may call BLAS itself
        for rows, cols in shapes:
            for fmt in fmts:
                if fmt not in mm.KERNELS or not valid_cols(fmt, cols):
                    continue
                if (rows, cols) == (151936, 1536) and valid_cols(fmt, 896):
                    continue  # has the (151936, 896) vocab row already
                key = (fmt, rows, cols)
                if key not in weights:
                    weights[key] = make_weight(fmt, rows, cols)
                qt = weights[key]
                X = np.random.default_rng(1).standard_normal((n, cols)).astype(np.float32)
                x = X[0] if n == 1 else X
                out = np.empty((rows,) if n == 1 else (n, rows), np.float32)
                t, bw, frac = paired(pool, cycling(lambda w: mm.matmul(x, w, out, pool=pool), dram_copies(qt)),
                                     qt.nbytes, rounds)
                t_l3 = timeit(lambda: mm.matmul(x, qt, out, pool=pool), 0.1, 5) if qt.nbytes <= L3_MAX else None
                results.setdefault(key, []).append((n, x, t, bw, frac, t_l3))
                print(f"  measured {fmt} {rows}x{cols} n={n}", end="\r", file=sys.stderr, flush=True)
    peak = max(PROBES)
    print(f"\n{'fmt':5s} {'shape':>12s} {'n':>3s} {'ms':>8s} {'GB/s':>7s} {'Gw/s':>6s} {'bw':>5s} {'%bw':>5s} "
          f"{'%pk':>4s} {'L3':>6s} {'x np':>6s}")
    for (fmt, rows, cols), rows_measured in results.items():
        qt = weights.pop((fmt, rows, cols))
        Wfs = dram_copies(QTensor(mm.dequantize(qt), "F32", qt.shape))
        for n, x, t, bw, frac, t_l3 in rows_measured:
            t_np = timeit(cycling(lambda W: x @ W.data.T, Wfs))
            gbs = qt.nbytes / t / 1e9
            gws = rows * cols / t / 1e9
            l3 = f"{qt.nbytes / t_l3 / 1e9:6.2f}" if t_l3 else f"{'-':>6s}"
            print(f"{fmt:5s} {rows:>6d}x{cols:<5d} {n:>3d} {t * 1e3:8.3f} {gbs:7.2f} {gws:6.2f} {bw:5.1f} "
                  f"{100 * frac:5.0f} {100 * gbs / peak:4.0f} {l3} {t_np / t:6.2f}", flush=True)
        del Wfs
    p10, p50, p90 = np.percentile(PROBES, [10, 50, 90])
    print(f"bandwidth passes of this table ({len(PROBES)}): 10/50/90 % {p10:.1f} / {p50:.1f} / {p90:.1f} GB/s, "
          f"peak {peak:.1f}")


def pool_overhead(pool) -> None:
    a = np.zeros((pool.n_threads, 4096), np.float32)
    out = np.zeros(pool.n_threads, np.float32)
    _read_kernel(a, out, 0, 1)
    t_pool = timeit(lambda: pool.run(_read_kernel, 0 + pool.n_threads, a[:, :1], out), 0.3, 200)
    t_direct = timeit(lambda: _read_kernel(a[:, :1], out, 0, pool.n_threads), 0.3, 200)
    print(f"\npool.run overhead ({pool.n_threads} threads, near-empty kernel): "
          f"{t_pool * 1e6:.1f} us per call (direct call {t_direct * 1e6:.1f} us)")


def pool_vs_prange(pool) -> None:
    numba.set_num_threads(pool.n_threads)
    print(f"\nQ8_0 GEMV, {pool.n_threads} threads: pool vs numba prange "
          f"(threading layer {numba.config.THREADING_LAYER})")
    for rows, cols in BIG + ((896, 896), (4864, 896)):
        qt = make_weight("Q8_0", rows, cols)
        x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
        out = np.empty(rows, np.float32)
        gemv = mm.KERNELS["Q8_0"][0]
        t_pool = timeit(lambda: pool.run(gemv, rows, qt.data, x, out))
        t_pr = timeit(lambda: _gemv_q8_0_prange(qt.data, x, out))
        print(f"  {rows:>6d}x{cols:<5d} pool {qt.nbytes / t_pool / 1e9:6.2f} GB/s ({t_pool * 1e6:8.1f} us)"
              f"   prange {qt.nbytes / t_pr / 1e9:6.2f} GB/s ({t_pr * 1e6:8.1f} us)")


def gemm_vs_blas(pool, fmts, shapes=((4864, 896), (8960, 1536), (1536, 8960)),
                 ns=(8, 16, 24, 32, 48, 64, 96, 128), rounds: int = 3) -> None:
    """The small-n kernels against dequantize-tile + BLAS, ms (weights from memory; * = faster;
    median of ``rounds`` interleaved rounds): where BLAS_MIN_ROWS[fmt] should be."""
    print(f"\nsmall-n kernels vs dequantize-tile + BLAS, ms, {pool.n_threads} threads (* = faster)")
    saved = dict(mm.BLAS_MIN_ROWS)
    try:
        for fmt in fmts:
            for rows, cols in shapes:
                if fmt not in mm.KERNELS or not valid_cols(fmt, cols):
                    continue
                copies = dram_copies(make_weight(fmt, rows, cols))
                cells = []
                for n in ns:
                    X = np.random.default_rng(1).standard_normal((n, cols)).astype(np.float32)
                    f = cycling(lambda w: mm.matmul(X, w, pool=pool), copies)
                    tg, tb = [], []
                    for _ in range(rounds):
                        mm.BLAS_MIN_ROWS[fmt] = 10**9
                        tg.append(timeit(f, 0.05, 2))
                        mm.BLAS_MIN_ROWS[fmt] = 1
                        tb.append(timeit(f, 0.05, 2))
                    t_g, t_b = float(np.median(tg)), float(np.median(tb))
                    cells.append(f"n={n}: {t_g * 1e3:.2f}{'*' if t_g < t_b else ''}/{t_b * 1e3:.2f}"
                                 f"{'*' if t_b <= t_g else ''}")
                print(f"  {fmt:5s} {rows}x{cols}  " + "  ".join(cells), flush=True)
                del copies
    finally:
        mm.BLAS_MIN_ROWS.update(saved)


SMALLN_SHAPES = ((8960, 1536), (1536, 8960), (151936, 1536))  # the 1.5B's ffn_gate/up, ffn_down, head
SMALLN_NS = (1, 2, 4, 8, 16, 32)


def sgemm_peak(reps: int = 5) -> float:
    """GFLOP/s of numpy's f32 GEMM (OpenBLAS, its own threads) on 2048 x 2048 x 2048, best of ``reps``:
    the rate of f32 multiply-adds this machine sustains, to bound any f32 product by."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    a @ a
    return 2 * 2048**3 / min(_t(lambda: a @ a) for _ in range(reps)) / 1e9


def smalln_table(pool, fmts, shapes, ns, rounds: int) -> None:
    """matmul of n activation rows (the small-n kernels for 2 <= n < BLAS_MIN_ROWS) per format and
    shape, weights from memory: ms per call, ms per row, and the ratios t(n) / t(1) and
    t(n) / (n t(1)) (the cost against n separate GEMVs). The n of one format and shape are timed
    in interleaved rounds (median), so the ratios compare moments alike on a shared machine.
    ``floor``: 2 n rows cols / the f32 GEMM peak of this machine (:func:`sgemm_peak`), the least
    time any f32 product of n rows takes here, as a multiple of t(1)."""
    if hasattr(pool, "park"):
        pool.park()
    peak = sgemm_peak()
    print(f"\nsmall n: matmul(X (n, cols), W), {pool.n_threads} threads, weights from memory, median of {rounds} "
          f"rounds; BLAS from n >= BLAS_MIN_ROWS; f32 GEMM peak (numpy, 2048^3) {peak:.0f} GFLOP/s")
    print(f"{'fmt':6s} {'shape':>12s} {'n':>3s} {'ms':>8s} {'ms/row':>7s} {'x n=1':>6s} {'/ n*GEMV':>8s} {'floor':>6s}")
    for rows, cols in shapes:
        for fmt in fmts:
            if fmt not in mm.KERNELS or not valid_cols(fmt, cols):
                continue
            copies = dram_copies(make_weight(fmt, rows, cols))
            X = np.random.default_rng(1).standard_normal((max(ns), cols)).astype(np.float32)
            calls = {n: cycling(lambda w, x=(X[0] if n == 1 else X[:n]): mm.matmul(x, w, pool=pool), copies)
                     for n in ns}
            ts: dict[int, list[float]] = {n: [] for n in ns}
            for f in calls.values():
                f()
            for _ in range(rounds):
                for n, f in calls.items():
                    ts[n].append(timeit(f, 0.03, 2))
            med = {n: float(np.median(v)) for n, v in ts.items()}
            for n in ns:
                t = med[n]
                floor = 2 * n * rows * cols / (peak * 1e9) / med[ns[0]]
                print(f"{fmt:6s} {rows:>6d}x{cols:<5d} {n:>3d} {t * 1e3:8.3f} {t / n * 1e3:7.3f} {t / med[ns[0]]:6.2f} "
                      f"{t / (n * med[ns[0]]):8.2f} {floor:6.2f}", flush=True)
            del copies


def paths_table(pool, fmts, shapes, ns, rounds: int) -> None:
    """The integer path (kernels/intpath.py) against the exact float32 kernels, per format with
    integer kernels, shape and n (weights from memory, both paths timed in interleaved rounds,
    median): ms of each, exact / integer, and the integer GEMV's GB/s of weights against the
    bandwidth of the same run."""
    if hasattr(pool, "park"):
        pool.park()
    bw = bandwidth(pool)
    print(f"\ninteger path vs exact: matmul(X (n, cols), W), {pool.n_threads} threads, weights from memory, "
          f"median of {rounds} rounds; read bandwidth {bw:.1f} GB/s")
    print(f"{'fmt':6s} {'shape':>12s} {'n':>3s} {'exact ms':>9s} {'int ms':>8s} {'speedup':>8s} {'int GB/s':>9s} {'%bw':>5s}")
    for rows, cols in shapes:
        for fmt in fmts:
            if fmt not in mm.INT_KERNELS or not valid_cols(fmt, cols):
                continue
            copies = dram_copies(make_weight(fmt, rows, cols))
            X = np.random.default_rng(1).standard_normal((max(ns), cols)).astype(np.float32)
            for n in ns:
                call = cycling(lambda w, x=(X[0] if n == 1 else X[:n]): mm.matmul(x, w, pool=pool), copies)
                ts = {True: [], False: []}
                for _ in range(rounds):
                    for exact in (True, False):
                        mm.set_exact(exact)
                        call()
                        ts[exact].append(timeit(call, 0.03, 2))
                mm.set_exact(False)
                te, ti = float(np.median(ts[True])), float(np.median(ts[False]))
                gbs = copies[0].nbytes / ti / 1e9
                print(f"{fmt:6s} {rows:>6d}x{cols:<5d} {n:>3d} {te * 1e3:9.3f} {ti * 1e3:8.3f} {te / ti:7.2f}x "
                      f"{gbs:9.1f} {100 * gbs / bw:4.0f}%", flush=True)
            del copies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default=",".join(FMTS))
    ap.add_argument("--quick", action="store_true", help="big shapes, GEMV only")
    ap.add_argument("--extra", action="store_true", help="pool overhead, pool vs prange, GEMM vs BLAS")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--smalln", action="store_true", help="n = 1, 2, 4, 8, 16, 32 per format (implies --no-table)")
    ap.add_argument("--shapes", default="", help="ROWSxCOLS,... for --smalln (default: the 1.5B's shapes)")
    ap.add_argument("--ns", default=",".join(map(str, SMALLN_NS)), help="row counts for --smalln")
    ap.add_argument("--crossover", action="store_true", help="only the small-n vs tile + BLAS table")
    ap.add_argument("--paths", action="store_true",
                    help="only the integer path vs the exact kernels (formats with integer kernels; --shapes, --ns)")
    ap.add_argument("--exact", action="store_true", help="run the other tables on the exact float32 kernels")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="bandwidth / kernel pairs per row (default %(default)s)")
    args = ap.parse_args()
    fmts = [f for f in args.formats.split(",") if f]
    print(f"numba {numba.__version__}, SIMD kernels: {simd.HAVE_SIMD}, threads: {args.threads}, "
          f"formats with kernels: {', '.join(f for f in FMTS if f in mm.KERNELS)}")
    with ThreadPool(args.threads) as pool, ThreadPool(1) as one:
        bw1, bw = bandwidth(one), bandwidth(pool)
        print(f"memory bandwidth (read 256 MB, best of 6): 1 thread {bw1:.1f} GB/s, {args.threads} threads {bw:.1f} GB/s")
        mm.set_exact(args.exact)
        if args.crossover:
            gemm_vs_blas(pool, fmts)
            return
        if args.paths:
            shapes = [tuple(map(int, x.split("x"))) for x in args.shapes.split(",") if x] or SMALLN_SHAPES
            paths_table(pool, fmts, shapes, [int(n) for n in args.ns.split(",")], args.rounds)
            return
        if args.smalln:
            shapes = [tuple(map(int, x.split("x"))) for x in args.shapes.split(",") if x] or SMALLN_SHAPES
            smalln_table(pool, fmts, shapes, [int(n) for n in args.ns.split(",")], args.rounds)
        elif not args.no_table:
            main_table(pool, fmts, BIG if args.quick else SHAPES, (1,) if args.quick else BATCHES, args.rounds)
        if args.extra:
            pool_overhead(pool)
            pool_vs_prange(pool)
            gemm_vs_blas(pool, fmts)


# ---- pytest-benchmark ----

try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:
    _CASES = [(f, s) for f in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_0R", "Q5_1", "F16", "Q4_K", "Q6_K")
              for s in ((4864, 896), (8960, 1536), (151936, 896)) if valid_cols(f, s[1])]

    @pytest.fixture(scope="module")
    def pool():
        with ThreadPool(2) as p:
            yield p

    @pytest.mark.parametrize("n", BATCHES)
    @pytest.mark.parametrize("fmt,shape", _CASES, ids=[f"{f}-{s[0]}x{s[1]}" for f, s in _CASES])
    def test_matmul(benchmark, pool, fmt, shape, n) -> None:
        if fmt not in mm.KERNELS:
            pytest.skip(f"no {fmt} kernels")
        if n == 64 and shape[0] > 100000:
            pytest.skip("batch 64 on the vocab shape is slow; see the script table")
        qt = make_weight(fmt, *shape)
        X = np.random.default_rng(1).standard_normal((n, shape[1])).astype(np.float32)
        x = X[0] if n == 1 else X
        mm.matmul(x, qt, pool=pool)
        benchmark(cycling(lambda w: mm.matmul(x, w, pool=pool), dram_copies(qt)))  # weights from memory
        if benchmark.stats:  # None under --benchmark-disable
            benchmark.extra_info["GB/s"] = qt.nbytes / benchmark.stats.stats.median / 1e9

    def test_bandwidth(benchmark, pool) -> None:
        a = _bw_buffer()
        out = np.zeros(a.shape[0], np.float32)
        benchmark(pool.run, _read_kernel, a.shape[0], a, out)
        if benchmark.stats:
            benchmark.extra_info["GB/s"] = a.nbytes / benchmark.stats.stats.median / 1e9


if __name__ == "__main__":
    main()

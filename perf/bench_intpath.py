"""The integer path (kernels/intpath.py) against the exact f32 kernels, in one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python perf/bench_intpath.py \
        --formats Q4_1R,Q8_0S --shapes 1536x576,576x1536,49152x576,4864x896,151936x896

One thread (the row-range kernels called directly on all rows). Per format and shape the
GEMV and the small-n product at each n are timed in interleaved rounds (exact, integer,
exact, ...) and the medians compared: prints ms per call and the int / exact time ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))

from _blocks import random_weights  # noqa: E402

from flashlm.kernels import intpath  # noqa: E402
from flashlm.kernels.matmul import KERNELS  # noqa: E402


def _median_pair(fa, fb, reps: int, budget: float) -> tuple[float, float]:
    ta, tb = [], []
    t_end = time.perf_counter() + budget
    for i in range(reps):
        for f, ts in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > t_end:
            break
    return float(np.median(ta)), float(np.median(tb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="Q4_1R,Q8_0S")
    ap.add_argument("--shapes", default="1536x576,576x1536,49152x576,4864x896,151936x896")
    ap.add_argument("--ns", default="1,2,4,8,16,32,64", help="activation rows (1: the GEMV)")
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per (shape, n) at most, after 5 reps")
    args = ap.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            rows, cols = map(int, shape.split("x"))
            w = random_weights(fmt, rows, cols, np.random.default_rng(0), extreme=False)
            X = np.random.default_rng(1).standard_normal((max(ns), cols)).astype(np.float32)
            ex, it = KERNELS[fmt], intpath.INT_KERNELS[fmt]
            cells = []
            for n in ns:
                out = np.empty((n, rows), np.float32)
                if n == 1:
                    fa = lambda: ex[0](w, X[0], out[0], 0, rows)  # noqa: E731
                    fb = lambda: it[0](w, X[0], out[0], 0, rows)  # noqa: E731
                else:
                    Xn = np.ascontiguousarray(X[:n])
                    fa = lambda: ex[1](w, Xn, out, 0, rows)  # noqa: E731
                    fb = lambda: it[1](w, Xn, out, 0, rows)  # noqa: E731
                fa(), fb()  # compile
                ta, tb = _median_pair(fa, fb, args.reps, args.budget)
                cells.append(f"n={n}: {ta * 1e3:.3g}/{tb * 1e3:.3g} ms {tb / ta:.2f}")
                print(f"{fmt} {shape} n={n:<3d} exact {ta * 1e3:9.3f} ms  int {tb * 1e3:9.3f} ms  "
                      f"int/exact {tb / ta:5.2f}   ({rows * cols * n / tb / 1e9:.2f} G weight-rows/s int)",
                      flush=True)


if __name__ == "__main__":
    main()

"""Would a column-tiled store layout help long rows? GEMV of one (rows, cols) matrix against
the same product done as k separate, contiguous (rows, cols / k) column slabs, summed.
(This measurement led to the column slabs of Q4_KR/Q6_KR, ``formats.SLABBED``; their own
kernels are compared with GGUF's by ``bench_simd_variants.py --formats Q4_KR``. Pass
formats without slabs, e.g. Q8_0, or shapes of one slab, to see the effect by itself.)

    python perf/bench_col_tiles.py --formats Q8_0,Q5_0R --shape 1536x8960

Long rows (1536x8960, the 1.5B's ffn_down) are the weak shape of every GEMV kernel: their
35-38 KB of activations per row do not stay in L1 next to the weight stream from memory.
A slab of 1/k of the columns needs 1/k of them; column tiles *inside* the row-major layout
were measured before (0.80-1.02x: the strided reads defeat the hardware prefetcher), so
here each slab is its own contiguous matrix, as a tiled store layout would keep it. All
variants run in one process, interleaved, at --threads (pool row ranges), weights read
from memory (copies that together exceed 128 MB). Prints G weights/s (best round) and
the ratio to the untiled matrix.
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

from flashlm.kernels.formats import block_size  # noqa: E402
from flashlm.kernels.matmul import KERNELS  # noqa: E402
from flashlm.runtime.threadpool import ThreadPool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="Q8_0,Q5_0R")
    ap.add_argument("--shape", default="1536x8960")
    ap.add_argument("--tiles", default="1,2,3,4", help="numbers of column slabs to compare")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows, cols = map(int, args.shape.split("x"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cols).astype(np.float32)
    with ThreadPool(args.threads) as pool:
        for fmt in args.formats.split(","):
            gemv = KERNELS[fmt][0]
            nb = cols // block_size(fmt)
            setups = {}
            for k in map(int, args.tiles.split(",")):
                cuts = [block_size(fmt) * (nb * i // k) for i in range(k + 1)]
                parts = list(zip(cuts[:-1], cuts[1:]))
                ws = [random_weights(fmt, rows, c1 - c0, rng, extreme=False) for c0, c1 in parts]
                ncopy = (128 << 20) // sum(w.nbytes for w in ws) + 1
                copies = [[w.copy() for w in ws] for _ in range(ncopy)]
                xs = [np.ascontiguousarray(x[c0:c1]) for c0, c1 in parts]
                setups[k] = (copies, xs, [np.empty(rows, np.float32) for _ in parts])
            best = dict.fromkeys(setups, np.inf)
            for _ in range(args.rounds):
                for k, (copies, xs, outs) in setups.items():
                    t0 = time.perf_counter()
                    for ws in copies:
                        for w, xk, o in zip(ws, xs, outs):
                            pool.run(gemv, rows, w, xk, o)
                        if k > 1:
                            np.add.reduce(outs, axis=0)
                    best[k] = min(best[k], (time.perf_counter() - t0) / len(copies))
            base = best[next(iter(best))]
            cells = "  ".join(f"{k} slab{'s' if k > 1 else ''} {rows * cols / t / 1e9:5.2f} ({base / t:4.2f}x)"
                              for k, t in best.items())
            print(f"{fmt:5s} {rows}x{cols} G weights/s at {args.threads} threads from memory: {cells}", flush=True)


if __name__ == "__main__":
    main()

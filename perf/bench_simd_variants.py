"""In-process A/B of the code paths simd.py can emit for the 32-weight block formats.

    python perf/bench_simd_variants.py                         # Q4_0,Q4_1 at 512x896
    python perf/bench_simd_variants.py --formats Q4_1 --shape 96x8960

    python perf/bench_simd_variants.py --formats Q4_K --shape 8960x1536 --threads 2
    python perf/bench_simd_variants.py --formats Q5_0R --shape 8960x1536 --threads 2 --dram
    python perf/bench_simd_variants.py --formats Q6_KR --shape 8960x1536 --threads 2 --dram

Every variant (``tests/kernels/_blocks.SIMD_VARIANTS``: the AVX2 widen + convert path,
the AVX-512 table lookup, Q4_0/Q4_1 four blocks at a time; for Q4_K ``gemv_kquant.Q4K_GEMV_PATHS``: widen + convert,
and the AVX-512 permuted-activation kernel; for a store layout such as Q5_0R the GGUF
format's kernel on the unpacked blocks against the store layout's) is compiled in this one process and timed
in interleaved rounds, by default on one thread on a matrix that fits in L2, so that
the figures compare code, not the machine's mood: on a shared VM two processes a minute
apart differ by 15-20 %, the same process by 2-3 %. Prints G weights/s (best round;
per core with one thread) and the ratio to the first variant.
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

from _blocks import SIMD_VARIANTS, cpu_runs_variant, random_weights, simd_gemv_variant, variant_applies  # noqa: E402

from flashlm.kernels import gemv_basic, gemv_kquant, repacked  # noqa: E402
from flashlm.runtime.threadpool import ThreadPool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="Q4_0,Q4_1")
    ap.add_argument("--shape", default="512x896", help="rows x cols (keep it inside L2)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="row ranges split over this many pool threads")
    ap.add_argument("--dram", action="store_true", help="read the weights from memory (cycle through copies > 128 MB)")
    args = ap.parse_args()
    rows, cols = map(int, args.shape.split("x"))
    variants = [v for v in SIMD_VARIANTS if cpu_runs_variant(SIMD_VARIANTS[v])]
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    with ThreadPool(args.threads) as pool:
        for fmt in args.formats.split(","):
            w = random_weights(fmt, rows, cols, np.random.default_rng(0), extreme=False)
            if fmt == "Q4_K":
                kernels = {v: (k, w) for v, k in gemv_kquant.Q4K_GEMV_PATHS.items()}
            elif fmt in repacked.GGUF_OF:  # the GGUF layout's kernel against the store layout's
                g = repacked.GGUF_OF[fmt]
                wg = repacked.unpack(fmt, w, (rows, cols))[1]
                ggml = gemv_basic.SIMD_KERNELS.get(g) or gemv_kquant.KQUANT_KERNELS[g]
                kernels = {g: (ggml[0], wg), fmt: (repacked.SIMD_KERNELS[fmt][0], w)}
            else:
                kernels = {v: (simd_gemv_variant(fmt, SIMD_VARIANTS[v]), w) for v in variants
                           if variant_applies(fmt, SIMD_VARIANTS[v])}
            # --dram: each kernel cycles through copies of its weight that exceed L3 4x over
            copies = {v: [a.copy() for _ in range(max(1, (128 << 20) // a.nbytes + 1))] if args.dram else [a] * 20
                      for v, (_, a) in kernels.items()}
            best = dict.fromkeys(kernels, np.inf)
            for _ in range(args.rounds):
                for v, (k, _) in kernels.items():
                    t0 = time.perf_counter()
                    for a in copies[v]:
                        pool.run(k, rows, a, x, out)
                    best[v] = min(best[v], (time.perf_counter() - t0) / len(copies[v]))
            base = best[next(iter(best))]
            cells = "  ".join(f"{v} {rows * cols / t / 1e9:5.2f} ({base / t:4.2f}x)" for v, t in best.items())
            unit = "per core" if args.threads == 1 else f"at {args.threads} threads"
            print(f"{fmt:5s} {rows}x{cols}  G weights/s {unit}{' from memory' if args.dram else ''}: {cells}",
                  flush=True)


if __name__ == "__main__":
    main()

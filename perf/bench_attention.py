"""Decode attention at depth: this checkout's kernel against another revision's, in one process.

One query token over T cached positions of an f16 cache, every layer of the real models'
shapes (a cache per layer, so the keys and values come from memory as in a decode step), on 1
thread and on 2 (the query heads split in halves, as the pool splits them), the two kernels
alternating round by round; medians.

    python perf/bench_attention.py --against 9946d3f~1     # the kernel before the register tiles
    python perf/bench_attention.py --depth 1024 --rounds 31

``--against REV`` loads ``flashlm/kernels/ops.py`` of that git revision as a module of its own
(it imports the rest of flashlm from this checkout). Run with
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE``, nothing else on the machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from flashlm.kernels import ops

# (name, query heads, kv heads, head_dim, layers) of the three real models
SHAPES = [("smollm2-135m", 9, 3, 64, 30), ("qwen2.5-coder-0.5b", 14, 2, 64, 24), ("qwen2.5-coder-1.5b", 12, 2, 128, 28)]


def load_revision(rev: str, tmp: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:flashlm/kernels/ops.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tmp, "ops_against.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("ops_against", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ops_against"] = mod
    spec.loader.exec_module(mod)
    return mod


def caches(hkv: int, d: int, layers: int, depth: int, rng):
    def one():
        return (0.5 * rng.standard_normal((hkv, depth + 40, d), np.float32)).astype(np.float16).view(np.uint16)
    return [one() for _ in range(layers)], [one() for _ in range(layers)]


def step(fn, q, ks, vs, depth, out, threads: int) -> float:
    """Seconds for one query token's attention over every layer."""
    hq = q.shape[1]

    def part(h0: int, h1: int) -> None:
        for k, v in zip(ks, vs):
            fn(q, k, v, depth, out, h0, h1)

    t0 = time.perf_counter()
    if threads == 1:
        part(0, hq)
    else:
        ts = [threading.Thread(target=part, args=(hq * i // threads, hq * (i + 1) // threads)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision whose kernels/ops.py to compare with")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        other = load_revision(args.against, tmp)
        kernels = {"this": ops._attention, args.against: other._attention}
        print(f"decode attention at depth {args.depth}, f16 cache, all layers, median of {args.rounds} rounds (ms)")
        print(f"{'model':<20} threads {'this':>8} {args.against:>12}  this / other")
        rng = np.random.default_rng(0)
        for name, hq, hkv, d, layers in SHAPES:
            ks, vs = caches(hkv, d, layers, args.depth, rng)
            q = rng.standard_normal((1, hq, d)).astype(np.float32)
            outs = {k: np.empty_like(q) for k in kernels}
            for k, fn in kernels.items():  # compile, and the two agree
                fn(q, ks[0], vs[0], args.depth, outs[k], 0, hq)
            a, b = outs.values()
            assert np.allclose(a, b, rtol=1e-5, atol=1e-6), np.abs(a - b).max()
            for threads in (1, 2):
                times = {k: [] for k in kernels}
                for _ in range(args.rounds):
                    for k, fn in kernels.items():
                        times[k].append(step(fn, q, ks, vs, args.depth, outs[k], threads))
                m = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
                this, that = m["this"], m[args.against]
                print(f"{name:<20} {threads:>7} {this:>8.2f} {that:>12.2f}  {this / that:.2f}")


if __name__ == "__main__":
    main()

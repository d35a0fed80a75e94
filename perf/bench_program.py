"""Decode with the blocks as one program (kernels.program) against block by block, in one process.

The two modes alternate, ``--rounds`` rounds of ``-n`` decode steps each after a prompt of
``-p`` tokens (a fresh cache per round), and the medians and best rounds are printed with their
ratio: the VM's speed drifts by +-15 % between runs, so only a ratio measured side by side says
what the program changes. llama.cpp is not run here (perf/bench_decode.py runs it).

Run:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python perf/bench_program.py
    python perf/bench_program.py --models smollm2-135m --rounds 12 -n 32
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def bench(name: str, threads: int, prompt: int, steps: int, rounds: int) -> dict:
    import flashlm

    llm = flashlm.load(name, threads=threads, ctx=prompt + steps + 8)
    model = llm.model
    ids = np.arange(1, prompt + 1) % model.config.vocab_size
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds + 1):
        for programs in (True, False):
            model.use_programs = programs
            cache = model.make_cache(prompt + steps + 8, kv=llm.kv)
            tok = int(np.argmax(model.forward(ids, None, cache)))
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = int(np.argmax(model.forward(np.array([tok]), None, cache)))
            if r:  # round 0 warms both up
                times[programs].append((time.perf_counter() - t0) / steps * 1e3)
    model.use_programs = True
    med = {k: float(np.median(v)) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {"model": name, "program_ms": med[True], "blocks_ms": med[False], "best_program_ms": best[True],
            "best_blocks_ms": best[False], "speedup_median": med[False] / med[True],
            "speedup_best": best[False] / best[True]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=64)
    ap.add_argument("-n", "--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args(argv)
    print("model | program ms/token (median, best) | blocks ms/token (median, best) | speed-up median / best")
    for name in a.models:
        r = bench(name, a.threads, a.prompt_tokens, a.gen_tokens, a.rounds)
        print(f"{r['model']} | {r['program_ms']:.2f}, {r['best_program_ms']:.2f} | {r['blocks_ms']:.2f}, "
              f"{r['best_blocks_ms']:.2f} | {r['speedup_median']:.2f}x / {r['speedup_best']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

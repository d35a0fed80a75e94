"""End-to-end decode and prefill speed of the real models, with ratios measured in the same run.

Peers, each measured on the same model file, same thread count, same machine, same run:
  * flashlm's plain-numpy forward (f32 dequantized weights, numpy matmul): the baseline
    the Numba kernels must beat by >= 10x in decode;
  * llama.cpp through llama-cpp-python, when it is installed (`pip install -e .[compare]`,
    builds from source in ~10 minutes).

Decode is measured after a short prompt (``-p``) and again at a depth of ``--depth`` cached
positions (default 4096: a long chat or a code file in context), where attention over the
KV cache is a large part of a token; both engines prefill the same tokens first.

Run:
    python perf/bench_decode.py                       # all three models, 2 threads
    python perf/bench_decode.py --models qwen2.5-coder-0.5b -p 512 -n 64 --threads 2
    python -m pytest perf/bench_decode.py --benchmark-only    # pytest-benchmark form
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def _ids(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(100, 30000, n)


def flashlm_speed(name: str, *, threads: int, prompt_tokens: int, gen_tokens: int, depth: int = 0,
                  repeats: int = 2, exact: bool = False) -> dict:
    import flashlm
    from flashlm.cli_run import bench_model

    with flashlm.load(name, threads=threads, ctx=max(prompt_tokens, depth) + gen_tokens + 16, exact=exact) as llm:
        out = bench_model(llm, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats)
        if depth:
            model, step = llm.model, llm.engine.prefill_rows
            cache = model.make_cache(depth + gen_tokens + 1, kv=llm.kv)  # the user's default (f16), as decode above
            ids = _ids(depth)
            for a in range(0, depth, step):
                logits = model.forward(ids[a:a + step], None, cache)
            tok = int(np.argmax(logits))
            t0 = time.perf_counter()
            for _ in range(gen_tokens):
                tok = int(np.argmax(model.forward(np.array([tok]), None, cache)))
            out["depth"], out["decode_depth_tok_s"] = depth, round(gen_tokens / (time.perf_counter() - t0), 2)
        return out


def numpy_speed(name: str, *, gen_tokens: int, prompt_tokens: int) -> dict:
    """Decode/prefill tok/s of the same model code on NumpyBackend (f32 dequantized weights)."""
    import flashlm
    from flashlm.cli_run import bench_model

    with flashlm.load(name, threads=1, backend="numpy", ctx=prompt_tokens + gen_tokens + 16) as llm:
        return bench_model(llm, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=1)


def llama_cpp_speed(name: str, *, threads: int, prompt_tokens: int, gen_tokens: int, depth: int = 0,
                    repeats: int = 2) -> dict | None:
    """llama.cpp's prefill and decode tok/s, best of ``repeats`` as flashlm_speed's (bench_model);
    decode at ``depth`` once, as flashlm's."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from flashlm.models.pull import gguf_path

    llm = Llama(model_path=str(gguf_path(name)), n_threads=threads, n_threads_batch=threads,
                n_ctx=max(prompt_tokens, depth) + gen_tokens + 16, n_batch=max(prompt_tokens, 512), verbose=False, logits_all=False)
    ids = [int(t) for t in _ids(prompt_tokens)]
    llm.eval(ids[:8])

    def last_argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def decode() -> float:
        tok = last_argmax()
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([tok])
            tok = last_argmax()
        return time.perf_counter() - t0

    pf = dec = float("inf")
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        pf = min(pf, time.perf_counter() - t0)
        dec = min(dec, decode())
    out = {"prefill_tok_s": prompt_tokens / pf, "decode_tok_s": gen_tokens / dec}
    if depth:
        llm.reset()
        llm.eval([int(t) for t in _ids(depth)])
        out["decode_depth_tok_s"] = gen_tokens / decode()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4096, help="cached positions for the second decode figure (0: skip)")
    ap.add_argument("--repeats", type=int, default=2, help="prefill and decode: best of this many, both engines")
    ap.add_argument("--no-numpy", action="store_true", help="skip the plain-numpy baseline")
    ap.add_argument("--exact-too", action="store_true",
                    help="also flashlm on the exact float32 kernels (--exact), in the same run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        r = flashlm_speed(name, threads=args.threads, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                          depth=args.depth, repeats=args.repeats)
        row = {"model": name, **r}
        if args.exact_too:
            e = flashlm_speed(name, threads=args.threads, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                              depth=args.depth, repeats=args.repeats, exact=True)
            row["exact_path"] = {k: e[k] for k in ("prefill_tok_s", "decode_tok_s", "decode_depth_tok_s") if k in e}
        if not args.no_numpy:
            npy = numpy_speed(name, gen_tokens=min(args.gen_tokens, 16), prompt_tokens=min(args.prompt_tokens, 64))
            row["numpy_decode_tok_s"] = npy["decode_tok_s"]
            row["decode_vs_numpy"] = r["decode_tok_s"] / npy["decode_tok_s"]
        lc = llama_cpp_speed(name, threads=args.threads, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                             depth=args.depth, repeats=args.repeats)
        if lc:
            if args.depth:
                row["llama_cpp_decode_depth_tok_s"] = lc["decode_depth_tok_s"]
                row["decode_depth_vs_llama_cpp"] = r["decode_depth_tok_s"] / lc["decode_depth_tok_s"]
            row["llama_cpp_decode_tok_s"] = lc["decode_tok_s"]
            row["llama_cpp_prefill_tok_s"] = lc["prefill_tok_s"]
            row["decode_vs_llama_cpp"] = r["decode_tok_s"] / lc["decode_tok_s"]
            row["prefill_vs_llama_cpp"] = r["prefill_tok_s"] / lc["prefill_tok_s"]
        rows.append(row)
        print(json.dumps(row) if args.json else _fmt(row), flush=True)
    return 0


def _fmt(r: dict) -> str:
    s = (f"{r['model']:<20} threads {r['threads']}  prefill {r['prompt_tokens']}: {r['prefill_tok_s']:7.1f} tok/s  "
         f"decode: {r['decode_tok_s']:6.1f} tok/s ({r['decode_weight_GB_s']:.1f} GB/s of weights)  "
         f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    if "decode_vs_numpy" in r:
        s += f"\n{'':<20} numpy f32 forward decode {r['numpy_decode_tok_s']:.2f} tok/s -> {r['decode_vs_numpy']:.1f}x"
    if "decode_depth_tok_s" in r:
        s += f"\n{'':<20} decode at depth {r['depth']}: {r['decode_depth_tok_s']:.1f} tok/s"
    if isinstance(r.get("exact_path"), dict):
        e = r["exact_path"]
        s += (f"\n{'':<20} exact path (--exact): prefill {e['prefill_tok_s']:.1f}, decode {e['decode_tok_s']:.1f}"
              + (f", at depth {e['decode_depth_tok_s']:.1f}" if "decode_depth_tok_s" in e else "") + " tok/s")
    if "decode_vs_llama_cpp" in r:
        s += (f"\n{'':<20} llama.cpp decode {r['llama_cpp_decode_tok_s']:.1f} tok/s -> {r['decode_vs_llama_cpp']:.2f}x, "
              f"prefill {r['llama_cpp_prefill_tok_s']:.1f} tok/s -> {r['prefill_vs_llama_cpp']:.2f}x")
        if "decode_depth_vs_llama_cpp" in r:
            s += (f"\n{'':<20} llama.cpp decode at depth {r['depth']} {r['llama_cpp_decode_depth_tok_s']:.1f} tok/s "
                  f"-> {r['decode_depth_vs_llama_cpp']:.2f}x")
    else:
        s += f"\n{'':<20} llama.cpp: llama-cpp-python not installed (pip install -e .[compare])"
    return s


# ---- pytest-benchmark form ----

def test_decode_qwen05(benchmark):
    import flashlm

    with flashlm.load("qwen2.5-coder-0.5b", threads=2, ctx=256) as llm:
        cache = llm.model.make_cache(256, kv=llm.kv)
        llm.model.forward(np.arange(8), None, cache)

        def step():
            if cache.offset >= 250:
                cache.trim(cache.offset - 8)
            llm.model.forward(np.array([42]), None, cache)

        benchmark(step)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

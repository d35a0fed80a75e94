"""Plain-numpy forward: the baseline decode speed that flashlm's kernels are compared with.

Weights are dequantized once to float32 (gguf's reference dequantizers) and every
linear layer is a BLAS ``x @ W.T``: what someone would write with numpy alone.

    python perf/numpy_forward.py ~/.cache/flashlm/gguf/smollm2-135m-instruct-q4_1.gguf -n 32

From another script (perf/bench_decode.py):

    from numpy_forward import numpy_decode_tok_s
    tok_s = numpy_decode_tok_s(path_or_store, 32)
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashlm.models import build_model  # noqa: E402
from flashlm.runtime.backend import NumpyBackend  # noqa: E402


def set_blas_threads(n: int) -> bool:
    """Set numpy's OpenBLAS thread count at run time (ctypes); False when not found.

    OpenBLAS threads spin while they wait: on a busy 2-core machine 2 BLAS threads
    can decode several times slower than 1, so the baseline should be timed at a
    stated thread count.
    """
    import ctypes
    import glob

    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in glob.glob(str(libdir / "*openblas*")):
        so = ctypes.CDLL(lib)
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(so, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


def open_weights(src):
    """(config, weights) of a .gguf path, a store directory, or an open Store."""
    if hasattr(src, "config") and hasattr(src, "layer"):
        return src.config, src
    if str(src).endswith(".gguf"):
        from flashlm.models.weights import gguf_weights

        return gguf_weights(src)
    from flashlm.offload.store import Store

    store = Store(src)
    return store.config, store


def numpy_bench(src, n_tokens: int = 32, *, prompt_len: int = 16, trials: int = 1, seed: int = 0,
                blas_threads: int | None = None) -> dict:
    """Time prefill and greedy decode with NumpyBackend.

    Args:
        src: a .gguf file, a store directory or a Store.
        n_tokens: decode steps timed per trial.
        prompt_len: prompt tokens (random ids) prefilled before decoding.
        trials: decode runs; the best is reported.
        seed: for the prompt ids.
        blas_threads: OpenBLAS threads to time with (None: numpy's default).

    Returns:
        dict with decode_tok_s, prefill_tok_s, f32_weight_bytes (read per decoded
        token: every layer plus the head), gb_s, dequantize_s, peak_rss_mb.
    """
    if blas_threads is not None:
        set_blas_threads(blas_threads)
    config, weights = open_weights(src)
    backend = NumpyBackend()
    model = build_model(config, weights, backend)
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, prompt_len)

    t = time.perf_counter()
    model.forward(ids[:2], None, model.make_cache(4))  # dequantizes every weight (untimed)
    dequant_s = time.perf_counter() - t

    cache = model.make_cache(prompt_len + n_tokens + 1)
    t = time.perf_counter()
    logits = model.forward(ids, None, cache)
    prefill_s = time.perf_counter() - t
    best = float("inf")
    for _ in range(trials):
        cache.trim(cache.offset - prompt_len)
        tok = int(logits.argmax())
        t = time.perf_counter()
        for _ in range(n_tokens):
            tok = int(model.forward(np.array([tok]), None, cache).argmax())
        best = min(best, time.perf_counter() - t)
    # float32 bytes read per decode step: every layer tensor and the head (the
    # embedding lookup reads one row)
    head = weights.tensor("output.weight" if weights.has("output.weight") else "token_embd.weight")
    tensors = [t for i in range(config.num_hidden_layers) for t in weights.layer(i).values()] + [head]
    f32_bytes = 4 * sum(int(np.prod(t.shape)) for t in tensors)
    tok_s = n_tokens / best
    return {
        "decode_tok_s": tok_s,
        "prefill_tok_s": prompt_len / prefill_s,
        "f32_weight_bytes": f32_bytes,
        "gb_s": f32_bytes * tok_s / 1e9,
        "dequantize_s": dequant_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def numpy_decode_tok_s(src, n_tokens: int = 32, *, blas_threads: int | None = None) -> float:
    """Decode tokens per second of the plain-numpy forward on ``src`` (.gguf, store dir or Store)."""
    return numpy_bench(src, n_tokens, blas_threads=blas_threads)["decode_tok_s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help=".gguf file or store directory")
    p.add_argument("-n", type=int, default=32, help="decode steps to time")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="OpenBLAS threads (default: numpy's)")
    a = p.parse_args(argv)
    r = numpy_bench(os.path.expanduser(a.model), a.n, prompt_len=a.prompt, trials=a.trials, blas_threads=a.threads)
    print(
        f"numpy f32 forward ({a.threads or 'default'} BLAS threads): decode {r['decode_tok_s']:.2f} tok/s, "
        f"prefill {r['prefill_tok_s']:.1f} tok/s, "
        f"{r['f32_weight_bytes'] / 1e9:.2f} GB f32 weights/token -> {r['gb_s']:.1f} GB/s, "
        f"dequantize {r['dequantize_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()

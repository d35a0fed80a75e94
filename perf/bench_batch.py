"""Batched decode: total tok/s of ``model.forward_batch`` on B one-token sequences, and a draft
verification pass, beside llama.cpp's batched decode in the same run.

    python perf/bench_batch.py                                   # qwen2.5-coder-0.5b, B = 1 2 4 8 16
    python perf/bench_batch.py --models qwen2.5-coder-1.5b --batches 1 8 --steps 8
    python perf/bench_batch.py --verify 9                        # + a forward of 9 tokens on a cache

Every sequence has ``--past`` cached positions (16, as in the issue) before the timed steps.
A step feeds each of B sequences its next token (random ids) and takes B rows of logits; the
figure is B * steps / time (median of ``--rounds`` rounds; rounds of all batch sizes are
interleaved so that a drift of the shared machine moves every column alike). ``x B=1`` is the
ratio to B = 1 of the same run.

``--verify K`` also times a forward of K tokens on one sequence's cache with all positions'
logits (the verification of K - 1 draft tokens) against one single-token step, same rounds.

llama.cpp: llama-cpp-python's low-level API (``llama_decode`` on a batch of B tokens with B
sequence ids, one KV cache holding all of them), on the model's GGUF file, same threads; the
column is skipped when ``llama_cpp`` does not import.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = ["qwen2.5-coder-0.5b"]


# ---- flashlm ----


class FlashBatch:
    """A model on the kernel backend, B caches with ``past`` positions each, timed steps."""

    def __init__(self, name: str, threads: int, max_batch: int, past: int, steps: int, rounds: int) -> None:
        from flashlm.models import build_model
        from flashlm.models.registry import store_path
        from flashlm.offload.store import Store
        from flashlm.runtime.backend import KernelBackend
        from flashlm.runtime.kvcache import DEFAULT_KV
        from flashlm.runtime.threadpool import ThreadPool

        self.store = Store(store_path(name))
        self.pool = ThreadPool(threads) if threads > 1 else None
        self.model = build_model(self.store.config, self.store, KernelBackend(self.pool))
        self.past, self.steps = past, steps
        self.ctx = past + steps * (rounds + 2) + 32
        self.rng = np.random.default_rng(0)
        self.vocab = min(self.store.config.vocab_size, 30000)
        self.caches = []
        for _ in range(max_batch):
            c = self.model.make_cache(self.ctx, kv=DEFAULT_KV)  # a user's default (f16), as llama.cpp's
            self.model.forward(self.rng.integers(100, self.vocab, past), None, c)
            self.caches.append(c)

    def _trim(self, b: int) -> None:
        for c in self.caches[:b]:  # back to `past` positions, so every round sees the same lengths
            c.trim(c.offset - self.past)

    def step_batch(self, b: int) -> float:
        """Seconds for ``steps`` steps of B sequences."""
        self._trim(b)
        toks = self.rng.integers(100, self.vocab, (self.steps, b))
        t0 = time.perf_counter()
        for s in range(self.steps):
            if b == 1:
                self.model.forward(toks[s, :1], None, self.caches[0])
            else:
                self.model.forward_batch([(toks[s, j:j + 1], None, self.caches[j]) for j in range(b)])
        return time.perf_counter() - t0

    def verify(self, k: int) -> float:
        """Seconds for one forward of k tokens with all logits (a verification pass)."""
        self._trim(1)
        toks = self.rng.integers(100, self.vocab, k)
        t0 = time.perf_counter()
        self.model.forward(toks, None, self.caches[0], all_logits=True)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.store.close()


# ---- llama.cpp ----


class LlamaBatch:
    """llama.cpp through llama-cpp-python's low-level bindings: one context with up to
    ``max_batch`` sequences (unified KV cache), ``past`` positions each, timed batched steps."""

    def __init__(self, gguf: str, threads: int, max_batch: int, past: int, steps: int, rounds: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp calls it
        lc.llama_log_set(self._quiet, None)
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        load = getattr(lc, "llama_model_load_from_file", None) or lc.llama_load_model_from_file
        self.model = load(gguf.encode(), mp)
        cp = lc.llama_context_default_params()
        self.past, self.steps = past, steps
        per_seq = past + steps * (rounds + 2) + 32
        cp.n_ctx = per_seq * max_batch
        cp.n_batch = max(512, past * max_batch)
        cp.n_ubatch = cp.n_batch
        cp.n_seq_max = max_batch
        cp.n_threads = cp.n_threads_batch = threads
        init = getattr(lc, "llama_init_from_model", None) or lc.llama_new_context_with_model
        self.ctx = init(self.model, cp)
        vocab = lc.llama_model_get_vocab(self.model) if hasattr(lc, "llama_model_get_vocab") else None
        n_vocab = lc.llama_vocab_n_tokens(vocab) if vocab is not None else lc.llama_n_vocab(self.model)
        self.vocab = min(int(n_vocab), 30000)
        self.batch = lc.llama_batch_init(cp.n_batch, 0, max_batch)
        self.rng = np.random.default_rng(0)
        self.pos = [0] * max_batch
        toks = self.rng.integers(100, self.vocab, (max_batch, past))
        self._decode([(j, int(t), p) for j in range(max_batch) for p, t in enumerate(toks[j])])
        self.pos = [past] * max_batch

    def _decode(self, items) -> None:
        """items: (sequence, token, position); logits for every item."""
        b = self.batch
        for i, (s, t, p) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, 1
            b.seq_id[i][0] = s
        b.n_tokens = len(items)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _trim(self, nb: int) -> None:
        mem = getattr(self.lc, "llama_get_memory", None)
        for s in range(nb):  # drop the positions after `past`
            if mem is not None:
                self.lc.llama_memory_seq_rm(mem(self.ctx), s, self.past, -1)
            else:
                self.lc.llama_kv_self_seq_rm(self.ctx, s, self.past, -1)
            self.pos[s] = self.past

    def step_batch(self, nb: int) -> float:
        self._trim(nb)
        toks = self.rng.integers(100, self.vocab, (self.steps, nb))
        t0 = time.perf_counter()
        for st in range(self.steps):
            self._decode([(s, int(toks[st, s]), self.pos[s] + st) for s in range(nb)])
            self.lc.llama_get_logits(self.ctx)
        dt = time.perf_counter() - t0
        return dt

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        free = getattr(self.lc, "llama_model_free", None) or self.lc.llama_free_model
        free(self.model)


def _llama(name: str, threads: int, max_batch: int, past: int, steps: int, rounds: int):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from flashlm.models.pull import gguf_path

    return LlamaBatch(str(gguf_path(name)), threads, max_batch, past, steps, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=16, help="cached positions per sequence")
    ap.add_argument("--steps", type=int, default=8, help="steps per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--verify", type=int, default=0, help="also time a forward of this many tokens")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    import numba

    print(f"numba {numba.__version__}, {args.threads} threads, {args.past} cached positions per sequence, "
          f"{args.steps} steps per round, median of {args.rounds} rounds")
    for name in args.models:
        fl = FlashBatch(name, args.threads, max(args.batches), args.past, args.steps, args.rounds)
        lc = None if args.no_llama else _llama(name, args.threads, max(args.batches), args.past, args.steps,
                                              args.rounds)
        times: dict[tuple, list[float]] = {}
        for b in args.batches:  # warm-up: compile every path once
            fl.step_batch(b)
            if lc is not None:
                lc.step_batch(b)
        if args.verify:
            fl.verify(args.verify)
        for _ in range(args.rounds):
            for b in args.batches:
                times.setdefault(("flashlm", b), []).append(fl.step_batch(b))
                if lc is not None:
                    times.setdefault(("llama.cpp", b), []).append(lc.step_batch(b))
            if args.verify:
                times.setdefault(("verify", args.verify), []).append(fl.verify(args.verify))
                times.setdefault(("step", 1), []).append(fl.step_batch(1) / args.steps)
        print(f"\n{name}: forward_batch of B one-token sequences, total tok/s")
        head = f"{'B':>4s} {'flashlm':>9s} {'x B=1':>6s}"
        if lc is not None:
            head += f" {'llama.cpp':>10s} {'x B=1':>6s} {'flashlm / llama.cpp':>20s}"
        print(head)
        med = {k: float(np.median(v)) for k, v in times.items()}
        for b in args.batches:
            tps = b * args.steps / med[("flashlm", b)]
            row = f"{b:>4d} {tps:9.1f} {tps * med[('flashlm', args.batches[0])] / (args.batches[0] * args.steps):6.2f}"
            if lc is not None:
                ltps = b * args.steps / med[("llama.cpp", b)]
                l1 = args.batches[0] * args.steps / med[("llama.cpp", args.batches[0])]
                row += f" {ltps:10.1f} {ltps / l1:6.2f} {tps / ltps:20.2f}"
            print(row, flush=True)
        if lc is None and not args.no_llama:
            print("llama.cpp: llama-cpp-python does not import here; column skipped")
        if args.verify:
            v, s = med[("verify", args.verify)], med[("step", 1)]
            print(f"verify: forward of {args.verify} tokens (all logits) {v * 1e3:.1f} ms, one decode step "
                  f"{s * 1e3:.1f} ms: {v / s:.2f}x")
        fl.close()
        if lc is not None:
            lc.close()


if __name__ == "__main__":
    main()

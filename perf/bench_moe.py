"""Decode and prefill speed of a Qwen3-MoE model in RAM, beside llama.cpp in the same run.

The model is the synthetic GGUF of ``perf/make_synthetic_gguf.py`` (written first if missing;
random valid Q4_K/Q6_K blocks, so the tokens are noise but the work is a real model's).
flashlm imports it once into a store (experts as per-expert tensors) and runs it from
the page cache (every page touched before timing); llama.cpp (llama-cpp-python, when
it imports) runs the same GGUF with the same thread count. The two alternate for
``--repeats`` rounds and the best round of each counts: the machine is shared, so
the ratio is the figure to read.

Expert bytes per token = top-k experts x (gate + up + down) per MoE layer, plus the
dense tensors of every layer and the output head.

Run:
    python perf/bench_moe.py                               # default synthetic model, 2 threads
    python perf/bench_moe.py --gguf m.gguf -p 128 -n 32 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def touch(store) -> None:
    """Fault every page of every store file in (the weights are in RAM before timing)."""
    for fname in store.files:
        if fname.endswith(".bin"):
            mm = store._map(fname)
            int(mm[::4096].sum())


def bytes_per_token(store) -> tuple[int, int]:
    """(weight bytes read per decoded token, of which experts)."""
    cfg = store.config
    dense = expert = 0
    for i in range(cfg.num_hidden_layers):
        dense += sum(t.nbytes for t in store.layer(i).values())
        if cfg.is_moe_layer(i):
            per = sum(store.tensor_info[f"blk.{i}.expert.0.{m}"]["nbytes"]
                      for m in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))
            expert += cfg.num_experts_per_tok * per
    head = store.tensor_info.get("output.weight") or store.tensor_info["token_embd.weight"]
    return dense + expert + head["nbytes"], expert


class Flashlm:
    def __init__(self, gguf: Path, threads: int, ctx: int):
        import flashlm

        self.llm = flashlm.load(str(gguf), threads=threads, ctx=ctx, progress=True)
        self.model = self.llm.model
        touch(self.llm.store)

    def prefill(self, ids: np.ndarray):
        self.cache = self.model.make_cache(len(ids) + 512)
        return self.model.forward(ids, None, self.cache)

    def step(self, tok: int):
        return self.model.forward(np.array([tok]), None, self.cache)


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, ctx: int, n_batch: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=ctx,
                         n_batch=n_batch, verbose=False)

    def _logits(self):
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def prefill(self, ids: np.ndarray):
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return self._logits()

    def step(self, tok: int):
        self.llm.eval([tok])
        return self._logits()


def run(engine, ids: np.ndarray, gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one round, greedy."""
    t0 = time.perf_counter()
    tok = int(np.argmax(engine.prefill(ids)))
    pf = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(gen):
        tok = int(np.argmax(engine.step(tok)))
    return len(ids) / pf, gen / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="a qwen3moe GGUF (default: the synthetic one, written if missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from make_synthetic_gguf import default_path, write_synthetic_gguf

    gguf = a.gguf or default_path()
    if not gguf.exists():
        write_synthetic_gguf(gguf)
    ctx = a.prompt_tokens + a.gen_tokens + 64
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 30000, a.prompt_tokens)
    engines = {"flashlm": Flashlm(gguf, a.threads, ctx)}
    if not a.no_llama_cpp:
        try:
            engines["llama.cpp"] = LlamaCpp(gguf, a.threads, ctx, a.prompt_tokens)
        except ImportError:
            print("llama.cpp: llama-cpp-python does not import; flashlm alone", file=sys.stderr)
    for e in engines.values():  # warm-up: JIT, both paths, every page
        e.prefill(ids[:16])
        for _ in range(3):
            e.step(int(ids[0]))
    best = {name: [0.0, 0.0] for name in engines}
    for r in range(a.repeats):
        for name, e in engines.items():
            pf, dec = run(e, ids, a.gen_tokens)
            best[name] = [max(best[name][0], pf), max(best[name][1], dec)]
            print(f"round {r}: {name:<9} prefill {pf:7.1f} tok/s  decode {dec:6.2f} tok/s", file=sys.stderr, flush=True)
    store = engines["flashlm"].llm.store
    per_tok, exp_bytes = bytes_per_token(store)
    c = store.config
    row = {"model": gguf.name, "shape": f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_experts} experts, "
           f"top-{c.num_experts_per_tok}, expert ffn {c.moe_intermediate_size}", "threads": a.threads,
           "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
           "prefill_tok_s": round(best["flashlm"][0], 2), "decode_tok_s": round(best["flashlm"][1], 2),
           "weight_bytes_per_token": per_tok, "expert_bytes_per_token": exp_bytes,
           "decode_weight_GB_s": round(per_tok * best["flashlm"][1] / 1e9, 2)}
    if "llama.cpp" in best:
        row |= {"llama_cpp_prefill_tok_s": round(best["llama.cpp"][0], 2),
                "llama_cpp_decode_tok_s": round(best["llama.cpp"][1], 2),
                "decode_vs_llama_cpp": round(best["flashlm"][1] / best["llama.cpp"][1], 3),
                "prefill_vs_llama_cpp": round(best["flashlm"][0] / best["llama.cpp"][0], 3)}
    if a.json:
        print(json.dumps(row))
    else:
        print(f"{row['model']} ({row['shape']}), threads {a.threads}")
        print(f"  flashlm   prefill {a.prompt_tokens}: {row['prefill_tok_s']:7.1f} tok/s  decode: {row['decode_tok_s']:6.2f} "
              f"tok/s ({row['decode_weight_GB_s']:.1f} GB/s of {per_tok / 2**20:.0f} MiB per token, "
              f"{exp_bytes / 2**20:.0f} MiB of it experts)")
        if "llama.cpp" in best:
            print(f"  llama.cpp prefill {a.prompt_tokens}: {row['llama_cpp_prefill_tok_s']:7.1f} tok/s  decode: "
                  f"{row['llama_cpp_decode_tok_s']:6.2f} tok/s -> decode {row['decode_vs_llama_cpp']:.2f}x, "
                  f"prefill {row['prefill_vs_llama_cpp']:.2f}x")
    for e in engines.values():
        if isinstance(e, Flashlm):
            e.llm.close()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())

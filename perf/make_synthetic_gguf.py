"""Write a synthetic GGUF of a given shape, for I/O and speed benchmarks only: a Qwen3-MoE
(``moe``, the default) or a dense Qwen2 (``--dense``, e.g. Qwen2.5-7B's shape).

The weights are random but valid blocks (finite half scales, random quants): Q4_K for
the embedding and every layer matrix, Q6_K for ffn_down (the experts' too) and the output
head, F32 norms, biases and routers, as a Q4_K_M file has them. The tokenizer (Qwen2.5's) is
copied from qwen2.5-coder-0.5b's GGUF (``flashlm pull qwen2.5-coder-0.5b``), so the
vocabulary is 151936. The text it generates is noise; llama.cpp and flashlm both run it.

Default MoE shape (issue G): hidden 2048, 16 layers, 64 experts, top-8, expert ffn 1024,
16 heads / 4 kv heads of 128: 4.7 GB. ``--dense`` defaults to Qwen2.5-7B: hidden 3584,
28 layers, ffn 18944, 28 heads / 4 kv heads of 128, vocab 152064 (Qwen2.5's tokenizer
padded): 4.7 GB.

Run:
    python perf/make_synthetic_gguf.py                 # -> ~/.cache/flashlm/bench/qwen3moe-synth.gguf
    python perf/make_synthetic_gguf.py out.gguf --layers 4 --experts 16
    python perf/make_synthetic_gguf.py --dense         # -> ~/.cache/flashlm/bench/qwen2-7b-synth.gguf
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# ---- random valid K-quant blocks ----


def random_q4_k(n_blocks: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """(n_blocks, 144) uint8: d, dmin (f16) of ~``scale``/400 and /60, random 6-bit scales/mins and nibbles."""
    blk = rng.integers(0, 256, (n_blocks, 144), dtype=np.uint8)
    blk[:, 0:2] = np.frombuffer(np.float16(scale / 400).tobytes(), np.uint8)
    blk[:, 2:4] = np.frombuffer(np.float16(scale / 60).tobytes(), np.uint8)
    return blk


def random_q6_k(n_blocks: int, rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """(n_blocks, 210) uint8: random 6-bit quants, int8 sub-block scales in [-40, 40), d (f16) ~``scale``/600."""
    blk = rng.integers(0, 256, (n_blocks, 210), dtype=np.uint8)
    blk[:, 192:208] = rng.integers(-40, 40, (n_blocks, 16), dtype=np.int8).view(np.uint8)
    blk[:, 208:210] = np.frombuffer(np.float16(scale / 600).tobytes(), np.uint8)
    return blk


def random_tensor(fmt: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Random valid data of logical ``shape`` (..., cols) in ``fmt`` (F32, Q4_K, Q6_K), as GGUFWriter takes it."""
    if fmt == "F32":
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32) if len(shape) == 1 else \
            (scale * rng.standard_normal(shape)).astype(np.float32)
    lead, cols = shape[:-1], shape[-1]
    nb = int(np.prod(lead, dtype=np.int64)) * (cols // 256)
    blk = random_q4_k(nb, rng, scale) if fmt == "Q4_K" else random_q6_k(nb, rng, scale)
    return blk.reshape(tuple(lead) + (-1,))


# A large embedding and small matrices writing into the residual stream, so the stream stays
# dominated by the token's embedding and each token's router picks experts of its own, as in a
# trained model. With every matrix at 0.05, random attention (near-uniform averaging) made the rows
# alike and routing collapsed in the later layers: distinct experts of the 64 over 8 decode steps
# (uniform routing would give ~42) were 15, 16, 10, ... 8 by layer; with these scales 36-42 in
# every layer, and a 64-token prompt uses 63-64 experts per layer (it used 41 .. 17).
_SCALE = {"token_embd.weight": 4.0, "attn_output.weight": 0.05 / 256, "ffn_down_exps.weight": 0.05 / 256,
          "ffn_down.weight": 0.05 / 256}


# ---- the file ----


def tensor_plan(hidden: int, layers: int, experts: int, expert_ffn: int, heads: int, kv_heads: int, head_dim: int,
                vocab: int, ffn: int = 0) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, format, logical numpy shape) of every tensor, in file order: a Qwen3-MoE layer when
    ``experts``, else a dense Qwen2 layer (q/k/v biases) with an ``ffn``-wide MLP."""
    t = [("token_embd.weight", "Q4_K", (vocab, hidden))]
    for i in range(layers):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", "F32", (hidden,)),
              (p + "attn_q.weight", "Q4_K", (heads * head_dim, hidden)),
              (p + "attn_k.weight", "Q4_K", (kv_heads * head_dim, hidden)),
              (p + "attn_v.weight", "Q4_K", (kv_heads * head_dim, hidden)),
              (p + "attn_output.weight", "Q4_K", (hidden, heads * head_dim))]
        if experts:
            t += [(p + "attn_q_norm.weight", "F32", (head_dim,)),
                  (p + "attn_k_norm.weight", "F32", (head_dim,)),
                  (p + "ffn_norm.weight", "F32", (hidden,)),
                  (p + "ffn_gate_inp.weight", "F32", (experts, hidden)),
                  (p + "ffn_gate_exps.weight", "Q4_K", (experts, expert_ffn, hidden)),
                  (p + "ffn_up_exps.weight", "Q4_K", (experts, expert_ffn, hidden)),
                  (p + "ffn_down_exps.weight", "Q6_K", (experts, hidden, expert_ffn))]
        else:
            t += [(p + "attn_q.bias", "F32", (heads * head_dim,)),
                  (p + "attn_k.bias", "F32", (kv_heads * head_dim,)),
                  (p + "attn_v.bias", "F32", (kv_heads * head_dim,)),
                  (p + "ffn_norm.weight", "F32", (hidden,)),
                  (p + "ffn_gate.weight", "Q4_K", (ffn, hidden)),
                  (p + "ffn_up.weight", "Q4_K", (ffn, hidden)),
                  (p + "ffn_down.weight", "Q6_K", (hidden, ffn))]
    t += [("output_norm.weight", "F32", (hidden,)), ("output.weight", "Q6_K", (vocab, hidden))]
    return t


def copy_tokenizer(w, src: Path) -> int:
    """Copy the tokenizer of GGUF ``src`` into writer ``w``; returns the vocabulary size."""
    from flashlm.models.gguf_file import GGUFFile

    m = GGUFFile(src).meta
    w.add_tokenizer_model(m["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in m:
        w.add_tokenizer_pre(m["tokenizer.ggml.pre"])
    w.add_token_list(m["tokenizer.ggml.tokens"])
    w.add_token_types(m["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in m:
        w.add_token_merges(m["tokenizer.ggml.merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("padding_token_id", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}" in m:
            add(int(m[f"tokenizer.ggml.{key}"]))
    if "tokenizer.ggml.add_bos_token" in m:
        w.add_add_bos_token(bool(m["tokenizer.ggml.add_bos_token"]))
    if "tokenizer.chat_template" in m:
        w.add_chat_template(m["tokenizer.chat_template"])
    return len(m["tokenizer.ggml.tokens"])


def write_synthetic_gguf(out: Path, *, hidden: int = 2048, layers: int = 16, experts: int = 64, top_k: int = 8,
                   expert_ffn: int = 1024, heads: int = 16, kv_heads: int = 4, head_dim: int = 128,
                   tokenizer_gguf: Path | None = None, seed: int = 0, progress: bool = True, ffn: int = 0) -> Path:
    """Write the synthetic model to ``out`` (tensor by tensor: memory stays at one tensor); with
    ``experts=0`` a dense Qwen2 of MLP width ``ffn``."""
    import gguf

    from flashlm.kernels.formats import tensor_nbytes

    if tokenizer_gguf is None:
        from flashlm.models.pull import gguf_path

        tokenizer_gguf = gguf_path("qwen2.5-coder-0.5b")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.part")
    w = gguf.GGUFWriter(None, "qwen3moe" if experts else "qwen2")
    w.add_name(f"synthetic qwen3moe {layers}x{experts}e top-{top_k}" if experts else f"synthetic qwen2 {layers} layers")
    w.add_block_count(layers)
    w.add_context_length(32768)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(6 * expert_ffn if experts else ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(top_k)
        w.add_expert_feed_forward_length(expert_ffn)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    vocab = copy_tokenizer(w, Path(tokenizer_gguf))
    plan = tensor_plan(hidden, layers, experts, expert_ffn, heads, kv_heads, head_dim, vocab, ffn)
    for name, fmt, shape in plan:
        nbytes = tensor_nbytes(fmt, shape)
        if fmt == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            from flashlm.kernels.formats import row_nbytes

            byte_shape = tuple(shape[:-1]) + (row_nbytes(fmt, shape[-1]),)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType[fmt])
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(tensor_nbytes(f, s) for _, f, s in plan)
    done, t0 = 0, time.perf_counter()
    for name, fmt, shape in plan:
        data = random_tensor(fmt, shape, rng, _SCALE.get(name.split(".", 2)[-1] if name.startswith("blk.") else name, 0.05))
        w.write_tensor_data(data)
        done += data.nbytes
        if progress:
            print(f"\r{done / 2**30:6.2f} / {total / 2**30:.2f} GiB  {name:<28}", end="", file=sys.stderr, flush=True)
    w.close()
    tmp.replace(out)
    if progress:
        print(f"\nwrote {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def default_path(dense: bool = False) -> Path:
    from flashlm.models.registry import home

    return home() / "bench" / ("qwen2-7b-synth.gguf" if dense else "qwen3moe-synth.gguf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, help="output .gguf (default ~/.cache/flashlm/bench/qwen3moe-synth.gguf, "
                                                       "or qwen2-7b-synth.gguf with --dense)")
    ap.add_argument("--dense", action="store_true", help="a dense Qwen2 (defaults: Qwen2.5-7B's shape)")
    ap.add_argument("--hidden", type=int, default=None, help="default 2048 (MoE) / 3584 (dense)")
    ap.add_argument("--layers", type=int, default=None, help="default 16 (MoE) / 28 (dense)")
    ap.add_argument("--ffn", type=int, default=18944, help="dense MLP width (default 18944)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=None, help="default 16 (MoE) / 28 (dense)")
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokenizer-gguf", type=Path, help="GGUF to copy the tokenizer from (default qwen2.5-coder-0.5b's)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    d = a.dense
    write_synthetic_gguf(a.out or default_path(d), hidden=a.hidden or (3584 if d else 2048),
                   layers=a.layers or (28 if d else 16), experts=0 if d else a.experts, top_k=a.top_k,
                   expert_ffn=a.expert_ffn, heads=a.heads or (28 if d else 16), kv_heads=a.kv_heads,
                   head_dim=a.head_dim, tokenizer_gguf=a.tokenizer_gguf, seed=a.seed, ffn=a.ffn if d else 0)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

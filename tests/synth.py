"""Tiny synthetic models for unit tests: GGUF files (gguf.GGUFWriter) and HF dirs (safetensors)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocab: 256 byte tokens, a few merges, 3 control tokens."""
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = []
    for a, b in [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    types = [1] * len(tokens)
    for s in SPECIALS:
        tokens.append(s)
        types.append(3)
    return tokens, merges, types


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    fmt: str = "Q8_0",
    n_layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    n_heads: int = 4,
    n_kv: int = 2,
    tied: bool = False,
    seed: int = 0,
    extra_tensor_fmt: dict[str, str] | None = None,
) -> Path:
    """Write a small random model; returns the path. 2-D weights use ``fmt``."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_vocab()
    vocab = len(tokens)
    head_dim = hidden // n_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    overrides = extra_tensor_fmt or {}

    def mat(name: str, rows: int, cols: int) -> None:
        f = overrides.get(name, fmt)
        a = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if f == "F32":
            w.add_tensor(name, a)
        elif f == "F16":
            w.add_tensor(name, a.astype(np.float16))
        elif f in ("Q4_K", "Q6_K"):  # gguf-py cannot quantize these: random valid blocks
            w.add_tensor(name, random_kquant(f, (rows, cols), rng), raw_dtype=gguf.GGMLQuantizationType[f])
        elif f == "Q5_K":  # random valid-size bytes
            from flashlm.kernels.formats import row_nbytes

            raw = rng.integers(0, 256, size=(rows, row_nbytes(f, cols)), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[f])
        else:
            q = quantize(a, gguf.GGMLQuantizationType[f])
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType[f])

    def vec(name: str, n: int, base: float = 1.0) -> None:
        w.add_tensor(name, (base + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", vocab, hidden)
    for i in range(n_layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", hidden)
        mat(p + "attn_q.weight", n_heads * head_dim, hidden)
        mat(p + "attn_k.weight", n_kv * head_dim, hidden)
        mat(p + "attn_v.weight", n_kv * head_dim, hidden)
        if arch == "qwen2":
            vec(p + "attn_q.bias", n_heads * head_dim, 0.0)
            vec(p + "attn_k.bias", n_kv * head_dim, 0.0)
            vec(p + "attn_v.bias", n_kv * head_dim, 0.0)
        if arch == "qwen3":
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
        mat(p + "attn_output.weight", hidden, n_heads * head_dim)
        vec(p + "ffn_norm.weight", hidden)
        mat(p + "ffn_gate.weight", ffn, hidden)
        mat(p + "ffn_up.weight", ffn, hidden)
        mat(p + "ffn_down.weight", hidden, ffn)
    vec("output_norm.weight", hidden)
    if not tied:
        mat("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- HF directories ----

_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def save_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write a .safetensors file; values are (dtype name, array), BF16 given as uint16."""
    header, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16 bits (uint16)."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tiny_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, _ = tiny_vocab()
    vocab = {t: i for i, t in enumerate(tokens[: -len(SPECIALS)])}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok.to_str()


def write_tiny_hf(
    d: Path,
    *,
    arch: str = "LlamaForCausalLM",
    dtype: str = "F32",
    n_layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    n_heads: int = 4,
    n_kv: int = 2,
    tied: bool = False,
    seed: int = 0,
    shards: int = 1,
) -> dict[str, np.ndarray]:
    """Write config.json, safetensors (optionally sharded), tokenizer files. Returns the f32 weights."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    tokens, _, _ = tiny_vocab()
    vocab = len(tokens)
    head_dim = hidden // n_heads
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[arch]
    cfg = {
        "architectures": [arch], "model_type": model_type, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": tied, "bos_token_id": vocab - 3, "eos_token_id": vocab - 1,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    W: dict[str, np.ndarray] = {}
    W["model.embed_tokens.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.05
    for i in range(n_layers):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
        W[p + "self_attn.q_proj.weight"] = rng.standard_normal((n_heads * head_dim, hidden)).astype(np.float32) * 0.05
        W[p + "self_attn.k_proj.weight"] = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32) * 0.05
        W[p + "self_attn.v_proj.weight"] = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32) * 0.05
        if model_type == "qwen2":
            for k, n in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
                W[p + f"self_attn.{k}_proj.bias"] = 0.1 * rng.standard_normal(n * head_dim).astype(np.float32)
        if model_type == "qwen3":
            W[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rng.standard_normal(head_dim).astype(np.float32)
            W[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rng.standard_normal(head_dim).astype(np.float32)
        W[p + "self_attn.o_proj.weight"] = rng.standard_normal((hidden, n_heads * head_dim)).astype(np.float32) * 0.05
        W[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
        W[p + "mlp.gate_proj.weight"] = rng.standard_normal((ffn, hidden)).astype(np.float32) * 0.05
        W[p + "mlp.up_proj.weight"] = rng.standard_normal((ffn, hidden)).astype(np.float32) * 0.05
        W[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, ffn)).astype(np.float32) * 0.05
    W["model.norm.weight"] = 1 + 0.1 * rng.standard_normal(hidden).astype(np.float32)
    if not tied:
        W["lm_head.weight"] = rng.standard_normal((vocab, hidden)).astype(np.float32) * 0.05

    def enc(a: np.ndarray) -> tuple[str, np.ndarray]:
        if dtype == "BF16":
            return "BF16", f32_to_bf16(a)
        if dtype == "F16":
            return "F16", a.astype(np.float16)
        return "F32", a

    names = list(W)
    if shards == 1:
        save_safetensors(d / "model.safetensors", {n: enc(W[n]) for n in names})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_safetensors(d / fname, {n: enc(W[n]) for n in part})
            weight_map.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "tokenizer.json").write_text(tiny_tokenizer_json())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE,
    }))
    return W


def tiny_store(directory: Path, **kw):
    """A Store imported from a tiny GGUF written into ``directory`` (``write_tiny_gguf``'s options)."""
    from flashlm.models.gguf_import import import_gguf
    from flashlm.offload.store import Store

    directory = Path(directory)
    src = write_tiny_gguf(directory / "m.gguf", **kw)
    return Store(import_gguf(src, directory / "store", progress=False))


# ---- Qwen3-MoE GGUF files ----


def random_kquant(fmt: str, shape: tuple[int, ...], rng: np.random.Generator, scale: float = 0.05) -> np.ndarray:
    """Random but valid Q4_K / Q6_K blocks for a (..., cols) tensor: finite half scales chosen
    so the weights are of size ~``scale``, random quants. Returns uint8 (..., row bytes)."""
    from flashlm.kernels.formats import row_nbytes

    lead, cols = tuple(shape[:-1]), shape[-1]
    nb = int(np.prod(lead, dtype=np.int64)) * (cols // 256)
    if fmt == "Q4_K":  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        blk = rng.integers(0, 256, (nb, 144), dtype=np.uint8)
        blk[:, 0:2] = np.full((nb, 1), scale / 400, np.float16).view(np.uint8).reshape(nb, 2)
        blk[:, 2:4] = np.full((nb, 1), scale / 60, np.float16).view(np.uint8).reshape(nb, 2)
    elif fmt == "Q6_K":  # 128 bytes low bits, 64 high bits, 16 int8 scales, d (f16)
        blk = rng.integers(0, 256, (nb, 210), dtype=np.uint8)
        blk[:, 192:208] = rng.integers(-40, 40, (nb, 16)).astype(np.int8).view(np.uint8)
        blk[:, 208:210] = np.full((nb, 1), scale / 600, np.float16).view(np.uint8).reshape(nb, 2)
    else:
        raise ValueError(f"random_kquant: {fmt} is not Q4_K or Q6_K")
    return blk.reshape(lead + (row_nbytes(fmt, cols),))


def encode(a: np.ndarray, fmt: str, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or array to write into a GGUF file, the float32 values it holds) of ``a`` in ``fmt``;
    Q4_K/Q6_K (which gguf-py cannot quantize) are random valid blocks of ``a``'s shape instead."""
    import gguf

    a = np.asarray(a, np.float32)
    if fmt == "F32":
        return a, a
    if fmt == "F16":
        h = a.astype(np.float16)
        return h, h.astype(np.float32)
    qt = gguf.GGMLQuantizationType[fmt]
    q = random_kquant(fmt, a.shape, rng or np.random.default_rng(0)) if fmt in ("Q4_K", "Q6_K") else gguf.quants.quantize(a, qt)
    return q, np.asarray(gguf.quants.dequantize(q, qt), np.float32).reshape(a.shape)


def write_qwen3moe_gguf(path: Path, tensors: dict[str, np.ndarray], *, hidden: int, n_layers: int, n_heads: int,
                        n_kv: int, head_dim: int, n_experts: int, k: int, expert_ffn: int, ffn: int | None,
                        norm_topk: bool | None = True, fmts: dict[str, str] | None = None, eps: float = 1e-6,
                        theta: float = 10000.0, skip: tuple[str, ...] = (), meta: dict | None = None) -> Path:
    """Write a ``qwen3moe`` GGUF of GGUF-named tensors (2-D, and 3-D ``ffn_*_exps``) with the tiny
    vocabulary. ``fmts`` maps a name to the format it is written in (default F32; values must
    already be what the format holds: see :func:`encode`, whose first result may be passed as is)."""
    import gguf

    tokens, merges, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    if ffn is not None:
        w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(k)
    w.add_expert_feed_forward_length(expert_ffn)
    if norm_topk is not None:
        w.add_expert_weights_norm(norm_topk)
    for key, v in (meta or {}).items():
        w.add_uint32(key, v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, a in tensors.items():
        if name in skip:
            continue
        f = (fmts or {}).get(name, "F32")
        if f in ("F32", "F16"):
            w.add_tensor(name, np.asarray(a, np.float32 if f == "F32" else np.float16))
        else:
            w.add_tensor(name, a, raw_dtype=gguf.GGMLQuantizationType[f])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_moe_store(directory: Path, *, n_layers: int = 3, hidden: int = 64, n_heads: int = 4, n_kv: int = 2,
                   head_dim: int = 16, n_experts: int = 8, k: int = 2, expert_ffn: int = 64, fmt: str = "Q8_0",
                   seed: int = 0):
    """A Store of a random tiny Qwen3-MoE (written as a GGUF, imported): experts in ``fmt``."""
    from flashlm.models.gguf_import import import_gguf
    from flashlm.offload.store import Store

    rng = np.random.default_rng(seed)
    vocab = len(tiny_vocab()[0])
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    one = lambda n: (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    t, fmts = {"token_embd.weight": r(vocab, hidden) * 10}, {}
    for i in range(n_layers):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": one(hidden), p + "attn_q.weight": r(n_heads * head_dim, hidden),
                  p + "attn_k.weight": r(n_kv * head_dim, hidden), p + "attn_v.weight": r(n_kv * head_dim, hidden),
                  p + "attn_output.weight": r(hidden, n_heads * head_dim), p + "attn_q_norm.weight": one(head_dim),
                  p + "attn_k_norm.weight": one(head_dim), p + "ffn_norm.weight": one(hidden),
                  p + "ffn_gate_inp.weight": r(n_experts, hidden) * 10,
                  p + "ffn_gate_exps.weight": r(n_experts, expert_ffn, hidden),
                  p + "ffn_up_exps.weight": r(n_experts, expert_ffn, hidden),
                  p + "ffn_down_exps.weight": r(n_experts, hidden, expert_ffn)})
        for m in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "attn_q", "attn_k", "attn_v", "attn_output"):
            name = p + m + ".weight"
            t[name], _ = encode(t[name], fmt, rng)
            fmts[name] = fmt
    t["output_norm.weight"], t["output.weight"] = one(hidden), r(vocab, hidden)
    directory = Path(directory)
    src = write_qwen3moe_gguf(directory / "moe.gguf", t, hidden=hidden, n_layers=n_layers, n_heads=n_heads,
                              n_kv=n_kv, head_dim=head_dim, n_experts=n_experts, k=k, expert_ffn=expert_ffn,
                              ffn=None, fmts=fmts)
    return Store(import_gguf(src, directory / "store", progress=False))


def greedy_run(model, *, prompt: int = 9, steps: int = 3, seed: int = 0) -> list:
    """Logits of a random ``prompt``-token prefill (all positions) and ``steps`` greedy decode
    steps: what the offload tests compare between a streamed and an in-RAM model."""
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, prompt)
    cache = model.make_cache(32)
    out = [model.forward(ids, None, cache, all_logits=True)]
    tok = int(np.argmax(out[0][-1]))
    for _ in range(steps):
        out.append(model.forward(np.array([tok]), None, cache))
        tok = int(np.argmax(out[-1]))
    return out

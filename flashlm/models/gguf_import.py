"""Import a GGUF file into a flashlm store, keeping every tensor's values and block format;
formats with a store layout of their own (``kernels.formats.STORE_LAYOUT``: Q5_0 -> Q5_0R, Q6_K -> Q6_KR, Q4_K -> Q4_KR;
the other quantized formats keep their blocks as Q8_0S ...; all with long rows in column slabs) are rewritten
into it, losslessly (``kernels.repacked.pack``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.errors import GGUFError, UnsupportedError
from flashlm.kernels.formats import STORE_LAYOUT, tensor_nbytes
from flashlm.models.config import ARCH_ALIASES, GGUF_ARCHS, IMPORTER_VERSION, ModelConfig
from flashlm.models.gguf_file import GGUFFile
from flashlm.offload.store import StoreWriter
from flashlm.progress import byte_progress

# Architectures whose GGUF q/k weights llama.cpp's converter permuted for rope on
# adjacent pairs ("interleaved"); the others rotate halves ("neox").
_INTERLEAVED_ROPE = {"llama", "mistral"}


def config_from_gguf_meta(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], source: str = "") -> ModelConfig:
    """Build a ModelConfig from GGUF metadata and the tensor table.

    Args:
        meta: GGUF key/values.
        tensor_shapes: tensor name -> logical shape (rows, cols).
        source: file name for error messages.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{source}: GGUF metadata lacks general.architecture (a string), got {arch!r:.60}")
    model_type = GGUF_ARCHS.get(arch, arch)
    if model_type not in ARCH_ALIASES or arch in GGUF_ARCHS.values():
        known = sorted({a for a in ARCH_ALIASES if a not in GGUF_ARCHS.values()} | set(GGUF_ARCHS))
        raise UnsupportedError(f"{source}: architecture {arch!r} is not supported (flashlm runs: {', '.join(known)})")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        v = meta.get(f"{arch}.{name}", default)
        if required and v is None:
            raise GGUFError(f"{source}: GGUF metadata lacks {arch}.{name}")
        return v

    def count(name: str, default: Any = None, required: bool = False) -> Any:
        """A positive integer field (sizes, counts)."""
        v = key(name, default, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 1 << 40:
            raise GGUFError(f"{source}: GGUF metadata {arch}.{name} is {v!r:.60}, expected a positive integer")
        return v

    def number(name: str, default: float) -> float:
        v = key(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise GGUFError(f"{source}: GGUF metadata {arch}.{name} is {v!r:.60}, expected a number")
        return float(v)

    n_heads = count("attention.head_count", required=True)
    hidden = count("embedding_length", required=True)
    n_kv = count("attention.head_count_kv", n_heads)
    head_dim = count("attention.key_length", None) or hidden // n_heads
    if not head_dim or n_heads % n_kv:
        raise GGUFError(f"{source}: GGUF metadata has {n_heads} heads of dimension {head_dim} for a hidden size of "
                        f"{hidden} and {n_kv} key/value heads: not a consistent attention shape")
    tokens = meta.get("tokenizer.ggml.tokens")
    embd = tensor_shapes.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{source}: no token_embd.weight tensor")
    vocab = embd[0]
    scaling = None
    stype = key("rope.scaling.type")
    if stype and stype != "none":
        scaling = {"rope_type": stype, "factor": float(key("rope.scaling.factor", 1.0))}
        if key("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    n_layers = count("block_count", required=True)
    moe = _moe_config(key, tensor_shapes, n_layers, hidden, source) if model_type == "qwen3_moe" else {}
    ffn = count("feed_forward_length", required=not moe)  # a MoE file may have only the experts' length
    return ModelConfig(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(ffn if ffn is not None else moe["moe_intermediate_size"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv),
        head_dim=int(head_dim),
        vocab_size=int(vocab),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=number("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=count("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        rope_layout="interleaved" if arch in _INTERLEAVED_ROPE else "neox",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        extra={"tokenizer_vocab": len(tokens) if tokens is not None else None},
        **moe,
    )


def _moe_config(key, shapes: dict[str, tuple[int, ...]], n_layers: int, hidden: int, source: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a ``qwen3moe`` GGUF, checked against its tensors.

    A layer with ``ffn_gate_inp`` is sparse; one with a dense ``ffn_gate`` instead goes to
    ``mlp_only_layers``. llama.cpp always renormalizes qwen3moe's top-k weights, so
    ``norm_topk_prob`` is ``expert_weights_norm`` when the file has it, else true.
    """
    n_exp = int(key("expert_count", required=True))
    k = int(key("expert_used_count", required=True))
    eff = key("expert_feed_forward_length")
    if not 0 < k <= n_exp:
        raise GGUFError(f"{source}: expert_used_count {k} is not in 1 .. expert_count {n_exp}")
    dense = []
    for i in range(n_layers):
        p = f"blk.{i}."
        if p + "ffn_gate_inp.weight" not in shapes:
            if p + "ffn_gate.weight" in shapes:
                dense.append(i)
                continue
            raise GGUFError(f"{source}: layer {i} has neither a router (ffn_gate_inp.weight) nor a dense ffn_gate.weight")
        if tuple(shapes[p + "ffn_gate_inp.weight"]) != (n_exp, hidden):
            raise GGUFError(f"{source}: {p}ffn_gate_inp.weight has shape {tuple(shapes[p + 'ffn_gate_inp.weight'])}, "
                            f"expected ({n_exp}, {hidden}) for expert_count {n_exp}")
        for m in ("gate", "up", "down"):
            name = f"{p}ffn_{m}_exps.weight"
            if name not in shapes:
                raise GGUFError(f"{source}: the file lacks expert tensor {name}")
            s = tuple(shapes[name])
            if eff is None:
                eff = s[1] if m != "down" else s[2]
            want = (n_exp, hidden, int(eff)) if m == "down" else (n_exp, int(eff), hidden)
            if s != want:
                raise GGUFError(f"{source}: {name} has shape {s}, expected {want} "
                                f"(expert_count {n_exp}, expert_feed_forward_length {eff})")
    if eff is None:
        raise GGUFError(f"{source}: GGUF metadata lacks expert_feed_forward_length and no layer has experts")
    return {"num_experts": n_exp, "num_experts_per_tok": k, "moe_intermediate_size": int(eff),
            "norm_topk_prob": bool(key("expert_weights_norm", True)), "decoder_sparse_step": 1,
            "mlp_only_layers": dense}


def gguf_tokenizer_files(meta: dict[str, Any], source: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Side files (tokenizer.json, chat template) and the manifest's tokenizer section."""
    from flashlm.models.gguf_tokenizer import special_tokens, tokenizer_json_from_gguf

    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    files = {"tokenizer.json": tokenizer_json_from_gguf(tok_meta, source)}
    info: dict[str, Any] = {"file": "tokenizer.json", "chat_template_file": None}
    info.update(special_tokens(tok_meta))
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        files["chat_template.jinja"] = template
        info["chat_template_file"] = "chat_template.jinja"
    return files, info


def import_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, progress: bool = False) -> Path:
    """Convert a GGUF file into a store at ``dst`` (written to a temp dir, renamed last).

    Args:
        src: the .gguf file.
        dst: the store directory to create (replaced if it exists).
        progress: show a byte progress bar on stderr.
    Returns:
        The store path.
    """
    src = Path(src)
    g = GGUFFile(src)
    shapes = {n: t.shape for n, t in g.tensors.items()}
    config = config_from_gguf_meta(g.meta, shapes, str(src))
    files, tok_info = gguf_tokenizer_files(g.meta, str(src))
    total = sum(tensor_nbytes(STORE_LAYOUT.get(t.fmt, t.fmt), t.shape) for t in g.tensors.values())
    # Write embedding, then layers in order, then the head: the order layers stream in. A layer's
    # experts come after its dense tensors, one expert (gate, up, down) after another.
    order = sorted(g.tensors.values(), key=lambda t: _tensor_order(t.name))
    with byte_progress(total, f"import {src.name}", enabled=progress) as bar, StoreWriter(dst, progress=bar) as w:
        moe_layer = None  # the layer whose experts are still to write, after all its dense tensors
        for t in order:
            layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else None
            if moe_layer is not None and layer != moe_layer:
                _add_experts(w, g, moe_layer, config.num_experts)
                moe_layer = None
            if t.name.endswith("_exps.weight"):
                continue  # written after the layer's dense tensors, split per expert
            _add(w, t.name, t.fmt, t.shape, g.tensor_bytes(t.name))
            if t.name.endswith(".ffn_gate_inp.weight"):
                moe_layer = layer
        if moe_layer is not None:
            _add_experts(w, g, moe_layer, config.num_experts)
        for name, content in files.items():
            w.add_file(name, content)
        source = {"kind": "gguf", "file": src.name, "bytes": g.size, "importer_version": IMPORTER_VERSION}
        out = w.commit(config, tokenizer=tok_info, source=source)
    return out


def _add(w: StoreWriter, name: str, fmt: str, shape: tuple[int, ...], data: np.ndarray) -> None:
    """One tensor, in its store layout (formats.STORE_LAYOUT) if it has one."""
    if fmt in STORE_LAYOUT:
        from flashlm.kernels.repacked import pack  # Numba kernels: loaded only when needed

        fmt, data = pack(fmt, np.asarray(data).reshape(tuple(shape[:-1]) + (-1,)), shape)
    w.add_tensor(name, data, fmt, shape)


def _add_experts(w: StoreWriter, g: GGUFFile, i: int, n_exp: int) -> None:
    """Block ``i``'s 3-D ``ffn_{gate,up,down}_exps`` as per-expert store tensors
    (``blk.{i}.expert.{e}.ffn_gate.weight`` ...), expert by expert."""
    from flashlm.models.weights import EXPERT_MATS, expert_name

    exps = [g.tensors[f"blk.{i}.ffn_{m}_exps.weight"] for m in ("gate", "up", "down")]
    for t in exps:
        if t.shape[0] != n_exp:
            raise GGUFError(f"{g.path}: {t.name} holds {t.shape[0]} experts, the metadata says {n_exp}")
    for e in range(n_exp):
        for t, mat in zip(exps, EXPERT_MATS):
            per = t.nbytes // n_exp
            _add(w, expert_name(i, e, mat), t.fmt, t.shape[1:], g.tensor_bytes(t.name)[e * per:(e + 1) * per])


def _tensor_order(name: str) -> tuple[int, int, str]:
    if name == "token_embd.weight":
        return (0, 0, name)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (2, 0, name)

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
from flashlm.models.config import ARCH_ALIASES, IMPORTER_VERSION, ModelConfig
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
    if arch not in ARCH_ALIASES:
        raise UnsupportedError(
            f"{source}: architecture {arch!r} is not supported (flashlm runs: {', '.join(sorted(ARCH_ALIASES))})"
        )

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        v = meta.get(f"{arch}.{name}", default)
        if required and v is None:
            raise GGUFError(f"{source}: GGUF metadata lacks {arch}.{name}")
        return v

    n_heads = int(key("attention.head_count", required=True))
    hidden = int(key("embedding_length", required=True))
    n_kv = key("attention.head_count_kv", n_heads)
    head_dim = key("attention.key_length", None) or hidden // n_heads
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
    return ModelConfig(
        model_type=arch,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_hidden_layers=int(key("block_count", required=True)),
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv),
        head_dim=int(head_dim),
        vocab_size=int(vocab),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_shapes,
        attention_bias="blk.0.attn_q.bias" in tensor_shapes,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        rope_layout="interleaved" if arch in _INTERLEAVED_ROPE else "neox",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        extra={"tokenizer_vocab": len(tokens) if tokens is not None else None},
    )


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
    # Write embedding, then layers in order, then the head: the order layers stream in.
    order = sorted(g.tensors.values(), key=lambda t: _tensor_order(t.name))
    with byte_progress(total, f"import {src.name}", enabled=progress) as bar, StoreWriter(dst, progress=bar) as w:
        for t in order:
            data = g.tensor_bytes(t.name)
            if t.fmt in STORE_LAYOUT:
                from flashlm.kernels.repacked import pack  # Numba kernels: loaded only when needed

                fmt, data = pack(t.fmt, np.asarray(data).reshape(t.shape[:-1] + (-1,)), t.shape)
            else:
                fmt = t.fmt
            w.add_tensor(t.name, data, fmt, t.shape)
        for name, content in files.items():
            w.add_file(name, content)
        source = {"kind": "gguf", "file": src.name, "bytes": g.size, "importer_version": IMPORTER_VERSION}
        out = w.commit(config, tokenizer=tok_info, source=source)
    return out


def _tensor_order(name: str) -> tuple[int, int, str]:
    if name == "token_embd.weight":
        return (0, 0, name)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (2, 0, name)

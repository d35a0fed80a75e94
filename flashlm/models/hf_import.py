"""Import a Hugging Face model directory (config.json, safetensors, tokenizer) into a store.

Weights are stored as given (F32/F16/BF16) or quantized on import with ``quant``
("q8_0" or "q4_0", bit-identical to ``gguf.quants.quantize``, then kept as Q8_0S / Q4_0S:
the same blocks, long rows in column slabs, ``kernels/repacked.py``). Norm weights and
biases are always stored as F32. Tensor names become the GGUF ones, and HF q/k
weights keep their layout, so the rope layout is "neox" (rotate halves).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from flashlm.errors import ImportError_, UnsupportedError
from flashlm.models.config import IMPORTER_VERSION, ModelConfig
from flashlm.offload.store import StoreWriter
from flashlm.progress import byte_progress

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "MistralForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3_moe"}
QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
_ST_DTYPES = {"F32": ("F32", np.float32), "F16": ("F16", np.float16), "BF16": ("BF16", np.uint16)}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # a MoE block's router (experts, hidden)
}
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
# transformers 5 keeps a block's experts fused in memory, gate_up_proj (E, 2F, hidden) and
# down_proj (E, hidden, F); its save_pretrained writes them per expert (the names above), but
# a checkpoint may hold the fused form: split on import
_FUSED = {"mlp.experts.gate_up_proj": ("ffn_gate.weight", "ffn_up.weight"), "mlp.experts.down_proj": ("ffn_down.weight",)}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def gguf_name(hf_name: str) -> str | None:
    """The store (GGUF) name of an HF tensor name, or None if it is not a weight we use."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    x = _EXPERT_RE.match(m.group(2)) if m else None
    if x:
        return f"blk.{int(m.group(1))}.expert.{int(x.group(1))}.ffn_{x.group(2)}.weight"
    return None


# ---- safetensors (parsed here: numpy cannot load BF16 through safetensors) ----


class SafetensorsFile:
    """Zero-copy views of the tensors in one .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ImportError_(f"{path}: not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ImportError_(f"{path}: truncated safetensors file (header of {n} bytes)")
            try:
                self.header: dict[str, Any] = json.loads(f.read(n))
            except ValueError:
                raise ImportError_(f"{path}: corrupt safetensors header") from None
        self.header.pop("__metadata__", None)
        self.base = 8 + n
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in self.header.items():
            end = self.base + info["data_offsets"][1]
            if end > size:
                raise ImportError_(f"{path}: tensor {name} lies past the end of the file; the download is incomplete")

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> tuple[str, np.ndarray]:
        """(format, array) for tensor ``name``; BF16 comes back as uint16."""
        info = self.header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise UnsupportedError(f"{self.path}: tensor {name} has dtype {info['dtype']}; flashlm imports F32, F16 and BF16")
        fmt, dt = _ST_DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        arr = self.data[self.base + a : self.base + b].view(dt).reshape(info["shape"])
        return fmt, arr


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise ImportError_(f"{src}: shard {missing[0]} named in model.safetensors.index.json is missing")
        return [src / f for f in files]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ImportError_(f"{src}: no model.safetensors or model.safetensors.index.json (only safetensors weights are imported)")


def iter_hf_tensors(src: str | os.PathLike) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yield (store name, format, array) for every weight in an HF directory, in file order
    (fused experts split into per-expert views)."""
    for path in _weight_files(Path(src)):
        st = SafetensorsFile(path)
        for hf_name in st.keys():
            name = gguf_name(hf_name)
            m = _LAYER_RE.match(hf_name)
            if name is None and m and m.group(2) in _FUSED:
                fmt, arr = st.get(hf_name)
                mats = _FUSED[m.group(2)]
                if arr.ndim != 3 or arr.shape[1] % len(mats):
                    raise ImportError_(f"{path}: {hf_name} has shape {list(arr.shape)}, expected (experts, rows, cols)")
                f = arr.shape[1] // len(mats)
                for e in range(arr.shape[0]):
                    for j, mat in enumerate(mats):
                        yield f"blk.{int(m.group(1))}.expert.{e}.{mat}", fmt, arr[e, j * f:(j + 1) * f]
                continue
            if name is None:
                if _IGNORED.search(hf_name):
                    continue
                raise UnsupportedError(f"{path}: unexpected tensor {hf_name}; is this a supported architecture?")
            fmt, arr = st.get(hf_name)
            yield name, fmt, arr


def _store_order(name: str) -> tuple:
    """Embedding, then each block's dense tensors, then its experts one by one (gate, up,
    down), then the head: the order layers stream in, one expert one byte range."""
    if name == "token_embd.weight":
        return (0,)
    parts = name.split(".")
    if parts[0] == "blk":
        if parts[2] == "expert":
            return (1, int(parts[1]), 1, int(parts[3]), ("ffn_gate", "ffn_up", "ffn_down").index(parts[4]))
        return (1, int(parts[1]), 0, name)
    return (2, name)


def to_f32(fmt: str, arr: np.ndarray) -> np.ndarray:
    if fmt == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def config_from_hf(src: Path) -> ModelConfig:
    cpath = src / "config.json"
    if not cpath.is_file():
        raise ImportError_(f"{src}: no config.json; an HF model directory needs config.json, safetensors weights and tokenizer.json")
    try:
        raw = json.loads(cpath.read_text())
    except ValueError as e:
        raise ImportError_(f"{cpath}: not valid JSON ({e})") from None
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedError(f"{cpath}: architecture {archs or raw.get('model_type')} is not supported (flashlm imports {', '.join(ARCHITECTURES)})")
    d = dict(raw)
    d["model_type"] = ARCHITECTURES[arch]
    d["rope_layout"] = "neox"
    rp = d.get("rope_parameters")  # transformers >= 5 writes rope_theta and scaling here
    if isinstance(rp, dict):
        if d.get("rope_theta") is None:
            d["rope_theta"] = rp.get("rope_theta", 10000.0)
        if not d.get("rope_scaling"):
            d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    scaling = d.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        d["rope_scaling"] = None
    if d["model_type"] == "llama":
        d["attention_bias"] = bool(raw.get("attention_bias", False))
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if k not in d:
            raise ImportError_(f"{cpath}: config.json lacks {k}")
    if d["model_type"] == "qwen3_moe":
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if k not in d and not (k == "num_experts" and "num_local_experts" in d):
                raise ImportError_(f"{cpath}: config.json lacks {k}, which a Qwen3-MoE model needs")
    return ModelConfig.from_dict(d)


def hf_tokenizer_files(src: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """tokenizer.json and chat template from an HF directory, and the manifest's tokenizer section."""
    tpath = src / "tokenizer.json"
    if not tpath.is_file():
        raise ImportError_(f"{src}: no tokenizer.json (a fast-tokenizer file is required)")
    from tokenizers import Tokenizer

    text = tpath.read_text(encoding="utf-8")
    tok = Tokenizer.from_str(text)
    tcfg: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tcfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    gen: dict[str, Any] = {}
    if (src / "generation_config.json").is_file():
        gen = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))

    def tok_str(v: Any) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    bos, eos = tok_str(tcfg.get("bos_token")), tok_str(tcfg.get("eos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    stops = set()
    gen_eos = gen.get("eos_token_id")
    for t in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if isinstance(t, int):
            stops.add(t)
    if eos_id is not None:
        stops.add(eos_id)
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "<|eom_id|>"):
        i = tok.token_to_id(name)
        if i is not None and any(a.content == name and a.special for a in tok.get_added_tokens_decoder().values()):
            stops.add(i)
    info: dict[str, Any] = {
        "file": "tokenizer.json",
        "chat_template_file": None,
        "bos_token": bos,
        "eos_token": eos,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "stop_token_ids": sorted(stops),
        "add_bos_token": bool(tcfg.get("add_bos_token", False)),
    }
    files = {"tokenizer.json": text}
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        files["chat_template.jinja"] = template
        info["chat_template_file"] = "chat_template.jinja"
    return files, info


def quantize(arr_f32: np.ndarray, fmt: str) -> np.ndarray:
    """Quantize a (rows, cols) f32 matrix to GGUF blocks with gguf's reference quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gq

    return gq(np.ascontiguousarray(arr_f32, dtype=np.float32), GGMLQuantizationType[fmt])


def import_hf(src: str | os.PathLike, dst: str | os.PathLike, *, quant: str | None = None, progress: bool = False) -> Path:
    """Convert an HF model directory into a store at ``dst``.

    Args:
        src: directory with config.json, model.safetensors (or a sharded index), tokenizer.json.
        dst: store directory to create (replaced if it exists).
        quant: None to keep F32/F16/BF16, or "q8_0" / "q4_0" to quantize 2-D weights.
        progress: show a byte progress bar.
    """
    src = Path(src)
    if not src.is_dir():
        raise ImportError_(f"{src}: not a directory")
    if quant is not None and quant.lower() not in QUANTS:
        raise UnsupportedError(f"--quant {quant} is not supported (choose {', '.join(QUANTS)})")
    qfmt = QUANTS[quant.lower()] if quant else None
    config = config_from_hf(src)
    files, tok_info = hf_tokenizer_files(src)
    has_head = any("lm_head.weight" in SafetensorsFile(p).header for p in _weight_files(src))
    raw_cfg = json.loads((src / "config.json").read_text())
    if not has_head or "tie_word_embeddings" not in raw_cfg:
        config.tie_word_embeddings = not has_head
    total = sum(p.stat().st_size for p in _weight_files(src))
    seen: set[str] = set()
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for name, fmt, arr in iter_hf_tensors(src):  # views of the memory-mapped files: nothing read yet
        if name in tensors:
            raise ImportError_(f"{src}: the weights hold {name} twice")
        tensors[name] = (fmt, arr)
    with byte_progress(total, f"import {src.name}", enabled=progress) as bar, StoreWriter(dst) as w:
        for name in sorted(tensors, key=_store_order):
            fmt, arr = tensors[name]
            if name == "output.weight" and config.tie_word_embeddings:
                continue  # tied: the head reads token_embd.weight
            seen.add(name)
            if arr.ndim == 1:
                w.add_tensor(name, to_f32(fmt, arr), "F32", arr.shape)
            elif qfmt and arr.shape[-1] % 32 == 0 and not name.endswith("ffn_gate_inp.weight"):  # routers stay exact
                from flashlm.kernels.repacked import pack  # Numba kernels: loaded only when needed

                w.add_tensor(name, *reversed(pack(qfmt, quantize(to_f32(fmt, arr), qfmt), arr.shape)), arr.shape)
            else:
                w.add_tensor(name, arr, fmt, arr.shape)
            if bar:
                bar(arr.nbytes)
        _check_complete(src, config, seen)
        for name, content in files.items():
            w.add_file(name, content)
        return w.commit(config, tokenizer=tok_info, source={"kind": "hf", "dir": src.name, "quant": quant, "importer_version": IMPORTER_VERSION})


def _check_complete(src: Path, config: ModelConfig, seen: set[str]) -> None:
    need = ["token_embd.weight", "output_norm.weight"]
    if not config.tie_word_embeddings:
        need.append("output.weight")
    for i in range(config.num_hidden_layers):
        for short in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"):
            need.append(f"blk.{i}.{short}.weight")
        if config.is_moe_layer(i):
            need.append(f"blk.{i}.ffn_gate_inp.weight")
            need += [f"blk.{i}.expert.{e}.ffn_{m}.weight" for e in range(config.num_experts) for m in ("gate", "up", "down")]
        else:
            need += [f"blk.{i}.ffn_{m}.weight" for m in ("gate", "up", "down")]
    missing = [n for n in need if n not in seen]
    if missing:
        raise ImportError_(f"{src}: the weights lack {len(missing)} tensors the config needs, e.g. {missing[0]}")
    extra = [n for n in seen if ".expert." in n and int(n.split(".")[3]) >= config.num_experts]
    if extra:
        raise ImportError_(f"{src}: the weights hold {extra[0]}, but config.json says num_experts = {config.num_experts}")

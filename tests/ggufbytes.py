"""Raw GGUF bytes, field by field, so tests can write files that lie: counts, lengths,
offsets, types and encodings that the `gguf` package's writer would never produce."""
from __future__ import annotations

import struct

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q8_0 = 0, 1, 8


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v) -> bytes:
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], v)
    if vtype == STRING:
        return string(v)
    if vtype == ARRAY:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(value(etype, x) for x in items)
    raise ValueError(vtype)


def kv(key: str | bytes, vtype: int, v) -> bytes:
    return string(key) + struct.pack("<I", vtype) + value(vtype, v)


def tensor_info(name: str | bytes, dims: list[int], ttype: int, offset: int) -> bytes:
    return string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ttype, offset)


def gguf(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", *, magic: bytes = b"GGUF", version: int = 3,
         n_tensors: int | None = None, n_kv: int | None = None, align: int = 32) -> bytes:
    """A GGUF file: header, metadata ``kvs`` (from :func:`kv`), tensor infos, padding, data."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes((-len(body)) % align) + data


def llama_meta(*, skip: str = "", **override) -> list[bytes]:
    """Metadata of a tiny llama (hidden 32, 1 layer, 4 heads) with a gpt2 tokenizer of 8 tokens."""
    fields = {
        "general.architecture": (STRING, "llama"),
        "llama.block_count": (U32, 1),
        "llama.context_length": (U32, 64),
        "llama.embedding_length": (U32, 32),
        "llama.feed_forward_length": (U32, 64),
        "llama.attention.head_count": (U32, 4),
        "llama.attention.head_count_kv": (U32, 2),
        "tokenizer.ggml.model": (STRING, "gpt2"),
        "tokenizer.ggml.pre": (STRING, "qwen2"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, list("abcdefgh"))),
        "tokenizer.ggml.token_type": (ARRAY, (I32, [1] * 8)),
        "tokenizer.ggml.merges": (ARRAY, (STRING, ["a b"])),
    }
    fields.update(override)
    return [kv(k, t, v) for k, (t, v) in fields.items() if k != skip]


def llama_tensors(vocab: int = 8, hidden: int = 32, ffn: int = 64, kv_dim: int = 16) -> tuple[list[bytes], bytes]:
    """F32 tensor infos and zero data of the tiny llama of :func:`llama_meta`, each 32-aligned."""
    shapes = {"token_embd.weight": [hidden, vocab], "output_norm.weight": [hidden],
              "blk.0.attn_norm.weight": [hidden], "blk.0.attn_q.weight": [hidden, hidden],
              "blk.0.attn_k.weight": [hidden, kv_dim], "blk.0.attn_v.weight": [hidden, kv_dim],
              "blk.0.attn_output.weight": [hidden, hidden], "blk.0.ffn_norm.weight": [hidden],
              "blk.0.ffn_gate.weight": [hidden, ffn], "blk.0.ffn_up.weight": [hidden, ffn],
              "blk.0.ffn_down.weight": [ffn, hidden]}
    infos, off = [], 0
    for name, dims in shapes.items():
        n = 4
        for d in dims:
            n *= d
        infos.append(tensor_info(name, dims, GGML_F32, off))
        off += n + (-n) % 32
    return infos, bytes(off)

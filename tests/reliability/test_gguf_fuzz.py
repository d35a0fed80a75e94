"""hypothesis fuzzes the GGUF reader: headers made of random metadata (every value type,
nested arrays, strings that are not UTF-8, lying lengths and counts) and tensor tables
(random dimensions, types and offsets), then truncated or with bytes flipped. Parsing
either succeeds, with every tensor inside the file and none overlapping, or raises a
FlashlmError; the importer's reading of the metadata likewise. Never another exception,
a hang or a crash. A few thousand files, about a minute."""
from __future__ import annotations

import os
import struct
import tempfile

from ggufbytes import ARRAY, STRING, string, tensor_info
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashlm.errors import FlashlmError
from flashlm.models.gguf_file import GGUFFile
from flashlm.models.gguf_import import config_from_gguf_meta

_SCALAR = {0: ("<B", st.integers(0, 255)), 1: ("<b", st.integers(-128, 127)), 2: ("<H", st.integers(0, 65535)),
           3: ("<h", st.integers(-32768, 32767)), 4: ("<I", st.integers(0, 2**32 - 1)),
           5: ("<i", st.integers(-2**31, 2**31 - 1)), 6: ("<f", st.floats(width=32)), 7: ("<?", st.booleans()),
           10: ("<Q", st.integers(0, 2**64 - 1)), 11: ("<q", st.integers(-2**63, 2**63 - 1)),
           12: ("<d", st.floats())}
KEYS = ["general.architecture", "general.alignment", "general.name", "llama.block_count", "llama.embedding_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.feed_forward_length",
        "llama.context_length", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.tokens", "qwen2.block_count", "qwen2.embedding_length", "qwen2.attention.head_count"]
TENSORS = ["token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight"]

text = st.one_of(st.sampled_from(["llama", "qwen2", "qwen3moe", "gpt2", ""]), st.text(max_size=12),
                 st.binary(max_size=12))  # bytes: possibly not UTF-8


@st.composite
def values(draw, depth=0):
    """(type id, encoded value) of a metadata value: any scalar, a string, or an array."""
    kinds = list(_SCALAR) + [STRING] + ([ARRAY] if depth < 3 else [])
    t = draw(st.sampled_from(kinds))
    if t in _SCALAR:
        fmt, strat = _SCALAR[t]
        return t, struct.pack(fmt, draw(strat))
    if t == STRING:
        return t, string(draw(text))
    et, _ = draw(values(depth + 1))
    items = [draw(values(depth + 1)) for _ in range(draw(st.integers(0, 4)))]
    items = [b for (it, b) in items if it == et] if et != ARRAY else []
    count = draw(st.one_of(st.just(len(items)), st.integers(0, 2**64 - 1)))  # the count may lie
    return ARRAY, struct.pack("<IQ", et, count) + b"".join(items)


@st.composite
def entry(draw):
    key = draw(st.one_of(st.sampled_from(KEYS), text))
    t, v = draw(values())
    return string(key) + struct.pack("<I", t) + v


@st.composite
def tensor(draw):
    name = draw(st.one_of(st.sampled_from(TENSORS), text))
    dims = draw(st.lists(st.one_of(st.sampled_from([1, 8, 32, 64, 256]), st.integers(0, 2**64 - 1)),
                         min_size=0, max_size=5))
    ttype = draw(st.one_of(st.sampled_from([0, 1, 2, 8, 12, 14, 30]), st.integers(0, 2**32 - 1)))
    offset = draw(st.one_of(st.sampled_from([0, 32, 64, 1024, 4096]), st.integers(0, 2**64 - 1)))
    return tensor_info(name, dims, ttype, offset)


@st.composite
def gguf_files(draw):
    version = draw(st.sampled_from([3, 3, 3, 2, 1, 4]))
    kvs = draw(st.lists(entry(), max_size=6))
    tensors = draw(st.lists(tensor(), max_size=5))
    n_kv = draw(st.one_of(st.just(len(kvs)), st.integers(0, 2**64 - 1)))
    n_t = draw(st.one_of(st.just(len(tensors)), st.integers(0, 2**64 - 1)))
    head = b"GGUF" + struct.pack("<IQQ", version, n_t, n_kv) + b"".join(kvs) + b"".join(tensors)
    raw = bytearray(head + bytes((-len(head)) % 32) + bytes(draw(st.sampled_from([0, 64, 4096, 70000]))))
    for _ in range(draw(st.integers(0, 3))):  # flipped bytes
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):  # truncated
        raw = raw[:draw(st.integers(0, len(raw)))]
    return bytes(raw)


_DIR = tempfile.mkdtemp(prefix="flashlm-fuzz-")
PATH = os.path.join(_DIR, "fuzz.gguf")


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(gguf_files())
def test_gguf_reader_never_crashes(raw):
    with open(PATH, "wb") as f:
        f.write(raw)
    try:
        g = GGUFFile(PATH)
    except FlashlmError:
        return
    spans = sorted((t.offset, t.offset + t.nbytes) for t in g.tensors.values())
    assert all(0 <= a and b <= len(raw) for a, b in spans)
    assert all(b0 <= a1 for (_, b0), (a1, _) in zip(spans, spans[1:]))
    try:
        config_from_gguf_meta(g.meta, {n: t.shape for n, t in g.tensors.items()}, PATH)
    except FlashlmError:
        pass
    g.close()

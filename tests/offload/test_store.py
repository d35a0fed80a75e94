"""The per-layer store: writing, opening, zero-copy views, bounds and version checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flashlm.errors import FlashlmError, StoreError
from flashlm.kernels.formats import row_nbytes
from flashlm.models.config import ModelConfig
from flashlm.offload.store import ALIGN, FORMAT_VERSION, Store, StoreWriter, file_for_tensor, is_store

CFG = ModelConfig(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=100)


def write_store(dst, rng=None):
    rng = rng or np.random.default_rng(0)
    tensors = {
        "token_embd.weight": ("F32", (100, 64), rng.standard_normal((100, 64)).astype(np.float32)),
        "blk.0.attn_norm.weight": ("F32", (64,), rng.standard_normal(64).astype(np.float32)),
        "blk.0.attn_q.weight": ("Q8_0", (64, 64), rng.integers(0, 255, (64, row_nbytes("Q8_0", 64)), dtype=np.uint8)),
        "blk.1.attn_q.weight": ("F16", (64, 64), rng.standard_normal((64, 64)).astype(np.float16)),
        "blk.1.ffn_up.weight": ("Q4_K", (3, 256), rng.integers(0, 255, (3, 144), dtype=np.uint8)),
        "output_norm.weight": ("F32", (64,), np.ones(64, np.float32)),
    }
    with StoreWriter(dst) as w:
        for name, (fmt, shape, arr) in tensors.items():
            w.add_tensor(name, arr, fmt, shape)
        w.add_file("tokenizer.json", "{}")
        w.commit(CFG, tokenizer={"file": "tokenizer.json", "chat_template_file": None})
    return tensors


def test_roundtrip_zero_copy_aligned(tmp_path):
    dst = tmp_path / "store"
    tensors = write_store(dst)
    s = Store(dst)
    assert s.config.num_hidden_layers == 2 and s.config.head_dim == 16
    for name, (fmt, shape, arr) in tensors.items():
        t = s.tensor(name)
        assert t.fmt == fmt and t.shape == shape
        assert np.array_equal(t.data, arr)
        assert s.tensor_info[name]["offset"] % ALIGN == 0
        assert s.tensor_info[name]["file"] == file_for_tensor(name)
        assert isinstance(t.data.base, np.memmap) or isinstance(t.data, np.memmap) or t.data.base is not None
    layer1 = s.layer(1)
    assert set(layer1) == {"attn_q.weight", "ffn_up.weight"}
    assert layer1["ffn_up.weight"].data.shape == (3, 144)
    assert sorted(p.name for p in dst.iterdir()) == ["embed.bin", "head.bin", "layer_000.bin", "layer_001.bin",
                                                     "manifest.json", "tokenizer.json"]
    for f in ("embed.bin", "layer_000.bin", "layer_001.bin", "head.bin"):
        assert (dst / f).stat().st_size % ALIGN == 0
    assert s.verify() == []


def test_views_do_not_write_through(tmp_path):
    dst = tmp_path / "store"
    write_store(dst)
    s = Store(dst)
    before = (dst / "embed.bin").read_bytes()
    s.tensor("token_embd.weight").data[0, 0] = 123.0
    assert (dst / "embed.bin").read_bytes() == before


def test_verify_detects_changed_bytes(tmp_path):
    dst = tmp_path / "store"
    write_store(dst)
    p = dst / "layer_000.bin"
    b = bytearray(p.read_bytes())
    b[10] ^= 0xFF
    p.write_bytes(bytes(b))
    assert Store(dst).verify() == ["layer_000.bin"]


def test_missing_layer_file(tmp_path):
    dst = tmp_path / "store"
    write_store(dst)
    (dst / "layer_001.bin").unlink()
    with pytest.raises(StoreError, match=r"layer_001\.bin is missing"):
        Store(dst)


def test_resized_layer_file(tmp_path):
    dst = tmp_path / "store"
    write_store(dst)
    with open(dst / "layer_000.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match=r"layer_000\.bin is 100 bytes, the manifest says"):
        Store(dst)


def test_newer_format_version(tmp_path):
    dst = tmp_path / "store"
    write_store(dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["version"] = FORMAT_VERSION + 1
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=rf"format version {FORMAT_VERSION + 1} is newer than this flashlm reads "
                                         rf"\({FORMAT_VERSION}\)"):
        Store(dst)


def test_version_1_store_still_opens(tmp_path):
    """Stores written before store-only layouts (version 1: GGUF block formats only) open."""
    dst = tmp_path / "store"
    write_store(dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["version"] = 1
    (dst / "manifest.json").write_text(json.dumps(m))
    assert Store(dst).tensor_info


@pytest.mark.parametrize("fmt,cols,version,opens", [("Q4_KR", 3072, 4, True), ("Q4_KR", 3328, 4, False),
                                                    ("Q4_KR", 3328, 5, True), ("Q5_0R", 3072, 5, True),
                                                    ("Q5_0R", 3328, 5, False), ("Q5_0R", 3328, 6, True)])
def test_older_store_with_long_unslabbed_rows_is_refused(tmp_path, fmt, cols, version, opens):
    """Q4_KR/Q6_KR rows were row-major at any length before store version 5, Q5_0R's before 6:
    a longer row than one slab (3072 weights) would be misread, so such a store asks to be
    re-imported; rows of one slab are the same bytes either way and open."""
    dst = tmp_path / "store"
    with StoreWriter(dst) as w:
        w.add_tensor("blk.0.ffn_down.weight", np.zeros((2, row_nbytes(fmt, cols)), np.uint8), fmt, (2, cols))
        w.add_file("tokenizer.json", "{}")
        w.commit(CFG, tokenizer={"file": "tokenizer.json", "chat_template_file": None})
    m = json.loads((dst / "manifest.json").read_text())
    m["version"] = version
    (dst / "manifest.json").write_text(json.dumps(m))
    if opens:
        assert Store(dst).tensor("blk.0.ffn_down.weight").shape == (2, cols)
    else:
        with pytest.raises(StoreError, match="before long rows were kept in column slabs; re-import the model"):
            Store(dst)


def test_tensor_out_of_bounds_in_manifest(tmp_path):
    dst = tmp_path / "store"
    write_store(dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["tensors"]["output_norm.weight"]["offset"] += 1 << 20
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="not within head.bin"):
        Store(dst)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a flashlm store"):
        Store(tmp_path)
    assert issubclass(StoreError, FlashlmError)


def test_interrupted_write_leaves_nothing(tmp_path):
    dst = tmp_path / "store"
    with pytest.raises(RuntimeError):
        with StoreWriter(dst) as w:
            w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32), "F32", (4, 64))
            raise RuntimeError("killed")
    assert not dst.exists() and not is_store(dst)
    assert list(tmp_path.iterdir()) == []


def test_wrong_byte_count_rejected(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        with pytest.raises(StoreError, match="needs"):
            w.add_tensor("blk.0.x", np.zeros(10, np.uint8), "Q8_0", (1, 32))

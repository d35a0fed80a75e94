"""Weights sources: DictWeights, gguf_weights (zero-copy GGUF views), and parity with the store."""
from __future__ import annotations

import numpy as np
import pytest
from synth import write_tiny_gguf

from flashlm.errors import GGUFError
from flashlm.kernels.formats import QTensor
from flashlm.models import build_model
from flashlm.models.gguf_import import import_gguf
from flashlm.models.weights import DictWeights, gguf_weights
from flashlm.offload.store import Store
from flashlm.runtime.backend import NumpyBackend
from flashlm.runtime.kvcache import KVCache


def test_dict_weights_layers():
    t = {n: QTensor(np.zeros(2, np.float32), "F32", (2,))
         for n in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_q.bias", "blk.1.ffn_up.weight")}
    w = DictWeights(t)
    assert w.n_layers == 2 and w.has("token_embd.weight") and not w.has("output.weight")
    assert set(w.layer(0)) == {"attn_q.weight", "attn_q.bias"}
    assert w.layer(1)["ffn_up.weight"] is t["blk.1.ffn_up.weight"]
    w.layer(0).clear()  # a fresh dict each time
    assert len(w.layer(0)) == 2
    with pytest.raises(KeyError, match="layer 5"):
        w.layer(5)
    with pytest.raises(KeyError, match="output.weight"):
        w.tensor("output.weight")


@pytest.mark.parametrize("arch,fmt,tied", [("llama", "Q8_0", True), ("qwen2", "Q4_0", False), ("qwen3", "F16", False)])
def test_gguf_weights_zero_copy_and_config(tmp_path, arch, fmt, tied):
    import gguf

    path = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, fmt=fmt, tied=tied)
    cfg, w = gguf_weights(path)
    assert (cfg.model_type, cfg.tie_word_embeddings, cfg.num_hidden_layers) == (arch, tied, 2)
    assert cfg.rope_layout == ("interleaved" if arch == "llama" else "neox")
    assert w.has("output.weight") != tied
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        q = w.tensor(t.name)
        assert q.fmt == t.tensor_type.name and q.shape == tuple(int(s) for s in reversed(t.shape))
        assert np.array_equal(q.data.reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8))
        assert not q.data.flags.owndata  # a view of the memory map
    q = w.layer(0)["attn_q.weight"]
    assert q.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)


def test_gguf_and_store_give_the_same_logits(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch="qwen2", fmt="Q8_0")
    cfg, w = gguf_weights(path)
    store = Store(import_gguf(path, tmp_path / "store"))
    assert store.config.to_dict() | {"extra": {}} == cfg.to_dict() | {"extra": {}}
    ids = np.arange(1, 9)
    a = build_model(cfg, w, NumpyBackend()).forward(ids, None, KVCache.for_config(cfg, 16), all_logits=True)
    b = build_model(store.config, store, NumpyBackend())
    b = b.forward(ids, None, b.make_cache(16), all_logits=True)
    assert np.array_equal(a, b)


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="x.gguf"):
        gguf_weights(bad)

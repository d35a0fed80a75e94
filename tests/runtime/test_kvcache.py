"""KVCache: preallocated size (f32 and f16), offset bookkeeping, trim/reset, overflow error."""
from __future__ import annotations

import numpy as np
import pytest

from flashlm.errors import InputError
from flashlm.models.config import ModelConfig
from flashlm.runtime.kvcache import KVCache

CFG = ModelConfig(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=32)


def test_size_in_bytes():
    c = KVCache.for_config(CFG, max_ctx=100)
    # k and v, 3 layers, 2 kv heads, 100 positions, head_dim 16, float32
    assert c.nbytes == 2 * 3 * 2 * 100 * 16 * 4 == KVCache.bytes_for(CFG, 100)
    assert len(c.k) == len(c.v) == 3
    assert c.k[0].shape == (2, 100, 16) and c.k[0].dtype == np.float32 and c.k[0].flags.c_contiguous


def test_advance_trim_reset():
    c = KVCache(1, 1, 4, max_ctx=10)
    assert c.reserve(6) == 0
    c.advance(6)
    assert (c.offset, c.room) == (6, 4)
    assert c.trim(2) == 2 and c.offset == 4
    assert c.trim(100) == 4 and c.offset == 0  # never below zero
    c.advance(3)
    c.reset()
    assert c.offset == 0 and c.nbytes == 2 * 10 * 4 * 4  # memory kept


def test_overflow_names_the_limit():
    c = KVCache(1, 1, 4, max_ctx=8)
    c.advance(5)
    with pytest.raises(InputError, match=r"limit of 8.*--ctx"):
        c.reserve(4)
    with pytest.raises(InputError, match="--ctx"):
        c.advance(4)
    assert c.offset == 5
    c.advance(3)  # exactly full is fine
    assert c.room == 0


def test_bad_size():
    with pytest.raises(InputError):
        KVCache(1, 1, 4, max_ctx=0)


def test_f16_cache_takes_two_bytes_per_element():
    c = KVCache.for_config(CFG, max_ctx=100, dtype="f16")
    assert c.dtype == "f16" and c.k[0].dtype == np.uint16 and c.v[2].shape == (2, 100, 16)
    assert c.nbytes == 2 * 3 * 2 * 100 * 16 * 2 == KVCache.bytes_for(CFG, 100, kv="f16")
    assert KVCache.bytes_for(CFG, 100, kv="f32") == 2 * c.nbytes == KVCache.for_config(CFG, 100).nbytes
    assert "f16" in repr(c)


@pytest.mark.parametrize("bad", ["f8", "F16", "float16", None, 16])
def test_bad_kv_type(bad):
    with pytest.raises(InputError, match="use f16 or f32"):
        KVCache(1, 1, 4, max_ctx=4, dtype=bad)
    with pytest.raises(InputError, match="use f16 or f32"):
        KVCache.bytes_for(CFG, 4, kv=bad)

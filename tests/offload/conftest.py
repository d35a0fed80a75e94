"""Tiny stores for the offload tests (tests/synth.py writes the GGUF, import_gguf the store)."""
from __future__ import annotations

import pytest
from synth import tiny_store as make_tiny_store

from flashlm.offload.store import Store


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Store:
    """A 6-layer qwen2 (biases) in Q8_0 with an untied Q8_0 head."""
    return make_tiny_store(tmp_path_factory.mktemp("tiny"), arch="qwen2", n_layers=6, hidden=128, ffn=256, n_heads=4,
                           n_kv=2)

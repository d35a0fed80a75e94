"""The three real models from the catalog: import, info, tensor bytes, tokenizer ids."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from realmodels import golden, real_store_path

from flashlm.cli import main
from flashlm.kernels.repacked import GGUF_OF, STORE_LAYOUT, unpack
from flashlm.models.pull import gguf_path
from flashlm.models.registry import catalog
from flashlm.offload.store import Store


def test_info_layers_and_formats(real_model, capsys):
    store = Store(real_store_path(real_model))
    entry = catalog()[real_model]
    assert main(["info", real_model, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == entry["layers"] == store.config.num_hidden_layers
    assert info["architecture"] == entry["architecture"]
    assert info["hidden_size"] == entry["hidden"] and info["vocab_size"] == entry["vocab"]
    # as stored: quantized formats in their store layouts (Q5_0R, Q4_KR, Q8_0S ...; kernels/repacked.py)
    assert {GGUF_OF.get(f, f): v["tensors"] for f, v in info["formats"].items()} == entry["formats"]


def test_every_tensor_equals_gguf_bytes(real_model):
    """Every tensor's GGUF bytes, unpacked from its store layout where it has one."""
    store = Store(real_store_path(real_model))
    reader = gguf.GGUFReader(str(gguf_path(real_model)))
    assert len(reader.tensors) == len(store.tensor_info)
    for t in reader.tensors:
        ours = store.tensor(t.name)
        assert ours.fmt == STORE_LAYOUT.get(t.tensor_type.name, t.tensor_type.name), t.name
        assert ours.shape == tuple(int(x) for x in reversed(t.shape)), t.name
        fmt, data = unpack(ours.fmt, ours.data, ours.shape)
        assert fmt == t.tensor_type.name, t.name
        assert np.array_equal(data.reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


def test_store_checksums(real_model):
    assert Store(real_store_path(real_model)).verify() == []


def test_tokenize_matches_llama_cpp(real_model):
    from flashlm.api import open_tokenizer

    tok = open_tokenizer(Store(real_store_path(real_model)))
    cases = golden(real_model)["tokenize"]
    bad = [(c["text"], tok.encode(c["text"]), c["ids"]) for c in cases if tok.encode(c["text"]) != c["ids"]]
    assert not bad, bad[:3]


def test_cli_tokenize_json(capsys):
    name = "smollm2-135m"
    real_store_path(name)
    case = golden(name)["tokenize"][0]
    assert main(["tokenize", name, case["text"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == case["ids"]


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b"])
def test_chat_prompt_ids(name):
    from flashlm.api import open_tokenizer

    tok = open_tokenizer(Store(real_store_path(name)))
    for case in golden(name)["chat"]:
        text = tok.apply_chat_template(case["messages"], add_generation_prompt=True)
        assert text == case["prompt"]
        assert tok.encode(text) == case["prompt_ids"]

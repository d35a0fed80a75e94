"""HF (safetensors) import: dtypes, shards, tied heads, quantization, bad input."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from synth import f32_to_bf16, write_tiny_hf

from flashlm.errors import ImportError_, UnsupportedError
from flashlm.kernels.formats import STORE_LAYOUT
from flashlm.kernels.repacked import unpack
from flashlm.models.hf_import import gguf_name, import_hf
from flashlm.offload.store import Store

ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def as_f32(t):
    if t.fmt == "BF16":
        return (t.data.astype(np.uint32) << 16).view(np.float32)
    return t.data.astype(np.float32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_import_keeps_dtype(tmp_path, arch, dtype):
    W = write_tiny_hf(tmp_path / "hf", arch=arch, dtype=dtype)
    s = Store(import_hf(tmp_path / "hf", tmp_path / "store"))
    assert s.config.model_type == {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[arch]
    assert s.config.rope_layout == "neox"
    assert len(s.tensor_info) == len(W)
    for hf_name, ref in W.items():
        t = s.tensor(gguf_name(hf_name))
        if ref.ndim == 1:
            assert t.fmt == "F32"  # norms and biases become f32
            want = {"F32": ref, "F16": ref.astype(np.float16).astype(np.float32),
                    "BF16": (f32_to_bf16(ref).astype(np.uint32) << 16).view(np.float32)}[dtype]
            np.testing.assert_array_equal(t.data, want)
        else:
            assert t.fmt == dtype and t.shape == ref.shape
            if dtype == "BF16":
                np.testing.assert_array_equal(t.data, f32_to_bf16(ref))
            else:
                np.testing.assert_array_equal(t.data, ref.astype(t.data.dtype))


def test_sharded_and_tied(tmp_path):
    W = write_tiny_hf(tmp_path / "hf", tied=True, shards=3)
    s = Store(import_hf(tmp_path / "hf", tmp_path / "store"))
    assert s.config.tie_word_embeddings and not s.has("output.weight")
    np.testing.assert_array_equal(s.tensor("token_embd.weight").data, W["model.embed_tokens.weight"])
    assert s.tokenizer_info["eos_token"] == "<|im_end|>" and s.tokenizer_info["eos_token_id"] is not None
    assert s.chat_template is not None


@pytest.mark.parametrize("quant,fmt", [("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_quantize_equals_gguf(tmp_path, quant, fmt):
    W = write_tiny_hf(tmp_path / "hf", arch="Qwen2ForCausalLM", dtype="BF16")
    s = Store(import_hf(tmp_path / "hf", tmp_path / "store", quant=quant))
    for hf_name, ref in W.items():
        t = s.tensor(gguf_name(hf_name))
        if ref.ndim == 1:
            assert t.fmt == "F32"
            continue
        src = (f32_to_bf16(ref).astype(np.uint32) << 16).view(np.float32)
        expect = gguf.quants.quantize(src, gguf.GGMLQuantizationType[fmt])
        assert t.fmt == STORE_LAYOUT[fmt]  # as a store keeps it (column slabs for long rows)
        assert unpack(t.fmt, t.data, t.shape)[1].tobytes() == expect.tobytes(), hf_name


def test_missing_config(tmp_path):
    write_tiny_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(ImportError_, match=r"hf: no config\.json"):
        import_hf(tmp_path / "hf", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_missing_tokenizer(tmp_path):
    write_tiny_hf(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    with pytest.raises(ImportError_, match=r"no tokenizer\.json"):
        import_hf(tmp_path / "hf", tmp_path / "store")


def test_missing_weights(tmp_path):
    write_tiny_hf(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ImportError_, match=r"no model\.safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "store")


def test_missing_shard(tmp_path):
    write_tiny_hf(tmp_path / "hf", shards=2)
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ImportError_, match=r"shard model-00002-of-00002\.safetensors .* is missing"):
        import_hf(tmp_path / "hf", tmp_path / "store")


def test_unsupported_architecture(tmp_path):
    write_tiny_hf(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match=r"GPT2LMHeadModel.*is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "store")


def test_bad_quant(tmp_path):
    write_tiny_hf(tmp_path / "hf")
    with pytest.raises(UnsupportedError, match=r"--quant q3_k is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "store", quant="q3_k")

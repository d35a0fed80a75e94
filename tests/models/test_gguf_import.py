"""GGUF import on tiny synthetic files, and every bad-input error."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from synth import write_tiny_gguf

from flashlm.errors import GGUFError, UnsupportedError
from flashlm.kernels.repacked import STORE_LAYOUT, unpack
from flashlm.models.gguf_file import GGUFFile
from flashlm.models.gguf_import import import_gguf
from flashlm.offload.store import Store, is_store


def reference_tensors(path):
    """Tensor name -> (type name, raw bytes, logical shape) read by gguf-py's reader."""
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes()), tuple(int(x) for x in reversed(t.shape)))
            for t in r.tensors}


@pytest.mark.parametrize("fmt", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_import_keeps_values(tmp_path, arch, fmt):
    """Every tensor's bytes as gguf-py reads them; quantized formats in their store layouts (Q5_0R, Q4_KR, Q8_0S ...), whose
    unpacked blocks are those bytes."""
    hidden = 256 if fmt.endswith("_K") else 64
    src = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, fmt=fmt, hidden=hidden, ffn=256, n_heads=4, n_kv=2)
    store = Store(import_gguf(src, tmp_path / "store"))
    ref = reference_tensors(src)
    assert set(store.tensor_info) == set(ref)
    for name, (tname, raw, shape) in ref.items():
        t = store.tensor(name)
        assert t.fmt == STORE_LAYOUT.get(tname, tname), name
        assert t.shape == shape, name
        gfmt, data = unpack(t.fmt, t.data, t.shape)
        assert gfmt == tname and data.tobytes() == raw, name
    c = store.config
    assert c.model_type == arch and c.num_hidden_layers == 2 and c.hidden_size == hidden
    assert c.num_attention_heads == 4 and c.num_key_value_heads == 2 and c.head_dim == hidden // 4
    assert c.rope_layout == ("interleaved" if arch == "llama" else "neox")
    assert c.attention_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    assert not c.tie_word_embeddings
    assert store.chat_template.startswith("{% for m in messages %}")
    assert store.tokenizer_path.is_file()


def test_tied_embeddings_detected(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf", tied=True)
    s = Store(import_gguf(src, tmp_path / "store"))
    assert s.config.tie_word_embeddings and not s.has("output.weight")


def test_tokenizer_from_tiny_gguf(tmp_path):
    from tokenizers import Tokenizer

    src = write_tiny_gguf(tmp_path / "m.gguf")
    s = Store(import_gguf(src, tmp_path / "store"))
    tok = Tokenizer.from_file(str(s.tokenizer_path))
    ids = tok.encode("hello world<|im_end|>", add_special_tokens=False).ids
    vocab = tok.get_vocab()
    assert ids == [vocab["hello"], vocab["Ġworld"], vocab["<|im_end|>"]]
    assert s.tokenizer_info["eos_token_id"] == vocab["<|im_end|>"]


# ---- bad input ----


def test_bad_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(GGUFError, match=r"x\.gguf: not a GGUF file \(bad magic"):
        import_gguf(p, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_tiny_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)


def test_truncated_header(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:2000])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated GGUF file"):
        import_gguf(cut, tmp_path / "store")
    assert not is_store(tmp_path / "store")


def test_tensor_data_past_end(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf")
    data = src.read_bytes()
    cut = tmp_path / "short.gguf"
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(GGUFError, match=r"short\.gguf: tensor \S+ data .* lies past the end of the file"):
        import_gguf(cut, tmp_path / "store")
    assert not is_store(tmp_path / "store")


def test_unsupported_architecture(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf", arch="gemma")
    with pytest.raises(UnsupportedError, match=r"architecture 'gemma' is not supported"):
        import_gguf(src, tmp_path / "store")


def test_unsupported_tensor_type(tmp_path):
    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 110), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q3_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match=r"tensor token_embd\.weight has type Q3_K, which flashlm does not run"):
        import_gguf(src, tmp_path / "store")


def test_unsupported_version(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0) + bytes(64))
    with pytest.raises(GGUFError, match="GGUF version 9 is not supported"):
        GGUFFile(p)

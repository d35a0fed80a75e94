"""Damaged and hostile GGUF files: each is a clear GGUFError / UnsupportedError (a
FlashlmError naming the file and the problem) from the parser or the importer, and
`flashlm convert` prints `error: ...` and exits 2 with no traceback and no store."""
from __future__ import annotations

import struct

import pytest
from ggufbytes import (ARRAY, GGML_F32, I32, STRING, U32, U64, gguf, kv, llama_meta, llama_tensors, string,
                       tensor_info)

from flashlm.cli import main
from flashlm.errors import FlashlmError, GGUFError, UnsupportedError
from flashlm.models.gguf_file import GGUFFile
from flashlm.models.gguf_import import import_gguf


def valid() -> bytes:
    infos, data = llama_tensors()
    return gguf(llama_meta(), infos, data)


def header_end(raw: bytes) -> int:
    """Where the tensor data starts in a file made by :func:`valid`."""
    infos, data = llama_tensors()
    return len(raw) - len(data)


CASES = {
    "bad magic": (lambda: b"GGML" + valid()[4:], GGUFError, "bad magic"),
    "not gguf at all": (lambda: b"\x7fELF" + bytes(100), GGUFError, "not a GGUF file"),
    "empty file": (lambda: b"", GGUFError, "only 0 bytes"),
    "bad version": (lambda: b"GGUF" + struct.pack("<I", 99) + valid()[8:], GGUFError, "version 99"),
    "truncated header": (lambda: valid()[:200], GGUFError, "truncated GGUF file"),
    "tensor count lie": (lambda: gguf(llama_meta(), llama_tensors()[0], llama_tensors()[1], n_tensors=12),
                         GGUFError, "corrupt header|truncated GGUF file"),
    "metadata count lie": (lambda: gguf(llama_meta(), [], n_kv=1 << 40), GGUFError, "corrupt GGUF header"),
    "tensor offset past the end": (
        lambda: gguf(llama_meta(), [tensor_info("token_embd.weight", [32, 8], GGML_F32, 1 << 30)], bytes(1024)),
        GGUFError, "past the end"),
    "tensor size past the end": (
        lambda: gguf(llama_meta(), [tensor_info("token_embd.weight", [32, 1 << 20], GGML_F32, 0)], bytes(1024)),
        GGUFError, "past the end"),
    "overlapping tensors": (
        lambda: gguf(llama_meta(), [tensor_info("a.weight", [32, 8], GGML_F32, 0),
                                    tensor_info("b.weight", [32, 8], GGML_F32, 512)], bytes(2048)),
        GGUFError, "overlap"),
    "absurd dimensions": (
        lambda: gguf(llama_meta(), [tensor_info("a.weight", [1 << 62, 1 << 62], GGML_F32, 0)], bytes(64)),
        GGUFError, "dimensions"),
    "zero dimension": (lambda: gguf(llama_meta(), [tensor_info("a.weight", [32, 0], GGML_F32, 0)], bytes(64)),
                       GGUFError, "dimensions"),
    "too many dimensions": (lambda: gguf(llama_meta(), [tensor_info("a.weight", [2] * 9, GGML_F32, 0)], bytes(64)),
                            GGUFError, "9 dimensions"),
    "unknown tensor type": (lambda: gguf(llama_meta(), [tensor_info("a.weight", [32, 8], 99, 0)], bytes(1024)),
                            UnsupportedError, "type id 99"),
    "unsupported tensor type": (lambda: gguf(llama_meta(), [tensor_info("a.weight", [256, 8], 10, 0)], bytes(1024)),
                                UnsupportedError, "Q2_K"),
    "misaligned tensor offset": (lambda: gguf(llama_meta(), [tensor_info("a.weight", [32, 8], GGML_F32, 3)],
                                              bytes(2048)), GGUFError, "alignment"),
    "string length past the end": (lambda: gguf([struct.pack("<Q", 1 << 60) + b"general.architecture"], []),
                                   GGUFError, "truncated GGUF file"),
    "string array count lie": (lambda: gguf([kv("x", ARRAY, (STRING, ["a"]))[:-9] + struct.pack("<Q", 1 << 50)], []),
                               GGUFError, "truncated GGUF file"),
    "duplicate tensor names": (
        lambda: gguf(llama_meta(), [tensor_info("a.weight", [32, 8], GGML_F32, 0),
                                    tensor_info("a.weight", [32, 8], GGML_F32, 1024)], bytes(2048)),
        GGUFError, "appears twice"),
    "duplicate metadata keys": (lambda: gguf(llama_meta() + [kv("llama.block_count", U32, 2)], []),
                                GGUFError, "appears twice"),
    "non-UTF-8 metadata key": (lambda: gguf([kv(b"general.\xff\xfe", STRING, "llama")], []), GGUFError, "not UTF-8"),
    "non-UTF-8 metadata value": (lambda: gguf([kv("general.name", STRING, b"caf\xe9")], []), GGUFError, "not UTF-8"),
    "non-UTF-8 tensor name": (lambda: gguf([], [tensor_info(b"blk.\xc3", [8], GGML_F32, 0)], bytes(64)),
                              GGUFError, "not UTF-8"),
    "unknown value type": (lambda: gguf([string("k") + struct.pack("<I", 77) + bytes(16)], []), GGUFError,
                           "unknown value type 77"),
    "arrays nested too deep": (
        lambda: gguf([string("k") + struct.pack("<I", ARRAY) + (struct.pack("<IQ", ARRAY, 1)) * 5000
                      + struct.pack("<IQ", U32, 0)], []), GGUFError, "nests arrays"),
    "alignment zero": (lambda: gguf([kv("general.alignment", U32, 0)], []), GGUFError, "general.alignment"),
    "alignment not a power of two": (lambda: gguf([kv("general.alignment", U32, 24)], []), GGUFError,
                                     "general.alignment"),
    "alignment of the wrong type": (lambda: gguf([kv("general.alignment", STRING, "32")], []), GGUFError,
                                    "general.alignment"),
}

IMPORT_CASES = {  # files the parser reads but the importer must refuse
    "missing architecture": (dict(skip="general.architecture"), GGUFError, "general.architecture"),
    "architecture of the wrong type": ({"general.architecture": (U32, 7)}, GGUFError, "general.architecture"),
    "unknown architecture": ({"general.architecture": (STRING, "gpt-j")}, UnsupportedError, "not supported"),
    "missing block_count": (dict(skip="llama.block_count"), GGUFError, "lacks llama.block_count"),
    "missing head_count": (dict(skip="llama.attention.head_count"), GGUFError, "lacks llama.attention.head_count"),
    "head_count zero": ({"llama.attention.head_count": (U32, 0)}, GGUFError, "positive integer"),
    "head_count of the wrong type": ({"llama.attention.head_count": (STRING, "4")}, GGUFError, "positive integer"),
    "inconsistent kv heads": ({"llama.attention.head_count_kv": (U32, 3)}, GGUFError, "consistent attention"),
    "rope base of the wrong type": ({"llama.rope.freq_base": (STRING, "1e4")}, GGUFError, "expected a number"),
    "missing tokenizer tokens": (dict(skip="tokenizer.ggml.tokens"), GGUFError, "tokenizer"),
    "tokens of the wrong type": ({"tokenizer.ggml.tokens": (ARRAY, (I32, [1, 2]))}, FlashlmError, "tokenizer"),
    "huge context length": ({"llama.context_length": (U64, 1 << 62)}, GGUFError, "positive integer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parser_refuses(case, tmp_path):
    make, exc, message = CASES[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(make())
    with pytest.raises(exc, match=message) as info:
        GGUFFile(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_importer_refuses(case, tmp_path):
    meta, exc, message = IMPORT_CASES[case]
    skip = meta.pop("skip", "") if isinstance(meta, dict) and "skip" in meta else ""
    infos, data = llama_tensors()
    p = tmp_path / "bad.gguf"
    p.write_bytes(gguf(llama_meta(skip=skip, **{k: v for k, v in meta.items()}), infos, data))
    with pytest.raises(exc, match=message):
        import_gguf(p, tmp_path / "store")
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob(".store.tmp-*"))


def test_a_valid_file_of_the_same_kind_imports(tmp_path):
    """The baseline the cases above break: it imports."""
    p = tmp_path / "ok.gguf"
    p.write_bytes(valid())
    assert (import_gguf(p, tmp_path / "store") / "manifest.json").is_file()


@pytest.mark.parametrize("case", ["bad magic", "tensor count lie", "overlapping tensors", "non-UTF-8 metadata value",
                                  "unknown tensor type"])
def test_convert_prints_an_error_and_exits_2(case, tmp_path, capsys):
    p = tmp_path / "bad.gguf"
    p.write_bytes(CASES[case][0]())
    assert main(["convert", str(p), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and str(p) in err
    assert not (tmp_path / "out").exists()

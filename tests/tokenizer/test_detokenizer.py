"""Tokenizer wrapper and StreamingDetokenizer.

Most tests use tiny tokenizers built here with `tokenizers` (a GPT-2 style
byte-level BPE and a SentencePiece-style BPE with byte fallback), so they do not
depend on a model file; the last tests use the real GGUF tokenizers when the
GGUF tokenizer builder and the files are there.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from synth import bytes_to_unicode
from realmodels import GOLDEN, gguf_by_stem
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from flashlm.errors import FlashlmError, InputError
from flashlm.runtime.tokenizer import StreamingDetokenizer, Tokenizer

GOLDEN_DIR = GOLDEN

TEXTS = [
    "Hello, world!",
    "Rocket 🚀 launch🚀🚀 done",
    "你好，世界！今天天气很好。",
    "Emoji: 🚀🔥👍🏽 and symbols ∑∫√∞ café",
    "  leading spaces and trailing   ",
    "mixed<|im_end|>special🚀<s>",
]


# ---- synthetic tokenizers ----

def byte_level_bpe() -> HFTokenizer:
    """256 byte tokens plus merges that split multi-byte characters across tokens:
    🚀 = [F0 9F][9A 80], 你 = [E4][BD A0], Ġw-o-r-l-d merged fully."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    merges = []

    def merge(a: str, b: str) -> None:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))

    u = lambda *bs: "".join(b2u[b] for b in bs)  # noqa: E731
    merge(u(0xF0), u(0x9F))
    merge(u(0x9A), u(0x80))
    merge(u(0xBD), u(0xA0))
    for a, b in [("Ġ", "w"), ("Ġw", "o"), ("Ġwo", "r"), ("Ġwor", "l"), ("Ġworl", "d"),
                 ("H", "e"), ("He", "l"), ("Hel", "l"), ("Hell", "o")]:
        merge(a, b)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    return tok


def spm_bpe() -> HFTokenizer:
    """A llama-style tokenizer: ▁ for spaces, byte fallback, a decoder that strips
    the leading space of the first token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "H", "e", "l", "o", "w", "r", "d", ",", "!", "▁w", "▁wo", "He", "ll",
                  "llo", "Hello", "a", "c", "f", "é", "▁c", "▁a", "n"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "w"), ("▁w", "o"), ("H", "e"), ("l", "l"), ("ll", "o"), ("He", "llo"),
              ("▁", "c"), ("▁", "a")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer(byte_level_bpe().to_str(), eos_token="</s>", bos_token="<s>", add_bos=True)


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer(spm_bpe(), bos_token_id=1, eos_token_id=2, add_bos=True)


def stream(tok: Tokenizer, ids: list[int], **kw) -> tuple[list[str], StreamingDetokenizer]:
    d = tok.detokenizer(**kw)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.flush())
    return pieces, d


# ---- Tokenizer ----

def test_special_ids_and_strings(bpe):
    assert bpe.bos_token_id == bpe.token_to_id("<s>")
    assert bpe.eos_token_id == bpe.token_to_id("</s>")
    assert bpe.bos_token == "<s>" and bpe.eos_token == "</s>"
    # EOS plus the end-of-turn token the vocabulary has
    assert bpe.stop_token_ids == {bpe.eos_token_id, bpe.token_to_id("<|im_end|>")}
    assert bpe.vocab_size == len(byte_level_bpe().get_vocab())


def test_from_files_special_dict(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(byte_level_bpe().to_str(), encoding="utf-8")
    tok = Tokenizer.from_files(p, chat_template="{{ messages[0].content }}",
                               special={"bos_token_id": 256, "eos_token_id": 257,
                                        "stop_token_ids": [258], "add_bos_token": True})
    assert (tok.bos_token_id, tok.eos_token_id) == (256, 257)
    assert tok.bos_token == tok.id_to_token(256)  # looked up from the id
    assert tok.stop_token_ids == {257, 258}
    assert tok.add_bos
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    # same from the JSON text, no special dict
    tok2 = Tokenizer.from_files(p.read_text(encoding="utf-8"))
    assert tok2.bos_token_id is None and tok2.eos_token_id is None and not tok2.add_bos
    assert tok2.stop_token_ids == {tok2.token_to_id("<|im_end|>")}


def test_from_files_errors(tmp_path):
    with pytest.raises(FlashlmError, match="cannot read"):
        Tokenizer.from_files(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(FlashlmError, match="not a valid tokenizer.json"):
        Tokenizer.from_files(bad)
    with pytest.raises(FlashlmError, match="outside the vocabulary"):
        Tokenizer(byte_level_bpe(), eos_token_id=10**6)


def test_encode_decode_roundtrip(bpe, spm):
    for tok in (bpe, spm):
        for text in TEXTS:
            assert tok.decode(tok.encode(text)) == text
    b2u = bytes_to_unicode()
    assert bpe.encode("🚀") == [bpe.token_to_id(b2u[0xF0] + b2u[0x9F]),
                               bpe.token_to_id(b2u[0x9A] + b2u[0x80])]


def test_encode_special_options(bpe):
    im_end = bpe.token_to_id("<|im_end|>")
    assert im_end in bpe.encode("a<|im_end|>b")
    plain = bpe.encode("a<|im_end|>b", parse_special=False)
    assert im_end not in plain and bpe.decode(plain) == "a<|im_end|>b"
    assert im_end in bpe.encode("a<|im_end|>b")  # the option does not stick
    assert bpe.encode("Hello", add_special=True) == [bpe.bos_token_id] + bpe.encode("Hello")
    no_bos = Tokenizer(byte_level_bpe(), bos_token="<s>", add_bos=False)
    assert no_bos.encode("Hello", add_special=True) == no_bos.encode("Hello")
    assert bpe.decode(bpe.encode("x<|im_end|>", add_special=True), skip_special=True) == "x"
    assert bpe.encode_batch(["Hello", "a<|im_end|>"], add_special=True) == [
        bpe.encode("Hello", add_special=True), bpe.encode("a<|im_end|>", add_special=True)]
    with pytest.raises(InputError):
        bpe.encode_batch("not a list")


def test_no_chat_template(bpe):
    with pytest.raises(InputError, match="no chat template"):
        bpe.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- StreamingDetokenizer ----

@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_stream_equals_full_decode(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text)
    pieces, d = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == d.text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_holds_half_characters(bpe):
    ids = bpe.encode("a🚀b")
    assert len(ids) == 4  # a, [F0 9F], [9A 80], b
    d = bpe.detokenizer()
    assert [d.add(i) for i in ids] == ["a", "", "🚀", "b"]
    assert d.flush() == ""


def test_stream_cjk_split_three_ways(bpe):
    ids = bpe.encode("你你")  # each: [E4][BD A0]
    assert len(ids) == 4
    d = bpe.detokenizer()
    assert [d.add(i) for i in ids] == ["", "你", "", "你"]


def test_stream_byte_fallback(spm):
    ids = spm.encode("a🚀")  # ▁a + 4 byte tokens
    assert len(ids) == 5
    pieces, _ = stream(spm, ids)
    assert pieces == ["a", "", "", "", "🚀", ""]


def test_stream_leading_space_is_consistent(spm):
    ids = spm.encode("Hello world, café")
    pieces, _ = stream(spm, ids)
    assert "".join(pieces) == spm.decode(ids) == "Hello world, café"


def test_stream_flush_returns_incomplete_tail(bpe):
    ids = bpe.encode("x🚀")[:-1]  # cut in the middle of the emoji
    d = bpe.detokenizer()
    assert [d.add(i) for i in ids] == ["x", ""]
    tail = d.flush()
    assert d.text == bpe.decode(ids) and tail.endswith("\ufffd")


def test_stream_skip_special(bpe):
    ids = bpe.encode("hi<|im_end|>🚀")
    pieces, d = stream(bpe, ids, skip_special=True)
    assert d.text == "hi🚀" == bpe.decode(ids, skip_special=True)


def test_stream_window_stays_small(bpe):
    """Each step decodes only a few recent ids, not the whole sequence."""
    seen = []
    d = bpe.detokenizer()
    orig = d._decode
    d._decode = lambda ids: (seen.append(len(ids)), orig(ids))[1]
    ids = bpe.encode("Hello world " * 100 + "🚀" * 50)
    for i in ids:
        d.add(i)
    assert d.text + d.flush() == bpe.decode(ids)
    assert len(ids) > 300 and max(seen) <= 4  # last emitted chunk + pending ids


# ---- real tokenizers (built from GGUF) ----

@lru_cache(maxsize=None)
def _gguf_tokenizer(stem: str) -> Tokenizer:
    import flashlm.models.gguf_tokenizer as mod
    path = gguf_by_stem(stem)
    assert path.exists(), f"{path} is missing after pulling its model"
    from flashlm.models.gguf_file import GGUFFile  # faster than gguf.GGUFReader

    meta = GGUFFile(path).tokenizer_meta()
    return Tokenizer.from_files(mod.tokenizer_json_from_gguf(meta, path),
                                chat_template=meta.get("tokenizer.chat_template"),
                                special=mod.special_tokens(meta))


GOLDEN = sorted(p.stem for p in GOLDEN_DIR.glob("*.json"))


@pytest.mark.parametrize("stem", GOLDEN)
def test_gguf_stream_matches_golden_tokenize(stem):
    tok = _gguf_tokenizer(stem)
    golden = json.loads((GOLDEN_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    for case in golden["tokenize"]:
        ids = case["ids"]
        pieces, d = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == case["text"]
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("stem", GOLDEN)
def test_gguf_stream_split_emoji(stem):
    tok = _gguf_tokenizer(stem)
    ids = tok.encode("Go 🚀!")
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids]
    assert len(ids) > 3 and "".join(pieces) + d.flush() == "Go 🚀!"
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # " 🚀" takes several byte-level tokens in both vocabularies

"""GGUF tokenizer metadata -> tokenizer.json that gives llama.cpp's token ids.

- Golden: every "tokenize" case of shared/golden/<gguf-stem>.json (ids from
  llama.cpp) against every catalog GGUF (pulled on first use).
- Pre-tokenizer rules on crafted strings, each expected split worked out by hand from
  llama.cpp's regex list for that pre type (llama-vocab.cpp) and how unicode.cpp
  runs them (one regex after the other; matches and gaps both kept).
- A slow reference: a Python port of llama.cpp's hand-written gpt2 / llama3
  splitters (unicode.cpp), compared with the regexes on generated text.
- Tiny synthetic vocabularies: ignore_merges, added tokens, SentencePiece against a
  port of llama.cpp's SPM merge loop, special ids, errors.
"""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from realmodels import GOLDEN, gguf_by_stem
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, pre_tokenizers

from flashlm.errors import UnsupportedError
from flashlm.models.gguf_tokenizer import (pre_tokenizer_regexes, read_tokenizer_meta,
                                           special_tokens, tokenizer_json_from_gguf)

GOLDEN_DIR = GOLDEN
STEMS = sorted(p.stem for p in GOLDEN_DIR.glob("*.json"))

_cache: dict[str, tuple[dict, Tokenizer]] = {}


def _real(stem: str) -> tuple[dict, Tokenizer]:
    path = gguf_by_stem(stem)
    assert path.is_file(), f"{path} is missing after pulling its model"
    if stem not in _cache:
        meta = read_tokenizer_meta(path)
        _cache[stem] = meta, Tokenizer.from_str(tokenizer_json_from_gguf(meta, path.name))
    return _cache[stem]


def _golden_cases(stem: str) -> list[dict]:
    path = GOLDEN_DIR / f"{stem}.json"
    if not path.is_file():
        pytest.skip(f"no golden file {path}")
    return json.loads(path.read_text())["tokenize"]


# ---- golden ids from llama.cpp ----

@pytest.mark.parametrize("stem", STEMS)
def test_golden_tokenize(stem):
    meta, tok = _real(stem)
    cases = _golden_cases(stem)
    bad = [(c["text"], tok.encode(c["text"], add_special_tokens=False).ids, c["ids"])
           for c in cases if tok.encode(c["text"], add_special_tokens=False).ids != c["ids"]]
    print(f"{stem}: {len(cases) - len(bad)}/{len(cases)} golden tokenize cases match")
    assert not bad, f"{len(bad)}/{len(cases)} differ from llama.cpp: {bad[:3]}"


@pytest.mark.parametrize("stem", STEMS)
def test_golden_decode_round_trip(stem):
    meta, tok = _real(stem)
    specials = [t.content for t in tok.get_added_tokens_decoder().values()]
    plain = [c for c in _golden_cases(stem) if not any(s in c["text"] for s in specials)]
    assert len(plain) > 10
    for c in plain:
        assert tok.decode(c["ids"]) == c["text"]


@pytest.mark.parametrize("stem", STEMS)
def test_real_special_tokens(stem):
    meta, tok = _real(stem)
    sp = special_tokens(meta)
    vocab = meta["tokenizer.ggml.tokens"]
    assert sp["eos_token_id"] == meta["tokenizer.ggml.eos_token_id"]
    assert sp["add_bos_token"] is False  # both files say add_bos_token = false
    assert vocab[sp["eot_token_id"]] == "<|im_end|>"
    stops = {vocab[i] for i in sp["stop_token_ids"]}
    assert {"<|endoftext|>", "<|im_end|>"} <= stops
    assert "<|im_start|>" not in stops
    if meta["tokenizer.ggml.pre"] == "qwen2":  # FIM pad/repo/file-sep are EOG in llama.cpp
        assert {"<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"} <= stops
    # every control token is one id when it appears in text
    im_start = vocab.index("<|im_start|>")
    assert tok.encode("x<|im_start|>y", add_special_tokens=False).ids[1] == im_start


# ---- pre-tokenizer rules (expected splits from llama.cpp's regexes) ----

def split(pre: str, text: str) -> list[str]:
    seq = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rx), "isolated")
                                   for rx in pre_tokenizer_regexes(pre)])
    return [piece for piece, _ in seq.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre, expected", [
    # qwen2: "\p{N}" alternative -> one digit per piece; a lone space before a digit
    # matches only the final "\s+"
    ("qwen2", ["abc", " ", "1", "2", "3", "4", "5", " x"]),
    # llama3: "\p{N}{1,3}" -> groups of three from the left
    ("llama-bpe", ["abc", " ", "123", "45", " x"]),
    # smollm/starcoder: "\p{N}" runs first, so digits are isolated and " " ends a piece
    ("smollm", ["abc", " ", "1", "2", "3", "4", "5", " x"]),
    ("starcoder", ["abc", " ", "1", "2", "3", "4", "5", " x"]),
    # gpt2: " ?\p{N}+" keeps the space and the whole number
    ("gpt-2", ["abc", " 12345", " x"]),
    # default: gpt2, then "\p{N}+" splits " 12345" into " " + "12345", then "[0-9]{3}"
    ("default", ["abc", " ", "123", "45", " x"]),
    ("falcon", ["abc", " ", "123", "45", " x"]),
    ("deepseek-coder", ["abc", " ", "1", "2", "3", "4", "5", " x"]),
])
def test_digits(pre, expected):
    assert split(pre, "abc 12345 x") == expected


@pytest.mark.parametrize("pre, text, expected", [
    # qwen2: "[^\r\n\p{L}\p{N}]?\p{L}+" lets "，" lead the next word
    ("qwen2", "你好，世界！", ["你好", "，世界", "！"]),
    # deepseek-coder: "\s?\p{L}+" then "\s?\p{P}+" isolate words and punctuation
    ("deepseek-coder", "你好，世界！", ["你好", "，", "世界", "！"]),
    ("deepseek-llm", "你好 世界", ["你好", " ", "世界"]),
    # llama.cpp turns U+3000 (whitespace) into "\v" before its CJK range, so the
    # ideographic space is never part of a CJK run
    ("deepseek-llm", "你好\u3000世界", ["你好", "\u3000", "世界"]),
    # deepseek-v3: "\p{N}{1,3}" first, then the Han/kana run
    ("deepseek-v3", "東京タワー123abc", ["東京タワー", "123", "abc"]),
])
def test_cjk(pre, text, expected):
    assert split(pre, text) == expected


@pytest.mark.parametrize("pre, expected", [
    ("gpt-2", ["don", "'t", " I", "'", "D"]),       # contractions are case-sensitive
    ("smollm", ["don", "'t", " I", "'", "D"]),
    ("llama-bpe", ["don", "'t", " I", "'D"]),       # (?i:'s|'t|...) -> "'[dD]"
    ("qwen2", ["don", "'t", " I", "'D"]),
])
def test_contractions(pre, expected):
    assert split(pre, "don't I'D") == expected


@pytest.mark.parametrize("pre, text, expected", [
    # "\s+(?!\S)" leaves the last space to the word; gpt2 has no "\s*[\r\n]+", so
    # "\n\n" before a letter is "\n" (lookahead) + "\n" (unmatched gap)
    ("gpt-2", "a   b\n\nc  ", ["a", "  ", " b", "\n", "\n", "c", "  "]),
    ("llama-bpe", "a   b\n\nc  ", ["a", "  ", " b", "\n\n", "c", "  "]),
    ("qwen2", "a   b\n\nc  ", ["a", "  ", " b", "\n\n", "c", "  "]),
    # smollm: the digit split ends the piece after "  ", so both spaces stay together
    ("smollm", "x  1", ["x", "  ", "1"]),
    ("qwen2", "x  1", ["x", " ", " ", "1"]),
])
def test_whitespace(pre, text, expected):
    assert split(pre, text) == expected


def test_symbol_tilde_quirk():
    # llama.cpp's collapsed "\p{S}" has no ASCII "~", so "~" may lead a word
    assert split("deepseek-v3", "~abc +def") == ["~abc", " +", "def"]


# ---- slow reference: llama.cpp's hand-written splitters (unicode.cpp) ----

_WS = set("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)}


def _flags(text: str, i: int) -> tuple[bool, bool, bool, bool]:
    """(letter, number, whitespace, defined) of text[i]; all False past the end."""
    if i >= len(text):
        return False, False, False, False
    cat = unicodedata.category(text[i])
    return cat[0] == "L", cat[0] == "N", text[i] in _WS, cat != "Cn"


def _ref_split(text: str, llama3: bool) -> list[str]:
    """llama.cpp's custom gpt2 (llama3=False) or llama3 splitter, on one piece."""
    out, pos, n = [], 0, len(text)

    def other(f):  # [^\s\p{L}\p{N}] for a defined codepoint
        return not (f[0] or f[1] or f[2]) and f[3]

    while pos < n:
        start, c, f = pos, text[pos], _flags(text, pos)
        nxt = text[pos + 1].lower() if pos + 1 < n else ""
        nxt2 = text[pos + 2].lower() if pos + 2 < n else ""
        if not llama3:
            nxt = text[pos + 1] if pos + 1 < n else ""
            nxt2 = text[pos + 2] if pos + 2 < n else ""
        if c == "'" and nxt in ("s", "t", "m", "d"):
            pos += 2
        elif c == "'" and nxt + nxt2 in ("re", "ve", "ll"):
            pos += 3
        elif llama3 and c not in "\r\n" and not f[1] and (f[0] or _flags(text, pos + 1)[0]):
            pos += 1
            while _flags(text, pos)[0]:
                pos += 1
        elif llama3 and f[1]:
            pos += 1
            while _flags(text, pos)[1] and pos - start < 3:
                pos += 1
        elif not llama3 and (_flags(text, pos + (c == " "))[0] or _flags(text, pos + (c == " "))[1]):
            kind = 0 if _flags(text, pos + (c == " "))[0] else 1
            pos += 1 + (c == " ")
            while _flags(text, pos)[kind]:
                pos += 1
        elif other(_flags(text, pos + (c == " "))):
            pos += 1 + (c == " ")
            while other(_flags(text, pos)):
                pos += 1
            while llama3 and pos < n and text[pos] in "\r\n":
                pos += 1
        else:
            run = 0
            while _flags(text, pos + run)[2]:
                run += 1
            last_nl = max((pos + k + 1 for k in range(run) if text[pos + k] in "\r\n"), default=0)
            if llama3 and last_nl:
                pos = last_nl
            elif run > 1 and pos + run < n:
                pos += run - 1
            elif run:
                pos += run
            else:
                pos += 1
        out.append(text[start:pos])
    return out


_ALPHABET = list("aZéßÀ中文アー01９²½ \t\n\r'sStTdDlLvVrReEmM.,!?-_()$+~<>/\"") + [
    "\u00a0", "\u3000", "\u2009", "\u0301", "🚀", "\u200b"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=40).map("".join))
def test_regex_matches_llama_cpp_custom_splitters(text):
    assert split("gpt-2", text) == _ref_split(text, llama3=False)
    assert split("llama-bpe", text) == _ref_split(text, llama3=True)
    pieces = []  # smollm: each \p{N} isolated first, then gpt2 on each piece
    for piece in pre_tokenizers.Split(Regex(r"\p{N}"), "isolated").pre_tokenize_str(text):
        pieces += _ref_split(piece[0], llama3=False)
    assert split("smollm", text) == pieces


# ---- tiny synthetic vocabularies ----

_BYTES = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xA1, 0xAD)] + [
    chr(c) for c in range(0xAE, 0x100)]
_BYTES += [chr(0x100 + k) for k in range(256 - len(_BYTES))]  # GPT-2 byte->char map


def _bpe_meta(pre: str, extra: list[tuple[str, int]], merges: list[str]) -> dict:
    tokens = _BYTES + [t for t, _ in extra]
    types = [1] * len(_BYTES) + [t for _, t in extra]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges}


def _ids(meta: dict, text: str) -> list[str]:
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(meta, "tiny.gguf"))
    return [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False).ids]


def test_ignore_merges_follows_pre_type():
    # "abc" is a token but no merge chain builds it (only "a b"):
    # llama3 looks the whole word up first (ignore_merges), gpt2 does not
    extra = [("ab", 1), ("abc", 1), ("<|eot_id|>", 3), ("<tool>", 4)]
    assert _ids(_bpe_meta("llama-bpe", extra, ["a b"]), "abc") == ["abc"]
    assert _ids(_bpe_meta("gpt-2", extra, ["a b"]), "abc") == ["ab", "c"]
    # control and user-defined tokens are single ids in text
    meta = _bpe_meta("gpt-2", extra, ["a b"])
    assert _ids(meta, "a<|eot_id|>b<tool>") == ["a", "<|eot_id|>", "b", "<tool>"]
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(meta, "tiny.gguf"))
    ids = tok.encode("a<|eot_id|>b<tool>", add_special_tokens=False).ids
    assert tok.decode(ids) == "ab<tool>"  # control tokens are skipped, user-defined kept


def test_llama3_adds_bos_by_default():
    meta = _bpe_meta("llama-bpe", [("<|begin_of_text|>", 3)], [])
    meta["tokenizer.ggml.bos_token_id"] = len(_BYTES)
    assert special_tokens(meta)["add_bos_token"] is True
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(meta, "tiny.gguf"))
    assert tok.encode("a").ids == [len(_BYTES), _BYTES.index("a")]
    assert tok.encode("a", add_special_tokens=False).ids == [_BYTES.index("a")]


def test_special_tokens_by_name():
    extra = [("<|im_start|>", 3), ("<|im_end|>", 3), ("<|endoftext|>", 1), ("<|fim_pad|>", 3)]
    meta = _bpe_meta("qwen2", extra, [])
    meta["tokenizer.ggml.eos_token_id"] = len(_BYTES) + 2
    sp = special_tokens(meta)
    n = len(_BYTES)
    assert sp["eot_token_id"] == n + 1  # "<|im_end|>" found by name
    assert sp["stop_token_ids"] == [n + 1, n + 2, n + 3]
    assert sp["eos_token"] == "<|endoftext|>" and sp["bos_token_id"] == 11  # gpt2 default
    # llama.cpp promotes "<|endoftext|>" to control: parsed as one id in text
    assert _ids(meta, "a<|endoftext|>") == ["a", "<|endoftext|>"]


def test_unknown_pre_type_raises():
    meta = _bpe_meta("no-such-pre", [], [])
    with pytest.raises(UnsupportedError, match=r"no-such-pre.*|tiny\.gguf") as e:
        tokenizer_json_from_gguf(meta, "tiny.gguf")
    assert "no-such-pre" in str(e.value) and "tiny.gguf" in str(e.value)


def test_unknown_model_raises():
    meta = _bpe_meta("gpt-2", [], [])
    meta["tokenizer.ggml.model"] = "t5"
    with pytest.raises(UnsupportedError, match="t5") as e:
        tokenizer_json_from_gguf(meta, "tiny.gguf")
    assert "tiny.gguf" in str(e.value)


# ---- SentencePiece ("llama") against llama.cpp's SPM merge loop ----

_SPM_PIECES = {"▁": -1.0, "a": -2.0, "b": -2.5, "c": -3.0, "▁a": -1.5, "ab": -1.2,
               "abc": -0.5, "▁ab": -0.8, "bc": -1.1, "▁c": -4.0, "ca": -2.2}


def _spm_meta() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(_SPM_PIECES)
    scores = [0.0] * 259 + list(_SPM_PIECES.values())
    types = [2, 3, 3] + [6] * 256 + [1] * len(_SPM_PIECES)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": True}


def _ref_spm(text: str, meta: dict) -> list[str]:
    """llama.cpp: split on special tokens, " " before text at the start or after a special,
    then merge the best-scoring adjacent pair (leftmost on ties); bytes for the rest."""
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    score = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]))
    out, parts = [], text.split("</s>")
    for k, part in enumerate(parts):
        if part:
            syms = list((" " + part).replace(" ", "▁"))
            while True:
                cands = [(score[syms[i] + syms[i + 1]], -i) for i in range(len(syms) - 1)
                         if syms[i] + syms[i + 1] in vocab]
                if not cands:
                    break
                i = -max(cands)[1]
                syms[i:i + 2] = [syms[i] + syms[i + 1]]
            for s in syms:
                out += [s] if s in vocab else [f"<0x{b:02X}>" for b in s.encode()]
        if k < len(parts) - 1:
            out.append("</s>")
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", " ", "é", "</s>"]), max_size=16).map("".join))
def test_spm_matches_llama_cpp(text):
    meta = _spm_meta()
    assert _ids(meta, text) == _ref_spm(text, meta)
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(meta, "tiny.gguf"))
    if "</s>" not in text and text and not text.startswith(" "):
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text

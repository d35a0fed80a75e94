"""Build a Hugging Face ``tokenizer.json`` from a GGUF file's tokenizer metadata.

The tokenizer it builds gives the token ids llama.cpp gives for the same text
(special tokens parsed, BOS not added), because it follows llama.cpp's rules
(``src/llama-vocab.cpp``, ``src/unicode.cpp``) rather than transformers' GGUF
conversion:

- BPE (``tokenizer.ggml.model == "gpt2"``): the text is split by the regexes
  llama.cpp lists for ``tokenizer.ggml.pre``, one after the other, each match and
  each gap kept as its own piece (``Split`` "isolated"); then byte-level BPE with the
  GGUF merges, whole-word lookup first where llama.cpp sets ``ignore_merges``.
- SentencePiece (``"llama"``): "▁" for spaces, a space put before text that starts
  the input or follows a special token, merges ranked by token score, byte fallback.
- CONTROL, USER_DEFINED and UNKNOWN tokens (and tokens llama.cpp promotes to
  control by name: end-of-turn, FIM, end-of-generation) are added tokens, matched
  in the raw text before anything else; CONTROL/UNKNOWN ones are ``special``.

Where llama.cpp's regex engine differs from Oniguruma (the engine of
``tokenizers``), the regexes below are rewritten to give llama.cpp's splits:
``\\p{Lu}``/``\\p{Ll}``/... mean any letter, ASCII ``~`` is no ``\\p{S}``, ``$`` is
end of piece, explicit non-ASCII ranges exclude whitespace.

Example:
    >>> meta = read_tokenizer_meta("model.gguf")
    >>> tok = tokenizers.Tokenizer.from_str(tokenizer_json_from_gguf(meta, "model.gguf"))
    >>> tok.encode("Hello", add_special_tokens=False).ids
"""
from __future__ import annotations

import json
from os import PathLike
from typing import Any

from flashlm.errors import GGUFError, UnsupportedError

# gguf token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---- pre-tokenizer regexes (llama.cpp llm_tokenizer_bpe, by pre type) ----

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)"
          r"|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
# Non-ASCII ranges of llama.cpp's std::wregex patterns; "&&\S" because llama.cpp
# turns non-ASCII whitespace into "\v" before matching them.
_CJK_HANGUL = r"[\x{4E00}-\x{9FA5}\x{0800}-\x{4E00}\x{AC00}-\x{D7FF}&&\S]+"
# cased letters; escaped because NFC would rewrite some of them (U+2126, U+212A, ...)
_DEEPSEEK_LETTERS = (
    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}"
    r"\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}"
    r"\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}"
    r"\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}"
    r"\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}"
    r"\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}"
    r"\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}"
    r"\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}"
    r"\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}"
    r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}"
    r"\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}"
    r"\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}"
    r"\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}"
    r"\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}"
    r"\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}"
    r"\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+")
# "\s?[!-/:-~！-／：-～‘-‟　-。]+" minus U+3000 (whitespace, so "\v" in llama.cpp)
_DEEPSEEK_PUNCT = r"\s?[!-/:-~！-／：-～‘-‟、-。]+"
# \p{S} of llama.cpp's collapsed regexes leaves out ASCII "~"
_S = r"[\p{S}&&[^~]]"
_DEEPSEEK3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
              r"|[^\r\n\p{L}\p{P}" + _S + r"]?[\p{L}\p{M}]+| ?[\p{P}" + _S + r"]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_KANA_HAN = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
# tekken / gpt-4o: llama.cpp's rewrite of [\p{Lu}...] as "a letter that is not a-z";
# llama.cpp treats every \p{L?} subcategory as \p{L}, which this keeps.
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + r"+|[^\r\n\p{L}\p{N}]?" + _UPPER
           + "+" + _LOWER + r"*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?" + _UPPER + "*" + _LOWER + "+" + _CONTRACTIONS
          + r"?|[^\r\n\p{L}\p{N}]?" + _UPPER + "+" + _LOWER + "*" + _CONTRACTIONS
          + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER_M, _LOWER_M = r"((?=[\p{L}\p{M}])([^a-z]))", r"((?=[\p{L}\p{M}])([^A-Z]))"
_GRANITE_EMB = (r"[^\r\n\p{L}\p{N}]?" + _UPPER_M + "*" + _LOWER_M + "+" + _CONTRACTIONS
                + r"?|[^\r\n\p{L}\p{N}]?" + _UPPER_M + "+" + _LOWER_M + "*" + _CONTRACTIONS
                + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# youtu: [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}] etc. collapse to [\p{L}\p{M}] in llama.cpp
_YOUTU = (r"[\x{AC00}-\x{D7A3}\x{3131}-\x{318E}]+|[！…“”‘’—：；，、-〿︰-﹏]+"
          r"|[\x{3105}-\x{312F}]+|[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+")
_YOUTU2 = (r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]*[\p{L}\p{M}]+" + _CONTRACTIONS
           + r"?|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+[\p{L}\p{M}]*" + _CONTRACTIONS
           + r"?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "jais2": [_JAIS2],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "starcoder": [r"\p{N}", _GPT2],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "deepseek-llm": [r"[\r\n]", _DEEPSEEK_LETTERS, _DEEPSEEK_PUNCT, r"\s+\z", _CJK_HANGUL,
                     r"\p{N}+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", _KANA_HAN, _DEEPSEEK3],
    "spark2_5": [r"\p{N}{1,3}", _KANA_HAN,
                 r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}" + _S
                 + r"]?[\p{L}\p{M}]+| ?[\p{P}" + _S + r"]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"],
    "youtu": [_YOUTU, _YOUTU2],
    "bloom": [_BLOOM],
    "viking": [_BLOOM, r"\p{N}"],
    "tekken": [_TEKKEN],
    "gpt-4o": [_GPT4O],
    "granite-emb-multi": [_GRANITE_EMB],
    "chameleon": [r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                  r"([\t\n]|    |  )", r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", _GPT2],
    "bailingmoe": [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
    "seed-coder": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
                   r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "ufakzeka": [r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+"],
    # llama.cpp's custom digit splitter: 1-2 leading digits, then groups of three
    "afmoe": [r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))",
              r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{F900}-\x{FAFF}\x{3040}-\x{309F}"
              r"\x{30A0}-\x{30FF}\x{FF65}-\x{FF9F}\x{2F00}-\x{2FDF}\x{0E00}-\x{0E7F}"
              r"\x{0E80}-\x{0EFF}\x{1780}-\x{17FF}\x{1000}-\x{109F}\x{AA60}-\x{AA7F}"
              r"\x{A9E0}-\x{A9FF}\x{AC00}-\x{D7AF}\x{1100}-\x{11FF}]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}" + _S
              + r"]?[\p{L}\p{M}]+| ?[\p{P}" + _S + r"]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "laguna": [r"[^\n]+|[\n]+", _QWEN2],
    "exaone-moe": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"],
    "minicpm5": [r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}

# tokenizer.ggml.pre -> (regex set, options llama.cpp sets for it)
_PRE: dict[str, tuple[str, dict[str, bool]]] = {"default": ("default", {})}
_IGN, _BOS = {"ignore_merges": True}, {"add_bos": True}
for _names, _kind, _opts in [
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
     "llama3", {**_IGN, **_BOS}),
    ("dbrx smaug-bpe glm4 chatglm-bpe", "llama3", {}),
    ("jais-2", "jais2", {}),
    ("minicpm5", "minicpm5", _IGN),
    ("deepseek-llm", "deepseek-llm", {}),
    ("deepseek-coder", "deepseek-coder", {}),
    ("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", "deepseek-v3", {}),
    ("spark2_5", "spark2_5", {}),
    ("youtu", "youtu", _IGN),
    ("falcon", "falcon", {}),
    ("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
     "jina-v1-en jina-v2-code roberta-bpe mpt olmo jais exaone4 trillion granite-docling",
     "gpt2", {}),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", "starcoder", {}),
    ("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open", "qwen2", {}),
    ("qwen35", "qwen35", {}),
    ("poro-chat bloom gpt3-finnish", "bloom", {}),
    ("viking", "viking", {}),
    ("tekken", "tekken", {**_IGN, **_BOS}),
    ("chameleon", "chameleon", _BOS),
    ("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt-4o", {}),
    ("granite-embed-multi-97m", "granite-emb-multi", _IGN),
    ("bailingmoe bailingmoe2 llada-moe", "bailingmoe", {}),
    ("seed-coder", "seed-coder", {}),
    ("ufakzeka", "ufakzeka", {}),
    ("grok-2", "qwen2", {}),
    ("afmoe", "afmoe", {}),
    ("laguna", "laguna", {}),
    ("exaone-moe", "exaone-moe", {}),
]:
    for _name in _names.split():
        _PRE[_name] = (_kind, _opts)

# ---- special tokens by name (llama.cpp llama_vocab::impl::load) ----

_EOT_NAMES = ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<EOT>", "_<EOT>",
              "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<|end_of_text|>",
              "<|endoftext|>"]  # llama.cpp takes whichever its hash map yields first
_FIM_NAMES = {  # metadata key suffix -> names llama.cpp looks for
    "fim_pre": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"],
    "fim_suf": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"],
    "fim_mid": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"],
    "fim_pad": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "fim_rep": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "fim_sep": ["<|file_sep|>"],
}
_FIM_OLD_KEYS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}
_EOG_NAMES = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
              "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~["}
_ALWAYS_USER_DEFINED = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}


def read_tokenizer_meta(path: str | PathLike) -> dict[str, Any]:
    """Read the ``tokenizer.*`` key/values of a GGUF file.

    Args:
        path: the GGUF file.

    Returns:
        Plain python values by key (lists of str/int/float, str, int, bool).
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: cannot read GGUF metadata: {e}") from e
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _tokens(meta: dict[str, Any], source: str) -> tuple[list[str], list[int]]:
    """Token texts (empty ones renamed as llama.cpp does) and token types."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.tokens must be an array of strings")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise GGUFError(f"{source}: tokenizer.ggml.token_type must be an array of integers")
    types = list(types)
    if len(types) < len(tokens):
        raise GGUFError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    return tokens, types[: len(tokens)]


def pre_tokenizer_regexes(pre: str) -> list[str]:
    """The regexes (Oniguruma syntax) llama.cpp splits text by for a ``tokenizer.ggml.pre``.

    Args:
        pre: the pre-tokenizer type name, e.g. "qwen2", "llama-bpe", "smollm".

    Returns:
        The regexes, applied one after the other (matches and gaps both kept).

    Raises:
        UnsupportedError: an unknown or unsupported pre-tokenizer type.
    """
    if pre not in _PRE:
        raise UnsupportedError(f"tokenizer.ggml.pre = {pre!r} is not supported")
    return list(_REGEXES[_PRE[pre][0]])


def _find(index: dict[str, int], names: list[str]) -> int | None:
    return next((index[n] for n in names if n in index), None)


def _special_ids(meta: dict[str, Any], tokens: list[str], types: list[int]) -> dict[str, Any]:
    """llama.cpp's special ids, EOG set and token types after its by-name fixes."""
    model = meta.get("tokenizer.ggml.model", "")
    pre = meta.get("tokenizer.ggml.pre", "")
    n = len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    types = list(types)
    if model == "llama":
        ids: dict[str, int | None] = {"bos": 1, "eos": 2, "unk": 0}
        add_bos = True
    else:
        ids = {"bos": 11, "eos": 11, "unk": None}
        add_bos = _PRE.get(pre, ("", {}))[1].get("add_bos", False)
        if pre in ("glm4", "chatglm-bpe"):
            ids["bos"] = None
    ids = {k: (v if v is not None and v < n else None) for k, v in ids.items()}
    keys = {"bos": "bos", "eos": "eos", "eot": "eot", "eom": "eom", "unk": "unknown",
            "pad": "padding", "sep": "seperator", "mask": "mask",
            **{k: k for k in _FIM_NAMES}}
    for name, key in [*keys.items(), *((k, v) for k, v in _FIM_OLD_KEYS.items())]:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and 0 <= int(value) < n:
            ids[name] = int(value)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", model == "t5"))

    promoted = []  # tokens llama.cpp marks CONTROL because of their name
    if ids.get("eot") is None and (eot := _find(index, _EOT_NAMES)) is not None:
        ids["eot"] = eot
        promoted.append(eot)
    if ids.get("eom") is None and (eom := index.get("<|eom_id|>")) is not None:
        ids["eom"] = eom
        promoted.append(eom)
    for key, names in _FIM_NAMES.items():
        if ids.get(key) is None and (fim := _find(index, names)) is not None:
            ids[key] = fim
            promoted.append(fim)
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k) is not None}
    for name in _EOG_NAMES & index.keys():
        if name == "</s>" and types[index[name]] == NORMAL:
            # Newer llama.cpp promotes "</s>" in any vocabulary (for PaddleOCR); in Qwen's
            # it is an ordinary token (128247) that HTML needs, and the llama.cpp that made
            # the golden ids did not promote it. Only a GGUF that marks it special gets it.
            continue
        eog.add(index[name])
        promoted.append(index[name])
    for i in promoted:
        if types[i] not in (CONTROL, UNKNOWN):
            types[i] = CONTROL
    for name in _ALWAYS_USER_DEFINED & index.keys():
        types[index[name]] = USER_DEFINED
    eog |= {ids[k] for k in ("eos", "eot", "eom") if ids.get(k) is not None}
    names = {tokens[i] for i in eog}
    if "<|end|>" in names and ({"<|return|>", "<|call|>"} <= names
                               or {"<|calls|>", "<|flush|>"} <= names):
        eog.discard(index["<|end|>"])
        types[index["<|end|>"]] = USER_DEFINED
    if "<|tool_response>" in names and "</s>" in names:
        eog.discard(index["</s>"])
        types[index["</s>"]] = NORMAL
    return {"ids": ids, "eog": sorted(eog), "types": types, "add_bos": add_bos,
            "add_eos": add_eos}


def special_tokens(meta: dict[str, Any]) -> dict[str, Any]:
    """The special tokens llama.cpp would use for this GGUF tokenizer.

    Args:
        meta: the ``tokenizer.*`` GGUF metadata (see :func:`read_tokenizer_meta`).

    Returns:
        ``bos_token_id``, ``eos_token_id``, ``eot_token_id``, ``eom_token_id``,
        ``pad_token_id``, ``unk_token_id`` (int or None), ``bos_token``, ``eos_token``
        (str or None), ``add_bos_token``, ``add_eos_token`` (bool) and
        ``stop_token_ids``: the ids llama.cpp treats as end of generation, sorted.
    """
    tokens, types = _tokens(meta, "")
    sp = _special_ids(meta, tokens, types)
    ids = sp["ids"]
    out: dict[str, Any] = {f"{k}_token_id": ids.get(k) for k in
                           ("bos", "eos", "eot", "eom", "pad", "unk")}
    out["bos_token"] = tokens[ids["bos"]] if ids.get("bos") is not None else None
    out["eos_token"] = tokens[ids["eos"]] if ids.get("eos") is not None else None
    out["add_bos_token"] = sp["add_bos"]
    out["add_eos_token"] = sp["add_eos"]
    out["stop_token_ids"] = sp["eog"]
    return out


# ---- tokenizer.json pieces ----

def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    """Tokens llama.cpp matches in the raw text before tokenizing (its special cache)."""
    return [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": t != USER_DEFINED}
            for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]


def _bpe_merges(merges: list[str], vocab: dict[str, int]) -> list[list[str]]:
    """GGUF "a b" merges as pairs, dropping those `tokenizers` cannot load."""
    pairs = []
    for m in merges:
        pos = m.find(" ", 1)  # llama.cpp splits at the first space after the first char
        if pos < 0:
            continue
        a, b = m[:pos], m[pos + 1:]
        if a in vocab and b in vocab and a + b in vocab:
            pairs.append([a, b])
    return pairs


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[list[str]]:
    """Merges for SentencePiece BPE: every split of a token into two tokens, best score first.

    llama.cpp merges the adjacent pair whose concatenation is the best-scoring token,
    so a merge's rank is its result's score (ties by token id).
    """
    found = []
    for i, tok in enumerate(tokens):
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                found.append((-scores[i], i, k, a, b))
    found.sort()
    return [[a, b] for *_, a, b in found]


def _post_processor(bos: int | None, eos: int | None, add_bos: bool, add_eos: bool,
                    tokens: list[str]) -> dict[str, Any] | None:
    """A TemplateProcessing that adds BOS/EOS as llama.cpp's add_special does."""
    pre = [(bos, tokens[bos])] if add_bos and bos is not None else []
    post = [(eos, tokens[eos])] if add_eos and eos is not None else []
    if not pre and not post:
        return None

    def seq(name: str) -> list[dict[str, Any]]:
        return ([{"SpecialToken": {"id": t, "type_id": 0}} for _, t in pre]
                + [{"Sequence": {"id": name, "type_id": 0}}]
                + [{"SpecialToken": {"id": t, "type_id": 0}} for _, t in post])

    special = {t: {"id": t, "ids": [i], "tokens": [t]} for i, t in pre + post}
    return {"type": "TemplateProcessing", "single": seq("A"), "pair": seq("A") + seq("B")[1:],
            "special_tokens": special}


def tokenizer_json_from_gguf(meta: dict[str, Any], source: str | PathLike = "") -> str:
    """Build a ``tokenizer.json`` that tokenizes as llama.cpp does for this GGUF.

    Args:
        meta: the ``tokenizer.*`` GGUF key/values (see :func:`read_tokenizer_meta`).
        source: the GGUF file name, for error messages.

    Returns:
        The tokenizer.json text (``tokenizers.Tokenizer.to_str()``). With
        ``add_special_tokens=True`` it adds BOS/EOS where llama.cpp would.

    Raises:
        UnsupportedError: a tokenizer model or pre-tokenizer type this does not handle.
        GGUFError: metadata that is missing or inconsistent.
    """
    from tokenizers import Tokenizer

    where = str(source) if source else "GGUF file"
    model = meta.get("tokenizer.ggml.model")
    tokens, types = _tokens(meta, where)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{where}: duplicate tokens in tokenizer.ggml.tokens")
    sp = _special_ids(meta, tokens, types)
    ids = sp["ids"]

    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in _PRE:
            raise UnsupportedError(
                f"{where}: tokenizer.ggml.pre = {pre!r} is a pre-tokenizer type flashlm does "
                f"not support (supported: {', '.join(sorted(_PRE))})")
        kind, opts = _PRE[pre]
        if "tokenizer.ggml.merges" not in meta:
            raise GGUFError(f"{where}: BPE tokenizer without tokenizer.ggml.merges")
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                      "use_regex": False}
        splits = [{"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated",
                   "invert": False} for rx in _REGEXES[kind]]
        normalizer = None
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [*splits, byte_level]}
        decoder = byte_level
        bpe = {"merges": _bpe_merges(meta["tokenizer.ggml.merges"], vocab),
               "ignore_merges": opts.get("ignore_merges", False), "byte_fallback": False}
    elif model == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        space = "▁"
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps = [{"type": "Replace", "pattern": {"String": " "}, "content": space}]
        if prefix:
            steps.insert(0, {"type": "Prepend", "prepend": space})
        normalizer = {"type": "Sequence", "normalizers": steps}
        pre_tokenizer = None
        decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": space}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]
            + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])}
        bpe = {"merges": _spm_merges(tokens, list(scores), vocab), "ignore_merges": False,
               "byte_fallback": True}
    else:
        raise UnsupportedError(
            f"{where}: tokenizer.ggml.model = {model!r} is a tokenizer model flashlm does not "
            "support (supported: 'gpt2' BPE, 'llama' SentencePiece)")

    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, sp["types"]),
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(ids.get("bos"), ids.get("eos"), sp["add_bos"],
                                          sp["add_eos"], tokens),
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "vocab": vocab, **bpe},
    }
    try:
        return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)).to_str()
    except Exception as e:  # tokenizers raises plain Exception on a bad spec
        raise GGUFError(f"{where}: cannot build a tokenizer from the GGUF vocab: {e}") from e

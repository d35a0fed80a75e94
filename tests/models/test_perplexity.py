"""Perplexity of the real models on the golden text, against transformers' value.

The golden "hf" value was computed on transformers' own tokenization of the text.
flashlm tokenizes like llama.cpp (tests/tokenizer), and for smollm2 the two differ
(llama.cpp's smollm pre-tokenizer keeps "\\n\\n  " + "0" where transformers gives
"\\n\\n " + " " + "0"), so where they differ the model is scored on the reference's
ids: this test is about the forward pass; the tokenizer has its own tests.
"""
from __future__ import annotations

import pytest
from realmodels import GOLDEN, golden, real_store_path

import flashlm
from flashlm.models.pull import gguf_path
from flashlm.runtime.perplexity import perplexity

REL_TOL = 0.002  # 0.2 %


def reference_ids(name: str, text: str) -> list[int]:
    transformers = pytest.importorskip("transformers", reason="the parity extra (transformers) gives the reference ids")
    path = gguf_path(name)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_perplexity_matches_hf(name):
    g = golden(name)["perplexity"]
    text = (GOLDEN / g["text_file"]).read_text(encoding="utf-8")
    with flashlm.load(real_store_path(name), ctx=g["ctx"]) as llm:
        ours = llm.tokenizer.encode(text, add_special=False, parse_special=False)
        ref = reference_ids(name, text)
        res = perplexity(llm.model, ref, ctx=g["ctx"], chunks=g["chunks"])
        own = res if ours == ref else perplexity(llm.model, ours, ctx=g["ctx"], chunks=g["chunks"])
    print(f"{name}: ppl {res.ppl:.6f} on the reference ids (hf {g['hf']:.6f}); "
          f"{own.ppl:.6f} on flashlm's ids (llama.cpp {g['llama']:.6f})")
    assert res.scored_tokens == g["scored_tokens"]
    assert abs(res.ppl / g["hf"] - 1) < REL_TOL, (res.ppl, g["hf"])

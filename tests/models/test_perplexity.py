"""Perplexity of the real models on the golden text, against transformers' value.

The golden "hf" value was computed on transformers' own tokenization of the text.
flashlm tokenizes like llama.cpp (tests/tokenizer), and for smollm2 the two differ
(llama.cpp's smollm pre-tokenizer keeps "\\n\\n  " + "0" where transformers gives
"\\n\\n " + " " + "0"), so where they differ the model is scored on the reference's
ids: this test is about the forward pass; the tokenizer has its own tests. It runs on the
exact path (f32 activations, f32 KV cache); an f16 cache is checked against it (within 0.1 %).
The integer path has its own tests (test_intpath_fidelity.py).
"""
from __future__ import annotations

import pytest
from realmodels import GOLDEN, golden, real_store_path, reference_ids

import flashlm
from flashlm.runtime.perplexity import perplexity

REL_TOL = 0.002  # 0.2 %
KV_F16_REL_TOL = 0.001  # an f16 KV cache: perplexity within 0.1 % of f32 (issue 18)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_perplexity_matches_hf(name):
    g = golden(name)["perplexity"]
    text = (GOLDEN / g["text_file"]).read_text(encoding="utf-8")
    with flashlm.load(real_store_path(name), ctx=g["ctx"], kv="f32", exact=True) as llm:
        ours = llm.tokenizer.encode(text, add_special=False, parse_special=False)
        ref = reference_ids(name, text)
        res = perplexity(llm.model, ref, ctx=g["ctx"], chunks=g["chunks"], kv="f32")
        own = res if ours == ref else perplexity(llm.model, ours, ctx=g["ctx"], chunks=g["chunks"], kv="f32")
    print(f"{name}: ppl {res.ppl:.6f} on the reference ids (hf {g['hf']:.6f}); "
          f"{own.ppl:.6f} on flashlm's ids (llama.cpp {g['llama']:.6f})")
    assert res.scored_tokens == g["scored_tokens"]
    assert abs(res.ppl / g["hf"] - 1) < REL_TOL, (res.ppl, g["hf"])


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_kv_f16_perplexity_is_within_0_1_percent_of_f32(name):
    g = golden(name)["perplexity"]
    text = (GOLDEN / g["text_file"]).read_text(encoding="utf-8")
    with flashlm.load(real_store_path(name), ctx=g["ctx"], kv="f16", exact=True) as llm:
        ids = llm.tokenizer.encode(text, add_special=False, parse_special=False)
        f16 = perplexity(llm.model, ids, ctx=g["ctx"], chunks=g["chunks"], kv="f16")
        f32 = perplexity(llm.model, ids, ctx=g["ctx"], chunks=g["chunks"], kv="f32")
    print(f"{name}: ppl {f16.ppl:.6f} with an f16 KV cache, {f32.ppl:.6f} with f32 "
          f"({100 * (f16.ppl / f32.ppl - 1):+.4f} %)")
    assert f16.ppl != f32.ppl  # the f16 cache was used
    assert abs(f16.ppl / f32.ppl - 1) < KV_F16_REL_TOL, (f16.ppl, f32.ppl)

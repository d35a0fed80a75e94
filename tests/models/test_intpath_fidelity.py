"""The integer path (int8 activations, kernels/intpath.py) on the real models, against transformers.

Every product of these tests runs on the integer kernels where the weight's format has them
(BLAS_MIN_ROWS lifted, so prefill does too: the test measures the kernels, not the BLAS
fallback):
- perplexity on the golden text within 0.5 % of transformers' (issue F; llama.cpp, whose
  activations are one int8 part per block, is 1.8 % above it on the 1.5B; measured here
  -0.001 % on the 0.5B and -0.008 % on the 1.5B);
- greedy decoding of the golden chats gives transformers' tokens, or first differs at a step
  where transformers' own top-2 margin was under ``NEAR_TIE``: on the integer path the 0.5B's
  prompt logits were within 0.0024 of transformers' (max over the vocabulary), so a margin
  under 20 times that is a near-tie it may break the other way.
"""
from __future__ import annotations

import numpy as np
import pytest
from realmodels import GOLDEN, golden, real_store_path, reference_ids

import flashlm
from flashlm.kernels import matmul
from flashlm.runtime.perplexity import perplexity

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
REL_TOL = 0.005  # 0.5 % of transformers' perplexity
NEAR_TIE = 0.05

pytestmark = pytest.mark.skipif(not matmul.INT_KERNELS, reason="the integer path needs AVX2 (HAVE_SIMD)")


@pytest.fixture(autouse=True)
def _integer_kernels_everywhere(monkeypatch):
    monkeypatch.setattr(matmul, "BLAS_MIN_ROWS", {f: 1 << 30 for f in matmul.BLAS_MIN_ROWS})


@pytest.mark.parametrize("name", MODELS)
def test_perplexity_within_half_a_percent_of_transformers(name):
    g = golden(name)["perplexity"]
    text = (GOLDEN / g["text_file"]).read_text(encoding="utf-8")
    with flashlm.load(real_store_path(name), ctx=g["ctx"], kv="f32") as llm:
        assert not llm.exact and not matmul.is_exact()
        ids = reference_ids(name, text)  # the ids transformers' value was computed on (test_perplexity.py)
        res = perplexity(llm.model, ids, ctx=g["ctx"], chunks=g["chunks"], kv="f32")
    print(f"{name}: integer path ppl {res.ppl:.6f}, transformers {g['hf']:.6f} "
          f"({100 * (res.ppl / g['hf'] - 1):+.3f} %), llama.cpp {g['llama']:.6f}")
    assert abs(res.ppl / g["hf"] - 1) < REL_TOL, (res.ppl, g["hf"])


@pytest.mark.parametrize("name", MODELS)
def test_greedy_is_transformers_or_breaks_a_near_tie(name):
    with flashlm.load(real_store_path(name), ctx=512, kv="f32") as llm:
        model = llm.model
        for case, c in enumerate(golden(name)["chat"]):
            hf, margin = c["hf_greedy"], c["hf_top2_margin"]
            cache = model.make_cache(len(c["prompt_ids"]) + len(hf) + 1, kv="f32")
            logits = model.forward(np.asarray(c["prompt_ids"]), None, cache)
            out = []
            while True:
                out.append(int(logits.argmax()))
                if len(out) == len(hf) or out[-1] != hf[len(out) - 1]:
                    break
                logits = model.forward(np.array(out[-1:]), None, cache)
            k = next((i for i, (a, b) in enumerate(zip(out, hf)) if a != b), None)
            print(f"{name} case {case}: integer-path greedy "
                  + ("matches" if k is None else f"differs at step {k} (hf margin {margin[k]:.4f})"))
            assert k is None or margin[k] < NEAR_TIE, (case, k, out[k], hf[k], margin[k])


def test_the_exact_path_is_chosen_when_asked():
    """load(exact=True) runs the float32 kernels, load() the integer ones: both within the golden
    logits' tolerance, and not the same bits."""
    name = "qwen2.5-coder-0.5b"
    c = golden(name)["chat"][0]
    logits = {}
    for exact in (True, False):
        with flashlm.load(real_store_path(name), ctx=512, kv="f32", exact=exact) as llm:
            assert llm.exact is exact and matmul.is_exact() is exact
            assert (matmul.task_key("Q4_KR") == "Q4_KR") is exact
            logits[exact] = llm.model.forward(np.asarray(c["prompt_ids"]), None,
                                              llm.model.make_cache(len(c["prompt_ids"]) + 1, kv="f32"))
    from realmodels import golden_logits

    ref = golden_logits(name)["hf_0"]
    assert np.abs(logits[True] - ref).max() < 1e-4  # the exact path: measured 1e-5
    assert np.abs(logits[False] - ref).max() < 1e-2
    assert np.abs(logits[False] - logits[True]).max() > 1e-4  # the integer path was the other one

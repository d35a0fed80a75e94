"""The real models against transformers (golden logits and greedy tokens in shared/golden).

For every chat case of every catalog model whose GGUF is on disk:
- prefill of ``prompt_ids``: last-position logits within 1e-2 (max abs) of ``hf_<i>``,
  same argmax;
- greedy decoding gives ``hf_greedy``, or first differs at a step where the hf
  run's top-2 margin was < 0.01 (a float-rounding tie).
Run with KernelBackend when the kernels import, and with NumpyBackend (the 1.5B
model under NumpyBackend needs ~7 GB of float32 weights: only with
FLASHLM_TEST_SLOW=1, logits only).
"""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
from realmodels import golden, golden_logits, real_store_path

from flashlm.models import build_model
from flashlm.offload.store import Store
from flashlm.runtime.backend import KernelBackend, NumpyBackend, kernels_available, kernels_error
from flashlm.runtime.threadpool import ThreadPool

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
BIG_FOR_NUMPY = {"qwen2.5-coder-1.5b"}
SLOW = bool(os.environ.get("FLASHLM_TEST_SLOW"))
LOGITS_ATOL = 1e-2
TIE_MARGIN = 0.01


@pytest.fixture(scope="module", params=[(m, b) for m in MODELS for b in ("kernels", "numpy")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    name, backend = request.param
    if backend == "kernels" and not kernels_available():  # a broken install must fail, not skip
        pytest.fail(f"flashlm.kernels do not import: {kernels_error()}")
    if backend == "numpy" and name in BIG_FOR_NUMPY and not SLOW:
        pytest.skip(f"{name} under NumpyBackend needs ~7 GB of f32 weights; set FLASHLM_TEST_SLOW=1")
    store = Store(real_store_path(name))  # the pulled store, as `flashlm run` reads it
    config, weights = store.config, store
    pool = ThreadPool(2) if backend == "kernels" else None
    m = build_model(config, weights, KernelBackend(pool) if backend == "kernels" else NumpyBackend())
    m.golden_name = name
    yield m
    if pool is not None:
        pool.close()
    del m, weights
    gc.collect()


def prefill(model, ids):
    cache = model.make_cache(len(ids) + 64, kv="f32")  # the exact path: the tolerances are f32's
    return model.forward(np.asarray(ids), np.arange(len(ids)), cache), cache


@pytest.mark.usefixtures("exact_path")  # float32's tolerances (the integer path: test_intpath_fidelity)
@pytest.mark.parametrize("case", [0, 1, 2])
def test_prefill_logits(model, case):
    c = golden(model.golden_name)["chat"][case]
    ref = golden_logits(model.golden_name)[f"hf_{case}"]
    logits, _ = prefill(model, c["prompt_ids"])
    err = float(np.abs(logits - ref).max())
    print(f"{model.golden_name} {model.backend.name} case {case}: max abs diff {err:.2e}")
    assert logits.shape == ref.shape and logits.dtype == np.float32
    assert err < LOGITS_ATOL, f"max abs logits diff {err} >= {LOGITS_ATOL}"
    assert logits.argmax() == ref.argmax()


def first_mismatch(ours: list[int], ref: list[int]) -> int | None:
    return next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), None)


@pytest.mark.usefixtures("exact_path")
@pytest.mark.parametrize("case", [0, 1, 2])
def test_greedy(model, case):
    if model.backend.name == "numpy" and model.golden_name in BIG_FOR_NUMPY:
        pytest.skip("greedy decoding of the 1.5B model is checked with KernelBackend only")
    c = golden(model.golden_name)["chat"][case]
    hf, margin = c["hf_greedy"], c["hf_top2_margin"]
    logits, cache = prefill(model, c["prompt_ids"])
    out = []
    while True:  # as many steps as hf_greedy has (it stops after EOS)
        out.append(int(logits.argmax()))
        if len(out) == len(hf):
            break
        logits = model.forward(np.array(out[-1:]), np.array([cache.offset]), cache)
    k = first_mismatch(out, hf)
    print(f"{model.golden_name} {model.backend.name} case {case}: greedy "
          + ("matches" if k is None else f"differs at step {k} (hf margin {margin[k]:.4f})"))
    assert k is None or margin[k] < TIE_MARGIN, (
        f"greedy differs at step {k}: ours {out[k]}, hf {hf[k]}, hf top-2 margin {margin[k]}")


@pytest.mark.parametrize("exact", [False, True], ids=["int8", "exact"])
def test_batch_and_verify_are_bit_identical(model, exact):
    """On the kernel backend (either path) a decode step of the three chat prompts in one forward_batch, and
    a verification pass of the greedy continuation (9 tokens in one forward), give exactly the
    logits of one-token forwards: batching and speculative decoding cannot change a token."""
    if model.backend.name != "kernels":
        pytest.skip("bit identity is the kernel backend's promise")
    from flashlm.kernels import matmul

    matmul.set_exact(exact)
    cases = golden(model.golden_name)["chat"]
    batched = [prefill(model, c["prompt_ids"])[1] for c in cases]
    alone = [prefill(model, c["prompt_ids"])[1] for c in cases]
    toks = np.array([c["hf_greedy"][0] for c in cases])
    for _ in range(2):
        out = model.forward_batch([(toks[j:j + 1], None, batched[j]) for j in range(len(cases))])
        for j, cache in enumerate(alone):
            np.testing.assert_array_equal(out[j], model.forward(toks[j:j + 1], None, cache), err_msg=f"case {j}")
        toks = out.argmax(-1)
    draft = np.array((cases[0]["hf_greedy"] * 9)[:9])
    _, c1 = prefill(model, cases[0]["prompt_ids"])
    _, c2 = prefill(model, cases[0]["prompt_ids"])
    verify = model.forward(draft, None, c1, all_logits=True)
    for i in range(len(draft)):
        np.testing.assert_array_equal(verify[i], model.forward(draft[i:i + 1], None, c2), err_msg=f"position {i}")

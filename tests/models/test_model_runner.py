"""One shared runner over tiny random models of every architecture (like mlx-lm's model_test_runner).

For each architecture x weight format x backend: output shapes with a fresh cache
and with a filled one, one decode step equals the full sequence, a batch of 3
equals each sequence alone, each layer's weights are asked once per forward, the
kernels agree with plain numpy, and bad input raises InputError.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashlm.errors import InputError, UnsupportedError
from flashlm.kernels.formats import QTensor
from flashlm.models import build_model, get_model_class
from flashlm.models.config import ModelConfig
from flashlm.models.weights import DictWeights
from flashlm.runtime.backend import KernelBackend, NumpyBackend, kernels_available, kernels_error

ARCHS = {
    "llama": dict(rope_layout="interleaved", tie_word_embeddings=True, rope_theta=10000.0),
    "qwen2": dict(rope_layout="neox", tie_word_embeddings=False, rope_theta=1e6),
    "qwen3": dict(rope_layout="neox", tie_word_embeddings=False, head_dim=32,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
}
VOCAB = 96


def tiny_config(arch: str) -> ModelConfig:
    return ModelConfig(model_type=arch, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                       rms_norm_eps=1e-5, **ARCHS[arch])


def qtensor(a: np.ndarray, fmt: str) -> QTensor:
    """``a`` (rows, cols) f32 stored as ``fmt`` (2-D only; vectors stay F32); a store layout
    (Q5_0R, Q4_1R, Q8_0S ...) is its GGUF format's blocks packed as the importer packs them."""
    from flashlm.kernels.repacked import GGUF_OF, pack

    if fmt in GGUF_OF and a.ndim == 2:
        g = qtensor(a, GGUF_OF[fmt])
        return QTensor(pack(g.fmt, g.data, g.shape)[1], fmt, g.shape)
    if a.ndim == 1 or fmt == "F32":
        return QTensor(np.ascontiguousarray(a, np.float32), "F32", a.shape)
    if fmt == "F16":
        return QTensor(a.astype(np.float16), "F16", a.shape)
    if fmt == "BF16":
        return QTensor((a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), "BF16", a.shape)
    import gguf

    return QTensor(gguf.quants.quantize(a, gguf.GGMLQuantizationType[fmt]), fmt, a.shape)


def random_weights(cfg: ModelConfig, fmt: str, seed: int = 0) -> DictWeights:
    """GGUF-named random weights for ``cfg``, 2-D ones stored as ``fmt``."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def mat(r, c, s=0.1):
        return (s * rng.standard_normal((r, c))).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": mat(cfg.vocab_size, d, 1.0), "output_norm.weight": norm(d)}
    if not cfg.tie_word_embeddings:
        t["output.weight"] = mat(cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": norm(d), p + "attn_q.weight": mat(hq, d), p + "attn_k.weight": mat(hkv, d),
              p + "attn_v.weight": mat(hkv, d), p + "attn_output.weight": mat(d, hq), p + "ffn_norm.weight": norm(d),
              p + "ffn_gate.weight": mat(f, d), p + "ffn_up.weight": mat(f, d), p + "ffn_down.weight": mat(d, f)}
        if cfg.attention_bias:
            for k, n in (("q", hq), ("k", hkv), ("v", hkv)):
                t[p + f"attn_{k}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if cfg.qk_norm:
            t[p + "attn_q_norm.weight"], t[p + "attn_k_norm.weight"] = norm(hd), norm(hd)
    return DictWeights({k: qtensor(v, fmt) for k, v in t.items()})


class CountingWeights:
    """Wraps a weights source and counts layer() calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def tensor(self, name):
        return self.inner.tensor(name)

    def has(self, name):
        return self.inner.has(name)

    def layer(self, i):
        self.calls.append(i)
        return self.inner.layer(i)


def backend_of(name: str):
    if name == "kernels":
        if not kernels_available():  # a broken install must fail, not skip
            pytest.fail(f"flashlm.kernels do not import: {kernels_error()}")
        return KernelBackend()
    return NumpyBackend()


def nerr(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized error ||a - b|| / ||b||."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


PARAMS = [(a, f) for a in ARCHS for f in ("F32", "Q8_0")] + [("qwen2", f) for f in ("F16", "BF16", "Q4_0")]


@pytest.fixture(params=[(a, f, b) for a, f in PARAMS for b in ("numpy", "kernels")], ids=lambda p: "-".join(p))
def model(request):
    arch, fmt, backend = request.param
    cfg = tiny_config(arch)
    return build_model(cfg, CountingWeights(random_weights(cfg, fmt)), backend_of(backend))


def test_shapes_without_and_with_cache(model):
    ids = np.random.default_rng(1).integers(0, VOCAB, 7)
    cache = model.make_cache(16)
    out = model.forward(ids, np.arange(7), cache)
    assert out.shape == (VOCAB,) and out.dtype == np.float32 and np.isfinite(out).all()
    assert cache.offset == 7
    out = model.forward(ids[:3], np.arange(7, 10), cache)  # a second chunk on a filled cache
    assert out.shape == (VOCAB,) and cache.offset == 10
    full = model.forward(ids, None, model.make_cache(8), all_logits=True)
    assert full.shape == (7, VOCAB) and full.dtype == np.float32
    assert model.weights.calls == [0, 1] * 3  # each layer asked once per forward


def test_decode_step_equals_full_sequence(model):
    ids = np.random.default_rng(2).integers(0, VOCAB, 9)
    full = model.forward(ids, np.arange(9), model.make_cache(9), all_logits=True)
    cache = model.make_cache(9)
    assert nerr(model.forward(ids[:8], np.arange(8), cache), full[7]) < 1e-5
    step = model.forward(ids[8:], np.array([8]), cache)
    assert nerr(step, full[8]) < 1e-5
    assert nerr(full[:-1][-1], model.forward(ids[:8], None, model.make_cache(8))) < 1e-5


def test_batch_equals_alone(model):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, VOCAB, n) for n in (1, 6, 4)]
    caches = [model.make_cache(8) for _ in seqs]
    model.forward(seqs[2][:2], None, caches[2])  # the third one has 2 positions cached
    out = model.forward_batch([(seqs[0], None, caches[0]), (seqs[1], None, caches[1]), (seqs[2][2:], None, caches[2])])
    assert out.shape == (3, VOCAB) and [c.offset for c in caches] == [1, 6, 4]
    for j, ids in enumerate(seqs):
        assert nerr(out[j], model.forward(ids, None, model.make_cache(8))) < 1e-5, f"sequence {j}"


@pytest.mark.parametrize("arch,fmt", PARAMS, ids=lambda p: p)
def test_kernels_agree_with_numpy(arch, fmt):
    cfg = tiny_config(arch)
    weights = random_weights(cfg, fmt)
    kern = build_model(cfg, weights, backend_of("kernels"))
    ref = build_model(cfg, weights, NumpyBackend())
    ids = np.random.default_rng(4).integers(0, VOCAB, 11)
    a = kern.forward(ids, None, kern.make_cache(11), all_logits=True)
    b = ref.forward(ids, None, ref.make_cache(11), all_logits=True)
    assert nerr(a, b) < 1e-5


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kernels_agree_with_numpy_on_f16_caches(arch):
    """An f16 KV cache in both backends: the same half values, float32 arithmetic; and close to
    the f32 cache (the rounding to half moves the logits by about 1e-3 of their size)."""
    cfg = tiny_config(arch)
    weights = random_weights(cfg, "Q8_0")
    kern = build_model(cfg, weights, backend_of("kernels"))
    ref = build_model(cfg, weights, NumpyBackend())
    ids = np.random.default_rng(4).integers(0, VOCAB, 11)
    a = kern.forward(ids, None, kern.make_cache(11, kv="f16"), all_logits=True)
    b = ref.forward(ids, None, ref.make_cache(11, kv="f16"), all_logits=True)
    assert nerr(a, b) < 1e-5
    assert 0 < nerr(a, kern.forward(ids, None, kern.make_cache(11), all_logits=True)) < 1e-2


# Bit identity on the kernel backend: the small-n kernels give every row the GEMV's bits, and
# every other op of a step (norms, rope, silu, attention) computes a row the same way whatever
# else is in the batch, so batching and draft verification cannot change a greedy choice.
IDENTITY = [("qwen2", "Q8_0"), ("qwen2", "Q5_0R"), ("llama", "Q4_1R"), ("qwen3", "F32"), ("qwen2", "BF16")]


@pytest.fixture(scope="module")
def pool2():
    from flashlm.runtime.threadpool import ThreadPool

    with ThreadPool(2) as p:
        yield p


def _kernel_model(arch: str, fmt: str, pool=None):
    if not kernels_available():
        pytest.skip("flashlm.kernels.matmul/ops do not import yet")
    cfg = tiny_config(arch)
    return build_model(cfg, random_weights(cfg, fmt, seed=5), KernelBackend(pool))


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("use_pool", [False, True], ids=["serial", "pool"])
@pytest.mark.parametrize("b", [2, 8])
@pytest.mark.parametrize("arch,fmt", IDENTITY, ids=lambda p: p)
def test_forward_batch_of_one_token_sequences_is_bit_identical(arch, fmt, b, use_pool, kv, pool2, monkeypatch):
    """B sequences with different cache lengths, one new token each, in one forward_batch:
    every row of logits equals that sequence's own one-token forward, bit for bit (two steps),
    with f32 and with f16 KV caches."""
    from flashlm.kernels import matmul as mm
    from flashlm.runtime import backend as bk

    if use_pool:  # split every product and every attention over the pool, whatever its size
        monkeypatch.setattr(mm, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(bk, "ATTN_PARALLEL_MIN", 0)
    model = _kernel_model(arch, fmt, pool2 if use_pool else None)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, 1 + 3 * j) for j in range(b)]
    batched, alone = [model.make_cache(40, kv=kv) for _ in prompts], [model.make_cache(40, kv=kv) for _ in prompts]
    for p, c1, c2 in zip(prompts, batched, alone):
        model.forward(p, None, c1)
        model.forward(p, None, c2)
    toks = rng.integers(0, VOCAB, b)
    for _ in range(2):
        out = model.forward_batch([(toks[j:j + 1], None, batched[j]) for j in range(b)])
        for j in range(b):
            np.testing.assert_array_equal(out[j], model.forward(toks[j:j + 1], None, alone[j]), err_msg=f"seq {j}")
        toks = out.argmax(-1)


@pytest.mark.parametrize("use_pool", [False, True], ids=["serial", "pool"])
@pytest.mark.parametrize("k1", [2, 5, 9, 17])
@pytest.mark.parametrize("arch,fmt", IDENTITY, ids=lambda p: p)
def test_verify_pass_is_bit_identical_to_one_token_steps(arch, fmt, k1, use_pool, pool2, monkeypatch):
    """A forward of K+1 tokens on a cache (the verification of K draft tokens) gives at every
    position the logits of K+1 successive one-token forwards, bit for bit."""
    from flashlm.kernels import matmul as mm
    from flashlm.runtime import backend as bk

    if use_pool:
        monkeypatch.setattr(mm, "PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(bk, "ATTN_PARALLEL_MIN", 0)
    model = _kernel_model(arch, fmt, pool2 if use_pool else None)
    assert k1 < mm.BLAS_MIN_ROWS["F32"]
    rng = np.random.default_rng(8)
    prompt, draft = rng.integers(0, VOCAB, 6), rng.integers(0, VOCAB, k1)
    c1, c2 = model.make_cache(32), model.make_cache(32)
    model.forward(prompt, None, c1)
    model.forward(prompt, None, c2)
    verify = model.forward(draft, None, c1, all_logits=True)
    for i in range(k1):
        np.testing.assert_array_equal(verify[i], model.forward(draft[i:i + 1], None, c2), err_msg=f"position {i}")


def test_bad_input(model):
    cache = model.make_cache(4)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.forward(np.array([VOCAB]), None, cache)
    with pytest.raises(InputError, match="raise --ctx"):
        model.forward(np.arange(5), None, cache)
    assert cache.offset == 0  # nothing was written
    with pytest.raises(InputError, match="shares its KV cache"):
        model.forward_batch([([1], None, cache), ([2], None, cache)])
    with pytest.raises(InputError, match="positions"):
        model.forward(np.arange(3), np.arange(2), cache)
    with pytest.raises(InputError, match="no tokens"):
        model.forward(np.array([], np.int64), None, cache)


def test_get_model_class():
    assert get_model_class("mistral") is get_model_class("llama")
    assert get_model_class("qwen3").__module__ == "flashlm.models.qwen3"
    with pytest.raises(UnsupportedError, match="gpt2"):
        get_model_class("gpt2")

"""Decode programs (kernels.program via models.base.Decoder._program): a decode step's blocks as one
dispatch must give the bits of the step run block by block, on every dense architecture, weight
format, KV cache type and thread count; and where a program cannot run, blocks run one by one."""
from __future__ import annotations

import numpy as np
import pytest
from test_model_runner import ARCHS, VOCAB, random_weights

from flashlm.kernels import matmul
from flashlm.models import build_model
from flashlm.models.config import ModelConfig
from flashlm.runtime.backend import KernelBackend
from flashlm.runtime.threadpool import ThreadPool


def tiny_config(arch: str) -> ModelConfig:
    """test_model_runner's tiny models at widths the 256-weight formats take."""
    return ModelConfig(model_type=arch, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-5,
                       **{**ARCHS[arch], "head_dim": 64})


@pytest.fixture(scope="module")
def pool():
    with ThreadPool(2) as p:
        yield p


def _steps(model, kv: str, *, programs: bool, n: int = 6) -> tuple[list[np.ndarray], object]:
    """Prefill of 5 tokens then ``n`` greedy decode steps; the logits of every step."""
    model.use_programs = programs
    cache = model.make_cache(32, kv=kv)
    out = [model.forward(np.array([3, 17, 5, 40, 9]), None, cache)]
    for _ in range(n):
        out.append(model.forward(np.array([int(np.argmax(out[-1]))]), None, cache))
    return out, cache


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("fmt", ["Q8_0", "Q8_0S", "Q5_0R", "Q4_1R", "F16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("threads", [1, 2])
def test_program_equals_blocks(arch: str, fmt: str, kv: str, threads: int, pool) -> None:
    cfg = tiny_config(arch)
    model = build_model(cfg, random_weights(cfg, fmt, seed=1), KernelBackend(pool if threads == 2 else None))
    blocks, _ = _steps(model, kv, programs=False)
    fused, cache = _steps(model, kv, programs=True)
    assert cache._program[1] is not None  # the steps did run as a program
    for a, b in zip(fused, blocks):
        np.testing.assert_array_equal(a, b)


def test_program_on_the_exact_path_is_its_own(pool) -> None:
    """A program is made per path: switching to the exact kernels makes another."""
    cfg = tiny_config("qwen2")
    model = build_model(cfg, random_weights(cfg, "Q5_0R", seed=2), KernelBackend(pool))
    _, cache = _steps(model, "f32", programs=True, n=2)
    first = cache._program
    matmul.set_exact(True)
    blocks, _ = _steps(model, "f32", programs=False, n=3)
    fused, cache2 = _steps(model, "f32", programs=True, n=3)
    assert cache2._program[0] != first[0]
    for a, b in zip(fused, blocks):
        np.testing.assert_array_equal(a, b)


def test_no_program_where_it_cannot_run(pool) -> None:
    """Weights that stream (not resident), the numpy backend, positions past the rope tables:
    the blocks run one by one, with the same results."""
    cfg = tiny_config("llama")
    weights = random_weights(cfg, "Q8_0", seed=3)

    class Streaming:  # a source without ``resident``
        def __init__(self, inner):
            self.inner = inner

        def tensor(self, name):
            return self.inner.tensor(name)

        def has(self, name):
            return self.inner.has(name)

        def layer(self, i):
            return self.inner.layer(i)

    model = build_model(cfg, Streaming(weights), KernelBackend(pool))
    _, cache = _steps(model, "f32", programs=True, n=1)
    assert getattr(cache, "_program", None) is None
    model = build_model(cfg, weights, KernelBackend(pool))
    cache = model.make_cache(8)
    ref = model.make_cache(8)
    model.forward(np.array([1, 2]), None, cache)
    model.use_programs = False
    model.forward(np.array([1, 2]), None, ref)
    far = np.array([100])  # a position past the cache's rope table: block by block
    a = model.forward(np.array([4]), far, ref)
    model.use_programs = True
    b = model.forward(np.array([4]), far, cache)
    np.testing.assert_array_equal(a, b)


def test_forward_batch_of_one_sequence_runs_the_program(pool) -> None:
    """The engine decodes through forward_batch: one sequence of one token takes the program."""
    cfg = tiny_config("qwen3")
    model = build_model(cfg, random_weights(cfg, "Q8_0S", seed=4), KernelBackend(pool))
    blocks, _ = _steps(model, "f32", programs=False, n=3)
    model.use_programs = True
    cache = model.make_cache(32)
    out = [model.forward(np.array([3, 17, 5, 40, 9]), None, cache)]
    for _ in range(3):
        out.append(model.forward_batch([(np.array([int(np.argmax(out[-1]))]), None, cache)])[0])
    assert cache._program[1] is not None
    for a, b in zip(out, blocks):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("threads", [1, 2])
def test_moe_program_equals_blocks(fmt: str, threads: int, pool, tmp_path) -> None:
    """A Qwen3-MoE store (experts adjacent: one gate+up product each): the program's router, top-k,
    expert rows and weighted sum have the bits of the block-by-block step; so does a GGUF-loaded
    model (experts as slices of 3-D tensors, gate and up apart)."""
    from synth import tiny_moe_store

    from flashlm.models.weights import gguf_weights

    store = tiny_moe_store(tmp_path, hidden=256, head_dim=64, expert_ffn=256, n_experts=8, k=3, fmt=fmt)
    cfg, dict_weights = gguf_weights(tmp_path / "moe.gguf")
    for cfg_, weights in ((store.config, store), (cfg, dict_weights)):
        model = build_model(cfg_, weights, KernelBackend(pool if threads == 2 else None))
        blocks, _ = _steps(model, "f32", programs=False)
        fused, cache = _steps(model, "f32", programs=True)
        assert cache._program[1] is not None
        for a, b in zip(fused, blocks):
            np.testing.assert_array_equal(a, b)

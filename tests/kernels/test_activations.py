"""silu_mul, softmax and the vectorizable exp they use, against float64 numpy."""
from __future__ import annotations

import numpy as np
import pytest

from flashlm.kernels.config import jit
from flashlm.kernels.ops import _expf, silu_mul, softmax


def nerr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


@jit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = _expf(x[i])


def test_expf_accuracy_and_specials() -> None:
    x = np.linspace(-87.3, 88.3, 1_000_001, dtype=np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) < 5e-7  # a few ulp
    sp = np.array([np.inf, -np.inf, np.nan, 0.0, -200.0, 200.0, 89.0], np.float32)
    out = np.empty_like(sp)
    _exp_all(sp, out)
    assert out[0] == np.inf and out[1] == 0.0 and np.isnan(out[2])
    assert out[3] == 1.0 and out[4] == 0.0 and out[5] == np.inf and out[6] == np.inf


def silu_mul_ref(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g64 = g.astype(np.float64)
    return g64 / (1.0 + np.exp(-g64)) * u.astype(np.float64)


@pytest.mark.parametrize("shape", [(1, 1), (1, 4864), (7, 8960), (3, 33)])
def test_silu_mul_matches_reference(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[1])
    g = (rng.standard_normal(shape) * 4).astype(np.float32)
    u = rng.standard_normal(shape).astype(np.float32)
    out = silu_mul(g, u)
    assert nerr(out, silu_mul_ref(g, u)) < 1e-6
    np.testing.assert_allclose(out, silu_mul_ref(g, u), rtol=2e-6, atol=1e-30)


def test_silu_mul_extremes_and_in_place() -> None:
    g = np.array([[-1000.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1000.0, np.nan]], np.float32)
    u = np.full_like(g, 2.0)
    out = silu_mul(g, u)
    with np.errstate(over="ignore"):
        ref = silu_mul_ref(g, u)
    # exp(-g) beyond 2.4e38 is inf, so silu(-90) is -0 instead of -7e-38
    np.testing.assert_allclose(out[0, :7], ref[0, :7], rtol=1e-6, atol=1e-36)
    assert np.isnan(out[0, 7])
    out2 = silu_mul(g, u, out=g)
    assert out2 is g
    np.testing.assert_array_equal(out2[0, :7], out[0, :7])


def softmax_ref(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 1000), (2, 3, 151936)])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_softmax_matches_reference(shape: tuple[int, ...], scale: float) -> None:
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    out = softmax(x)
    assert np.isfinite(out).all()
    assert nerr(out, softmax_ref(x)) < 1e-6
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)


def test_softmax_large_values_and_masks() -> None:
    x = np.array([[1e30, 1e30, -1e30], [3e38, 0.0, -np.inf], [-np.inf, 5.0, -np.inf]], np.float32)
    out = softmax(x)
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = x.copy()
    assert softmax(y, out=y) is y
    np.testing.assert_array_equal(y, out)


def test_bad_input_rejected() -> None:
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError):
        silu_mul(a, np.ones((3, 2), np.float32))
    with pytest.raises(TypeError):
        silu_mul(a, a.astype(np.float16))
    with pytest.raises(ValueError):
        softmax(np.ones((2, 0), np.float32))
    with pytest.raises(ValueError):
        softmax(np.ones((3, 2), np.float32).T)


def test_silu_mul_rows_do_not_depend_on_the_batch() -> None:
    """A row of (n, f) equals the same row alone, bit for bit, wherever it falls in the loop."""
    rng = np.random.default_rng(3)
    for f in (96, 4864, 37):
        g = rng.standard_normal((9, f)).astype(np.float32) * 4
        u = rng.standard_normal((9, f)).astype(np.float32)
        out = silu_mul(g, u)
        for i in range(9):
            np.testing.assert_array_equal(silu_mul(g[i:i + 1], u[i:i + 1]), out[i:i + 1])
            np.testing.assert_array_equal(silu_mul(g[i], u[i]), out[i])

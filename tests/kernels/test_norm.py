"""rmsnorm against a float64 numpy reference and HF's float32 formula."""
from __future__ import annotations

import numpy as np
import pytest

from flashlm.kernels.ops import rmsnorm


def nerr(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - ref) / np.linalg.norm(ref))


def rmsnorm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("d", [1, 7, 64, 576, 896, 1536])
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_matches_reference(d: int, n: int, eps: float) -> None:
    rng = np.random.default_rng(d * 100 + n)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    out = rmsnorm(x, w, eps)
    assert out.shape == x.shape and out.dtype == np.float32
    assert nerr(out, rmsnorm_ref(x, w, eps)) < 1e-6


def test_rmsnorm_eps_matters() -> None:
    x = np.full((1, 8), 1e-3, np.float32)
    w = np.ones(8, np.float32)
    out = rmsnorm(x, w, 1e-6)
    np.testing.assert_allclose(out, rmsnorm_ref(x, w, 1e-6), rtol=1e-6)
    assert out[0, 0] < 0.8  # eps comparable to mean(x^2) = 1e-6 shrinks the result


def test_rmsnorm_large_and_small_magnitudes() -> None:
    rng = np.random.default_rng(1)
    for scale in (1e-15, 1e15):
        x = (rng.standard_normal((4, 896)) * scale).astype(np.float32)
        w = rng.standard_normal(896).astype(np.float32)
        out = rmsnorm(x, w, 1e-30)
        assert np.isfinite(out).all()
        assert nerr(out, rmsnorm_ref(x, w, 1e-30)) < 1e-6


def test_rmsnorm_in_place_and_per_head() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 14, 64)).astype(np.float32)  # qwen3 q-norm: per head
    w = rng.standard_normal(64).astype(np.float32)
    ref = rmsnorm_ref(x, w, 1e-6)
    out = rmsnorm(x, w, 1e-6, out=x)
    assert out is x
    assert nerr(x, ref) < 1e-6


def test_rmsnorm_matches_hf_float32() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 1536)).astype(np.float32) * 3
    w = rng.standard_normal(1536).astype(np.float32)
    xt = torch.from_numpy(x)
    var = xt.pow(2).mean(-1, keepdim=True)
    hf = (torch.from_numpy(w) * (xt * torch.rsqrt(var + 1e-6))).numpy()
    out = rmsnorm(x, w, 1e-6)
    np.testing.assert_allclose(out, hf, rtol=3e-6, atol=1e-6)


def test_rmsnorm_rejects_bad_input() -> None:
    x = np.ones((2, 8), np.float32)
    with pytest.raises(TypeError):
        rmsnorm(x.astype(np.float64), np.ones(8, np.float32), 1e-6)
    with pytest.raises(ValueError):
        rmsnorm(x, np.ones(7, np.float32), 1e-6)
    with pytest.raises(ValueError):
        rmsnorm(np.ones((8, 2), np.float32).T, np.ones(8, np.float32), 1e-6)
    with pytest.raises(ValueError):
        rmsnorm(x, np.ones(8, np.float32), 1e-6, out=np.empty((2, 7), np.float32))

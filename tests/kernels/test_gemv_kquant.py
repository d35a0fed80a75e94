"""K-quant GEMV / GEMM / dequant kernels against gguf's reference dequantizers.

Error measure, per output element: |out - ref| / sum_k |W[r, k] * x[k]| (the size of
the dot product's terms, so rows of tiny and huge blocks are judged alike), max over
the output. f32 accumulation gives <= 2e-7 (TOL 2e-6); a wrong scale, nibble or high
bit gives >= 9e-4 (test_error_check_catches_layout_bugs shows it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from flashlm.kernels import gemv_kquant as K

FMTS = ["Q4_K", "Q5_K", "Q6_K"]
BB = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
IMPLS = ["simd", "plain"] if K.SIMD else ["plain"]
TOL = 2e-6

# f16 scale values: ordinary, zero, extreme normals, a subnormal
_SPECIAL_F16 = np.array([0.0, -0.0, 65504.0, -65504.0, 6.104e-5, -6.104e-5, 2.0**-24], np.float16)


def random_kquant(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks (rows, cols // 256 * block bytes) uint8: random quants and
    6/8-bit scales, f16 d (and dmin) mostly ~N(0, 1e-2), 1 in 8 a special value."""
    rng = np.random.default_rng(seed)
    nb = cols // 256
    w = rng.integers(0, 256, (rows, nb, BB[fmt]), dtype=np.uint8)
    n_half = 1 if fmt == "Q6_K" else 2
    d = (rng.standard_normal((rows, nb, n_half)) * 1e-2).astype(np.float16)
    special = rng.random(d.shape) < 0.125
    d[special] = rng.choice(_SPECIAL_F16, size=int(special.sum()))
    d = d.view(np.uint8).reshape(rows, nb, 2 * n_half)
    if fmt == "Q6_K":
        w[..., 208:210] = d
    else:
        w[..., 0:4] = d
    return w.reshape(rows, nb * BB[fmt])


def ref_dequant(w: np.ndarray, fmt: str) -> np.ndarray:
    return dequantize(w, getattr(GGMLQuantizationType, fmt)).reshape(w.shape[0], -1)


@lru_cache(maxsize=2)
def case(fmt: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    w = random_kquant(fmt, rows, cols, seed=rows * 7 + cols)
    return w, ref_dequant(w, fmt)


def rel_err(out: np.ndarray, W: np.ndarray, X: np.ndarray) -> float:
    """max |out - W.X| / (|W|.|X|) over all outputs; out (n, rows), X (n, cols)."""
    W64, X64 = W.astype(np.float64), X.astype(np.float64)
    ref = X64 @ W64.T
    scale = np.abs(X64) @ np.abs(W64).T
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err[scale == 0] == 0), "rows of zero blocks must give exactly 0"
    return float(np.max(err / np.where(scale == 0, 1.0, scale)))


def run_gemv(impl, fmt, w, x, r0=0, r1=None):
    rows = w.shape[0]
    r1 = rows if r1 is None else r1
    out = np.full(rows, np.nan, np.float32)
    K.IMPLS[impl][fmt][0](w, x, out, r0, r1)
    return out


SHAPES = [(896, 4864), (1536, 8960), (8960, 1536), (576, 1536), (128, 1536), (256, 256),
          (1, 256), (7, 512), (33, 768)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv(shape, fmt, impl):
    rows, cols = shape
    if impl == "plain" and rows * cols > 3_000_000 and fmt != "Q4_K":
        pytest.skip("plain path on the largest shapes: Q4_K only (runtime)")
    w, W = case(fmt, rows, cols)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    out = run_gemv(impl, fmt, w, x)
    assert rel_err(out[None], W, x[None]) < TOL


@pytest.mark.parametrize("path", sorted(K.Q4K_GEMV_PATHS))
@pytest.mark.parametrize("shape", [(1536, 8960), (8960, 1536), (7, 512), (1, 256), (33, 768)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_q4_k_gemv_every_simd_path(shape, path):
    """Each Q4_K GEMV code path this CPU runs (widen + convert; AVX-512 permuted x), on
    its own, whichever one IMPLS["simd"] picked; with a row range off both ends."""
    rows, cols = shape
    w, W = case("Q4_K", rows, cols)
    x = np.random.default_rng(4).standard_normal(cols).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    r0, r1 = (1, rows - 1) if rows > 2 else (0, rows)
    K.Q4K_GEMV_PATHS[path](w, x, out, r0, r1)
    assert np.isnan(out[:r0]).all() and np.isnan(out[r1:]).all()
    assert rel_err(out[None, r0:r1], W[r0:r1], x[None]) < TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("shape", [(256, 256), (33, 768), (128, 1536), (896, 4864)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemm(shape, n, fmt, impl):
    rows, cols = shape
    w, W = case(fmt, rows, cols)
    X = np.random.default_rng(2).standard_normal((n, cols)).astype(np.float32)
    out = np.full((n, rows), np.nan, np.float32)
    K.IMPLS[impl][fmt][1](w, X, out, 0, rows)
    assert rel_err(out, W, X) < TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape", [(33, 768), (576, 1536), (1, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequant(shape, fmt, impl):
    rows, cols = shape
    w, W = case(fmt, rows, cols)
    out = np.zeros((rows, cols), np.float32)
    K.IMPLS[impl][fmt][2](w, out, 0, rows)
    # per element: d*sc*q - dmin*m in f32 (one rounding of difference allowed if fused)
    tol = 1e-6 * np.abs(W).max(axis=1, keepdims=True)
    assert np.all(np.abs(out - W) <= tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_row_range_only_writes_its_rows(fmt, impl):
    w, W = case(fmt, 33, 768)
    x = np.random.default_rng(3).standard_normal(768).astype(np.float32)
    out = run_gemv(impl, fmt, w, x, 5, 20)
    assert np.isnan(out[:5]).all() and np.isnan(out[20:]).all()
    assert rel_err(out[None, 5:20], W[5:20], x[None]) < TOL
    X = np.stack([x, -x])
    outm = np.full((2, 33), np.nan, np.float32)
    K.IMPLS[impl][fmt][1](w, X, outm, 20, 33)
    assert np.isnan(outm[:, :20]).all() and rel_err(outm[:, 20:], W[20:], X) < TOL
    D = np.full((33, 768), np.nan, np.float32)
    K.IMPLS[impl][fmt][2](w, D, 3, 4)
    assert np.isnan(D[:3]).all() and np.isnan(D[4:]).all() and np.allclose(D[3], W[3], rtol=1e-6)


def _mutations(fmt: str):
    """(name, function bytes -> bytes) layout bugs a kernel could have; each must be caught."""

    def swap_nibbles(lo, hi):
        def f(w):
            w = w.reshape(w.shape[0], -1, BB[fmt]).copy()
            q = w[..., lo:hi]
            w[..., lo:hi] = (q >> 4) | (q << 4)
            return w.reshape(w.shape[0], -1)

        return f

    def xor_byte(pos, mask):
        def f(w):
            w = w.reshape(w.shape[0], -1, BB[fmt]).copy()
            w[..., pos] ^= mask
            return w.reshape(w.shape[0], -1)

        return f

    if fmt == "Q6_K":
        return [("swap ql nibbles", swap_nibbles(0, 128)), ("one scale +1", xor_byte(199, 1)),
                ("qh bit pair", xor_byte(150, 0x30))]
    qs = 48 if fmt == "Q5_K" else 16
    muts = [("swap qs nibbles", swap_nibbles(qs, qs + 128)),
            ("scale high bits (j>=4)", xor_byte(4 + 2, 0x40)),  # top bits of s[2] -> sc[6]
            ("min high bits (j>=4)", xor_byte(4 + 6, 0x80))]  # top bits of s[6] -> m[6]
    if fmt == "Q5_K":
        muts.append(("qh bit", xor_byte(16 + 5, 0x08)))
    return muts


@pytest.mark.parametrize("fmt", FMTS)
def test_error_check_catches_layout_bugs(fmt):
    """The tolerance is tight: reading the layout slightly wrong fails by orders of magnitude."""
    w, W = case(fmt, 33, 768)
    x = np.random.default_rng(4).standard_normal(768).astype(np.float32)
    out = run_gemv(IMPLS[0], fmt, w, x)
    assert rel_err(out[None], W, x[None]) < TOL
    for name, mutate in _mutations(fmt):
        W_bad = ref_dequant(mutate(w), fmt)
        assert not np.array_equal(W_bad, W), name
        assert rel_err(out[None], W_bad, x[None]) > 100 * TOL, f"{fmt}: '{name}' not caught"


@pytest.mark.parametrize("fmt", FMTS)
def test_bad_arguments_raise(fmt):
    w, _ = case(fmt, 7, 512)
    x = np.zeros(512, np.float32)
    f = K.IMPLS[IMPLS[0]][fmt][0]
    with pytest.raises(ValueError):
        f(w, x, np.zeros(7, np.float32), 0, 8)  # r1 > rows
    with pytest.raises(ValueError):
        f(w, np.zeros(768, np.float32), np.zeros(7, np.float32), 0, 7)  # cols mismatch
    with pytest.raises(ValueError):
        f(w, np.zeros(1024, np.float32)[::2], np.zeros(7, np.float32), 0, 7)  # strided x


def test_public_names_and_tables():
    impl = "simd" if K.SIMD else "plain"
    for fmt, name in zip(FMTS, ["q4_k", "q5_k", "q6_k"]):
        gemv, gemm, deq = K.IMPLS[impl][fmt]
        assert K.KQUANT_KERNELS[fmt] == (gemv, gemm) and K.KQUANT_DEQUANT[fmt] is deq
        assert getattr(K, f"gemv_{name}") is gemv and getattr(K, f"gemm_{name}") is gemm
        assert getattr(K, f"dequant_{name}") is deq


@pytest.fixture(scope="module")
def gguf_1p5b() -> GGUFReader:
    from realmodels import gguf_by_stem

    return GGUFReader(gguf_by_stem("qwen2.5-coder-1.5b-instruct-q4_k_m"))  # slow to parse (~10 s): once per module


@pytest.mark.parametrize("name", ["blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"])  # Q4_K, Q6_K
def test_real_tensors(name, gguf_1p5b):
    t = next(t for t in gguf_1p5b.tensors if t.name == name)
    fmt = t.tensor_type.name
    w = np.ascontiguousarray(t.data)  # (rows, row_bytes) uint8
    rows, cols = w.shape[0], int(t.shape[0])
    W = ref_dequant(w, fmt)
    assert W.shape == (rows, cols)
    X = np.random.default_rng(5).standard_normal((3, cols)).astype(np.float32)
    for impl in IMPLS:
        gemv, gemm, _ = K.IMPLS[impl][fmt]
        out = np.zeros(rows, np.float32)
        gemv(w, X[0], out, 0, rows)
        assert rel_err(out[None], W, X[:1]) < TOL, impl
        outm = np.zeros((3, rows), np.float32)
        gemm(w, X, outm, 0, rows)
        assert rel_err(outm, W, X) < TOL, impl


def test_cache_second_process_does_not_recompile():
    code = (
        "import numpy as np\n"
        "from flashlm.kernels import gemv_kquant as K\n"
        "w = np.zeros((2, 144), np.uint8); x = np.zeros(256, np.float32); o = np.zeros(2, np.float32)\n"
        "K.gemv_q4_k(w, x, o, 0, 2)\n"
        "print(sum(K.gemv_q4_k.stats.cache_misses.values()), sum(K.gemv_q4_k.stats.cache_hits.values()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(K.__file__).parents[2]))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            for _ in range(2)]
    misses, hits = map(int, runs[1].stdout.split())
    assert misses == 0 and hits >= 1, runs[1].stdout


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FMTS)
def test_shared_random_weights_with_extreme_rows(fmt, impl):
    """Cross-check with the kernel suite's shared generator (whole rows at 65504,
    6.1e-5, a subnormal and 0) and its error measure."""
    from _blocks import TOL as SHARED_TOL
    from _blocks import dequant_ref, max_error, random_weights

    rng = np.random.default_rng(6)
    w = random_weights(fmt, 22, 512, rng)
    W = dequant_ref(w, fmt)
    X = rng.standard_normal((3, 512)).astype(np.float32)
    gemv, gemm, deq = K.IMPLS[impl][fmt]
    out = np.zeros(22, np.float32)
    gemv(w, X[0], out, 0, 22)
    outm = np.zeros((3, 22), np.float32)
    gemm(w, X, outm, 0, 22)
    assert max_error(out, W, X[0]) < SHARED_TOL and max_error(outm, W, X) < SHARED_TOL
    D = np.zeros((22, 512), np.float32)
    deq(w, D, 0, 22)
    assert np.array_equal(D, W.astype(np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_gemm_bad_arguments_raise(impl):
    w, _ = case("Q4_K", 7, 512)
    gemm = K.IMPLS[impl]["Q4_K"][1]
    with pytest.raises(ValueError):
        gemm(w, np.zeros((3, 1024), np.float32)[:, ::2], np.zeros((3, 7), np.float32), 0, 7)  # strided X
    with pytest.raises(ValueError):
        gemm(w, np.zeros((3, 512), np.float32), np.zeros((2, 7), np.float32), 0, 7)  # out rows != n

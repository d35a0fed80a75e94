"""Fused dequantize-and-dot kernels (SIMD and plain Numba) against gguf's dequantizers.

Error measure (``_blocks.row_errors``): per output element |y - W_r.x| / (|W_r| |x|),
with W from ``gguf.quants.dequantize`` in float64. Float32 accumulation gives about
1e-7; a swapped nibble or a wrong scale gives >1e-3 (checked below).
"""
from __future__ import annotations

import numpy as np
import pytest
from _blocks import (BASIC_FMTS, SIMD_VARIANTS, TOL, Checker, cpu_runs_variant, dequant_ref, kernel_array,
                     max_error, random_weights, simd_gemv_variant, valid_cols, variant_applies)

from flashlm.kernels import gemv_basic as gb
from flashlm.kernels import simd

IMPLS = {"simd": gb.SIMD_KERNELS, "plain": gb.PLAIN_KERNELS}
# real shapes (rows x cols) of the target models, odd row counts, odd block counts
SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (1536, 8960), (8960, 1536),
          (576, 1536), (1, 896), (7, 896), (33, 896), (33, 96), (7, 32), (5, 90), (3, 208)]
BATCHES = (1, 3, 8)


def _run_all(fmt: str, w: np.ndarray, W: np.ndarray, x: np.ndarray, X: dict, rows_checked=None):
    """GEMV on x and GEMM on each X[n], both implementations, against W (float64)."""
    ka = kernel_array(w, fmt)
    rows = w.shape[0]
    sel = slice(None) if rows_checked is None else rows_checked
    check = Checker(W, np.concatenate([x[None]] + list(X.values())))
    for name, table in IMPLS.items():
        gemv, gemm = table[fmt]
        out = np.full(rows, np.nan, np.float32)
        gemv(ka, x, out, 0, rows)
        err = check.error(out[sel], 0, 1)
        assert err < TOL, f"{fmt} {name} gemv {w.shape}: error {err:.3g}"
        i0 = 1
        for n, Xn in X.items():
            out2 = np.full((n, rows), np.nan, np.float32)
            gemm(ka, Xn, out2, 0, rows)
            err = check.error(out2[:, sel], i0, i0 + n)
            assert err < TOL, f"{fmt} {name} gemm n={n} {w.shape}: error {err:.3g}"
            i0 += n


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fmt", BASIC_FMTS)
def test_kernels_match_gguf(fmt: str, shape: tuple[int, int]) -> None:
    rows, cols = shape
    if not valid_cols(fmt, cols):
        pytest.skip(f"{fmt} needs cols divisible by its block size")
    rng = np.random.default_rng(rows * 7 + cols)
    w = random_weights(fmt, rows, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    X = {n: rng.standard_normal((n, cols)).astype(np.float32) for n in BATCHES}
    _run_all(fmt, w, dequant_ref(w, fmt), x, X)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16"])
def test_vocab_shape_gemv_sampled_rows(fmt: str) -> None:
    """151936 x 896 (the output head): all rows computed, a sample checked in float64."""
    rows, cols = 151936, 896
    rng = np.random.default_rng(5)
    w = random_weights(fmt, rows, cols, rng)
    sel = np.unique(np.concatenate([[0, rows - 1], rng.integers(0, rows, 1500)]))
    x = rng.standard_normal(cols).astype(np.float32)
    X = {3: rng.standard_normal((3, cols)).astype(np.float32)} if fmt == "Q8_0" else {}
    _run_all(fmt, w, dequant_ref(w, fmt, sel), x, X, rows_checked=sel)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("fmt", BASIC_FMTS)
def test_row_range_only_writes_its_rows(fmt: str, impl: str) -> None:
    rng = np.random.default_rng(3)
    w = kernel_array(random_weights(fmt, 40, 64, rng), fmt)
    x = rng.standard_normal(64).astype(np.float32)
    X = rng.standard_normal((2, 64)).astype(np.float32)
    gemv, gemm = IMPLS[impl][fmt]
    out = np.full(40, -7.0, np.float32)
    gemv(w, x, out, 10, 17)
    assert np.all(out[:10] == -7.0) and np.all(out[17:] == -7.0) and np.all(out[10:17] != -7.0)
    out2 = np.full((2, 40), -7.0, np.float32)
    gemm(w, X, out2, 0, 5)
    assert np.all(out2[:, 5:] == -7.0) and np.all(out2[:, :5] != -7.0)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequant_kernels_bit_exact(fmt: str) -> None:
    rng = np.random.default_rng(11)
    w = random_weights(fmt, 37, 96, rng)
    ref = dequant_ref(w, fmt)
    for table in (gb.DEQUANT_SIMD, gb.DEQUANT_PLAIN):
        out = np.empty((37, 96), np.float32)
        table[fmt](w, out, 0, 37)
        assert np.array_equal(out.astype(np.float64), ref)


def _swap_nibbles(w: np.ndarray, r: int, byte: int) -> np.ndarray:
    bad = w.copy()
    v = int(bad[r, byte])
    bad[r, byte] = ((v & 15) << 4) | (v >> 4)
    return bad


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_check_detects_swapped_nibbles_and_wrong_scale(fmt: str) -> None:
    """The tolerance is tight enough: a reference built from bytes with one nibble pair
    swapped, or one block scale doubled, no longer matches the kernel output."""
    rng = np.random.default_rng(2)
    rows, cols = 8, 896
    w = random_weights(fmt, rows, cols, rng, extreme=False)
    qs_off = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[fmt]
    w[0, qs_off] = 0x1E  # nibbles 14 and 1: swapping changes two weights by 13 steps
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    for gemv, _ in (gb.SIMD_KERNELS[fmt], gb.PLAIN_KERNELS[fmt]):
        gemv(w, x, out, 0, rows)
        assert max_error(out, dequant_ref(w, fmt), x) < TOL
        assert max_error(out, dequant_ref(_swap_nibbles(w, 0, qs_off), fmt), x) > 10 * TOL
        bad = w.copy()
        d = bad[3, 0:2].view(np.float16)
        d[0] = d[0] * np.float16(2.0)
        assert max_error(out, dequant_ref(bad, fmt), x) > 10 * TOL


def test_check_detects_q8_sign_error() -> None:
    rng = np.random.default_rng(4)
    w = random_weights("Q8_0", 4, 128, rng, extreme=False)
    w[1, 5] = 0x90  # -112 as int8, 144 if read unsigned
    x = rng.standard_normal(128).astype(np.float32)
    out = np.empty(4, np.float32)
    gb.gemv_q8_0(w, x, out, 0, 4)
    bad = w.copy()
    bad[1, 5] = 0x70
    assert max_error(out, dequant_ref(w, "Q8_0"), x) < TOL
    assert max_error(out, dequant_ref(bad, "Q8_0"), x) > 10 * TOL


def test_f16_scalar_conversion_exact() -> None:
    bits = np.arange(65536, dtype=np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = np.array([gb.f16_to_f32(int(b)) for b in bits[::7]], np.float32)
    np.testing.assert_array_equal(got, ref[::7])  # nan == nan for array_equal of arrays
    assert np.isnan(gb.f16_to_f32(0x7E00)) and gb.f16_to_f32(0xFC00) == -np.inf


def test_simd_selection_follows_cpu_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gb.BASIC_KERNELS is (gb.SIMD_KERNELS if simd.HAVE_SIMD else gb.PLAIN_KERNELS)
    monkeypatch.setenv("FLASHLM_NO_SIMD", "1")
    assert simd._host_has_simd() is False


@pytest.mark.parametrize("variant", list(SIMD_VARIANTS))
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("shape", [(33, 896), (5, 512), (3, 96), (4, 1536), (6, 224), (2, 160)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_simd_code_path(fmt: str, variant: str, shape: tuple[int, int]) -> None:
    """Each code path simd.py can emit (AVX2 widen + convert, AVX-512 table lookup, Q4_0/Q4_1
    four blocks at a time with a tail of 1-3 single blocks), whichever this CPU's default
    is, against gguf."""
    flags = SIMD_VARIANTS[variant]
    if not cpu_runs_variant(flags):
        pytest.skip(f"this CPU cannot run the {variant} code")
    if not variant_applies(fmt, flags):
        pytest.skip(f"{variant} is the same code as another variant for {fmt}")
    rows, cols = shape
    rng = np.random.default_rng(cols + rows)
    w = random_weights(fmt, rows, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    simd_gemv_variant(fmt, flags)(w, x, out, 0, rows)
    assert max_error(out, dequant_ref(w, fmt), x) < TOL

"""The integer path (kernels/intpath.py): int8 activations against exact references.

The reference of a product is computed from the gguf dequantizer's values split into the
part that multiplies the quants and the part that does not (a weight is ``A q - B``, B read
by dequantizing the blocks with their quants zeroed), times the activations quantized as the
kernels quantize them (``quantize_ref``) in float64: the kernels' integer sums are exact, so
what is left is float32 rounding of a few terms per super-block.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from _blocks import random_weights, valid_cols
from flashlm.kernels import intpath
from flashlm.kernels.matmul import KERNELS
from flashlm.kernels.repacked import GGUF_OF, unpack
from flashlm.kernels.simd import HAVE_SIMD

pytestmark = pytest.mark.skipif(not HAVE_SIMD, reason="the integer path needs AVX2 (HAVE_SIMD)")

INT_FMTS = sorted(intpath.INT_KERNELS)
# quant bytes of a GGUF block (zeroed for the B part), after its scale fields
_QUANT_BYTES = {"Q4_K": (144, 16, 144), "Q4_1": (20, 4, 20), "Q8_0": (34, 2, 34), "Q5_0": (22, 2, 22),
                "Q6_K": (210, 0, 192)}


def _split_ref(w: np.ndarray, fmt: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(A q, B) per weight in float64: weight = A q - B."""
    gfmt = GGUF_OF[fmt]
    qt = gguf.GGMLQuantizationType[gfmt]
    g = unpack(fmt, w, (rows, cols))[1]
    wd = gguf.quants.dequantize(g, qt).astype(np.float64)
    bb, q0, q1 = _QUANT_BYTES[gfmt]
    g0 = g.copy().reshape(rows, -1, bb)
    g0[:, :, q0:q1] = 0
    b = -gguf.quants.dequantize(g0.reshape(rows, -1), qt).astype(np.float64)
    return wd + b, b


def _reference(aq: np.ndarray, b: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(product, scale of its terms) of the kernels' arithmetic for activations x (n, cols)."""
    outs, scales = [], []
    for row in x:
        q, dx = intpath.quantize_ref(row)
        xq = (q * dx[:, None].astype(np.float64)).reshape(-1)  # the kernels' integer values, scaled
        outs.append(aq @ xq - b @ row.astype(np.float64))
        scales.append(np.abs(aq) @ np.abs(xq) + np.abs(b) @ np.abs(row.astype(np.float64)))
    return np.array(outs), np.array(scales)


@pytest.mark.parametrize("fmt", INT_FMTS)
# one / several slabs; for the grouped layouts (Q4_1R: 4 blocks, Q5_0R: 3) rows with tail blocks, in the last slab
@pytest.mark.parametrize("shape", [(37, 256), (64, 1536), (33, 4096), (8, 9216), (29, 1568), (9, 3232), (5, 96)])
def test_gemv_and_rows_match_the_integer_reference(fmt: str, shape: tuple[int, int]) -> None:
    rows, cols = shape
    if not valid_cols(fmt, cols):
        pytest.skip(f"{fmt} rows are not {cols} long")
    rng = np.random.default_rng(rows * 7 + cols)
    w = random_weights(fmt, rows, cols, rng, extreme=False)
    aq, b = _split_ref(w, fmt, rows, cols)
    gemv, gemm = intpath.INT_KERNELS[fmt]
    X = rng.standard_normal((17, cols)).astype(np.float32)
    X[3] *= 1e-4  # small and large activation rows: per-block scales
    X[4, : cols // 2] = 0.0  # zero blocks: dx = 0
    ref, scale = _reference(aq, b, X)
    for n in (1, 2, 3, 5, 8, 11, 17):
        out = np.empty((n, rows), np.float32)
        if n == 1:
            gemv(w, X[0], out[0], 0, rows)
        else:
            gemm(w, X[:n], out, 0, rows)
        err = np.abs(out - ref[:n]) / (scale[:n] + 1e-30)
        assert err.max() < 1e-6, (n, err.max())
        if n > 1:  # every row has the bits of the GEMV on that row
            one = np.empty(rows, np.float32)
            for i in range(n):
                gemv(w, X[i], one, 0, rows)
                np.testing.assert_array_equal(out[i], one)


@pytest.mark.parametrize("fmt", INT_FMTS)
def test_row_ranges(fmt: str) -> None:
    rows, cols = 70, 512
    rng = np.random.default_rng(5)
    w = random_weights(fmt, rows, cols, rng, extreme=False)
    gemv, gemm = intpath.INT_KERNELS[fmt]
    for n in (6, 9):  # Q6_KR: below and from _BYTES_MIN rows
        x = rng.standard_normal((n, cols)).astype(np.float32)
        full = np.empty((n, rows), np.float32)
        gemm(w, x, full, 0, rows)
        part = np.full((n, rows), np.nan, np.float32)
        for r0, r1 in ((0, 33), (33, 34), (34, 70)):
            gemm(w, x, part, r0, r1)
        np.testing.assert_array_equal(part, full)


@pytest.mark.parametrize("fmt", INT_FMTS)
def test_close_to_the_exact_f32_kernels(fmt: str) -> None:
    """Only the activations are rounded (to 1/256 of an int8 step of their block): the integer
    product is within 2e-5 of |W_r| |x| of the exact one (one int8 part alone: ~4e-3)."""
    rows, cols = 48, 2048
    rng = np.random.default_rng(11)
    w = random_weights(fmt, rows, cols, rng, extreme=False)
    x = rng.standard_normal(cols).astype(np.float32)
    exact, fast = np.empty(rows, np.float32), np.empty(rows, np.float32)
    KERNELS[fmt][0](w, x, exact, 0, rows)
    intpath.INT_KERNELS[fmt][0](w, x, fast, 0, rows)
    aq, b = _split_ref(w, fmt, rows, cols)
    mag = np.abs(aq - b) @ np.abs(x.astype(np.float64))
    assert np.max(np.abs(fast - exact) / mag) < 2e-5


def test_quantize_ref_keeps_a_fine_part_below_the_int8_step() -> None:
    """Per 32 values: t = x * 127 / max|x|, value = 128 rint(t) + rint(128 (t - rint(t)))."""
    x = np.zeros(64, np.float32)
    x[0], x[1], x[2], x[3] = 127.0, 0.5, -1.5, 0.3  # block 0: t = x
    q, dx = intpath.quantize_ref(x)
    assert dx[0] == 1.0 / 128 and dx[1] == 0.0
    assert q[0, :4].tolist() == [127 * 128, 64, -2 * 128 + 64, 38]
    assert not q[1].any()
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(4096) * rng.choice([1.0, 100.0], 4096, p=[0.97, 0.03])).astype(np.float32)
    q, dx = intpath.quantize_ref(x)
    step = np.abs(x.reshape(-1, 32)).max(axis=1) / 127
    assert np.all(np.abs(q * dx[:, None] - x.reshape(-1, 32)) <= step[:, None] / 256 * 1.01)

"""Fused dequantize-and-dot GEMV/GEMM for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

The kernels read the stored GGUF block bytes directly (no dequantized copy of the
matrix), take float32 activations and accumulate in float32. Each format has two
row-range kernels (the contract other modules code against)::

    gemv_<fmt>(w, x, out, r0, r1)   # out[r] = W[r] . x            for r in [r0, r1)
    gemm_<fmt>(w, X, out, r0, r1)   # out[i, r] = W[r] . X[i]       for r in [r0, r1)

with ``w`` the weight array of ``formats.view_as`` (uint8 (rows, row_bytes) for the
block formats, float32 for F32, uint16 for BF16) except **F16, which is passed as
its uint16 view** (``w.view(np.uint16)``: Numba has no float16 arrays). ``x`` is
float32 (cols,), ``X`` float32 (n, cols) C-contiguous, ``out`` float32 (rows,) /
(n, rows). The GEMM is the small-n kernel: each block decoded once for a pair of rows of X,
every row given exactly the GEMV's operations, so ``out[i]`` of the GEMM has the bits of the
GEMV on ``X[i]`` (both implementations).

Two implementations per format, both tested against ``gguf.quants.dequantize``:
- ``*_simd``: the explicit vector IR of ``simd.py`` (chosen when ``HAVE_SIMD``);
- ``*_plain``: plain Numba loops (fallback, reference): each weight row decoded exactly,
  then dotted with 16 lane accumulators and no fast-math; the GEMV is the GEMM on one row.
``BASIC_KERNELS[fmt] = (gemv, gemm)`` holds the chosen pair; ``PLAIN_KERNELS`` and
``SIMD_KERNELS`` both pairs. ``DEQUANT_KERNELS[fmt](w, out, r0, r1)`` decodes rows
[r0, r1) of ``w`` into ``out`` (rows, cols) float32, bit-identical to gguf's
dequantizer (same row-range convention as gemv_kquant's ``KQUANT_DEQUANT``).
"""

from __future__ import annotations

import numpy as np

from flashlm.kernels.config import jit, jit_exact
from flashlm.kernels import simd
from flashlm.kernels.simd import HAVE_SIMD, bits_to_f32

_TILE = simd.TILE

# ---- scalar helpers ----


@jit_exact
def f16_to_f32(h):
    """IEEE half (given as its 16 bits in an integer) to float32, exactly."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:  # zero or subnormal: m * 2**-24 (exact in float32)
        v = np.float32(m) * np.float32(5.9604644775390625e-08)
        return -v if sign else v
    if e == 31:  # inf / nan
        return bits_to_f32(sign | np.uint32(0x7F800000) | (m << np.uint32(13)))
    return bits_to_f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))


@jit_exact
def _f16_at(w, r, o):  # little-endian f16 at byte o of row r
    return f16_to_f32(np.uint32(w[r, o]) | (np.uint32(w[r, o + 1]) << np.uint32(8)))


# ---- plain block decoders: 32 weights of block b of row r -> dst[doff:doff+32], exact ----


@jit_exact
def _blk_q4_0(w, r, b, dst, doff):  # w (rows, nb*18) uint8
    o = b * 18
    d = _f16_at(w, r, o)
    for j in range(16):
        q = np.int32(w[r, o + 2 + j])
        dst[doff + j] = d * np.float32((q & 15) - 8)
        dst[doff + j + 16] = d * np.float32((q >> 4) - 8)


@jit_exact
def _blk_q4_1(w, r, b, dst, doff):  # w (rows, nb*20) uint8
    o = b * 20
    d = _f16_at(w, r, o)
    m = _f16_at(w, r, o + 2)
    for j in range(16):
        q = np.int32(w[r, o + 4 + j])
        dst[doff + j] = d * np.float32(q & 15) + m
        dst[doff + j + 16] = d * np.float32(q >> 4) + m


@jit_exact
def _qh_at(w, r, o):  # little-endian uint32 at byte o of row r
    return (np.uint32(w[r, o]) | (np.uint32(w[r, o + 1]) << np.uint32(8))
            | (np.uint32(w[r, o + 2]) << np.uint32(16)) | (np.uint32(w[r, o + 3]) << np.uint32(24)))


@jit_exact
def _blk_q5_0(w, r, b, dst, doff):  # w (rows, nb*22) uint8
    o = b * 22
    d = _f16_at(w, r, o)
    qh = _qh_at(w, r, o + 2)
    for j in range(16):
        q = np.int32(w[r, o + 6 + j])
        h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
        h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
        dst[doff + j] = d * np.float32(((q & 15) | h0) - 16)
        dst[doff + j + 16] = d * np.float32(((q >> 4) | h1) - 16)


@jit_exact
def _blk_q5_1(w, r, b, dst, doff):  # w (rows, nb*24) uint8
    o = b * 24
    d = _f16_at(w, r, o)
    m = _f16_at(w, r, o + 2)
    qh = _qh_at(w, r, o + 4)
    for j in range(16):
        q = np.int32(w[r, o + 8 + j])
        h0 = np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4
        h1 = np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
        dst[doff + j] = d * np.float32((q & 15) | h0) + m
        dst[doff + j + 16] = d * np.float32((q >> 4) | h1) + m


@jit_exact
def _blk_q8_0(w, r, b, dst, doff):  # w (rows, nb*34) uint8
    o = b * 34
    d = _f16_at(w, r, o)
    for j in range(32):
        q = np.int32(w[r, o + 2 + j])
        dst[doff + j] = d * np.float32(q - 256 if q > 127 else q)


# ---- plain element converters for the float formats ----


@jit_exact
def _el_f32(w, r, j):  # w (rows, cols) float32
    return w[r, j]


@jit_exact
def _el_f16(w, r, j):  # w (rows, cols) uint16 (f16 bits)
    return f16_to_f32(w[r, j])


@jit_exact
def _el_bf16(w, r, j):  # w (rows, cols) uint16 (upper half of an f32)
    return bits_to_f32(np.uint32(w[r, j]) << np.uint32(16))


# ---- plain drivers (block decoder / converter passed as a first-class function) ----
# Each weight row is decoded once into a float32 row, exactly as gguf dequantizes it, then dotted
# with every activation row by ``_dot_plain``; the GEMV is the same code on one row. All of it is
# compiled without fast-math (``jit_exact``), so a row's result is the same operations in the
# same order whatever the number of rows: every row of a GEMM has the bits of the GEMV.


@jit_exact
def _dot_plain(a, X, i):  # a (cols,) f32, X (n, cols) f32 -> a . X[i]: 16 lane sums, added in order
    acc = np.zeros(16, np.float32)
    cols = a.shape[0]
    n16 = cols // 16 * 16
    for j0 in range(0, n16, 16):
        for k in range(16):
            acc[k] += a[j0 + k] * X[i, j0 + k]
    s = np.float32(0.0)
    for k in range(16):
        s += acc[k]
    for j in range(n16, cols):
        s += a[j] * X[i, j]
    return s


@jit_exact(inline="always")
def _gemm_blocks_plain(blk, w, X, out, r0, r1):
    n, cols = X.shape
    row = np.empty(cols, np.float32)
    for r in range(r0, r1):
        for b in range(cols // 32):
            blk(w, r, b, row, b * 32)
        for i in range(n):
            out[i, r] = _dot_plain(row, X, i)


@jit_exact(inline="always")
def _gemv_blocks_plain(blk, w, x, out, r0, r1):
    _gemm_blocks_plain(blk, w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])), r0, r1)


@jit_exact(inline="always")
def _gemm_float_plain(el, w, X, out, r0, r1):
    n, cols = X.shape
    row = np.empty(cols, np.float32)
    for r in range(r0, r1):
        for j in range(cols):
            row[j] = el(w, r, j)
        for i in range(n):
            out[i, r] = _dot_plain(row, X, i)


@jit_exact(inline="always")
def _gemv_float_plain(el, w, x, out, r0, r1):
    _gemm_float_plain(el, w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])), r0, r1)


@jit_exact(inline="always")
def _dequant_blocks_plain(blk, w, out, r0, r1):  # out (rows, cols) float32
    for r in range(r0, r1):
        for b in range(out.shape[1] // 32):
            blk(w, r, b, out[r], b * 32)


# ---- SIMD row functions (wrap the intrinsics so they can be passed to drivers) ----
# dot(w, row byte offset, x, x offset, x block sums, n_units) -> f32;  dec(w, row byte offset, n_units, dst, dst offset)

@jit
def _dot_q4_0(w, o, x, xo, xs, n):
    return simd.dot_q4_0(w, o, x, xo, xs, n)


@jit
def _dot4_q4_0(w, o, xp, xsl, ng):
    return simd.dot4_q4_0(w, o, xp, xsl, ng)


@jit
def _dot4_q4_1(w, o, xp, xsl, ng):
    return simd.dot4_q4_1(w, o, xp, xsl, ng)


@jit_exact
def _dec_q4_0(w, o, n, dst, do):
    simd.decode_q4_0(w, o, n, dst, do)


@jit
def _dot_q4_1(w, o, x, xo, xs, n):
    return simd.dot_q4_1(w, o, x, xo, xs, n)


@jit_exact
def _dec_q4_1(w, o, n, dst, do):
    simd.decode_q4_1(w, o, n, dst, do)


@jit
def _dot_q5_0(w, o, x, xo, xs, n):
    return simd.dot_q5_0(w, o, x, xo, xs, n)


@jit_exact
def _dec_q5_0(w, o, n, dst, do):
    simd.decode_q5_0(w, o, n, dst, do)


@jit
def _dot_q5_1(w, o, x, xo, xs, n):
    return simd.dot_q5_1(w, o, x, xo, xs, n)


@jit_exact
def _dec_q5_1(w, o, n, dst, do):
    simd.decode_q5_1(w, o, n, dst, do)


@jit
def _dot_q8_0(w, o, x, xo, xs, n):
    return simd.dot_q8_0(w, o, x, xo, xs, n)


@jit_exact
def _dec_q8_0(w, o, n, dst, do):
    simd.decode_q8_0(w, o, n, dst, do)


@jit
def _dot_f32(w, o, x, xo, xs, n):
    return simd.dot_f32(w, o, x, xo, xs, n)


@jit_exact
def _dec_f32(w, o, n, dst, do):
    simd.decode_f32(w, o, n, dst, do)


@jit
def _dot_f16(w, o, x, xo, xs, n):
    return simd.dot_f16(w, o, x, xo, xs, n)


@jit_exact
def _dec_f16(w, o, n, dst, do):
    simd.decode_f16(w, o, n, dst, do)


@jit
def _dot_bf16(w, o, x, xo, xs, n):
    return simd.dot_bf16(w, o, x, xo, xs, n)


@jit_exact
def _dec_bf16(w, o, n, dst, do):
    simd.decode_bf16(w, o, n, dst, do)


# ---- SIMD drivers ----
# The GEMV runs the one-row dot per weight row; the GEMM (small n) runs the four-row dot (the
# quantized formats) on groups of 4 activation rows, the two-row dot on a pair, and the one-row
# dot on a last single row, over simd.TILE weight rows at a time. A multi-row dot decodes each
# block once for its rows and gives every row the one-row dot's operations in the same order:
# out[i] of the GEMM has the bits of the GEMV on X[i]. The drivers are compiled without fast-math (``jit_exact``: their
# few float operations, the float formats' tails, round the same way in both); the vector IR
# carries its own flags.


@jit_exact
def _block_sums(x, b0, b1):  # sums of x over 32-weight blocks b0..b1-1 (min term of Q4_1/Q5_1)
    xs = np.empty(b1 - b0, np.float32)
    t = np.empty(8, np.float32)
    for b in range(b0, b1):
        o = 32 * b
        for k in range(8):  # a fixed tree: vectorizes without reassociation
            t[k] = ((x[o + k] + x[o + 8 + k]) + x[o + 16 + k]) + x[o + 24 + k]
        xs[b - b0] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
    return xs


@jit_exact
def _block_sums_rows(X, b0, b1):  # (n, b1 - b0): _block_sums of each row of X (n, cols)
    XS = np.empty((X.shape[0], b1 - b0), np.float32)
    for i in range(X.shape[0]):
        XS[i] = _block_sums(X[i], b0, b1)
    return XS


@jit_exact
def _group4_prep(x, ng):
    """x permuted per 128 weights by simd.GROUP4_PERM, and its per-lane sums (Q4_1's min term)."""
    xp = np.empty(ng * 128, np.float32)
    xsl = np.zeros(ng * 16, np.float32)
    for g in range(ng):
        for i in range(128):
            v = x[128 * g + simd.GROUP4_PERM[i]]
            xp[128 * g + i] = v
            xsl[16 * g + i % 16] += v
    return xp, xsl


@jit_exact
def _group4_prep_rows(X, ng):
    XP = np.empty((X.shape[0], ng * 128), np.float32)
    XSL = np.empty((X.shape[0], ng * 16), np.float32)
    for i in range(X.shape[0]):
        XP[i], XSL[i] = _group4_prep(X[i], ng)
    return XP, XSL


def _block_kernels(dot, rows, rows4=None, compile=jit_exact) -> tuple:
    """(gemv, gemm) of a 32-weight block format from its one-row dot, its two-row dot and, if
    given, its four-row dot (intrinsics, called inline: a call per row through a jitted wrapper
    costs 5-10 %). ``compile`` the decorator (the tests pass an uncached one for code paths built
    with other simd flags)."""
    quads = rows4 is not None
    rows4 = rows if rows4 is None else rows4

    @compile
    def gemv(w, x, out, r0, r1):
        nb = x.shape[0] // 32
        rb = w.strides[0]
        xs = _block_sums(x, 0, nb)
        for r in range(r0, r1):
            out[r] = dot(w, r * rb, x, 0, xs, nb)

    @compile
    def gemm(w, X, out, r0, r1):
        n, cols = X.shape
        nb = cols // 32
        rb = w.strides[0]
        XS = _block_sums_rows(X, 0, nb)
        for ra in range(r0, r1, _TILE):
            rz = min(r1, ra + _TILE)
            i = 0
            if quads:
                while i + 4 <= n:
                    for r in range(ra, rz):
                        rows4(w, r * rb, X, 0, XS, i, nb, out, r)
                    i += 4
            while i + 2 <= n:
                for r in range(ra, rz):
                    rows(w, r * rb, X, 0, XS, i, nb, out, r)
                i += 2
            if i < n:
                for r in range(ra, rz):
                    out[n - 1, r] = dot(w, r * rb, X[n - 1], 0, XS[n - 1], nb)

    return gemv, gemm


def _group4_kernels(dot4, rows, dot, compile=jit_exact) -> tuple:
    """Q4_0/Q4_1 (AVX-512): groups of 4 blocks by ``dot4`` on x permuted per simd.GROUP4_PERM (and
    its two-row version), the last nb % 4 blocks of each row by the one-block ``dot``."""

    @compile
    def gemv(w, x, out, r0, r1):
        nb = x.shape[0] // 32
        ng = nb // 4
        rb = w.strides[0]
        ub = w.shape[1] // nb if nb else 0
        xs_tail = _block_sums(x, 4 * ng, nb)
        xp, xsl = _group4_prep(x, ng)
        for r in range(r0, r1):
            s = dot4(w, r * rb, xp, xsl, ng)
            if 4 * ng < nb:
                s += dot(w, r * rb + 4 * ng * ub, x, 128 * ng, xs_tail, nb - 4 * ng)
            out[r] = s

    @compile
    def gemm(w, X, out, r0, r1):
        n, cols = X.shape
        nb = cols // 32
        ng = nb // 4
        rb = w.strides[0]
        ub = w.shape[1] // nb if nb else 0
        XS = _block_sums_rows(X, 4 * ng, nb)
        XP, XSL = _group4_prep_rows(X, ng)
        for ra in range(r0, r1, _TILE):
            rz = min(r1, ra + _TILE)
            for i in range(0, n - 1, 2):
                for r in range(ra, rz):
                    rows(w, r * rb, XP, XSL, i, ng, out, r)
            if n % 2:
                for r in range(ra, rz):
                    out[n - 1, r] = dot4(w, r * rb, XP[n - 1], XSL[n - 1], ng)
            if 4 * ng < nb:
                for r in range(ra, rz):
                    for k in range(n):
                        out[k, r] = out[k, r] + dot(w, r * rb + 4 * ng * ub, X[k], 128 * ng, XS[k], nb - 4 * ng)

    return gemv, gemm


def _float_kernels(dot, rows, el, compile=jit_exact) -> tuple:
    """(gemv, gemm) of F32/F16/BF16: 16-weight units by the dots, a row's last cols % 16 weights
    by ``el`` (a jitted element converter) in this order, the same in both."""

    @compile
    def gemv(w, x, out, r0, r1):
        cols = x.shape[0]
        n16 = cols // 16
        rb = w.strides[0]
        for r in range(r0, r1):
            s = dot(w, r * rb, x, 0, x, n16)
            for j in range(n16 * 16, cols):
                s += el(w, r, j) * x[j]
            out[r] = s

    @compile
    def gemm(w, X, out, r0, r1):
        n, cols = X.shape
        n16 = cols // 16
        rb = w.strides[0]
        for ra in range(r0, r1, _TILE):
            rz = min(r1, ra + _TILE)
            for i in range(0, n - 1, 2):
                for r in range(ra, rz):
                    rows(w, r * rb, X, 0, X, i, n16, out, r)
            if n % 2:
                for r in range(ra, rz):
                    out[n - 1, r] = dot(w, r * rb, X[n - 1], 0, X[n - 1], n16)
            if n16 * 16 < cols:
                for r in range(ra, rz):
                    for k in range(n):
                        s = out[k, r]
                        for j in range(n16 * 16, cols):
                            s += el(w, r, j) * X[k, j]
                        out[k, r] = s

    return gemv, gemm


@jit_exact(inline="always")
def _dequant_blocks_simd(dec, w, out, r0, r1):  # out (rows, cols) float32 C-contiguous
    cols = out.shape[1]
    rb = w.strides[0]
    for r in range(r0, r1):
        dec(w, r * rb, cols // 32, out, r * cols)


# ---- public row-range kernels ----
# gemv_*(w, x, out, r0, r1): w per module docstring; x (cols,) f32; out (rows,) f32
# gemm_*(w, X, out, r0, r1): X (n, cols) f32 C-contiguous; out (n, rows) f32

gemv_q4_0_simd, gemm_q4_0_simd = _block_kernels(simd.DOT["Q4_0"], simd.DOT_ROWS["Q4_0"], simd.DOT_ROWS4["Q4_0"])


# AVX-512: 4 blocks at a time (simd.GROUP4)
gemv_q4_0_simd4, gemm_q4_0_simd4 = _group4_kernels(simd.DOT4["Q4_0"], simd.DOT4_ROWS["Q4_0"], simd.DOT["Q4_0"])


@jit_exact
def gemv_q4_0_plain(w, x, out, r0, r1):
    _gemv_blocks_plain(_blk_q4_0, w, x, out, r0, r1)


@jit_exact
def gemm_q4_0_plain(w, X, out, r0, r1):
    _gemm_blocks_plain(_blk_q4_0, w, X, out, r0, r1)


@jit_exact
def dequant_q4_0_simd(w, out, r0, r1):
    _dequant_blocks_simd(_dec_q4_0, w, out, r0, r1)


@jit_exact
def dequant_q4_0_plain(w, out, r0, r1):
    _dequant_blocks_plain(_blk_q4_0, w, out, r0, r1)


gemv_q4_1_simd, gemm_q4_1_simd = _block_kernels(simd.DOT["Q4_1"], simd.DOT_ROWS["Q4_1"], simd.DOT_ROWS4["Q4_1"])


# AVX-512: 4 blocks at a time (simd.GROUP4)
gemv_q4_1_simd4, gemm_q4_1_simd4 = _group4_kernels(simd.DOT4["Q4_1"], simd.DOT4_ROWS["Q4_1"], simd.DOT["Q4_1"])


@jit_exact
def gemv_q4_1_plain(w, x, out, r0, r1):
    _gemv_blocks_plain(_blk_q4_1, w, x, out, r0, r1)


@jit_exact
def gemm_q4_1_plain(w, X, out, r0, r1):
    _gemm_blocks_plain(_blk_q4_1, w, X, out, r0, r1)


@jit_exact
def dequant_q4_1_simd(w, out, r0, r1):
    _dequant_blocks_simd(_dec_q4_1, w, out, r0, r1)


@jit_exact
def dequant_q4_1_plain(w, out, r0, r1):
    _dequant_blocks_plain(_blk_q4_1, w, out, r0, r1)


gemv_q5_0_simd, gemm_q5_0_simd = _block_kernels(simd.DOT["Q5_0"], simd.DOT_ROWS["Q5_0"], simd.DOT_ROWS4["Q5_0"])


@jit_exact
def gemv_q5_0_plain(w, x, out, r0, r1):
    _gemv_blocks_plain(_blk_q5_0, w, x, out, r0, r1)


@jit_exact
def gemm_q5_0_plain(w, X, out, r0, r1):
    _gemm_blocks_plain(_blk_q5_0, w, X, out, r0, r1)


@jit_exact
def dequant_q5_0_simd(w, out, r0, r1):
    _dequant_blocks_simd(_dec_q5_0, w, out, r0, r1)


@jit_exact
def dequant_q5_0_plain(w, out, r0, r1):
    _dequant_blocks_plain(_blk_q5_0, w, out, r0, r1)


gemv_q5_1_simd, gemm_q5_1_simd = _block_kernels(simd.DOT["Q5_1"], simd.DOT_ROWS["Q5_1"], simd.DOT_ROWS4["Q5_1"])


@jit_exact
def gemv_q5_1_plain(w, x, out, r0, r1):
    _gemv_blocks_plain(_blk_q5_1, w, x, out, r0, r1)


@jit_exact
def gemm_q5_1_plain(w, X, out, r0, r1):
    _gemm_blocks_plain(_blk_q5_1, w, X, out, r0, r1)


@jit_exact
def dequant_q5_1_simd(w, out, r0, r1):
    _dequant_blocks_simd(_dec_q5_1, w, out, r0, r1)


@jit_exact
def dequant_q5_1_plain(w, out, r0, r1):
    _dequant_blocks_plain(_blk_q5_1, w, out, r0, r1)


gemv_q8_0_simd, gemm_q8_0_simd = _block_kernels(simd.DOT["Q8_0"], simd.DOT_ROWS["Q8_0"], simd.DOT_ROWS4["Q8_0"])


@jit_exact
def gemv_q8_0_plain(w, x, out, r0, r1):
    _gemv_blocks_plain(_blk_q8_0, w, x, out, r0, r1)


@jit_exact
def gemm_q8_0_plain(w, X, out, r0, r1):
    _gemm_blocks_plain(_blk_q8_0, w, X, out, r0, r1)


@jit_exact
def dequant_q8_0_simd(w, out, r0, r1):
    _dequant_blocks_simd(_dec_q8_0, w, out, r0, r1)


@jit_exact
def dequant_q8_0_plain(w, out, r0, r1):
    _dequant_blocks_plain(_blk_q8_0, w, out, r0, r1)


gemv_f32_simd, gemm_f32_simd = _float_kernels(simd.DOT["F32"], simd.DOT_ROWS["F32"], _el_f32)


@jit_exact
def gemv_f32_plain(w, x, out, r0, r1):
    _gemv_float_plain(_el_f32, w, x, out, r0, r1)


@jit_exact
def gemm_f32_plain(w, X, out, r0, r1):
    _gemm_float_plain(_el_f32, w, X, out, r0, r1)


gemv_f16_simd, gemm_f16_simd = _float_kernels(simd.DOT["F16"], simd.DOT_ROWS["F16"], _el_f16)


@jit_exact
def gemv_f16_plain(w, x, out, r0, r1):
    _gemv_float_plain(_el_f16, w, x, out, r0, r1)


@jit_exact
def gemm_f16_plain(w, X, out, r0, r1):
    _gemm_float_plain(_el_f16, w, X, out, r0, r1)


gemv_bf16_simd, gemm_bf16_simd = _float_kernels(simd.DOT["BF16"], simd.DOT_ROWS["BF16"], _el_bf16)


@jit_exact
def gemv_bf16_plain(w, x, out, r0, r1):
    _gemv_float_plain(_el_bf16, w, x, out, r0, r1)


@jit_exact
def gemm_bf16_plain(w, X, out, r0, r1):
    _gemm_float_plain(_el_bf16, w, X, out, r0, r1)


# ---- tables ----

_FMTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
SIMD_KERNELS = {f: (globals()[f"gemv_{f.lower()}_simd"], globals()[f"gemm_{f.lower()}_simd"]) for f in _FMTS}
if simd.GROUP4:
    SIMD_KERNELS["Q4_0"] = (gemv_q4_0_simd4, gemm_q4_0_simd4)
    SIMD_KERNELS["Q4_1"] = (gemv_q4_1_simd4, gemm_q4_1_simd4)
PLAIN_KERNELS = {f: (globals()[f"gemv_{f.lower()}_plain"], globals()[f"gemm_{f.lower()}_plain"]) for f in _FMTS}
BASIC_KERNELS = SIMD_KERNELS if HAVE_SIMD else PLAIN_KERNELS

gemv_f32, gemm_f32 = BASIC_KERNELS["F32"]
gemv_f16, gemm_f16 = BASIC_KERNELS["F16"]
gemv_bf16, gemm_bf16 = BASIC_KERNELS["BF16"]
gemv_q8_0, gemm_q8_0 = BASIC_KERNELS["Q8_0"]
gemv_q4_0, gemm_q4_0 = BASIC_KERNELS["Q4_0"]
gemv_q4_1, gemm_q4_1 = BASIC_KERNELS["Q4_1"]
gemv_q5_0, gemm_q5_0 = BASIC_KERNELS["Q5_0"]
gemv_q5_1, gemm_q5_1 = BASIC_KERNELS["Q5_1"]

_QFMTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
DEQUANT_SIMD = {f: globals()[f"dequant_{f.lower()}_simd"] for f in _QFMTS}
DEQUANT_PLAIN = {f: globals()[f"dequant_{f.lower()}_plain"] for f in _QFMTS}
DEQUANT_KERNELS = DEQUANT_SIMD if HAVE_SIMD else DEQUANT_PLAIN

"""The integer path: activations as integers, dot products by ``vpmaddubsw``.

On two AVX2 cores the 4-bit GEMVs and the small-n products are compute-bound with float32
activations: a weight costs a mask, a convert and an FMA (8 weights per instruction), and
every activation row of a small-n product pays the convert and FMA again. Here each
activation row is quantized once per call, and a super-block's quants meet it as bytes:
``vpmaddubsw`` multiplies 32 unsigned 4-bit quants with 32 signed int8 activations and adds
pairs (16 x int16), ``vpmaddwd`` sums those to int32 per lane; then one convert and one FMA
per 16 weights.

Activations (``_quantize_block``): per 32-value block, t = x * 127 / max|x|, a coarse int8
part rint(t) and a fine one rint(128 (t - rint(t))) (|.| <= 64), so x = dx (128 q + q') to
1/256 of an int8 step, dx = max|x| / 127 / 128. A single int8 part per block (llama.cpp's
Q8_K / Q8_0) was measured first: on qwen2.5-coder-1.5b the products moved by up to 7.5 %
(per 256 values) or 3.2 % (per 32) of their norm, the activations' max being 30-150x their
median, and perplexity rose 4.1 % over transformers'; with the fine part the products are
within 0.03 % of the exact ones. Each part costs one ``vpmaddubsw`` per 32 weights and row;
the int16 partial sums cannot saturate (four pairs: 4 * 2 * 15 * 127 = 15240 < 32767) and
``vpmaddwd`` with 128 / 1 weighs the two parts.

Q4_KR (see ``repacked``): dword m (m = 0, 1) of lane j holds quants 8m..8m+7 of half
sub-block j (weight 16j + 8m + i at bits 4i). Read as bytes, byte 4j + t of dword vector m
holds quant 8m + 2t (low nibble) and 8m + 2t + 1 (high nibble), so ``bytes & 15`` and
``(bytes >> 4) & 15`` are 64 quants each, and the activations are laid out to match
(``_prep_q4kr``: per part 4 x 64 bytes, chunk (m, h) byte 4j + t = value 16j + 8m + 2t + h).
A super-block's sum for lane j is then ``d sc[j // 2] dx_j S_j - dmin m[j // 2] X_j`` with
S_j the exact integer dot and X_j the float32 sum of x over the half sub-block (so the min
term keeps the float path's precision).

Per prepared super-block (``XQ_BYTES`` = 640): the coarse part (256 bytes), the fine part
(256), 16 float32 ``-X_j``, 16 float32 dx per lane (lane j: block j // 2).

``matmul.set_exact(True)`` (``--exact``) selects the exact float32 kernels; the model-level
fidelity (perplexity, greedy) is tested in tests/models/test_intpath_fidelity.py.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from flashlm.kernels import simd
from flashlm.kernels.config import intrinsic, jit_exact
from flashlm.kernels.repacked import _BB4, _QKK, _q4_block, _slabbed
from flashlm.kernels.repacked import dequant_q4_kr_simd
from flashlm.kernels.simd import (_F32, _FLAGS, _I32, _V16F, _V16I32, _data_ptr, _hsum, _load, _prefetch,
                                  _splat)

XQ_BYTES = 640  # prepared activation bytes per 256-weight super-block
_XSUM, _DX = 512, 576  # byte offsets of the -X_j floats and of the per-lane dx in a prepared super-block
_QB = 32  # activations per int8 scale
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V8I32 = ir.VectorType(_I32, 8)


# ---- activations: int8 per super-block, in the weights' byte order ----

@jit_exact
def _quantize_block(x, o, q, dx):
    """Activations x[o:o + 256] as two int8 parts per value: with t = x * 127 / max|x| over its
    32-value block, q[i] = rint(t) and q[256 + i] = rint((t - rint(t)) * 128) (|.| <= 64), so
    x = dx[i // 32] * (128 q[i] + q[256 + i]) to 1/256 of a step; dx = max|x| / 127 / 128
    (float32; 0 for a zero block)."""
    for b in range(_QKK // _QB):
        amax = np.float32(0.0)
        for i in range(_QB * b, _QB * b + _QB):
            amax = max(amax, abs(x[o + i]))
        if amax == 0:
            for i in range(_QB * b, _QB * b + _QB):
                q[i] = 0
                q[_QKK + i] = 0
            dx[b] = np.float32(0.0)
            continue
        inv = np.float32(127.0) / amax
        for i in range(_QB * b, _QB * b + _QB):
            t = x[o + i] * inv
            r = np.rint(t)
            q[i] = np.int64(r)
            q[_QKK + i] = np.int64(np.rint((t - r) * np.float32(128.0)))
        dx[b] = amax / np.float32(127.0) / np.float32(128.0)


@jit_exact
def _prep_q4kr(x, xq, nb):
    """x (nb * 256,) float32 -> xq (nb * XQ_BYTES,) uint8 as the module docstring lays out."""
    xf = xq.view(np.float32)
    q = np.empty(2 * _QKK, np.int64)
    dx = np.empty(_QKK // _QB, np.float32)
    for g in range(nb):
        o = g * _QKK
        base = g * XQ_BYTES
        _quantize_block(x, o, q, dx)
        for j in range(16):
            s = np.float32(0.0)
            for k in range(16):
                s += x[o + 16 * j + k]
            xf[(base + _XSUM) // 4 + j] = -s
            xf[(base + _DX) // 4 + j] = dx[j // 2]  # lane j: weights 16j..16j+15, block j // 2
            for m in range(2):
                for t in range(4):
                    for h in range(2):
                        i = 16 * j + 8 * m + 2 * t + h
                        at = base + 128 * m + 64 * h + 4 * j + t
                        xq[at] = np.uint8(q[i] & 255)
                        xq[at + _QKK] = np.uint8(q[_QKK + i] & 255)


# ---- the dot: vpmaddubsw / vpmaddwd (AVX2) ----

def _x86(b: ir.IRBuilder, name: str, ret: ir.Type, *args: ir.Value) -> ir.Value:
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return b.call(cgutils.get_or_insert_function(b.module, fnty, name), list(args))


def _maddubs(b, u8, s8):  # 32 unsigned x signed bytes -> 16 int16 sums of adjacent products
    return _x86(b, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, u8, s8)


def _madd(b, v16, k):  # 16 int16 -> 8 int32: k times the sums of adjacent pairs
    return _x86(b, "llvm.x86.avx2.pmadd.wd", _V8I32, v16, ir.Constant(_V16I16, [k] * 16))


def _nibble_bytes(b, p, off):
    """(low, high) nibbles of the 32 bytes at ``p + off``, as <32 x i8>."""
    raw = _load(b, p, off, _V32I8)
    m15 = ir.Constant(_V32I8, [15] * 32)
    hi = b.bitcast(b.lshr(b.bitcast(raw, _V16I16), ir.Constant(_V16I16, [4] * 16)), _V32I8)  # no byte shift in AVX2
    return b.and_(raw, m15), b.and_(hi, m15)


def _q4kr_int_body(b, wp, xps, n):
    """[float32 per row]: the first n super-blocks of the Q4_KR row at i8* ``wp`` dotted with each
    row's prepared activations (i8* ``xps[t]``). Each super-block's quants are split into bytes
    once; every row then gets the same operations in the same order (a row's result has the bits
    of the one-row dot)."""
    nr = len(xps)
    acc = [cgutils.alloca_once_value(b, ir.Constant(_V16F, [0.0] * 16)) for _ in range(nr)]
    with cgutils.for_range(b, n) as loop:
        g = loop.index
        p = b.gep(wp, [b.mul(g, g.type(_BB4))])
        _prefetch(b, p, simd.PREFETCH, _BB4)
        dw, sv, mv = _q4_block(b, p)  # sv = d sc, mv = dmin m, per lane
        del dw
        q = {}  # (m, h, half) -> <32 x i8>: lanes 8 half .. 8 half + 7 of chunk (m, h)
        for m in range(2):
            for half in range(2):
                lo, hi = _nibble_bytes(b, p, 16 + 64 * m + 32 * half)
                q[m, 0, half], q[m, 1, half] = lo, hi
        for r, xp in enumerate(xps):
            xb = b.gep(xp, [b.mul(g, g.type(XQ_BYTES))])
            s32 = []
            for half in range(2):
                part = []
                for lo in (0, _QKK):  # the coarse part, then the fine part of the activations
                    s16 = None
                    for m in range(2):
                        for h in range(2):
                            xv = _load(b, xb, lo + 128 * m + 64 * h + 32 * half, _V32I8)
                            t = _maddubs(b, q[m, h, half], xv)
                            s16 = t if s16 is None else b.add(s16, t)
                    part.append(_madd(b, s16, 128 if lo == 0 else 1))
                s32.append(b.add(part[0], part[1]))
            s = b.sitofp(b.shuffle_vector(s32[0], s32[1], ir.Constant(_V16I32, list(range(16)))), _V16F)
            dx = _load(b, xb, _DX, _V16F)
            a = b.fadd(b.load(acc[r]), b.fmul(s, b.fmul(sv, dx), flags=_FLAGS), flags=_FLAGS)
            a = b.fadd(a, b.fmul(mv, _load(b, xb, _XSUM, _V16F), flags=_FLAGS), flags=_FLAGS)
            b.store(a, acc[r])
    return [_hsum(b, b.load(c)) for c in acc]


def _make_dot(body):
    @intrinsic
    def dot(typingctx, w, woff, xq, n):
        def gen(context, b, sig, args):
            w, woff, xq, n = args
            wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
            return body(b, wp, [_data_ptr(context, b, sig.args[2], xq)], n)[0]

        return types.float32(w, types.intp, xq, types.intp), gen

    return dot


def _make_rows(body, nr: int):
    @intrinsic
    def dot_rows(typingctx, w, woff, XQ, i0, n, out, col):
        def gen(context, b, sig, args):
            w, woff, XQ, i0, n, out, col = args
            wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
            res = body(b, wp, simd._row_ptrs(context, b, sig.args[2], XQ, i0, nr), n)
            simd._store_rows(context, b, sig.args[5], out, i0, col, res)
            return context.get_dummy_value()

        return types.void(w, types.intp, XQ, types.intp, types.intp, out, types.intp), gen

    return dot_rows


ROWS = 4  # activation rows per decoded super-block in the small-n product
_dot_q4kr = _make_dot(_q4kr_int_body)
_rows_q4kr = _make_rows(_q4kr_int_body, ROWS)
_TILE = simd.TILE


def _int_kernels(prep, d1, dn):
    """(gemv, gemm) on row-major rows of a 256-weight super-block layout: the activations are
    prepared once per call (``prep``), then one dot per weight row; the GEMM runs ``dn`` on
    ROWS activation rows at a time (the last rows one by one with ``d1``) over simd.TILE weight
    rows, each super-block decoded once for the ROWS rows."""

    @jit_exact
    def gemv(w, x, out, r0, r1):
        nb = x.shape[0] // _QKK
        xq = np.empty(nb * XQ_BYTES, np.uint8)
        prep(x, xq, nb)
        rb = w.strides[0]
        for r in range(r0, r1):
            out[r] = d1(w, r * rb, xq, nb)

    @jit_exact
    def gemm(w, X, out, r0, r1):
        n, cols = X.shape
        nb = cols // _QKK
        XQ = np.empty((n, nb * XQ_BYTES), np.uint8)
        for i in range(n):
            prep(X[i], XQ[i], nb)
        rb = w.strides[0]
        full = n - n % ROWS
        for ra in range(r0, r1, _TILE):
            rz = min(r1, ra + _TILE)
            for i in range(0, full, ROWS):
                for r in range(ra, rz):
                    dn(w, r * rb, XQ, i, nb, out, r)
            for i in range(full, n):
                for r in range(ra, rz):
                    out[i, r] = d1(w, r * rb, XQ[i], nb)

    return gemv, gemm


_gemv_q4kr, _gemm_q4kr = _int_kernels(_prep_q4kr, _dot_q4kr, _rows_q4kr)

# the public kernels, in column slabs like the exact ones: (gemv, gemm) per store format
INT_KERNELS: dict[str, tuple] = {
    "Q4_KR": _slabbed("Q4_KR", (_gemv_q4kr, _gemm_q4kr, dequant_q4_kr_simd))[:2],
}


# ---- references (tests) ----

def quantize_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values 128 q + q' (nb, 32) int64, float32 dx (nb,)) of x as the kernels quantize it, per
    32 values (``_quantize_block``): x ~ dx * values."""
    xb = np.asarray(x, np.float32).reshape(-1, _QB)
    amax = np.abs(xb).max(axis=1)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    t = (xb * inv[:, None]).astype(np.float32)
    r = np.rint(t)
    q = r.astype(np.int64) * 128 + np.rint((t - r) * np.float32(128.0)).astype(np.int64)
    return q, (amax / np.float32(127.0) / np.float32(128.0)).astype(np.float32)

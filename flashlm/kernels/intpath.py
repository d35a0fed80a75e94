"""The integer path: activations as integers, dot products by ``vpmaddubsw``.

On two AVX2 cores the 4-bit GEMVs and the small-n products are compute-bound with float32
activations: a weight costs a mask, a convert and an FMA (8 weights per instruction), and
every activation row of a small-n product pays the convert and FMA again. Here each
activation row is quantized once per call, and a super-block's quants meet it as bytes:
``vpmaddubsw`` multiplies 32 unsigned 4-bit quants with 32 signed int8 activations and adds
pairs (16 x int16), ``vpmaddwd`` sums those to int32 per lane; then one convert and one FMA
per 16 weights.

Activations (``_quant32``): per 32-value block, t = x * 127 / max|x|, a coarse int8
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

The 32-weight block formats (Q4_1R, Q8_0S, Q5_0R: sections below) take the same activations
per block: a block's sum is ``d dx S + B X`` with S exact and X the float32 block sum of x
where the format has an offset term (Q4_1 ``+ m``, Q5_0 ``- 16 d``). Every small-n product
runs 4 activation rows per dot, then a pair, then one row; every row gets the GEMV's operations
in its order (its bits, as for the exact kernels). Each format has its measured figures in its
section.

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
from flashlm.kernels.repacked import (_ROW_MAJOR, _scales, dequant_q4_1r_simd, dequant_q4_kr_simd, dequant_q5_0r_simd,
                                      dequant_q6_kr_simd)
from flashlm.kernels.formats import GROUPED
from flashlm.kernels.simd import (_F32, _FLAGS, _I32, _V16F, _V16I32, _const_vec, _data_ptr, _hsum, _load, _prefetch,
                                  _ptr_at, _splat)

XQ_BYTES = 640  # prepared activation bytes per 256-weight super-block
_XSUM, _DX = 512, 576  # byte offsets of the -X_j floats and of the per-lane dx in a prepared super-block
_QB = 32  # activations per scale
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V32I32 = ir.VectorType(_I32, 32)


# ---- activations: two int8 parts per 32-value block, in the weights' byte order ----

_V8F32 = ir.VectorType(_F32, 8)


def _vcall(b, name, v):
    return b.call(cgutils.get_or_insert_function(b.module, ir.FunctionType(v.type, [v.type]), name), [v])


@intrinsic
def _quant32(typingctx, x, o, q, c, f):
    """The 32 float32 activations x[o:o + 32] as two int8 parts (module docstring): the coarse
    ones to q[c:c + 32], the fine ones to q[f:f + 32] (q an int8 array); returns dx = max|x| /
    127 / 128 (float32, 0 for a zero block). Each value is t = x 127 / max|x|, coarse rint(t),
    fine rint(128 (t - rint(t))): the scalar float32 operations, eight values per instruction
    (roundps rounds to nearest even, as np.rint)."""

    def gen(context, b, sig, args):
        x, o, q, c, f = args
        xp = b.gep(_data_ptr(context, b, sig.args[0], x), [b.mul(o, o.type(4))])
        qp = _data_ptr(context, b, sig.args[2], q)
        xs = [_load(b, xp, 32 * k, _V8F32) for k in range(4)]
        m = None
        for v in xs:
            a = _vcall(b, "llvm.fabs.v8f32", v)
            m = a if m is None else b.select(b.fcmp_ordered(">", a, m), a, m)
        n = 8
        while n > 1:  # the max of the 8 lanes
            n //= 2
            hi = b.shuffle_vector(m, m, ir.Constant(ir.VectorType(_I32, 8), list(range(n, 2 * n)) + [0] * (8 - n)))
            m = b.select(b.fcmp_ordered(">", hi, m), hi, m)
        amax = b.extract_element(m, ir.Constant(_I32, 0))
        zero = ir.Constant(_F32, 0.0)
        inv = b.select(b.fcmp_ordered("==", amax, zero), zero, b.fdiv(ir.Constant(_F32, 127.0), amax))
        invv = simd._splat(b, inv, _V8F32)
        k128 = ir.Constant(_V8F32, [128.0] * 8)
        v8i8 = ir.VectorType(_I8, 8)
        for k, v in enumerate(xs):
            t = b.fmul(v, invv)
            r = _vcall(b, "llvm.rint.v8f32", t)
            fine = _vcall(b, "llvm.rint.v8f32", b.fmul(b.fsub(t, r), k128))
            for vec, at in ((r, c), (fine, f)):
                i8 = b.trunc(b.fptosi(vec, _V8I32), v8i8)
                b.store(i8, simd._ptr_at(b, qp, b.add(at, at.type(8 * k)), v8i8), align=1)
        return b.fdiv(b.fdiv(amax, ir.Constant(_F32, 127.0)), ir.Constant(_F32, 128.0))

    return types.float32(x, types.intp, q, types.intp, types.intp), gen


@jit_exact
def _superblock_head(x, o, q, xf, base, xsum_at, dx_at, sum_factor):
    """Quantize the 256 activations x[o:o + 256] (coarse parts to q[0:256], fine to q[256:512])
    and write per lane j (weights 16j..16j + 15) ``sum_factor`` times their float32 sum at float
    (base + xsum_at) / 4 + j and the dx of their 32-value block at (base + dx_at) / 4 + j."""
    for k in range(_QKK // _QB):
        dx = _quant32(x, o + _QB * k, q, _QB * k, _QKK + _QB * k)
        xf[(base + dx_at) // 4 + 2 * k] = dx
        xf[(base + dx_at) // 4 + 2 * k + 1] = dx
    for j in range(16):
        s = np.float32(0.0)
        for k in range(16):
            s += x[o + 16 * j + k]
        xf[(base + xsum_at) // 4 + j] = sum_factor * s


@jit_exact
def _prep_q4kr(x, xq, nb):
    """x (nb * 256,) float32 -> xq (nb * XQ_BYTES,) uint8 as the module docstring lays out."""
    xf = xq.view(np.float32)
    q = np.empty(2 * _QKK, np.int8)
    for g in range(nb):
        base = g * XQ_BYTES
        _superblock_head(x, g * _QKK, q, xf, base, _XSUM, _DX, np.float32(-1.0))
        for j in range(16):
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


def _madd2(b, coarse, fine):
    """<8 x i32> 128 * (pair sums of ``coarse``) + (pair sums of ``fine``): the int16 partial
    sums of the two activation parts made one integer dot."""
    return b.add(_madd(b, coarse, 128), _madd(b, fine, 1))


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


_TILE = simd.TILE


def _int_kernels(prep, body, unit: int, xbytes: int, nr: int):
    """(gemv, gemm) on row-major weight rows from the dot ``body``: the activations are
    prepared once per call (``prep``: ``xbytes`` bytes per ``unit`` weights), then one dot per
    weight row; the GEMM runs the ``nr``-row dot on ``nr`` activation rows at a time, then the
    two-row dot on a remaining pair and the one-row dot on a last row, over simd.TILE weight
    rows, each unit of weights decoded once for the rows of a dot."""
    d1, d2, dn = _make_dot(body), _make_rows(body, 2), _make_rows(body, nr)

    @jit_exact
    def gemv(w, x, out, r0, r1):
        nb = x.shape[0] // unit
        xq = np.empty(nb * xbytes, np.uint8)
        prep(x, xq, nb)
        rb = w.strides[0]
        for r in range(r0, r1):
            out[r] = d1(w, r * rb, xq, nb)

    @jit_exact
    def gemm(w, X, out, r0, r1):
        n, cols = X.shape
        nb = cols // unit
        XQ = np.empty((n, nb * xbytes), np.uint8)
        for i in range(n):
            prep(X[i], XQ[i], nb)
        rb = w.strides[0]
        full = n - n % nr
        pair = full + (n - full) // 2 * 2
        for ra in range(r0, r1, _TILE):
            rz = min(r1, ra + _TILE)
            for i in range(0, full, nr):
                for r in range(ra, rz):
                    dn(w, r * rb, XQ, i, nb, out, r)
            for i in range(full, pair, 2):
                for r in range(ra, rz):
                    d2(w, r * rb, XQ, i, nb, out, r)
            if pair < n:
                for r in range(ra, rz):
                    out[n - 1, r] = d1(w, r * rb, XQ[n - 1], nb)

    return gemv, gemm


ROWS = 4  # activation rows per decoded super-block in the Q4_KR small-n product
_gemv_q4kr, _gemm_q4kr = _int_kernels(_prep_q4kr, _q4kr_int_body, _QKK, XQ_BYTES, ROWS)

# ---- Q4_1R: groups of 4 Q4_1 blocks (128 weights), activations int8 per 32-weight block ----
#
# Q4_1R (see ``repacked``): lane j of a group's 16 dwords holds the quants of weights
# 8j..8j + 7 at bits 4i; read as bytes, byte 4j + t holds weights 8j + 2t (low nibble) and
# 8j + 2t + 1 (high nibble). The two 32-byte halves v = 0, 1 of the 64 quant bytes split
# into low and high nibbles are 4 x 32 quants, and the activations are laid out to match
# (``_prep_q4_1r``: chunk (v, h) byte 4j' + t = xq[64v + 8j' + 2t + h]); the int32 lane j'
# of ``vpmaddwd(vpmaddubsw(lo_v, x_v0) + vpmaddubsw(hi_v, x_v1), 1)`` is then the exact
# integer dot of lane 8v + j', 8 weights of block 2v + j' // 4. A block's sum is
# ``d dx S + m X`` with X the float32 sum of x over the block (the min term keeps the float
# path's precision): per group and row 4 vpmaddubsw, 2 vpaddw, 2 vpmaddwd, 2 converts, 2
# multiplies (d dx per lane) and 3 FMA, the quant split shared by the rows.
# Per prepared group (``_XG1`` = 352 bytes): 128 coarse and 128 fine int8 activations, 16
# float32 dx (lane j: block j // 4), 4 float32 X and 4 zeros; per tail block (a GGUF Q4_1
# block, ``_XT1`` = 88 bytes, 72 used): 32 coarse and 32 fine int8 in weight order, dx, X. A tail block's quants are its 16 bytes'
# low nibbles then high nibbles (weights 0..15, 16..31), the GGUF order.
# Measured on the 2-core AVX2 EPYC (Zen 3), shared with other jobs, one thread, int / exact
# (repacked's Q4_1R kernels) time, medians of interleaved calls (``env -u OPENBLAS_CORETYPE -u
# OPENBLAS_L2_SIZE python perf/bench_intpath.py --formats Q4_1R``), GEMV; n = 2, 4, 8, 16, 32, 64:
#   1536x576    0.57;  0.50 0.44 0.44 0.45 0.44 0.44
#   576x1536    0.58;  0.61 0.56 0.56 0.57 0.55 0.56
#   49152x576   0.38;  0.35 0.41 0.44 0.46 0.52 0.41
#   4864x896    0.51;  0.53 0.47 0.47 0.48 0.47 0.40
#   151936x896  0.53;  0.58 0.43 0.45 0.38 0.47 0.45
# (an earlier run with the machine busier, load 6: GEMV 0.25-0.61, n = 2 0.48-0.69, n >= 4
# 0.24-0.94 (mostly 0.6-0.9), both kernels slowed by the other jobs; the integer 4-row
# product there read 8-20 G weight-rows/s against 27-32 in this run and in L2, 512x1536,
# n = 4 / 8 / 16 in 0.12 / 0.23 / 0.35 ms.) The GEMV is 1.6-2.6x faster. Per extra activation
# row the integer dot has about as many ops as the float one (15 per 128 weights per row
# against 16 FMAs) but reads 4x fewer activation bytes. Rows per dot: 4 beat 2 and 3 by
# 1.02-1.1x.

_G1, _GB1, _TB1 = GROUPED["Q4_1R"]  # 4 blocks, 80 bytes per group, 20 per tail block
_XG1, _XT1 = 352, 88  # prepared bytes per group, per tail block (= per block: _XG1 / 4)
_V8F = ir.VectorType(_F32, 8)


@jit_exact
def _block_sum(x, o, n):
    s = np.float32(0.0)
    for i in range(n):
        s += x[o + i]
    return s


@jit_exact
def _prep_q4_1r(x, xq, nb):
    """x (nb * 32,) float32 -> xq (nb * _XT1,) uint8 as the section comment lays out."""
    xf = xq.view(np.float32)
    ng = nb // _G1
    q = np.empty(64, np.int8)
    for g in range(ng):
        base = _XG1 * g
        for bi in range(_G1):
            o = 128 * g + 32 * bi
            dx = _quant32(x, o, q, 0, 32)
            for i in range(32):
                wi = 32 * bi + i  # weight of the group: v = wi // 64, j' = wi % 64 // 8, t = wi % 8 // 2, h = wi % 2
                at = base + 64 * (wi // 64) + 32 * (wi % 2) + 4 * (wi % 64 // 8) + wi % 8 // 2
                xq[at] = np.uint8(q[i] & 255)
                xq[at + 128] = np.uint8(q[32 + i] & 255)
            for l in range(4):
                xf[(base + 256) // 4 + 4 * bi + l] = dx
            xf[(base + 320) // 4 + bi] = _block_sum(x, o, 32)
            xf[(base + 336) // 4 + bi] = 0.0
    for t in range(nb - _G1 * ng):
        base = _XG1 * ng + _XT1 * t
        o = 128 * ng + 32 * t
        dx = _quant32(x, o, q, 0, 32)
        for i in range(64):
            xq[base + i] = np.uint8(q[i] & 255)
        xf[(base + 64) // 4] = dx
        xf[(base + 68) // 4] = _block_sum(x, o, 32)
        for u in range(72, _XT1):
            xq[base + u] = 0


def _q4_1r_int_body(b, wp, xps, nb):
    """[float32 per row]: the ``nb`` Q4_1 blocks (groups, then tail blocks) of the Q4_1R row at
    i8* ``wp`` dotted with each row's prepared activations (i8* ``xps[t]``), each group's quants
    split into bytes once, every row then the one-row dot's operations in its order."""
    ng = b.udiv(nb, nb.type(_G1))
    nt = b.sub(nb, b.mul(ng, nb.type(_G1)))
    zero8 = ir.Constant(_V8F, [0.0] * 8)
    acc = [[cgutils.alloca_once_value(b, zero8) for _ in range(3)] for _ in xps]  # lanes v = 0, 1; min term
    tm = [cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0)) for _ in xps]  # min term of the tail blocks
    with cgutils.for_range(b, ng) as loop:
        g = loop.index
        p = b.gep(wp, [b.mul(g, g.type(_GB1))])
        _prefetch(b, p, simd.PREFETCH, _GB1)
        q = [_nibble_bytes(b, p, 32 * v) for v in range(2)]  # (low, high) of half v
        hm = b.fpext(_load(b, p, 64, ir.VectorType(ir.HalfType(), 8)), _V8F)  # d0..d3, m0..m3
        dv = [b.shuffle_vector(hm, hm, _const_vec(_V8I32, [2 * v + k // 4 for k in range(8)])) for v in range(2)]
        mv = b.shuffle_vector(hm, zero8, _const_vec(_V8I32, [4, 5, 6, 7, 8, 8, 8, 8]))
        for r, xp in enumerate(xps):
            xb = b.gep(xp, [b.mul(g, g.type(_XG1))])
            for v in range(2):
                s16 = [b.add(_maddubs(b, q[v][0], _load(b, xb, f + 64 * v, _V32I8)),
                             _maddubs(b, q[v][1], _load(b, xb, f + 64 * v + 32, _V32I8))) for f in (0, 128)]
                s = b.sitofp(_madd2(b, *s16), _V8F)
                sc = b.fmul(dv[v], _load(b, xb, 256 + 32 * v, _V8F), flags=_FLAGS)
                b.store(b.fadd(b.load(acc[r][v]), b.fmul(s, sc, flags=_FLAGS), flags=_FLAGS), acc[r][v])
            b.store(b.fadd(b.load(acc[r][2]), b.fmul(mv, _load(b, xb, 320, _V8F), flags=_FLAGS), flags=_FLAGS),
                    acc[r][2])
    wt = b.gep(wp, [b.mul(ng, ng.type(_GB1))])
    xts = [b.gep(xp, [b.mul(ng, ng.type(_XG1))]) for xp in xps]
    with cgutils.for_range(b, nt) as loop:
        t = loop.index
        p = b.gep(wt, [b.mul(t, t.type(_TB1))])
        qs = _load(b, p, 4, ir.VectorType(_I8, 16))
        lo = b.and_(qs, _const_vec(ir.VectorType(_I8, 16), 15))
        hi = b.lshr(qs, _const_vec(ir.VectorType(_I8, 16), 4))
        q32 = b.shuffle_vector(lo, hi, _const_vec(_V32I32, list(range(32))))
        d = b.fpext(_load(b, p, 0, ir.HalfType()), _F32)
        m = b.fpext(_load(b, p, 2, ir.HalfType()), _F32)
        for r, xt in enumerate(xts):
            xb = b.gep(xt, [b.mul(t, t.type(_XT1))])
            s = b.sitofp(_madd2(b, *(_maddubs(b, q32, _load(b, xb, f, _V32I8)) for f in (0, 32))), _V8F)
            sc = _splat(b, b.fmul(d, _load(b, xb, 64, _F32), flags=_FLAGS), _V8F)
            b.store(b.fadd(b.load(acc[r][0]), b.fmul(s, sc, flags=_FLAGS), flags=_FLAGS), acc[r][0])
            b.store(b.fadd(b.load(tm[r]), b.fmul(m, _load(b, xb, 68, _F32), flags=_FLAGS), flags=_FLAGS), tm[r])
    out = []
    for r in range(len(xps)):
        a = b.fadd(b.fadd(b.load(acc[r][0]), b.load(acc[r][1]), flags=_FLAGS), b.load(acc[r][2]), flags=_FLAGS)
        out.append(b.fadd(_hsum(b, a), b.load(tm[r]), flags=_FLAGS))
    return out


ROWS_Q4_1R = 4
_gemv_q4_1r, _gemm_q4_1r = _int_kernels(_prep_q4_1r, _q4_1r_int_body, 32, _XT1, ROWS_Q4_1R)


# ---- Q8_0S: GGUF Q8_0 blocks (34 bytes: half d, 32 int8), activations int8 per block ----
#
# weight = d q, q int8: ``vpmaddubsw`` needs one unsigned operand, so the weights give
# |q| (``vpabsb``, 0..128, once per block) and the activations take q's sign (``vpsignb``
# per row; 0 where q is 0): |q| sign(q) x = q x, pairs of products |.| <= 2 * 128 * 127 =
# 32512 < 32767. Then ``vpmaddwd`` with ones, a convert and an FMA by d dx per block.
# Per prepared block (``_XB8`` = 68 bytes): 32 coarse and 32 fine int8 activations, float32 dx. Two accumulators
# (even and odd blocks) keep the GEMV off the FMA latency.
# Measured as for Q4_1R (``perf/bench_intpath.py --formats Q8_0S``), int / exact time, GEMV;
# n = 2, 4, 8, 16, 32, 64:
#   1536x576    0.68;  0.78 0.69 0.68 0.69 0.66 0.52
#   576x1536    0.73;  0.80 0.75 0.76 0.83 0.64 0.76
#   49152x576   0.89;  0.55 0.73 0.74 0.66 0.69 0.66
#   4864x896    0.72;  0.82 0.81 0.71 0.38 0.87 0.75
#   151936x896  0.84;  0.72 0.59 0.61 0.62 0.56 0.61
# (the busier earlier run: GEMV 0.64-0.90, n >= 2 0.40-0.89; single figures swing by 0.2.)
# The two big GEMVs (30 and 145 MB of weights, 1.06 bytes per weight) stream from memory at
# 9-11 GB/s with this kernel, 7-10 with the exact one, so they gain least (0.81-0.90). Tried and dropped: 4 blocks per step, the 4 int32 sums reduced by 3
# ``vphaddd`` to one vector, one convert and one FMA (dx as 8 floats per 4 blocks): 0.89-1.13x
# of this kernel's time, no better.

_BB8, _XB8 = 34, 68


@jit_exact
def _prep_q8_0(x, xq, nb):
    xf = xq.view(np.float32)
    q = np.empty(64, np.int8)
    for k in range(nb):
        dx = _quant32(x, 32 * k, q, 0, 32)
        for i in range(64):
            xq[_XB8 * k + i] = np.uint8(q[i] & 255)
        xf[(_XB8 * k + 64) // 4] = dx


def _psign(b, a, s):  # a * sign(s) per byte (0 where s is 0)
    return _x86(b, "llvm.x86.avx2.psign.b", _V32I8, a, s)


def _q8_0_int_body(b, wp, xps, nb):
    zero8 = ir.Constant(_V8F, [0.0] * 8)
    acc = [[cgutils.alloca_once_value(b, zero8) for _ in range(2)] for _ in xps]

    def block(k, par):
        p = b.gep(wp, [b.mul(k, k.type(_BB8))])
        _prefetch(b, p, simd.PREFETCH, _BB8)
        wq = _load(b, p, 2, _V32I8)
        neg = b.icmp_signed("<", wq, ir.Constant(_V32I8, [0] * 32))
        aw = b.select(neg, b.sub(ir.Constant(_V32I8, [0] * 32), wq), wq)  # |q| (vpabsb; -128 -> 128 unsigned)
        d = _splat(b, b.fpext(_load(b, p, 0, ir.HalfType()), _F32), _V8F)
        for r, xp in enumerate(xps):
            xb = b.gep(xp, [b.mul(k, k.type(_XB8))])
            s16 = [_maddubs(b, aw, _psign(b, _load(b, xb, f, _V32I8), wq)) for f in (0, 32)]
            s = b.sitofp(_madd2(b, *s16), _V8F)
            sc = b.fmul(d, _splat(b, _load(b, xb, 64, _F32), _V8F), flags=_FLAGS)
            b.store(b.fadd(b.load(acc[r][par]), b.fmul(s, sc, flags=_FLAGS), flags=_FLAGS), acc[r][par])

    half = b.lshr(nb, nb.type(1))
    with cgutils.for_range(b, half) as loop:
        k = b.shl(loop.index, loop.index.type(1))
        block(k, 0)
        block(b.add(k, k.type(1)), 1)
    with cgutils.if_unlikely(b, b.icmp_unsigned("!=", b.shl(half, half.type(1)), nb)):
        block(b.sub(nb, nb.type(1)), 0)
    return [_hsum(b, b.fadd(b.load(a[0]), b.load(a[1]), flags=_FLAGS)) for a in acc]


ROWS_Q8_0 = 4
_gemv_q8_0, _gemm_q8_0 = _int_kernels(_prep_q8_0, _q8_0_int_body, 32, _XB8, ROWS_Q8_0)


# ---- Q5_0R: groups of 3 Q5_0 blocks (96 weights) in 5-bit fields, activations int8 per block ----
#
# Q5_0R (see ``repacked``): bits 5k..5k+4 of lane j of a group's 16 dwords hold the quant of
# weight 16k + j (k = 0..5, block k // 2), weight = d (q - 16). Block b's two fields go to
# bytes: per 8-lane half v, ``(dw >> 10b) & 31 | (dw >> (10b - 3)) & (31 << 8)`` puts fields
# 2b, 2b + 1 of each lane into its low two bytes, and one ``vpackusdw`` of the two halves
# makes the block's 32 quants one byte vector (word w: lane L(w) = 8 [w % 8 > 3] + 4 (w // 8)
# + w % 4, bytes fields 2b, 2b + 1); the activations are laid out to match (``_prep_q5_0r``).
# Per row and block: ``vpmaddubsw`` (0..31 x int8), ``vpmaddwd`` with ones, a convert and an
# FMA by d dx; the -16 d X term (X the float32 sum of x over the block) one FMA per group.
# Per prepared group (``_XG5`` = 240 bytes): 96 coarse and 96 fine int8 activations, 3 float32
# dx, 3 float32 X and 6 zeros; per tail block (a GGUF Q5_0 block, ``_XT5`` = 80 bytes, 72
# used): 32 coarse and 32 fine int8 in weight order, dx, X.
# Measured as for Q4_1R (``perf/bench_intpath.py --formats Q5_0R``), int / exact time, GEMV;
# n = 2, 4, 8, 16, 32, 64:
#   1536x576    0.85;  0.91 0.74 0.71 0.74 0.73 0.71
#   576x1536    0.85;  0.96 0.72 0.76 0.74 0.76 0.75
#   49152x576   0.81;  0.84 0.64 0.63 0.69 0.69 0.65
#   4864x896    0.80;  0.90 0.67 0.69 0.78 0.78 0.64
#   151936x896  0.82;  0.86 0.64 0.65 0.69 0.67 0.68
# The GEMV gains least of the three: making bytes of the 5-bit fields costs 25 vector ops per
# 96 weights, shared by the rows (the exact kernel's shift, mask, convert and offset: ~46),
# against 16 per row (the exact kernel's 18 FMAs). Before the byte blend (two masks and an or
# per half) the GEMV and n = 2 took 1.05-1.07x this time. Not tried: the other layouts of the
# fields (4 fields of 2 blocks per dword by two spreads: as many ops, counted, with byte
# shuffles in place of the packs).

_G5, _GB5, _TB5 = GROUPED["Q5_0R"]  # 3 blocks, 70 bytes per group, 22 per tail block
_XG5, _XT5 = 240, 80


@jit_exact
def _prep_q5_0r(x, xq, nb):
    """x (nb * 32,) float32 -> xq (nb * _XT5,) uint8 as the section comment lays out."""
    xf = xq.view(np.float32)
    ng = nb // _G5
    q = np.empty(64, np.int8)
    for g in range(ng):
        base = _XG5 * g
        for bi in range(_G5):
            o = 96 * g + 32 * bi
            dx = _quant32(x, o, q, 0, 32)
            for wd in range(16):
                lane = 8 * (wd % 8 > 3) + 4 * (wd // 8) + wd % 4
                for e in range(2):
                    xq[base + 32 * bi + 2 * wd + e] = np.uint8(q[16 * e + lane] & 255)
                    xq[base + 96 + 32 * bi + 2 * wd + e] = np.uint8(q[32 + 16 * e + lane] & 255)
            xf[(base + 192) // 4 + bi] = dx
            xf[(base + 204) // 4 + bi] = _block_sum(x, o, 32)
        for u in range(6):
            xf[(base + 216) // 4 + u] = 0.0
    for t in range(nb - _G5 * ng):
        base = _XG5 * ng + _XT5 * t
        o = 96 * ng + 32 * t
        dx = _quant32(x, o, q, 0, 32)
        for i in range(64):
            xq[base + i] = np.uint8(q[i] & 255)
        xf[(base + 64) // 4] = dx
        xf[(base + 68) // 4] = _block_sum(x, o, 32)
        for u in range(72, _XT5):
            xq[base + u] = 0


def _packus(b, a, c):  # <8 x i32> x 2 -> <16 x i16>, per 128-bit half: a's 4 dwords then c's
    return _x86(b, "llvm.x86.avx2.packusdw", _V16I16, a, c)


def _q5_0r_int_body(b, wp, xps, nb):
    """[float32 per row]: the ``nb`` Q5_0 blocks (groups, then tail blocks) of the Q5_0R row at
    i8* ``wp`` dotted with each row's prepared activations, each group's quants made bytes once."""
    ng = b.udiv(nb, nb.type(_G5))
    nt = b.sub(nb, b.mul(ng, nb.type(_G5)))
    zero8 = ir.Constant(_V8F, [0.0] * 8)
    acc = [[cgutils.alloca_once_value(b, zero8) for _ in range(2)] for _ in xps]
    tm = [cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0)) for _ in xps]
    v4 = ir.VectorType(_F32, 4)
    with cgutils.for_range(b, ng) as loop:
        g = loop.index
        p = b.gep(wp, [b.mul(g, g.type(_GB5))])
        _prefetch(b, p, simd.PREFETCH, _GB5)
        dw = [_load(b, p, 32 * v, _V8I32) for v in range(2)]
        qb = []
        sel = _const_vec(ir.VectorType(ir.IntType(1), 32), [k % 4 == 0 for k in range(32)])
        for bi in range(_G5):
            t = []
            for v in range(2):
                lo = dw[v] if bi == 0 else b.lshr(dw[v], _const_vec(_V8I32, 10 * bi))
                hi = b.shl(dw[v], _const_vec(_V8I32, 3)) if bi == 0 else b.lshr(dw[v], _const_vec(_V8I32, 10 * bi - 3))
                m = b.select(sel, b.bitcast(lo, _V32I8), b.bitcast(hi, _V32I8))  # byte 0 of lo, the others of hi
                t.append(b.and_(b.bitcast(m, _V8I32), _const_vec(_V8I32, 31 | 31 << 8)))
            qb.append(b.bitcast(_packus(b, t[0], t[1]), _V32I8))
        d4 = _scales(b, p)  # lanes 1..3: d of blocks 0..2
        ds = [b.shuffle_vector(d4, d4, _const_vec(_V8I32, [bi + 1] * 8)) for bi in range(_G5)]
        m8 = b.shuffle_vector(b.fmul(d4, ir.Constant(v4, [-16.0] * 4)), ir.Constant(v4, [0.0] * 4),
                              _const_vec(_V8I32, [1, 2, 3, 4, 4, 4, 4, 4]))  # -16 d per block, zeros
        for r, xp in enumerate(xps):
            xb = b.gep(xp, [b.mul(g, g.type(_XG5))])
            for bi in range(_G5):
                s16 = [_maddubs(b, qb[bi], _load(b, xb, f + 32 * bi, _V32I8)) for f in (0, 96)]
                s = b.sitofp(_madd2(b, *s16), _V8F)
                sc = b.fmul(ds[bi], _splat(b, _load(b, xb, 192 + 4 * bi, _F32), _V8F), flags=_FLAGS)
                a = acc[r][bi % 2]
                b.store(b.fadd(b.load(a), b.fmul(s, sc, flags=_FLAGS), flags=_FLAGS), a)
            b.store(b.fadd(b.load(acc[r][1]), b.fmul(m8, _load(b, xb, 204, _V8F), flags=_FLAGS), flags=_FLAGS),
                    acc[r][1])
    wt = b.gep(wp, [b.mul(ng, ng.type(_GB5))])
    xts = [b.gep(xp, [b.mul(ng, ng.type(_XG5))]) for xp in xps]
    v16i8 = ir.VectorType(_I8, 16)
    with cgutils.for_range(b, nt) as loop:
        t = loop.index
        p = b.gep(wt, [b.mul(t, t.type(_TB5))])
        lo, hi = simd._nibbles(b, p, 6)
        h0, h1 = simd._fifth_bits(b, p, 2)
        zero, sixteen = _const_vec(v16i8, 0), _const_vec(v16i8, 16)
        q32 = b.shuffle_vector(b.or_(lo, b.select(h0, sixteen, zero)), b.or_(hi, b.select(h1, sixteen, zero)),
                               _const_vec(_V32I32, list(range(32))))
        d = b.fpext(_load(b, p, 0, ir.HalfType()), _F32)
        m = b.fmul(d, ir.Constant(_F32, -16.0))
        for r, xt in enumerate(xts):
            xb = b.gep(xt, [b.mul(t, t.type(_XT5))])
            s = b.sitofp(_madd2(b, *(_maddubs(b, q32, _load(b, xb, f, _V32I8)) for f in (0, 32))), _V8F)
            sc = _splat(b, b.fmul(d, _load(b, xb, 64, _F32), flags=_FLAGS), _V8F)
            b.store(b.fadd(b.load(acc[r][0]), b.fmul(s, sc, flags=_FLAGS), flags=_FLAGS), acc[r][0])
            b.store(b.fadd(b.load(tm[r]), b.fmul(m, _load(b, xb, 68, _F32), flags=_FLAGS), flags=_FLAGS), tm[r])
    return [b.fadd(_hsum(b, b.fadd(b.load(a[0]), b.load(a[1]), flags=_FLAGS)), b.load(c), flags=_FLAGS)
            for a, c in zip(acc, tm)]


ROWS_Q5_0R = 4
_gemv_q5_0r, _gemm_q5_0r = _int_kernels(_prep_q5_0r, _q5_0r_int_body, 32, _XT5, ROWS_Q5_0R)

# ---- Q6_KR: 6-bit fields as int16 pairs, vpmaddwd ----
#
# Q6_KR (see ``repacked``): dword m (m = 0, 1, 2) of lane j holds quant 5m + i of sub-block j
# at bits 6i..6i+5 (i = 0..4) and bits 2m..2m+1 of quant 15 at bits 30..31. The fields do not
# sit on byte boundaries (and a 6-bit quant at place 4 would saturate vpmaddubsw's int16 pair
# sums), so each dword is read as two int16 (lo = bits 0-15, hi = bits 16-31) and meets int16
# activations in ``vpmaddwd`` (16 x int16 times 16 x int16, adjacent products summed to 8 x
# int32: one int32 per lane). Three masks per dword vector put two fields in each pair:
#
#     A = dw & 0x00FC003F          lo: quant 5m (place 1),      hi: quant 5m + 3 (place 4)
#     B = dw & 0x3F000FC0          lo: quant 5m + 1 (place 64), hi: quant 5m + 4 (place 256)
#     C = dw' & 0x00C003F0         lo: quant 5m + 2 (place 16), hi: bits 2m..2m+1 of quant 15 (place 64)
#
# (dw' = the dwords loaded one byte further on, i.e. dw >> 8 within the lane: quant 5m + 2
# straddles the two halves; the load replaces a shift, and the byte it takes from the next
# lane or, for the last, the scales, is masked off). The activations make every product's
# place 256 by exact powers of 2: pairs (lo, hi) A: (256 x[5m], 64 x[5m + 3]), B: (4 x[5m + 1],
# x[5m + 4]), C: (16 x[5m + 2], 4 * 2^2m x[15]), so A + B + C summed over m is S_j = 256 *
# sum_k q_k x_k for lane j exactly (the three pieces of quant 15 add to 256 q_15 x_15). The
# int16 operands are at most 63 * 256 (weights) and 127 * 256 = 32512 (activations, |x| <=
# 127), a vpmaddwd sum at most 2 * 256 * 63 * 127 = 4096512, |S_j| <= 256 * 16 * 63 * 127 =
# 32772096 < 2^31; S_j is 256 times an integer below 2^17, so its float32 is exact. The -32
# costs nothing per weight: a super-block adds (d / 256 * sc[j]) * (dx S_j - 8192 X_j) per lane,
# X_j the float32 sum of x over sub-block j (prepared as -8192 X_j; d / 256 and -8192 X_j are
# exact scalings, so d / 256 * sc[j] is gguf's d * sc[j] / 256 to the bit).
#
# The activations are the two int8 parts of every format here (module docstring), each in its
# own chunks: the pair sums above are per part, S = 128 S_coarse + S_fine is made in float32
# (128 S_coarse would overflow int32; both converts are exact, the sum rounds once).
# Per prepared super-block (``XQ6_BYTES``): 18 chunks of 16 int16 of the coarse part, chunk
# (m, pair, half) at byte 32 * (2 * (3m + pair) + half), int16 2t and 2t + 1 the (lo, hi)
# activations of lane 8 half + t; the fine part's 18 at ``_FINE6``; then 16 float32 -8192 X_j
# and 16 float32 dx (lane j: block j // 2).
#
# Measured on the 2-core Zen 3 (AVX2, no AVX-512), both paths compiled in one process, calls
# alternating on one thread (``perf/bench_intpath.py --formats Q6_KR``; the VM was shared with
# other jobs, load average 4-7 on the 2 cores, so the G weights/s are low and noisy; the ratios
# are medians of int / exact over adjacent calls), time int / exact (KERNELS["Q6_KR"]) in two
# runs, n >= 8 with the byte form below:
#
#     shape          n = 1       2          4          8          16         32         64
#     8960x1536      0.65 0.62   0.72 0.75  0.50 0.63  0.50 0.48  0.43 0.40  0.37 0.37  0.36 0.35
#     1536x8960      0.63 0.69   0.73 0.77  0.64 0.80  0.49 0.51  0.43 0.45  0.39 0.38  0.39 0.39
#     151936x1536    0.74 0.80   0.78 0.74  0.54 0.60  0.49 0.43  0.41 0.39  0.39 0.36  0.33 0.34
#
# (measured with one int8 part; the fine part adds a vpmaddwd per pair and row.)
# The GEMV is faster: 8960x1536 G weights/s exact -> int 13.6 -> 21.4, 11.3 -> 17.1, 8.8 ->
# 12.7, 10.7 -> 16.1 in four runs; from memory (151936x1536, 191 MB on one thread) less, as
# it is bandwidth-bound: 6.6 -> 7.5, 5.3 -> 6.5, 5.6 -> 7.5, 7.0 -> 8.8. With this word form
# for every n (two earlier runs) n >= 8 took 0.39-0.68 of exact (mostly 0.52-0.63); before
# the 2-row dot, n = 2 ran the GEMV twice: 0.96-0.99. The shifted form (A = dw & 0x00FC003F,
# B = (dw >> 6) & same, C = (dw >> 12) & 0x000C003F, everything at place 4) gives bit-identical
# results; in one process it took 1.08x the time of this one on the GEMV, the same at n = 4
# and 8 (the masks do not bound the small-n product; the rows' 18 vpmaddwd and 17 vpaddd per
# super-block likely do, hence the byte form).

XQ6_BYTES = 1280  # prepared activation bytes per Q6_KR super-block (a multiple of 64)
_FINE6, _XSUM6, _DX6 = 576, 1152, 1216  # byte offsets of the fine part's chunks, the -8192 X_j, the per-lane dx
_BB6 = 210
_PAIRS6 = ((0, 0x00FC003F), (0, 0x3F000FC0), (1, 0x00C003F0))  # pairs A, B, C: (byte offset of the dword load, mask)


@jit_exact
def _prep_q6kr(x, xq, nb):
    """x (nb * 256,) float32 -> xq (nb * XQ6_BYTES,) uint8 as the Q6_KR section lays out."""
    xf = xq.view(np.float32)
    xh = xq.view(np.int16)
    q = np.empty(2 * _QKK, np.int8)
    for g in range(nb):
        base = g * XQ6_BYTES
        _superblock_head(x, g * _QKK, q, xf, base, _XSUM6, _DX6, np.float32(-8192.0))
        for j in range(16):
            for part in range(2):  # coarse, fine
                c0 = (base + _FINE6 * part + 32 * (j // 8) + 4 * (j % 8)) // 2  # int16 index of lane j's pair in chunk 0
                v = _QKK * part + 16 * j
                for m in range(3):
                    a = c0 + 32 * (3 * m)  # pair A, then B, C 16 int16 (one chunk) apart each
                    xh[a] = np.int16(256 * q[v + 5 * m])
                    xh[a + 1] = np.int16(64 * q[v + 5 * m + 3])
                    xh[a + 32] = np.int16(4 * q[v + 5 * m + 1])
                    xh[a + 33] = np.int16(q[v + 5 * m + 4])
                    xh[a + 64] = np.int16(16 * q[v + 5 * m + 2])
                    xh[a + 65] = np.int16((4 << (2 * m)) * q[v + 15])


def _q6kr_scales(b, p):
    """<16 x float> d / 256 * sc[j] of the Q6_KR super-block at i8* p (d / 256 is exact)."""
    sc = b.sitofp(_load(b, p, 192, ir.VectorType(_I8, 16)), _V16F)
    d = b.fmul(b.fpext(_load(b, p, 208, ir.HalfType()), _F32), ir.Constant(_F32, 1.0 / 256))
    return b.fmul(_splat(b, d, _V16F), sc)


def _madd_wd(b, w16, x16):  # 16 x int16 times 16 x int16 -> 8 int32 sums of adjacent products
    return _x86(b, "llvm.x86.avx2.pmadd.wd", _V8I32, w16, x16)


def _q6kr_int_body(b, wp, xps, n):
    """[float32 per row]: the first n super-blocks of the Q6_KR row at i8* ``wp`` dotted with each
    row's prepared activations (i8* ``xps[t]``). Each super-block's dwords are masked into int16
    pairs once, each pair meeting every row in turn; every row gets the same operations (the
    integer sums are exact in any order, the float ones in the same order): a row's result has
    the bits of the one-row dot."""
    nr = len(xps)
    acc = [cgutils.alloca_once_value(b, ir.Constant(_V16F, [0.0] * 16)) for _ in range(nr)]
    with cgutils.for_range(b, n) as loop:
        g = loop.index
        p = b.gep(wp, [b.mul(g, g.type(_BB6))])
        _prefetch(b, p, simd.PREFETCH, _BB6)
        sv = _q6kr_scales(b, p)
        xbs = [b.gep(xp, [b.mul(g, g.type(XQ6_BYTES))]) for xp in xps]
        s32 = [[[None, None], [None, None]] for _ in range(nr)]  # row, part (coarse, fine), half
        for half in range(2):
            for m in range(3):
                for pr, (off, mask) in enumerate(_PAIRS6):
                    wv = _load(b, p, 64 * m + 32 * half + off, _V8I32)
                    wv = b.bitcast(b.and_(wv, ir.Constant(_V8I32, [mask] * 8)), _V16I16)
                    for r in range(nr):
                        for part in range(2):
                            xv = _load(b, xbs[r], _FINE6 * part + 32 * (2 * (3 * m + pr) + half), _V16I16)
                            t = _madd_wd(b, wv, xv)
                            s = s32[r][part][half]
                            s32[r][part][half] = t if s is None else b.add(s, t)
        for r in range(nr):
            sc, sf = (b.sitofp(b.shuffle_vector(s32[r][part][0], s32[r][part][1], ir.Constant(_V16I32, list(range(16)))),
                               _V16F) for part in range(2))
            s = b.fadd(b.fmul(sc, ir.Constant(_V16F, [128.0] * 16), flags=_FLAGS), sf, flags=_FLAGS)  # 128 S + S'
            t = b.fadd(b.fmul(s, _load(b, xbs[r], _DX6, _V16F), flags=_FLAGS), _load(b, xbs[r], _XSUM6, _V16F),
                       flags=_FLAGS)
            b.store(b.fadd(b.load(acc[r]), b.fmul(sv, t, flags=_FLAGS), flags=_FLAGS), acc[r])
    return [_hsum(b, b.load(c)) for c in acc]


_gemv_q6kr, _gemm_q6kr_words = _int_kernels(_prep_q6kr, _q6kr_int_body, _QKK, XQ6_BYTES, ROWS)


# ---- Q6_KR small-n from n = 8: the weights decoded to bytes once per tile, vpmaddubsw ----
#
# Decoding a super-block's quants into bytes costs ~35 shifts, masks and ors per 128 weights,
# more than the masks above (6), but a byte vector meets the int8 activations in vpmaddubsw
# (32 products per instruction, against 16 for vpmaddwd): per row and super-block 8
# vpmaddubsw + 4 vpmaddwd instead of 18 vpmaddwd. So the GEMM from ``_BYTES_MIN`` rows decodes
# each simd.TILE rows of weights once into a buffer (``_decode_q6kr_bytes``, per super-block
# 4 x 64 quant bytes and the 16 float32 d / 256 * sc[j]) and runs the byte dot on every ROWS
# activation rows. The bytes of lane j (4 per chunk; chunk c at 64c + 32 half, lane 8 half + t
# at 4t) hold quants (5m, 5m + 1, 5m + 3, 5m + 4) of sub-block j in chunk m = 0, 1, 2:
#
#     dw & 0x3F00003F | (dw << 2) & 0x00003F00 | (dw >> 2) & 0x003F0000
#
# and (2, 7, 12, 15) in chunk 3 (the three pieces of quant 15 shifted into byte 3), each a
# quant at place 1; the activations (``_prep_q6kr_bytes``, the Q4_KR layout: XQ_BYTES per
# super-block, 256 int8, 16 float32 -8192 X_j, dx) in the same order. Two vpmaddubsw pair
# sums add to at most 4 * 63 * 127 = 32004 < 32767 in int16 before vpmaddwd with ones widens
# them. The integer sum is the same S_j / 256 (shifted back by 8, exact) and every float op
# is the word dot's, so a row's result has the bits of the GEMV.
# Measured against the word form in one process, calls alternating (medians of byte / word
# time over adjacent calls): 8960x1536 n = 4 1.02x (1.36x before the decode had its
# prefetch), 8 0.90x (0.97x), 16 0.70x (0.83x), 64 (0.64x); 1536x8960 before the prefetch n = 8
# 0.85x, 12 0.61x, 16 0.66x, 32 0.58x. Below 8 rows the decode does not pay.

_BYTES_MIN = 8  # activation rows from which the GEMM decodes the weights to bytes
_DEC6 = 320  # decoded bytes per super-block: 256 quant bytes, 16 float32 d / 256 * sc[j]


@jit_exact
def _prep_q6kr_bytes(x, xq, nb):
    """x (nb * 256,) float32 -> xq (nb * XQ_BYTES,) uint8 as the byte form lays out."""
    xf = xq.view(np.float32)
    q = np.empty(2 * _QKK, np.int8)
    for g in range(nb):
        base = g * XQ_BYTES
        _superblock_head(x, g * _QKK, q, xf, base, _XSUM, _DX, np.float32(-8192.0))
        for j in range(16):
            c0 = base + 32 * (j // 8) + 4 * (j % 8)
            for c in range(4):
                for u in range(4):
                    k = 5 * c + (0, 1, 3, 4)[u] if c < 3 else (2, 7, 12, 15)[u]
                    xq[c0 + 64 * c + u] = np.uint8(q[16 * j + k] & 255)
                    xq[c0 + _QKK + 64 * c + u] = np.uint8(q[_QKK + 16 * j + k] & 255)


def _v8(v):
    return ir.Constant(_V8I32, [v] * 8)


@intrinsic
def _decode_q6kr_bytes(typingctx, w, woff, nb, dst, doff):
    """The ``nb`` Q6_KR super-blocks of the row at byte ``woff`` of ``w`` -> the byte form at byte
    ``doff`` of ``dst`` (``_DEC6`` bytes per super-block)."""

    def gen(context, b, sig, args):
        w, woff, nb, dst, doff = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        dp = b.gep(_data_ptr(context, b, sig.args[3], dst), [doff])
        with cgutils.for_range(b, nb) as loop:
            g = loop.index
            p = b.gep(wp, [b.mul(g, g.type(_BB6))])
            o = b.gep(dp, [b.mul(g, g.type(_DEC6))])
            _prefetch(b, p, simd.PREFETCH, _BB6)
            b.store(_q6kr_scales(b, p), _ptr_at(b, o, 256, _V16F), align=1)
            for half in range(2):
                dw = [_load(b, p, 64 * m + 32 * half, _V8I32) for m in range(3)]
                for m in range(3):
                    v = b.or_(b.and_(dw[m], _v8(0x3F00003F)), b.and_(b.shl(dw[m], _v8(2)), _v8(0x00003F00)))
                    v = b.or_(v, b.and_(b.lshr(dw[m], _v8(2)), _v8(0x003F0000)))
                    b.store(v, _ptr_at(b, o, 64 * m + 32 * half, _V8I32), align=1)
                v = b.or_(b.and_(b.lshr(dw[0], _v8(12)), _v8(0x3F)), b.and_(b.lshr(dw[0], _v8(6)), _v8(0x03000000)))
                v = b.or_(v, b.and_(b.lshr(dw[1], _v8(4)), _v8(0x0C003F00)))  # quant 7; bits 2-3 of quant 15
                v = b.or_(v, b.and_(b.shl(dw[2], _v8(4)), _v8(0x003F0000)))
                v = b.or_(v, b.and_(b.lshr(dw[2], _v8(2)), _v8(0x30000000)))
                b.store(v, _ptr_at(b, o, 192 + 32 * half, _V8I32), align=1)
        return context.get_dummy_value()

    return types.void(w, types.intp, types.intp, dst, types.intp), gen


def _q6kr_bytes_body(b, tp, xps, n):
    """[float32 per row]: the first n decoded super-blocks at i8* ``tp`` dotted with each row's
    prepared activations (byte form)."""
    nr = len(xps)
    acc = [cgutils.alloca_once_value(b, ir.Constant(_V16F, [0.0] * 16)) for _ in range(nr)]
    with cgutils.for_range(b, n) as loop:
        g = loop.index
        q = b.gep(tp, [b.mul(g, g.type(_DEC6))])
        sv = _load(b, q, 256, _V16F)
        wv = {(c, h): _load(b, q, 64 * c + 32 * h, _V32I8) for c in range(4) for h in range(2)}
        for r, xp in enumerate(xps):
            xb = b.gep(xp, [b.mul(g, g.type(XQ_BYTES))])
            parts = []
            for lo in (0, _QKK):  # coarse, fine
                s32 = []
                for h in range(2):
                    t = [_maddubs(b, wv[c, h], _load(b, xb, lo + 64 * c + 32 * h, _V32I8)) for c in range(4)]
                    s32.append(b.add(_madd(b, b.add(t[0], t[1]), 1), _madd(b, b.add(t[2], t[3]), 1)))
                parts.append(b.sitofp(b.shuffle_vector(s32[0], s32[1], ir.Constant(_V16I32, list(range(16)))), _V16F))
            # the word dot's 128 S + S' at place 256: both products are exact, so the sum rounds alike
            s = b.fadd(b.fmul(parts[0], ir.Constant(_V16F, [32768.0] * 16), flags=_FLAGS),
                       b.fmul(parts[1], ir.Constant(_V16F, [256.0] * 16), flags=_FLAGS), flags=_FLAGS)
            t = b.fadd(b.fmul(s, _load(b, xb, _DX, _V16F), flags=_FLAGS), _load(b, xb, _XSUM, _V16F), flags=_FLAGS)
            b.store(b.fadd(b.load(acc[r]), b.fmul(sv, t, flags=_FLAGS), flags=_FLAGS), acc[r])
    return [_hsum(b, b.load(c)) for c in acc]


_d1b_q6kr = _make_dot(_q6kr_bytes_body)
_d2b_q6kr = _make_rows(_q6kr_bytes_body, 2)
_dnb_q6kr = _make_rows(_q6kr_bytes_body, ROWS)


@jit_exact
def _gemm_q6kr(w, X, out, r0, r1):
    n, cols = X.shape
    if n < _BYTES_MIN:
        _gemm_q6kr_words(w, X, out, r0, r1)
        return
    nb = cols // _QKK
    XQ = np.empty((n, nb * XQ_BYTES), np.uint8)
    for i in range(n):
        _prep_q6kr_bytes(X[i], XQ[i], nb)
    rb = w.strides[0]
    tb = nb * _DEC6
    buf = np.empty(_TILE * tb, np.uint8)
    full = n - n % ROWS
    for ra in range(r0, r1, _TILE):
        rz = min(r1, ra + _TILE)
        for r in range(ra, rz):
            _decode_q6kr_bytes(w, r * rb, nb, buf, (r - ra) * tb)
        for i in range(0, full, ROWS):
            for r in range(ra, rz):
                _dnb_q6kr(buf, (r - ra) * tb, XQ, i, nb, out, r)
        if n - full >= 2:
            for r in range(ra, rz):
                _d2b_q6kr(buf, (r - ra) * tb, XQ, full, nb, out, r)
        if (n - full) % 2:
            for r in range(ra, rz):
                out[n - 1, r] = _d1b_q6kr(buf, (r - ra) * tb, XQ[n - 1], nb)


# the public kernels, in column slabs like the exact ones: (gemv, gemm) per store format
INT_KERNELS: dict[str, tuple] = {
    "Q4_KR": _slabbed("Q4_KR", (_gemv_q4kr, _gemm_q4kr, dequant_q4_kr_simd))[:2],
    "Q4_1R": _slabbed("Q4_1R", (_gemv_q4_1r, _gemm_q4_1r, dequant_q4_1r_simd))[:2],
    "Q8_0S": _slabbed("Q8_0S", (_gemv_q8_0, _gemm_q8_0, _ROW_MAJOR["simd"]["Q8_0S"][2]))[:2],
    "Q5_0R": _slabbed("Q5_0R", (_gemv_q5_0r, _gemm_q5_0r, dequant_q5_0r_simd))[:2],
    "Q6_KR": _slabbed("Q6_KR", (_gemv_q6kr, _gemm_q6kr, dequant_q6_kr_simd))[:2],
}

# ---- references (tests) ----

def quantize_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values 128 q + q' (nb, 32) int64, float32 dx (nb,)) of x as the kernels quantize it, per
    32 values (``_quant32``): x ~ dx * values."""
    xb = np.asarray(x, np.float32).reshape(-1, _QB)
    amax = np.abs(xb).max(axis=1)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    t = (xb * inv[:, None]).astype(np.float32)
    r = np.rint(t)
    q = r.astype(np.int64) * 128 + np.rint((t - r) * np.float32(128.0)).astype(np.int64)
    return q, (amax / np.float32(127.0) / np.float32(128.0)).astype(np.float32)

"""Store layouts chosen at import time, and their kernels: Q5_0 as ``Q5_0R``, Q6_K as ``Q6_KR``,
Q4_K as ``Q4_KR``, Q4_1 as ``Q4_1R``, and every one of them and the other quantized formats in
column slabs.

The store format is ours, so a GGUF format whose kernel is compute-bound can be
rewritten on import into a layout that costs fewer vector operations per weight.
The values are the same: every kernel here is checked against ``gguf.quants.dequantize``
of the original blocks, and :func:`unpack` gives the GGUF bytes back exactly.

Q5_0R (from Q5_0, weight = d * (q - 16), q 5 bits). A row of nb = cols // 32 blocks is
nb // 3 groups of 3 blocks (96 weights, 70 bytes), then the last nb % 3 blocks as GGUF
Q5_0 blocks (22 bytes each)::

    bytes 0..63   16 little-endian uint32 lanes; bits 5k..5k+4 of lane j hold the quant
                  of weight 16k + j of the group (k = 0..5; block k // 2)
    bytes 64..69  the 3 block scales d (IEEE half), as in the GGUF blocks

One step of the GEMV is ``q >> 5k`` (no shift for k = 0) and a 32-entry table lookup
(``vpermi2ps`` reads the low 5 bits of each index, so no mask either) for 16 weights in
natural order, so x is read as it is. GGUF Q5_0 needs per 32 weights a nibble split, a
widen, a 5th-bit test and select, two converts and a scale broadcast + convert.
Measured on the 2-core Zen 4 (AVX-512), both kernels compiled in one process,
``python perf/bench_simd_variants.py --formats Q5_0R --shape ROWSxCOLS --threads 2 --dram``
(weights read from memory), G weights/s Q5_0 -> Q5_0R: 8960x1536 20.8 -> 30.8 (1.48x),
151936x896 17.3 -> 25.9 (1.50x), 1536x8960 19.1 -> 22.4 (1.17x); ``--shape 512x1536`` (one
core, in L2) 10.5 -> 15.6 (1.49x). The 70 bytes per 96 weights are 6 % more than GGUF's
66. Tried and dropped: float32 scales stored apart (76 bytes per group; 0.9-1.1x of the
half scales); two rows per step sharing the x loads (0.74-0.96x); one accumulator per block
of the group (0.92-0.99x).

Q6_KR (from Q6_K), Q4_KR (from Q4_K) and Q4_1R (from Q4_1): see their sections below; same
bytes per weight as GGUF (210 and 144 per 256, 80 per 128).

Q8_0, Q4_0, Q5_1, Q5_K keep their GGUF blocks, under store names of their own
(``Q8_0S`` ...), because of the column slabs:

Column slabs (``formats.SLABBED``: every layout here). A row of more than ``SLAB_COLS``
(3072) weights is cut into ``n_slabs`` column slabs of whole units (a block; for Q5_0R a
group of 3 blocks, the tail blocks going to the last slab) of near-equal width, and the
tensor's bytes are slab 0 of every row, then slab 1 of every row, ...: each slab is a
contiguous row-major matrix in the layout above. The kernels run the row-major kernels
slab by slab over the rows of a call, summing (``_slabbed``), so a GEMV has at most 12-13
KB of activations per pass, which stay in L1 while the weights stream from memory; a whole
8960-wide row needs 35-38 KB, which does not, and that was what made long rows the slowest
shape of every kernel (column tiles inside the row-major layout measured 0.80-1.02x: the
strided reads defeat the hardware prefetcher). Measured on 1536x8960 (the 1.5B's
ffn_down), 2 threads, weights from memory, in one process against the GGUF kernels
(``python perf/bench_simd_variants.py --formats LAYOUT --shape 1536x8960 --threads 2
--dram``): Q4_K -> Q4_KR 1.33x, 1.49x, 1.44x in three runs (before slabs 1.02-1.07x), Q6_K
-> Q6_KR 1.28x, 1.39x, 1.49x (before 0.92-0.95x), Q5_0 -> Q5_0R 1.43x (before 1.17x), Q8_0
-> Q8_0S 1.15x, Q4_1 -> Q4_1 in slabs 1.26x; on 8960x1536 (one slab) Q8_0S 0.99x. GEMM and dequant
run slab by slab too; a row of one slab is the row-major layout. Rows must be selected with
``formats.take_rows``.

Kernels follow ``gemv_basic``'s row-range contract (``gemv(w, x, out, r0, r1)``,
``gemm(w, X, out, r0, r1)``, ``dequant(w, out, r0, r1)``); ``w`` is the uint8
(rows, row_bytes) array of ``formats.view_as``. Every dot has a two-row form (``*_rows``: each
unit decoded once for two activation rows, each row the one-row dot's operations); the GEMMs
run it on pairs of rows, so a GEMM row has the bits of the GEMV on that row, slab by slab.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from flashlm.kernels import simd
from flashlm.kernels.config import intrinsic, jit, jit_exact
from flashlm.kernels.formats import (GGUF_OF, GROUPED, SLAB_COLS, STORE_LAYOUT, from_slabs, n_slabs, row_nbytes,
                                     slab_unit, to_slabs)
from flashlm.kernels.gemv_basic import (BASIC_KERNELS, DEQUANT_KERNELS, _block_sums, _block_sums_rows,
                                        _dequant_blocks_simd, _dot_plain, _f16_at, f16_to_f32)
from flashlm.kernels.gemv_kquant import _V as _KV
from flashlm.kernels.gemv_kquant import KQUANT_DEQUANT, KQUANT_KERNELS, _q6k_q, _q45k_q, _scale_min
from flashlm.kernels.simd import (_F32, _FLAGS, _I32, _V16F, _V16I32, HAVE_SIMD, _const_vec, _splat_f16,
                                  _data_ptr, _hsum, _load, _prefetch, _splat)

_G, _GB, _TB = GROUPED["Q5_0R"]  # blocks per group, bytes per group, bytes per tail block
_GW = 32 * _G  # weights per group
_n_slabs = jit(n_slabs)  # formats' slab rule, compiled
_TILE = simd.TILE
_SLAB_COLS = SLAB_COLS

# ---- packing (import time) and unpacking (reference, export) ----


@jit_exact
def _dword(src, r, o):  # little-endian uint32 at byte o of row r
    return (np.int64(src[r, o]) | (np.int64(src[r, o + 1]) << 8) | (np.int64(src[r, o + 2]) << 16)
            | (np.int64(src[r, o + 3]) << 24))


@jit_exact
def _pack_q5_0r(src, dst):
    rows = src.shape[0]
    nb = src.shape[1] // 22
    ng = nb // _G
    q = np.empty(_GW, np.int64)
    for r in range(rows):
        for g in range(ng):
            for bi in range(_G):
                o = 22 * (_G * g + bi)
                qh = (np.int64(src[r, o + 2]) | (np.int64(src[r, o + 3]) << 8)
                      | (np.int64(src[r, o + 4]) << 16) | (np.int64(src[r, o + 5]) << 24))
                for j in range(16):
                    b = np.int64(src[r, o + 6 + j])
                    q[32 * bi + j] = (b & 15) | (((qh >> j) & 1) << 4)
                    q[32 * bi + 16 + j] = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            go = _GB * g
            for j in range(16):
                v = np.int64(0)
                for k in range(6):
                    v |= q[16 * k + j] << (5 * k)
                for t in range(4):
                    dst[r, go + 4 * j + t] = (v >> (8 * t)) & 255
            for bi in range(_G):
                o = 22 * (_G * g + bi)
                dst[r, go + 64 + 2 * bi] = src[r, o]
                dst[r, go + 65 + 2 * bi] = src[r, o + 1]
        tail = 22 * _G * ng
        for i in range(22 * (nb - _G * ng)):
            dst[r, _GB * ng + i] = src[r, tail + i]


@jit_exact
def _unpack_q5_0r(src, dst):
    rows = src.shape[0]
    nb = dst.shape[1] // 22
    ng = nb // _G
    for r in range(rows):
        for g in range(ng):
            go = _GB * g
            for bi in range(_G):
                o = 22 * (_G * g + bi)
                dst[r, o] = src[r, go + 64 + 2 * bi]
                dst[r, o + 1] = src[r, go + 65 + 2 * bi]
                qh = np.int64(0)
                for j in range(16):
                    qs = np.int64(0)
                    for half in range(2):
                        k, jj = 2 * bi + half, j + 16 * half
                        lane = 4 * j
                        q = (_dword(src, r, go + lane) >> (5 * k)) & 31
                        qs |= (q & 15) << (4 * half)
                        qh |= (q >> 4) << jj
                    dst[r, o + 6 + j] = qs
                for t in range(4):
                    dst[r, o + 2 + t] = (qh >> (8 * t)) & 255
        tail = 22 * _G * ng
        for i in range(22 * (nb - _G * ng)):
            dst[r, tail + i] = src[r, _GB * ng + i]


def _rows2d(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data.reshape(-1, data.shape[-1]))


def _convert(kernel, fmt: str, data: np.ndarray, shape: tuple[int, ...], src_fmt: str) -> np.ndarray:
    """``kernel(src rows, dst rows)`` into a fresh uint8 array of ``fmt`` rows; the rows of a
    slabbed layout (formats.SLABBED) are read from / written in slab order."""
    src = from_slabs(src_fmt, _rows2d(np.asarray(data, np.uint8)), shape[-1])
    out = np.empty((src.shape[0], row_nbytes(fmt, shape[-1])), np.uint8)
    kernel(np.ascontiguousarray(src), out)
    out = to_slabs(fmt, out, shape[-1])
    return out.reshape(tuple(shape[:-1]) + (out.shape[1],))


def pack(fmt: str, data: np.ndarray, shape: tuple[int, ...]) -> tuple[str, np.ndarray]:
    """A tensor's GGUF bytes (``formats.view_as`` array) -> (store format, store array).
    Formats without a store layout come back unchanged."""
    if fmt not in STORE_LAYOUT:
        return fmt, data
    store = STORE_LAYOUT[fmt]
    return store, _convert(_CONVERTERS[store][0], store, data, shape, fmt)


def unpack(fmt: str, data: np.ndarray, shape: tuple[int, ...]) -> tuple[str, np.ndarray]:
    """The inverse of :func:`pack`: (GGUF format, its block bytes), bit for bit."""
    if fmt not in GGUF_OF:
        return fmt, data
    return GGUF_OF[fmt], _convert(_CONVERTERS[fmt][1], GGUF_OF[fmt], data, shape, fmt)


# ---- SIMD: one group of 96 weights per step ----

_TABLE = [float(i - 16) for i in range(32)]


def _quants(b: ir.IRBuilder, q: ir.Value, k: int) -> ir.Value:
    """<16 x float> q - 16 of field k of the 16 lanes ``q``."""
    idx = q if k == 0 else b.lshr(q, _const_vec(_V16I32, 5 * k))
    if simd.HAVE_AVX512:  # 32-entry table (module flag read at code generation: tests flip it): vpermi2ps reads the low 5 bits of each index
        fnty = ir.FunctionType(_V16F, [_V16F, _V16I32, _V16F])
        fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.x86.avx512.vpermi2var.ps.512")
        lo, hi = (ir.Constant(_V16F, [ir.Constant(_F32, v) for v in part]) for part in (_TABLE[:16], _TABLE[16:]))
        return b.call(fn, [lo, idx, hi])
    f = b.sitofp(b.and_(idx, _const_vec(_V16I32, 31)), _V16F)
    return b.fsub(f, ir.Constant(_V16F, [ir.Constant(_F32, 16.0)] * 16))


def _scales(b: ir.IRBuilder, p: ir.Value) -> ir.Value:
    """<4 x float>, lanes 1-3 the group's 3 half scales: one 8-byte load of bytes 62..69 (lane
    0 is the last two quant bytes, unused), which stays inside the group, and one convert.
    (Building the vector from the 6 bytes at 64 cost 10 vector ops a group where this costs
    2: 1.07-1.17x per core, 1.07-1.09x at 2 threads from memory, in one process.)"""
    return b.fpext(_load(b, p, 62, ir.VectorType(ir.HalfType(), 4)), ir.VectorType(_F32, 4))


def _q5_0r_body(b, wp, xps, ng, nt):
    """[float32 per row]: the ``ng`` groups and then the ``nt`` GGUF Q5_0 blocks of the row at i8*
    ``wp`` dotted with each activation row (i8* ``xps[t]``); one 16-lane accumulator for both (the
    tail in it rather than in a second dot with its own reduction: 1.03x on 896-wide rows, one
    core and 2 threads from memory), the block scale as one FMA per 32 weights. Each group is
    decoded once; every row gets the one-row dot's operations in the same order."""
    nr = len(xps)
    acc = [cgutils.alloca_once_value(b, ir.Constant(_V16F, [0.0] * 16)) for _ in range(nr)]
    with cgutils.for_range(b, ng) as loop:
        g = loop.index
        p = b.gep(wp, [b.mul(g, g.type(_GB))])
        _prefetch(b, p, simd.PREFETCH, _GB)
        q = _load(b, p, 0, _V16I32)
        xbs = [b.gep(xp, [b.mul(g, g.type(4 * _GW))]) for xp in xps]
        d = _scales(b, p)
        a = [b.load(c) for c in acc]
        for bi in range(_G):
            fs = [_quants(b, q, k) for k in (2 * bi, 2 * bi + 1)]
            ds = b.shuffle_vector(d, d, ir.Constant(ir.VectorType(_I32, 16), [bi + 1] * 16))
            for r in range(nr):
                t = None
                for f, k in zip(fs, (2 * bi, 2 * bi + 1)):
                    pr = b.fmul(f, _load(b, xbs[r], 64 * k, _V16F), flags=_FLAGS)
                    t = pr if t is None else b.fadd(t, pr, flags=_FLAGS)
                a[r] = b.fadd(a[r], b.fmul(t, ds, flags=_FLAGS), flags=_FLAGS)
        for c, v in zip(acc, a):
            b.store(v, c)
    tps = b.gep(wp, [b.mul(ng, ng.type(_GB))])
    txs = [b.gep(xp, [b.mul(ng, ng.type(4 * _GW))]) for xp in xps]
    with cgutils.for_range(b, nt) as loop:
        i = loop.index
        p = b.gep(tps, [b.mul(i, i.type(_TB))])
        dh, _, qs, kind = simd._parts_q5_0(b, p)
        f = simd._to_floats(b, qs, kind, 16)
        ds = _splat_f16(b, dh, _V16F)
        for r in range(nr):
            xb = b.gep(txs[r], [b.mul(i, i.type(4 * 32))])
            t = b.fmul(f[0], _load(b, xb, 0, _V16F), flags=_FLAGS)
            t = b.fadd(t, b.fmul(f[1], _load(b, xb, 64, _V16F), flags=_FLAGS), flags=_FLAGS)
            b.store(b.fadd(b.load(acc[r]), b.fmul(t, ds, flags=_FLAGS), flags=_FLAGS), acc[r])
    return [_hsum(b, b.load(c)) for c in acc]


@intrinsic
def dot_q5_0r(typingctx, w, woff, x, xoff, ngroups, ntail):
    """float32: the ``ngroups`` groups and then the ``ntail`` GGUF Q5_0 blocks of the row at
    byte ``woff`` of ``w`` dotted with x[xoff:] (``_q5_0r_body``)."""

    def gen(context, b, sig, args):
        w, woff, x, xoff, ng, nt = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        xp = b.gep(_data_ptr(context, b, sig.args[2], x), [b.mul(xoff, xoff.type(4))])
        return _q5_0r_body(b, wp, [xp], ng, nt)[0]

    return types.float32(w, types.intp, x, types.intp, types.intp, types.intp), gen


def _make_dot_q5_0r_rows(nr: int):
    """Intrinsic ``(w, woff, X, xoff, i0, ngroups, ntail, out, col)``: out[i0 + t, col] = ``dot_q5_0r``
    with X[i0 + t, xoff:], t < nr, each group decoded once."""

    @intrinsic
    def dot_rows(typingctx, w, woff, X, xoff, i0, ngroups, ntail, out, col):
        def gen(context, b, sig, args):
            w, woff, X, xoff, i0, ng, nt, out, col = args
            wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
            res = _q5_0r_body(b, wp, simd._row_ptrs(context, b, sig.args[2], X, i0, nr, xoff), ng, nt)
            simd._store_rows(context, b, sig.args[7], out, i0, col, res)
            return context.get_dummy_value()

        return types.void(w, types.intp, X, types.intp, types.intp, types.intp, types.intp, out, types.intp), gen

    return dot_rows


_q5_0r_rows = _make_dot_q5_0r_rows(simd.ROWS)


@intrinsic
def decode_q5_0r(typingctx, w, woff, ngroups, dst, doff):
    """The first ``ngroups`` groups of the row at byte ``woff`` -> float32 dst[doff:],
    each weight exactly d * (q - 16) as gguf computes it (no FMA)."""

    def gen(context, b, sig, args):
        w, woff, ng, dst, doff = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        dp = b.gep(_data_ptr(context, b, sig.args[3], dst), [b.mul(doff, doff.type(4))])
        with cgutils.for_range(b, ng) as loop:
            g = loop.index
            p = b.gep(wp, [b.mul(g, g.type(_GB))])
            q = _load(b, p, 0, _V16I32)
            d = _scales(b, p)
            out = b.gep(dp, [b.mul(g, g.type(4 * _GW))])
            for k in range(2 * _G):
                ds = _splat(b, b.extract_element(d, _I32(k // 2 + 1)), _V16F)
                v = b.fmul(ds, _quants(b, q, k))
                b.store(v, b.bitcast(b.gep(out, [ir.Constant(ir.IntType(64), 64 * k)]), _V16F.as_pointer()),
                        align=1)
        return context.get_dummy_value()

    return types.void(w, types.intp, types.intp, dst, types.intp), gen


@jit_exact(inline="always")
def _gemv_simd(dot, w, x, out, r0, r1):
    """One ``dot`` (a jitted ``dot_q5_0r``) per row: its groups and its 0-2 tail blocks."""
    nb = x.shape[0] // 32
    ng = nb // _G
    rb = w.strides[0]
    for r in range(r0, r1):
        out[r] = dot(w, r * rb, x, 0, ng, nb - _G * ng)


@jit_exact
def _dot(w, o, x, xo, ng, nt):
    return dot_q5_0r(w, o, x, xo, ng, nt)


@jit_exact
def gemv_q5_0r_simd(w, x, out, r0, r1):
    nb = x.shape[0] // 32
    ng = nb // _G
    rb = w.strides[0]
    for r in range(r0, r1):
        out[r] = dot_q5_0r(w, r * rb, x, 0, ng, nb - _G * ng)


@jit_exact
def gemm_q5_0r_simd(w, X, out, r0, r1):
    """The two-row dot on each pair of activation rows (an odd last row: the GEMV's dot), over
    simd.TILE weight rows at a time; every out[i] has the bits of the GEMV on X[i]."""
    n, cols = X.shape
    nb = cols // 32
    ng = nb // _G
    nt = nb - _G * ng
    rb = w.strides[0]
    for ra in range(r0, r1, _TILE):
        rz = min(r1, ra + _TILE)
        for i in range(0, n - 1, 2):
            for r in range(ra, rz):
                _q5_0r_rows(w, r * rb, X, 0, i, ng, nt, out, r)
        if n % 2:
            for r in range(ra, rz):
                out[n - 1, r] = dot_q5_0r(w, r * rb, X[n - 1], 0, ng, nt)


@jit_exact
def _decode_row_simd(w, off, nb, dst, doff):
    ng = nb // _G
    decode_q5_0r(w, off, ng, dst, doff)
    if _G * ng < nb:
        simd.decode_q5_0(w, off + _GB * ng, nb - _G * ng, dst, doff + _GW * ng)


@jit_exact
def dequant_q5_0r_simd(w, out, r0, r1):
    _dequant_blocks_simd(_decode_row_simd, w, out, r0, r1)


# ---- plain Numba (no AVX2/FMA/F16C): one row decoded exactly, then dotted ----


@jit_exact
def _decode_row_plain(w, r, dst):
    cols = dst.shape[0]
    nb = cols // 32
    ng = nb // _G
    for g in range(ng):
        go = _GB * g
        for k in range(2 * _G):
            d = _f16_at(w, r, go + 64 + 2 * (k // 2))
            for j in range(16):
                o = go + 4 * j
                dst[_GW * g + 16 * k + j] = d * np.float32(((_dword(w, r, o) >> (5 * k)) & 31) - 16)
    for bi in range(nb - _G * ng):
        o = _GB * ng + 22 * bi
        d = f16_to_f32(np.int64(w[r, o]) | (np.int64(w[r, o + 1]) << 8))
        qh = (np.int64(w[r, o + 2]) | (np.int64(w[r, o + 3]) << 8) | (np.int64(w[r, o + 4]) << 16)
              | (np.int64(w[r, o + 5]) << 24))
        base = _GW * ng + 32 * bi
        for j in range(16):
            b = np.int64(w[r, o + 6 + j])
            lo = (b & 15) | (((qh >> j) & 1) << 4)
            hi = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[base + j] = d * np.float32(np.int64(lo) - 16)
            dst[base + 16 + j] = d * np.float32(np.int64(hi) - 16)


@jit_exact(inline="always")
def _gemm_plain(dec, w, X, out, r0, r1):
    """Each weight row decoded once, exactly, then dotted with every row of X (gemv_basic's
    ``_dot_plain``, no fast-math): row i of the result has the bits of the GEMV on X[i]."""
    n, cols = X.shape
    row = np.empty(cols, np.float32)
    for r in range(r0, r1):
        dec(w, r, row)
        for i in range(n):
            out[i, r] = _dot_plain(row, X, i)


@jit_exact(inline="always")
def _gemv_plain(dec, w, x, out, r0, r1):
    _gemm_plain(dec, w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])), r0, r1)


@jit_exact(inline="always")
def _dequant_plain(dec, w, out, r0, r1):
    for r in range(r0, r1):
        dec(w, r, out[r])


@jit_exact
def gemv_q5_0r_plain(w, x, out, r0, r1):
    _gemv_plain(_decode_row_plain, w, x, out, r0, r1)


@jit_exact
def gemm_q5_0r_plain(w, X, out, r0, r1):
    _gemm_plain(_decode_row_plain, w, X, out, r0, r1)


@jit_exact
def dequant_q5_0r_plain(w, out, r0, r1):
    _dequant_plain(_decode_row_plain, w, out, r0, r1)


# ---- Q6_KR: Q6_K with each sub-block's 16 quants in one lane ----
#
# Q6_K (weight = d * sc[j] * (q - 32), q 6 bits, j = the 16-weight sub-block, sc int8)
# keeps its 210-byte super-blocks of 256 weights; only the 192 quant bytes move:
#
#     bytes 0..191    3 x 16 little-endian uint32: dword m of lane j (bytes 64m + 4j) holds
#                     quant k = 5m + i of sub-block j (weight 16j + k) at bits 6i..6i+5
#                     (i = 0..4) and bits 2m..2m+1 of quant 15 at bits 30..31
#     bytes 192..209  the 16 int8 sub-block scales and d (half), as in GGUF Q6_K
#
# Lane j is sub-block j, so the scales are one per-lane vector per super-block, and step
# k of the GEMV (16 weights: weight k of every sub-block) is ``dword & (63 << 6i)`` +
# convert + FMA, with no shift: the field's place value 2^6i is divided out of x instead,
# once per call (``_prep_x``: x reordered to the lane order and scaled by 2^-6i, exact,
# plus -32 times each sub-block's sum of x, which starts the sum so the -32 costs nothing
# per weight). Quant 15 takes 3 shifts and 2 bit-selects. GGUF Q6_K needs per 32 weights
# two nibble masks, a shift and an or for the 2 high bits, the -32, a byte -> dword widen,
# a convert and a per-sub-block scale broadcast.
# Measured on the 2-core Zen 4, both kernels in one process (``python
# perf/bench_simd_variants.py --formats Q6_KR --shape ROWSxCOLS [--threads 2 --dram]``), G
# weights/s Q6_K -> Q6_KR: 512x1536 one core in L2 13.3 -> 21.6 (1.62x); at 2 threads from
# memory 8960x1536 22.9 -> 30.2 (1.32x; another run 28.0 -> 29.3, 1.05x), 151936x1536
# 16.0 -> 24.6 (1.53x; another run 1.13x), 256x1536 9.8 -> 11.6 (1.19x), 1536x8960 0.92-0.95x
# before column slabs (the 38 KB of prepared x per row do not stay in L1), 1.28-1.39x with
# them (see the module docstring). The partial sums must stay apart: with reassociation allowed LLVM folded them
# into one chain of 16 dependent FMAs per super-block (1.16x instead of 1.6x in L2).
# Tried and dropped: two rows per step sharing x (0.79-0.98x from memory); column tiles
# of 8-24 super-blocks with the next row's tile prefetched (0.80-1.02x on 1536x8960).

_QKK, _BB6, _XPK = 256, 210, 272  # K-quant weights, Q6_K bytes per super-block; prepared x floats per super-block (Q4_KR too)
_CHAINS = 4  # independent partial sums per super-block (one FMA chain would be latency-bound)
_XSCALE6 = np.array([2.0 ** (-6 * (k % 5)) if k < 15 else 1.0 for k in range(16)], np.float32)


@jit_exact
def _q6kr_quant(src, r, o, i):
    """Quant (0..63) of weight i of the Q6_KR super-block at byte o of row r."""
    j, k = i // 16, i % 16
    if k < 15:
        return (_dword(src, r, o + 64 * (k // 5) + 4 * j) >> (6 * (k % 5))) & 63
    q = np.int64(0)
    for m in range(3):
        q |= (_dword(src, r, o + 64 * m + 4 * j) >> 30) << (2 * m)
    return q


@jit_exact
def _pack_q6_kr(src, dst):
    lanes = np.empty(48, np.int64)
    for r in range(src.shape[0]):
        for b in range(src.shape[1] // _BB6):
            o = _BB6 * b
            lanes[:] = 0
            for i in range(_QKK):
                q = np.int64(_q6k_q(src, r, o, i // 16, i % 16)) + 32  # GGUF's quant, 0..63
                j, k = i // 16, i % 16
                if k < 15:
                    lanes[16 * (k // 5) + j] |= q << (6 * (k % 5))
                else:
                    for m in range(3):
                        lanes[16 * m + j] |= ((q >> (2 * m)) & 3) << 30
            for t in range(48):
                for u in range(4):
                    dst[r, o + 4 * t + u] = (lanes[t] >> (8 * u)) & 255
            for u in range(192, _BB6):
                dst[r, o + u] = src[r, o + u]


@jit_exact
def _unpack_q6_kr(src, dst):
    for r in range(src.shape[0]):
        for b in range(src.shape[1] // _BB6):
            o = _BB6 * b
            for u in range(192):
                dst[r, o + u] = 0
            for i in range(_QKK):
                q = _q6kr_quant(src, r, o, i)
                h, c, l = i // 128, (i % 128) // 32, i % 32
                ql = o + 64 * h + l + 32 * (c & 1)
                dst[r, ql] = dst[r, ql] | ((q & 15) << (4 * (c >> 1)))
                qh = o + 128 + 32 * h + l
                dst[r, qh] = dst[r, qh] | ((q >> 4) << (2 * c))
            for u in range(192, _BB6):
                dst[r, o + u] = src[r, o + u]


def _q6_field(b: ir.IRBuilder, dw: list, k: int, place: bool) -> ir.Value:
    """<16 x float> quant k of the 16 lanes: with ``place`` still times 2^6i (k < 15),
    else the quant itself."""
    if k < 15:
        d, i = dw[k // 5], k % 5
        if not place and i:
            d = b.lshr(d, _const_vec(_V16I32, 6 * i))
        return b.sitofp(b.and_(d, _const_vec(_V16I32, 63 << (6 * i) if place else 63)), _V16F)
    u, v, w = (b.lshr(dw[m], _const_vec(_V16I32, 30 - 2 * m)) for m in range(3))  # bits 0-1, 2-3, 4-5
    r = b.or_(b.and_(v, _const_vec(_V16I32, 12)), b.and_(w, _const_vec(_V16I32, -13)))
    return b.sitofp(b.or_(u, b.and_(r, _const_vec(_V16I32, -4))), _V16F)


def _q6_block(b: ir.IRBuilder, p: ir.Value) -> tuple[list, ir.Value]:
    """The 3 dword vectors and the <16 x float> d * sc[j] of the super-block at i8* p
    (computed as gguf does: d * float(sc))."""
    dw = [_load(b, p, 64 * m, _V16I32) for m in range(3)]
    sc = b.sitofp(_load(b, p, 192, ir.VectorType(ir.IntType(8), 16)), _V16F)
    d = b.fpext(_load(b, p, 208, ir.HalfType()), _F32)
    return dw, b.fmul(_splat(b, d, _V16F), sc)


def _lanes_body(unit_bytes: int, xp_floats: int, unit, field, fields: int, lead: int | None = None,
                min_at: int | None = None):
    """``body(b, wp, xps, n) -> [float32 per row]``: the first n units of the row at i8* ``wp``
    (``unit(b, p)`` -> dword vectors, per-lane scale [and min] vectors; ``field(b, dw, k, True)``
    the quants of field k with their place value) dotted with each row's prepared x (i8*
    ``xps[t]``, ``xp_floats`` per unit: the fields' x, then at ``lead`` a vector that starts the
    first partial sum (Q6_KR's -32 * sub-block sums) or at ``min_at`` the lane sums of the min
    term). Mask + convert + FMA per field, ``_CHAINS`` partial sums kept apart (no reassociation:
    LLVM would fold them into one chain). Each unit is decoded once; every row then gets the
    one-row dot's operations in the same order, so each result has the GEMV's bits."""

    def body(b, wp, xps, n):
        nr = len(xps)
        acc = [cgutils.alloca_once_value(b, ir.Constant(_V16F, [0.0] * 16)) for _ in range(nr)]
        contract = ("contract",)
        with cgutils.for_range(b, n) as loop:
            g = loop.index
            p = b.gep(wp, [b.mul(g, g.type(unit_bytes))])
            _prefetch(b, p, simd.PREFETCH, unit_bytes)
            xbs = [b.gep(xp, [b.mul(g, g.type(4 * xp_floats))]) for xp in xps]
            dec = unit(b, p)
            dw, sv = dec[0], dec[1]
            ts = [[None if lead is None else _load(b, xb, 4 * lead, _V16F)] + [None] * (_CHAINS - 1) for xb in xbs]
            for k in range(fields):
                f = field(b, dw, k, True)
                for r in range(nr):
                    pr = b.fmul(f, _load(b, xbs[r], 64 * k, _V16F), flags=contract)
                    t = ts[r][k % _CHAINS]
                    ts[r][k % _CHAINS] = pr if t is None else b.fadd(t, pr, flags=contract)
            for r in range(nr):
                tt = ts[r]
                while len(tt) > 1:
                    tt = [b.fadd(tt[i], tt[i + 1], flags=contract) for i in range(0, len(tt), 2)]
                a = b.fadd(b.load(acc[r]), b.fmul(tt[0], sv, flags=_FLAGS), flags=_FLAGS)
                if min_at is not None:  # min term
                    a = b.fadd(a, b.fmul(dec[2], _load(b, xbs[r], 4 * min_at, _V16F), flags=_FLAGS), flags=_FLAGS)
                b.store(a, acc[r])
        return [_hsum(b, b.load(c)) for c in acc]

    return body


def _make_lanes_dot(body):
    """Intrinsic ``dot(w, woff, xp, n) -> float32``: ``body`` on the row at byte ``woff`` of ``w``
    and the prepared x ``xp``."""

    @intrinsic
    def dot(typingctx, w, woff, xp, n):
        def gen(context, b, sig, args):
            w, woff, xp, n = args
            wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
            return body(b, wp, [_data_ptr(context, b, sig.args[2], xp)], n)[0]

        return types.float32(w, types.intp, xp, types.intp), gen

    return dot


def _make_lanes_rows(body, nr: int):
    """Intrinsic ``dot_rows(w, woff, XP, i0, n, out, col)``: out[i0 + t, col] = ``body`` with the
    prepared x XP[i0 + t] (2-D), t < nr."""

    @intrinsic
    def dot_rows(typingctx, w, woff, XP, i0, n, out, col):
        def gen(context, b, sig, args):
            w, woff, XP, i0, n, out, col = args
            wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
            res = body(b, wp, simd._row_ptrs(context, b, sig.args[2], XP, i0, nr), n)
            simd._store_rows(context, b, sig.args[5], out, i0, col, res)
            return context.get_dummy_value()

        return types.void(w, types.intp, XP, types.intp, types.intp, out, types.intp), gen

    return dot_rows


def _lanes_dots(body) -> tuple:
    """(one-row dot, two-row dot) intrinsics of a ``_lanes_body``."""
    return _make_lanes_dot(body), _make_lanes_rows(body, simd.ROWS)


# float32: the ``nb`` super-blocks of the row at byte ``woff`` of ``w`` dotted with the prepared x
# (``_prep_x``), and the same on two rows of prepared x
dot_q6_kr, _q6_kr_rows = _lanes_dots(_lanes_body(_BB6, _XPK, _q6_block, _q6_field, 16, lead=_QKK))


def _transpose16(b: ir.IRBuilder, m: list) -> list:
    """16 <16 x float> rows -> their transpose: at each scale s = 8, 4, 2, 1 the off-diagonal
    s x s blocks of every 2s x 2s block swap (64 two-source shuffles)."""
    s = 8
    while s:
        new = list(m)
        for k in range(16):
            if k & s:
                continue
            lo = [j if not j & s else 16 + j - s for j in range(16)]
            hi = [j + s if not j & s else 16 + j for j in range(16)]
            new[k] = b.shuffle_vector(m[k], m[k + s], _const_vec(_V16I32, lo))
            new[k + s] = b.shuffle_vector(m[k], m[k + s], _const_vec(_V16I32, hi))
        m, s = new, s // 2
    return m


@intrinsic
def decode_q6_kr(typingctx, w, woff, nb, dst, doff):
    """The ``nb`` super-blocks of the row at byte ``woff`` -> float32 dst[doff:] in
    weight order, each weight exactly (d * sc) * (q - 32) as gguf computes it (no FMA)."""

    def gen(context, b, sig, args):
        w, woff, nb, dst, doff = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        dp = b.gep(_data_ptr(context, b, sig.args[3], dst), [b.mul(doff, doff.type(4))])
        c32 = ir.Constant(_V16F, [32.0] * 16)
        with cgutils.for_range(b, nb) as loop:
            g = loop.index
            p = b.gep(wp, [b.mul(g, g.type(_BB6))])
            dw, sv = _q6_block(b, p)
            vals = [b.fmul(sv, b.fsub(_q6_field(b, dw, k, False), c32)) for k in range(16)]  # lane j: weight 16j + k
            out = b.gep(dp, [b.mul(g, g.type(4 * _QKK))])
            for j, v in enumerate(_transpose16(b, vals)):
                b.store(v, b.bitcast(b.gep(out, [ir.Constant(ir.IntType(64), 64 * j)]), _V16F.as_pointer()),
                        align=1)
        return context.get_dummy_value()

    return types.void(w, types.intp, types.intp, dst, types.intp), gen


def _make_prep_x(xscale: np.ndarray, sum_factor: float):
    """Intrinsic ``prep(x, xp, nb)``: x (nb * 256,) -> xp (nb * 272,), per super-block
    x[16j + k] * xscale[k] at 16k + j (lane j holds the 16 weights 16j..16j + 15), then
    sum_factor * sum(x[16j:16j + 16]) at 256 + j."""

    @intrinsic
    def prep(typingctx, x, xp, nb):
        def gen(context, b, sig, args):
            xq, pq = (_data_ptr(context, b, sig.args[i], args[i]) for i in range(2))
            with cgutils.for_range(b, args[2]) as loop:
                g = loop.index
                src = b.gep(xq, [b.mul(g, g.type(4 * _QKK))])
                dst = b.gep(pq, [b.mul(g, g.type(4 * _XPK))])
                cols = _transpose16(b, [_load(b, src, 64 * j, _V16F) for j in range(16)])  # cols[k][j] = x[16j + k]
                total = None
                for k, v in enumerate(cols):
                    total = v if total is None else b.fadd(total, v)
                    scaled = b.fmul(v, _splat(b, ir.Constant(_F32, float(xscale[k])), _V16F))
                    b.store(scaled, b.bitcast(b.gep(dst, [ir.Constant(ir.IntType(64), 64 * k)]),
                                              _V16F.as_pointer()), align=1)
                b.store(b.fmul(total, ir.Constant(_V16F, [sum_factor] * 16)),
                        b.bitcast(b.gep(dst, [ir.Constant(ir.IntType(64), 4 * _QKK)]), _V16F.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.void(x, xp, types.intp), gen

    return prep


_prep_x = _make_prep_x(_XSCALE6, -32.0)


def _superblock_kernels(prep, dots, decode_row) -> tuple:
    """(gemv, gemm, dequant) on row-major rows of a super-block layout from its x preparation
    (intrinsic ``prep(x, xp, nb)``), its (one-row, two-row) dots (``_lanes_dots``, called inline)
    and row decoder (``decode_row(w, off, n32, dst, doff)``, counting 32-weight units as
    gemv_basic's dequant driver does). The GEMV prepares x once per call, then one dot per row;
    the GEMM prepares each row of X the same way, then runs the two-row dot on each pair of rows
    (an odd last row: the GEMV's dot) over simd.TILE weight rows at a time, each super-block
    decoded once for both: out[i] has the bits of the GEMV on X[i]."""
    d1, d2 = dots

    @jit_exact
    def gemv(w, x, out, r0, r1):
        nb = x.shape[0] // _QKK
        xp = np.empty(nb * _XPK, np.float32)
        prep(x, xp, nb)
        rb = w.strides[0]
        for r in range(r0, r1):
            out[r] = d1(w, r * rb, xp, nb)

    @jit_exact
    def gemm(w, X, out, r0, r1):
        n, cols = X.shape
        nb = cols // _QKK
        XP = np.empty((n, nb * _XPK), np.float32)
        for i in range(n):
            prep(X[i], XP[i], nb)
        rb = w.strides[0]
        for ra in range(r0, r1, _TILE):
            rz = min(r1, ra + _TILE)
            for i in range(0, n - 1, 2):
                for r in range(ra, rz):
                    d2(w, r * rb, XP, i, nb, out, r)
            if n % 2:
                for r in range(ra, rz):
                    out[n - 1, r] = d1(w, r * rb, XP[n - 1], nb)

    @jit_exact
    def dequant(w, out, r0, r1):
        _dequant_blocks_simd(decode_row, w, out, r0, r1)

    return gemv, gemm, dequant


@jit_exact
def _decode_row_q6_kr_simd(w, off, n32, dst, doff):
    decode_q6_kr(w, off, n32 // 8, dst, doff)


gemv_q6_kr_simd, gemm_q6_kr_simd, dequant_q6_kr_simd = _superblock_kernels(
    _prep_x, (dot_q6_kr, _q6_kr_rows), _decode_row_q6_kr_simd)


@jit_exact
def _block_q6_kr_plain(w, r, o, dst, i0):
    d = _f16_at(w, r, o + 208)
    for j in range(16):
        dsc = d * np.float32(np.int8(w[r, o + 192 + j]))
        for k in range(16):
            dst[i0 + 16 * j + k] = dsc * np.float32(_q6kr_quant(w, r, o, 16 * j + k) - 32)


@jit_exact
def _decode_row_q6_kr_plain(w, r, dst):
    for b in range(dst.shape[0] // _QKK):
        _block_q6_kr_plain(w, r, _BB6 * b, dst, _QKK * b)


@jit_exact
def gemv_q6_kr_plain(w, x, out, r0, r1):
    _gemv_plain(_decode_row_q6_kr_plain, w, x, out, r0, r1)


@jit_exact
def gemm_q6_kr_plain(w, X, out, r0, r1):
    _gemm_plain(_decode_row_q6_kr_plain, w, X, out, r0, r1)


@jit_exact
def dequant_q6_kr_plain(w, out, r0, r1):
    _dequant_plain(_decode_row_q6_kr_plain, w, out, r0, r1)


# ---- Q4_KR: Q4_K with each half sub-block's 16 quants in one lane ----
#
# Q4_K (weight = d * sc[j] * q - dmin * m[j], q 4 bits, j = the 32-weight sub-block,
# sc and m 6 bits) keeps its 144-byte super-blocks of 256 weights; only the 128 quant
# bytes move:
#
#     bytes 0..15     d, dmin (half) and the 12 bytes of packed scales and mins, as GGUF
#     bytes 16..143   2 x 16 little-endian uint32: dword m of lane j (bytes 16 + 64m + 4j)
#                     holds quant 8m + i of half sub-block j (weight 16j + 8m + i) at
#                     bits 4i..4i+3 (i = 0..7)
#
# Lane j is half sub-block j, so d * sc and dmin * m are one per-lane vector each per
# super-block (sub-block j // 2), the min term is one FMA against the prepared half
# sub-block sums of x, and step k of the GEMV is ``dword & (15 << 4i)`` + convert + FMA
# with the place value divided out of x once per call, as for Q6_KR (i = 7: a shift
# instead of the mask, the sign bit). GGUF Q4_K's 16-weight vectors span two sub-blocks
# in a fixed order, so the scales and mins had to be shuffled to each of them.
# Measured on the 2-core Zen 4, both kernels in one process (``python
# perf/bench_simd_variants.py --formats Q4_KR --shape ROWSxCOLS [--threads 2 --dram]``), G
# weights/s Q4_K (its AVX-512 permuted-x kernel) -> Q4_KR: 512x1536 one core in L2 17.9 ->
# 21.6 (1.20x); at 2 threads from memory 8960x1536 31.4 -> 36.0 (1.15x; another run 1.17x),
# 151936x1536 35.9 -> 41.3 (1.15x), 1536x8960 1.02-1.07x before column slabs, 1.33-1.49x
# with them.
# Tried and dropped (in L2, one core): the nibble as a shift + 16-entry table lookup instead
# of mask + convert (0.95x), the same with fields 0, 2, 4, 6 read by loads 0-3 bytes apart so
# that only the odd ones need a shift (0.94-0.97x), two partial sums instead of four (1.0x).
# The 12 bytes of packed scales decode in ~10 ops per super-block as they are (LLVM uses
# vpermw + gf2p8affine), so they stay in GGUF's packing.

_BB4 = 144
_XSCALE4 = np.array([2.0 ** (-4 * (k % 8)) if k % 8 < 7 else 1.0 for k in range(16)], np.float32)


@jit_exact
def _q4kr_quant(src, r, o, i):
    """Quant (0..15) of weight i of the Q4_KR super-block at byte o of row r."""
    j, k = i // 16, i % 16
    return (_dword(src, r, o + 16 + 64 * (k // 8) + 4 * j) >> (4 * (k % 8))) & 15


@jit_exact
def _pack_q4_kr(src, dst):
    lanes = np.empty(32, np.int64)
    for r in range(src.shape[0]):
        for b in range(src.shape[1] // _BB4):
            o = _BB4 * b
            lanes[:] = 0
            for i in range(_QKK):
                q = np.int64(_q45k_q(src, r, o, i // 32, i % 32, False))
                j, k = i // 16, i % 16
                lanes[16 * (k // 8) + j] |= q << (4 * (k % 8))
            for u in range(16):
                dst[r, o + u] = src[r, o + u]
            for t in range(32):
                for u in range(4):
                    dst[r, o + 16 + 4 * t + u] = (lanes[t] >> (8 * u)) & 255


@jit_exact
def _unpack_q4_kr(src, dst):
    for r in range(src.shape[0]):
        for b in range(src.shape[1] // _BB4):
            o = _BB4 * b
            for u in range(16):
                dst[r, o + u] = src[r, o + u]
            for u in range(16, _BB4):
                dst[r, o + u] = 0
            for i in range(_QKK):
                j, l = i // 32, i % 32
                qs = o + 16 + 32 * (j // 2) + l
                dst[r, qs] = dst[r, qs] | (_q4kr_quant(src, r, o, i) << (4 * (j % 2)))


def _q4_field(b: ir.IRBuilder, dw: list, k: int, place: bool) -> ir.Value:
    """<16 x float> quant k of the 16 lanes: with ``place`` still times 2^4i (i = k % 8 < 7),
    else the quant itself."""
    d, i = dw[k // 8], k % 8
    if i == 7:
        return b.sitofp(b.lshr(d, _const_vec(_V16I32, 28)), _V16F)
    if not place and i:
        d = b.lshr(d, _const_vec(_V16I32, 4 * i))
    return b.sitofp(b.and_(d, _const_vec(_V16I32, 15 << (4 * i) if place else 15)), _V16F)


def _q4_block(b: ir.IRBuilder, p: ir.Value) -> tuple[list, ir.Value, ir.Value]:
    """The 2 dword vectors, <16 x float> d * sc[j // 2] and dmin * m[j // 2] of the
    super-block at i8* p (as gguf computes them)."""
    dw = [_load(b, p, 16 + 64 * m, _V16I32) for m in range(2)]
    scm = _KV(b).kscales(p)  # d * sc[0..7], dmin * m[0..7]
    per_lane = [ir.Constant(ir.VectorType(_I32, 16), [off + j // 2 for j in range(16)]) for off in (0, 8)]
    return dw, *(b.shuffle_vector(scm, ir.Constant(_V16F, ir.Undefined), idx) for idx in per_lane)


# float32: the ``nb`` super-blocks of the row at byte ``woff`` dotted with the prepared x (``_prep_x4``);
# the min term adds dmin * m * (-sum(x)). And the same on two rows of prepared x.
dot_q4_kr, _q4_kr_rows = _lanes_dots(_lanes_body(_BB4, _XPK, _q4_block, _q4_field, 16, min_at=_QKK))


@intrinsic
def decode_q4_kr(typingctx, w, woff, nb, dst, doff):
    """The ``nb`` super-blocks of the row at byte ``woff`` -> float32 dst[doff:] in
    weight order, each weight exactly (d * sc) * q - dmin * m as gguf computes it (no FMA)."""

    def gen(context, b, sig, args):
        w, woff, nb, dst, doff = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        dp = b.gep(_data_ptr(context, b, sig.args[3], dst), [b.mul(doff, doff.type(4))])
        with cgutils.for_range(b, nb) as loop:
            g = loop.index
            p = b.gep(wp, [b.mul(g, g.type(_BB4))])
            dw, sv, mv = _q4_block(b, p)
            vals = [b.fsub(b.fmul(sv, _q4_field(b, dw, k, False)), mv) for k in range(16)]  # lane j: weight 16j + k
            out = b.gep(dp, [b.mul(g, g.type(4 * _QKK))])
            for j, v in enumerate(_transpose16(b, vals)):
                b.store(v, b.bitcast(b.gep(out, [ir.Constant(ir.IntType(64), 64 * j)]), _V16F.as_pointer()),
                        align=1)
        return context.get_dummy_value()

    return types.void(w, types.intp, types.intp, dst, types.intp), gen


_prep_x4 = _make_prep_x(_XSCALE4, -1.0)


@jit_exact
def _decode_row_q4_kr_simd(w, off, n32, dst, doff):
    decode_q4_kr(w, off, n32 // 8, dst, doff)


gemv_q4_kr_simd, gemm_q4_kr_simd, dequant_q4_kr_simd = _superblock_kernels(
    _prep_x4, (dot_q4_kr, _q4_kr_rows), _decode_row_q4_kr_simd)


@jit_exact
def _block_q4_kr_plain(w, r, o, dst, i0):
    d, dmin = _f16_at(w, r, o), _f16_at(w, r, o + 2)
    for j in range(8):
        sc, m = _scale_min(w, r, o, j)
        dsc, dm = d * np.float32(sc), dmin * np.float32(m)
        for k in range(32):
            dst[i0 + 32 * j + k] = dsc * np.float32(_q4kr_quant(w, r, o, 32 * j + k)) - dm


@jit_exact
def _decode_row_q4_kr_plain(w, r, dst):
    for b in range(dst.shape[0] // _QKK):
        _block_q4_kr_plain(w, r, _BB4 * b, dst, _QKK * b)


@jit_exact
def gemv_q4_kr_plain(w, x, out, r0, r1):
    _gemv_plain(_decode_row_q4_kr_plain, w, x, out, r0, r1)


@jit_exact
def gemm_q4_kr_plain(w, X, out, r0, r1):
    _gemm_plain(_decode_row_q4_kr_plain, w, X, out, r0, r1)


@jit_exact
def dequant_q4_kr_plain(w, out, r0, r1):
    _dequant_plain(_decode_row_q4_kr_plain, w, out, r0, r1)


# ---- Q4_1R: Q4_1 in groups of 4 blocks, each lane 8 weights in natural order ----
#
# Q4_1 (weight = d * q + m, q 4 bits, d and m halves per 32-weight block). A row of nb
# blocks is nb // 4 groups of 4 blocks (128 weights, 80 bytes, as many as GGUF's), then the
# last nb % 4 blocks as GGUF Q4_1 blocks (20 bytes each)::
#
#     bytes 0..63   16 little-endian uint32: lane j holds the quants of weights 8j..8j + 7
#                   of the group at bits 4i..4i+3 (i = 0..7; block j // 4)
#     bytes 64..71  the 4 block scales d (half);  bytes 72..79  the 4 block minimums m (half)
#
# d and m are one per-lane vector each per group (lane j: block j // 4), the min term one
# FMA against the prepared lane sums of x, and step i of the GEMV is ``dword & (15 << 4i)``
# + convert + FMA on x reordered and scaled by 2^-4i once per call, as for Q4_KR (i = 7: a
# shift). GGUF Q4_1's best kernel (4 blocks at a time, a shift + table lookup per 16 weights)
# also needs the per-block scale and min spread to its vectors' lanes.
# Measured on the 2-core Zen 4, both kernels in one process (``python
# perf/bench_simd_variants.py --formats Q4_1R --shape ROWSxCOLS [--threads 2 --dram]``), G
# weights/s Q4_1 (its 4-block AVX-512 kernel) -> Q4_1R: 512x1536 one core in L2 18.8 -> 24.8
# (1.32x); at 2 threads from memory 8960x1536 32.4 -> 37.2 (1.15x), 151936x896 31.9 -> 37.5
# (1.18x), 1536x8960 (in slabs) 16.1 -> 21.2 (1.32x). (A prototype read 1.19-1.21x.)

_G1, _GB1, _TB1 = GROUPED["Q4_1R"]
_GW1, _XP1 = 32 * _G1, 144  # weights, prepared x floats per group
_XSCALE1 = np.array([2.0 ** (-4 * i) if i < 7 else 1.0 for i in range(8)], np.float32)


@jit_exact
def _pack_q4_1r(src, dst):
    nb = src.shape[1] // _TB1
    ng = nb // _G1
    lanes = np.empty(16, np.int64)
    for r in range(src.shape[0]):
        for g in range(ng):
            lanes[:] = 0
            go = _GB1 * g
            for bi in range(_G1):
                o = _TB1 * (_G1 * g + bi)
                for j in range(16):
                    b = np.int64(src[r, o + 4 + j])
                    for wi, q in ((32 * bi + j, b & 15), (32 * bi + 16 + j, b >> 4)):
                        lanes[wi // 8] |= q << (4 * (wi % 8))
                for u in range(2):
                    dst[r, go + 64 + 2 * bi + u] = src[r, o + u]
                    dst[r, go + 72 + 2 * bi + u] = src[r, o + 2 + u]
            for t in range(16):
                for u in range(4):
                    dst[r, go + 4 * t + u] = (lanes[t] >> (8 * u)) & 255
        for i in range(_TB1 * (nb - _G1 * ng)):
            dst[r, _GB1 * ng + i] = src[r, _TB1 * _G1 * ng + i]


@jit_exact
def _q4_1r_quant(src, r, go, wi):
    """Quant (0..15) of weight wi of the Q4_1R group at byte go of row r."""
    return (_dword(src, r, go + 4 * (wi // 8)) >> (4 * (wi % 8))) & 15


@jit_exact
def _unpack_q4_1r(src, dst):
    nb = dst.shape[1] // _TB1
    ng = nb // _G1
    for r in range(src.shape[0]):
        for g in range(ng):
            go = _GB1 * g
            for bi in range(_G1):
                o = _TB1 * (_G1 * g + bi)
                for u in range(2):
                    dst[r, o + u] = src[r, go + 64 + 2 * bi + u]
                    dst[r, o + 2 + u] = src[r, go + 72 + 2 * bi + u]
                for j in range(16):
                    dst[r, o + 4 + j] = (_q4_1r_quant(src, r, go, 32 * bi + j)
                                         | (_q4_1r_quant(src, r, go, 32 * bi + 16 + j) << 4))
        for i in range(_TB1 * (nb - _G1 * ng)):
            dst[r, _TB1 * _G1 * ng + i] = src[r, _GB1 * ng + i]


def _q4_1_group(b: ir.IRBuilder, p: ir.Value) -> tuple[list, ir.Value, ir.Value]:
    """The dword vector, <16 x float> d and m of lane j's block (j // 4) of the group at i8* p."""
    hm = b.fpext(_load(b, p, 64, ir.VectorType(ir.HalfType(), 8)), ir.VectorType(_F32, 8))
    return [_load(b, p, 0, _V16I32)], *(b.shuffle_vector(hm, ir.Constant(hm.type, ir.Undefined),
                                                         _const_vec(_V16I32, [off + j // 4 for j in range(16)]))
                                        for off in (0, 4))


# float32: the first ``ng`` groups of the row at byte ``woff`` dotted with the prepared x (``_prep_x1``).
dot_q4_1r, _q4_1r_rows = _lanes_dots(_lanes_body(_GB1, _XP1, _q4_1_group, _q4_field, 8, min_at=_GW1))


@intrinsic
def decode_q4_1r(typingctx, w, woff, ng, dst, doff):
    """The first ``ng`` groups of the row at byte ``woff`` -> float32 dst[doff:] in weight
    order, each weight exactly d * q + m as gguf computes it (no FMA)."""

    def gen(context, b, sig, args):
        w, woff, ng, dst, doff = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        dp = b.gep(_data_ptr(context, b, sig.args[3], dst), [b.mul(doff, doff.type(4))])
        zero, v8 = ir.Constant(_V16F, [0.0] * 16), ir.VectorType(_F32, 8)
        with cgutils.for_range(b, ng) as loop:
            g = loop.index
            p = b.gep(wp, [b.mul(g, g.type(_GB1))])
            dw, dv, mv = _q4_1_group(b, p)
            vals = [b.fadd(b.fmul(dv, _q4_field(b, dw, i, False)), mv) for i in range(8)]  # lane j: weight 8j + i
            out = b.gep(dp, [b.mul(g, g.type(4 * _GW1))])
            for j, v in enumerate(_transpose16(b, vals + [zero] * 8)):
                half = b.shuffle_vector(v, v, _const_vec(ir.VectorType(_I32, 8), list(range(8))))
                b.store(half, b.bitcast(b.gep(out, [ir.Constant(ir.IntType(64), 32 * j)]), v8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(w, types.intp, types.intp, dst, types.intp), gen


@jit_exact
def _prep_x1(x, ng):
    """x -> per group x[8j + i] * 2^-4i (i < 7) at 16i + j, then sum(x[8j:8j + 8]) at 128 + j
    (added in order i = 0..7; the 16 sums side by side)."""
    xp = np.empty(ng * _XP1, np.float32)
    s = np.empty(16, np.float32)
    for g in range(ng):
        s[:] = 0.0
        for i in range(8):
            for j in range(16):
                v = x[_GW1 * g + 8 * j + i]
                xp[_XP1 * g + 16 * i + j] = v * _XSCALE1[i]
                s[j] += v
        xp[_XP1 * g + _GW1:_XP1 * (g + 1)] = s
    return xp


@jit_exact
def _prep_x1_rows(X, ng):  # (n, ng * _XP1): _prep_x1 of each row of X
    XP = np.empty((X.shape[0], ng * _XP1), np.float32)
    for i in range(X.shape[0]):
        XP[i] = _prep_x1(X[i], ng)
    return XP


@jit_exact
def gemv_q4_1r_simd(w, x, out, r0, r1):
    nb = x.shape[0] // 32
    ng = nb // _G1
    xp = _prep_x1(x, ng)
    xs_tail = _block_sums(x, _G1 * ng, nb)
    rb = w.strides[0]
    for r in range(r0, r1):
        s = dot_q4_1r(w, r * rb, xp, ng)
        if _G1 * ng < nb:
            s += simd.dot_q4_1(w, r * rb + _GB1 * ng, x, _GW1 * ng, xs_tail, nb - _G1 * ng)
        out[r] = s


@jit_exact
def _decode_row_q4_1r_simd(w, off, nb, dst, doff):
    ng = nb // _G1
    decode_q4_1r(w, off, ng, dst, doff)
    if _G1 * ng < nb:
        simd.decode_q4_1(w, off + _GB1 * ng, nb - _G1 * ng, dst, doff + _GW1 * ng)


@jit_exact
def gemm_q4_1r_simd(w, X, out, r0, r1):
    """The two-row dot on each pair of activation rows (an odd last row: the GEMV's dot) over
    simd.TILE weight rows at a time, then each row's tail blocks as the GEMV adds them: out[i]
    has the bits of the GEMV on X[i]."""
    n, cols = X.shape
    nb = cols // 32
    ng = nb // _G1
    nt = nb - _G1 * ng
    XP = _prep_x1_rows(X, ng)
    XS = _block_sums_rows(X, _G1 * ng, nb)
    rb = w.strides[0]
    for ra in range(r0, r1, _TILE):
        rz = min(r1, ra + _TILE)
        for i in range(0, n - 1, 2):
            for r in range(ra, rz):
                _q4_1r_rows(w, r * rb, XP, i, ng, out, r)
        if n % 2:
            for r in range(ra, rz):
                out[n - 1, r] = dot_q4_1r(w, r * rb, XP[n - 1], ng)
        if nt > 0:
            for r in range(ra, rz):
                for k in range(n):
                    out[k, r] = out[k, r] + simd.dot_q4_1(w, r * rb + _GB1 * ng, X[k], _GW1 * ng, XS[k], nt)


@jit_exact
def dequant_q4_1r_simd(w, out, r0, r1):
    _dequant_blocks_simd(_decode_row_q4_1r_simd, w, out, r0, r1)


@jit_exact
def _decode_row_q4_1r_plain(w, r, dst):
    nb = dst.shape[0] // 32
    ng = nb // _G1
    for g in range(ng):
        go = _GB1 * g
        for bi in range(_G1):
            d, m = _f16_at(w, r, go + 64 + 2 * bi), _f16_at(w, r, go + 72 + 2 * bi)
            for k in range(32):
                dst[_GW1 * g + 32 * bi + k] = d * np.float32(_q4_1r_quant(w, r, go, 32 * bi + k)) + m
    for bi in range(nb - _G1 * ng):
        o = _GB1 * ng + _TB1 * bi
        d, m = _f16_at(w, r, o), _f16_at(w, r, o + 2)
        for j in range(16):
            b = np.int64(w[r, o + 4 + j])
            dst[_GW1 * ng + 32 * bi + j] = d * np.float32(b & 15) + m
            dst[_GW1 * ng + 32 * bi + 16 + j] = d * np.float32(b >> 4) + m


@jit_exact
def gemv_q4_1r_plain(w, x, out, r0, r1):
    _gemv_plain(_decode_row_q4_1r_plain, w, x, out, r0, r1)


@jit_exact
def gemm_q4_1r_plain(w, X, out, r0, r1):
    _gemm_plain(_decode_row_q4_1r_plain, w, X, out, r0, r1)


@jit_exact
def dequant_q4_1r_plain(w, out, r0, r1):
    _dequant_plain(_decode_row_q4_1r_plain, w, out, r0, r1)


# ---- column slabs (formats.SLABBED): the row-major kernels above, run slab by slab ----


@jit_exact(inline="always")
def _slab(w, cols, uw, ub, s, k, ra, rb):
    """Rows [ra, rb) of column slab s of k of the slabbed weight w (a contiguous row-major
    matrix: the slab's bytes follow the earlier slabs' for all rows), its first and end column."""
    rows, nu = w.shape[0], cols // uw
    u0, u1 = nu * s // k, nu * (s + 1) // k
    last = s == k - 1
    c0, c1 = uw * u0, cols if last else uw * u1
    b0, b1 = ub * u0, w.shape[1] if last else ub * u1
    base = rows * b0 + ra * (b1 - b0)
    return w.reshape(-1)[base:base + (rb - ra) * (b1 - b0)].reshape((rb - ra, b1 - b0)), c0, c1


@jit_exact(inline="always")
def _gemv_slabs(gemv, uw, ub, w, x, out, r0, r1):
    cols = x.shape[0]
    k = _n_slabs(cols // uw, _SLAB_COLS // uw)
    if k == 1:
        gemv(w, x, out, r0, r1)
        return
    part = np.empty(r1 - r0, np.float32)
    for s in range(k):
        sub, c0, c1 = _slab(w, cols, uw, ub, s, k, r0, r1)
        gemv(sub, x[c0:c1], part, 0, r1 - r0)
        for r in range(r1 - r0):
            out[r0 + r] = part[r] if s == 0 else out[r0 + r] + part[r]


@jit_exact(inline="always")
def _gemm_slabs(gemm, uw, ub, w, X, out, r0, r1):
    n, cols = X.shape
    k = _n_slabs(cols // uw, _SLAB_COLS // uw)
    if k == 1:
        gemm(w, X, out, r0, r1)
        return
    part = np.empty((n, r1 - r0), np.float32)
    for s in range(k):
        sub, c0, c1 = _slab(w, cols, uw, ub, s, k, r0, r1)
        gemm(sub, np.ascontiguousarray(X[:, c0:c1]), part, 0, r1 - r0)
        for i in range(n):
            for r in range(r1 - r0):
                out[i, r0 + r] = part[i, r] if s == 0 else out[i, r0 + r] + part[i, r]


@jit_exact(inline="always")
def _dequant_slabs(dequant, uw, ub, w, out, r0, r1):
    cols = out.shape[1]
    k = _n_slabs(cols // uw, _SLAB_COLS // uw)
    if k == 1:
        dequant(w, out, r0, r1)
        return
    for a in range(r0, r1, 256):  # a bounded buffer: rows in chunks
        e = min(r1, a + 256)
        for s in range(k):
            sub, c0, c1 = _slab(w, cols, uw, ub, s, k, a, e)
            part = np.empty((e - a, c1 - c0), np.float32)
            dequant(sub, part, 0, e - a)
            out[a:e, c0:c1] = part


def _slabbed(fmt: str, kernels: tuple) -> tuple:
    """(gemv, gemm, dequant) of the slabbed store layout ``fmt`` from its row-major ones."""
    gv, gm, dq = kernels
    uw, ub = slab_unit(fmt)

    @jit_exact
    def gemv(w, x, out, r0, r1):
        _gemv_slabs(gv, uw, ub, w, x, out, r0, r1)

    @jit_exact
    def gemm(w, X, out, r0, r1):
        _gemm_slabs(gm, uw, ub, w, X, out, r0, r1)

    @jit_exact
    def dequant(w, out, r0, r1):
        _dequant_slabs(dq, uw, ub, w, out, r0, r1)

    return gemv, gemm, dequant


def _copy_rows(src, dst):  # the Q8_0S ... converters: the GGUF blocks as they are
    dst[:] = src


_CONVERTERS = {"Q5_0R": (_pack_q5_0r, _unpack_q5_0r), "Q6_KR": (_pack_q6_kr, _unpack_q6_kr),
               "Q4_KR": (_pack_q4_kr, _unpack_q4_kr),
               "Q4_1R": (_pack_q4_1r, _unpack_q4_1r),
               **{f: (_copy_rows, _copy_rows) for f in ("Q8_0S", "Q4_0S", "Q5_1S", "Q5_KS")}}
_ROW_MAJOR = {  # impl -> store layout -> (gemv, gemm, dequant) on row-major rows
    "simd": {"Q5_0R": (gemv_q5_0r_simd, gemm_q5_0r_simd, dequant_q5_0r_simd),
             "Q6_KR": (gemv_q6_kr_simd, gemm_q6_kr_simd, dequant_q6_kr_simd),
             "Q4_KR": (gemv_q4_kr_simd, gemm_q4_kr_simd, dequant_q4_kr_simd),
             "Q4_1R": (gemv_q4_1r_simd, gemm_q4_1r_simd, dequant_q4_1r_simd)},
    "plain": {"Q5_0R": (gemv_q5_0r_plain, gemm_q5_0r_plain, dequant_q5_0r_plain),
              "Q6_KR": (gemv_q6_kr_plain, gemm_q6_kr_plain, dequant_q6_kr_plain),
              "Q4_KR": (gemv_q4_kr_plain, gemm_q4_kr_plain, dequant_q4_kr_plain),
              "Q4_1R": (gemv_q4_1r_plain, gemm_q4_1r_plain, dequant_q4_1r_plain)},
}
_ACTIVE_IMPL = "simd" if HAVE_SIMD else "plain"
for _f in ("Q8_0S", "Q4_0S", "Q5_1S", "Q5_KS"):  # the GGUF format's kernels (the active ones)
    _g = GGUF_OF[_f]
    _k = (*BASIC_KERNELS[_g], DEQUANT_KERNELS[_g]) if _g in BASIC_KERNELS else (*KQUANT_KERNELS[_g], KQUANT_DEQUANT[_g])
    for _impl in _ROW_MAJOR.values():
        _impl[_f] = _k
# the public kernels: the row-major ones in column slabs
_SLABBED = {impl: {f: _slabbed(f, k) for f, k in t.items()} for impl, t in _ROW_MAJOR.items()}
_SLABBED["plain"].update({f: _SLABBED["simd"][f] for f in _CONVERTERS if f.endswith("S")})  # one compiled copy
SIMD_KERNELS = {f: k[:2] for f, k in _SLABBED["simd"].items()}
PLAIN_KERNELS = {f: k[:2] for f, k in _SLABBED["plain"].items()}
DEQUANT_SIMD = {f: k[2] for f, k in _SLABBED["simd"].items()}
DEQUANT_PLAIN = {f: k[2] for f, k in _SLABBED["plain"].items()}
REPACKED_KERNELS = SIMD_KERNELS if HAVE_SIMD else PLAIN_KERNELS
REPACKED_DEQUANT = DEQUANT_SIMD if HAVE_SIMD else DEQUANT_PLAIN
gemv_q5_0r, gemm_q5_0r = REPACKED_KERNELS["Q5_0R"]
gemv_q6_kr, gemm_q6_kr = REPACKED_KERNELS["Q6_KR"]
gemv_q4_kr, gemm_q4_kr = REPACKED_KERNELS["Q4_KR"]

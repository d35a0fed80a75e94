"""Fused dequantize-and-dot kernels for the GGUF K-quant formats Q4_K, Q5_K, Q6_K.

The weight is the GGUF block bytes unchanged, uint8 (rows, row_bytes); every row is
``cols // 256`` super-blocks of 256 weights (layouts as llama.cpp ggml-common.h):

  Q4_K 144 B: d f16 | dmin f16 | scales[12] (8 x 6-bit scale, 8 x 6-bit min) | qs[128]
  Q5_K 176 B: d f16 | dmin f16 | scales[12] | qh[32] (5th bits) | qs[128]
  Q6_K 210 B: ql[128] (low nibbles) | qh[64] (2 high bits) | scales[16] int8 | d f16

Q4_K/Q5_K: w = d*sc[j]*q - dmin*m[j] per 32-weight sub-block j; Q6_K: w = d*sc[j]*(q-32)
per 16-weight sub-block. The GEMV uses sum_j d*sc[j]*dot(q, x) - dmin*m[j]*sum(x) so
the inner loop is a pure q*x accumulation, kept in vector lane accumulators across
sub-blocks (scale applied as one vector FMA per sub-block, one reduction per row).

Two implementations per format, same contract:
  * ``*_simd``: explicit vector IR through ``numba.extending.intrinsic`` (llvmlite),
    whole row loop in one intrinsic (accumulators stay in registers).
  * ``*_plain``: ordinary Numba loops; the fallback when the CPU lacks AVX2/FMA,
    and a second implementation for the tests.
Public names (``gemv_q4_k`` ...) are the SIMD kernels when ``simd.HAVE_SIMD`` (AVX2, FMA,
F16C, not FLASHLM_NO_SIMD); ``IMPLS["simd" | "plain"]`` holds both for tests and benchmarks.

Row-range kernels, safe to call from several threads at once (nogil, no shared state):
  gemv_*(w, x, out, r0, r1)     out[r] = W[r] . x          for r in [r0, r1)
  gemm_*(w, X, out, r0, r1)     out[i, r] = W[r] . X[i]    every block decoded once
  dequant_*(w, out, r0, r1)     out[r, :] = W[r]           float32
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from flashlm.kernels.config import intrinsic, jit, jit_exact
from flashlm.kernels import simd
from flashlm.kernels.simd import HAVE_AVX512, HAVE_SIMD, _lookup, _prefetch
from flashlm.kernels.gemv_basic import _block_sums, _block_sums_rows, _dot_plain

_TILE = simd.TILE

QK = 256  # weights per super-block
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_BB = (144, 176, 210)  # block bytes by kind: 0 Q4_K, 1 Q5_K, 2 Q6_K

# ---- vector IR helpers ----

_I8, _I32, _F32, _F16 = ir.IntType(8), ir.IntType(32), ir.FloatType(), ir.HalfType()
_I8P = _I8.as_pointer()
# FMA contraction only: no reassociation, so a row's operations are the same whatever is compiled
# around them (the multi-row kernels give every row the GEMV's bits); no nnan/ninf: inf/nan propagate.
_FM = ("contract",)


def _vt(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _c(ty: ir.Type, val) -> ir.Constant:
    """Constant of scalar or vector type ``ty``; ``val`` a scalar (splat) or a list."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, val if isinstance(val, list) else [val] * ty.count)
    return ir.Constant(ty, val)


_U8x32, _F32x8, _F32x16, _F32x32 = _vt(_I8, 32), _vt(_F32, 8), _vt(_F32, 16), _vt(_F32, 32)


class _V:
    """Small vector-op vocabulary over an llvmlite IRBuilder (pointers are i8*, offsets bytes)."""

    def __init__(self, builder: ir.IRBuilder):
        self.b = builder

    def ptr(self, base, off, ty):
        off = off if isinstance(off, ir.Value) else _c(ir.IntType(64), off)
        return self.b.bitcast(self.b.gep(base, [off], inbounds=True), ty.as_pointer())

    def load(self, base, off, ty):
        return self.b.load(self.ptr(base, off, ty), align=1)

    def store(self, val, base, off):
        self.b.store(val, self.ptr(base, off, val.type), align=4)

    def fma(self, a, b, c):
        fnty = ir.FunctionType(a.type, [a.type] * 3)
        name = f"llvm.fma.v{a.type.count}f32"
        return self.b.call(cgutils.get_or_insert_function(self.b.module, fnty, name), [a, b, c])

    def fmul(self, a, b):
        return self.b.fmul(a, b, flags=_FM)

    def shuf(self, v, idx):
        return self.b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), _c(_vt(_I32, len(idx)), idx))

    def part(self, v, k, n=8):
        return self.shuf(v, list(range(k * n, k * n + n)))

    def splat_load(self, base, off, n=8):
        """<n x float> of the float at byte ``off`` (a broadcast load)."""
        s = self.b.load(self.ptr(base, off, _F32), align=4)
        return self.shuf(self.b.insert_element(ir.Constant(_vt(_F32, n), ir.Undefined), s, _c(_I32, 0)), [0] * n)

    def hsum(self, v):
        n = v.type.count
        while n > 1:
            n //= 2
            v = self.b.fadd(self.part(v, 0, n), self.part(v, 1, n), flags=_FM)
        return self.b.extract_element(v, _c(_I32, 0))

    def f16(self, base, off, n):
        """n IEEE halves at byte ``off`` -> <n x float> (F16C vcvtph2ps)."""
        return self.b.fpext(self.load(base, off, _vt(_F16, n)), _vt(_F32, n))

    def kscales(self, blk):
        """Q4_K/Q5_K header -> <16 x float>: d*sc[0..7], then dmin*m[0..7]."""
        b, i32x16 = self.b, _vt(_I32, 16)
        hdr = self.load(blk, 0, _vt(_I8, 16))  # d, dmin, scales[12]
        # sc[j<4] = s[j]&63, sc[j>=4] = s[j+4]&15 | (s[j-4]>>6)<<4
        # m[j<4] = s[j+4]&63, m[j>=4] = s[j+4]>>4 | (s[j]>>6)<<4   (s = hdr[4:])
        lo = b.zext(self.shuf(hdr, [4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15]), i32x16)
        lo = b.and_(b.lshr(lo, _c(i32x16, [0] * 12 + [4] * 4)), _c(i32x16, ([63] * 4 + [15] * 4) * 2))
        hi = b.zext(self.shuf(hdr, [0, 0, 0, 0, 4, 5, 6, 7, 0, 0, 0, 0, 8, 9, 10, 11]), i32x16)
        hi = b.and_(b.shl(b.lshr(hi, _c(i32x16, 6)), _c(i32x16, 4)), _c(i32x16, ([0] * 4 + [48] * 4) * 2))
        scm = b.uitofp(b.or_(lo, hi), _F32x16)
        return self.fmul(scm, self.shuf(self.f16(blk, 0, 2), [0] * 8 + [1] * 8))

    def q6scales(self, blk):
        """Q6_K -> <16 x float> d*scales[j]."""
        sc = self.b.sitofp(self.load(blk, 192, _vt(_I8, 16)), _F32x16)
        return self.fmul(sc, self.shuf(self.f16(blk, 206, 2), [1] * 16))  # bytes 208..209


def _arr_ptr(context, builder, aty, val):
    """(i8* data, tuple of strides) of a Numba array value."""
    a = context.make_array(aty)(context, builder, val)
    return builder.bitcast(a.data, _I8P), cgutils.unpack_tuple(builder, a.strides, aty.ndim)


PREFETCH = 2048  # bytes ahead; with the next-block scale decode 1.5-2.5x on 8960-wide rows from DRAM


def _row_dot_body(block_bytes: int, scales, emit, lanes: int = 16):
    """``body(context, builder, wrow, xps, sxps, sp, nblk) -> [float32 per row]``: the weight row
    at i8* ``wrow`` dotted with each activation row (i8* ``xps[t]``, its 32-weight sums at
    ``sxps[t]``); ``sp`` the scale buffer. Iteration b stores ``scales(v, blk)`` of block b+1 (16
    floats) into sbuf (nb*16,) f32 (block 0 before the loop), so the scale decode is off the
    critical path and the main work broadcast-loads them; it prefetches PREFETCH bytes ahead and
    calls ``emit(v, blk, sb, rows) -> accs per row`` for block b (``rows``: (xb, sxb, accs) per
    activation row; the block decoded once, every row the one-row operations). A row's result
    is hsum(acc0 + acc1 - acc2) of three <lanes x float> accumulators."""

    def body(context, builder, wrow, xps, sxps, sp, nblk):
        v = _V(builder)
        nr = len(xps)

        def at(base, i, step):
            return builder.gep(base, [builder.mul(i, _c(i.type, step))])

        with cgutils.if_likely(builder, builder.icmp_signed(">", nblk, _c(nblk.type, 0))):
            v.store(scales(v, wrow), sp, 0)
        slots = [[cgutils.alloca_once_value(builder, _c(_vt(_F32, lanes), 0.0)) for _ in range(3)] for _ in range(nr)]
        with cgutils.for_range(builder, nblk) as loop:
            i = loop.index
            blk, sb = at(wrow, i, block_bytes), at(sp, i, 64)
            nxt = builder.add(i, _c(i.type, 1))
            nxt = builder.select(builder.icmp_signed("<", nxt, nblk), nxt, i)  # last: redo own
            v.store(scales(v, at(wrow, nxt, block_bytes)), at(sp, nxt, 64), 0)
            _prefetch(builder, blk, PREFETCH, block_bytes)
            rows = [(at(xps[t], i, QK * 4), at(sxps[t], i, 32), [builder.load(s) for s in slots[t]]) for t in range(nr)]
            for sl, accs in zip(slots, emit(v, blk, sb, rows)):
                for s, a in zip(sl, accs):
                    builder.store(a, s)
        out = []
        for sl in slots:
            a0, a1, a2 = [builder.load(s) for s in sl]
            out.append(v.hsum(builder.fsub(builder.fadd(a0, a1, flags=_FM), a2, flags=_FM)))
        return out

    return body


def _make_row_dot(block_bytes: int, scales, emit, lanes: int = 16):
    """Intrinsic ``row_dot(w, r, x, sx, nb, sbuf) -> float32``: row r of w dotted with x
    (``_row_dot_body``)."""
    body = _row_dot_body(block_bytes, scales, emit, lanes)

    @intrinsic
    def row_dot(typingctx, w, r, x, sx, nb, sbuf):
        sig = types.float32(w, r, x, sx, nb, sbuf)

        def codegen(context, builder, sig, args):
            wp, ws = _arr_ptr(context, builder, sig.args[0], args[0])
            xp, sxp, sp = [_arr_ptr(context, builder, sig.args[k], args[k])[0] for k in (2, 3, 5)]
            row, nblk = [context.cast(builder, args[k], sig.args[k], types.intp) for k in (1, 4)]
            return body(context, builder, builder.gep(wp, [builder.mul(row, ws[0])]), [xp], [sxp], sp, nblk)[0]

        return sig, codegen

    return row_dot


def _make_row_dot_rows(block_bytes: int, scales, emit, nr: int, lanes: int = 16):
    """Intrinsic ``row_dot_rows(w, r, X, SX, i0, nb, sbuf, out)``: out[i0 + t, r] = ``row_dot`` of
    row r with X[i0 + t] and SX[i0 + t] (2-D float32, contiguous rows), t < nr."""
    body = _row_dot_body(block_bytes, scales, emit, lanes)

    @intrinsic
    def row_dot_rows(typingctx, w, r, X, SX, i0, nb, sbuf, out):
        sig = types.void(w, r, X, SX, i0, nb, sbuf, out)

        def codegen(context, builder, sig, args):
            wp, ws = _arr_ptr(context, builder, sig.args[0], args[0])
            sp = _arr_ptr(context, builder, sig.args[6], args[6])[0]
            row, i0, nblk = [context.cast(builder, args[k], sig.args[k], types.intp) for k in (1, 4, 5)]
            xps = simd._row_ptrs(context, builder, sig.args[2], args[2], i0, nr)
            sxps = simd._row_ptrs(context, builder, sig.args[3], args[3], i0, nr)
            res = body(context, builder, builder.gep(wp, [builder.mul(row, ws[0])]), xps, sxps, sp, nblk)
            simd._store_rows(context, builder, sig.args[7], args[7], i0, row, res)
            return context.get_dummy_value()

        return sig, codegen

    return row_dot_rows


def _row_dots(block_bytes: int, scales, emit) -> tuple:
    """(one-row dot, two-row dot, four-row dot) intrinsics of a K-quant layout. Time per row against
    the GEMV, one core, 256 x 1536 in L2, pairs / groups of 4: Q4_K 0.71 / 0.63, Q5_K 0.55 / 0.38
    (1.14 / 1.08 with the 5th bits held in registers through the block: spills), Q6_K 0.67 / 0.54."""
    return (_make_row_dot(block_bytes, scales, emit), _make_row_dot_rows(block_bytes, scales, emit, simd.ROWS),
            _make_row_dot_rows(block_bytes, scales, emit, 4))


def _make_block_deq(block_bytes: int, emit):
    """Intrinsic ``deq(w, r, b, dst, o)``: block b of row r -> 256 floats at dst.flat[o:]."""

    @intrinsic
    def deq(typingctx, w, r, b, dst, o):
        sig = types.void(w, r, b, dst, o)

        def codegen(context, builder, sig, args):
            wp, ws = _arr_ptr(context, builder, sig.args[0], args[0])
            dp, _ = _arr_ptr(context, builder, sig.args[3], args[3])
            row, blk_i, off = [context.cast(builder, args[k], sig.args[k], types.intp) for k in (1, 2, 4)]
            i64 = row.type
            start = builder.add(builder.mul(row, ws[0]), builder.mul(blk_i, _c(i64, block_bytes)))
            emit(_V(builder), builder.gep(wp, [start]), builder.gep(dp, [builder.mul(off, _c(i64, 4))]))
            return context.get_dummy_value()

        return sig, codegen

    return deq


# ---- per-format block emitters (vector IR) ----


def _min_terms(v, sb, rows) -> list:
    """Each row's accumulators with the block's min term added: macc += dmin*m[j] * sum(x_j)."""
    b, dm = v.b, v.load(sb, 32, _F32x8)
    out = []
    for _, sxb, (acc0, acc1, macc) in rows:
        m = v.fmul(dm, v.load(sxb, 0, _F32x8))
        macc = b.fadd(macc, b.shuffle_vector(m, _c(_F32x8, 0.0), _c(_vt(_I32, 16), list(range(16)))), flags=_FM)
        out.append([acc0, acc1, macc])
    return out


def _emit_q45k_dot(five: bool):
    """Q4_K / Q5_K block, 16 lanes: 16 quant bytes zero-extended to dwords give 16 low + 16 high nibbles."""
    qoff, u8, i32, f32 = 48 if five else 16, _vt(_I8, 16), _vt(_I32, 16), _F32x16

    def emit(v, blk, sb, rows):
        b = v.b
        accs = _min_terms(v, sb, rows)
        for c in range(4):  # sub-blocks 2c (low nibbles) and 2c+1 (high nibbles)
            tl, th = [None] * len(rows), [None] * len(rows)
            for k in range(2):
                q = b.zext(v.load(blk, qoff + 32 * c + 16 * k, u8), i32)
                lo, hi = b.and_(q, _c(i32, 15)), b.lshr(q, _c(i32, 4))
                if five:  # bit j of qh[l] is the 5th bit of weight l of sub-block j (reloaded: registers)
                    qh = b.zext(v.load(blk, 16 + 16 * k, u8), i32)
                    for s, sh in ((0, 2 * c), (1, 2 * c + 1)):
                        h5 = b.shl(qh, _c(i32, 4 - sh)) if sh <= 4 else b.lshr(qh, _c(i32, sh - 4))
                        h5 = b.and_(h5, _c(i32, 16))
                        lo, hi = (b.or_(lo, h5), hi) if s == 0 else (lo, b.or_(hi, h5))
                lo, hi = b.uitofp(lo, f32), b.uitofp(hi, f32)
                for r, (xb, _, _) in enumerate(rows):
                    xl, xh = v.load(xb, 256 * c + 64 * k, f32), v.load(xb, 256 * c + 128 + 64 * k, f32)
                    tl[r] = v.fmul(lo, xl) if tl[r] is None else v.fma(lo, xl, tl[r])
                    th[r] = v.fmul(hi, xh) if th[r] is None else v.fma(hi, xh, th[r])
            sl, sh_ = v.splat_load(sb, 8 * c, 16), v.splat_load(sb, 8 * c + 4, 16)
            for r, acc in enumerate(accs):
                acc[0] = v.fma(tl[r], sl, acc[0])
                acc[1] = v.fma(th[r], sh_, acc[1])
        return accs

    return emit


# Q4_K with AVX-512F: the 128 quant bytes of a super-block are read as two 64-byte
# vectors of 16 dwords, with no widening; nibble k (k = 0..7) of every dword is
# ``(q >> 4k)`` turned into a float by a 16-entry table lookup (vpermps reads only the
# low 4 bits of each index, so no mask either). Lane j of step k of half p holds weight
# ``_Q4K_PERM[128p + 16k + j]`` of the super-block (lanes 0-7 from 32-byte chunk 2p,
# 8-15 from chunk 2p+1; even k low nibbles, odd k high), so the GEMV multiplies it by
# ``x`` permuted the same way, once per call (``_permute_q4k``). A vector of step k
# spans two sub-blocks (lanes 0-7, 8-15), so the scale is a half/half vector.
# Per super-block: 14 shifts + 16 lookups + 16 FMA instead of 8 widen + 8 and + 8 shifts +
# 16 converts + 16 FMA. Measured on the 2-core Zen 4 (both compiled in one process,
# interleaved; ``perf/bench_simd_variants.py --formats Q4_K``, G weights/s ratio to the
# widen kernel): 1.10-1.20x in L2 on one core; at 2 threads 1.09-1.12x on 151936x1024,
# 1.06-1.22x on 8960x1536, 1.02-1.10x on 1536x8960. The same order with and + convert
# instead of the lookup measured 0.95-1.10x, with the or-exponent trick
# (``(n | 0x4B000000) - 2^23``) 0.91-1.07x.
_Q4K_PERM = np.array([64 * (2 * p + j // 8) + 32 * (k % 2) + 4 * (j % 8) + k // 2
                      for p in range(2) for k in range(8) for j in range(16)], np.int64)


def _emit_q4k_dot_permuted(v, blk, sb, rows):
    """Q4_K block on x permuted by ``_Q4K_PERM`` (AVX-512F only: vpermps zmm)."""
    b, i32, f32 = v.b, _vt(_I32, 16), _F32x16
    accs = _min_terms(v, sb, rows)
    scales, table = v.load(sb, 0, f32), list(range(16))
    for p in range(2):
        q = v.load(blk, 16 + 64 * p, i32)
        t = [[None, None] for _ in rows]  # even k: sub-blocks 4p, 4p+2 (low nibbles); odd k: 4p+1, 4p+3
        for k in range(8):
            f = _lookup(b, table, q if k == 0 else b.lshr(q, _c(i32, 4 * k)))
            for r, (xb, _, _) in enumerate(rows):
                xv = v.load(xb, 64 * (8 * p + k), f32)
                t[r][k % 2] = v.fmul(f, xv) if t[r][k % 2] is None else v.fma(f, xv, t[r][k % 2])
        for par in range(2):
            sc = v.shuf(scales, [4 * p + par] * 8 + [4 * p + 2 + par] * 8)
            for r, acc in enumerate(accs):
                acc[par] = v.fma(t[r][par], sc, acc[par])
    return accs


def _emit_q45k_deq(five: bool):
    def emit(v, blk, dst):
        b, t = v.b, _U8x32
        scm = v.kscales(blk)
        qh = v.load(blk, 16, t) if five else None
        for c in range(4):
            q = v.load(blk, (48 if five else 16) + 32 * c, t)
            for k, qq in enumerate((b.and_(q, _c(t, 15)), b.lshr(q, _c(t, 4)))):
                j = 2 * c + k
                if five:
                    qq = b.or_(qq, b.shl(b.and_(b.lshr(qh, _c(t, j)), _c(t, 1)), _c(t, 4)))
                val = b.fsub(b.fmul(b.uitofp(qq, _F32x32), v.shuf(scm, [j] * 32)), v.shuf(scm, [8 + j] * 32))
                v.store(val, dst, 128 * j)

    return emit


def _q6k_groups(v, blk):
    """Yield (h, k, <32 x i8> q-32) for the 8 groups of 32 weights (128h + 32k ...) of a Q6_K block."""
    b, t = v.b, _U8x32
    for h in range(2):
        qa, qb = v.load(blk, 64 * h, t), v.load(blk, 64 * h + 32, t)
        qh = v.load(blk, 128 + 32 * h, t)
        qs = [
            b.or_(b.and_(qa, _c(t, 15)), b.shl(b.and_(qh, _c(t, 3)), _c(t, 4))),
            b.or_(b.and_(qb, _c(t, 15)), b.shl(b.and_(qh, _c(t, 12)), _c(t, 2))),
            b.or_(b.lshr(qa, _c(t, 4)), b.and_(qh, _c(t, 48))),
            b.or_(b.lshr(qb, _c(t, 4)), b.and_(b.lshr(qh, _c(t, 2)), _c(t, 48))),
        ]
        for k in range(4):
            yield h, k, b.sub(qs[k], _c(t, 32))


def _emit_q6k_dot(v, blk, sb, rows):
    """Q6_K block with 16-lane accumulators: one 16-weight sub-block per vector."""
    accs = [list(a) for _, _, a in rows]
    for h, k, q in _q6k_groups(v, blk):
        qf = v.b.sitofp(q, _F32x32)
        off = 4 * (128 * h + 32 * k)
        j = 8 * h + 2 * k
        q0, q1 = v.part(qf, 0, 16), v.part(qf, 1, 16)
        s0, s1 = v.splat_load(sb, 4 * j, 16), v.splat_load(sb, 4 * j + 4, 16)
        for (xb, _, _), acc in zip(rows, accs):
            t = v.fmul(q0, v.load(xb, off, _F32x16))  # sub-block j
            u = v.fmul(q1, v.load(xb, off + 64, _F32x16))  # sub-block j + 1
            acc[0] = v.fma(t, s0, acc[0])
            acc[1] = v.fma(u, s1, acc[1])
    return accs


def _emit_q6k_deq(v, blk, dst):
    scv = v.q6scales(blk)
    for h, k, q in _q6k_groups(v, blk):
        j = 8 * h + 2 * k
        val = v.fmul(v.shuf(scv, [j] * 16 + [j + 1] * 16), v.b.sitofp(q, _F32x32))
        v.store(val, dst, 4 * (128 * h + 32 * k))


# (one-row, two-row, four-row) dots of each layout (``_row_dots``)
_row_q4_k, _rows_q4_k, _rows4_q4_k = _row_dots(144, _V.kscales, _emit_q45k_dot(False))
_row_q4_k_permuted, _rows_q4_k_permuted, _rows4_q4_k_permuted = _row_dots(144, _V.kscales, _emit_q4k_dot_permuted)
_row_q5_k, _rows_q5_k, _rows4_q5_k = _row_dots(176, _V.kscales, _emit_q45k_dot(True))
_row_q6_k, _rows_q6_k, _rows4_q6_k = _row_dots(210, _V.q6scales, _emit_q6k_dot)
_deq_q4_k_simd = _make_block_deq(144, _emit_q45k_deq(False))
_deq_q5_k_simd = _make_block_deq(176, _emit_q45k_deq(True))
_deq_q6_k_simd = _make_block_deq(210, _emit_q6k_deq)


# ---- plain Numba helpers (fallback and second reference) ----
# Compiled without fast-math (``jit_exact``): a block decodes exactly as gguf computes it, and a
# GEMM row has the bits of the GEMV (the same decode and ``_dot_plain``, in the same order).


@jit_exact
def _f16(lo, hi):
    """IEEE half from two little-endian bytes -> float32."""
    h = np.int32(lo) | (np.int32(hi) << 8)
    e, m = (h >> 10) & 31, h & 1023
    if e == 0:
        v = m * 2.0**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = (1024 + m) * 2.0 ** (e - 25)
    return np.float32(-v if h & 0x8000 else v)


@jit_exact
def _scale_min(w, r, o, j):
    """6-bit (scale, min) of sub-block j of the Q4_K/Q5_K block at byte o of row r."""
    s = o + 4
    if j < 4:
        return w[r, s + j] & 63, w[r, s + j + 4] & 63
    sc = (w[r, s + j + 4] & 15) | ((w[r, s + j - 4] >> 6) << 4)
    return sc, (w[r, s + j + 4] >> 4) | ((w[r, s + j] >> 6) << 4)


@jit_exact
def _q45k_q(w, r, o, j, l, five):
    """Quant of weight l of sub-block j (Q4_K: 4 bits; Q5_K: 5 bits)."""
    c, sh = j // 2, 4 * (j % 2)
    if five:
        return ((w[r, o + 48 + 32 * c + l] >> sh) & 15) | (((w[r, o + 16 + l] >> j) & 1) << 4)
    return (w[r, o + 16 + 32 * c + l] >> sh) & 15


@jit_exact
def _q6k_q(w, r, o, j, l):
    """Quant (minus 32) of weight l of 16-weight sub-block j of a Q6_K block; and its int8 scale."""
    h, k, i = j // 8, (j % 8) // 2, 16 * (j % 2) + l
    ql = (w[r, o + 64 * h + 32 * (k % 2) + i] >> (4 * (k // 2))) & 15
    qh = (w[r, o + 128 + 32 * h + i] >> (2 * k)) & 3
    return np.int32(ql | (qh << 4)) - 32


@jit_exact
def _i8(v):
    return np.int32(v) - 256 if v >= 128 else np.int32(v)


@jit_exact
def _deq_q45k_plain(w, r, b, dst, o, bb, five):  # dst (>= o+256,) float32
    ob = b * bb
    d, dmin = _f16(w[r, ob], w[r, ob + 1]), _f16(w[r, ob + 2], w[r, ob + 3])
    for j in range(8):
        sc, m = _scale_min(w, r, ob, j)
        dsc, dm = d * np.float32(sc), dmin * np.float32(m)
        for l in range(32):
            dst[o + 32 * j + l] = dsc * np.float32(_q45k_q(w, r, ob, j, l, five)) - dm


@jit_exact
def _deq_q6k_plain(w, r, b, dst, o):  # dst (>= o+256,) float32
    ob = b * 210
    d = _f16(w[r, ob + 208], w[r, ob + 209])
    for j in range(16):
        dsc = d * np.float32(_i8(w[r, ob + 192 + j]))
        for l in range(16):
            dst[o + 16 * j + l] = dsc * np.float32(_q6k_q(w, r, ob, j, l))


@jit_exact
def _deq_plain(w, r, b, dst, o, kind):  # kind 0 Q4_K, 1 Q5_K, 2 Q6_K
    if kind == 2:
        _deq_q6k_plain(w, r, b, dst, o)
    else:
        _deq_q45k_plain(w, r, b, dst, o, 176 if kind == 1 else 144, kind == 1)


@jit_exact
def _gemm_plain(w, X, out, r0, r1, kind):  # X (n, cols) f32, out (n, rows) f32
    nb = _check_gemm(w, X, out, r0, r1, _BB[kind])
    row = np.empty(nb * QK, np.float32)
    for r in range(r0, r1):
        for b in range(nb):
            _deq_plain(w, r, b, row, b * QK, kind)
        for i in range(X.shape[0]):
            out[i, r] = _dot_plain(row, X, i)


@jit_exact
def _gemv_plain(w, x, out, r0, r1, kind):  # the GEMM on one row
    _check(w, x.shape[0], x.strides[0], out.shape[0], r0, r1, _BB[kind])
    _gemm_plain(w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])), r0, r1, kind)


@jit_exact
def _dequant_plain(w, out, r0, r1, kind):  # out (rows, cols) f32
    nb = _check(w, out.shape[1], out.strides[1], out.shape[0], r0, r1, _BB[kind])
    for r in range(r0, r1):
        for b in range(nb):
            _deq_plain(w, r, b, out[r], b * QK, kind)


# ---- shared kernel pieces ----


@jit
def _check(w, cols, inner_stride, rows_out, r0, r1, bb):
    """Validate shapes/contiguity of a row-range call; return blocks per row."""
    if inner_stride != 4:
        raise ValueError("K-quant kernel: activations / output rows must be contiguous float32")
    if cols % QK != 0:
        raise ValueError("K-quant kernel: cols must be a multiple of 256")
    nb = cols // QK
    if w.shape[1] != nb * bb:
        raise ValueError("K-quant kernel: w.shape[1] != cols // 256 * block bytes")
    if w.strides[1] != 1:
        raise ValueError("K-quant kernel: w rows must be contiguous")
    if rows_out != w.shape[0]:
        raise ValueError("K-quant kernel: out rows != w rows")
    if r0 < 0 or r1 < r0 or r1 > w.shape[0]:
        raise ValueError("K-quant kernel: row range out of bounds")
    return nb


@jit
def _check_gemm(w, X, out, r0, r1, bb):
    if out.shape[0] != X.shape[0]:
        raise ValueError("K-quant GEMM: out.shape[0] != X.shape[0]")
    return _check(w, X.shape[1], X.strides[1], out.shape[1], r0, r1, bb)


# ---- public kernels: SIMD ----
# The GEMV: x's 32-weight sums once per call, then the one-row dot per weight row. The GEMM
# (small n): each row of X gets the same sums; the four-row dot on groups of 4 rows, the two-row
# dot on a pair, the one-row dot on a last row, over simd.TILE weight rows at a time, decode each
# super-block once for their rows and give every row the one-row operations, so out[i] of the
# GEMM has the GEMV's bits. No fast-math in
# the drivers (``jit_exact``): the vector IR carries its own flags.


def _kquant_kernels(dots, bb: int, nsx: bool, permute: bool = False) -> tuple:
    """(gemv, gemm) of a K-quant layout from its (one-row, two-row, four-row) dots; ``nsx``: the dots read
    x's 32-weight sums (the min term); ``permute``: they read x permuted by ``_Q4K_PERM``
    (AVX-512 Q4_K). The dots are called inline (a call per row through a jitted wrapper cost
    the GEMV 10 % on 1536-wide rows)."""
    d1, d2, d4 = dots

    @jit_exact
    def prep(x, nb):  # the x the dots read: as it is, or permuted
        return _permute_q4k(x, nb) if permute else x

    @jit_exact
    def gemv(w, x, out, r0, r1):
        nb = _check(w, x.shape[0], x.strides[0], out.shape[0], r0, r1, bb)
        sx = _block_sums(x, 0, x.shape[0] // 32) if nsx else x
        sbuf = np.empty(nb * 16, np.float32)
        xp = prep(x, nb)
        for r in range(r0, r1):
            out[r] = d1(w, r, xp, sx, nb, sbuf)

    @jit_exact
    def gemm(w, X, out, r0, r1):
        nb = _check_gemm(w, X, out, r0, r1, bb)
        n = X.shape[0]
        SX = _block_sums_rows(X, 0, X.shape[1] // 32) if nsx else X
        XP = np.empty_like(X)
        for i in range(n):
            XP[i] = prep(X[i], nb)
        sbuf = np.empty(nb * 16, np.float32)
        for ra in range(r0, r1, _TILE):
            rz = min(r1, ra + _TILE)
            i = 0
            while i + 4 <= n:
                for r in range(ra, rz):
                    d4(w, r, XP, SX, i, nb, sbuf, out)
                i += 4
            while i + 2 <= n:
                for r in range(ra, rz):
                    d2(w, r, XP, SX, i, nb, sbuf, out)
                i += 2
            if i < n:
                for r in range(ra, rz):
                    out[n - 1, r] = d1(w, r, XP[n - 1], SX[n - 1], nb, sbuf)

    return gemv, gemm


@jit_exact
def _permute_q4k(x, nb):  # x (cols,) -> x reordered per super-block as _Q4K_PERM
    xp = np.empty(nb * QK, np.float32)
    for s in range(nb):
        for i in range(QK):
            xp[QK * s + i] = x[QK * s + _Q4K_PERM[i]]
    return xp


_gemv_q4_k_simd, _gemm_q4_k_simd = _kquant_kernels((_row_q4_k, _rows_q4_k, _rows4_q4_k), 144, True)
_gemv_q4_k_permuted, _gemm_q4_k_permuted = _kquant_kernels(
    (_row_q4_k_permuted, _rows_q4_k_permuted, _rows4_q4_k_permuted), 144, True, permute=True)  # needs AVX-512F
_gemv_q5_k_simd, _gemm_q5_k_simd = _kquant_kernels((_row_q5_k, _rows_q5_k, _rows4_q5_k), 176, True)
_gemv_q6_k_simd, _gemm_q6_k_simd = _kquant_kernels((_row_q6_k, _rows_q6_k, _rows4_q6_k), 210, False)  # no min term


@jit
def _dequant_q4_k_simd(w, out, r0, r1):  # out (rows, cols) f32
    nb = _check(w, out.shape[1], out.strides[1], out.shape[0], r0, r1, 144)
    for r in range(r0, r1):
        for b in range(nb):
            _deq_q4_k_simd(w, r, b, out[r], b * QK)


@jit
def _dequant_q5_k_simd(w, out, r0, r1):  # out (rows, cols) f32
    nb = _check(w, out.shape[1], out.strides[1], out.shape[0], r0, r1, 176)
    for r in range(r0, r1):
        for b in range(nb):
            _deq_q5_k_simd(w, r, b, out[r], b * QK)


@jit
def _dequant_q6_k_simd(w, out, r0, r1):  # out (rows, cols) f32
    nb = _check(w, out.shape[1], out.strides[1], out.shape[0], r0, r1, 210)
    for r in range(r0, r1):
        for b in range(nb):
            _deq_q6_k_simd(w, r, b, out[r], b * QK)


# ---- public kernels: plain Numba ----


@jit_exact
def _gemv_q4_k_plain(w, x, out, r0, r1):  # w (rows, nb*144) u8, x (cols,) f32, out (rows,) f32
    _gemv_plain(w, x, out, r0, r1, 0)


@jit_exact
def _gemv_q5_k_plain(w, x, out, r0, r1):  # w (rows, nb*176) u8, x (cols,) f32, out (rows,) f32
    _gemv_plain(w, x, out, r0, r1, 1)


@jit_exact
def _gemv_q6_k_plain(w, x, out, r0, r1):  # w (rows, nb*210) u8, x (cols,) f32, out (rows,) f32
    _gemv_plain(w, x, out, r0, r1, 2)


@jit_exact
def _gemm_q4_k_plain(w, X, out, r0, r1):  # X (n, cols) f32, out (n, rows) f32
    _gemm_plain(w, X, out, r0, r1, 0)


@jit_exact
def _gemm_q5_k_plain(w, X, out, r0, r1):  # X (n, cols) f32, out (n, rows) f32
    _gemm_plain(w, X, out, r0, r1, 1)


@jit_exact
def _gemm_q6_k_plain(w, X, out, r0, r1):  # X (n, cols) f32, out (n, rows) f32
    _gemm_plain(w, X, out, r0, r1, 2)


@jit_exact
def _dequant_q4_k_plain(w, out, r0, r1):  # out (rows, cols) f32
    _dequant_plain(w, out, r0, r1, 0)


@jit_exact
def _dequant_q5_k_plain(w, out, r0, r1):  # out (rows, cols) f32
    _dequant_plain(w, out, r0, r1, 1)


@jit_exact
def _dequant_q6_k_plain(w, out, r0, r1):  # out (rows, cols) f32
    _dequant_plain(w, out, r0, r1, 2)


# ---- dispatch ----


# The vector kernels need AVX2, FMA and F16C and Numba compiling for the host; the
# switch (and FLASHLM_NO_SIMD) lives in simd.py, shared with the other kernels.
SIMD: bool = HAVE_SIMD

# impl name -> format -> (gemv, gemm, dequant); both are tested, the public names pick one.
IMPLS = {
    "simd": {
        "Q4_K": ((_gemv_q4_k_permuted, _gemm_q4_k_permuted, _dequant_q4_k_simd) if HAVE_AVX512
                 else (_gemv_q4_k_simd, _gemm_q4_k_simd, _dequant_q4_k_simd)),
        "Q5_K": (_gemv_q5_k_simd, _gemm_q5_k_simd, _dequant_q5_k_simd),
        "Q6_K": (_gemv_q6_k_simd, _gemm_q6_k_simd, _dequant_q6_k_simd),
    },
    "plain": {
        "Q4_K": (_gemv_q4_k_plain, _gemm_q4_k_plain, _dequant_q4_k_plain),
        "Q5_K": (_gemv_q5_k_plain, _gemm_q5_k_plain, _dequant_q5_k_plain),
        "Q6_K": (_gemv_q6_k_plain, _gemm_q6_k_plain, _dequant_q6_k_plain),
    },
}
_ACTIVE = IMPLS["simd" if SIMD else "plain"]
# Every Q4_K GEMV code path this CPU can run (the tests check each one).
Q4K_GEMV_PATHS = {"widen": _gemv_q4_k_simd, **({"permuted": _gemv_q4_k_permuted} if HAVE_AVX512 else {})} \
    if SIMD else {}

gemv_q4_k, gemm_q4_k, dequant_q4_k = _ACTIVE["Q4_K"]
gemv_q5_k, gemm_q5_k, dequant_q5_k = _ACTIVE["Q5_K"]
gemv_q6_k, gemm_q6_k, dequant_q6_k = _ACTIVE["Q6_K"]

KQUANT_KERNELS = {fmt: (k[0], k[1]) for fmt, k in _ACTIVE.items()}
KQUANT_DEQUANT = {fmt: k[2] for fmt, k in _ACTIVE.items()}

__all__ = [
    "KQUANT_DEQUANT", "KQUANT_KERNELS", "IMPLS", "SIMD",
    "gemv_q4_k", "gemv_q5_k", "gemv_q6_k", "gemm_q4_k", "gemm_q5_k", "gemm_q6_k",
    "dequant_q4_k", "dequant_q5_k", "dequant_q6_k",
]

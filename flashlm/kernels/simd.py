"""Explicit SIMD through Numba intrinsics that emit llvmlite vector IR.

Numba's auto-vectorizer turns a per-block dequantize-and-dot into mostly scalar
code (1.3-4 GB/s, see /work/shared/KERNELS.md). Here each format describes how to
turn one stored block into ``<16 x float>`` vectors (``<16 x i8>`` loads, and/lshr
for nibbles, a per-lane bit test for the 5th bit, ``sitofp``/``uitofp``), and two
generic code generators build, inside one ``@intrinsic``:

- ``dot_<fmt>(w, woff, x, xoff, xs, n_units) -> float32``: one row's dot product, a
  loop over the blocks of a row with ``<16 x float>`` accumulators (UNROLL=2
  independent sets for instruction-level parallelism), one FMA per block for the
  scale, and a single horizontal sum at the end. For Q4_1/Q5_1 the min term is
  ``m * xs[b]`` with ``xs`` the per-block sums of ``x`` (float32, computed once per
  GEMV by the caller; ignored by the other formats);
- ``dot_<fmt>_rows2(w, woff, X, xoff, XS, i0, n_units, out, col)`` (``DOT_ROWS``): the same
  dot for activation rows i0 and i0 + 1 of ``X`` (block sums ``XS``), each block decoded once
  for both, every row given exactly the one-row dot's operations in its order, written to
  ``out[i0 + t, col]``: the small-n GEMM's rows have the GEMV's bits (the code generator is
  one, ``_dot_body``, for any number of rows; only FMA contraction is allowed, ``_FLAGS``);
- ``decode_<fmt>(w, woff, n_units, dst, doff)``: the row dequantized to float32,
  computed exactly as ``gguf.quants.dequantize`` does (no FMA contraction), so the
  result is bit-identical.

``w`` is any array whose data holds the block bytes (``woff`` in bytes), ``x`` and
``dst`` are float32 arrays (offsets in elements). A unit is one block (32 weights)
for the quantized formats and 16 weights for F32/F16/BF16; callers handle the tail
of a float row that is not a multiple of 16. The intrinsics inline into the
calling ``@njit`` function and are cached with it (``cache=True``). Caveat of
Numba's cache: it is keyed on the caller's source file, so after editing this
file delete ``flashlm/kernels/__pycache__`` to force a recompile.

With AVX-512F (``HAVE_AVX512``; ``FLASHLM_NO_AVX512=1`` turns it off) Q4_0/Q4_1 turn
nibbles into floats by a 16-entry table lookup instead of widen + convert, and their
GEMV takes 4 blocks at a time (``dot4_<fmt>``, ``GROUP4``; see ``_make_dot4``)
(``perf/bench_simd_variants.py`` compares the paths in one process).

``HAVE_SIMD`` is true when the host CPU has AVX2, FMA and F16C (llvmlite's host
feature list), Numba compiles for the host CPU (``NUMBA_CPU_NAME`` unset) and
``FLASHLM_NO_SIMD`` is not set; otherwise the kernels fall back
to plain Numba loops (the vector IR would still be correct, only slow).
"""

from __future__ import annotations

import os
from typing import Callable

import llvmlite.binding as llb
from llvmlite import ir
import numba
import numpy as np
from numba import types
from numba.core import cgutils

from flashlm.kernels.config import intrinsic


def _host_has_simd() -> bool:
    if os.environ.get("FLASHLM_NO_SIMD", "") not in ("", "0"):
        return False
    if numba.config.CPU_NAME not in (None, "host"):  # compiling for a generic CPU
        return False
    try:
        feats = llb.get_host_cpu_features()
    except RuntimeError:  # some platforms cannot report features
        return False
    return all(feats.get(f, False) for f in ("avx2", "fma", "f16c"))


HAVE_SIMD: bool = _host_has_simd()


def _host_has_avx512() -> bool:
    if not HAVE_SIMD or os.environ.get("FLASHLM_NO_AVX512", "") not in ("", "0"):
        return False
    try:
        return bool(llb.get_host_cpu_features().get("avx512f", False))
    except RuntimeError:
        return False


# AVX-512F: Q4_0/Q4_1 nibbles become floats by one table lookup per 16 weights
# (vpermps over a constant table of the 16 possible values; it reads only the low
# 4 bits of each index, so the low nibble needs no mask) instead of mask + widen +
# convert. See ``_to_floats``.
HAVE_AVX512: bool = _host_has_avx512()

# Measured in one process (perf/bench_simd_variants.py, 512x896 and 4096x896, G weights/s
# per core on the 2-core Zen 4 this was written on): table lookup Q4_0 16.9 -> 18.7,
# Q4_1 15.8 -> 16.2. Tried and dropped, no faster: the 5-bit table (vpermi2ps) for
# Q5_0/Q5_1 (0.97x), 16 block scales per vpgatherdd (1.0x in L2, slower from DRAM).
#
# Where the time goes (same machine, inline-asm throughput loops): zmm vpermd, vpmovzxbd
# and vcvtph2ps share one shuffle pipe (a vpermd+vpmovzxbd pair takes 2.0 cycles, each
# alone 1.0), and the Q4_0 loop (vpmovzxbd, vpsrld, 2 vpermd, 3 FMA, vpbroadcastw +
# vcvtph2ps per block) runs at ~6 cycles per block. gcc -O3 -march=native on the same
# loop written with intrinsics runs at the same speed (perf/ref/q4_0_gemv.c: 19.3 G
# weights/s per core, this kernel 18.8); with the block scales already float32 in
# memory, folded into the FMA as a broadcast operand, 24.5 (1.27x): the f16 scale
# conversion is the one removable cost found. Tried to remove it in place, measured
# (kept none): converting 32 blocks' scales ahead into a stack buffer (0.8-1.09x);
# gathering 16 scales per vpermi2b over 128-byte windows (0.7-0.95x at 2 threads on the
# big shapes); a 65536-entry half->float table (1.1-1.34x when the matrix is in L2/L3,
# 0.6-0.9x when it streams from DRAM, as every matrix does in decode); software
# prefetch 1 KB ahead (1.03x mean over 36 runs, inside the noise); 4 accumulator sets
# or 8-lane vectors (1.0x, 0.8-0.9x). What paid instead: 4 blocks per step with no
# widening (``_make_dot4``, 1.4-1.6x). Not tried: float32 scales stored apart from the
# quants at import time (+2 bytes per block).

UNROLL = int(os.environ.get("FLASHLM_UNROLL", "2"))  # independent accumulator sets in the dot loop
LANES = int(os.environ.get("FLASHLM_LANES", "16"))  # float vector width of the arithmetic

_F32 = ir.FloatType()
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_V16F = ir.VectorType(_F32, 16)
_V16I8 = ir.VectorType(_I8, 16)
_V16I16 = ir.VectorType(_I16, 16)
_V16I32 = ir.VectorType(_I32, 16)
# Fast-math flags of the vector IR: FMA contraction only. Without ``reassoc`` LLVM keeps every
# sum in the order written, so a row's dot is the same operations whatever else is compiled
# around it: the multi-row kernels (``*_rows``) give each row exactly the bits of the GEMV.
# (With ``reassoc`` the GEMV's rounding differed from the same IR inside a multi-row loop;
# dropping it measured no slower on the AVX2 EPYC, 0.9-1.0x of the time in L2.)
_FLAGS = ("contract",)


# ---- IR helpers ----

def _ptr_at(builder: ir.IRBuilder, base: ir.Value, off: ir.Value | int, ty: ir.Type) -> ir.Value:
    """``(ty*)(base + off)`` with ``base`` an i8* and ``off`` in bytes."""
    if isinstance(off, int):
        off = ir.Constant(ir.IntType(64), off)
    return builder.bitcast(builder.gep(base, [off]), ty.as_pointer())


def _load(builder: ir.IRBuilder, base: ir.Value, off: ir.Value | int, ty: ir.Type) -> ir.Value:
    return builder.load(_ptr_at(builder, base, off, ty), align=1)


def _splat(builder: ir.IRBuilder, val: ir.Value, vty: ir.VectorType) -> ir.Value:
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), val, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)


def _const_vec(vty: ir.VectorType, vals: list[int] | int) -> ir.Constant:
    if isinstance(vals, int):
        vals = [vals] * vty.count
    return ir.Constant(vty, [ir.Constant(vty.element, v) for v in vals])


def _f16_scalar(builder: ir.IRBuilder, p: ir.Value, off: int) -> ir.Value:
    """The IEEE half at byte ``off``, still a half: see ``_splat_f16``."""
    return _load(builder, p, off, ir.HalfType())


def _splat_f16(builder: ir.IRBuilder, h: ir.Value, vty: ir.VectorType) -> ir.Value:
    """<n x float> of the half ``h``: broadcast as a half, then convert the vector.

    (vpbroadcastw + vcvtph2ps. Converting the scalar first made LLVM emit ``vpinsrw``
    into a register last written by an accumulator, a false dependency; removing it
    measured no faster on Zen 4, kept as it is no slower and no longer than before.)
    """
    return builder.fpext(_splat(builder, h, ir.VectorType(h.type, vty.count)), vty)


def _hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Horizontal sum of a float vector by halving shuffles (once per row)."""
    n = v.type.count
    while n > 1:
        half = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, n))))
        v = builder.fadd(lo, hi, flags=_FLAGS)
        n = half
    return builder.extract_element(v, ir.Constant(_I32, 0))


# ---- per-format block decoders: (d, m, [<16 x float> quants]) ----

def _nibbles(builder: ir.IRBuilder, p: ir.Value, off: int) -> tuple[ir.Value, ir.Value]:
    qs = _load(builder, p, off, _V16I8)
    lo = builder.and_(qs, _const_vec(_V16I8, 0x0F))
    hi = builder.lshr(qs, _const_vec(_V16I8, 4))
    return lo, hi


def _fifth_bits(builder: ir.IRBuilder, p: ir.Value, off: int) -> tuple[ir.Value, ir.Value]:
    """The 32 high bits of a Q5 block as two ``<16 x i1>`` (weights 0-15, 16-31)."""
    qh = _splat(builder, _load(builder, p, off, _I32), _V16I32)
    lo = builder.icmp_unsigned("!=", builder.and_(qh, _const_vec(_V16I32, [1 << j for j in range(16)])),
                               _const_vec(_V16I32, 0))
    hi = builder.icmp_unsigned("!=", builder.and_(qh, _const_vec(_V16I32, [1 << (j + 16) for j in range(16)])),
                               _const_vec(_V16I32, 0))
    return lo, hi


def _nibble_idx(builder: ir.IRBuilder, p: ir.Value, off: int) -> tuple[ir.Value, ir.Value]:
    """16 quant bytes as <16 x i32> table indices: the low nibble is bits 0-3 of the
    byte (the lookup ignores higher bits), the high nibble the byte shifted by 4."""
    q = builder.zext(_load(builder, p, off, _V16I8), _V16I32)
    return q, builder.lshr(q, _const_vec(_V16I32, 4))


def _parts_q4_0(b: ir.IRBuilder, p: ir.Value):
    if HAVE_AVX512:
        return _f16_scalar(b, p, 0), None, list(_nibble_idx(b, p, 2)), [i - 8 for i in range(16)]
    lo, hi = _nibbles(b, p, 2)
    eight = _const_vec(_V16I8, 8)
    return _f16_scalar(b, p, 0), None, [b.sub(q, eight) for q in (lo, hi)], "s"


def _parts_q4_1(b: ir.IRBuilder, p: ir.Value):
    if HAVE_AVX512:
        return _f16_scalar(b, p, 0), _f16_scalar(b, p, 2), list(_nibble_idx(b, p, 4)), list(range(16))
    lo, hi = _nibbles(b, p, 4)
    return _f16_scalar(b, p, 0), _f16_scalar(b, p, 2), [lo, hi], "u"


def _parts_q5_0(b: ir.IRBuilder, p: ir.Value):
    lo, hi = _nibbles(b, p, 6)
    hlo, hhi = _fifth_bits(b, p, 2)
    zero, sixteen = _const_vec(_V16I8, 0), _const_vec(_V16I8, 16)
    qs = [b.sub(q, b.select(h, zero, sixteen)) for q, h in ((lo, hlo), (hi, hhi))]  # q|h<<4 - 16
    return _f16_scalar(b, p, 0), None, qs, "s"


def _parts_q5_1(b: ir.IRBuilder, p: ir.Value):
    lo, hi = _nibbles(b, p, 8)
    hlo, hhi = _fifth_bits(b, p, 4)
    zero, sixteen = _const_vec(_V16I8, 0), _const_vec(_V16I8, 16)
    qs = [b.or_(q, b.select(h, sixteen, zero)) for q, h in ((lo, hlo), (hi, hhi))]
    return _f16_scalar(b, p, 0), _f16_scalar(b, p, 2), qs, "u"


def _parts_q8_0(b: ir.IRBuilder, p: ir.Value):
    return _f16_scalar(b, p, 0), None, [_load(b, p, off, _V16I8) for off in (2, 18)], "s"


def _parts_f32(b: ir.IRBuilder, p: ir.Value):
    return None, None, [_load(b, p, 0, _V16F)], "f"


def _parts_f16(b: ir.IRBuilder, p: ir.Value):
    return None, None, [b.fpext(_load(b, p, 0, ir.VectorType(ir.HalfType(), 16)), _V16F)], "f"


def _parts_bf16(b: ir.IRBuilder, p: ir.Value):
    v = b.shl(b.zext(_load(b, p, 0, _V16I16), _V16I32), _const_vec(_V16I32, 16))
    return None, None, [b.bitcast(v, _V16F)], "f"


# name: (weights per unit, bytes per unit, parts)
SPECS: dict[str, tuple[int, int, Callable]] = {
    "Q4_0": (32, 18, _parts_q4_0),
    "Q4_1": (32, 20, _parts_q4_1),
    "Q5_0": (32, 22, _parts_q5_0),
    "Q5_1": (32, 24, _parts_q5_1),
    "Q8_0": (32, 34, _parts_q8_0),
    "F32": (16, 64, _parts_f32),
    "F16": (16, 32, _parts_f16),
    "BF16": (16, 32, _parts_bf16),
}


# ---- code generators ----

def _lookup(builder: ir.IRBuilder, table: list, idx: ir.Value) -> ir.Value:
    """<16 x float> ``table[idx & 15]`` (vpermps, AVX-512F) for a 16-entry table."""
    fnty = ir.FunctionType(_V16F, [_V16F, _V16I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [ir.Constant(_V16F, [ir.Constant(_F32, float(v)) for v in table]), idx])


def _to_floats(builder: ir.IRBuilder, qs: list, kind, lanes: int) -> list:
    """16-lane quants -> list of <lanes x float>. ``kind``: "s"/"u" signed/unsigned i8,
    "f" already float, or a list: the table of values that <16 x i32> indices select."""
    if isinstance(kind, list):
        qs, kind = [_lookup(builder, kind, q) for q in qs], "f"
    out = []
    vf = ir.VectorType(_F32, lanes)
    for q in qs:
        parts = [q] if lanes == 16 else [
            builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(_I32, lanes), list(range(k, k + lanes))))
            for k in range(0, 16, lanes)]
        for h in parts:
            out.append(h if kind == "f" else builder.sitofp(h, vf) if kind == "s" else builder.uitofp(h, vf))
    return out


# Software prefetch of the weight stream, PREFETCH bytes ahead of the block being read.
# Measured (2 threads, weights read from memory, PREFETCH 0 vs 2048 compiled in one
# process): 1536x8960 Q4_0 1.32x, Q4_1 1.52x, Q5_0 1.27x, Q8_0 1.10x; 8960x1536 1.0-1.17x;
# 151936x896 1.0-1.09x; F16/BF16 1.0x. 1 KB and 4 KB ahead measured about the same as 2 KB.
# Long rows stay slower than short ones for Q8_0 and F16/BF16 (35 KB of activations per
# 8960-wide row do not stay in L1 next to the weight stream); see README.
PREFETCH = 2048


def _prefetch(builder: ir.IRBuilder, p: ir.Value, off: ir.Value | int, span: int = 64) -> None:
    """Prefetch the lines of the ``span`` bytes at i8* ``p + off`` (read, non-temporal hint,
    as gemv_kquant does); a prefetch never faults, so it may run past the end of the data."""
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    for k in range(0, span, 64):
        at = ir.Constant(ir.IntType(64), off + k) if isinstance(off, int) else builder.add(off, off.type(k))
        builder.call(fn, [builder.gep(p, [at]), i32(0), i32(0), i32(1)])


def _data_ptr(context, builder, aty, aval) -> ir.Value:
    arr = context.make_array(aty)(context, builder, value=aval)
    return builder.bitcast(arr.data, _I8.as_pointer())


def _row_ptrs(context, builder, aty, aval, i0: ir.Value, nr: int, col: ir.Value | None = None) -> list:
    """i8* to element [i0 + t, col] (col 0 when None) of the 2-D array ``aval``, for t < nr."""
    arr = context.make_array(aty)(context, builder, value=aval)
    stride = cgutils.unpack_tuple(builder, arr.strides, 2)[0]
    base = builder.bitcast(arr.data, _I8.as_pointer())
    if col is not None:
        base = builder.gep(base, [builder.mul(col, col.type(aty.dtype.bitwidth // 8))])
    return [builder.gep(base, [builder.mul(builder.add(i0, i0.type(t)), stride)]) for t in range(nr)]


def _store_rows(context, builder, aty, aval, i0: ir.Value, col: ir.Value, vals: list) -> None:
    """out[i0 + t, col] = vals[t] for the 2-D float32 array ``aval``."""
    for p, v in zip(_row_ptrs(context, builder, aty, aval, i0, len(vals), col), vals):
        builder.store(v, builder.bitcast(p, _F32.as_pointer()))


def _dot_body(fmt: str):
    """``body(builder, wp, xps, sps, nunits) -> [float32 per row]``: the blocks of the weight row at
    i8* ``wp`` dotted with every activation row (i8* ``xps[t]``; block sums at float* ``sps[t]``).
    Each block is decoded once; every row then gets the same operations, in the same order,
    as the one-row dot (the GEMV), so each result has the GEMV's bits."""
    unit, ubytes, parts = SPECS[fmt]

    def body(builder, wp, xps, sps, nunits):
        vf = ir.VectorType(_F32, LANES)
        zero = ir.Constant(vf, [0.0] * LANES)
        nr = len(xps)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(UNROLL)] for _ in range(nr)]
        macc = [[cgutils.alloca_once_value(builder, _F32(0.0)) for _ in range(UNROLL)] for _ in range(nr)]

        def block(k: int, idx: ir.Value):
            p = builder.gep(wp, [builder.mul(idx, idx.type(ubytes))])
            d, m, qs, kind = parts(builder, p)
            qs = _to_floats(builder, qs, kind, LANES)
            ds = None if d is None else _splat_f16(builder, d, vf)
            for r in range(nr):
                xb = builder.gep(xps[r], [builder.mul(idx, idx.type(unit * 4))])
                xv = [_load(builder, xb, 4 * LANES * j, vf) for j in range(len(qs))]
                t = builder.fmul(qs[0], xv[0], flags=_FLAGS)
                for q, v in zip(qs[1:], xv[1:]):
                    t = builder.fadd(t, builder.fmul(q, v, flags=_FLAGS), flags=_FLAGS)
                if ds is not None:
                    t = builder.fmul(ds, t, flags=_FLAGS)
                builder.store(builder.fadd(builder.load(accs[r][k]), t, flags=_FLAGS), accs[r][k])
                if m is not None:  # min term: m * (sum of x over the block), sums precomputed
                    sx = builder.load(builder.gep(sps[r], [idx]))
                    mt = builder.fmul(builder.fpext(m, _F32), sx, flags=_FLAGS)
                    builder.store(builder.fadd(builder.load(macc[r][k]), mt, flags=_FLAGS), macc[r][k])

        ngroups = builder.sdiv(nunits, nunits.type(UNROLL))
        with cgutils.for_range(builder, ngroups) as loop:
            base = builder.mul(loop.index, nunits.type(UNROLL))
            _prefetch(builder, wp, builder.add(builder.mul(base, base.type(ubytes)), base.type(PREFETCH)),
                      UNROLL * ubytes)
            for k in range(UNROLL):
                block(k, builder.add(base, base.type(k)))
        with cgutils.for_range(builder, nunits, start=builder.mul(ngroups, nunits.type(UNROLL))) as loop:
            block(0, loop.index)
        out = []
        for r in range(nr):
            total = builder.load(accs[r][0])
            for a in accs[r][1:]:
                total = builder.fadd(total, builder.load(a), flags=_FLAGS)
            res = _hsum(builder, total)
            for a in macc[r]:
                res = builder.fadd(res, builder.load(a), flags=_FLAGS)
            out.append(res)
        return out

    return body


def _make_dot(fmt: str):
    """Intrinsic ``dot(w, woff, x, xoff, xs, n_units) -> float32`` (see the module docstring)."""
    body = _dot_body(fmt)

    def gen(context, builder, sig, args):
        w, woff, x, xoff, xs, nunits = args
        wp = builder.gep(_data_ptr(context, builder, sig.args[0], w), [woff])
        xp = builder.gep(_data_ptr(context, builder, sig.args[2], x), [builder.mul(xoff, xoff.type(4))])
        sp = builder.bitcast(_data_ptr(context, builder, sig.args[4], xs), _F32.as_pointer())
        return body(builder, wp, [xp], [sp], nunits)[0]

    @intrinsic
    def dot(typingctx, w, woff, x, xoff, xs, nunits):
        sig = types.float32(w, types.intp, x, types.intp, xs, types.intp)
        return sig, gen

    dot.__name__ = dot.__qualname__ = f"dot_{fmt.lower()}"
    return dot


def _make_dot_rows(fmt: str, nr: int):
    """Intrinsic ``dot_rows(w, woff, X, xoff, XS, i0, n_units, out, col)``: out[i0 + t, col] =
    the dot of ``dot`` with X[i0 + t, xoff:] and block sums XS[i0 + t] for t < nr (X, XS, out
    2-D float32 with contiguous rows), each block of the weight row decoded once."""
    body = _dot_body(fmt)

    def gen(context, builder, sig, args):
        w, woff, X, xoff, XS, i0, nunits, out, col = args
        wp = builder.gep(_data_ptr(context, builder, sig.args[0], w), [woff])
        xps = _row_ptrs(context, builder, sig.args[2], X, i0, nr, xoff)
        sps = [builder.bitcast(p, _F32.as_pointer()) for p in _row_ptrs(context, builder, sig.args[4], XS, i0, nr)]
        _store_rows(context, builder, sig.args[7], out, i0, col, body(builder, wp, xps, sps, nunits))
        return context.get_dummy_value()

    @intrinsic
    def dot_rows(typingctx, w, woff, X, xoff, XS, i0, nunits, out, col):
        sig = types.void(w, types.intp, X, types.intp, XS, types.intp, types.intp, out, types.intp)
        return sig, gen

    dot_rows.__name__ = dot_rows.__qualname__ = f"dot_{fmt.lower()}_rows{nr}"
    return dot_rows


def _make_decode(fmt: str):
    unit, ubytes, parts = SPECS[fmt]

    def gen(context, builder, sig, args):
        w, woff, nunits, dst, doff = args
        wp = builder.gep(_data_ptr(context, builder, sig.args[0], w), [woff])
        dp = builder.gep(_data_ptr(context, builder, sig.args[3], dst), [builder.mul(doff, doff.type(4))])
        with cgutils.for_range(builder, nunits) as loop:
            idx = loop.index
            d, m, qs, kind = parts(builder, builder.gep(wp, [builder.mul(idx, idx.type(ubytes))]))
            qs = _to_floats(builder, qs, kind, 16)
            out = builder.gep(dp, [builder.mul(idx, idx.type(unit * 4))])
            for j, q in enumerate(qs):
                v = q
                if d is not None:  # exactly d * q (+ m), as gguf computes it: no FMA
                    v = builder.fmul(_splat_f16(builder, d, _V16F), q)
                if m is not None:
                    v = builder.fadd(v, _splat_f16(builder, m, _V16F))
                builder.store(v, _ptr_at(builder, out, ir.Constant(ir.IntType(64), 64 * j), _V16F), align=1)
        return context.get_dummy_value()

    @intrinsic
    def decode(typingctx, w, woff, nunits, dst, doff):
        sig = types.void(w, types.intp, types.intp, dst, types.intp)
        return sig, gen

    decode.__name__ = decode.__qualname__ = f"decode_{fmt.lower()}"
    return decode


# ---- Q4_0 / Q4_1 four blocks at a time (AVX-512F + VBMI byte permute) ----
#
# The 4 x 16 quant bytes of 4 consecutive blocks are gathered into one 64-byte vector
# (one two-source byte permute of the 64 bytes at the group start and the last block's
# 16 quant bytes), read as 16 dwords with no widening, and nibble k (k = 0..7) of every
# dword becomes a float by ``(q >> 4k)`` + a 16-entry table lookup (vpermps reads only
# the low 4 bits). Lane j of step k holds weight ``GROUP4_PERM[16k + j]`` of the group
# (block j // 4), so the caller passes x permuted the same way, once per GEMV, and the
# block scales are one word permute + convert per group, lanes 4b..4b+3 = block b.
# For Q4_1 the min term is ``m_lane * xsl[lane]`` with ``xsl`` the sums of permuted x
# per lane (each lane sees 8 weights of one block). Per 4 blocks: 2 shuffles + 7 shifts +
# 8 lookups + 8 FMA + 2 (scales) instead of 4 x (widen, shift, 2 lookups, 2 FMA, scale
# broadcast + convert, FMA). Measured on the 2-core Zen 4, in one process against the
# one-block kernel (perf/bench_simd_variants.py): Q4_1 1.28x on one core in L2, 1.17-1.36x
# at 2 threads on 151936x896, 8960x1536, 1536x8960.
GROUP4_PERM = np.array([32 * (j // 4) + 16 * (k % 2) + 4 * (j % 4) + k // 2
                        for k in range(8) for j in range(16)], np.int64)
GROUP4 = HAVE_AVX512  # the public Q4_0/Q4_1 GEMVs use the 4-block kernel (module flag: tests flip it)
_GROUP4_FMTS = {"Q4_0": (2, False, [i - 8 for i in range(16)]), "Q4_1": (4, True, list(range(16)))}


def _dot4_body(fmt: str):
    """``body(b, wp, xps, sps, ngroups) -> [float32 per row]``: the first 4*ngroups blocks of the
    row at i8* ``wp`` dotted with each row's permuted x (i8* ``xps[t]``) and lane sums (i8*
    ``sps[t]``); each group decoded once, every row the one-row kernel's operations."""
    qoff, has_min, table = _GROUP4_FMTS[fmt]
    ubytes = SPECS[fmt][1]
    v64, v16i32 = ir.VectorType(_I8, 64), ir.VectorType(_I32, 64)
    gather = [ubytes * (i // 16) + qoff + i % 16 if i < 48 else 64 + i % 16 for i in range(64)]

    def body(b, wp, xps, sps, ngroups):
        nr = len(xps)
        zero = ir.Constant(_V16F, [0.0] * 16)
        acc = [cgutils.alloca_once_value(b, zero) for _ in range(nr)]
        macc = [cgutils.alloca_once_value(b, zero) for _ in range(nr)]
        with cgutils.for_range(b, ngroups) as loop:
            g = loop.index
            p = b.gep(wp, [b.mul(g, g.type(4 * ubytes))])
            _prefetch(b, p, PREFETCH, 4 * ubytes)
            head = _load(b, p, 0, v64)  # blocks 0-2 whole, block 3's header (and some quants)
            tail = _load(b, p, 3 * ubytes + qoff, _V16I8)  # block 3's quants
            tail = b.shuffle_vector(tail, ir.Constant(_V16I8, ir.Undefined),
                                    ir.Constant(ir.VectorType(_I32, 64), list(range(16)) * 4))
            q = b.bitcast(b.shuffle_vector(head, tail, ir.Constant(v16i32, gather)), _V16I32)
            words = b.bitcast(head, ir.VectorType(_I16, 32))

            def scale(o: int) -> ir.Value:  # the half at byte o of each block, lanes 4b..4b+3
                idx = [(ubytes * (j // 4) + o) // 2 for j in range(16)]
                h = b.shuffle_vector(words, words, ir.Constant(ir.VectorType(_I32, 16), idx))
                return b.fpext(b.bitcast(h, ir.VectorType(ir.HalfType(), 16)), _V16F)

            fs = [_lookup(b, table, q if k == 0 else b.lshr(q, _const_vec(_V16I32, 4 * k))) for k in range(8)]
            d = scale(0)
            mn = scale(2) if has_min else None
            for r in range(nr):
                xb = b.gep(xps[r], [b.mul(g, g.type(512))])
                t = [None, None]
                for k in range(8):
                    pr = b.fmul(fs[k], _load(b, xb, 64 * k, _V16F), flags=_FLAGS)
                    t[k % 2] = pr if t[k % 2] is None else b.fadd(t[k % 2], pr, flags=_FLAGS)
                tq = b.fadd(t[0], t[1], flags=_FLAGS)
                b.store(b.fadd(b.load(acc[r]), b.fmul(tq, d, flags=_FLAGS), flags=_FLAGS), acc[r])
                if has_min:
                    sv = _load(b, sps[r], b.mul(g, g.type(64)), _V16F)
                    b.store(b.fadd(b.load(macc[r]), b.fmul(mn, sv, flags=_FLAGS), flags=_FLAGS), macc[r])
        return [_hsum(b, b.fadd(b.load(acc[r]), b.load(macc[r]), flags=_FLAGS)) for r in range(nr)]

    return body


def _make_dot4(fmt: str):
    """Intrinsic ``dot4(w, woff, xp, xsl, ngroups) -> float32``: the first 4*ngroups blocks of
    the row at byte ``woff`` of ``w`` dotted with ``xp`` (x permuted by GROUP4_PERM per
    128 weights); ``xsl`` (ngroups*16,) the per-lane sums of ``xp`` (Q4_1's min term)."""
    body = _dot4_body(fmt)

    def gen(context, b, sig, args):
        w, woff, xv, xsl, ngroups = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        return body(b, wp, [_data_ptr(context, b, sig.args[2], xv)], [_data_ptr(context, b, sig.args[3], xsl)],
                    ngroups)[0]

    @intrinsic
    def dot4(typingctx, w, woff, xp, xsl, ngroups):
        return types.float32(w, types.intp, xp, xsl, types.intp), gen

    dot4.__name__ = dot4.__qualname__ = f"dot4_{fmt.lower()}"
    return dot4


def _make_dot4_rows(fmt: str, nr: int):
    """Intrinsic ``dot4_rows(w, woff, XP, XSL, i0, ngroups, out, col)``: out[i0 + t, col] = ``dot4``
    on rows i0 + t of XP (n, ngroups*128) and XSL (n, ngroups*16), for t < nr."""
    body = _dot4_body(fmt)

    def gen(context, b, sig, args):
        w, woff, XP, XSL, i0, ngroups, out, col = args
        wp = b.gep(_data_ptr(context, b, sig.args[0], w), [woff])
        res = body(b, wp, _row_ptrs(context, b, sig.args[2], XP, i0, nr),
                   _row_ptrs(context, b, sig.args[3], XSL, i0, nr), ngroups)
        _store_rows(context, b, sig.args[6], out, i0, col, res)
        return context.get_dummy_value()

    @intrinsic
    def dot4_rows(typingctx, w, woff, XP, XSL, i0, ngroups, out, col):
        return types.void(w, types.intp, XP, XSL, types.intp, types.intp, out, types.intp), gen

    dot4_rows.__name__ = dot4_rows.__qualname__ = f"dot4_{fmt.lower()}_rows{nr}"
    return dot4_rows


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret a uint32 as float32 (plain LLVM bitcast, no vector unit needed)."""
    def gen(context, builder, sig, args):
        return builder.bitcast(args[0], _F32)

    if not isinstance(bits, types.Integer):
        return None
    return types.float32(types.uint32), gen


DOT = {fmt: _make_dot(fmt) for fmt in SPECS}
DECODE = {fmt: _make_decode(fmt) for fmt in SPECS}
# Module-level names, so jitted code can refer to them as globals.
dot_q4_0, dot_q4_1, dot_q5_0, dot_q5_1, dot_q8_0 = (DOT[f] for f in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
dot_f32, dot_f16, dot_bf16 = DOT["F32"], DOT["F16"], DOT["BF16"]
decode_q4_0, decode_q4_1, decode_q5_0, decode_q5_1, decode_q8_0 = (
    DECODE[f] for f in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
decode_f32, decode_f16, decode_bf16 = DECODE["F32"], DECODE["F16"], DECODE["BF16"]
DOT4 = {fmt: _make_dot4(fmt) for fmt in _GROUP4_FMTS}
dot4_q4_0, dot4_q4_1 = DOT4["Q4_0"], DOT4["Q4_1"]
# Multi-row kernels: ROWS activation rows per call share each decoded block (an odd last row takes
# the one-row dot), and the GEMM drivers run them over TILE weight rows at a time for each pair
# of activation rows, so the pair's x stays in L1 while the tile's weights (read from memory
# once) stay in L2. The quantized formats, whose decode costs more than their FMAs, also have a
# four-row dot (``DOT_ROWS4``; the drivers take 4 rows at a time, then a pair, then one).
# Measured on the AVX2 EPYC, one core, 256 x 1536 in L2, time per row against the GEMV (n = 4..32):
# pairs / groups of 4 rows: Q5_1 0.76 / 0.49, Q4_0 0.57 / 0.47, Q4_1 0.72 / 0.60, Q8_0 0.62-0.79 /
# 0.57-0.82, Q5_0R 0.64-0.71 / 0.60-0.72, F16 0.33-0.40 / 0.49-0.51 (4 rows spill the 16 ymm
# registers), Q4_KR 0.73-0.80 / 0.90-0.96; a 32-row tile against none: 0.7-1.0x of the time.
ROWS = 2
TILE = 32
DOT_ROWS = {fmt: _make_dot_rows(fmt, ROWS) for fmt in SPECS}
DOT_ROWS4 = {fmt: _make_dot_rows(fmt, 4) for fmt in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")}
DOT4_ROWS = {fmt: _make_dot4_rows(fmt, ROWS) for fmt in _GROUP4_FMTS}

__all__ = ["DECODE", "DOT", "DOT4", "DOT4_ROWS", "DOT_ROWS", "DOT_ROWS4", "GROUP4", "GROUP4_PERM", "HAVE_AVX512", "HAVE_SIMD",
           "ROWS", "SPECS", "TILE", "bits_to_f32"]

"""Non-matmul kernels of a transformer forward pass: rmsnorm, rope, silu_mul,
softmax, attention over a KV cache, and the KV-cache write.

Every op is a private compiled ``_kernel`` plus a public wrapper that checks dtype,
contiguity and shape. All arrays are float32, except KV caches, which may also be f16:
uint16 arrays of IEEE half bits (``runtime.kvcache``), converted as they are read and
written. Numerics follow Hugging Face transformers (the reference the tests compare
against): rmsnorm is ``x * rsqrt(mean(x^2) + eps) * weight``, rope uses HF's float32
``inv_freq`` and cos/sin tables, attention is ``softmax(q k^T / sqrt(D) + causal mask) v``.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from flashlm.errors import UnsupportedError
from flashlm.kernels.config import CACHE, intrinsic, jit, jit_exact
from flashlm.kernels.simd import HAVE_SIMD

__all__ = ["rmsnorm", "rope", "silu_mul", "softmax", "attention", "attention_batch", "kv_write", "kv_write_batch",
           "rope_inv_freq"]


# ---- helpers ----

def _check(name: str, a: np.ndarray, ndim: int | None = None) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise TypeError(f"{name}: expected a float32 numpy array, got {getattr(a, 'dtype', type(a))}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous (use np.ascontiguousarray)")


def _out(name: str, out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    _check(name, out)
    if out.shape != shape:
        raise ValueError(f"{name}: out has shape {out.shape}, expected {shape}")
    return out


@intrinsic
def _f32_to_bits(typingctx, x):
    """The bits of a float32 as a uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_to_f32(typingctx, x):
    """Reinterpret the bits of an int32 as a float32 (vectorizes, unlike a view)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


# ---- f16 KV-cache elements ----
# An f16 KV cache is a uint16 array of IEEE half bits (Numba has no float16 arrays). With F16C
# (``simd.HAVE_SIMD``) the conversions are LLVM's fpext / fptrunc of half, one vcvtph2ps /
# vcvtps2ph per 8 elements; without it (an old CPU, NUMBA_CPU_NAME=generic, FLASHLM_NO_SIMD)
# LLVM would call a runtime function the JIT does not link, so the same conversions are done
# with integer operations (exact, the same bits).

_HALF_TO_F32_SUBNORMAL = 2.0 ** -24


def _half_to_f32(b, h, f32):
    """IR: IEEE halves ``h`` (i16 or <n x i16>) to float32 (``f32``: float or <n x float>), exact."""
    if HAVE_SIMD:
        return b.fpext(b.bitcast(h, ir.VectorType(ir.HalfType(), h.type.count) if isinstance(h.type, ir.VectorType)
                                 else ir.HalfType()), f32)
    i32 = ir.VectorType(ir.IntType(32), h.type.count) if isinstance(h.type, ir.VectorType) else ir.IntType(32)

    def c(x):
        return ir.Constant(i32, [x] * i32.count) if isinstance(i32, ir.VectorType) else ir.Constant(i32, x)

    w = b.zext(h, i32)
    sign = b.shl(b.and_(w, c(0x8000)), c(16))
    em = b.and_(w, c(0x7FFF))  # exponent and mantissa
    normal = b.add(b.shl(em, c(13)), c(0x38000000))  # exponent rebased by 127 - 15
    infnan = b.or_(b.shl(em, c(13)), c(0x7F800000))
    sub = b.bitcast(b.fmul(b.uitofp(em, f32), ir.Constant(f32, [_HALF_TO_F32_SUBNORMAL] * f32.count)
                           if isinstance(f32, ir.VectorType) else ir.Constant(f32, _HALF_TO_F32_SUBNORMAL)), i32)
    bits = b.select(b.icmp_unsigned("<", em, c(0x400)), sub,
                    b.select(b.icmp_unsigned(">=", em, c(0x7C00)), infnan, normal))
    return b.bitcast(b.or_(bits, sign), f32)


@intrinsic
def _f32(typingctx, x):
    """A KV-cache element as float32: a float32 as it is, a uint16 as the IEEE half whose bits
    it holds (exact)."""
    if x == types.float32:
        return types.float32(x), lambda context, builder, signature, args: args[0]
    if x != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return _half_to_f32(builder, args[0], ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _f16_bits_hw(typingctx, x):
    """float32 -> IEEE half bits by LLVM's fptrunc (vcvtps2ph: round to nearest even)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@jit_exact
def _f16_bits_sw(x):
    """float32 -> IEEE half bits with integer operations, as numpy's ``astype(np.float16)``:
    round to nearest even, inf past the largest half, a nan keeps the top of its payload."""
    u = _f32_to_bits(x)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf or nan (numpy: payload >> 13, at least 1 for a nan)
        m = (a & np.uint32(0x7FFFFF)) >> np.uint32(13)
        if a > np.uint32(0x7F800000) and m == 0:
            m = np.uint32(1)
        return np.uint16(sign | np.uint32(0x7C00) | m)
    if a >= np.uint32(0x47800000):  # >= 65536: overflow
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below the smallest normal half: round at 2**-24 by adding 0.5
        f = _bits_to_f32(np.int32(a)) + np.float32(0.5)  # (a float add rounds to nearest even)
        return np.uint16(sign | (_f32_to_bits(f) - np.uint32(0x3F000000)))
    odd = (a >> np.uint32(13)) & np.uint32(1)  # to nearest even; a carry may reach inf, as it should
    return np.uint16(sign | ((a - np.uint32(0x38000000) + np.uint32(0xFFF) + odd) >> np.uint32(13)))


_f16_bits = _f16_bits_hw if HAVE_SIMD else _f16_bits_sw


# Deliberately not `jit`: `reassoc` would let LLVM fold the two-step (Cody-Waite)
# range reduction into one multiply and lose ~20 ulp; `contract` (FMA) only helps.
@numba.njit(nogil=True, cache=CACHE, fastmath={"contract"})
def _expf(x):
    """float32 exp that LLVM can vectorize (Cephes polynomial, about 3 ulp).

    Results above 2.4e38 (x > 88.376) are inf and results below 1.2e-38 are 0
    (no denormals); inf and nan propagate.
    """
    xc = min(max(x, np.float32(-87.33654)), np.float32(88.37626))
    fx = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - fx * np.float32(0.693359375)
    r = r - fx * np.float32(-2.12194440e-4)
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * (r * r) + r + np.float32(1.0)
    res = y * _bits_to_f32((np.int32(fx) + np.int32(127)) << np.int32(23))
    if x < np.float32(-87.33654):
        res = np.float32(0.0)
    if x > np.float32(88.37626):
        res = np.float32(np.inf)
    if x != x:
        res = x
    return res


# ---- rmsnorm ----

@jit
def _rmsnorm(x, w, eps, out):
    # x (n, d) f32, w (d,) f32, out (n, d) f32; out may be x
    n, d = x.shape
    for i in range(n):
        ss = 0.0  # float64 sum of squares
        for j in range(d):
            v = np.float64(x[i, j])
            ss += v * v
        r = np.float32(1.0) / np.sqrt(np.float32(ss / d) + eps)
        for j in range(d):
            out[i, j] = (x[i, j] * r) * w[j]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float,
            out: np.ndarray | None = None) -> np.ndarray:
    """RMS norm over the last axis: ``x * rsqrt(mean(x^2) + eps) * weight``.

    Args:
        x: (..., d) float32, C-contiguous (e.g. (n, d), or (n, heads, head_dim)
            for qwen3's per-head q/k norm).
        weight: (d,) float32.
        eps: added to the mean square.
        out: optional (..., d) float32 result buffer; may be ``x`` (in place).
    Returns:
        out, same shape as x.
    """
    _check("rmsnorm x", x)
    _check("rmsnorm weight", weight, 1)
    d = x.shape[-1] if x.ndim else 0
    if x.ndim == 0 or weight.shape[0] != d:
        raise ValueError(f"rmsnorm: x shape {x.shape} does not end in weight length {weight.shape[0]}")
    out = _out("rmsnorm out", out, x.shape)
    _rmsnorm(x.reshape(-1, d), weight, np.float32(eps), out.reshape(-1, d))
    return out


# ---- activations ----

# FMA contraction only (no reciprocal or reassociation shortcuts), row by row: an element's bits
# depend on its value alone, not on where it falls in the vectorized loop, so a row of a batch
# equals the same row alone.
@jit(error_model="numpy", fastmath={"contract": True})  # numpy: no ZeroDivisionError branch (it blocks vectorizing)
def _silu_mul(g, u, out):
    # g, u, out (n, m) f32
    for r in range(g.shape[0]):
        for i in range(g.shape[1]):
            x = g[r, i]
            out[r, i] = x / (np.float32(1.0) + _expf(-x)) * u[r, i]


def silu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """SwiGLU activation ``silu(gate) * up`` with ``silu(x) = x / (1 + exp(-x))``.

    Args:
        gate: (n, f) float32 (any shape, C-contiguous).
        up: same shape as gate.
        out: optional result buffer of that shape; may be gate or up.
    Returns:
        out.
    """
    _check("silu_mul gate", gate)
    _check("silu_mul up", up)
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate shape {gate.shape} != up shape {up.shape}")
    out = _out("silu_mul out", out, gate.shape)
    if gate.size:
        m = gate.shape[-1] if gate.ndim else 1
        _silu_mul(gate.reshape(-1, m), up.reshape(-1, m), out.reshape(-1, m))
    return out


@jit
def _softmax(x, out):
    # x, out (n, m) f32; out may be x
    n, m = x.shape
    for i in range(n):
        mx = x[i, 0]
        for j in range(1, m):
            mx = max(mx, x[i, j])
        s = np.float32(0.0)
        for j in range(m):
            e = _expf(x[i, j] - mx)
            out[i, j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(m):
            out[i, j] *= inv


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Numerically stable softmax over the last axis (max subtracted first).

    Args:
        x: (..., m) float32, C-contiguous, m >= 1.
        out: optional result buffer of x's shape; may be x.
    Returns:
        out.
    """
    _check("softmax x", x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"softmax: x must have a non-empty last axis, got shape {x.shape}")
    out = _out("softmax out", out, x.shape)
    m = x.shape[-1]
    _softmax(x.reshape(-1, m), out.reshape(-1, m))
    return out


# ---- rope ----

def rope_inv_freq(theta: float, rotary_dim: int, scaling: dict | None = None) -> np.ndarray:
    """HF's float32 ``inv_freq = 1 / theta ** (arange(0, d, 2) / d)``, with rope scaling.

    Args:
        theta: rope base (``rope_theta``).
        rotary_dim: number of rotated dimensions d (even).
        scaling: HF ``rope_scaling`` dict or None. Types "default", "linear"
            (``factor``) and "llama3" (``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``).
    Returns:
        (d // 2,) float32.
    """
    expo = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    # torch computes theta ** expo in float32; rounding the exact value is within 1 ulp of it
    inv = np.float32(1.0) / (float(theta) ** expo.astype(np.float64)).astype(np.float32)
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = np.float32(2 * math.pi) / inv
        inv_l = np.where(wavelen > low_wl, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
        smoothed = (np.float32(1) - smooth) * inv_l / np.float32(factor) + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32)
    raise UnsupportedError(
        f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def _cos_sin(inv: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # HF: freqs = pos.float() * inv_freq in float32, then cos/sin in float32
    freqs = positions.astype(np.float32)[:, None] * inv[None, :]
    f64 = freqs.astype(np.float64)
    return np.cos(f64).astype(np.float32), np.sin(f64).astype(np.float32)


_TABLE_MAX = 1 << 18  # positions beyond this get cos/sin computed per call
_tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_tables_lock = threading.Lock()


def _rope_table(theta: float, rd: int, scaling: dict | None, need: int) -> tuple[np.ndarray, np.ndarray]:
    key = (float(theta), rd, repr(sorted(scaling.items())) if scaling else None)
    with _tables_lock:
        tab = _tables.get(key)
        if tab is None or tab[0].shape[0] < need:
            size = max(1024, 1 << (need - 1).bit_length())
            tab = _cos_sin(rope_inv_freq(theta, rd, scaling), np.arange(size))
            _tables[key] = tab
    return tab


@jit
def _rope(x, pos, cos, sin, rd, neox):
    # x (n, H, D) f32 in place; pos (n,) int64 rows of cos/sin; cos, sin (P, rd // 2) f32
    n, nh, _ = x.shape
    half = rd // 2
    for i in range(n):
        p = pos[i]
        for h in range(nh):
            if neox:  # pairs (j, j + half): HF rotate_half
                for j in range(half):
                    c = cos[p, j]
                    s = sin[p, j]
                    x0 = x[i, h, j]
                    x1 = x[i, h, j + half]
                    x[i, h, j] = x0 * c - x1 * s
                    x[i, h, j + half] = x1 * c + x0 * s
            else:  # pairs (2j, 2j + 1): llama.cpp "norm" mode
                for j in range(half):
                    c = cos[p, j]
                    s = sin[p, j]
                    x0 = x[i, h, 2 * j]
                    x1 = x[i, h, 2 * j + 1]
                    x[i, h, 2 * j] = x0 * c - x1 * s
                    x[i, h, 2 * j + 1] = x1 * c + x0 * s


def rope(x: np.ndarray, positions: np.ndarray, theta: float, layout: str = "neox",
         rotary_dim: int | None = None, scaling: dict | None = None) -> np.ndarray:
    """Rotary position embedding, in place.

    Args:
        x: (n, n_heads, head_dim) float32, C-contiguous; rotated in place.
        positions: (n,) integer absolute positions (decode: just the positions).
        theta: rope base.
        layout: "neox" (HF rotate_half, pairs (i, i + d/2)) or "interleaved"
            (pairs (2i, 2i + 1), llama GGUF files).
        rotary_dim: rotate only the first rotary_dim dims (default head_dim).
        scaling: HF ``rope_scaling`` dict (see :func:`rope_inv_freq`) or None.
    Returns:
        x.
    """
    _check("rope x", x, 3)
    n, _, hd = x.shape
    rd = hd if rotary_dim is None else int(rotary_dim)
    if rd <= 0 or rd > hd or rd % 2:
        raise ValueError(f"rope: rotary_dim {rd} must be even and in 2..head_dim ({hd})")
    if layout not in ("neox", "interleaved"):
        raise ValueError(f"rope: layout must be 'neox' or 'interleaved', got {layout!r}")
    pos = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
    if pos.shape[0] != n:
        raise ValueError(f"rope: {pos.shape[0]} positions for {n} rows of x")
    if n == 0:
        return x
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0:
        raise ValueError(f"rope: negative position {lo}")
    if hi < _TABLE_MAX:
        cos, sin = _rope_table(theta, rd, scaling, hi + 1)
    else:
        cos, sin = _cos_sin(rope_inv_freq(theta, rd, scaling), pos)
        pos = np.arange(n, dtype=np.int64)
    _rope(x, pos, cos, sin, rd, layout == "neox")
    return x


# ---- attention ----
# Every float operation of attention is FMA contraction at most, never reassociation, so a row's
# result is the same operations in the same order whatever the context: the number of query
# tokens in the call (a draft verification equals one-token steps), the heads a thread takes
# (pool or not), the caller the kernel is compiled into (the executor's table tasks or a direct
# call), the tile a row falls in. The q.k dot products and the p.v sums are explicit vector IR
# (``_qk_tile``, ``_pv_tile``) over tiles of up to 4 rows (a group's query heads, no padded rows),
# each row's operations the same in every tile; everything else is elementwise or spelled out in a
# fixed order. For one token at depth 4096 on the 2-core AVX2 VM (f16 cache, the three real
# models' shapes, all layers, `/tmp`-style A/B in one process) these tiles took 0.69-0.82 of the
# time of the 4x2 dots with a lane sum per dot and the scalar-coded p.v loop before them (1 and 2
# threads); a software prefetch of the rows ahead measured no faster (0.93-1.05x) and was dropped,
# and so were tiles of 4, 2 and 1 rows only (a group of 7 heads as 4 + 2 + 1: 0.83-0.93x of 4 + 3).
# The tiles cost a first run 2-3 s more to compile the f16 attention task (6 -> 8-10 s, one process).

_CONTRACT = {"contract": True}
_V8F = ir.VectorType(ir.FloatType(), 8)
_V8I16 = ir.VectorType(ir.IntType(16), 8)


def _hpair(b, x, y):
    """IR: [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7] (``vhaddps``)."""
    i32 = ir.IntType(32)
    ev = b.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 8), [0, 2, 8, 10, 4, 6, 12, 14]))
    od = b.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 8), [1, 3, 9, 11, 5, 7, 13, 15]))
    return b.fadd(ev, od, flags=("contract",))


def _hsum8x8(b, vs):
    """IR: the lane sums of 8 vectors <8 x float> as one vector, lane i the sum of ``vs[i]`` in the
    fixed tree ((0+1)+(2+3)) + ((4+5)+(6+7)): six pairwise adds, two shuffles and one add for
    all eight (a sum of one vector alone is 3 shuffles and 3 adds)."""
    i32 = ir.IntType(32)
    x = [_hpair(b, vs[i], vs[i + 1]) for i in range(0, 8, 2)]
    y0, y1 = _hpair(b, x[0], x[1]), _hpair(b, x[2], x[3])
    lo = b.shuffle_vector(y0, y1, ir.Constant(ir.VectorType(i32, 8), [0, 1, 2, 3, 8, 9, 10, 11]))
    hi = b.shuffle_vector(y0, y1, ir.Constant(ir.VectorType(i32, 8), [4, 5, 6, 7, 12, 13, 14, 15]))
    return b.fadd(lo, hi, flags=("contract",))


def _arr(context, b, sig, args, i):
    """(data as i8*, strides, shape) of array argument ``i`` of an intrinsic."""
    a = context.make_array(sig.args[i])(context, b, value=args[i])
    return (b.bitcast(a.data, ir.IntType(8).as_pointer()), cgutils.unpack_tuple(b, a.strides, sig.args[i].ndim),
            cgutils.unpack_tuple(b, a.shape, sig.args[i].ndim))


def _load_kv8(b, p, f16):
    """IR: 8 cache elements at ``p`` (i8*) as <8 x float>."""
    if f16:
        return _half_to_f32(b, b.load(b.bitcast(p, _V8I16.as_pointer()), align=2), _V8F)
    return b.load(b.bitcast(p, _V8F.as_pointer()), align=4)


def _qk_tile(nr):
    """The intrinsic ``_qk{nr}x2(qs, r0, k, kvh, t, t2, s)``: s[r0 + i, t] = qs[r0 + i] . k[kvh, t]
    and s[r0 + i, t2] = qs[r0 + i] . k[kvh, t2] for i < nr: 8 lanes of products summed over d in
    order (FMA), the lanes summed by ``_hsum8x8`` (the same tree for every row and tile size),
    then the last D % 8 products in order. qs (R, D), s (R, T') float32, k (Hkv, T, D) float32 or
    uint16 (f16 bits: 8 keys load as <8 x i16>, bitcast to <8 x half>, fpext to <8 x float>:
    ``_half_to_f32``), contiguous rows. A row's values do not depend on ``nr`` or on the other rows."""

    def qk(typingctx, qs, r0, k, kvh, t, t2, s):
        f16 = k.dtype == types.uint16
        if not f16 and k.dtype != types.float32:
            return None

        def gen(context, b, sig, args):
            qs, r0, k, kvh, t, t2, s = args
            f32 = ir.FloatType()
            fl = ("contract",)
            qp, qst, qsh = _arr(context, b, sig, args, 0)
            kp, kst, _ = _arr(context, b, sig, args, 2)
            sp, sst, _ = _arr(context, b, sig, args, 6)
            dd = qsh[1]
            rows = [b.gep(qp, [b.mul(b.add(r0, r0.type(i)), qst[0])]) for i in range(nr)]
            keys = [b.gep(kp, [b.add(b.mul(kvh, kst[0]), b.mul(tt, kst[1]))]) for tt in (t, t2)]
            zero = ir.Constant(_V8F, [0.0] * 8)
            acc = [[cgutils.alloca_once_value(b, zero) for _ in range(2)] for _ in range(nr)]
            n8 = b.sdiv(dd, dd.type(8))
            with cgutils.for_range(b, n8) as loop:
                off = b.mul(loop.index, loop.index.type(32))
                koff = b.mul(loop.index, loop.index.type(16 if f16 else 32))
                kv = [_load_kv8(b, b.gep(kk, [koff]), f16) for kk in keys]
                for i in range(nr):
                    qv = b.load(b.bitcast(b.gep(rows[i], [off]), _V8F.as_pointer()), align=4)
                    for c in range(2):
                        b.store(b.fadd(b.load(acc[i][c]), b.fmul(qv, kv[c], flags=fl), flags=fl), acc[i][c])
            tot = _hsum8x8(b, [b.load(acc[i][c]) if i < nr else zero for i in range(4) for c in range(2)])
            res = [[cgutils.alloca_once_value(b, b.extract_element(tot, ir.Constant(ir.IntType(32), 2 * i + c)))
                    for c in range(2)] for i in range(nr)]
            with cgutils.for_range(b, dd, start=b.mul(n8, dd.type(8))) as loop:
                off = b.mul(loop.index, loop.index.type(4))
                if f16:
                    koff = b.mul(loop.index, loop.index.type(2))
                    kv = [_half_to_f32(b, b.load(b.bitcast(b.gep(kk, [koff]), ir.IntType(16).as_pointer())), f32)
                          for kk in keys]
                else:
                    kv = [b.load(b.bitcast(b.gep(kk, [off]), f32.as_pointer())) for kk in keys]
                for i in range(nr):
                    qv = b.load(b.bitcast(b.gep(rows[i], [off]), f32.as_pointer()))
                    for c in range(2):
                        b.store(b.fadd(b.load(res[i][c]), b.fmul(qv, kv[c], flags=fl), flags=fl), res[i][c])
            for c, tt in enumerate((t, t2)):
                for i in range(nr):
                    at = b.add(b.mul(b.add(r0, r0.type(i)), sst[0]), b.mul(tt, tt.type(4)))
                    b.store(b.load(res[i][c]), b.bitcast(b.gep(sp, [at]), f32.as_pointer()))
            return context.get_dummy_value()

        return types.void(qs, types.intp, k, types.intp, types.intp, types.intp, s), gen

    qk.__name__ = qk.__qualname__ = f"_qk{nr}x2"
    return intrinsic(qk)


_qk1x2, _qk2x2, _qk3x2, _qk4x2 = (_qk_tile(nr) for nr in (1, 2, 3, 4))


def _pv_tile(nr, nv):
    """The intrinsic ``_pv{nr}x{nv}(s, v, kvh, r0, t0, t1, o, d0)``: for rows r0..r0+nr-1 and
    elements d0..d0+8nv-1, o[r, d] += s[r, t] v[kvh, t, d] for t0 <= t < t1 in key order, one FMA
    per key: the o values stay in registers over the keys (nr x nv vectors), each 8 values of v
    load (and convert, f16) once for all nr rows. s (R, T), o (R, D) float32, v (Hkv, T, D) float32
    or uint16 (f16 bits). Every element gets the same operations whatever nr, nv and the range
    split, so a row's result does not depend on the tiling."""

    def pv(typingctx, s, v, kvh, r0, t0, t1, o, d0):
        f16 = v.dtype == types.uint16
        if not f16 and v.dtype != types.float32:
            return None

        def gen(context, b, sig, args):
            s, v, kvh, r0, t0, t1, o, d0 = args
            f32 = ir.FloatType()
            fl = ("contract",)
            sp, sst, _ = _arr(context, b, sig, args, 0)
            vp, vst, _ = _arr(context, b, sig, args, 1)
            op, ost, _ = _arr(context, b, sig, args, 6)
            es = 2 if f16 else 4
            orow = [b.gep(op, [b.add(b.mul(b.add(r0, r0.type(i)), ost[0]), b.mul(d0, d0.type(4)))])
                    for i in range(nr)]
            optr = [[b.bitcast(b.gep(orow[i], [ir.Constant(ir.IntType(64), 32 * j)]), _V8F.as_pointer())
                     for j in range(nv)] for i in range(nr)]
            acc = [[cgutils.alloca_once_value(b, b.load(optr[i][j], align=4)) for j in range(nv)] for i in range(nr)]
            vbase = b.add(b.mul(kvh, vst[0]), b.mul(d0, d0.type(es)))
            srow = [b.mul(b.add(r0, r0.type(i)), sst[0]) for i in range(nr)]
            with cgutils.for_range(b, t1, start=t0) as loop:
                t = loop.index
                vrow = b.gep(vp, [b.add(vbase, b.mul(t, vst[1]))])
                vv = [_load_kv8(b, b.gep(vrow, [ir.Constant(ir.IntType(64), 8 * es * j)]), f16) for j in range(nv)]
                st = b.mul(t, t.type(4))
                for i in range(nr):
                    p = b.load(b.bitcast(b.gep(sp, [b.add(srow[i], st)]), f32.as_pointer()))
                    pb = b.shuffle_vector(b.insert_element(ir.Constant(_V8F, ir.Undefined), p, ir.Constant(ir.IntType(32), 0)),
                                          ir.Constant(_V8F, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
                    for j in range(nv):
                        b.store(b.fadd(b.load(acc[i][j]), b.fmul(pb, vv[j], flags=fl), flags=fl), acc[i][j])
            for i in range(nr):
                for j in range(nv):
                    b.store(b.load(acc[i][j]), optr[i][j], align=4)
            return context.get_dummy_value()

        return types.void(s, v, types.intp, types.intp, types.intp, types.intp, o, types.intp), gen

    pv.__name__ = pv.__qualname__ = f"_pv{nr}x{nv}"
    return intrinsic(pv)


_pv1x2, _pv2x2, _pv3x2, _pv4x2 = (_pv_tile(nr, 2) for nr in (1, 2, 3, 4))
_pv1x1 = _pv_tile(1, 1)


@jit(fastmath=_CONTRACT)
def _sum8(s, r, n):
    # s[r, :n] summed in 8 interleaved partial sums (t % 8), in order, then a fixed tree
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    n8 = n // 8 * 8
    for t in range(0, n8, 8):
        a0 += s[r, t]
        a1 += s[r, t + 1]
        a2 += s[r, t + 2]
        a3 += s[r, t + 3]
        a4 += s[r, t + 4]
        a5 += s[r, t + 5]
        a6 += s[r, t + 6]
        a7 += s[r, t + 7]
    acc = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))
    for t in range(n8, n):
        acc += s[r, t]
    return acc


@jit(fastmath=_CONTRACT)
def _max8(s, r, n):
    # max of s[r, :n] (n >= 1) in 8 interleaved partial maxima (vectorizes; a max is the same
    # value in any order)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = s[r, 0]
    n8 = n // 8 * 8
    for t in range(0, n8, 8):
        m0 = max(m0, s[r, t])
        m1 = max(m1, s[r, t + 1])
        m2 = max(m2, s[r, t + 2])
        m3 = max(m3, s[r, t + 3])
        m4 = max(m4, s[r, t + 4])
        m5 = max(m5, s[r, t + 5])
        m6 = max(m6, s[r, t + 6])
        m7 = max(m7, s[r, t + 7])
    mx = max(max(max(m0, m4), max(m2, m6)), max(max(m1, m5), max(m3, m7)))
    for t in range(n8, n):
        mx = max(mx, s[r, t])
    return mx


@jit(fastmath=_CONTRACT)
def _scores(qs, k, kvh, r0, nr, t0, t1, s):
    # s[r0:r0+nr, t0:t1] = qs[r0:r0+nr] . k[kvh, t0:t1], nr <= 4; qs (R, D), k (Hkv, T, D), s (R, T)
    # Two keys per step: 2 nr dot products share each load of q and k.
    t = t0
    while t < t1:
        t2 = min(t + 1, t1 - 1)  # (a repeat of the key at an odd end)
        if nr == 4:
            _qk4x2(qs, r0, k, kvh, t, t2, s)
        elif nr == 3:
            _qk3x2(qs, r0, k, kvh, t, t2, s)
        elif nr == 2:
            _qk2x2(qs, r0, k, kvh, t, t2, s)
        else:
            _qk1x2(qs, r0, k, kvh, t, t2, s)
        t += 2


@jit(fastmath=_CONTRACT)
def _pv_rows(s, v, kvh, r0, nr, t0, t1, o):
    # o[r] += s[r, t] * v[kvh, t] for rows r0..r0+nr-1 (nr <= 4), t0 <= t < t1, in key order:
    # 16 elements per register tile of the nr rows, then 8 and the last D % 8 row by row (the same FMA)
    dd = o.shape[1]
    d16 = dd // 16 * 16
    for d0 in range(0, d16, 16):
        if nr == 4:
            _pv4x2(s, v, kvh, r0, t0, t1, o, d0)
        elif nr == 3:
            _pv3x2(s, v, kvh, r0, t0, t1, o, d0)
        elif nr == 2:
            _pv2x2(s, v, kvh, r0, t0, t1, o, d0)
        else:
            _pv1x2(s, v, kvh, r0, t0, t1, o, d0)
    d8 = dd // 8 * 8
    for r in range(r0, r0 + nr):  # (head dims of 8 mod 16 are rare: their 8-wide part row by row)
        if d8 > d16:
            _pv1x1(s, v, kvh, r, t0, t1, o, d16)
        for t in range(t0, t1):
            p = s[r, t]
            for d in range(d8, dd):
                o[r, d] = o[r, d] + p * _f32(v[kvh, t, d])


@jit(fastmath=_CONTRACT)
def _pv(s, v, kvh, r0, nr, t0, t1, o, lims):
    # o[r] += s[r, t] * v[kvh, t] for rows r0..r0+nr-1 and keys t0 <= t < min(t1, lims[r]), in key
    # order (one FMA per key and element); s (R, T), v (Hkv, T, D) float32 or uint16 (f16 bits),
    # o (R, D), lims (R,). The rows together while every row may use the keys, then each alone.
    tq = t1
    for r in range(r0, r0 + nr):
        tq = min(tq, lims[r])
    if tq > t0:
        _pv_rows(s, v, kvh, r0, nr, t0, tq, o)
    for r in range(r0, r0 + nr):
        te = min(t1, lims[r])
        if te > max(tq, t0):
            _pv_rows(s, v, kvh, r, 1, max(tq, t0), te, o)


@jit(fastmath=_CONTRACT)
def _attention(q, k, v, n_past, out, h0, h1):
    # q (n, Hq, D), k/v (Hkv, T_max, D) float32, or uint16 holding f16 bits (a specialization of
    # its own: keys and values become float32 as they load), out (n, Hq, D); query heads h0..h1-1.
    # Per kv head, rows = (query token, query head of the group), up to 4 rows per tile;
    # keys in blocks that stay in L1 while every row tile uses them.
    n, hq, dd = q.shape
    hkv = k.shape[0]
    grp = hq // hkv
    scale = np.float32(1.0 / math.sqrt(dd))
    bk = max(16, 4096 // dd)  # 16 KB of keys (or values) per block
    for kvh in range(hkv):
        g0 = max(h0, kvh * grp)
        g1 = min(h1, (kvh + 1) * grp)
        if g0 >= g1:
            continue
        ng = g1 - g0
        bq = max(1, 32 // ng)  # query tokens per row block: about 32 rows
        rmax = min(bq, n) * ng  # (a decode step: one group's rows, not 32 of n_past + 1 scores)
        qs = np.empty((rmax, dd), np.float32)
        s = np.empty((rmax, n_past + n), np.float32)
        o = np.empty((rmax, dd), np.float32)
        lsum = np.empty(rmax, np.float32)
        lims = np.empty(rmax, np.int64)
        for i0 in range(0, n, bq):
            i1 = min(n, i0 + bq)
            rows = (i1 - i0) * ng
            tend = n_past + i1  # keys any row of this block may see
            for r in range(rows):
                for d in range(dd):
                    qs[r, d] = q[i0 + r // ng, g0 + r % ng, d] * scale
            for t0 in range(0, tend, bk):
                t1 = min(tend, t0 + bk)
                for r in range(0, rows, 4):
                    _scores(qs, k, kvh, r, min(4, rows - r), t0, t1, s)
            for r in range(rows):  # causal mask + softmax numerator, per row
                lim = n_past + i0 + r // ng + 1
                lims[r] = lim
                mx = _max8(s, r, lim)
                for t in range(lim):
                    s[r, t] = _expf(s[r, t] - mx)
                for t in range(lim, tend):
                    s[r, t] = 0.0
                lsum[r] = _sum8(s, r, lim)
                for d in range(dd):
                    o[r, d] = 0.0
            for t0 in range(0, tend, bk):
                t1 = min(tend, t0 + bk)
                for r in range(0, rows, 4):
                    _pv(s, v, kvh, r, min(4, rows - r), t0, t1, o, lims)
            for r in range(rows):
                inv = np.float32(1.0) / lsum[r]
                for d in range(dd):
                    out[i0 + r // ng, g0 + r % ng, d] = o[r, d] * inv


@intrinsic
def _ptr(typingctx, addr, ty):
    """An integer address as a typed pointer (``ty`` is a Numba number type), for ``numba.carray``."""
    dt = ty.instance_type
    sig = types.CPointer(dt)(addr, ty)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@jit(fastmath=_CONTRACT, inline="always")
def _attention_batch_as(q, caches, hkv, dt, out, w0, w1):
    # q (B, Hq, D): one query token per sequence; caches (B, 4) int64: address of the sequence's
    # k and v caches (Hkv, T_max, D) of element type ``dt`` (types.float32, or types.uint16 for
    # f16 bits), its n_past, T_max; out (B, Hq, D). Work items w = b * Hq + h for w0 <= w < w1:
    # each sequence's heads run through _attention with n = 1, the very code of a one-sequence
    # call, so every row has the bits it has alone. ``dt`` is a compile-time type, so the
    # attention task of one cache type (kernels.executor) compiles _attention for that type only.
    nb, hq, dd = q.shape
    if w1 <= w0:
        return
    for b in range(w0 // hq, (w1 - 1) // hq + 1):
        h0 = max(w0 - b * hq, 0)
        h1 = min(w1 - b * hq, hq)
        tmax = caches[b, 3]
        k = numba.carray(_ptr(caches[b, 0], dt), (hkv, tmax, dd))
        v = numba.carray(_ptr(caches[b, 1], dt), (hkv, tmax, dd))
        _attention(q[b:b + 1], k, v, caches[b, 2], out[b:b + 1], h0, h1)


@jit(fastmath=_CONTRACT)
def _attention_batch(q, caches, hkv, f16, out, w0, w1):
    # _attention_batch_as for f16 (uint16) caches when ``f16``, else float32 ones: the entry of a
    # pool without tables (``pool.run``); the pool's tables and pool=None run kernels.executor's tasks.
    if f16:
        _attention_batch_as(q, caches, hkv, types.uint16, out, w0, w1)
    else:
        _attention_batch_as(q, caches, hkv, types.float32, out, w0, w1)


KV_DTYPES = (np.dtype(np.float32), np.dtype(np.uint16))  # a KV cache's arrays: f32, or f16 as its bits


def _check_cache(name: str, a: np.ndarray) -> None:
    if not isinstance(a, np.ndarray) or a.dtype not in KV_DTYPES:
        raise TypeError(f"{name}: expected a float32 or uint16 (f16 bits) numpy array, got "
                        f"{getattr(a, 'dtype', type(a))}")
    if a.ndim != 3:
        raise ValueError(f"{name}: expected 3 dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous (use np.ascontiguousarray)")


def _check_caches(name: str, k_cache: np.ndarray, v_cache: np.ndarray) -> bool:
    """Check a k/v cache pair (same dtype, shape); True when they hold f16 bits (uint16)."""
    _check_cache(f"{name} k_cache", k_cache)
    _check_cache(f"{name} v_cache", v_cache)
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"{name}: k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}")
    return k_cache.dtype == np.uint16


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, n_past: int,
              out: np.ndarray | None = None, *, pool: Any = None) -> np.ndarray:
    """Causal grouped-query attention of n new tokens over a KV cache.

    New token i (position n_past + i) attends keys 0 .. n_past + i; query head h
    uses kv head ``h // (Hq // Hkv)``; scores are scaled by 1/sqrt(D).

    Args:
        q: (n, Hq, D) float32 queries (rope applied).
        k_cache: (Hkv, T_max, D) float32, or uint16 holding IEEE half bits (an f16 cache: keys
            become float32 as they load, the arithmetic is float32 either way), positions
            0 .. n_past + n - 1 filled.
        v_cache: (Hkv, T_max, D), same dtype and shape as k_cache.
        n_past: number of cached positions before the new tokens.
        out: optional (n, Hq, D) float32 result buffer (not q).
        pool: optional thread pool with ``.run(fn, n, *args)`` that calls
            ``fn(*args, start, stop)`` over a split of range(n); the query heads
            are split across it. None runs on the calling thread.
    Returns:
        out, (n, Hq, D).
    """
    _check("attention q", q, 3)
    _check_caches("attention", k_cache, v_cache)
    n, hq, d = q.shape
    hkv, tmax, dk = k_cache.shape
    if dk != d or hkv == 0 or hq % hkv:
        raise ValueError(f"attention: q shape {q.shape} does not fit cache shape {k_cache.shape} "
                         "(head_dim must match and Hq must be a multiple of Hkv)")
    n_past = int(n_past)
    if n_past < 0 or n_past + n > tmax:
        raise ValueError(f"attention: positions {n_past}..{n_past + n - 1} exceed the cache ({tmax})")
    out = _out("attention out", out, (n, hq, d))
    if out is q:
        raise ValueError("attention: out must not be q")
    if n == 0:
        return out
    if pool is None:  # a one-row table on this thread: the same compiled task as the pool's
        from flashlm.kernels import executor

        tab = np.empty((1, executor.ROW), np.int64)
        executor.run_chunks(tab, executor.fill_attention(tab, 0, q, k_cache, v_cache, n_past, out), 0, 1)
    elif hasattr(pool, "run_table"):  # heads split on the pool without the GIL (kernels.executor)
        from flashlm.kernels import executor

        pool.run_table(lambda tab: executor.fill_attention(tab, 0, q, k_cache, v_cache, n_past, out))
    else:
        pool.run(_attention, hq, q, k_cache, v_cache, n_past, out)
    return out


def attention_batch(q: np.ndarray, k_caches: list, v_caches: list, n_past: list,
                    out: np.ndarray | None = None, *, pool: Any = None) -> np.ndarray:
    """Attention of one new token in each of B sequences, each over its own KV cache, in one
    dispatch: row b equals ``attention(q[b:b+1], k_caches[b], v_caches[b], n_past[b])`` bit for bit.

    Args:
        q: (B, Hq, D) float32 queries (rope applied), row b for sequence b.
        k_caches, v_caches: B arrays (Hkv, T_max_b, D), C-contiguous, all float32 or all uint16
            (f16 bits, as for :func:`attention`), positions 0 .. n_past[b] filled (the new token's
            k/v written).
        n_past: B cached positions before each new token.
        out: optional (B, Hq, D) float32 result buffer (not q).
        pool: as for :func:`attention`; the B * Hq (sequence, head) pairs are split across it.
    Returns:
        out, (B, Hq, D).
    """
    _check("attention_batch q", q, 3)
    nb, hq, d = q.shape
    if not (len(k_caches) == len(v_caches) == len(n_past) == nb):
        raise ValueError(f"attention_batch: {nb} queries but {len(k_caches)} k caches, {len(v_caches)} v caches, "
                         f"{len(n_past)} n_past")
    out = _out("attention_batch out", out, (nb, hq, d))
    if out is q:
        raise ValueError("attention_batch: out must not be q")
    if nb == 0:
        return out
    hkv = k_caches[0].shape[0]
    if hq % hkv:
        raise ValueError(f"attention_batch: {hq} query heads over {hkv} kv heads")
    caches, f16 = _cache_table("attention_batch", k_caches, v_caches, n_past, hkv, d)
    if pool is None:  # a one-row table on this thread, as attention's
        from flashlm.kernels import executor

        tab = np.empty((1, executor.ROW), np.int64)
        executor.run_chunks(tab, executor.fill_attention_batch(tab, 0, q, caches, hkv, out, f16=f16), 0, 1)
    elif hasattr(pool, "run_table"):  # on the pool without the GIL (kernels.executor)
        from flashlm.kernels import executor

        pool.run_table(lambda tab: executor.fill_attention_batch(tab, 0, q, caches, hkv, out, f16=f16))
    else:
        pool.run(_attention_batch, nb * hq, q, caches, hkv, f16, out)
    return out  # (the caches stay alive: the caller holds them)


def kv_write(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
             pos: int) -> None:
    """Write k, v for n new tokens into the caches at positions pos .. pos + n - 1.

    Args:
        k_cache, v_cache: (Hkv, T_max, D) float32, or uint16 for an f16 cache (k, v rounded to
            half as numpy's ``astype(np.float16)`` does: to nearest even, inf past 65504),
            written in place.
        k, v: (n, Hkv, D) float32.
        pos: first position to write.
    """
    f16 = _check_caches("kv_write", k_cache, v_cache)
    if not (isinstance(k, np.ndarray) and isinstance(v, np.ndarray)) or k.dtype != np.float32 \
            or v.dtype != np.float32:
        raise TypeError(f"kv_write: k and v must be float32, got {getattr(k, 'dtype', type(k))} and "
                        f"{getattr(v, 'dtype', type(v))}")
    if k.ndim != 3 or k.shape != v.shape or k.shape[1:] != (k_cache.shape[0], k_cache.shape[2]):
        raise ValueError(f"kv_write: k {k.shape} / v {v.shape} do not fit cache {k_cache.shape}")
    n = k.shape[0]
    if pos < 0 or pos + n > k_cache.shape[1]:
        raise ValueError(f"kv_write: positions {pos}..{pos + n - 1} exceed the cache ({k_cache.shape[1]})")
    if f16:
        _kv_write_f16(k_cache, v_cache, k, v, pos)
    else:
        k_cache[:, pos:pos + n] = k.transpose(1, 0, 2)
        v_cache[:, pos:pos + n] = v.transpose(1, 0, 2)


@jit
def _kv_write_f16(kc, vc, k, v, pos):
    # kc, vc (Hkv, T_max, D) uint16 (f16 bits); k, v (n, Hkv, D) float32 -> positions pos..pos+n-1
    n, hkv, dd = k.shape
    for h in range(hkv):
        for i in range(n):
            for d in range(dd):
                kc[h, pos + i, d] = _f16_bits(k[i, h, d])
                vc[h, pos + i, d] = _f16_bits(v[i, h, d])


@jit
def _kv_write_batch(caches, f16, k, v):
    # caches (B, 4) int64 as attention_batch's (float32 caches, or uint16 f16 bits when f16);
    # k, v (B, Hkv, D): row b written at position caches[b, 2] of sequence b's caches
    nb, hkv, dd = k.shape
    for b in range(nb):
        tmax = caches[b, 3]
        p = caches[b, 2]
        if f16:
            kh = numba.carray(_ptr(caches[b, 0], types.uint16), (hkv, tmax, dd))
            vh = numba.carray(_ptr(caches[b, 1], types.uint16), (hkv, tmax, dd))
            for h in range(hkv):
                for d in range(dd):
                    kh[h, p, d] = _f16_bits(k[b, h, d])
                    vh[h, p, d] = _f16_bits(v[b, h, d])
        else:
            kc = numba.carray(_ptr(caches[b, 0], types.float32), (hkv, tmax, dd))
            vc = numba.carray(_ptr(caches[b, 1], types.float32), (hkv, tmax, dd))
            for h in range(hkv):
                for d in range(dd):
                    kc[h, p, d] = k[b, h, d]
                    vc[h, p, d] = v[b, h, d]


def _cache_table(name: str, k_caches: list, v_caches: list, n_past: list, hkv: int, d: int) -> tuple[np.ndarray, bool]:
    """(B, 4) int64: k cache address, v cache address, n_past, T_max of each sequence (checked),
    and True when the caches are f16 (uint16; every one of them, or an error)."""
    caches = np.empty((len(k_caches), 4), np.int64)
    dtype = None
    for b, (kc, vc, p) in enumerate(zip(k_caches, v_caches, n_past)):
        if not (isinstance(kc, np.ndarray) and isinstance(vc, np.ndarray) and kc.dtype == vc.dtype
                and kc.dtype in KV_DTYPES and kc.flags.c_contiguous and vc.flags.c_contiguous and kc.ndim == 3):
            _check_caches(f"{name} (sequence {b})", kc, vc)
        dtype = kc.dtype if dtype is None else dtype
        if kc.dtype != dtype:
            raise TypeError(f"{name}: cache {b} is {kc.dtype} but cache 0 is {dtype}: one dtype for all")
        if vc.shape != kc.shape or kc.shape[0] != hkv or kc.shape[2] != d:
            raise ValueError(f"{name}: cache {b} shapes {kc.shape} / {vc.shape} do not fit (Hkv, T, D) = "
                             f"({hkv}, T, {d})")
        p = int(p)
        if p < 0 or p + 1 > kc.shape[1]:
            raise ValueError(f"{name}: position {p} of sequence {b} exceeds its cache ({kc.shape[1]})")
        caches[b] = (kc.ctypes.data, vc.ctypes.data, p, kc.shape[1])
    return caches, dtype == np.uint16


def kv_write_batch(k_caches: list, v_caches: list, k: np.ndarray, v: np.ndarray, n_past: list) -> None:
    """Write one new position per sequence: k[b], v[b] (Hkv, D) at position n_past[b] of
    sequence b's caches (Hkv, T_max_b, D), in one call (as ``kv_write`` of each).

    Args:
        k_caches, v_caches: B arrays, C-contiguous, all float32 or all uint16 (f16 bits, rounded
            as :func:`kv_write` does), written in place.
        k, v: (B, Hkv, D) float32.
        n_past: B positions.
    """
    _check("kv_write_batch k", k, 3)
    _check("kv_write_batch v", v, 3)
    if v.shape != k.shape or not (len(k_caches) == len(v_caches) == len(n_past) == k.shape[0]):
        raise ValueError(f"kv_write_batch: k {k.shape} / v {v.shape} for {len(k_caches)} k caches, "
                         f"{len(v_caches)} v caches, {len(n_past)} positions")
    if k.shape[0]:
        caches, f16 = _cache_table("kv_write_batch", k_caches, v_caches, n_past, k.shape[1], k.shape[2])
        _kv_write_batch(caches, f16, k, v)

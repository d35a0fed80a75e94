"""Shared helpers for kernel tests: random valid weights in every format, references.

Import from a test in tests/kernels as ``from _blocks import ...`` (conftest.py puts
this folder on sys.path).

- ``random_weights(fmt, rows, cols, rng, extreme=True)`` -> the kernel array of
  ``formats.view_as`` (F16 as float16; pass ``.view(np.uint16)`` to the kernels):
  random quants, f16 scales log-uniform over 1e-3..1 with random sign, and when
  ``extreme`` some zero-scale blocks plus whole rows at the largest f16 (65504),
  the smallest normal (6.1e-5), a subnormal and zero.
- ``dequant_ref(w, fmt, rows=None)`` -> float64 (rows, cols) via ``gguf.quants``.
- ``row_errors(y, ref)`` / ``assert_close(y, w, fmt, x)``: per output element
  ``|y - ref| / (|W_r| |x| + tiny)`` with ``ref = W_r . x`` in float64.
"""

from __future__ import annotations

import gguf
import numpy as np

from flashlm.kernels.formats import FORMATS, FLOAT_DTYPES, row_cols, row_nbytes, take_rows
from flashlm.kernels.repacked import GGUF_OF, pack, unpack

QUANT_FMTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# store-only layouts (kernels/repacked.py): made by packing the GGUF format
STORE_FMTS = ("Q5_0R", "Q6_KR", "Q4_KR", "Q4_1R", "Q8_0S", "Q4_0S", "Q5_1S", "Q5_KS")
FLOAT_FMTS = ("F32", "F16", "BF16")
BASIC_FMTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# byte offsets of the f16 scale fields in a block: (scales, mins)
SCALE_FIELDS = {
    "Q4_0": ((0,), ()), "Q4_1": ((0,), (2,)), "Q5_0": ((0,), ()), "Q5_1": ((0,), (2,)),
    "Q8_0": ((0,), ()), "Q4_K": ((0,), (2,)), "Q5_K": ((0,), (2,)), "Q6_K": ((208,), ()),
}
EXTREME_SCALES = (65504.0, 6.103515625e-05, 2.384185791015625e-07, 0.0)  # max, min normal, subnormal, 0
TOL = 1e-6  # per-element error relative to |W_r| |x|; f32 accumulation gives ~1e-8


def _random_f16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    mag = 10.0 ** rng.uniform(-3.0, 0.0, size=shape)
    return (mag * rng.choice([-1.0, 1.0], size=shape)).astype(np.float16)


def random_weights(fmt: str, rows: int, cols: int, rng: np.random.Generator,
                   extreme: bool = True) -> np.ndarray:
    """Random valid weights for ``fmt`` in the kernel array layout (see module doc)."""
    if fmt in GGUF_OF:  # a store layout: random blocks of its GGUF format, packed
        return pack(GGUF_OF[fmt], random_weights(GGUF_OF[fmt], rows, cols, rng, extreme), (rows, cols))[1]
    if fmt == "F32":
        return rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt == "F16":
        w = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float16)
        if extreme and rows > 1:
            w[1 % rows, : cols // 2] = 65504.0
            w[1 % rows, cols // 2:] = 6.0e-8  # subnormal
        return w
    if fmt == "BF16":
        f = rng.standard_normal((rows, cols)).astype(np.float32)
        if extreme and rows > 1:
            f[1 % rows] *= np.float32(1e30)
        return (f.view(np.uint32) >> 16).astype(np.uint16)
    _, bs, ts = FORMATS[fmt]
    nb = cols // bs
    w = rng.integers(0, 256, size=(rows, nb, ts), dtype=np.uint8)
    scales, mins = SCALE_FIELDS[fmt]
    for offs, is_min in ((scales, False), (mins, True)):
        for off in offs:
            v = _random_f16(rng, (rows, nb))
            if extreme and not is_min:
                v[rng.random((rows, nb)) < 0.05] = 0.0
                for k, s in enumerate(EXTREME_SCALES):
                    v[(np.arange(rows) % 11) == k + 2] = s
            w[:, :, off:off + 2] = v[..., None].view(np.uint8).reshape(rows, nb, 2)
    return w.reshape(rows, nb * ts)


def dequant_ref(w: np.ndarray, fmt: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The reference matrix in float64 (gguf's dequantizers for the block formats)."""
    if rows is not None:  # a slabbed store layout's rows are not w[rows]
        w = w[rows] if fmt in FLOAT_DTYPES else take_rows(fmt, w, row_cols(fmt, w.shape[1]), rows)
    if fmt == "F32":
        return w.astype(np.float64)
    if fmt == "F16":
        return w.view(np.float16).astype(np.float64)
    if fmt == "BF16":
        return (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    fmt, w = unpack(fmt, w, (w.shape[0], row_cols(fmt, w.shape[1])))  # a store layout: its GGUF blocks
    qtype = gguf.GGMLQuantizationType[fmt]
    return gguf.quants.dequantize(np.ascontiguousarray(w), qtype).astype(np.float64)


def kernel_array(w: np.ndarray, fmt: str) -> np.ndarray:
    """The array the row-range kernels take (F16 as its uint16 bits)."""
    return w.view(np.uint16) if fmt == "F16" else w


def row_errors(y: np.ndarray, W: np.ndarray, X: np.ndarray) -> np.ndarray:
    """|y - W X| / (|W_r| |X_i| + tiny), elementwise; y (n, rows) or (rows,), W float64."""
    X2 = np.atleast_2d(X).astype(np.float64)
    ref = X2 @ W.T  # (n, rows)
    scale = np.linalg.norm(X2, axis=1)[:, None] * np.linalg.norm(W, axis=1)[None, :]
    return np.abs(np.atleast_2d(y).astype(np.float64) - ref) / (scale + 1e-300)


def max_error(y: np.ndarray, W: np.ndarray, X: np.ndarray) -> float:
    return float(row_errors(y, W, X).max())


class Checker:
    """``row_errors`` for many outputs against one W: the float64 product and the
    norms are computed once for all activation rows ``X`` (m, cols)."""

    def __init__(self, W: np.ndarray, X: np.ndarray) -> None:
        X64 = np.atleast_2d(X).astype(np.float64)
        self.ref = X64 @ W.T  # (m, rows)
        self.scale = np.linalg.norm(X64, axis=1)[:, None] * np.linalg.norm(W, axis=1)[None, :] + 1e-300

    def error(self, y: np.ndarray, i0: int, i1: int) -> float:
        """Max error of ``y`` (i1 - i0, rows) against activation rows [i0, i1)."""
        d = np.abs(np.atleast_2d(y).astype(np.float64) - self.ref[i0:i1])
        return float((d / self.scale[i0:i1]).max())


def nmse(y: np.ndarray, ref: np.ndarray) -> float:
    """Normalized mean squared error sum((y-ref)^2) / sum(ref^2) (llama.cpp test-backend-ops)."""
    ref = np.asarray(ref, np.float64)
    return float(np.sum((np.asarray(y, np.float64) - ref) ** 2) / max(np.sum(ref ** 2), 1e-300))


def valid_cols(fmt: str, cols: int) -> bool:
    try:
        row_nbytes(fmt, cols)
    except ValueError:
        return False
    return True


# the code paths simd.py can generate for a block-format dot, by module flags
SIMD_VARIANTS = {
    "avx2": dict(HAVE_AVX512=False),
    "avx512": dict(HAVE_AVX512=True),
    "avx512-group4": dict(HAVE_AVX512=True, GROUP4=True),  # Q4_0/Q4_1 only
}


def variant_applies(fmt: str, flags: dict) -> bool:
    """False for a variant whose flags change nothing for ``fmt`` (GROUP4 outside Q4_0/Q4_1)."""
    from flashlm.kernels import simd

    return not flags.get("GROUP4") or fmt in simd._GROUP4_FMTS


def cpu_runs_variant(flags: dict) -> bool:
    """Whether this CPU can execute the code of ``flags`` (AVX2+FMA+F16C, and AVX-512F)."""
    import llvmlite.binding as llb

    from flashlm.kernels import simd

    if not simd.HAVE_SIMD:
        return False
    return not flags.get("HAVE_AVX512") or bool(llb.get_host_cpu_features().get("avx512f", False))


def simd_kernel_variant(fmt: str, flags: dict) -> tuple:
    """(gemv, gemm) for a 32-weight block format, built by gemv_basic's kernel factories from
    ``simd._make_dot`` / ``_make_dot_rows`` (and the 4-block dots) with simd's module flags set
    to ``flags`` while they compile (the intrinsics read them at code generation), so every code
    path can be run in one process whatever the CPU. Compiled here, not cached."""

    import numba

    from flashlm.kernels import gemv_basic as gb
    from flashlm.kernels import simd

    saved = {k: getattr(simd, k) for k in flags}
    try:
        for k, v in flags.items():
            setattr(simd, k, v)
        tag = "_".join(f"{k}{int(v)}" for k, v in sorted(flags.items()))

        def compile(f):  # no cache: these flags are not the module's
            # a name of their own: Numba names compiled functions by qualified name and a per-process
            # counter, and a cached kernel of the module loaded later could otherwise link to these
            f.__qualname__ = f"variant_{tag}_{fmt}.{f.__qualname__}"
            return numba.njit(f, nogil=True)

        dot = simd._make_dot(fmt)
        if flags.get("GROUP4") and fmt in simd._GROUP4_FMTS:
            gemv, gemm = gb._group4_kernels(simd._make_dot4(fmt), simd._make_dot4_rows(fmt, simd.ROWS), dot,
                                            compile=compile)
        else:
            gemv, gemm = gb._block_kernels(dot, simd._make_dot_rows(fmt, simd.ROWS),
                                           simd._make_dot_rows(fmt, 4) if fmt in simd.DOT_ROWS4 else None,
                                           compile=compile)
        gemv.compile("void(u1[:, ::1], f4[::1], f4[::1], i8, i8)")
        gemm.compile("void(u1[:, ::1], f4[:, ::1], f4[:, ::1], i8, i8)")
        return gemv, gemm
    finally:
        for k, v in saved.items():
            setattr(simd, k, v)


def simd_gemv_variant(fmt: str, flags: dict):
    """The GEMV of :func:`simd_kernel_variant`."""
    return simd_kernel_variant(fmt, flags)[0]

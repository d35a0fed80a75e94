"""Small-n products (2..BLAS_MIN_ROWS-1 activation rows): every format against gguf's
dequantizers, and every row bit-identical to the one-row GEMV on that row.

The two-row kernels (simd.DOT_ROWS and the other families' ``*_rows`` dots) decode each block
once for a pair of activation rows and give every row the GEMV's operations in the GEMV's order,
so ``matmul(X, w)[j]`` has exactly the bits of ``matmul(X[j], w)``: speculative decoding and
batched decode rely on it for greedy output identical to one-token decode.
"""
from __future__ import annotations

import numpy as np
import pytest
from _blocks import (SIMD_VARIANTS, TOL, Checker, cpu_runs_variant, dequant_ref, kernel_array, random_weights,
                     simd_kernel_variant, variant_applies)

from flashlm.kernels import gemv_basic as gb
from flashlm.kernels import gemv_kquant as kq
from flashlm.kernels import matmul as mm
from flashlm.kernels import repacked as rp
from flashlm.kernels.formats import FORMATS, QTensor
from flashlm.runtime.threadpool import ThreadPool

NS = (2, 3, 5, 8, 17)
TABLES = {
    "simd": {**gb.SIMD_KERNELS, **{f: k[:2] for f, k in kq.IMPLS["simd"].items()}, **rp.SIMD_KERNELS},
    "plain": {**gb.PLAIN_KERNELS, **{f: k[:2] for f, k in kq.IMPLS["plain"].items()}, **rp.PLAIN_KERNELS},
}
IMPLS = ["simd", "plain"] if gb.HAVE_SIMD else ["plain"]


def _shapes(fmt: str) -> list[tuple[int, int]]:
    """Odd row counts; odd block counts and tails of grouped layouts (Q5_0R groups of 3 blocks,
    Q4_1R of 4); rows longer than SLAB_COLS (2 column slabs of the store layouts)."""
    bs = FORMATS[fmt][1]
    if bs == 1:  # F32 / F16 / BF16: a row tail of cols % 16
        return [(37, 90), (5, 3335)]
    if bs == 256:
        return [(37, 256), (13, 768), (7, 3328)]
    return [(37, 96), (29, 160), (7, 3328)]


CASES = [(f, s) for f in mm.KERNELS for s in _shapes(f)]


@pytest.fixture(scope="module")
def pool():
    with ThreadPool(2) as p:
        yield p


def _case(fmt: str, rows: int, cols: int, seed: int = 0):
    rng = np.random.default_rng(seed + rows + cols)
    w = random_weights(fmt, rows, cols, rng)
    X = rng.standard_normal((max(NS), cols)).astype(np.float32)
    return w, X


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt,shape", CASES, ids=[f"{f}-{r}x{c}" for f, (r, c) in CASES])
def test_rows_match_gguf_and_the_gemv_bit_for_bit(fmt: str, shape: tuple[int, int], impl: str) -> None:
    rows, cols = shape
    w, X = _case(fmt, rows, cols)
    ka = kernel_array(w, fmt)
    gemv, gemm = TABLES[impl][fmt]
    check = Checker(dequant_ref(w, fmt), X)
    alone = np.full((X.shape[0], rows), np.nan, np.float32)
    for j in range(X.shape[0]):
        gemv(ka, X[j], alone[j], 0, rows)
    for n in NS:
        out = np.full((n, rows), np.nan, np.float32)
        gemm(ka, X[:n], out, 0, rows)
        assert check.error(out, 0, n) < TOL, (n, check.error(out, 0, n))
        np.testing.assert_array_equal(out, alone[:n], err_msg=f"{fmt} {impl} n={n}")


@pytest.mark.parametrize("fmt", list(mm.KERNELS))
def test_matmul_rows_equal_one_row_matmul(fmt: str, pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the public matmul / matmul_many, in this thread and split on the pool (each
    thread prepares every row as the GEMV does): row j of a small-n product equals the
    product of row j alone, bit for bit, for every n below BLAS_MIN_ROWS."""
    rows, cols = _shapes(fmt)[0]
    w, X = _case(fmt, rows, cols, seed=1)
    qt = QTensor(w, fmt, (rows, cols))
    ns = [n for n in NS if n < mm.BLAS_MIN_ROWS[fmt]]
    for p in (None, pool):
        monkeypatch.setattr(mm, "PARALLEL_MIN_BYTES", 0 if p is not None else 1 << 40)
        alone = np.stack([mm.matmul(X[j], qt, pool=p) for j in range(X.shape[0])])
        np.testing.assert_array_equal(mm.matmul(X[:1], qt, pool=p), alone[:1])
        for n in ns:
            np.testing.assert_array_equal(mm.matmul(X[:n], qt, pool=p), alone[:n], err_msg=f"n={n} pool={p}")
            y, = mm.matmul_many(X[:n], [qt], pool=p)
            np.testing.assert_array_equal(y, alone[:n])


@pytest.mark.parametrize("variant", list(SIMD_VARIANTS))
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_every_simd_code_path(fmt: str, variant: str) -> None:
    """The GEMV / small-n pair of each code path simd.py can emit (AVX2; AVX-512 table lookup;
    AVX-512 four blocks at a time), on CPUs that run it: against gguf, and bit for bit."""
    flags = SIMD_VARIANTS[variant]
    if not variant_applies(fmt, flags):
        pytest.skip(f"{variant} changes nothing for {fmt}")
    if not cpu_runs_variant(flags):
        pytest.skip(f"this CPU cannot run the {variant} code")
    gemv, gemm = simd_kernel_variant(fmt, flags)
    for rows, cols in ((37, 96), (29, 160), (5, 1024 + 96)):
        w, X = _case(fmt, rows, cols, seed=2)
        check = Checker(dequant_ref(w, fmt), X)
        alone = np.empty((X.shape[0], rows), np.float32)
        for j in range(X.shape[0]):
            gemv(w, X[j], alone[j], 0, rows)
        for n in NS:
            out = np.empty((n, rows), np.float32)
            gemm(w, np.ascontiguousarray(X[:n]), out, 0, rows)
            assert check.error(out, 0, n) < TOL
            np.testing.assert_array_equal(out, alone[:n])


@pytest.mark.parametrize("fmt", ["Q4_KR", "Q8_0", "Q6_K"])  # pairs; groups of 4 (32-weight blocks, K-quants)
@pytest.mark.parametrize("impl", IMPLS)
def test_row_range_and_rows_in_groups(fmt: str, impl: str) -> None:
    """A row range writes only its rows; n = 1..11 covers every split of the rows into groups
    of 4, a pair and a last single row."""
    rows, cols = 23, 512
    w, X = _case(fmt, rows, cols, seed=3)
    gemv, gemm = TABLES[impl][fmt]
    alone = np.empty((X.shape[0], rows), np.float32)
    for j in range(X.shape[0]):
        gemv(w, X[j], alone[j], 0, rows)
    for n in range(1, 12):
        out = np.full((n, rows), -7.0, np.float32)
        gemm(w, X[:n], out, 5, 17)
        assert np.all(out[:, :5] == -7.0) and np.all(out[:, 17:] == -7.0)
        np.testing.assert_array_equal(out[:, 5:17], alone[:n, 5:17])


_AVX512_BUILD = """
import sys
from flashlm.kernels import simd
simd.HAVE_SIMD = simd.HAVE_AVX512 = True  # read by the code generators as they run
from _blocks import simd_kernel_variant
for fmt in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
    simd_kernel_variant(fmt, {"HAVE_AVX512": True})
for fmt in ("Q4_0", "Q4_1"):
    simd_kernel_variant(fmt, {"HAVE_AVX512": True, "GROUP4": True})
from flashlm.kernels import gemv_kquant as K, repacked as rp
one, two = "void(u1[:, ::1], f4[::1], f4[::1], i8, i8)", "void(u1[:, ::1], f4[:, ::1], f4[:, ::1], i8, i8)"
for k, sig in ((K._gemv_q4_k_permuted, one), (K._gemm_q4_k_permuted, two), (rp.gemv_q5_0r_simd, one),
               (rp.gemm_q5_0r_simd, two)):
    k.compile(sig)
asm = rp.gemm_q5_0r_simd.inspect_asm(rp.gemm_q5_0r_simd.signatures[0])
print("ok", "zmm" in asm)
"""


def test_avx512_code_paths_compile(tmp_path) -> None:
    """The AVX-512 GEMV and small-n code paths (table lookups, 4 blocks at a time, permuted Q4_K,
    Q5_0R's 32-entry table) compiled to machine code for an AVX-512 CPU in a subprocess: this
    CPU may not run them, but every code generator must still produce valid code."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CPU_NAME="icelake-server", NUMBA_CACHE_DIR=str(tmp_path),
               NUMBA_CPU_FEATURES="+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vbmi,+avx2,+avx,+fma,+f16c,"
                                  "+sse4.2,+popcnt,+bmi,+bmi2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(
                   os.path.dirname(os.path.abspath(__file__))))]))
    r = subprocess.run([sys.executable, "-c", _AVX512_BUILD], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "True"], r.stderr[-2000:]

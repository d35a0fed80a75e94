"""Public matmul / dequantize: every path (GEMV, GEMM, tile + BLAS), with and without a pool."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from _blocks import BASIC_FMTS, QUANT_FMTS, STORE_FMTS, TOL, Checker, dequant_ref, random_weights

from flashlm.kernels import matmul as mm
from flashlm.kernels.matmul import dequantize, matmul
from flashlm.kernels.formats import QTensor
from flashlm.runtime.threadpool import ThreadPool

# The exact kernels against gguf and float64 references (the integer path: test_intpath.py).
pytestmark = pytest.mark.usefixtures("exact_path")

ALL_FMTS = tuple(dict.fromkeys(BASIC_FMTS + QUANT_FMTS + STORE_FMTS))


@pytest.fixture(scope="module")
def pool():
    with ThreadPool(2) as p:
        yield p


def _weight(fmt: str, rows: int, cols: int, seed: int = 0) -> tuple[QTensor, np.ndarray]:
    w = random_weights(fmt, rows, cols, np.random.default_rng(seed))
    return QTensor(w, fmt, (rows, cols)), dequant_ref(w, fmt)


ALL_PATHS = [(f, 512) for f in BASIC_FMTS + STORE_FMTS] + [(f, 3328) for f in STORE_FMTS]  # 3328: 2 column slabs


@pytest.mark.parametrize("use_pool", [False, True])
@pytest.mark.parametrize("fmt,cols", ALL_PATHS)
def test_matmul_all_paths(fmt: str, cols: int, use_pool: bool, pool, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = 67
    qt, W = _weight(fmt, rows, cols)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((20, cols)).astype(np.float32)
    check = Checker(W, X)
    p = pool if use_pool else None
    y = matmul(X[0], qt, pool=p)
    assert y.shape == (rows,) and y.dtype == np.float32
    assert check.error(y, 0, 1) < TOL
    assert check.error(matmul(X[:1], qt, pool=p), 0, 1) < TOL
    for blas_min in (2, 100):  # force the tile + BLAS path, then the fused GEMM
        monkeypatch.setitem(mm.BLAS_MIN_ROWS, fmt, blas_min)
        monkeypatch.setattr(mm, "TILE_ROWS", 16)  # several tiles, last one partial
        for n in (3, 8, 20):
            out = np.full((n, rows), np.nan, np.float32)
            res = matmul(X[:n], qt, out, pool=p)
            assert res is out
            assert check.error(out, 0, n) < TOL, (blas_min, n)


@pytest.mark.parametrize("fmt", [f for f in QUANT_FMTS if f.endswith("_K")])
def test_matmul_kquants(fmt: str, pool) -> None:
    assert fmt in mm.KERNELS, f"{fmt} has no kernel in matmul.KERNELS (gemv_kquant.py)"
    qt, W = _weight(fmt, 40, 512)
    X = np.random.default_rng(2).standard_normal((9, 512)).astype(np.float32)
    check = Checker(W, X)
    assert check.error(matmul(X[0], qt, pool=pool), 0, 1) < TOL
    assert check.error(matmul(X[:3], qt), 0, 3) < TOL
    assert check.error(matmul(X, qt, pool=pool), 0, 9) < TOL


@pytest.mark.parametrize("fmt,cols", [(f, 512) for f in ALL_FMTS] + [(f, 3328) for f in STORE_FMTS])
def test_dequantize_equals_gguf(fmt: str, cols: int) -> None:
    qt, _ = _weight(fmt, 23, cols, seed=3)
    full = dequantize(qt)
    assert full.dtype == np.float32 and full.shape == (23, cols)
    if fmt in ("F32", "F16", "BF16") or fmt in STORE_FMTS:
        ref = dequant_ref(qt.data, fmt).astype(np.float32)  # store layouts: gguf on the unpacked blocks
    else:
        ref = gguf.quants.dequantize(qt.data, gguf.GGMLQuantizationType[fmt])
    np.testing.assert_array_equal(full, ref)
    idx = np.array([[5, 0], [22, 5]])
    np.testing.assert_array_equal(dequantize(qt, idx), ref[idx])
    np.testing.assert_array_equal(dequantize(qt, np.array([7])), ref[[7]])


def test_dequantize_1d_f32() -> None:
    v = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(dequantize(QTensor(v, "F32", (10,))), v)


def test_matmul_rejects_bad_input() -> None:
    qt, _ = _weight("Q8_0", 4, 64)
    with pytest.raises(TypeError):
        matmul(np.zeros(64, np.float64), qt)
    with pytest.raises(ValueError):
        matmul(np.zeros(32, np.float32), qt)
    with pytest.raises(ValueError):
        matmul(np.zeros(64, np.float32), qt, np.zeros(5, np.float32))
    with pytest.raises(NotImplementedError):
        matmul(np.zeros(64, np.float32), QTensor(qt.data, "Q2_K", (4, 64)))


def test_matmul_non_contiguous_x() -> None:
    qt, W = _weight("Q4_1", 9, 64)
    X = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)[:, ::2]
    assert Checker(W, X).error(matmul(X, qt), 0, 3) < TOL


@pytest.mark.parametrize("n", [0, 1, 3])
def test_matmul_many_table_on_pool(n: int, pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every format in one pool dispatch (kernels.executor task table), GEMV and GEMM."""
    monkeypatch.setattr(mm, "PARALLEL_MIN_BYTES", 0)
    cols = 512
    rng = np.random.default_rng(5)
    x = rng.standard_normal(cols).astype(np.float32) if n == 0 else rng.standard_normal((n, cols)).astype(np.float32)
    for group in (ALL_FMTS[:6], ALL_FMTS[6:]):
        ws, refs = zip(*[_weight(f, 37 + 8 * i, cols, seed=i) for i, f in enumerate(group)])
        for use_pool in (pool, None):
            ys = mm.matmul_many(x, list(ws), pool=use_pool)
            for f, y, W in zip(group, ys, refs):
                X = x.reshape(-1, cols).astype(np.float64)
                ref = X @ W.T
                assert y.shape == (ref.shape[1],) if n == 0 else ref.shape
                err = np.abs(y.reshape(ref.shape) - ref).max() / (np.abs(W).sum(1).max() * np.abs(X).max() + 1e-30)
                assert err < TOL, (f, n, err)


def test_table_parts_split_the_tasks_rows_as_one_sequence() -> None:
    """executor.run_chunks: the parts of a table cover every row of every task once; 16 tasks
    alike in 2 parts go 8 whole tasks each (one thread prepares each activation); tasks not
    alike, and a lone task, are each split in rows; every part's rows equal the whole table's."""
    from flashlm.kernels import executor
    from flashlm.kernels.matmul import task_key

    rng = np.random.default_rng(3)
    x = rng.standard_normal(256).astype(np.float32)

    def table(rows_list):
        ws = [_weight("Q4_KR", r, 256, seed=i)[0] for i, r in enumerate(rows_list)]
        outs = [np.full(r, np.nan, np.float32) for r in rows_list]
        tab = executor.new_table()
        for t, (w, o) in enumerate(zip(ws, outs)):
            executor.fill(tab, t, task_key(w.fmt), w.data, x, o)
        return tab, ws, outs

    tab, ws, outs = table([32] * 16)
    executor.run_chunks(tab, 16, 0, 2)
    assert all(np.isfinite(o).all() for o in outs[:8]) and all(np.isnan(o).all() for o in outs[8:])
    executor.run_chunks(tab, 16, 1, 2)
    for w, o in zip(ws, outs):
        np.testing.assert_array_equal(o, matmul(x, w))
    for rows_list, parts in (([45], 2), ([40, 7, 9, 33], 3), ([5, 3], 4), ([2], 3)):
        tab, ws, outs = table(rows_list)
        for p in range(parts):
            executor.run_chunks(tab, len(rows_list), p, parts)
        for w, o in zip(ws, outs):
            np.testing.assert_array_equal(o, matmul(x, w))
    tab, _, outs = table([45])
    executor.run_chunks(tab, 1, 0, 2)
    assert np.isfinite(outs[0][:23]).all() and np.isnan(outs[0][23:]).all()
    tab, _, outs = table([40, 8])  # not alike: each task split
    executor.run_chunks(tab, 2, 0, 2)
    assert [int(np.isfinite(o).sum()) for o in outs] == [20, 4]
    assert np.isfinite(outs[0][:20]).all() and np.isfinite(outs[1][:4]).all()

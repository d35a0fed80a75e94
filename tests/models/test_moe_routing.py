"""The mixture-of-experts routing kernels (kernels/moe.py: router top-k, grouping by expert,
weighted sum) against numpy references, and matmul_each."""
from __future__ import annotations

import numpy as np
import pytest

from flashlm.kernels.moe import combine, group, route


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- numpy references: slow, obviously right ----


def route_ref(logits, k, norm):
    p = softmax(np.asarray(logits, np.float32))
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # stable: ties keep the lower id first
    top = np.take_along_axis(p, ids, axis=-1)
    return ids, top / top.sum(-1, keepdims=True) if norm else top


def group_ref(ids):
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts = np.unique(flat)
    starts = np.searchsorted(flat[order], np.r_[experts, flat.max() + 1])
    return order, experts, starts


def combine_ref(y, order, wts):
    n, k = wts.shape
    ys = np.empty_like(y)
    ys[order] = y
    ys = ys.reshape(n, k, -1)
    out = wts[:, 0, None] * ys[:, 0]
    for j in range(1, k):
        out += wts[:, j, None] * ys[:, j]
    return out


@pytest.mark.parametrize("n,e,k", [(1, 64, 8), (7, 8, 2), (33, 128, 8), (5, 6, 6), (4, 3, 1)])
@pytest.mark.parametrize("norm", [True, False])
def test_kernels_equal_references(n, e, k, norm):
    rng = np.random.default_rng(n * e + k)
    logits = (2 * rng.standard_normal((n, e))).astype(np.float32)
    logits[0, : e // 2] = logits[0, 0]  # ties
    ids, w = route(logits, k, norm)
    rid, rw = route_ref(logits, k, norm)
    assert np.array_equal(ids, rid)
    np.testing.assert_allclose(w, rw, rtol=1e-6, atol=0)  # float32 softmax summed in another order: a few ulp (<= 4.5e-7 seen)
    order, experts, starts = group(ids)
    ro, rex, rst = group_ref(ids)
    assert np.array_equal(order, ro) and np.array_equal(experts, rex) and np.array_equal(starts, rst)
    y = rng.standard_normal((n * k, 16)).astype(np.float32)
    np.testing.assert_array_equal(combine(y, order, w), combine_ref(y, order, w))


def test_route_top_k_of_a_batch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 16)).astype(np.float32)
    ids, w = route(logits, 4, norm=False)
    assert ids.shape == w.shape == (5, 4) and ids.dtype == np.int64 and w.dtype == np.float32
    p = softmax(logits.astype(np.float64))
    for r in range(5):
        assert list(ids[r]) == list(np.argsort(-p[r])[:4])  # most probable first
        np.testing.assert_allclose(w[r], p[r, ids[r]], rtol=1e-6)
    ids2, w2 = route(logits, 4, norm=True)
    assert np.array_equal(ids2, ids)
    np.testing.assert_allclose(w2.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w2, w / w.sum(-1, keepdims=True), rtol=1e-6)


def test_route_ties_go_to_the_lower_expert():
    logits = np.array([[0.0, 2.0, 2.0, 1.0, 2.0, 2.0],  # four-way tie for the top
                       [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all equal
                       [3.0, 0.0, 1.0, 1.0, 0.5, 1.0]], np.float32)  # a tie for the 2nd place
    ids, w = route(logits, 2, norm=True)
    assert ids.tolist() == [[1, 2], [0, 1], [0, 2]]
    np.testing.assert_allclose(w[:2], 0.5)
    ids, _ = route(logits, 3, norm=False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 3]]


def test_route_extreme_logits_stay_finite():
    # the top-k is taken of the float32 probabilities, as transformers does: experts whose
    # probability underflows to 0 tie, and the tie goes to the lower id
    logits = np.array([[1e4, -1e4, 0.0, 5e3], [-1e4, 3.0, 2.0, -2e4]], np.float32)
    ids, w = route(logits, 2, norm=True)
    assert ids.tolist() == [[0, 1], [1, 2]] and np.isfinite(w).all()
    assert w[0].tolist() == [1.0, 0.0]


def test_group_by_expert():
    ids = np.array([[3, 1], [1, 0], [3, 2]])
    order, experts, starts = group(ids)
    assert experts.tolist() == [0, 1, 2, 3]
    assert starts.tolist() == [0, 1, 3, 4, 6]
    flat = ids.reshape(-1)
    for g, e in enumerate(experts):
        seg = order[starts[g]:starts[g + 1]]
        assert (flat[seg] == e).all()
        assert list(seg // 2) == sorted(seg // 2)  # rows in order within an expert
    assert sorted(order.tolist()) == list(range(6))  # every assignment exactly once
    assert [order[starts[g]:starts[g + 1]].tolist() for g in range(4)] == [[3], [1, 2], [5], [0, 4]]


def test_group_tokens_with_no_expert_in_common():
    ids = np.array([[0, 1], [2, 3], [4, 5]])
    order, experts, starts = group(ids)
    assert experts.tolist() == [0, 1, 2, 3, 4, 5] and np.diff(starts).tolist() == [1] * 6
    assert (order // 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_group_one_token():
    order, experts, starts = group(np.array([[7, 2, 5]]))
    assert experts.tolist() == [2, 5, 7] and order.tolist() == [1, 2, 0] and starts.tolist() == [0, 1, 2, 3]


# ---- matmul_each: every product its own input ----


@pytest.mark.parametrize("fmt", ["F32", "Q8_0", "Q4_KR", "Q6_KR"])
@pytest.mark.parametrize("pool_threads", [None, 2])
def test_matmul_each_equals_matmul(fmt, pool_threads):
    import gguf

    from flashlm.kernels import matmul as mm
    from flashlm.kernels.formats import QTensor
    from flashlm.kernels.repacked import pack
    from flashlm.runtime.threadpool import ThreadPool

    rng = np.random.default_rng(1)

    def weight(rows, cols):
        a = (0.1 * rng.standard_normal((rows, cols))).astype(np.float32)
        if fmt == "F32":
            return QTensor(a, "F32", a.shape)
        if fmt == "Q8_0":
            return QTensor(gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), "Q8_0", a.shape)
        from synth import random_kquant

        src = fmt[:-1]
        f, data = pack(src, random_kquant(src, (rows, cols), rng), (rows, cols))
        return QTensor(data, f, (rows, cols))

    # 20 products (more than one table of executor.MAX_TASKS), 1-D, one-row, few-row and BLAS-sized inputs
    ws = [weight(256 + 32 * (j % 3), 512) for j in range(20)]
    xs = []
    for j, w in enumerate(ws):
        n = [0, 1, 3, 70][j % 4]
        xs.append(rng.standard_normal((n, 512) if n else 512).astype(np.float32))
    outs = [np.full((x.shape[0], w.shape[0]) if x.ndim == 2 else (w.shape[0],), np.nan, np.float32) for x, w in zip(xs, ws)]
    pool = ThreadPool(pool_threads) if pool_threads else None
    try:
        mm.matmul_each(xs, ws, outs, pool=pool)
        for x, w, o in zip(xs, ws, outs):
            np.testing.assert_array_equal(o, mm.matmul(x, w, pool=pool))  # the same kernels, row by row
    finally:
        if pool:
            pool.close()

"""kernels.moe.swiglu_each (a decode step's experts, each one task) and the executor's dynamic split.

Each expert's output must have the bits of the three-stage path (gate and up products,
ops.silu_mul, down product) on both the integer and the exact kernels, whether the gate and
up rows are adjacent in memory (one product of 2F rows) or not, in one thread or on a pool,
statically or dynamically split.
"""
from __future__ import annotations

import numpy as np
import pytest
from _blocks import random_weights

from flashlm.kernels import executor
from flashlm.kernels import matmul as mm
from flashlm.kernels.formats import QTensor
from flashlm.kernels.matmul import matmul
from flashlm.kernels.moe import swiglu_each
from flashlm.kernels.ops import silu_mul
from flashlm.runtime.backend import KernelBackend, NumpyBackend
from flashlm.runtime.threadpool import ThreadPool

D, F = 512, 256


@pytest.fixture(scope="module", params=[True, False], ids=["dynamic", "static"])
def pool(request):
    with ThreadPool(2, dynamic=request.param) as p:
        yield p


def _experts(n: int, fmts=("Q4_KR", "Q4_KR", "Q6_KR"), *, adjacent: bool, seed: int = 0):
    """n experts' (gate, up, down) QTensors; with ``adjacent`` each expert's up rows follow its
    gate rows in one buffer (as in a store), else separate buffers."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = random_weights(fmts[0], F, D, rng, extreme=False)
        u = random_weights(fmts[1], F, D, rng, extreme=False)
        if adjacent:
            gu = np.concatenate([g, u])
            g, u = gu[:F], gu[F:]
        dn = random_weights(fmts[2], D, F, rng, extreme=False)
        out.append((QTensor(g, fmts[0], (F, D)), QTensor(u, fmts[1], (F, D)), QTensor(dn, fmts[2], (D, F))))
    return out


def _reference(x, experts):
    """The three-stage path: products one by one, ops.silu_mul."""
    ys = []
    for g, u, dn in experts:
        act = silu_mul(matmul(x, g), matmul(x, u))
        ys.append(matmul(act, dn))
    return np.stack(ys)


@pytest.mark.parametrize("exact", [False, True], ids=["int8", "exact"])
@pytest.mark.parametrize("adjacent", [True, False], ids=["adjacent", "apart"])
@pytest.mark.parametrize("use_pool", [False, True], ids=["serial", "pool"])
def test_experts_equal_the_three_stage_path(exact: bool, adjacent: bool, use_pool: bool, pool) -> None:
    mm.set_exact(exact)
    experts = _experts(8, adjacent=adjacent)
    if adjacent:  # the case the task runs as one product of 2F rows
        g, u, _ = experts[0]
        assert g.data.ctypes.data + g.data.nbytes == u.data.ctypes.data
    x = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    y = np.full((8, D), np.nan, np.float32)
    assert swiglu_each(x, *[list(c) for c in zip(*experts)], y, pool=pool if use_pool else None)
    np.testing.assert_array_equal(y, _reference(x, experts))


def test_more_experts_than_a_table_and_mixed_formats(pool) -> None:
    """20 experts (two tables), gate Q4_KR with up Q5_0R (never one joint product), F32 downs."""
    experts = _experts(20, ("Q4_KR", "Q5_0R", "F32"), adjacent=False, seed=2)
    x = np.random.default_rng(3).standard_normal((1, D)).astype(np.float32)
    y = np.full((20, D), np.nan, np.float32)
    assert swiglu_each(x, *[list(c) for c in zip(*experts)], y, pool=pool)
    np.testing.assert_array_equal(y, _reference(x[0], experts))


def test_experts_of_different_formats_in_one_call() -> None:
    """Downs alternating F32 and Q6_KR (arrays of two types: filled expert by expert)."""
    experts = _experts(2, ("Q4_KR", "Q4_KR", "F32"), adjacent=True, seed=8) + \
        _experts(2, ("Q4_KR", "Q4_KR", "Q6_KR"), adjacent=True, seed=9)
    experts = [experts[0], experts[2], experts[1], experts[3]]
    x = np.random.default_rng(10).standard_normal(D).astype(np.float32)
    y = np.full((4, D), np.nan, np.float32)
    assert swiglu_each(x, *[list(c) for c in zip(*experts)], y)
    np.testing.assert_array_equal(y, _reference(x, experts))


def test_declines_what_a_task_cannot_take() -> None:
    """Several rows, a wrong shape, or a non-contiguous output: False, and nothing written."""
    experts = _experts(2, adjacent=False)
    cols = [list(c) for c in zip(*experts)]
    y = np.full((2, D), np.nan, np.float32)
    two_rows = np.ones((2, D), np.float32)
    assert not swiglu_each(two_rows, *cols, y)
    bad = [QTensor(cols[2][0].data, cols[2][0].fmt, (D, F + 32))] + cols[2][1:]
    assert not swiglu_each(np.ones(D, np.float32), cols[0], cols[1], bad, y)
    wide = np.full((2, 2 * D), np.nan, np.float32)
    assert not swiglu_each(np.ones(D, np.float32), *cols, wide[:, ::2])
    assert not swiglu_each(np.ones(D, np.float32), *cols, y[:1])
    assert np.isnan(y).all() and np.isnan(wide).all()


def test_backends_agree() -> None:
    """KernelBackend.swiglu_each (tasks) has the bits of its own products one by one (the fallback
    it runs when the task cannot take them); NumpyBackend's float32 reference is close."""
    experts = _experts(4, adjacent=True, seed=5)
    x = np.random.default_rng(6).standard_normal((1, D)).astype(np.float32)
    cols = [list(c) for c in zip(*experts)]
    with ThreadPool(2) as p:
        kb = KernelBackend(p)
        y = np.empty((4, D), np.float32)
        kb.swiglu_each(x, *cols, y)
        np.testing.assert_array_equal(y, _reference(x[0], experts))
    ref = np.empty((4, D), np.float32)
    NumpyBackend().swiglu_each(x, *cols, ref)
    scale = np.abs(ref).max()
    assert np.abs(y - ref).max() <= 2e-3 * scale  # the integer path's activations against float32


def test_dynamic_split_takes_every_unit_once() -> None:
    """The dynamic split: whole tasks of a table of like tasks, chunks of one large task; two
    threads taking units from one counter cover every row once, as the static split does."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(256).astype(np.float32)
    big = QTensor(random_weights("Q4_KR", executor.DYN_MIN_ROWS, 256, rng, extreme=False), "Q4_KR",
                  (executor.DYN_MIN_ROWS, 256))
    small = [QTensor(random_weights("Q4_KR", 64, 256, rng, extreme=False), "Q4_KR", (64, 256)) for _ in range(6)]
    for ws in ([big], small):
        outs = [np.full(w.shape[0], np.nan, np.float32) for w in ws]
        tab = executor.new_table(claim=True)
        for t, (w, o) in enumerate(zip(ws, outs)):
            executor.fill(tab, t, mm.task_key(w.fmt), w.data, x, o)
        assert executor._claim_units(tab, len(ws), 2, True) == (executor.CLAIM_CHUNKS * 2 if len(ws) == 1 else 6)
        executor.run_chunks(tab, len(ws), 0, 2)  # one thread alone takes every unit
        for w, o in zip(ws, outs):
            np.testing.assert_array_equal(o, matmul(x, w))
        assert tab[executor.CLAIM, executor.CLAIM_NEXT] > executor._claim_units(tab, len(ws), 2, True)
    with ThreadPool(2) as p:  # and on a pool, many dispatches (the counter is reset for each)
        for _ in range(20):
            out = np.full(big.shape[0], np.nan, np.float32)
            p.run_table(lambda tab: executor.fill(tab, 0, mm.task_key("Q4_KR"), big.data, x, out) or 1)
            np.testing.assert_array_equal(out, matmul(x, big))
    tab = executor.new_table(claim=False)  # off: the static split
    assert executor._claim_units(tab, 6, 2, True) == 0

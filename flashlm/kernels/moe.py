"""Mixture-of-experts routing kernels: router top-k, grouping rows by expert, the weighted sum.

A decode step of a 16-layer, 64-expert, top-8 model routes 16 times per token; in numpy
each routing is some thirty small array operations (~100 us), here one call of a
few microseconds. The expert products themselves are ordinary GEMV/GEMM tasks
(``matmul.matmul_each``); for one row (a decode step) :func:`swiglu_each` runs each chosen
expert's gate, up, activation and down as one task, all the experts in one dispatch.

Semantics (transformers' Qwen3-MoE): probabilities are the float32 softmax of the router
logits; the top-k is taken of the probabilities, largest first, ties to the lower expert
id (transformers' torch.topk leaves the order among ties unspecified); with ``norm`` the
k probabilities are divided by their sum. ``tests/models/test_moe_routing.py`` checks
these against numpy references.
"""
from __future__ import annotations

import numpy as np

from flashlm.kernels.config import jit_exact
from flashlm.kernels.formats import QTensor


@jit_exact
def _route(logits, k, norm, ids, wts):
    n, n_exp = logits.shape
    p = np.empty(n_exp, np.float32)
    taken = np.zeros(n_exp, np.bool_)
    for r in range(n):
        m = logits[r, 0]
        for e in range(1, n_exp):
            m = max(m, logits[r, e])
        s = np.float32(0.0)
        for e in range(n_exp):
            p[e] = np.exp(logits[r, e] - m)
            s += p[e]
        for e in range(n_exp):
            p[e] = p[e] / s
            taken[e] = False
        tot = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(n_exp):  # ascending ids and a strict >: a tie keeps the lower id
                if not taken[e] and (best < 0 or p[e] > p[best]):
                    best = e
            taken[best] = True
            ids[r, j] = best
            wts[r, j] = p[best]
            tot += p[best]
        if norm:
            for j in range(k):
                wts[r, j] = wts[r, j] / tot


def route(logits: np.ndarray, k: int, norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """The experts each row goes to, and their weights.

    Args:
        logits: (N, E) router logits.
        k: experts per row (1 .. E).
        norm: renormalize the k probabilities to sum to 1 (``norm_topk_prob``).

    Returns:
        ids (N, k) int64, most probable first, ties to the lower expert id;
        weights (N, k) float32: the softmax probabilities of those experts.
    """
    lg = np.ascontiguousarray(logits, np.float32)
    if lg.ndim != 2 or not 0 < k <= lg.shape[1]:
        raise ValueError(f"route: need (N, E) logits and 0 < k <= E, got {lg.shape} and k={k}")
    ids = np.empty((lg.shape[0], k), np.int64)
    wts = np.empty((lg.shape[0], k), np.float32)
    _route(lg, k, bool(norm), ids, wts)
    return ids, wts


@jit_exact
def _group(flat, order, counts):
    n_exp = counts.shape[0]
    for e in range(n_exp):
        counts[e] = 0
    for a in range(flat.shape[0]):
        counts[flat[a]] += 1
    n_groups = 0
    for e in range(n_exp):
        if counts[e]:
            n_groups += 1
    experts = np.empty(n_groups, np.int64)
    starts = np.empty(n_groups + 1, np.int64)
    nxt = np.empty(n_exp, np.int64)
    g, pos = 0, 0
    for e in range(n_exp):
        if counts[e]:
            experts[g] = e
            starts[g] = pos
            nxt[e] = pos
            pos += counts[e]
            g += 1
    starts[n_groups] = pos
    for a in range(flat.shape[0]):  # in order of a: stable
        order[nxt[flat[a]]] = a
        nxt[flat[a]] += 1
    return experts, starts


def group(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group the (row, slot) assignments of ``ids`` (N, k) by expert.

    Returns:
        order: (N*k,) int64 flat indices into ``ids`` (row * k + slot), sorted by expert,
            then by row;
        experts: (G,) int64 the distinct experts, ascending;
        starts: (G + 1,) int64: expert ``experts[g]`` has ``order[starts[g]:starts[g+1]]``.
    """
    flat = np.ascontiguousarray(ids, np.int64).reshape(-1)
    if flat.size and flat.min() < 0:
        raise ValueError("group: negative expert id")
    order = np.empty(flat.size, np.int64)
    experts, starts = _group(flat, order, np.empty(int(flat.max()) + 1 if flat.size else 0, np.int64))
    return order, experts, starts


@jit_exact
def _combine(y, order, wts, out):
    n, k = wts.shape
    inv = np.empty(order.shape[0], np.int64)
    for i in range(order.shape[0]):
        inv[order[i]] = i
    d = y.shape[1]
    for r in range(n):
        for c in range(d):
            acc = wts[r, 0] * y[inv[r * k], c]
            for j in range(1, k):
                acc += wts[r, j] * y[inv[r * k + j], c]
            out[r, c] = acc


def combine(y: np.ndarray, order: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """The weighted sum of each row's experts' outputs.

    Args:
        y: (N*k, d) float32 expert outputs in grouped order (row ``i`` belongs to
            assignment ``order[i]`` = row * k + slot).
        order: (N*k,) int64 from :func:`group`.
        wts: (N, k) float32 router weights.

    Returns:
        (N, d) float32: row r is sum over slots j (in slot order, so a row's sum does not
        depend on the other rows of the batch) of wts[r, j] * its output.
    """
    n, k = wts.shape
    if y.shape[0] != n * k or order.shape != (n * k,):
        raise ValueError(f"combine: {y.shape[0]} outputs and {order.shape} order for {n} rows of {k}")
    out = np.empty((n, y.shape[1]), np.float32)
    _combine(np.ascontiguousarray(y, np.float32), np.ascontiguousarray(order, np.int64),
             np.ascontiguousarray(wts, np.float32), out)
    return out


def _expert_arrays(gate, up, down, d: int, kernels) -> tuple | None:
    """The kernel arrays of one expert's weights, or None when a task cannot take them."""
    f = gate.shape[0]
    arrs = []
    for w, rows, cols in ((gate, f, d), (up, f, d), (down, d, f)):
        if not isinstance(w, QTensor) or w.fmt not in kernels:  # (streamed row blocks are no QTensor)
            return None
        data = w.data.view(np.uint16) if w.fmt == "F16" else w.data
        if w.shape[0] != rows or w.shape[-1] != cols or len(w.shape) != 2 or data.ndim != 2 \
                or not data.flags.c_contiguous:
            return None
        arrs.append(data)
    return tuple(arrs)


def swiglu_each(x: np.ndarray, gates: list, ups: list, downs: list, out: np.ndarray, *, pool=None) -> bool:
    """``out[j] = downs[j] . (silu(gates[j] . x) * (ups[j] . x))`` for one activation row ``x``
    (d,) or (1, d) shared by every expert: the chosen experts of a MoE layer's decode step, each
    a task run whole by one thread (``executor.EXPERT``), tables of up to ``executor.MAX_TASKS``
    experts in one dispatch each. Each output has the bits of the gate/up products, ops.silu_mul
    and the down product run one after another.

    Args:
        x: float32 row, C-contiguous.
        gates, ups: QTensors (F, d); downs: QTensors (d, F).
        out: (k, d) float32, C-contiguous, one row per expert.
        pool: as for ``matmul.matmul``.

    Returns:
        False (nothing computed) when the arguments do not fit the task (a weight format without
        a kernel, other shapes, several rows): the caller runs the products one by one.
    """
    from flashlm.kernels import executor, matmul  # lazily, as the backend: Numba compiles on first use

    k = len(gates)
    if (not k or x.dtype != np.float32 or x.size != x.shape[-1] or not x.flags.c_contiguous
            or out.shape != (k, x.shape[-1]) or out.dtype != np.float32 or not out.flags.c_contiguous):
        return False
    d = x.shape[-1]
    arrs, tasks, known = [], [], {}
    for g, u, dn in zip(gates, ups, downs):
        a = _expert_arrays(g, u, dn, d, matmul.KERNELS)
        if a is None:
            return False
        arrs.append(a)
        fmts = (g.fmt, u.fmt, dn.fmt)
        addr = known.get(fmts)
        if addr is None:  # one look-up for a layer of like experts
            addr = known[fmts] = executor.expert_tasks(*(matmul.task_key(f) for f in fmts))
        tasks.append(addr)
    f = gates[0].shape[0]
    x = x.reshape(-1)
    scratch = np.empty((k, 2 * f), np.float32)
    tasks = np.array(tasks, np.int64)
    parallel = pool is not None and hasattr(pool, "run_table") and \
        sum(w.nbytes for w in gates) * 3 >= matmul.PARALLEL_MIN_BYTES
    for t0 in range(0, k, executor.MAX_TASKS):
        t1 = min(k, t0 + executor.MAX_TASKS)

        def fill(tab: np.ndarray, t0=t0, t1=t1) -> int:
            executor.fill_experts(tab, x, arrs[t0:t1], tasks[t0:t1], out[t0:t1], scratch[t0:t1])
            return t1 - t0

        if parallel:
            pool.run_table(fill)
        else:
            tab = executor.new_table()
            executor.run_chunks(tab, fill(tab), 0, 1)
    return True

"""A decode step's blocks as one program of table rows, run by every pool thread without Python.

A decode step of a dense decoder is ~12 kernel calls per block (norms, the q/k/v, o, gate/up
and down products, rope, the KV write, attention, the activation, residual adds), and from
Python each costs 5-30 us of dispatch (argument checks, a Numba call, a pool wake-up for the
products): on smollm2-135m (30 blocks) that was a third of the step. Here the whole run of
blocks is one int64 table (rows as ``kernels.executor``'s, ROW columns) that :func:`run` walks
on every thread at once: product rows (matmul tasks, attention) are split between the threads
as a table dispatch splits them, the small steps (norms, rope, KV write, residual adds) run on
thread 0, and BARRIER rows make every thread wait for the others where a step reads what
another thread wrote. One pool dispatch per decode step.

Every step calls the kernel the unfused path calls on the same inputs (the matmul and attention
tasks by address, ``ops._rmsnorm``, ``ops._rope``, ``ops._silu_mul``, ``ops._kv_write_f16``; float32
adds), so a step's logits have the bits of the unfused step (tests/kernels/test_program.py).

Row layouts (column 0 the op; matmul and attention rows as kernels.executor's):
    NORM     x, w, rows, d, out, eps (float32 bits)       rmsnorm of ``rows`` rows of d, thread 0
    ADD      dst, src, n                                  dst += src (float32), thread 0
    ROPE     x, heads, hd, cos, sin, table rows, neox     at the position in state[0], thread 0
    KV       k, v, k cache, v cache, hkv, tmax, hd, f16   at the position state[1], thread 0
    SILU     g, u, out, n                                 out = silu(g) * u, split in ranges
    ROUTE    logits, E, k, norm, ids, wts, experts, first  the router's top-k (kernels.moe._route); writes
                                                          each chosen expert's addresses (from the (E, 4)
                                                          table ``experts``) into EXPERT rows first.., thread 0
    EXPERT   (executor's row)                             k rows after a ROUTE, whole rows to the threads in turn
    COMBINE  x, y, wts, k, d, tmp, order                  x += kernels.moe's weighted sum of the k rows y, thread 0
    BARRIER                                               every thread waits for all
    ATTENTION (executor's row; its N_PAST column set before each step)
    a matmul row (executor.fill; n = 0: the GEMV)
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit, types

from flashlm.kernels import executor, sync
from flashlm.kernels.executor import (ATTENTION, ATTENTION_SIG, COLS, E_DOWN, E_GATE, E_UP, E_UP_TASK, EXPERT, KERNEL,
                                      N, OUT_ADDR, ROW, W_ADDR, W_ROWLEN, W_ROWS, X_ADDR, _call_row_task, _call_task,
                                      _chunk)
from flashlm.kernels.moe import _combine, _route
from flashlm.kernels.ops import _kv_write_f16, _ptr, _rmsnorm, _rope, _silu_mul

NORM, ADD, ROPE, KV, SILU, BARRIER, ROUTE, COMBINE = 40, 41, 42, 43, 44, 45, 46, 47
N_PAST = 10  # the column of an ATTENTION row holding the positions already cached (set per step)


@njit(nogil=True, inline="always")
def _f32(addr, n):
    return carray(_ptr(addr, types.float32), (n,))


@njit(nogil=True, cache=True)
def _serial_step(prog, r, state):
    """The thread-0 step of row ``r`` (of ``prog``)."""
    op = r[0]
    if op == ROUTE:
        ne, k = r[2], r[3]
        ids = carray(_ptr(r[5], types.int64), (1, k))
        _route(carray(_ptr(r[1], types.float32), (1, ne)), k, r[4] != 0, ids,
               carray(_ptr(r[6], types.float32), (1, k)))
        table = carray(_ptr(r[7], types.int64), (ne, 4))
        for j in range(k):
            e = ids[0, j]
            row = prog[r[8] + j]
            row[E_GATE], row[E_UP], row[E_DOWN], row[E_UP_TASK] = table[e, 0], table[e, 1], table[e, 2], table[e, 3]
    elif op == COMBINE:
        k, d = r[4], r[5]
        tmp = carray(_ptr(r[6], types.float32), (1, d))
        _combine(carray(_ptr(r[2], types.float32), (k, d)), carray(_ptr(r[7], types.int64), (k,)),
                 carray(_ptr(r[3], types.float32), (1, k)), tmp)
        x = _f32(r[1], d)
        for c in range(d):
            x[c] = x[c] + tmp[0, c]
    elif op == NORM:
        rows, d = r[3], r[4]
        eps = np.float32(carray(_ptr(r.ctypes.data + 6 * 8, types.float32), (1,))[0])
        x = carray(_ptr(r[1], types.float32), (rows, d))
        out = carray(_ptr(r[5], types.float32), (rows, d))
        _rmsnorm(x, _f32(r[2], d), eps, out)
    elif op == ADD:
        dst, src = _f32(r[1], r[3]), _f32(r[2], r[3])
        for i in range(r[3]):
            dst[i] = dst[i] + src[i]
    elif op == ROPE:
        nh, hd, half, p = r[2], r[3], r[3] // 2, r[6]
        x = carray(_ptr(r[1], types.float32), (1, nh, hd))
        cos = carray(_ptr(r[4], types.float32), (p, half))
        sin = carray(_ptr(r[5], types.float32), (p, half))
        _rope(x, state[0:1], cos, sin, hd, r[7] != 0)
    elif op == KV:
        hkv, tmax, hd, pos = r[5], r[6], r[7], state[1]
        k = carray(_ptr(r[1], types.float32), (1, hkv, hd))
        v = carray(_ptr(r[2], types.float32), (1, hkv, hd))
        if r[8]:
            kc = carray(_ptr(r[3], types.uint16), (hkv, tmax, hd))
            vc = carray(_ptr(r[4], types.uint16), (hkv, tmax, hd))
            _kv_write_f16(kc, vc, k, v, pos)
        else:
            kc = carray(_ptr(r[3], types.float32), (hkv, tmax, hd))
            vc = carray(_ptr(r[4], types.float32), (hkv, tmax, hd))
            for h in range(hkv):
                for j in range(hd):
                    kc[h, pos, j] = k[0, h, j]
                    vc[h, pos, j] = v[0, h, j]


@njit(nogil=True, cache=True)
def run(prog, nsteps, state, bar, part, parts):
    """Thread ``part`` of ``parts`` walks rows 0..nsteps-1 of ``prog``; ``state`` [position,
    cached positions]; ``bar[0]`` the barrier counter (0 when the program starts)."""
    nb = 0
    g0 = 0  # the first row of the current group of EXPERT rows
    for s in range(nsteps):
        r = prog[s]
        op = r[0]
        if op == EXPERT:
            if s == 0 or prog[s - 1, 0] != EXPERT:
                g0 = s
            if (s - g0) % parts == part:
                _call_row_task(r[KERNEL], prog.ctypes.data + s * prog.strides[0], 0, 1)
        elif op == BARRIER:
            nb += 1
            if parts > 1:
                sync.atomic_add(bar, 0, 1)
                while sync.atomic_load(bar, 0) < nb * parts:
                    sync._pause()
        elif op == SILU:
            a, b = _chunk(r[4], parts, part)
            if b > a:
                g = carray(_ptr(r[1] + 4 * a, types.float32), (1, b - a))
                u = carray(_ptr(r[2] + 4 * a, types.float32), (1, b - a))
                o = carray(_ptr(r[3] + 4 * a, types.float32), (1, b - a))
                _silu_mul(g, u, o)
        elif op == ATTENTION:
            a, b = _chunk(r[W_ROWS], parts, part)
            if b > a:
                _call_row_task(r[KERNEL], prog.ctypes.data + s * prog.strides[0], a, b)
        elif NORM <= op <= COMBINE:  # (matmul rows' ids are below ATTENTION or from 100: executor.FMT_IDS)
            if part == 0:
                _serial_step(prog, r, state)
        else:
            a, b = _chunk(r[W_ROWS], parts, part)
            if b > a:
                _call_task(r[KERNEL], r[W_ADDR], r[W_ROWS], r[W_ROWLEN], r[X_ADDR], r[N], r[COLS], r[OUT_ADDR], a, b)


def _program_task(tab_addr, part, parts):
    """A pool worker's part of the program whose addresses are in row 0 of the table at
    ``tab_addr`` (columns 1-4: program, steps, state, barrier counter)."""
    t = carray(_ptr(tab_addr, types.int64), (ROW,))
    nsteps = t[2]
    prog = carray(_ptr(t[1], types.int64), (nsteps, ROW))
    state = carray(_ptr(t[3], types.int64), (2,))
    bar = carray(_ptr(t[4], types.int64), (1,))
    run(prog, nsteps, state, bar, part, parts)


_compiled: dict[int, object] = {}


def task_address() -> int:
    """Address of the C-callable program task the pool's workers run (compiled, or loaded from
    Numba's cache, on first use)."""
    return executor._cfunc_address(_compiled, 0, ATTENTION_SIG, {0: _program_task})


def warm_up() -> None:
    """Compile (or load) :func:`run` and the workers' task, so that a first decode step does not."""
    prog = np.zeros((1, ROW), np.int64)
    prog[0, 0] = BARRIER
    run(prog, 1, np.zeros(2, np.int64), np.zeros(1, np.int64), 0, 1)
    task_address()


class Builder:
    """Writes a program: each method appends a row (the arrays it names must outlive the program:
    the builder keeps a reference to each in ``keep``)."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.keep: list = []

    def _row(self, op: int, *vals: int) -> None:
        r = np.zeros(ROW, np.int64)
        r[0] = op
        r[1:1 + len(vals)] = vals
        self.rows.append(r)

    def _addr(self, a: np.ndarray) -> int:
        if a.dtype not in (np.float32, np.uint16, np.int64) or not a.flags.c_contiguous:
            raise ValueError(f"program: arrays must be C-contiguous float32, f16 bits or int64, got {a.dtype}")
        self.keep.append(a)
        return a.ctypes.data

    def barrier(self) -> None:
        if self.rows and self.rows[-1][0] != BARRIER:
            self._row(BARRIER)

    def norm(self, x: np.ndarray, w: np.ndarray, out: np.ndarray, eps: float, d: int) -> None:
        """out = rmsnorm(x) over rows of ``d`` (x, out of x.size values; w (d,) float32)."""
        self._row(NORM, self._addr(x), self._addr(w), x.size // d, d, self._addr(out),
                  int(np.float32(eps).view(np.uint32)))

    def add(self, dst: np.ndarray, src: np.ndarray) -> None:
        """dst += src (float32, the same size)."""
        assert dst.size == src.size
        self._row(ADD, self._addr(dst), self._addr(src), dst.size)

    def rope(self, x: np.ndarray, heads: int, hd: int, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
        """x (heads * hd) rotated at the step's position (ops.rope's tables cos, sin (P, hd // 2))."""
        self._row(ROPE, self._addr(x), heads, hd, self._addr(cos), self._addr(sin), cos.shape[0], int(neox))

    def kv(self, k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray) -> None:
        """k, v (Hkv * D) written at the step's cache position (caches (Hkv, T, D))."""
        hkv, tmax, hd = k_cache.shape
        self._row(KV, self._addr(k), self._addr(v), self._addr(k_cache), self._addr(v_cache), hkv, tmax, hd,
                  int(k_cache.dtype == np.uint16))

    def silu(self, g: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
        self._row(SILU, self._addr(g), self._addr(u), self._addr(out), g.size)

    def moe(self, h: np.ndarray, logits: np.ndarray, k: int, norm: bool, ids: np.ndarray, wts: np.ndarray,
            experts: np.ndarray, template: tuple, keys: tuple[str, str, str], y: np.ndarray,
            scratch: np.ndarray) -> None:
        """The experts of a MoE block on normed ``h`` (d,), its router's ``logits`` (E,) computed by
        the rows before: ROUTE (top ``k``, ``norm``: renormalized; into ids (k,) int64, wts (k,)),
        a barrier, k EXPERT rows (outputs y (k, d), scratch (k, 2F)). ``experts`` (E, 4) int64:
        each expert's gate, up, down addresses and its up task (0: one product with the gate);
        ``template`` one expert's (gate, up, down) kernel arrays (the rows' shapes); ``keys`` their
        task keys."""
        first = len(self.rows) + 2
        self._row(ROUTE, self._addr(logits), logits.size, k, int(norm), self._addr(ids), self._addr(wts),
                  self._addr(experts), first)
        self.barrier()
        tab = executor.new_table()
        tasks = np.array([executor.expert_tasks(*keys)] * k, np.int64)
        executor.fill_experts(tab, h, [template] * k, tasks, y, scratch)
        self.keep += [h, y, scratch, template]
        self.rows += [tab[j].copy() for j in range(k)]

    def combine(self, x: np.ndarray, y: np.ndarray, wts: np.ndarray, tmp: np.ndarray, order: np.ndarray) -> None:
        """x += the weighted sum of the k rows of y (wts (k,), ``order`` arange(k) int64, tmp (d,))."""
        self._row(COMBINE, self._addr(x), self._addr(y), self._addr(wts), y.shape[0], y.shape[1], self._addr(tmp),
                  self._addr(order))

    def matmul(self, x: np.ndarray, data: np.ndarray, key: str, out: np.ndarray) -> None:
        """out = W . x (the GEMV task ``key`` of the weight's kernel array ``data``)."""
        tab = executor.new_table()
        executor.fill(tab, 0, key, data, x, out)
        self.keep += [x, data, out]
        self.rows.append(tab[0].copy())

    def attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, out: np.ndarray) -> int:
        """out (1, Hq, D) = attention of q (1, Hq, D) over the caches; returns the row's index (its
        N_PAST column is set before each step)."""
        tab = executor.new_table()
        executor.fill_attention(tab, 0, q, k_cache, v_cache, 0, out)
        self.keep += [q, k_cache, v_cache, out]
        self.rows.append(tab[0].copy())
        return len(self.rows) - 1

    def build(self) -> np.ndarray:
        return np.ascontiguousarray(np.stack(self.rows)) if self.rows else np.zeros((0, ROW), np.int64)

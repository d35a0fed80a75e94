"""Run a table of GEMV/GEMM row-range tasks entirely in nogil Numba code.

The thread pool's workers must not need the GIL to start a matmul: taking it from
the main thread goes through CPython's GIL condition variable, a futex wake-up of
tens of microseconds, which is longer than a whole small GEMV. So a matmul task is
described by numbers in an int64 table (format id, addresses and shapes of the
weight, input and output arrays), and :func:`run_chunks` turns each row into typed
array views and calls the format's kernel, all without the GIL. Workers spin on the
pool's control array inside :func:`worker_loop` and only return to Python for work
that is not in a table, or to sleep.

Table row layout (int64): FMT, W_ADDR, W_ROWS, W_ROWLEN (array elements per
weight row), X_ADDR, N (0 for a 1-D GEMV input), COLS, OUT_ADDR, KERNEL (the address of
the format's task, :func:`kernel_address`: formats compile one by one, when a model first
uses them). An attention
task (FMT = ATTENTION) holds Q_ADDR, HQ, K_ADDR, V_ADDR, N, D, OUT_ADDR, KERNEL, T_MAX, N_PAST,
HKV and is split over query heads. A batched one-token attention task (FMT = ATTENTION_BATCH)
holds Q_ADDR, B * HQ, CACHES_ADDR (kernels.ops.attention_batch's (B, 4) int64 table), B, HQ, D,
OUT_ADDR, KERNEL, -, -, HKV and is split over (sequence, head) pairs. An attention row's KERNEL
is the address of its task for the KV caches' dtype (:func:`attention_address`), which reads
the rest of the row itself. A SwiGLU expert task (FMT = EXPERT, :func:`fill_expert`) is one
activation row through one expert, ``down . (silu(gate . x) * (up . x))``, run whole by one
thread (W_ROWS = 1): the chosen experts of a MoE layer's decode step in one dispatch.
The arrays behind the addresses must stay alive until the call returns (the
caller holds them).

Numba caches the tasks with the kernels ``HAVE_SIMD`` selected when they were first
compiled (its cache does not key on globals): after changing FLASHLM_NO_SIMD, delete
``flashlm/kernels/__pycache__``.
"""
from __future__ import annotations

import threading

import numpy as np

from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from flashlm.kernels import gemv_kquant as _kq
from flashlm.kernels import intpath as _ip
from flashlm.kernels import repacked as _rp
from flashlm.kernels import sync
from flashlm.kernels.gemv_basic import BASIC_KERNELS
from flashlm.kernels.ops import _attention, _attention_batch_as, _ptr, _silu_mul

FMT, W_ADDR, W_ROWS, W_ROWLEN, X_ADDR, N, COLS, OUT_ADDR, KERNEL = range(9)
ATTENTION = 20
ATTENTION_BATCH = 21
EXPERT = 22
HKV = 11  # column of an attention row: kv heads
ROW = 17
MAX_TASKS = 16
# The table's row after the tasks: [CLAIM_NEXT] the next unit a thread takes in the dynamic split
# (reset to 0 before each dispatch), [CLAIM_ON] 1 when the dynamic split may be used.
CLAIM, CLAIM_NEXT, CLAIM_ON = MAX_TASKS, 0, 1
# A task of this many rows or more (an output head) is taken in CLAIM_CHUNKS chunks per thread.
DYN_MIN_ROWS = 32768
CLAIM_CHUNKS = 8

# status codes of worker_loop
NEW_PYTHON_TASK, IDLE, CLOSED = 1, 2, 3
# a generation's task count meaning "run the program whose task address is in table row 0"
# (kernels.program: a decode step's blocks)
PROGRAM = -3
PROGRAM_TASK = 5  # the column of table row 0 holding the program task's address

_gv_f32, _gm_f32 = BASIC_KERNELS["F32"]
_gv_f16, _gm_f16 = BASIC_KERNELS["F16"]
_gv_bf16, _gm_bf16 = BASIC_KERNELS["BF16"]
_gv_q4_0, _gm_q4_0 = BASIC_KERNELS["Q4_0"]
_gv_q4_1, _gm_q4_1 = BASIC_KERNELS["Q4_1"]
_gv_q5_0, _gm_q5_0 = BASIC_KERNELS["Q5_0"]
_gv_q5_1, _gm_q5_1 = BASIC_KERNELS["Q5_1"]
_gv_q8_0, _gm_q8_0 = BASIC_KERNELS["Q8_0"]
_gv_q4_k, _gm_q4_k = _kq.KQUANT_KERNELS["Q4_K"]
_gv_q5_k, _gm_q5_k = _kq.KQUANT_KERNELS["Q5_K"]
_gv_q6_k, _gm_q6_k = _kq.KQUANT_KERNELS["Q6_K"]
_gv_q5_0r, _gm_q5_0r = _rp.REPACKED_KERNELS["Q5_0R"]
_gv_q6_kr, _gm_q6_kr = _rp.REPACKED_KERNELS["Q6_KR"]
_gv_q4_kr, _gm_q4_kr = _rp.REPACKED_KERNELS["Q4_KR"]
_gv_q8_0s, _gm_q8_0s = _rp.REPACKED_KERNELS["Q8_0S"]
_gv_q4_0s, _gm_q4_0s = _rp.REPACKED_KERNELS["Q4_0S"]
_gv_q4_1r, _gm_q4_1r = _rp.REPACKED_KERNELS["Q4_1R"]
_gv_q5_1s, _gm_q5_1s = _rp.REPACKED_KERNELS["Q5_1S"]
_gv_q5_ks, _gm_q5_ks = _rp.REPACKED_KERNELS["Q5_KS"]
_gv_q4_kr_i8, _gm_q4_kr_i8 = _ip.INT_KERNELS["Q4_KR"]
_gv_q4_1r_i8, _gm_q4_1r_i8 = _ip.INT_KERNELS["Q4_1R"]
_gv_q8_0s_i8, _gm_q8_0s_i8 = _ip.INT_KERNELS["Q8_0S"]
_gv_q5_0r_i8, _gm_q5_0r_i8 = _ip.INT_KERNELS["Q5_0R"]
_gv_q6_kr_i8, _gm_q6_kr_i8 = _ip.INT_KERNELS["Q6_KR"]


@njit(nogil=True, cache=True)
def _chunk(n, parts, i):
    """Rows [r0, r1) of part ``i`` when [0, n) is split in ``parts`` (as threadpool.split)."""
    p = min(parts, n)
    if i >= p:
        return n, n
    q, rem = divmod(n, p)
    r0 = i * q + min(i, rem)
    return r0, r0 + q + (1 if i < rem else 0)


# ---- one C-callable task per format, compiled when a model first uses the format ----
#
# A task is ``void(w_addr, rows, rowlen, x_addr, n, cols, out_addr, r0, r1)`` (all int64): the
# rows r0..r1-1 of ``out = x @ W.T`` as the table row describes them (n = 0: the GEMV on one
# row of x, else the small-n GEMM on n rows). Each is a separate module-level function so that
# Numba caches each one on its own; :func:`kernel_address` compiles it as a ``cfunc`` the first
# time a table names the format, and run_chunks calls it through the address in the table row.
# So a process compiles only the formats its models use (a first run of a Q4_K_M model: Q4_KR,
# Q6_KR, Q5_0R and F32), not all 19 formats' kernels at once as one dispatch function did.

TASK_SIG = types.void(*([types.int64] * 9))


@njit(nogil=True, inline="always")
def _task(gemv, gemm, dt, w_addr, rows, rowlen, x_addr, n, cols, out_addr, r0, r1):
    """The table row's product with the format's kernels; ``dt`` is the weight array's element type."""
    nx = max(n, 1)
    w = carray(_ptr(w_addr, dt), (rows, rowlen))
    xs = carray(_ptr(x_addr, types.float32), (nx, cols))
    out = carray(_ptr(out_addr, types.float32), (nx, rows))
    if n == 0:
        gemv(w, xs[0], out[0], r0, r1)
    else:
        gemm(w, xs, out, r0, r1)


@njit(nogil=True, inline="always")
def _q(gemv, gemm, w_addr, rows, rowlen, x_addr, n, cols, out_addr, r0, r1):  # quantized blocks (bytes)
    _task(gemv, gemm, types.uint8, w_addr, rows, rowlen, x_addr, n, cols, out_addr, r0, r1)


@njit(nogil=True, inline="always")
def _h(gemv, gemm, w_addr, rows, rowlen, x_addr, n, cols, out_addr, r0, r1):  # F16 / BF16 bits
    _task(gemv, gemm, types.uint16, w_addr, rows, rowlen, x_addr, n, cols, out_addr, r0, r1)


def _t_f32(w, rows, rowlen, x, n, cols, out, r0, r1):
    _task(_gv_f32, _gm_f32, types.float32, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_f16(w, rows, rowlen, x, n, cols, out, r0, r1):
    _h(_gv_f16, _gm_f16, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_bf16(w, rows, rowlen, x, n, cols, out, r0, r1):
    _h(_gv_bf16, _gm_bf16, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q4_0(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_0, _gm_q4_0, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q4_1(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_1, _gm_q4_1, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q5_0(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q5_0, _gm_q5_0, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q5_1(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q5_1, _gm_q5_1, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q8_0(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q8_0, _gm_q8_0, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q4_k(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_k, _gm_q4_k, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q5_k(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q5_k, _gm_q5_k, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q6_k(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q6_k, _gm_q6_k, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q5_0r(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q5_0r, _gm_q5_0r, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q6_kr(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q6_kr, _gm_q6_kr, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q4_kr(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_kr, _gm_q4_kr, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q8_0s(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q8_0s, _gm_q8_0s, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q4_0s(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_0s, _gm_q4_0s, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q4_1r(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_1r, _gm_q4_1r, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q5_1s(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q5_1s, _gm_q5_1s, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q5_ks(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q5_ks, _gm_q5_ks, w, rows, rowlen, x, n, cols, out, r0, r1)


# the integer path's kernels (kernels/intpath.py; matmul.task_key names them "FMT/i8")


def _t_q4_kr_i8(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_kr_i8, _gm_q4_kr_i8, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q4_1r_i8(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q4_1r_i8, _gm_q4_1r_i8, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q8_0s_i8(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q8_0s_i8, _gm_q8_0s_i8, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q5_0r_i8(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q5_0r_i8, _gm_q5_0r_i8, w, rows, rowlen, x, n, cols, out, r0, r1)


def _t_q6_kr_i8(w, rows, rowlen, x, n, cols, out, r0, r1):
    _q(_gv_q6_kr_i8, _gm_q6_kr_i8, w, rows, rowlen, x, n, cols, out, r0, r1)


TASKS = {"F32": _t_f32, "F16": _t_f16, "BF16": _t_bf16, "Q4_0": _t_q4_0, "Q4_1": _t_q4_1, "Q5_0": _t_q5_0,
         "Q5_1": _t_q5_1, "Q8_0": _t_q8_0, "Q4_K": _t_q4_k, "Q5_K": _t_q5_k, "Q6_K": _t_q6_k,
         "Q5_0R": _t_q5_0r, "Q6_KR": _t_q6_kr, "Q4_KR": _t_q4_kr, "Q8_0S": _t_q8_0s, "Q4_0S": _t_q4_0s,
         "Q4_1R": _t_q4_1r, "Q5_1S": _t_q5_1s, "Q5_KS": _t_q5_ks,
         "Q4_KR/i8": _t_q4_kr_i8, "Q4_1R/i8": _t_q4_1r_i8, "Q8_0S/i8": _t_q8_0s_i8, "Q5_0R/i8": _t_q5_0r_i8,
         "Q6_KR/i8": _t_q6_kr_i8}
FMT_IDS = {f: i if i < ATTENTION else 100 + i for i, f in enumerate(TASKS)}  # clear of the attention ids
_compiled: dict[str, object] = {}  # format -> numba CFunc (kept alive: the tables hold its address)
_compile_lock = threading.Lock()


def compiled_formats() -> list[str]:
    """The formats whose tasks this process has loaded (compiled, or read from Numba's cache)."""
    return sorted(_compiled)


def kernel_address(fmt: str) -> int:
    """Address of the C-callable task of ``fmt`` (compiled, or loaded from Numba's cache, on
    first use in this process)."""
    return _cfunc_address(_compiled, fmt, TASK_SIG, TASKS)


def _cfunc_address(done: dict, key, sig, funcs: dict) -> int:
    """Address of ``funcs[key]`` as a ``cfunc`` of ``sig``, made once per process (``done``)."""
    c = done.get(key)
    if c is None:
        with _compile_lock:
            c = done.get(key)
            if c is None:
                c = done[key] = cfunc(sig, cache=True)(funcs[key])
    return c.address


def _task_cached(fmt: str) -> bool:
    """True when Numba's cache holds the task of ``fmt``: its index names an entry for this
    signature and machine (a look at the index; loading the entry would cost ~50 ms)."""
    from numba.core.caching import FunctionCache
    from numba.core.registry import cpu_target

    try:
        cache = FunctionCache(TASKS[fmt])
    except Exception:  # noqa: BLE001 - no usable cache directory: nothing is cached
        return False
    ctx = cpu_target.target_context
    try:  # Numba internals; if they change, load the entry instead
        return cache._index_key(TASK_SIG, ctx.codegen()) in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001
        return cache.load_overload(TASK_SIG, ctx) is not None


def missing_formats(formats) -> list[str]:
    """Those of ``formats`` whose task is neither loaded in this process nor in Numba's cache."""
    return [f for f in dict.fromkeys(formats) if f in TASKS and f not in _compiled and not _task_cached(f)]


# ---- attention as C-callable tasks, one per (kind, KV cache dtype) ----
#
# A task is ``void(row_addr, r0, r1)``: query heads (ATTENTION) or (sequence, head) pairs
# (ATTENTION_BATCH) r0..r1-1 of the table row at ``row_addr``. Attention inside run_chunks
# compiled it for float32 and f16 caches, one-token batches of both, and ops.attention(pool=None)
# compiled it once more as a direct call: 13 s of a first run's ~17 s in the main process (Numba
# compile events, smollm2 with f16 caches: run_chunks 7.4 s, _attention 3.3 s, worker_loop 2.2 s).
# As tasks, a process compiles the attention of the cache type it uses, once, and run_chunks
# and worker_loop hold no kernel.

ATTENTION_SIG = types.void(types.int64, types.int64, types.int64)


@njit(nogil=True, inline="always")
def _attention_task(dt, row_addr, h0, h1):
    """Query heads h0..h1-1 of the ATTENTION row at ``row_addr``; ``dt`` the caches' element type."""
    r = carray(_ptr(row_addr, types.int64), (ROW,))
    hq, n, d, hkv, tmax = r[W_ROWS], r[5], r[6], r[HKV], r[9]
    q = carray(_ptr(r[1], types.float32), (n, hq, d))
    k = carray(_ptr(r[3], dt), (hkv, tmax, d))
    v = carray(_ptr(r[4], dt), (hkv, tmax, d))
    o = carray(_ptr(r[OUT_ADDR], types.float32), (n, hq, d))
    _attention(q, k, v, r[10], o, h0, h1)


@njit(nogil=True, inline="always")
def _attention_batch_task(dt, row_addr, w0, w1):
    """Pairs w0..w1-1 of the ATTENTION_BATCH row at ``row_addr``; ``dt`` the caches' element type."""
    r = carray(_ptr(row_addr, types.int64), (ROW,))
    nb, hq, d = r[4], r[5], r[6]
    q = carray(_ptr(r[1], types.float32), (nb, hq, d))
    caches = carray(_ptr(r[3], types.int64), (nb, 4))
    o = carray(_ptr(r[OUT_ADDR], types.float32), (nb, hq, d))
    _attention_batch_as(q, caches, r[HKV], dt, o, w0, w1)


def _a_f32(row, r0, r1):
    _attention_task(types.float32, row, r0, r1)


def _a_f16(row, r0, r1):
    _attention_task(types.uint16, row, r0, r1)


def _ab_f32(row, r0, r1):
    _attention_batch_task(types.float32, row, r0, r1)


def _ab_f16(row, r0, r1):
    _attention_batch_task(types.uint16, row, r0, r1)


# (kind, f16 caches) -> task
ATTENTION_TASKS = {(ATTENTION, False): _a_f32, (ATTENTION, True): _a_f16,
                   (ATTENTION_BATCH, False): _ab_f32, (ATTENTION_BATCH, True): _ab_f16}
_attention_compiled: dict[tuple, object] = {}  # (kind, f16) -> numba CFunc (kept alive)


def attention_address(kind: int, f16: bool) -> int:
    """Address of the C-callable attention task of ``kind`` (ATTENTION or ATTENTION_BATCH) for
    float32 or f16 (uint16) caches, compiled (or loaded from Numba's cache) on first use."""
    return _cfunc_address(_attention_compiled, (kind, bool(f16)), ATTENTION_SIG, ATTENTION_TASKS)


@intrinsic
def _call_row_task(typingctx, addr, row_addr, r0, r1):
    """Call the task at ``addr`` (an ATTENTION_SIG cfunc) with the other arguments."""
    sig = types.void(addr, row_addr, r0, r1)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [i64] * 3).as_pointer())
        builder.call(fn, [builder.sext(a, i64) if a.type.width < 64 else a for a in args[1:]])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _call_task(typingctx, addr, w, rows, rowlen, x, n, cols, out, r0, r1):
    """Call the task at ``addr`` (a TASK_SIG cfunc) with the other arguments."""
    sig = types.void(addr, w, rows, rowlen, x, n, cols, out, r0, r1)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [i64] * 9).as_pointer())
        builder.call(fn, [builder.sext(a, i64) if a.type.width < 64 else a for a in args[1:]])
        return context.get_dummy_value()

    return sig, codegen


# ---- a SwiGLU expert as one C-callable task ----
#
# Columns of an EXPERT row (the others as a matmul row's: FMT, W_ROWS = 1, COLS = d, OUT_ADDR,
# KERNEL = the address of _expert_task): the gate's address, row length (array elements) and
# task, the up's address, row length and task (0: the up rows follow the gate's in memory, same
# format: one product of 2F rows), the down's address, row length and task, F (the expert's rows), and a
# scratch of 2F float32. The products are the matmul tasks a table of the same products would
# run and the activation is ops.silu_mul's: the output has the bits of the three-stage path.

E_X, E_GATE_ROWLEN, E_GATE, E_F = 1, 3, 4, 5  # (W_ROWS, COLS, OUT_ADDR, KERNEL at their matmul columns)
E_GATE_TASK, E_UP_TASK, E_DOWN_TASK, E_UP, E_DOWN, E_DOWN_ROWLEN, E_SCRATCH, E_UP_ROWLEN = 9, 10, 11, 12, 13, 14, 15, 16


def _expert_task(row_addr, r0, r1):
    """The EXPERT row at ``row_addr`` (r0 < r1: its one unit of work)."""
    if r1 <= r0:
        return
    r = carray(_ptr(row_addr, types.int64), (ROW,))
    f, d, s = r[E_F], r[COLS], r[E_SCRATCH]
    gk, uk, dk = r[E_GATE_TASK], r[E_UP_TASK], r[E_DOWN_TASK]
    if uk == 0:  # gate and up adjacent: one product of 2F rows, gate then up in the scratch
        _call_task(gk, r[E_GATE], 2 * f, r[E_GATE_ROWLEN], r[E_X], 0, d, s, 0, 2 * f)
    else:
        _call_task(gk, r[E_GATE], f, r[E_GATE_ROWLEN], r[E_X], 0, d, s, 0, f)
        _call_task(uk, r[E_UP], f, r[E_UP_ROWLEN], r[E_X], 0, d, s + 4 * f, 0, f)
    g = carray(_ptr(s, types.float32), (1, f))
    u = carray(_ptr(s + 4 * f, types.float32), (1, f))
    _silu_mul(g, u, g)
    _call_task(dk, r[E_DOWN], d, r[E_DOWN_ROWLEN], s, 0, f, r[OUT_ADDR], 0, d)


_expert_compiled: dict[int, object] = {}


def expert_address() -> int:
    """Address of the C-callable SwiGLU expert task (compiled, or loaded from Numba's cache, on
    first use)."""
    return _cfunc_address(_expert_compiled, EXPERT, ATTENTION_SIG, {EXPERT: _expert_task})


@njit(nogil=True, cache=True)
def run_chunks(tab, ntasks, part, parts):
    """Run part ``part`` of ``parts`` of the tasks in ``tab[:ntasks]``, each through its row's
    KERNEL address (no kernel is compiled into this function). Tasks alike (format, shape,
    kernel: a decode step's 16 expert products) are split as one sequence of rows, so a part
    runs whole tasks where they divide (8 each, every activation prepared by one thread);
    otherwise every task is split in ``parts`` (tasks of different formats cost differently
    per row: 0.5B decode measured 0.8-0.9x with them split as one sequence)."""
    alike = True
    for t in range(1, ntasks):
        for c in (FMT, KERNEL, W_ROWS, W_ROWLEN, N, COLS):
            if tab[t, c] != tab[0, c]:
                alike = False
    units = _claim_units(tab, ntasks, parts, alike)
    if units:
        _run_claimed(tab, ntasks, units)
        return
    total = tab[0, W_ROWS] * ntasks if ntasks else 0
    a, b = _chunk(total, parts, part)
    base = 0
    for t in range(ntasks):
        rows = tab[t, W_ROWS]
        if alike:
            r0, r1 = max(a - base, 0), min(b - base, rows)
            base += rows
        else:
            r0, r1 = _chunk(rows, parts, part)
        if r1 <= r0:
            continue
        _run_rows(tab, t, r0, r1)


@njit(nogil=True, cache=True)
def _run_rows(tab, t, r0, r1):
    """Rows r0..r1-1 of task ``t``."""
    fmt = tab[t, FMT]
    if fmt == ATTENTION or fmt == ATTENTION_BATCH or fmt == EXPERT:  # (matmul ids skip these: FMT_IDS)
        _call_row_task(tab[t, KERNEL], tab.ctypes.data + t * tab.strides[0], r0, r1)
    else:
        _call_task(tab[t, KERNEL], tab[t, W_ADDR], tab[t, W_ROWS], tab[t, W_ROWLEN], tab[t, X_ADDR], tab[t, N],
                   tab[t, COLS], tab[t, OUT_ADDR], r0, r1)


@njit(nogil=True, cache=True)
def _claim_units(tab, ntasks, parts, alike):
    """The units of the dynamic split of this table (0: split statically). Threads of a VM lose
    their core for a while now and then; with a static split the others wait for their part.
    Where a unit costs no extra work (whole tasks of a table of like tasks, or chunks of a task so
    large that preparing its activations again per chunk is noise), each thread takes the next
    unit until none is left."""
    if parts < 2 or tab.shape[0] <= CLAIM or tab[CLAIM, CLAIM_ON] == 0 or ntasks == 0:
        return 0
    if alike and ntasks >= 2 * parts:
        return ntasks
    fmt = tab[0, FMT]
    if ntasks == 1 and tab[0, W_ROWS] >= DYN_MIN_ROWS and fmt != ATTENTION and fmt != ATTENTION_BATCH:
        return CLAIM_CHUNKS * parts
    return 0


@njit(nogil=True, cache=True)
def _run_claimed(tab, ntasks, units):
    """Take units (whole tasks, or chunks of the one task) until none is left."""
    claim = tab[CLAIM]
    while True:
        u = sync.atomic_add(claim, CLAIM_NEXT, 1)
        if u >= units:
            return
        if ntasks == 1:
            r0, r1 = _chunk(tab[0, W_ROWS], units, u)
            _run_rows(tab, 0, r0, r1)
        else:
            _run_rows(tab, u, 0, tab[u, W_ROWS])


@njit(nogil=True, cache=True)
def worker_loop(ctl, tab, ntasks_slot, wi, parts, last, spins):
    """A pool worker's nogil loop: run table tasks as generations are published.

    Control array: ctl[0] generation; ctl[1 + wi - 1] this worker's finished
    generation; ctl[ntasks_slot] number of table tasks of the current generation,
    -1 when the task is Python code, PROGRAM for a program (kernels.program).

    Returns (status, generation): NEW_PYTHON_TASK (run it in Python, then mark
    done), IDLE (no new generation within ``spins`` rounds: go to sleep), or CLOSED
    (ctl[ntasks_slot] == -2).
    """
    while True:
        g = sync.spin_while_equal(ctl, 0, last, spins)
        if g == last:
            return IDLE, last
        last = g
        nt = sync.load(ctl, ntasks_slot)
        if nt == PROGRAM:
            _call_row_task(tab[0, PROGRAM_TASK], tab.ctypes.data, wi, parts)
            sync.store(ctl, wi, g)
            continue
        if nt < 0:
            return (NEW_PYTHON_TASK if nt == -1 else CLOSED), g
        run_chunks(tab, nt, wi, parts)
        sync.store(ctl, wi, g)


@njit(nogil=True, cache=True)
def _fill_row(tab, t, fmt, kernel, data, x, out):
    tab[t, FMT] = fmt
    tab[t, KERNEL] = kernel
    tab[t, W_ADDR] = data.ctypes.data
    tab[t, W_ROWS] = data.shape[0]
    tab[t, W_ROWLEN] = data.shape[1]
    tab[t, X_ADDR] = x.ctypes.data
    tab[t, N] = 0 if x.ndim == 1 or x.shape[0] == 1 else x.shape[0]  # one row: the GEMV kernel
    tab[t, COLS] = x.shape[x.ndim - 1]
    tab[t, OUT_ADDR] = out.ctypes.data


def fill(tab: np.ndarray, t: int, fmt: str, data: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """Describe ``out = x @ W.T`` (rows of ``data``) in row ``t`` of ``tab``."""
    _fill_row(tab, t, FMT_IDS[fmt], kernel_address(fmt), data, x, out)


@njit(nogil=True, cache=True)
def _fill_attention_row(tab, t, q, k, v, n_past, out, kernel):
    n, hq, d = q.shape
    tab[t, FMT] = ATTENTION
    tab[t, 1] = q.ctypes.data
    tab[t, W_ROWS] = hq
    tab[t, 3] = k.ctypes.data
    tab[t, 4] = v.ctypes.data
    tab[t, 5] = n
    tab[t, 6] = d
    tab[t, OUT_ADDR] = out.ctypes.data
    tab[t, KERNEL] = kernel
    tab[t, 9] = k.shape[1]
    tab[t, 10] = n_past
    tab[t, HKV] = k.shape[0]


@njit(nogil=True, cache=True)
def _fill_attention_batch_row(tab, t, q, caches, hkv, out, kernel):
    nb, hq, d = q.shape
    tab[t, FMT] = ATTENTION_BATCH
    tab[t, 1] = q.ctypes.data
    tab[t, W_ROWS] = nb * hq
    tab[t, 3] = caches.ctypes.data
    tab[t, 4] = nb
    tab[t, 5] = hq
    tab[t, 6] = d
    tab[t, OUT_ADDR] = out.ctypes.data
    tab[t, KERNEL] = kernel
    tab[t, 9] = 0
    tab[t, 10] = 0
    tab[t, HKV] = hkv


@njit(nogil=True, cache=True)
def up_task(gate_addr, gate_rows, gate_stride, up_addr, gate_task, task):
    """An expert row's E_UP_TASK: 0 where the gate's task also does the up product (one product of
    2F rows: the same task, the up rows right after the gate's, as in a store and an expert
    slot), else the up product's ``task``."""
    if task == gate_task and up_addr == gate_addr + gate_rows * gate_stride:
        return 0
    return task


@njit(nogil=True, inline="always")
def _fill_expert_row(tab, t, x, gate, up, down, tasks, out, scratch):
    f, d = gate.shape[0], x.shape[0]
    tab[t, FMT] = EXPERT
    tab[t, E_X] = x.ctypes.data
    tab[t, W_ROWS] = 1
    tab[t, E_GATE_ROWLEN] = gate.shape[1]
    tab[t, E_GATE] = gate.ctypes.data
    tab[t, E_F] = f
    tab[t, COLS] = d
    tab[t, OUT_ADDR] = out.ctypes.data
    tab[t, KERNEL] = tasks[0]
    tab[t, E_GATE_TASK] = tasks[1]
    tab[t, E_UP_TASK] = up_task(gate.ctypes.data, f, gate.strides[0], up.ctypes.data, tasks[1], tasks[2])
    tab[t, E_UP] = up.ctypes.data
    tab[t, E_UP_ROWLEN] = up.shape[1]
    tab[t, E_DOWN] = down.ctypes.data
    tab[t, E_DOWN_ROWLEN] = down.shape[1]
    tab[t, E_DOWN_TASK] = tasks[3]
    tab[t, E_SCRATCH] = scratch.ctypes.data


@njit(nogil=True, cache=True)
def _fill_expert_rows(tab, x, gates, ups, downs, tasks, out, scratch):
    for t in range(len(gates)):
        _fill_expert_row(tab, t, x, gates[t], ups[t], downs[t], tasks[t], out[t], scratch[t])


@njit(nogil=True, cache=True)
def _fill_one_expert(tab, t, x, gate, up, down, tasks, out, scratch):
    _fill_expert_row(tab, t, x, gate, up, down, tasks, out, scratch)


def expert_tasks(gate_key: str, up_key: str, down_key: str) -> tuple[int, int, int, int]:
    """The addresses :func:`fill_experts` takes per expert: the expert task's and the gate, up and
    down products' tasks (``gate_key`` ... the task keys of the current path, ``matmul.task_key``)."""
    return expert_address(), kernel_address(gate_key), kernel_address(up_key), kernel_address(down_key)


def fill_experts(tab: np.ndarray, x: np.ndarray, weights: list, tasks: np.ndarray, out: np.ndarray,
                 scratch: np.ndarray) -> None:
    """Describe ``out[t] = down . (silu(gate . x) * (up . x))`` for one row ``x`` (d,) in rows
    0.. of ``tab``, one per expert: ``weights[t]`` its (gate, up, down) kernel arrays (C-contiguous
    2-D; gate, up F rows, down d rows), ``tasks[t]`` its :func:`expert_tasks`, out (n, d) and
    scratch (n, 2F) float32. Experts whose arrays share one type go in one Numba call."""
    cols = tuple(zip(*weights))
    if all(len({(a.dtype, a.flags.writeable, a.flags.aligned) for a in c}) == 1 for c in cols):
        _fill_expert_rows(tab, x, *cols, tasks, out, scratch)
    else:  # (a tuple of arrays of different types is not one Numba type)
        for t, (g, u, dn) in enumerate(weights):
            _fill_one_expert(tab, t, x, g, u, dn, tasks[t], out[t], scratch[t])


# (Numba fills the rows: four ``.ctypes.data`` in Python took 30 of a decode attention's 80 us.)


def fill_attention(tab: np.ndarray, t: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int,
                   out: np.ndarray) -> int:
    """Describe causal attention (kernels.ops.attention's arrays, all C-contiguous; k and v float32,
    or uint16 for an f16 cache) in row ``t``."""
    _fill_attention_row(tab, t, q, k, v, n_past, out, attention_address(ATTENTION, k.dtype == np.uint16))
    return t + 1


def fill_attention_batch(tab: np.ndarray, t: int, q: np.ndarray, caches: np.ndarray, hkv: int,
                         out: np.ndarray, *, f16: bool = False) -> int:
    """Describe kernels.ops.attention_batch's arrays (q, out C-contiguous; ``caches`` its int64 table,
    of f16 caches when ``f16``) in row ``t``."""
    _fill_attention_batch_row(tab, t, q, caches, hkv, out, attention_address(ATTENTION_BATCH, f16))
    return t + 1


def warm_up() -> None:
    """Compile (or load) run_chunks and worker_loop with the argument types the pool uses."""
    tab = new_table()
    run_chunks(tab, 0, 0, 1)
    ctl = np.array([1, 0, -2], np.int64)  # a new generation whose task count says "closed"
    worker_loop(ctl, tab, 2, 1, 2, 0, 1)


def new_table(*, claim: bool = False) -> np.ndarray:
    """A task table: MAX_TASKS rows and the claim row (the dynamic split on when ``claim``)."""
    tab = np.zeros((MAX_TASKS + 1, ROW), np.int64)
    tab[CLAIM, CLAIM_ON] = int(claim)
    return tab

"""Public matmul over stored weights: GEMV, small-n kernels, or dequantize-a-tile + BLAS.

``matmul(x, w)`` computes ``x @ W.T`` for a weight ``W`` of logical shape
(rows=out_features, cols=in_features) kept in its GGUF block format:

- one activation row: the fused GEMV kernel of the format;
- ``n`` rows with ``2 <= n < BLAS_MIN_ROWS[fmt]``: the format's small-n kernel (its ``gemm``):
  the two-row dot on each pair of rows (an odd last row: the GEMV's dot) over 32-row weight
  tiles, each block decoded once per pair, every row given the GEMV's operations in the
  GEMV's order (vector IR with FMA contraction only, no reassociation; see simd.py). So row j
  of the product has exactly the bits of ``matmul(x[j], w)``, on one thread or split on a pool:
  a batch of sequences, or a verification of draft tokens, decodes the same greedy tokens as
  one token at a time;
- ``n >= BLAS_MIN_ROWS[fmt]``: tiles of ``TILE_ROWS`` weight rows are dequantized
  in this thread and multiplied with numpy's BLAS (which runs its own threads:
  the pool is parked first so that no idle worker spins against them); never the
  whole matrix at once. Rows are not bit-identical to the GEMV's here.

The fused kernels of one call, or of several weights sharing the input
(:func:`matmul_many`: q/k/v, gate/up), run as one table of nogil tasks
(``kernels.executor``): on the pool when the product has PARALLEL_MIN_BYTES or
more, else in this thread.

Kernels come from ``gemv_basic.BASIC_KERNELS``, ``gemv_kquant.KQUANT_KERNELS`` and
``repacked.REPACKED_KERNELS`` (store-only layouts such as Q5_0R), all with the same
``(gemv, gemm)`` row-range contract; ``dequantize`` uses the matching
``*_DEQUANT[fmt](w, out, r0, r1)``.

BLAS_MIN_ROWS (where dequantize-tile + BLAS takes over): the small-n kernels cost 0.4-0.75 of a
GEMV per row (the f32 FMAs of every row, as the GEMV does them, are the floor), tile + BLAS the
dequantization of the whole matrix in this thread (2.6-8 G weights/s) and then the f32 GEMM.
Measured on the 2-core AVX2 EPYC while it was shared (two-thread timings were scheduler noise:
OpenBLAS's threads collapsed to 300-700 ms per product), both on one thread
(``OPENBLAS_NUM_THREADS=1 python perf/bench_matmul.py --crossover --threads 1``), the first n at
which BLAS won: Q4_KR 16 / 64 (8960x1536 / 1536x8960), Q6_KR 24 / 48, Q5_0R 16 / 16 / 48 (4864x896
too), Q8_0S 16-48 / 16-48 / 64, Q4_1R 16 / 24 / 48, Q4_0S 16 / 16 / 48, Q5_KS 16 / 48, Q5_1S 8 / 8
/ 24, F16 128 / 96, BF16 96 / 64 / 64. With two threads the dequantization stays on one and
OpenBLAS's GEMM of 16-32 rows gains only 1.2-1.4x from the second (50 -> 68 GFLOP/s at n = 32),
while the small-n kernels split rows: on a quiet machine the old fused GEMM (1.3-1.5x slower per
row than these kernels) still tied BLAS at n = 64 (qwen2.5-coder-0.5b prefill, 2 threads, tok/s
fused / BLAS: n=32 94/49, n=64 81/82, n=100 86/108). So 64 for the quantized formats, 32 for Q5_1
(a decode-bound GEMV: its one-thread crossover is 2-3x lower than the others'), 128 F16, 96 BF16,
64 F32. Below BLAS_MIN_ROWS a batch (decode of up to 63 sequences, verification of up to 62 draft
tokens; 31 / 30 for Q5_1) keeps the GEMV's bits. TILE_ROWS: 512 tokens with 256-row tiles 186
tok/s, with 1024-row tiles 200 tok/s (qwen2.5-coder-0.5b prefill).
"""

from __future__ import annotations

import numpy as np

from flashlm.kernels import executor
from flashlm.kernels.formats import FORMATS, QTensor, take_rows
from flashlm.kernels.gemv_basic import BASIC_KERNELS, DEQUANT_KERNELS, HAVE_SIMD
from flashlm.kernels.gemv_kquant import KQUANT_DEQUANT, KQUANT_KERNELS
from flashlm.kernels.repacked import REPACKED_DEQUANT, REPACKED_KERNELS

if HAVE_SIMD:
    from flashlm.kernels.intpath import INT_KERNELS
else:  # the integer kernels are AVX2 code
    INT_KERNELS = {}

KERNELS: dict[str, tuple] = dict(BASIC_KERNELS, **KQUANT_KERNELS, **REPACKED_KERNELS)
DEQUANT: dict[str, object] = dict(DEQUANT_KERNELS, **KQUANT_DEQUANT, **REPACKED_DEQUANT)

# Rows from which dequantize-tile + BLAS takes over from the small-n kernels (see the module
# docstring); below it every row of a product has the bits of the GEMV on that row.
BLAS_MIN_ROWS: dict[str, int] = {fmt: 64 for fmt in FORMATS}
BLAS_MIN_ROWS.update({"Q5_1": 32, "Q5_1S": 32, "F16": 128, "BF16": 96})
TILE_ROWS = 1024  # weight rows dequantized per BLAS tile (BLAS is slow on thin tiles)
# Below this many weight bytes x activation rows a product runs in the calling thread.
PARALLEL_MIN_BYTES = 256 * 1024
_F32 = np.dtype(np.float32)
INT_SUFFIX = "/i8"  # task key of a format's integer kernels (kernels.executor.TASKS)
_mode = {"exact": False}


def set_exact(exact: bool) -> None:
    """Choose the exact float32 kernels (True) or the integer path (False, the default: int8
    activations for the formats of ``INT_KERNELS``, kernels/intpath.py) for every product of
    this process from now on."""
    _mode["exact"] = bool(exact)


def is_exact() -> bool:
    """True when the exact float32 kernels are chosen (``set_exact``)."""
    return _mode["exact"] or not INT_KERNELS


_INT_KEYS = {f: f + INT_SUFFIX for f in INT_KERNELS}


def task_key(fmt: str) -> str:
    """The kernels a product of weight format ``fmt`` runs in the current mode: ``fmt`` (exact)
    or ``fmt + INT_SUFFIX`` (integer path). (Called per product: no string is built.)"""
    return fmt if _mode["exact"] else _INT_KEYS.get(fmt, fmt)


def kernels(fmt: str) -> tuple:
    """(gemv, gemm) of ``fmt`` in the current mode."""
    return INT_KERNELS[fmt] if fmt in INT_KERNELS and not _mode["exact"] else KERNELS[fmt]



class _Serial:
    """Stand-in pool: run the whole range in the calling thread."""

    n_threads = 1

    @staticmethod
    def run(fn, n, *args) -> None:
        if n > 0:
            fn(*args, 0, n)


_SERIAL = _Serial()


def _kernel_array(w: QTensor) -> np.ndarray:
    data = w.data
    if w.fmt == "F16":
        data = data.view(np.uint16)  # Numba has no float16 arrays
    if data.ndim != 2 or not data.flags.c_contiguous:
        raise ValueError(f"matmul: weight data must be a C-contiguous 2-D array, got shape "
                         f"{data.shape} (contiguous={data.flags.c_contiguous})")
    return data


def _dequant_rows(fmt: str, data: np.ndarray, out: np.ndarray, pool=_SERIAL) -> None:
    """Decode every row of ``data`` into ``out`` (rows, cols) float32."""
    if fmt == "F32":
        out[:] = data
    elif fmt == "F16":
        out[:] = data.view(np.float16)
    elif fmt == "BF16":
        out.view(np.uint32)[:] = data.astype(np.uint32) << 16
    elif fmt in DEQUANT:
        pool.run(DEQUANT[fmt], data.shape[0], data, out)
    else:
        import gguf

        out[:] = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[fmt])


def _blas(fmt: str, data: np.ndarray, X: np.ndarray, out: np.ndarray, pool) -> None:
    if hasattr(pool, "park"):
        pool.park()  # BLAS runs its own threads: no pool worker may spin against them
    rows, cols = out.shape[1], X.shape[1]
    step = TILE_ROWS
    tile = np.empty((min(step, rows), cols), np.float32)
    for t0 in range(0, rows, step):
        t1 = min(rows, t0 + step)
        part = tile[: t1 - t0]
        _dequant_rows(fmt, take_rows(fmt, data, cols, slice(t0, t1)), part)  # in this thread: BLAS owns the cores here
        np.matmul(X, part.T, out=out[:, t0:t1])


def _check(x: np.ndarray, w: QTensor) -> np.ndarray:
    if w.fmt not in KERNELS:
        raise NotImplementedError(f"matmul: no kernel for weight format {w.fmt!r} "
                                  f"(have {sorted(KERNELS)})")
    if len(w.shape) != 2:
        raise ValueError(f"matmul: weight must be 2-D, got shape {w.shape}")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"matmul: x must be a float32 ndarray, got {getattr(x, 'dtype', type(x))}")
    if x.ndim not in (1, 2) or x.shape[-1] != w.shape[1]:
        raise ValueError(f"matmul: x shape {x.shape} does not match weight shape {w.shape} "
                         f"(need (..., {w.shape[1]}))")
    return np.ascontiguousarray(x)


def _out(x: np.ndarray, w: QTensor, out: np.ndarray | None) -> np.ndarray:
    oshape = (w.shape[0],) if x.ndim == 1 else (x.shape[0], w.shape[0])
    if out is None:
        return np.empty(oshape, np.float32)
    if out.shape != oshape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"matmul: out must be C-contiguous float32 of shape {oshape}, got "
                         f"{out.dtype} {out.shape}")
    return out


def _run(x: np.ndarray, ws: list[QTensor], outs: list[np.ndarray], pool) -> None:
    """The fused GEMV/GEMM of each weight, as one table of nogil tasks (kernels.executor)."""
    datas = [_kernel_array(w) for w in ws]

    def fill(tab: np.ndarray) -> int:
        for t, (w, data, o) in enumerate(zip(ws, datas, outs)):
            executor.fill(tab, t, task_key(w.fmt), data, x, o)
        return len(ws)

    nbytes = sum(w.nbytes for w in ws) * (1 if x.ndim == 1 else x.shape[0])
    fits = len(ws) <= executor.MAX_TASKS
    if pool is not None and nbytes >= PARALLEL_MIN_BYTES:
        if fits and hasattr(pool, "run_table"):
            pool.run_table(fill)
            return
        for w, data, o in zip(ws, datas, outs):  # a duck-typed pool: one run per weight
            gemv, gemm = kernels(w.fmt)
            if x.ndim == 1:
                pool.run(gemv, w.shape[0], data, x, o)
            else:
                pool.run(gemm, w.shape[0], data, x, o)
        return
    if fits:  # small: in this thread, still without a Python call per kernel
        tab = executor.new_table()
        executor.run_chunks(tab, fill(tab), 0, 1)
    else:
        for w, data, o in zip(ws, datas, outs):
            gemv, gemm = kernels(w.fmt)
            (gemv if x.ndim == 1 else gemm)(data, x, o, 0, w.shape[0])


def matmul(x: np.ndarray, w: QTensor, out: np.ndarray | None = None, *, pool=None) -> np.ndarray:
    """``x @ W.T`` with ``W`` kept in its stored format.

    Args:
        x: float32 activations, (cols,) or (n, cols).
        w: the weight, logical shape (rows, cols).
        out: optional float32 result buffer, (rows,) or (n, rows), C-contiguous.
        pool: object with ``n_threads`` and ``run(fn, n, *args)`` (e.g.
            ``flashlm.runtime.threadpool.ThreadPool``); None runs in this thread.
            Work under PARALLEL_MIN_BYTES runs in this thread anyway: waking a
            worker costs more than the whole product.

    Returns:
        float32 array (rows,) for 1-D ``x``, else (n, rows).
    """
    x = _check(x, w)
    out = _out(x, w, out)
    if x.ndim == 2 and x.shape[0] >= BLAS_MIN_ROWS.get(w.fmt, 128):
        _blas(w.fmt, _kernel_array(w), x, out, _SERIAL if pool is None else pool)
    else:
        _run(x, [w], [out], pool)
    return out


def matmul_many(x: np.ndarray, ws: list[QTensor], *, pool=None) -> list[np.ndarray]:
    """``[x @ W.T for W in ws]`` for weights that share the input (q/k/v, gate/up).

    The fused kernels of all of them run in one pool dispatch (each thread takes its
    share of every matrix), which saves a wake-up per matrix in decode.
    """
    x = _check(x, ws[0])
    for w in ws[1:]:
        _check(x, w)
    if x.ndim == 2 and x.shape[0] >= min(BLAS_MIN_ROWS.get(w.fmt, 128) for w in ws):
        return [matmul(x, w, pool=pool) for w in ws]
    outs = [_out(x, w, None) for w in ws]
    _run(x, ws, outs, pool)
    return outs


def matmul_each(xs: list[np.ndarray], ws: list[QTensor], outs: list[np.ndarray], *, pool=None) -> None:
    """``outs[j][:] = xs[j] @ ws[j].T`` for products that each have their own input and
    output (the chosen experts of a mixture-of-experts layer: every gate/up, then every down).

    The fused kernels run as tables of up to ``executor.MAX_TASKS`` tasks, one pool
    dispatch per table (a decode step's 8 experts' gate and up products are one); a
    product of BLAS_MIN_ROWS rows or more goes to :func:`matmul` (tiles + BLAS).

    Args:
        xs: float32 inputs, each (cols_j,) or (n_j, cols_j).
        ws: the weights, each (rows_j, cols_j).
        outs: C-contiguous float32 results, each (rows_j,) or (n_j, rows_j).
        pool: as for :func:`matmul`.
    """
    fused, nbytes = [], 0
    for x, w, o in zip(xs, ws, outs):  # the checks of _check/_out inline: a decode step has ~400 products
        data = w.data
        if w.fmt == "F16":
            data = data.view(np.uint16)
        n = 1 if x.ndim == 1 else x.shape[0]
        if not (x.dtype == _F32 and o.dtype == _F32 and x.shape[-1] == w.shape[-1] and o.shape[-1] == w.shape[0]
                and x.shape[:-1] == o.shape[:-1] and data.ndim == 2 and w.fmt in KERNELS
                and x.flags.c_contiguous and o.flags.c_contiguous and data.flags.c_contiguous):
            x = _check(x, w)  # the precise error, or a contiguous copy of x
            _out(x, w, o)
            data = _kernel_array(w)
        if x.ndim == 2 and n >= BLAS_MIN_ROWS.get(w.fmt, 128):
            matmul(x, w, o, pool=pool)
        else:
            fused.append((x, w.fmt, data, o))
            nbytes += data.nbytes * n
    parallel = pool is not None and nbytes >= PARALLEL_MIN_BYTES
    for t0 in range(0, len(fused), executor.MAX_TASKS):
        part = fused[t0:t0 + executor.MAX_TASKS]

        def fill(tab: np.ndarray, part=part) -> int:
            for t, (x, fmt, data, o) in enumerate(part):
                executor.fill(tab, t, task_key(fmt), data, x, o)
            return len(part)

        if parallel and hasattr(pool, "run_table"):
            pool.run_table(fill)
        elif parallel:  # a duck-typed pool: one run per product
            for x, fmt, data, o in part:
                gemv, gemm = kernels(fmt)
                pool.run(gemv if x.ndim == 1 else gemm, data.shape[0], data, x, o)
        else:  # small: in this thread, still without a Python call per kernel
            tab = executor.new_table()
            executor.run_chunks(tab, fill(tab), 0, 1)


def dequantize(w: QTensor, rows: np.ndarray | None = None) -> np.ndarray:
    """The weight (or some of its rows) as float32, equal to ``gguf.quants.dequantize``.

    Args:
        w: the weight, logical shape (..., cols).
        rows: optional integer row indices (any shape), e.g. token ids for an
            embedding lookup; default all rows.

    Returns:
        float32 array ``w.shape`` or ``rows.shape + (cols,)``.
    """
    cols = w.shape[-1]
    data = w.data
    if data.ndim == 1:
        data = data.reshape(1, -1)
    data = data.reshape(-1, data.shape[-1])
    if w.fmt == "F16":
        data = data.view(np.uint16)
    if rows is None:
        lead = tuple(w.shape[:-1])
    else:
        idx = np.asarray(rows)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"dequantize: rows must be integers, got {idx.dtype}")
        lead = idx.shape
        data = take_rows(w.fmt, data, cols, idx.reshape(-1))
    out = np.empty((data.shape[0], cols), np.float32)
    _dequant_rows(w.fmt, np.ascontiguousarray(data), out)
    return out.reshape(lead + (cols,))


__all__ = ["BLAS_MIN_ROWS", "HAVE_SIMD", "INT_KERNELS", "KERNELS", "dequantize", "is_exact", "matmul", "set_exact"]

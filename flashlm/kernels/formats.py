"""Weight block formats (the GGUF ones) and the tensor handle passed to kernels.

A weight matrix of logical shape (rows, cols) is stored row-major; for a block
format every row is ``cols // block_size`` blocks of ``type_size`` bytes.
Arrays handed to kernels:
  F32  -> float32 (rows, cols)
  F16  -> float16 (rows, cols)
  BF16 -> uint16  (rows, cols)   (upper half of an f32)
  quantized -> uint8 (rows, cols // block_size * type_size)
  grouped store layouts (``GROUPED``, written on import, see kernels/repacked.py)
            -> uint8 (rows, row_nbytes(fmt, cols))
  slabbed store layouts (``SLABBED``, every store layout): uint8 (rows, row_nbytes) too, but a
            row longer than SLAB_COLS weights is cut into column slabs (``slab_cuts``) and the tensor's bytes
            are slab 0 of every row, then slab 1 of every row, ...: each slab is a
            contiguous row-major (rows, slab bytes) matrix. ``data[i]`` is then not row i:
            select rows with :func:`take_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name: (gguf type id, block size in weights, bytes per block)
FORMATS: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
    "Q5_0R": (-1, 32, 22),  # store-only layout of Q5_0 (no GGUF id): see GROUPED
    "Q6_KR": (-1, 256, 210),  # store-only layout of Q6_K: same block size, quants reordered
    "Q4_KR": (-1, 256, 144),  # store-only layout of Q4_K: same block size, quants reordered
    # store-only names of GGUF formats whose blocks are kept as they are, in column slabs
    "Q8_0S": (-1, 32, 34),
    "Q4_0S": (-1, 32, 18),
    "Q5_1S": (-1, 32, 24),
    "Q5_KS": (-1, 256, 176),
    "Q4_1R": (-1, 32, 20),  # store-only layout of Q4_1: see GROUPED
}
# Store-only layouts: (blocks per group, bytes per group, bytes per tail block). A row is
# nb // blocks groups, then the last nb % blocks blocks in the GGUF format's layout.
GROUPED: dict[str, tuple[int, int, int]] = {"Q5_0R": (3, 70, 22), "Q4_1R": (4, 80, 20)}
# GGUF format -> the layout a store keeps it in (kernels/repacked.py)
STORE_LAYOUT = {"Q5_0": "Q5_0R", "Q6_K": "Q6_KR", "Q4_K": "Q4_KR",
                "Q8_0": "Q8_0S", "Q4_0": "Q4_0S", "Q4_1": "Q4_1R", "Q5_1": "Q5_1S", "Q5_K": "Q5_KS"}
GGUF_OF = {v: k for k, v in STORE_LAYOUT.items()}
# Store layouts kept in column slabs (every quantized one): a row longer than SLAB_COLS
# weights is cut into n_slabs slabs of whole units (a block; a group of GROUPED blocks) of
# near-equal width, the last taking a grouped layout's tail blocks. The GEMV then runs slab
# by slab over its rows, each with at most SLAB_COLS activations (12-13 KB), which stay in
# L1 next to the weight stream (long rows such as ffn_down's 8960 lose 20-50 % when they do
# not; ``perf/bench_col_tiles.py``). A row of one slab is the row-major layout.
SLABBED = frozenset(GGUF_OF)
SLAB_COLS = 3072
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
GGUF_ID_TO_NAME = {v[0]: k for k, v in FORMATS.items() if v[0] >= 0}
GGUF_FORMATS = tuple(GGUF_ID_TO_NAME.values())


def block_size(fmt: str) -> int:
    return FORMATS[fmt][1]


def type_size(fmt: str) -> int:
    return FORMATS[fmt][2]


def row_nbytes(fmt: str, cols: int) -> int:
    bs, ts = FORMATS[fmt][1], FORMATS[fmt][2]
    if cols % bs:
        raise ValueError(f"{fmt}: row length {cols} is not a multiple of the block size {bs}")
    if fmt in GROUPED:
        g, gb, tb = GROUPED[fmt]
        nb = cols // bs
        return nb // g * gb + nb % g * tb
    return cols // bs * ts


def row_cols(fmt: str, nbytes: int) -> int:
    """The row length (weights) whose ``fmt`` row takes ``nbytes`` (inverse of row_nbytes)."""
    bs, ts = FORMATS[fmt][1], FORMATS[fmt][2]
    if fmt in GROUPED:
        g, gb, tb = GROUPED[fmt]
        k, rem = divmod(nbytes, gb)
        if rem % tb or rem // tb >= g:
            raise ValueError(f"{fmt}: {nbytes} bytes is not a whole row")
        return (g * k + rem // tb) * bs
    if nbytes % ts:
        raise ValueError(f"{fmt}: {nbytes} bytes is not a whole row")
    return nbytes // ts * bs


def slab_unit(fmt: str) -> tuple[int, int]:
    """(weights, bytes) of the unit a slab is cut in: a group of a grouped layout, else a block."""
    if fmt in GROUPED:
        g, gb, _ = GROUPED[fmt]
        return g * FORMATS[fmt][1], gb
    return FORMATS[fmt][1], FORMATS[fmt][2]


def n_slabs(units: int, per: int) -> int:
    """Slabs of a row of ``units`` whole units, at most ``per`` units each (also compiled by Numba)."""
    return max(1, (units + per - 1) // per)


def slab_cuts(fmt: str, cols: int) -> list[tuple[int, int, int, int]]:
    """(first column, end column, first byte, end byte) within a row of each column slab of
    ``fmt`` (one slab for a layout that is not SLABBED): slab s starts at unit
    units * s // n_slabs; the last slab ends the row (a grouped layout's tail blocks)."""
    rb = row_nbytes(fmt, cols)
    if fmt not in SLABBED:
        return [(0, cols, 0, rb)]
    uw, ub = slab_unit(fmt)
    nu = cols // uw
    k = n_slabs(nu, SLAB_COLS // uw)
    u = [nu * s // k for s in range(k)]
    return [(uw * u[s], uw * u[s + 1] if s + 1 < k else cols, ub * u[s], ub * u[s + 1] if s + 1 < k else rb)
            for s in range(k)]


def slab_bytes(fmt: str, cols: int) -> list[tuple[int, int]]:
    """(first byte, end byte) within a row of each column slab of ``fmt``."""
    return [(b0, b1) for _, _, b0, b1 in slab_cuts(fmt, cols)]


def to_slabs(fmt: str, rows: np.ndarray, cols: int) -> np.ndarray:
    """Row-major (n, row bytes) ``fmt`` rows -> the same bytes in slab order (a new array
    when there is more than one slab)."""
    cuts = slab_bytes(fmt, cols)
    if len(cuts) == 1:
        return rows
    return np.concatenate([rows[:, a:b].reshape(-1) for a, b in cuts]).reshape(rows.shape)


def from_slabs(fmt: str, data: np.ndarray, cols: int) -> np.ndarray:
    """The inverse of :func:`to_slabs`: (n, row bytes) in slab order -> row-major rows."""
    cuts = slab_bytes(fmt, cols)
    if len(cuts) == 1:
        return data
    n, flat, base, parts = data.shape[0], data.reshape(-1), 0, []
    for a, b in cuts:
        parts.append(flat[base:base + n * (b - a)].reshape(n, b - a))
        base += n * (b - a)
    return np.concatenate(parts, axis=1)


def take_rows(fmt: str, data: np.ndarray, cols: int, idx) -> np.ndarray:
    """``data[idx]`` for a 2-D kernel array (rows, row bytes): rows ``idx`` (integer array or
    slice) in ``fmt``'s layout for that many rows; for a slabbed layout each slab's rows
    are gathered, without unslabbing the whole tensor."""
    cuts = slab_bytes(fmt, cols) if fmt in SLABBED and data.ndim == 2 else [(0, 0)]
    if len(cuts) == 1:
        return data[idx]
    n, flat, base, parts = data.shape[0], data.reshape(-1), 0, []
    for a, b in cuts:
        parts.append(flat[base:base + n * (b - a)].reshape(n, b - a)[idx].reshape(-1))
        base += n * (b - a)
    out = np.concatenate(parts)
    return out.reshape(out.size // data.shape[1], data.shape[1])


def tensor_nbytes(fmt: str, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape[:-1]:
        n *= s
    return n * row_nbytes(fmt, shape[-1])


def view_as(fmt: str, buf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reinterpret raw uint8 bytes ``buf`` as the kernel array for ``fmt`` (zero copy)."""
    if fmt in FLOAT_DTYPES:
        return buf.view(FLOAT_DTYPES[fmt]).reshape(shape)
    lead = tuple(shape[:-1])
    return buf.reshape(lead + (row_nbytes(fmt, shape[-1]),))


@dataclass(frozen=True)
class QTensor:
    """A weight as stored: ``data`` in the kernel array layout above, ``fmt``, logical ``shape``.

    ``stable`` is False for a view of a streaming buffer (flashlm.offload), whose address
    holds other weights later: nothing may cache anything keyed by its address."""

    data: np.ndarray
    fmt: str
    shape: tuple[int, ...]
    stable: bool = True

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

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
}
# Store-only layouts: (blocks per group, bytes per group, bytes per tail block). A row is
# nb // blocks groups, then the last nb % blocks blocks in the GGUF format's layout.
GROUPED: dict[str, tuple[int, int, int]] = {"Q5_0R": (3, 70, 22)}
STORE_LAYOUT = {"Q5_0": "Q5_0R", "Q6_K": "Q6_KR", "Q4_K": "Q4_KR"}  # GGUF format -> the layout a store keeps it in (kernels/repacked.py)
GGUF_OF = {v: k for k, v in STORE_LAYOUT.items()}
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
    """A weight as stored: ``data`` in the kernel array layout above, ``fmt``, logical ``shape``."""

    data: np.ndarray
    fmt: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

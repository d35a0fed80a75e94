"""Numba compile flags for every kernel file, kept in one place.

All kernels use `jit` (or `FASTMATH`/`CACHE` directly) so the flags can be changed
here once. `fastmath` allows FMA contraction and reassociation (needed for the
vectorizer to keep several lane accumulators), but not `nnan`/`ninf`: the kernels
must still propagate inf/nan from the weights or activations.
"""

from __future__ import annotations

import functools

import numba

# LLVM fast-math flags: contract (a*b+c -> fma), arcp, reassoc (lane accumulators),
# nsz. No nnan/ninf, so inf/nan inputs give inf/nan outputs.
FASTMATH: set[str] = {"contract", "arcp", "reassoc", "nsz"}

# Cache compiled machine code in __pycache__ so a second process does not recompile.
CACHE: bool = True

# `@jit` == `@numba.njit(nogil=True, cache=CACHE, fastmath=FASTMATH)`.
jit = functools.partial(numba.njit, nogil=True, cache=CACHE, fastmath=FASTMATH)

# For code that must round exactly like numpy (dequantizers compared bit for bit
# with gguf.quants.dequantize): no FMA contraction, no reassociation.
jit_exact = functools.partial(numba.njit, nogil=True, cache=CACHE)

__all__ = ["CACHE", "FASTMATH", "jit", "jit_exact"]

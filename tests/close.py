"""Comparing two float32 computations of the same values.

Two float paths (BLAS vs a Numba kernel, a batched vs an unbatched product, torch
vs numpy) round differently, by a few ulp of the numbers they sum. An absolute
tolerance says nothing about that: 1e-5 is 2 ulp of a logit of 50 and 10^4 ulp of a
logit of 0.1. :func:`assert_close` bounds every difference by ``rel`` times the
largest magnitude among the values compared, which is the scale those rounding
errors have (the errors of a dot product are relative to the size of its terms, not
of its result, so entrywise rtol is wrong for values that cancel to near zero).

Where code promises bit-identical results (the kernel backend's fused GEMM computes
each row the same way whatever the number of rows), tests use ``assert_array_equal``.
"""
from __future__ import annotations

import numpy as np


def max_rel_err(actual, desired) -> float:
    """max |actual - desired| / max |desired|."""
    a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = np.abs(d).max()
    return float(np.abs(a - d).max() / scale) if scale else float(np.abs(a).max())


def assert_close(actual, desired, *, rel: float, err_msg: str = "") -> None:
    """Every |actual - desired| <= rel * max|desired| (shapes must match, no NaN)."""
    a, d = np.asarray(actual), np.asarray(desired)
    assert a.shape == d.shape, f"shape {a.shape} != {d.shape} {err_msg}"
    assert np.isfinite(a).all() == np.isfinite(d).all(), f"non-finite values differ {err_msg}"
    err = max_rel_err(a, d)
    assert err <= rel, (f"max |difference| is {err:.3g} x max|desired| ({np.abs(d).max():.4g}), "
                        f"more than {rel:g} {err_msg}")

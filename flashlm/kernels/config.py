"""Numba compile flags for every kernel file, kept in one place.

All kernels use `jit` (or `FASTMATH`/`CACHE` directly) so the flags can be changed
here once. `fastmath` allows FMA contraction and reassociation (needed for the
vectorizer to keep several lane accumulators), but not `nnan`/`ninf`: the kernels
must still propagate inf/nan from the weights or activations.
"""

from __future__ import annotations

import collections
import os

import numba
import numba.core.caching
import numba.extending

# LLVM fast-math flags: contract (a*b+c -> fma), arcp, reassoc (lane accumulators),
# nsz. No nnan/ninf, so inf/nan inputs give inf/nan outputs.
FASTMATH: set[str] = {"contract", "arcp", "reassoc", "nsz"}

# Cache compiled machine code in __pycache__ so a second process does not recompile.
CACHE: bool = True

# Numba's cache keys a closure by its pickled cells, and a dispatcher pickles with a
# uuid that is random per process, so a jitted closure over other jitted functions (the
# kernel factories in repacked.py) missed the cache in every new process: ~5 s of
# recompiling before the first token of every run. Each dispatcher made here gets a uuid
# from its module, qualified name and how many came before it under that name (import
# order is fixed), the same in every process; tests/kernels/test_config.py checks it.
_NAMED: collections.Counter = collections.Counter()


def _stable_uuid(obj, f):
    key = f"{f.__module__}.{f.__qualname__}"
    _NAMED[key] += 1
    try:
        obj._set_uuid(f"flashlm:{key}:{_NAMED[key]}")  # Numba internal; without it only the cache misses
    except (AttributeError, AssertionError):
        pass
    return obj


class _Intrinsic(numba.core.extending._Intrinsic):
    """An intrinsic that pickles as its stable uuid and name only. Numba's pickles its code
    generator by value, llvmlite types and all, and an llvmlite type caches its string the
    first time it is printed: a closure over an intrinsic (the kernel factories call their
    dots inline) got a new cache key once anything had compiled, and missed the cache in
    every process. Every intrinsic is made at import with its stable uuid, so the uuid finds
    it again (after importing its module)."""

    def _reduce_states(self):
        return dict(uuid=self._uuid, name=self._name, defn=self.__module__)

    @classmethod
    def _rebuild(cls, uuid, name, defn):
        import importlib

        importlib.import_module(defn)  # makes every intrinsic of the module, under its uuid
        return cls._memo[uuid]


# Numba saves a cache entry by reading the function's index, taking the first free data
# file number, then writing index and data: two processes saving entries of one function
# at once (two specializations, or two closures of a kernel factory: every format's
# ``_slabbed`` gemv shares one index) can both take number 1, and the index of one then
# names the other's machine code: a first run beside another first run (or beside the
# compile worker of kernels.precompile) loaded a Q8_0S kernel for Q4_1R and gave NaN.
# Every save in a cache directory holds an exclusive lock on a file there.
_save = numba.core.caching.IndexDataCacheFile.save


def _locked_save(self, key, data):
    try:
        import fcntl
    except ImportError:  # not POSIX: Numba's own behaviour
        return _save(self, key, data)
    os.makedirs(self._cache_path, exist_ok=True)
    with open(os.path.join(self._cache_path, "flashlm-save.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _save(self, key, data)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


if getattr(numba.core.caching.IndexDataCacheFile.save, "__name__", "") != "_locked_save":
    numba.core.caching.IndexDataCacheFile.save = _locked_save


# An array assignment whose shapes Numba cannot prove equal (``a[i] = b``, ``a[k:m] = s``)
# calls, on a mismatch, Numba's CPU overload of ``raise_with_shape_context``, which formats both
# shapes into its message: str of ints, f-strings, join. Numba compiles that string code the first
# time a process compiles such an assignment, 4-6 s on the 2-core EPYC, in every process of a
# first run that does (a repacked format's dequantizer, Q4_1R's GEMV: its compile worker took
# 19 s for the task and 4.3 s for the dequantizer, 12.4 s and 1.9 s with this; Q8_0S's
# dequantizer 8.9 -> 1.2 s; CPU seconds, one process each, fresh cache). The kernels check
# shapes in Python before they run, so the message is never seen from them; the CPU overload
# takes the body of Numba's own "generic" target overload instead, the same ValueError without
# the shapes ("cannot assign slice from input of different size"), for every jitted function of
# the process. Cache entries do not depend on it (the message is code of the overload, not of
# the function cached).
def _plain_shape_error() -> None:
    try:
        from numba.np import arrayobj
    except ImportError:
        return
    cpu = getattr(arrayobj, "ol_raise_with_shape_context_cpu", None)
    generic = getattr(arrayobj, "ol_raise_with_shape_context_generic", None)
    if cpu is None or generic is None or cpu.__code__ is generic.__code__:
        return
    try:  # the overload's template holds this function: its code is what Numba calls
        cpu.__code__ = generic.__code__
    except (TypeError, ValueError):  # a Numba whose two overloads differ in shape: keep its own
        pass


_plain_shape_error()


def intrinsic(fn):
    """``numba.extending.intrinsic`` with a stable uuid, pickled by that uuid (``_Intrinsic``)."""
    obj = numba.extending.intrinsic(fn)
    obj.__class__ = _Intrinsic
    obj.__module__ = fn.__module__
    return _stable_uuid(obj, fn)


# Numba names compiled code "<qualified name>$<n>", n counting compilations in the process,
# and links as if one name meant one body. The kernel factories (repacked._slabbed,
# gemv_basic._block_kernels, ...) make one closure per format under one qualified name, so
# two processes that compiled different formats could both call theirs "_slabbed.<locals>.
# gemv$42"; a third process that loaded both from the cache ran one format's code for the
# other (Q8_0S's GEMV gave NaN after two compile workers each cached one format). Every
# closure made here gets a name of its own instead: its qualified name and its number under
# that name, counted at import (a fixed order), the same in every process.
_CLOSURES: collections.Counter = collections.Counter()


def _own_name(f):
    if "<locals>" in f.__qualname__:
        key = f"{f.__module__}.{f.__qualname__}"
        _CLOSURES[key] += 1
        f.__qualname__ = f"{f.__qualname__}_{_CLOSURES[key]}"
    return f


def _njit(fn=None, **options):
    if fn is None:
        return lambda f: _stable_uuid(numba.njit(_own_name(f), **options), f)
    return _stable_uuid(numba.njit(_own_name(fn), **options), fn)


def jit(fn=None, **options):
    """``@numba.njit(nogil=True, cache=CACHE, fastmath=FASTMATH)``, with a stable uuid."""
    # fastmath as a dict in a fixed order: a set pickles in hash order, random per process
    return _njit(fn, **{"nogil": True, "cache": CACHE, "fastmath": dict.fromkeys(sorted(FASTMATH), True), **options})


def jit_exact(fn=None, **options):
    """For code that must round exactly like numpy (dequantizers compared bit for bit with
    gguf.quants.dequantize): no FMA contraction, no reassociation."""
    return _njit(fn, **{"nogil": True, "cache": CACHE, **options})


__all__ = ["CACHE", "FASTMATH", "intrinsic", "jit", "jit_exact"]

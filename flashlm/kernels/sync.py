"""Atomic loads/stores and nogil spin-waits on an int64 array, for the thread pool.

A pool worker that sleeps on a lock takes tens of microseconds to wake, longer than a
whole small GEMV. So a worker first spins here, inside a ``nogil`` Numba function
(other Python threads keep running), watching a shared int64 counter with atomic
loads; only after ``spins`` rounds does it fall back to sleeping on a lock.
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils

from flashlm.kernels.config import intrinsic


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _elem_ptr(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, arrty, ary, [idx], wraparound=False)


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]`` as a sequentially consistent atomic load (int64 arrays)."""
    sig = types.int64(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    """``arr[idx] = val`` as a sequentially consistent atomic store (int64 arrays)."""
    sig = types.void(arr, idx, val)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(v, ptr, "seq_cst", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """``arr[idx] += val`` as a sequentially consistent atomic read-modify-write (int64 arrays);
    returns the value before."""
    sig = types.int64(arr, idx, val)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1])
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return sig, codegen


@intrinsic
def _pause(typingctx):
    """The x86 ``pause`` hint inside a spin loop (a no-op elsewhere)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def store(arr, idx, val):
    atomic_store(arr, idx, val)


@njit(nogil=True, cache=True)
def load(arr, idx):
    return atomic_load(arr, idx)


@njit(nogil=True, cache=True)
def spin_while_equal(arr, idx, value, spins):
    """Spin while ``arr[idx] == value``, at most ``spins`` rounds; return the last value seen."""
    v = atomic_load(arr, idx)
    i = 0
    while v == value and i < spins:
        _pause()
        v = atomic_load(arr, idx)
        i += 1
    return v


@njit(nogil=True, cache=True)
def spin_until_all(arr, lo, hi, value, spins):
    """Spin until ``arr[lo:hi] == value`` everywhere, at most ``spins`` rounds; True if so."""
    for i in range(spins):
        ok = True
        for j in range(lo, hi):
            if atomic_load(arr, j) != value:
                ok = False
                break
        if ok:
            return True
        _pause()
    return False


def new_control(n: int) -> np.ndarray:
    return np.zeros(n, np.int64)

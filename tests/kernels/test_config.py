"""kernels/config.py: compiled kernels are cached across processes, closures included."""

from __future__ import annotations

import os
import subprocess
import sys

from flashlm.kernels import config

# Numba keys a closure's cache entry by the pickled contents of its cells; print that hash
# for every public kernel that is a closure (the kernel factories of gemv_basic, gemv_kquant,
# repacked), before and after kernels have compiled (an llvmlite type pickles differently
# once it has been printed: kernels.config._Intrinsic).
_KEYS = """
import hashlib
import numpy as np
from numba.core.serialize import dumps
from flashlm.kernels import gemv_basic as gb, gemv_kquant as kq, repacked as rp
tables = {**{"slabbed-" + i: t for i, t in rp._SLABBED.items()}, "basic": gb.SIMD_KERNELS,
          "kquant": {f: k for f, k in kq.IMPLS["simd"].items()}}

def keys():
    out = []
    for impl, table in sorted(tables.items()):
        for fmt, kernels in sorted(table.items()):
            for k in kernels:
                cells = tuple(c.cell_contents for c in k.py_func.__closure__ or ())
                out.append(f"{impl} {fmt} {k.py_func.__qualname__} {hashlib.sha256(dumps(cells)).hexdigest()}")
    return out

before = keys()
w = np.zeros((3, 144), np.uint8)
X = np.ones((3, 256), np.float32)
out = np.empty((3, 3), np.float32)
kq.IMPLS["simd"]["Q4_K"][1](w, X, out, 0, 3) if kq.SIMD else None
rp._SLABBED["simd"]["Q4_KR"][1](w, X, out, 0, 3)
after = keys()
print("\\n".join(before))
print("same after compiling:", before == after)
"""


def _keys(seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": seed}  # sets of strings pickle in hash order: vary it
    out = subprocess.run([sys.executable, "-c", _KEYS], capture_output=True, text=True, check=True, env=env)
    return out.stdout.splitlines()


def test_closure_cache_keys_are_the_same_in_every_process() -> None:
    a, b = _keys("1"), _keys("2")
    assert len(a) >= 3 * 8  # gemv, gemm, dequant of every slabbed store layout
    assert a == b
    assert a[-1] == "same after compiling: True"


def test_stable_uuid_names_each_dispatcher_apart() -> None:
    def f(x):
        return x + 1

    d1, d2 = config.jit(f), config.jit_exact(f)
    assert d1(1) == 2 and d2(1) == 2
    assert d1._uuid != d2._uuid and d1._uuid.startswith("flashlm:")
    assert config.jit(inline="always")(f)._uuid.startswith("flashlm:")


def test_cache_saves_wait_for_each_other(tmp_path) -> None:
    """Numba picks a new entry's data file by reading the index: without a lock two processes
    saving at once can take the same file. A save waits while another holds the directory's lock."""
    import fcntl
    import threading

    from numba.core.caching import IndexDataCacheFile

    cache = IndexDataCacheFile(str(tmp_path), "f", source_stamp=1)
    done = threading.Event()
    with open(tmp_path / "flashlm-save.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as another process saving
        t = threading.Thread(target=lambda: (cache.save("k1", b"one"), done.set()))
        t.start()
        assert not done.wait(0.5)  # blocked behind the lock
        fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(10)
    assert done.is_set()
    cache.save("k2", b"two")
    assert cache.load("k1") == b"one" and cache.load("k2") == b"two"  # two entries, two data files


_NAMES = """
import numpy as np
from flashlm.kernels import config, matmul
from flashlm.kernels.formats import QTensor
before = dict(config._CLOSURES)
w = QTensor(np.zeros((2, 144), np.uint8), "Q4_KR", (2, 256))
matmul.matmul(np.ones((3, 256), np.float32), w)
print(before == dict(config._CLOSURES), sum(before.values()))
"""


def test_every_kernel_closure_is_named_once_at_import() -> None:
    """Closures get their numbered names at import, in a fixed order: compiling makes none."""
    out = subprocess.run([sys.executable, "-c", _NAMES], capture_output=True, text=True, check=True)
    same, n = out.stdout.split()
    assert same == "True" and int(n) >= 3 * 8


def test_a_shape_mismatch_in_jitted_assignment_still_raises() -> None:
    # config gives Numba's CPU overload the generic target's message (no shapes: no string code
    # to compile); the error itself is unchanged
    import numba
    import numpy as np
    import pytest

    @numba.njit
    def assign(a, b):
        a[1:3] = b

    with pytest.raises(ValueError, match="cannot assign slice"):
        assign(np.zeros(5), np.zeros(4))

"""Compile the matmul kernels of a model's formats in worker processes, on a first run.

Numba compiles while holding the GIL and one process-wide lock, so the kernels of a
fresh install compile one after another on one core: 5-14 s per format
(``executor.kernel_address``: its GEMV and small-n GEMM, plus its dequantizer), and
about 10 s more for attention, the element-wise ops and the table runner. :func:`start`
hands the formats that Numba's cache does not hold yet to
``python -m flashlm.kernels.precompile FMT ...`` processes (one per core besides this
one's), which write them to the cache while this process compiles the rest; the model's first use of
a format then loads it from the cache. (Concurrent saves into one cache are safe:
``kernels.config`` locks them.) A worker is only started when the memory it needs is
free (``WORKER_BYTES`` each, within a --ram budget and the memory cgroup); if one fails,
this process compiles its formats itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

WORKER_BYTES = 400 << 20  # peak RSS of a compiling worker (322 MB measured compiling Q4_1R and Q8_0S), with margin
# Seconds a format takes to compile (2-core AVX2 EPYC, one process), to balance the workers.
_COST = {"Q4_1R": 14.0}


class Job:
    """Worker processes compiling ``formats`` into Numba's cache; :meth:`wait` joins them."""

    def __init__(self, procs: list[subprocess.Popen], formats: list[str]) -> None:
        self.procs, self.formats = procs, formats

    def wait(self) -> None:
        for p in self.procs:
            p.wait()

    def __bool__(self) -> bool:
        return bool(self.procs)


def start(formats, *, room: int | None = None, workers: int | None = None) -> Job:
    """Start compiling the tasks of ``formats`` that are neither loaded here nor cached.

    Args:
        formats: store formats (e.g. "Q4_KR").
        room: bytes this process may still grow by (a --ram budget less its RSS); None: no budget.
        workers: most worker processes; default one less than the CPU count (this process
            compiles attention and the ops meanwhile).
    Returns:
        A Job (falsy when nothing needed compiling, or no worker could be afforded); its
        ``formats`` are those the workers took: wait for it before using them.
    """
    from flashlm.kernels import executor

    missing = executor.missing_formats(formats)
    n = min(len(missing), workers or (os.cpu_count() or 1) - 1, _affordable(room))
    if not missing or n < 1:
        return Job([], [])
    # This process compiles attention and the ops meanwhile (10-17 s, as much as one or two
    # formats: handing it one of the formats too measured slower, 1.5B 27 -> 34 s); the
    # longest format first, to the least loaded worker.
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for fmt in sorted(missing, key=lambda f: -_COST.get(f, 6.0)):
        i = load.index(min(load))
        groups[i].append(fmt)
        load[i] += _COST.get(fmt, 6.0)
    procs, taken = [], []
    for g in groups:
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "flashlm.kernels.precompile", *g],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            taken += g
        except OSError:
            pass  # this process compiles them itself
    return Job(procs, taken)


def _affordable(room: int | None) -> int:
    import psutil

    from flashlm.offload.budget import cgroup_memory

    free = psutil.virtual_memory().available
    cg = cgroup_memory()
    if cg is not None:
        free = min(free, cg[0] - cg[1])
    if room is not None:
        free = min(free, room)
    return max(0, int(free // WORKER_BYTES))


def _compile(fmt: str) -> None:
    import numpy as np

    from flashlm.kernels import executor, matmul
    from flashlm.kernels.formats import FLOAT_DTYPES, QTensor, row_nbytes

    executor.kernel_address(fmt)  # a task key: a format, or "FMT/i8" for its integer kernels
    base = fmt.split("/")[0]
    cols = 256 * 3  # any width that whole blocks fill: the compiled code does not depend on it
    if base not in FLOAT_DTYPES:
        w = QTensor(np.zeros((2, row_nbytes(base, cols)), np.uint8), base, (2, cols))
        matmul.dequantize(w, rows=np.array([1]))  # the embedding lookup's kernel


def main(argv: list[str]) -> int:
    for fmt in argv:
        _compile(fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

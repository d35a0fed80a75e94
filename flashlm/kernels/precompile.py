"""Compile the matmul kernels of a model's formats in worker processes, on a first run.

Numba compiles while holding the GIL and one process-wide lock, so the kernels of a
fresh install compile one after another on one core: 7-11 CPU seconds per format
(``executor.kernel_address``: its GEMV and small-n GEMM; the token embedding's format also
its dequantizer, ~2 s), and about 7 s more for attention, the element-wise ops and the table
runner. :func:`start` shares the formats that Numba's cache does not hold yet between
``python -m flashlm.kernels.precompile FMT ...`` processes (one per core besides this one's)
and this process (which compiles attention and the ops first), the longest format first to
whichever has the least to compile; the workers write theirs to the cache, and the model's
first use of a format then loads it from there. (Concurrent saves into one cache are safe:
``kernels.config`` locks them.) A worker is only started when the memory it needs is
free (``WORKER_BYTES`` each, within a --ram budget and the memory cgroup); if one fails,
this process compiles its formats itself.
"""
from __future__ import annotations

import os
import subprocess
import sys

WORKER_BYTES = 400 << 20  # peak RSS of a compiling worker (322 MB measured compiling Q4_1R and Q8_0S), with margin
# CPU seconds a format's task takes to compile (2-core AVX2 EPYC, one process, fresh cache;
# others 7-9 s), and a dequantizer, to balance the workers.
_COST = {"Q4_1R": 10.5, "Q4_KR": 7.0, "Q5_0R": 7.5}
_DEQUANT_COST = 2.0


class Job:
    """Worker processes compiling ``formats`` into Numba's cache; :meth:`wait` joins them."""

    def __init__(self, procs: list[subprocess.Popen], formats: list[str]) -> None:
        self.procs, self.formats = procs, formats

    def wait(self) -> None:
        for p in self.procs:
            p.wait()

    def __bool__(self) -> bool:
        return bool(self.procs)


def start(formats, *, room: int | None = None, workers: int | None = None, dequant=(),
          here: float | None = None) -> Job:
    """Start compiling the tasks of ``formats`` that are neither loaded here nor cached.

    Args:
        formats: store formats (e.g. "Q4_KR").
        room: bytes this process may still grow by (a --ram budget less its RSS); None: no budget.
        workers: most worker processes; default one less than the CPU count (this process
            compiles attention and the ops meanwhile).
        dequant: those of ``formats`` whose dequantizer (the embedding lookup's kernel) is
            compiled too, by whichever process takes the format.
        here: seconds of compiling this process does meanwhile (attention and the ops), when it
            may take formats as well: the formats go, the longest first, to whichever of this
            process and the workers has the least to compile. None: every format to a worker.
    Returns:
        A Job (falsy when no worker was started); its ``formats`` are those the workers took:
        wait for it before using them. The caller compiles the others.
    """
    from flashlm.kernels import executor

    missing = executor.missing_formats(formats)
    n = min(len(missing), workers or (os.cpu_count() or 1) - 1, _affordable(room))
    if not missing or n < 1:
        return Job([], [])
    # The longest format first, to the least loaded worker (or to this process: bin n).
    groups: list[list[str]] = [[] for _ in range(n + 1)]
    load = [0.0] * n + [float("inf") if here is None else here]
    for fmt in sorted(missing, key=lambda f: -_cost(f, f in dequant)):
        i = load.index(min(load))
        groups[i].append(fmt)
        load[i] += _cost(fmt, fmt in dequant)
    procs, taken = [], []
    for g in groups[:n]:
        if not g:
            continue
        try:
            args = [*g] + [a for f in g if f in dequant for a in ("--dequant", f)]
            procs.append(subprocess.Popen([sys.executable, "-m", "flashlm.kernels.precompile", *args],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            taken += g
        except OSError:
            pass  # this process compiles them itself
    return Job(procs, taken)


def _cost(fmt: str, dequant: bool) -> float:
    return _COST.get(fmt.split("/")[0], 8.0) + (_DEQUANT_COST if dequant else 0.0)  # a task key: its format


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


def _compile(fmt: str, dequant: bool) -> None:
    import numpy as np

    from flashlm.kernels import executor, matmul
    from flashlm.kernels.formats import FLOAT_DTYPES, QTensor, row_nbytes

    executor.kernel_address(fmt)  # a task key: a format, or "FMT/i8" for its integer kernels
    base = fmt.split("/")[0]
    cols = 256 * 3  # any width that whole blocks fill: the compiled code does not depend on it
    if dequant and base not in FLOAT_DTYPES:
        w = QTensor(np.zeros((2, row_nbytes(base, cols)), np.uint8), base, (2, cols))
        matmul.dequantize(w, rows=np.array([1]))  # the embedding lookup's kernel


def main(argv: list[str]) -> int:
    """``FMT ... [--dequant FMT] ...``: the tasks of the formats, and the dequantizers of those
    named after --dequant."""
    dequant = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--dequant"}
    formats = [a for i, a in enumerate(argv) if a != "--dequant" and (i == 0 or argv[i - 1] != "--dequant")]
    for fmt in formats:
        _compile(fmt, fmt in dequant)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""kernels/precompile.py and the per-format tasks of kernels/executor.py: a worker process
compiles a model's formats into Numba's cache, and later processes load them from it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from flashlm.kernels import executor, precompile

# Run in a process that shares the worker's NUMBA_CACHE_DIR: which formats are missing, which
# functions compile, and whether the loaded Q8_0S task multiplies right.
_CHECK = """
import numpy as np
from numba.core import event
from flashlm.kernels import executor, matmul
from flashlm.kernels.formats import QTensor
from tests.kernels.test_precompile import stored

matmul.set_exact(True)  # the worker compiled the exact task ("Q8_0S", not "Q8_0S/i8")
compiled = []
class Listen(event.Listener):
    def on_start(self, e):
        compiled.append(e.data["dispatcher"].py_func.__qualname__)
    def on_end(self, e):
        pass
event.register("numba:compile", Listen())
print("missing", executor.missing_formats(["Q8_0S", "Q4_0S"]))
rng = np.random.default_rng(0)
w = rng.standard_normal((64, 256)).astype(np.float32)
fmt, data, ref = stored(w, "Q8_0", rng)
x = rng.standard_normal(256).astype(np.float32)
got = matmul.matmul(x, QTensor(data, "Q8_0S", w.shape))
print("error", float(np.abs(got - x @ ref.T).max() / np.abs(x @ ref.T).max()))
print("compiled", sorted(set(c for c in compiled if c.startswith("_t_"))))
"""


def stored(w: np.ndarray, fmt: str, rng) -> tuple[str, np.ndarray, np.ndarray]:
    """(store format, its bytes, the float32 values they hold) of ``w`` quantized in GGUF ``fmt``."""
    from flashlm.kernels import repacked
    from tests.synth import encode

    q, ref = encode(w, fmt, rng)
    if fmt == "F32":
        return fmt, q, ref
    sfmt, data = repacked.pack(fmt, q, w.shape)
    return sfmt, data, ref


def test_a_worker_fills_the_cache_that_the_next_process_loads(tmp_path) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "flashlm.kernels.precompile", "Q8_0S"], env=env, check=True, timeout=600)
    out = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600,
                         cwd=root)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["missing"] == "['Q4_0S']"  # the worker's format is cached, the other is not
    assert lines["compiled"] == "[]"  # the Q8_0S task was loaded, not compiled again
    assert float(lines["error"]) < 1e-5


_BOTH = """
import numpy as np
from flashlm.kernels import matmul
from flashlm.kernels.formats import QTensor
from tests.kernels.test_precompile import stored

matmul.set_exact(True)  # the workers compiled the exact tasks
rng = np.random.default_rng(0)
for base in ("Q4_1", "Q8_0"):
    w = rng.standard_normal((64, 256)).astype(np.float32)
    fmt, data, ref = stored(w, base, rng)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    q = QTensor(data, fmt, w.shape)
    want = x @ ref.T
    for got in (matmul.matmul(x[0], q), matmul.matmul(x, q)[0]):
        print(fmt, float(np.abs(got - want[0]).max() / np.abs(want[0]).max()))
"""


def test_formats_cached_by_two_processes_at_once_each_run_their_own_code(tmp_path) -> None:
    """Two workers each compile one format (closures of the same kernel factories) into one
    cache at the same time; a third process loads both and each gives its own products
    (with names numbered per process, Q8_0S ran Q4_1R's code and gave NaN)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    workers = [subprocess.Popen([sys.executable, "-m", "flashlm.kernels.precompile", fmt], env=env)
               for fmt in ("Q4_1R", "Q8_0S")]
    assert [p.wait(600) for p in workers] == [0, 0]
    out = subprocess.run([sys.executable, "-c", _BOTH], env=env, capture_output=True, text=True, timeout=600,
                         cwd=root)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert [r[0] for r in rows] == ["Q4_1R", "Q4_1R", "Q8_0S", "Q8_0S"]
    assert all(float(r[1]) < 1e-5 for r in rows), rows


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
def test_every_format_has_a_task_and_a_table_mixing_formats_runs_each(exact: bool) -> None:
    """Every format has its task (and its integer task where it has integer kernels); a table of
    three formats runs each one's kernels. The integer path's tolerance: its activations are
    rounded to 1/256 of an int8 step (exact references: tests/kernels/test_intpath.py)."""
    from flashlm.kernels import intpath, matmul
    from flashlm.kernels.formats import QTensor
    assert set(executor.TASKS) == set(matmul.KERNELS) | {f + matmul.INT_SUFFIX for f in intpath.INT_KERNELS}
    matmul.set_exact(exact)
    tol = 1e-5 if matmul.is_exact() else 1e-3
    rng = np.random.default_rng(1)
    x = rng.standard_normal(256).astype(np.float32)
    ws, refs = [], []
    for base in ("F32", "Q8_0", "Q4_K"):
        w = rng.standard_normal((48, 256)).astype(np.float32)
        fmt, data, ref = stored(w, base, rng)
        ws.append(QTensor(data, fmt, w.shape))
        refs.append(ref)
    for got, ref in zip(matmul.matmul_many(x, ws), refs):
        want = x @ ref.T
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert {matmul.task_key(f) for f in ("F32", "Q8_0S", "Q4_KR")} <= set(executor.compiled_formats())
    assert executor.missing_formats(["F32", "Q8_0S", "NOT_A_FORMAT"]) == []  # loaded here; unknown: no task


def test_no_worker_without_the_memory_for_it() -> None:
    assert precompile._affordable(0) == 0
    assert precompile._affordable(precompile.WORKER_BYTES - 1) == 0
    job = precompile.start(["Q8_0S"], room=0)
    assert not job and job.procs == []
    job.wait()  # nothing to wait for


@pytest.mark.parametrize("missing", [["Q8_0S"], []], ids=["cold-cache", "warm-cache"])
def test_load_says_which_formats_compile_on_a_first_run(tmp_path, monkeypatch, capsys, missing) -> None:
    import flashlm.api as api
    from tests.synth import tiny_store

    store = tiny_store(tmp_path)
    monkeypatch.setattr(api, "_missing_kernels", lambda s: missing)
    llm = api.LLM(store, threads=1, progress=True)
    llm.close()
    err = capsys.readouterr().err
    assert ("compiling kernels for Q8_0S (first run only" in err) == bool(missing)


def test_workers_take_the_formats_the_longest_first_to_the_least_loaded(monkeypatch) -> None:
    started = []

    class FakeProc:
        def __init__(self, args, **kw):
            started.append(args[3:])  # python -m flashlm.kernels.precompile FMT ...

        def wait(self):
            return 0

    monkeypatch.setattr(executor, "missing_formats", lambda fmts: list(fmts))
    monkeypatch.setattr(precompile.subprocess, "Popen", FakeProc)
    job = precompile.start(["Q8_0S", "Q4_1R", "Q6_KR"], room=None, workers=1)
    assert started == [["Q4_1R", "Q8_0S", "Q6_KR"]] and job.formats == ["Q4_1R", "Q8_0S", "Q6_KR"]
    started.clear()
    job = precompile.start(["Q8_0S", "Q4_1R", "Q6_KR"], room=None, workers=2)
    assert started == [["Q4_1R"], ["Q8_0S", "Q6_KR"]] and sorted(job.formats) == ["Q4_1R", "Q6_KR", "Q8_0S"]


def test_this_process_takes_formats_when_it_has_less_to_compile(monkeypatch) -> None:
    started = []

    class FakeProc:
        def __init__(self, args, **kw):
            started.append(args[3:])

        def wait(self):
            return 0

    monkeypatch.setattr(executor, "missing_formats", lambda fmts: list(fmts))
    monkeypatch.setattr(precompile.subprocess, "Popen", FakeProc)
    # one worker: Q4_1R (the longest) to it, Q8_0S (with its dequantizer) here, where only 1 s waits
    job = precompile.start(["Q8_0S", "Q4_1R"], room=None, workers=1, dequant=["Q8_0S"], here=1.0)
    assert started == [["Q4_1R"]] and job.formats == ["Q4_1R"]
    started.clear()
    job = precompile.start(["Q8_0S", "Q4_1R"], room=None, workers=1, dequant=["Q4_1R"], here=100.0)
    assert started == [["Q4_1R", "Q8_0S", "--dequant", "Q4_1R"]] and job.formats == ["Q4_1R", "Q8_0S"]


def test_a_worker_compiles_the_dequantizer_only_when_asked(monkeypatch) -> None:
    done = []
    monkeypatch.setattr(precompile, "_compile", lambda fmt, dequant: done.append((fmt, dequant)))
    assert precompile.main(["Q4_1R", "Q8_0S", "--dequant", "Q8_0S"]) == 0
    assert done == [("Q4_1R", False), ("Q8_0S", True)]

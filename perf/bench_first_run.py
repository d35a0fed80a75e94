"""Time to the first token of a fresh install: an empty Numba cache, the model already pulled.

    python perf/bench_first_run.py smollm2-135m [--events]

Runs ``import flashlm``, ``load(model, progress=True)`` and one streamed token in a new
process whose NUMBA_CACHE_DIR is a new empty directory (then again in a second process on
that cache: the later runs' figure). ``--events`` also prints the longest Numba compiles of
the first process (Numba's "numba:compile" events, outermost only: a callee compiled inside
its caller's compile counts in the caller's). The CPU seconds of the process and of its compile
workers, and the load average, say whether other processes shared the cores (a 2-core VM).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
events = []
if {events}:
    from numba.core import event as ev

    class _L(ev.Listener):
        depth = 0
        def on_start(self, e):
            self.depth += 1
            e.data["_t"] = time.perf_counter()
            e.data["_d"] = self.depth
        def on_end(self, e):
            self.depth -= 1
            if e.data.get("_d") == 1:
                d = e.data.get("dispatcher")
                name = getattr(getattr(d, "py_func", None), "__qualname__", str(d))
                events.append((time.perf_counter() - e.data["_t"], name, str(e.data.get("args"))[:80]))
    ev.register("numba:compile", _L())
import flashlm
llm = flashlm.load({model!r}, progress=True)
t_load = time.perf_counter() - t0
for piece in llm.stream("hi", max_tokens=1, temperature=0):
    break
t_tok = time.perf_counter() - t0
llm.close()
import os, resource
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps(dict(flashlm=flashlm.__file__, load=t_load, first_token=t_tok, cpu=me.ru_utime + me.ru_stime,
                      workers_cpu=kids.ru_utime + kids.ru_stime, loadavg=os.getloadavg()[0],
                      events=sorted(events, reverse=True)[:15])))
"""


def run(model: str, cache: str, events: bool) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    # in the cache's directory: ``python -c`` puts the working directory first on sys.path, so a
    # checkout there would be imported instead of the one PYTHONPATH or the install names
    out = subprocess.run([sys.executable, "-c", _CHILD.format(model=model, events=events)], env=env, cwd=cache,
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--events", action="store_true", help="print the longest Numba compiles of the first run")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flashlm-numba-") as cache:
        first = run(a.model, cache, a.events)
        later = run(a.model, cache, False)
    print(first["flashlm"])
    print(f"{a.model}: first run {first['first_token']:.1f} s to the first token (load {first['load']:.1f} s; "
          f"CPU {first['cpu']:.1f} s here, {first['workers_cpu']:.1f} s in compile workers; load average "
          f"{first['loadavg']:.1f} at the end); later run {later['first_token']:.1f} s (load {later['load']:.1f} s)")
    for s, name, args in first["events"]:
        print(f"  {s:6.2f} s  {name}  {args}")


if __name__ == "__main__":
    main()

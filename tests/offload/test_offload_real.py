"""Real models under a RAM budget, run as a user runs them (`flashlm run ... --ram X`):
greedy tokens identical to the run fully in RAM, peak RSS (sampled every 10 ms) within
the budget, and the 1.5B inside a 600 MB memory cgroup."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from realmodels import real_store_path

from flashlm.offload.cgroup import MemoryCgroup

PROMPT = "Write a Python function that checks whether a number is prime."
MiB = 1 << 20


def run_cli(store: Path, *args: str, cgroup: MemoryCgroup | None = None, timeout: float = 900) -> tuple[dict, int]:
    """`flashlm run STORE PROMPT --json ...` in a child process: (its JSON, peak RSS sampled every 10 ms)."""
    cmd = [sys.executable, "-m", "flashlm.cli", "run", str(store), PROMPT, "--json", "--temp", "0", "--ctx", "512",
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=cgroup.join if cgroup else None)
    peak, stop = [0], threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        t.join()
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-2000:]}"
    return json.loads(out), peak[0]


def plan_of(store: Path, ram: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "flashlm.cli", "plan", str(store), "--ram", ram, "--ctx", "512",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def qwen05():
    store = real_store_path("qwen2.5-coder-0.5b")
    ref, _ = run_cli(store, "-n", "24", "--draft", "none")
    return store, ref


@pytest.mark.parametrize("share", [0.3, 0.6, 1.0])
def test_greedy_tokens_identical_under_a_budget(qwen05, share):
    """--ram = what the process needs besides weights + ``share`` of the store (the 0.5B's
    whole store is less than the process itself, so a share of the store alone is no budget)."""
    store, ref = qwen05
    p = plan_of(store, "8G")
    ram = p["baseline"] + p["kv_bytes"] + 48 * MiB + int(share * p["store_bytes"])
    got, peak = run_cli(store, "-n", "24", "--draft", "none", "--ram", str(ram))
    assert got["tokens"] == ref["tokens"]
    off = got["stats"].get("offload")
    if share < 1.0:
        assert off and off["bytes_read"] > 0 and off["plan"]["streams"]
        assert 0 < off["resident_bytes"] < p["store_bytes"]
    assert peak <= ram * 1.05, f"peak RSS {peak / MiB:.0f} MiB > --ram {ram / MiB:.0f} MiB + 5%"


def test_drafts_when_offloaded_give_the_same_tokens(qwen05):
    store, ref = qwen05
    p = plan_of(store, "8G")
    ram = p["baseline"] + p["kv_bytes"] + 48 * MiB + int(0.3 * p["store_bytes"])
    got, _ = run_cli(store, "-n", "24", "--draft", "ngram", "--ram", str(ram))
    assert got["tokens"] == ref["tokens"]
    assert got["stats"]["draft"] == "ngram"


def test_the_15b_with_30_percent_of_its_store_for_weights():
    """The process itself takes 200-250 MiB depending on the CPU (more compiled kernels on
    AVX-512), so the budget is what it needs besides weights + 30% of the store, as for the 0.5B."""
    store = real_store_path("qwen2.5-coder-1.5b")
    ref, _ = run_cli(store, "-n", "12", "--draft", "none")
    p = plan_of(store, "8G")
    ram = p["baseline"] + p["kv_bytes"] + 48 * MiB + int(0.3 * p["store_bytes"])
    got, peak = run_cli(store, "-n", "12", "--draft", "none", "--ram", str(ram))
    assert got["tokens"] == ref["tokens"]
    assert got["stats"]["offload"]["plan"]["streams"]
    assert peak <= ram * 1.05, f"peak RSS {peak / MiB:.0f} MiB > --ram {ram / MiB:.0f} MiB + 5%"


# ---- a memory cgroup ----


def test_15b_in_a_600mb_cgroup():
    cg = MemoryCgroup.create(600 * MiB)
    if cg is None:
        pytest.skip("cannot create a memory cgroup here (needs root and a cgroup v1/v2 memory controller)")
    store = real_store_path("qwen2.5-coder-1.5b")
    with cg:
        ref, _ = run_cli(store, "-n", "12", "--draft", "none")
        subprocess.run(["sync"], check=False)
        got, peak = run_cli(store, "-n", "12", "--draft", "none", "--ram", "560M", cgroup=cg)
        assert got["tokens"] == ref["tokens"]
        assert cg.oom_kills() == 0
        print(f"cgroup peak {cg.peak() / MiB:.0f} MiB, process peak RSS {peak / MiB:.0f} MiB, "
              f"{got['stats']['decode_tok_s']} tok/s")
        assert cg.peak() <= 600 * MiB

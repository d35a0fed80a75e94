"""Offload benchmarks: a model bigger than its RAM budget, beside the limit the disk sets.

Every figure comes with the read speed of the same files measured in the same run, right
before it (the disk here is virtual, shared and noisy). As root, the page cache is dropped
before each measurement and the memory cgroup sections run; elsewhere they are skipped
with the reason.

Sections (--sections, default all):
  budgets    decode tok/s of MODEL at --ram 25/50/75/100 % of its store (drafts off);
             limit = the speed of the same reads right after the decode, with no compute
             (O_DIRECT, the plan's prefetcher) / streamed bytes per token; target >= 85 %
  synthetic  the same for a synthetic Qwen2.5-7B-shaped store (perf/make_synthetic_gguf.py --dense) at --ram 1G
  cgroup     the 1.5B at --ram 560M inside a 600 MB memory cgroup, beside llama.cpp tuned
             (mmap, no weight repacking) in the same cgroup: drafts off, and flashlm's
             defaults (drafts on) on a code-edit prompt
  moe        the synthetic Qwen3-MoE (perf/make_synthetic_gguf.py) at --ram 1.4G inside a 1.5 GB memory
             cgroup (three runs), beside llama.cpp tuned in the same cgroup; limit = the time of the
             run's own reads (experts it missed or guessed, dense layers streamed) made again right
             after with no compute; target >= 85 % and >= 5x llama.cpp
  batch      total tok/s of 1, 4, 8, 16 prompts answered together at --ram 50 %
  lookup     prompt lookup on a code-edit prompt when offloaded: tok/s with drafts / without

Run:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python perf/bench_offload.py
    python perf/bench_offload.py --sections budgets --model qwen2.5-coder-1.5b --shares 25,50
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flashlm.offload.cgroup import MemoryCgroup

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
CODE = (Path(__file__).resolve().parents[1] / "flashlm" / "runtime" / "draft.py").read_text()
EDIT_PROMPT = ("Repeat this Python module exactly as it is, changing only the name of the function "
               "`lookup` to `find_draft` everywhere:\n\n" + CODE)


def bench_dir() -> Path:
    from flashlm.models.registry import home

    return home() / "bench"


def drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def store_of(model: str) -> Path:
    if Path(model).is_dir():
        return Path(model)
    from flashlm.models.registry import resolve

    return resolve(model)


def flashlm_json(args: list[str], *, cgroup: MemoryCgroup | None = None, timeout: float = 3600) -> dict:
    cmd = [sys.executable, "-m", "flashlm.cli", *args, "--json"]
    pre = cgroup.join if cgroup else None
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=pre)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1], "exit": out.returncode,
                "wall_s": time.perf_counter() - t0}
    d = json.loads(out.stdout)
    d["wall_s"] = round(time.perf_counter() - t0, 2)
    return d


def bench(store: Path, ram: int | str, *, p: int = 16, n: int = 32, ctx: int = 256, extra=()) -> dict:
    drop_caches()
    return flashlm_json(["bench", str(store), "--ram", str(ram), "-p", str(p), "-n", str(n), "--ctx", str(ctx),
                         *extra])


def row(*cells) -> None:
    print(" | ".join(str(c) for c in cells), flush=True)


# ---- sections ----


def section_budgets(store: Path, shares: list[float], label: str | None = None, n: int = 32) -> None:
    size = sum(f.stat().st_size for f in store.glob("*.bin"))
    print(f"\n## {label or store.name}: decode at --ram shares of its store ({size / MiB:.0f} MiB), drafts off")
    row("--ram", "MiB", "decode tok/s", "streamed MiB/token", "read GB/s (run)", "reads alone GB/s", "limit tok/s",
        "of limit", "I/O wait", "peak RSS MiB")
    for share in shares:
        ram = int(share * size)
        r = bench(store, ram, n=n)
        if "error" in r:
            row(f"{share:.0%}", ram // MiB, r["error"])
            continue
        if not r.get("streams"):
            row(f"{share:.0%}", ram // MiB, r["decode_tok_s"], 0, "-", "-", "(in RAM)", "-", "-",
                r["peak_rss_bytes"] // MiB)
            continue
        per = r["streamed_bytes_per_token"]
        limit = r["io_limit_tok_s"]  # the same reads right after, with no compute: the disk's ceiling
        row(f"{share:.0%}", ram // MiB, r["decode_tok_s"], per // MiB, r["decode_read_GB_s"], r["io_ceiling_GB_s"],
            f"{limit:.2f}", f"{r['decode_tok_s'] / limit:.0%}", f"{r['decode_io_wait_s']:.1f}/{r['decode_s']:.1f} s",
            r["peak_rss_bytes"] // MiB)


def section_synthetic(path: Path | None, ram: str) -> None:
    if path is None or not path.exists():
        print("\n## synthetic 7B: skipped (write it with `python perf/make_synthetic_gguf.py --dense`, "
              "then pass --synthetic OUT.gguf)")
        return
    from flashlm.models.registry import resolve

    store = resolve(str(path))
    size = sum(f.stat().st_size for f in store.glob("*.bin"))
    from flashlm.offload.budget import parse_size

    section_budgets(store, [parse_size(ram) / size], label=f"synthetic {path.name} at --ram {ram}", n=8)


LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp
import llama_cpp.llama_cpp as low
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
orig = low.llama_model_default_params
def no_repack():
    p = orig()
    if hasattr(p, "use_extra_bufts"):
        p.use_extra_bufts = False   # weight repacking off: it copies every weight into RAM
    return p
low.llama_model_default_params = no_repack
llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=512,
                      use_mmap=True, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
t0 = time.perf_counter(); llm.eval(ids); pf = time.perf_counter() - t0
def last():  # logits of the last evaluated token (llm.scores is only filled with logits_all)
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
tok = int(np.argmax(last())); out = [tok]
t0 = time.perf_counter()
for _ in range(n - 1):
    llm.eval([tok]); tok = int(np.argmax(last())); out.append(tok)
dt = time.perf_counter() - t0
print(json.dumps({"prompt_tokens": len(ids), "prefill_tok_s": len(ids) / pf, "decode_tok_s": (n - 1) / dt,
                  "tokens": out}))
"""


def llama_cpp_run(gguf: Path, prompt: str, n: int, cgroup: MemoryCgroup | None, timeout: float = 1800) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"error": "llama-cpp-python is not installed (pip install -e .[compare])"}
    pre = cgroup.join if cgroup else None
    drop_caches()
    try:
        out = subprocess.run([sys.executable, "-c", LLAMA_CHILD, str(gguf), prompt, str(n), "2"], capture_output=True,
                             text=True, timeout=timeout, preexec_fn=pre)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer in {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}" + (" (killed: out of memory?)" if out.returncode < 0 else ""),
                "stderr": out.stderr[-500:]}
    return json.loads(out.stdout)


def section_cgroup(model: str, n: int) -> None:
    print("\n## the 1.5B in a 600 MB memory cgroup, --ram 560M")
    cg = MemoryCgroup.create(600 * MiB)
    if cg is None:
        print("skipped: cannot create a memory cgroup here (needs root and a cgroup v1/v2 memory controller)")
        return
    from flashlm.models.pull import gguf_path

    store = store_of(model)
    short = "Write a Python function that checks whether a number is prime."
    try:
        row("run", "prompt", "decode tok/s", "tokens/step", "cgroup peak MiB", "note")
        cg.reset_peak()
        drop_caches()
        r = flashlm_json(["run", str(store), short, "--ram", "560M", "--temp", "0", "-n", str(n), "--draft", "none"],
                         cgroup=cg)
        st = r.get("stats", {})
        off = st.get("offload", {})
        row("flashlm, drafts off", "prime", st.get("decode_tok_s", r.get("error")), st.get("tokens_per_step"),
            cg.peak() // MiB, f"read {off.get('read_GB_s', '?')} GB/s")
        flash_plain = st.get("decode_tok_s", 0)
        cg.reset_peak()
        lc = llama_cpp_run(gguf_path(model), short, n, cg)
        row("llama.cpp tuned (mmap, no repack)", "prime", lc.get("decode_tok_s", lc.get("error")), 1,
            cg.peak() // MiB, "")
        cg.reset_peak()
        drop_caches()
        r2 = flashlm_json(["run", str(store), EDIT_PROMPT, "--ram", "560M", "--temp", "0", "-n", str(4 * n)],
                          cgroup=cg)
        st2 = r2.get("stats", {})
        row("flashlm, defaults (drafts on)", "code edit", st2.get("decode_tok_s", r2.get("error")),
            st2.get("tokens_per_step"), cg.peak() // MiB, "")
        cg.reset_peak()
        lc2 = llama_cpp_run(gguf_path(model), EDIT_PROMPT, n, cg)
        row("llama.cpp tuned", "code edit", lc2.get("decode_tok_s", lc2.get("error")), 1, cg.peak() // MiB, "")
        if lc.get("decode_tok_s"):
            print(f"ratio drafts off / llama.cpp: {flash_plain / lc['decode_tok_s']:.2f}x")
        if lc2.get("decode_tok_s") and st2.get("decode_tok_s"):
            print(f"ratio defaults on the code edit / llama.cpp: {st2['decode_tok_s'] / lc2['decode_tok_s']:.2f}x")
    finally:
        cg.remove()


def section_moe(gguf: Path, ram: str, limit: int, n: int, runs: int = 3) -> None:
    print(f"\n## MoE {gguf.name} at --ram {ram} in a {limit / 2**30:.1f} GiB memory cgroup")
    if not gguf.exists():
        print(f"skipped: {gguf} is missing (python perf/make_synthetic_gguf.py writes it)")
        return
    cg = MemoryCgroup.create(limit)
    if cg is None:
        print("skipped: cannot create a memory cgroup here (needs root and a cgroup v1/v2 memory controller)")
        return
    from flashlm.models.registry import resolve

    store = resolve(str(gguf))
    try:
        row("run", "decode tok/s", "streamed MiB/token", "expert hit rate", "reads alone GB/s", "limit tok/s", "of limit",
            "cgroup peak MiB")
        shares, best = [], None
        for k in range(runs):  # the disk's speed drifts between runs: each run beside its own limit
            cg.reset_peak()
            drop_caches()
            r = flashlm_json(["bench", str(store), "--ram", ram, "-p", "16", "-n", str(n), "--ctx", "256"], cgroup=cg)
            if "error" in r:
                row(f"flashlm, run {k + 1}", r["error"], "", "", "", "", "", cg.peak() // MiB)
                continue
            per = r["streamed_bytes_per_token"]
            # the limit: the experts this decode read, read again right after with no compute
            # (as many in flight as the cache has slots), and the plan's dense reads the same way
            lim = r.get("io_limit_tok_s") or 0
            bw = r.get("expert_io_ceiling_GB_s") or r.get("io_ceiling_GB_s") or 0
            if lim:
                shares.append(r["decode_tok_s"] / lim)
            row(f"flashlm, run {k + 1}", r["decode_tok_s"], per // MiB, r.get("expert_hit_rate", ""), bw or "-",
                f"{lim:.2f}" if lim else "-", f"{r['decode_tok_s'] / lim:.0%}" if lim else "-", cg.peak() // MiB)
            if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
                best = r
        if shares:
            print(f"share of the limit, median of {len(shares)} runs: {sorted(shares)[len(shares) // 2]:.0%}")
        r = best or {"error": "no run"}
        cg.reset_peak()
        lc = llama_cpp_run(gguf, "Write a Python function that checks whether a number is prime.", n, cg)
        row("llama.cpp tuned (mmap, no repack)", lc.get("decode_tok_s", lc.get("error")), "", "", "", "", "",
            cg.peak() // MiB)
        if lc.get("decode_tok_s") and "error" not in r:
            print(f"ratio flashlm (best run) / llama.cpp: {r['decode_tok_s'] / lc['decode_tok_s']:.2f}x; killed in the cgroup: "
                  f"{cg.oom_kills()}")
    finally:
        cg.remove()


def section_batch(store: Path, share: float, sizes: list[int], n: int) -> None:
    size = sum(f.stat().st_size for f in store.glob("*.bin"))
    ram = int(share * size)
    print(f"\n## batches at --ram {share:.0%} ({ram // MiB} MiB), {n} tokens each, drafts off")
    row("prompts", "total decode tok/s", "x batch 1", "decode steps", "bytes read GB")
    base = None
    topics = ["a prime check", "a binary search", "a stack class", "a CSV reader", "fizzbuzz", "a quicksort",
              "a word counter", "a matrix product", "an LRU cache", "a palindrome check", "a gcd", "a merge sort",
              "a queue class", "a JSON pretty printer", "a factorial", "a fibonacci generator"]
    for b in sizes:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(f"Write {topics[i % len(topics)]} in Python." for i in range(b)))
        drop_caches()
        r = flashlm_json(["run", str(store), "--prompts", f.name, "--ram", str(ram), "--temp", "0", "-n", str(n),
                          "--ctx", "256", "--draft", "none"])
        os.unlink(f.name)
        st = r.get("stats")
        if not st:
            row(b, r.get("error"))
            continue
        tok_s = (st["generated_tokens"] - b) / st["decode_s"] if st["decode_s"] else 0
        base = base or tok_s
        row(b, f"{tok_s:.2f}", f"{tok_s / base:.2f}x", st["decode_steps"],
            f"{st.get('offload', {}).get('bytes_read', 0) / 1e9:.1f}")


def section_lookup(store: Path, share: float, n: int) -> None:
    size = sum(f.stat().st_size for f in store.glob("*.bin"))
    ram = int(share * size)
    print(f"\n## prompt lookup at --ram {share:.0%} ({ram // MiB} MiB) on a code-edit prompt, {n} tokens")
    row("drafts", "decode tok/s", "tokens/step", "accepted/drafted", "same tokens")
    outs = {}
    for draft in ("none", "ngram"):
        drop_caches()
        r = flashlm_json(["run", str(store), EDIT_PROMPT, "--ram", str(ram), "--temp", "0", "-n", str(n),
                          "--ctx", "2048", "--draft", draft])
        st = r.get("stats")
        if not st:
            row(draft, r.get("error"))
            continue
        outs[draft] = (r["tokens"], st["decode_tok_s"])
        row(draft, st["decode_tok_s"], st["tokens_per_step"], f"{st['accepted']}/{st['drafted']}",
            "" if draft == "none" else outs["ngram"][0] == outs.get("none", ([],))[0])
    if len(outs) == 2 and outs["none"][1]:
        print(f"ratio drafts / none: {outs['ngram'][1] / outs['none'][1]:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--sections", default="budgets,synthetic,cgroup,moe,batch,lookup")
    ap.add_argument("--moe", type=Path, default=bench_dir() / "qwen3moe-synth.gguf",
                    help="a synthetic Qwen3-MoE GGUF (perf/make_synthetic_gguf.py)")
    ap.add_argument("--shares", default="25,50,75,100", help="--ram as %% of the store (budgets)")
    ap.add_argument("--synthetic", type=Path, default=bench_dir() / "qwen2-7b-synth.gguf",
                    help="a synthetic dense GGUF (perf/make_synthetic_gguf.py --dense)")
    ap.add_argument("--synthetic-ram", default="1G")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("-n", type=int, default=32, help="tokens to generate per measurement")
    a = ap.parse_args(argv)
    secs = set(a.sections.split(","))
    store = store_of(a.model)
    print(f"# bench_offload {time.strftime('%Y-%m-%d %H:%M')}; root: {os.geteuid() == 0} (page cache dropped "
          f"before each figure: {drop_caches()})")
    if "budgets" in secs:
        section_budgets(store, [float(s) / 100 for s in a.shares.split(",")], n=a.n)
    if "synthetic" in secs:
        section_synthetic(a.synthetic, a.synthetic_ram)
    if "cgroup" in secs:
        section_cgroup(a.model, a.n)
    if "moe" in secs:
        section_moe(a.moe, "1.4G", 1536 * MiB, a.n)
    if "batch" in secs:
        section_batch(store, 0.5, [int(b) for b in a.batches.split(",")], a.n)
    if "lookup" in secs:
        section_lookup(store, 0.5, 4 * a.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())

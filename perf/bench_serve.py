"""`flashlm serve` under concurrent streaming clients: total tokens/s at N clients beside one
client alone, in the same run, against the same server process.

Sections (--sections, default both):
  ram      smollm2-135m in RAM (--max-batch 16): 1, 4, 16 clients
  offload  qwen2.5-coder-0.5b under --ram 450M (its layers stream from disk; --max-batch 8):
           1, 4, 8 clients; target 8 clients >= 4x one client

Every client streams a chat completion (temperature 0, a different topic each) and the
server's usage counts give the tokens; total tokens/s = all completion tokens / wall time
from the first request to the last [DONE]. Each count is run ``--rounds`` times, the best
round counts (the machine is shared).

Run:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python perf/bench_serve.py
    python perf/bench_serve.py --sections offload --rounds 1 -n 24
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from serving import ServeProcess, sse_events  # noqa: E402 - the tests' server launcher

from flashlm.models.pull import pull_model  # noqa: E402

TOPICS = ["the sea", "a cat", "Paris", "rain", "a prime number", "coffee", "the moon", "a train", "music",
          "winter", "a robot", "bread", "a river", "chess", "a lighthouse", "the desert"]
SECTIONS = {
    "ram": ("smollm2-135m", ["--max-batch", "16", "--ctx", "1024"], [1, 4, 16]),
    "offload": ("qwen2.5-coder-0.5b", ["--ram", "450M", "--max-batch", "8", "--ctx", "512"], [1, 4, 8]),
}


def clients(url: str, model: str, n: int, max_tokens: int) -> tuple[int, float, int]:
    """n concurrent streaming chat requests: (completion tokens, wall seconds, errors)."""
    tokens, errors = [0] * n, [0]
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        body = {"model": model, "temperature": 0, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]}
        start.wait()
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=1800) as r:
                events = sse_events(r.iter_lines()) if r.status_code == 200 else []
            usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
            if r.status_code != 200 or events[-1] != "[DONE]" or not usage:
                errors[0] += 1
            else:
                tokens[i] = usage[-1]["completion_tokens"]
        except httpx.HTTPError:
            errors[0] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(tokens), time.perf_counter() - t0, errors[0]


def section(name: str, args, out: dict) -> None:
    model, serve_args, counts = SECTIONS[name]
    store = pull_model(model, progress=False)
    srv = ServeProcess(store, *serve_args, "--threads", str(args.threads), "--name", model)
    try:
        clients(srv.url, model, 1, 4)  # warm-up: first-request costs out of the figures
        rows = {}
        for n in counts:
            best = None
            for _ in range(args.rounds):
                tok, sec, err = clients(srv.url, model, n, args.n)
                rate = tok / sec if sec > 0 else 0.0
                if best is None or rate > best[0]:
                    best = (rate, tok, sec, err)
            rows[n] = best
        health = httpx.get(srv.url + "/health").json()
    finally:
        srv.stop()
    one = rows[counts[0]][0]
    print(f"\n{name}: {model} {' '.join(serve_args)}")
    print(f"{'clients':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'x 1 client':>11} {'errors':>7}")
    for n, (rate, tok, sec, err) in rows.items():
        print(f"{n:>8} {tok:>7} {sec:>8.1f} {rate:>7.2f} {rate / one if one else 0:>10.2f}x {err:>7}")
    out[name] = {"model": model, "serve_args": serve_args, "health": health,
                 "rows": {n: {"tok_s": r, "tokens": t, "seconds": s, "errors": e} for n, (r, t, s, e) in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="ram,offload")
    ap.add_argument("-n", type=int, default=48, help="max_tokens per request")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict = {}
    for name in args.sections.split(","):
        section(name.strip(), args, out)
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

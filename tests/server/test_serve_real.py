"""`flashlm serve` as a user runs it (a child process on a free port) with real models:
the official `openai` client gets the same greedy answers as `flashlm run --temp 0`;
16 concurrent streaming clients all finish with [DONE]; a model offloaded under --ram
serves 8 concurrent clients correctly; a client that disconnects is dropped; SIGTERM
lets the request in flight finish and exits 0."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from realmodels import real_store_path
from serving import ServeProcess, sse_events, stream_text

import flashlm

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")

MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name the largest planet of the solar system."}]
TOPICS = ["the sea", "a cat", "Paris", "rain", "a prime number", "coffee", "the moon", "a train", "music",
          "winter", "a robot", "bread", "a river", "chess", "a lighthouse", "the desert"]


def run_json(store, *args) -> dict:
    r = subprocess.run([sys.executable, "-m", "flashlm", "run", str(store), *args, "--temp", "0", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def smollm2():
    return real_store_path("smollm2-135m")


@pytest.fixture(scope="module")
def server(smollm2):
    srv = ServeProcess(smollm2, "--ctx", "1024", "--max-batch", "8", "--threads", "2")
    yield srv
    assert srv.stop() == 0, srv.err


def client(srv) -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_client_answers_as_flashlm_run(server, smollm2, tmp_path):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["smollm2-135m"]
    f = tmp_path / "m.json"
    f.write_text(json.dumps(MESSAGES))
    want = run_json(smollm2, "--messages", str(f), "-n", "24", "--ctx", "1024")
    r = c.chat.completions.create(model="smollm2-135m", messages=MESSAGES, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want["text"] and want["text"]
    assert r.usage.prompt_tokens == want["prompt_tokens"] and r.usage.completion_tokens == len(want["tokens"])
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, temperature=0, max_tokens=24, stream=True) if ch.choices]
    assert "".join(parts) == want["text"]

    prompt = "The three primary colors are"
    want = run_json(smollm2, prompt, "--raw", "-n", "16", "--ctx", "1024")
    r = c.completions.create(model="smollm2-135m", prompt=prompt, temperature=0, max_tokens=16)
    assert r.choices[0].text == want["text"] and r.usage.completion_tokens == len(want["tokens"])
    parts = [ch.choices[0].text for ch in c.completions.create(model="smollm2-135m", prompt=prompt, temperature=0,
                                                              max_tokens=16, stream=True) if ch.choices]
    assert "".join(parts) == want["text"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model="smollm2-135m", messages=MESSAGES, temperature=-1)


def concurrent_streams(url: str, model: str, n: int, max_tokens: int) -> list[tuple[int, list, str]]:
    """n clients at once, each streaming one chat answer: (status, SSE payloads, error)."""
    out: list = [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i]}."}],
                "temperature": 0, "max_tokens": max_tokens, "stream": True}
        try:
            start.wait()
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                out[i] = (r.status_code, sse_events(r.iter_lines()) if r.status_code == 200 else [r.read()], "")
        except Exception as e:  # noqa: BLE001 - counted as an error below
            out[i] = (0, [], repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return out


def settled(url: str) -> dict:
    """/health once no request is running or waiting (the counters are updated just after
    the last events went out)."""
    for _ in range(600):
        h = httpx.get(url + "/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"requests still running: {h}")


def expected(store, n: int, max_tokens: int, **load) -> list[str]:
    with flashlm.load(store, **load) as llm:
        msgs = [[{"role": "user", "content": f"Write one sentence about {TOPICS[i]}."}] for i in range(n)]
        return llm.generate_batch(msgs, temperature=0, max_tokens=max_tokens)


def test_sixteen_concurrent_streaming_clients(server, smollm2):
    res = concurrent_streams(server.url, "smollm2-135m", 16, 24)
    errors = [(s, e) for s, _, e in res if s != 200 or e]
    assert not errors, errors
    assert all(ev[-1] == "[DONE]" for _, ev, _ in res)
    want = expected(smollm2, 16, 24, ctx=1024, threads=2)
    assert [stream_text(ev) for _, ev, _ in res] == want
    assert settled(server.url)["failed"] == 0


def test_a_client_that_disconnects_is_dropped(server):
    before = httpx.get(server.url + "/health").json()["cancelled"]
    body = {"model": "smollm2-135m", "prompt": "1, 2, 3, 4,", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
    assert got[0].startswith("data: ")
    for _ in range(300):
        h = httpx.get(server.url + "/health").json()
        if h["cancelled"] > before and h["running"] == 0:
            break
        time.sleep(0.1)
    assert h["cancelled"] == before + 1 and h["running"] == 0, h


def test_sigterm_drains_the_request_in_flight(smollm2):
    srv = ServeProcess(smollm2, "--ctx", "512", "--max-batch", "2", "--threads", "2")
    body = {"model": "smollm2-135m", "prompt": "1, 2, 3, 4,", "max_tokens": 120, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            head = [next(lines), next(lines)]
            srv.proc.send_signal(15)  # SIGTERM while the answer is being written
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections once draining
                httpx.get(srv.url + "/health", timeout=5)
            events = sse_events(head + list(lines))
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] in range(1, 121)
        finish = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"]][-1]
        assert finish in ("length", "stop")
        assert srv.proc.wait(120) == 0, srv.err
        assert "stopped" in srv.err
    finally:
        srv.kill()


def offload_budget(store, *, ctx: int, batch: int, share: float) -> int:
    """A --ram at which ``share`` of the store fits beside what the process needs: its baseline
    (200-260 MiB depending on the CPU and what the command imports first), the KV caches and
    some slack; the rest of the weights stream."""
    r = subprocess.run([sys.executable, "-m", "flashlm", "plan", str(store), "--ram", "8G", "--ctx", str(ctx),
                        "--batch", str(batch), "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    return p["baseline"] + (64 << 20) + p["kv_bytes"] + (48 << 20) + int(share * p["store_bytes"])


def test_offloaded_model_serves_eight_clients():
    """qwen2.5-coder-0.5b (484 MiB) with 40% of its store resident: its layers stream from disk;
    8 clients streaming at once get the answers the model gives in RAM."""
    store = real_store_path("qwen2.5-coder-0.5b")
    ram = offload_budget(store, ctx=512, batch=8, share=0.4)
    srv = ServeProcess(store, "--ram", str(ram), "--ctx", "512", "--max-batch", "8", "--threads", "2")
    try:
        assert "weights stream from disk" in srv.err
        res = concurrent_streams(srv.url, "qwen2.5-coder-0.5b", 8, 12)
        h = settled(srv.url)
        assert srv.stop() == 0, srv.err
    finally:
        srv.kill()
    errors = [(s, e) for s, _, e in res if s != 200 or e]
    assert not errors, errors
    assert all(ev[-1] == "[DONE]" for _, ev, _ in res)
    assert h["served"] == 8 and h["steps"] < 8 * 12, h  # requests shared passes over the weights
    want = expected(store, 8, 12, ctx=512, threads=2)
    assert [stream_text(ev) for _, ev, _ in res] == want

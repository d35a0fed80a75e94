"""The HTTP layer on a tiny model, in process (Starlette's TestClient runs the app and its
engine loop): routes and response shapes, usage counts, streaming, sampling fields,
stop strings, the API key, and every limit refused with the right 4xx."""
from __future__ import annotations

import threading

import pytest
from serving import post_stream, stream_text
from synth import write_tiny_gguf
from starlette.testclient import TestClient

import flashlm
from flashlm.server.app import create_app

MODEL = "tiny"
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from flashlm.models.gguf_import import import_gguf

    d = tmp_path_factory.mktemp("app")
    store = import_gguf(write_tiny_gguf(d / "t.gguf", arch="qwen2", hidden=64, ffn=128), d / "store")
    with flashlm.load(store, threads=2, ctx=128, batch=2) as llm:
        yield llm


@pytest.fixture(scope="module")
def client(llm):
    with TestClient(create_app(llm, model_id=MODEL, max_batch=2, max_queue=4, max_body=4096)) as c:
        yield c


def chat(client, **kw):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **kw})


def test_chat_completion_is_the_engines_answer(client, llm):
    r = chat(client, temperature=0, max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    want = llm.generate(CHAT, temperature=0, max_tokens=12)
    assert choice["message"]["content"] == want
    ids = llm.prompt_ids(CHAT)
    toks = [e.token for e in llm.engine.generate([ids], flashlm.runtime.sampler.SamplingParams.greedy(max_tokens=12))
            if e.token is not None and e.token not in llm.tokenizer.stop_token_ids]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(toks),
                             "total_tokens": len(ids) + len(toks)}


def test_max_tokens_gives_length(client):
    # the tiny random model hardly ever says its end-of-turn token: 5 tokens end by length
    body = chat(client, temperature=0, max_tokens=5).json()
    reason, n = body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]
    assert (reason, n) == ("length", 5) or (reason == "stop" and n < 5)


def test_completion_text_and_token_ids(client, llm):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == llm.generate("hello", raw=True, temperature=0, max_tokens=6)
    ids = llm.tokenizer.encode("hello", add_special=True)
    r2 = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 6, "temperature": 0})
    assert r2.json()["choices"][0]["text"] == body["choices"][0]["text"]
    assert r2.json()["usage"]["prompt_tokens"] == len(ids)
    r3 = client.post("/v1/completions", json={"model": MODEL, "prompt": ["hello"], "max_tokens": 6, "temperature": 0})
    assert r3.json()["choices"][0]["text"] == body["choices"][0]["text"]


def test_streaming_chat_matches_the_whole_answer(client):
    whole = chat(client, temperature=0, max_tokens=12).json()
    status, events = post_stream(client, "/v1/chat/completions",
                                 {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 12,
                                  "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events[:-1])
    assert stream_text(events) == whole["choices"][0]["message"]["content"]
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    assert finish[-1] == whole["choices"][0]["finish_reason"] and not any(finish[:-1])
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]


def test_streaming_completion(client):
    whole = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 8,
                                                 "temperature": 0}).json()
    status, events = post_stream(client, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 8,
                                                             "temperature": 0})
    assert status == 200 and events[-1] == "[DONE]" and "usage" not in events[-2]
    assert stream_text(events, "completion") == whole["choices"][0]["text"]


def test_sampling_fields_and_seed(client):
    kw = dict(temperature=1.2, top_p=0.9, top_k=20, min_p=0.01, presence_penalty=0.5, frequency_penalty=0.3,
              repetition_penalty=1.1, seed=11, max_tokens=10)
    a, b = chat(client, **kw).json(), chat(client, **kw).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    c = chat(client, **{**kw, "seed": 12}).json()
    assert c["usage"]["completion_tokens"] >= 1


def test_stop_string_cuts_the_answer(client):
    full = chat(client, temperature=0, max_tokens=16).json()["choices"][0]["message"]["content"]
    if len(full) < 4:
        pytest.skip("the tiny model produced too little text to cut")
    stop = full[2:4]
    body = chat(client, temperature=0, max_tokens=16, stop=[stop]).json()
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_models_and_health(client):
    r = client.get("/v1/models").json()
    assert r["object"] == "list" and [m["id"] for m in r["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["served"] >= 1


def test_api_key(llm):
    with TestClient(create_app(llm, model_id=MODEL, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = c.post("/v1/chat/completions", headers=headers, json={"model": MODEL, "messages": CHAT})
            assert r.status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/chat/completions", headers=ok, json={"model": MODEL, "messages": CHAT, "max_tokens": 2})
        assert r.status_code == 200


def error(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_body_size_limit(client):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}
    e = error(client.post("/v1/chat/completions", json=big), 413)
    assert "4096" in e["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    e = error(client.post("/v1/completions", content=chunks()), 413)
    assert "more than this server takes" in e["message"]


def test_prompt_and_max_tokens_against_ctx(client, llm):
    long = " ".join(["hello"] * 80)
    e = error(client.post("/v1/completions", json={"model": MODEL, "prompt": long}), 400)
    assert e["code"] == "context_length_exceeded" and "--ctx" in e["message"]
    n = len(llm.tokenizer.encode("hello", add_special=True))
    e = error(client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 128}), 400)
    assert e["code"] == "context_length_exceeded" and f"at most {128 - n}" in e["message"]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 128 - n,
                                             "temperature": 0})
    assert r.status_code == 200


def test_queue_limit_gives_429(llm, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real = llm.engine.step

    def blocked(seqs, **kw):
        entered.set()
        assert gate.wait(60)
        return real(seqs, **kw)

    monkeypatch.setattr(llm.engine, "step", blocked)
    with TestClient(create_app(llm, model_id=MODEL, max_batch=1, max_queue=1)) as c:
        results = []
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 3}
        threads = [threading.Thread(target=lambda: results.append(c.post("/v1/chat/completions", json=body)))]
        threads[0].start()
        assert entered.wait(60)
        threads.append(threading.Thread(target=lambda: results.append(c.post("/v1/chat/completions", json=body))))
        threads[1].start()
        for _ in range(500):  # until the second request waits in the queue
            if c.get("/health").json()["waiting"] == 1:
                break
            threading.Event().wait(0.01)
        r = c.post("/v1/chat/completions", json=body)
        e = error(r, 429)
        assert "--max-queue 1" in e["message"] and r.headers["retry-after"] == "1"
        gate.set()
        for t in threads:
            t.join(60)
        assert [x.status_code for x in results] == [200, 200]

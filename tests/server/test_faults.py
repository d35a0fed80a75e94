"""A disk read error in the middle of a generation, injected where every read of the
prefetcher happens (StoreFile.read_into): the request in flight fails with a 500 that
says what failed, and the server answers the next request correctly."""
from __future__ import annotations

import pytest
from serving import post_stream, stream_text
from synth import write_tiny_gguf
from starlette.testclient import TestClient

import flashlm
from flashlm.errors import OffloadError
from flashlm.offload.io import StoreFile
from flashlm.server.app import create_app

MODEL = "tiny-streamed"
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from flashlm.models.gguf_import import import_gguf

    d = tmp_path_factory.mktemp("faults")
    store = import_gguf(write_tiny_gguf(d / "t.gguf", arch="llama", hidden=128, ffn=256, n_layers=4), d / "store")
    with flashlm.load(store, threads=2, ctx=128, batch=2, stream=True, draft="none") as llm:
        llm.weights.give_up_layers(len(llm.weights.plan.resident_layers), "test")  # every layer streams
        assert llm.weights.plan.streamed_layers == tuple(range(4))
        yield llm


class Fault:
    """Fail reads of one streamed layer file (an EIO from the disk) once ``armed``; arm it
    after ``after`` engine steps of a request."""

    def __init__(self, llm, monkeypatch, after: int | None) -> None:
        self.armed, self.after, self.steps, self.failed = False, after, 0, 0
        layer = llm.weights.plan.streamed_layers[2]
        self.path = str(llm.store.path / f"layer_{layer:03d}.bin")
        real_read, real_step = StoreFile.read_into, llm.engine.step

        def read_into(f, buf, offset):
            if self.armed and str(f.path) == self.path:
                self.failed += 1
                raise OffloadError(f"read error in {f.path} at offset {offset} ({len(buf)} bytes): Input/output error")
            return real_read(f, buf, offset)

        def step(seqs, **kw):
            self.steps += 1
            if self.after is not None and self.steps > self.after:
                self.armed = True
            return real_step(seqs, **kw)

        monkeypatch.setattr(StoreFile, "read_into", read_into)
        monkeypatch.setattr(llm.engine, "step", step)


def ask(client, stream=False):
    body = {"model": MODEL, "messages": CHAT, "temperature": 0, "max_tokens": 24}
    if stream:
        return post_stream(client, "/v1/chat/completions", body)
    return client.post("/v1/chat/completions", json=body)


def test_read_error_mid_generation_fails_that_request_only(llm, monkeypatch):
    with TestClient(create_app(llm, model_id=MODEL)) as c:
        clean = ask(c)
        assert clean.status_code == 200 and clean.json()["usage"]["completion_tokens"] > 4
        fault = Fault(llm, monkeypatch, after=3)  # the prompt's step and two decode steps succeed
        r = ask(c)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "Input/output error" in err["message"]
        assert fault.path in err["message"] and fault.failed >= 1
        fault.armed, fault.after = False, None  # the disk recovers
        again = ask(c)
        assert again.status_code == 200 and again.json()["choices"] == clean.json()["choices"]
        assert c.get("/health").json()["failed"] == 1


def test_read_error_while_streaming(llm, monkeypatch):
    with TestClient(create_app(llm, model_id=MODEL)) as c:
        status, clean = ask(c, stream=True)
        assert status == 200 and clean[-1] == "[DONE]"
        fault = Fault(llm, monkeypatch, after=12)  # text has come out by then
        status, events = ask(c, stream=True)
        # tokens were sent (status 200 is out), then an error event, and no [DONE]
        assert status == 200 and "[DONE]" not in events
        assert "Input/output error" in events[-1]["error"]["message"]
        assert stream_text(events[:-1]) and clean[-2]["choices"][0]["finish_reason"]
        assert stream_text(clean).startswith(stream_text(events[:-1]))
        fault.after = 0  # a read error before the first token is still an HTTP status
        fault.steps = 0
        status, events = ask(c, stream=True)
        assert status == 500 and "Input/output error" in events[0]["error"]["message"]
        fault.armed, fault.after = False, None
        status, events = ask(c, stream=True)
        assert status == 200 and stream_text(events) == stream_text(clean)

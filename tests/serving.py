"""Helpers for server tests: a `flashlm serve` child process on a free port, and SSE parsing."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

READY = re.compile(r"on http://([^\s]+):(\d+)/v1")


class ServeProcess:
    """`python -m flashlm serve MODEL --port 0 ARGS...`; ``url`` once it listens.

    Stderr is collected in a thread (``err``); ``stop()`` sends SIGTERM and waits."""

    def __init__(self, model: str, *args: str, timeout: float = 600, env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", "flashlm", "serve", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"flashlm serve did not start (exit {self.proc.returncode}):\n{self.err}")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = READY.search(line)
            if m and self.url is None:
                self.url = f"http://{m.group(1)}:{m.group(2)}"
                self._ready.set()

    @property
    def err(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def sse_events(lines) -> list:
    """The `data:` payloads of a server-sent event stream: dicts, and the string "[DONE]"."""
    out = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_text(events: list, kind: str = "chat") -> str:
    parts = []
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            c = e["choices"][0]
            parts.append((c["delta"].get("content") or "") if kind == "chat" else c["text"])
    return "".join(parts)


def post_stream(client: httpx.Client, path: str, body: dict, **kw) -> tuple[int, list]:
    """POST with stream true; (status, SSE payloads) or (status, [error body])."""
    with client.stream("POST", path, json={**body, "stream": True}, **kw) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        return 200, sse_events(r.iter_lines())

"""The OpenAI-compatible HTTP server: a Starlette app over the engine loop, run by uvicorn.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events
ending with ``data: [DONE]`` when ``stream`` is true), GET /v1/models, GET /health.

Requests go into the :class:`~flashlm.runtime.scheduler.Scheduler`: one thread owns
the model and batches the running requests step by step; the event loop here only
parses, tokenizes (in worker threads) and forwards events. A client that disconnects is
dropped from the batch at the next step.

Limits, each refused with an OpenAI-shaped error, never a 500: a body over
``max_body`` bytes (413), bad JSON or fields (400), a prompt that does not fit ``--ctx``
or max_tokens beyond it (400, ``context_length_exceeded``), an unknown model (404),
``max_batch`` running and ``max_queue`` waiting (429), a missing or wrong API key (401).

Example:
    >>> app = create_app(llm, model_id="smollm2-135m", max_batch=8)
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import time
from typing import AsyncIterator, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flashlm.errors import FlashlmError, InputError
from flashlm.runtime.engine import Event
from flashlm.runtime.scheduler import Failure, QueueFullError, Scheduler, ShuttingDownError
from flashlm.server import protocol
from flashlm.server.protocol import APIError, Parsed, error_body

MAX_BODY = 4 << 20  # bytes of a request body
_GONE = object()  # put in a ticket when the client disconnected


def _json(obj: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status, headers, media_type="application/json")


def _sse(obj: dict | str) -> bytes:
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)).encode() + b"\n\n"


class _Ticket:
    """Events of one request, from the engine thread to this event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: object) -> None:  # any thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> object:
        item = await self.queue.get()
        if isinstance(item, Failure):
            raise APIError(item.status, item.message, type=item.kind)
        return item


class _EventStream:
    """A server-sent event response whose body comes from ``chunks``; ``on_close`` runs
    however it ends (finished, client gone, error)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for part in self.chunks:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            self.on_close()


class _Auth:
    """Every route but /health needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, b"Bearer " + self.key):
                msg = ("invalid API key" if got else "missing API key") + ": send the header 'Authorization: Bearer <key>'"
                await _json(error_body(msg, code="invalid_api_key"), 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """The app's state: the LLM, its scheduler and the limits."""

    def __init__(self, llm, *, model_id: str, max_batch: int = 8, max_queue: int = 64, max_body: int = MAX_BODY,
                 mix: bool = True) -> None:
        self.llm, self.model_id, self.max_body = llm, model_id, int(max_body)
        self.ctx = llm.engine.ctx
        self.created = int(time.time())
        self.scheduler = Scheduler(llm.engine, max_batch=max_batch, max_queue=max_queue, mix=mix)

    # ---- plumbing ----

    async def read_json(self, request: Request) -> object:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            raise APIError(413, f"the request body is {size} bytes, more than this server takes ({self.max_body})",
                           code="request_too_large")
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > self.max_body:
                raise APIError(413, f"the request body is more than this server takes ({self.max_body} bytes)",
                               code="request_too_large")
        try:
            return json.loads(buf)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None

    async def prompt_ids(self, p: Parsed) -> list[int]:
        def work() -> list[int]:
            if p.messages is not None:
                return self.llm.prompt_ids(p.messages)
            if p.text is not None:
                return self.llm.tokenizer.encode(p.text, add_special=True)
            return p.ids

        try:
            return await anyio.to_thread.run_sync(work)
        except InputError as e:
            raise APIError(400, str(e), param="messages" if p.messages is not None else "prompt") from None
        except FlashlmError as e:  # the model's chat template failed: not the client's doing
            raise APIError(500, str(e), type="server_error") from None

    async def watch(self, request: Request, req, ticket: _Ticket) -> None:
        """Until the client disconnects; then drop its request from the batch."""
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                self.scheduler.cancel(req)
                ticket.queue.put_nowait(_GONE)
                return

    # ---- generation ----

    async def generate(self, request: Request, p: Parsed) -> Response:
        ids = await self.prompt_ids(p)
        protocol.check_fit(len(ids), p.params, self.ctx)
        ticket = _Ticket()
        try:
            req = self.scheduler.submit(ids, p.params, ticket.put)
        except QueueFullError as e:
            raise APIError(429, str(e), type="server_busy", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDownError as e:
            raise APIError(503, str(e), type="server_busy") from None
        except InputError as e:
            raise APIError(400, str(e), param="prompt") from None
        watcher = asyncio.create_task(self.watch(request, req, ticket))

        def close() -> None:
            watcher.cancel()
            self.scheduler.cancel(req)  # no-op once finished

        rid = protocol.new_id(p.kind)
        try:
            if not p.stream:
                text, finish = [], None
                while finish is None:
                    item = await ticket.get()
                    if item is _GONE:
                        return Response(status_code=499)  # nobody reads it
                    text.append(item.text)
                    finish = item.finish_reason if item.finished else None
                use = protocol.usage(len(ids), req.completion_tokens)
                return _json(protocol.completion(p.kind, rid, self.model_id, "".join(text), finish, use))
            first = await ticket.get()  # an error before the first token is still an HTTP status
        except BaseException:
            close()
            raise
        if first is _GONE:
            close()
            return Response(status_code=499)
        return _EventStream(self.stream(p, rid, ids, req, ticket, first), close)

    async def stream(self, p: Parsed, rid: str, ids: list[int], req, ticket: _Ticket, item) -> AsyncIterator[bytes]:
        created = int(time.time())
        if p.kind == "chat":
            yield _sse(protocol.chunk("chat", rid, self.model_id, created, None, role=True))
        while True:
            if item is _GONE:
                return
            ev: Event = item
            if ev.text:
                yield _sse(protocol.chunk(p.kind, rid, self.model_id, created, ev.text))
            if ev.finished:
                break
            try:
                item = await ticket.get()
            except APIError as e:  # failed after the first token: the status is sent already
                yield _sse(e.body())
                return
        yield _sse(protocol.chunk(p.kind, rid, self.model_id, created, None, ev.finish_reason))
        if p.include_usage:
            yield _sse(protocol.chunk(p.kind, rid, self.model_id, created, None,
                                      use=protocol.usage(len(ids), req.completion_tokens)))
        yield _sse("[DONE]")

    # ---- routes ----

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, protocol.parse_chat(await self.read_json(request), self.model_id))

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, protocol.parse_completion(await self.read_json(request), self.model_id))

    async def models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["name"] != self.model_id:
            raise APIError(404, f"the model '{request.path_params['name']}' does not exist: this server serves "
                                f"'{self.model_id}'", code="model_not_found")
        return _json(self.model_card())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flashlm",
                "context_length": self.ctx}

    async def health(self, request: Request) -> Response:
        ok = self.scheduler.alive
        return _json({"status": "ok" if ok else "error", "model": self.model_id, **self.scheduler.counts()},
                     200 if ok else 503)


# ---- the app ----

async def _api_error(request: Request, exc: APIError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    msg = {404: f"no route {request.method} {request.url.path}", 405: f"method {request.method} is not allowed "
           f"on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return _json(error_body(msg, code="not_found" if exc.status_code == 404 else None), exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _json(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


def create_app(llm, *, model_id: str, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               max_body: int = MAX_BODY, mix: bool = True) -> Starlette:
    """The ASGI app serving ``llm`` as ``model_id``. Its lifespan starts the engine loop and,
    at shutdown, lets the requests in it finish."""
    srv = Server(llm, model_id=model_id, max_batch=max_batch, max_queue=max_queue, max_body=max_body, mix=mix)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv.scheduler.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(srv.scheduler.close)

    routes = [
        Route("/v1/chat/completions", srv.chat_completions, methods=["POST"]),
        Route("/v1/completions", srv.completions, methods=["POST"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/v1/models/{name:path}", srv.model, methods=["GET"]),
        Route("/health", srv.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_Auth, key=api_key)] if api_key else [],
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.server = srv
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(app: Starlette, sock: socket.socket, *, log_level: str = "warning", on_ready: Callable[[], None] | None = None) -> None:
    """Run ``app`` on ``sock`` until SIGINT or SIGTERM; then stop taking connections, let the
    requests in flight finish, and return."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False, timeout_graceful_shutdown=None)
    server = _Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; a SIGTERM that drained
    # the server is a clean exit
    old = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, old)
    if not server.started:
        raise FlashlmError("the server did not start (see the messages above)")

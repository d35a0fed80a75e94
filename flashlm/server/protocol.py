"""The OpenAI wire format: request bodies checked into sampling parameters, and the
response, chunk and error objects. No I/O here.

Every problem with a request is an :class:`APIError` with the status OpenAI's API
gives for it and an error body of OpenAI's shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Sampling fields: temperature, top_p, max_tokens (or max_completion_tokens), stop, seed,
presence_penalty, frequency_penalty, and llama.cpp's top_k, min_p, repetition_penalty
(also repeat_penalty) and repeat_last_n. A field left out takes ``flashlm run``'s
default (llama.cpp's: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from flashlm.errors import InputError
from flashlm.runtime.chat_template import validate_messages
from flashlm.runtime.sampler import SamplingParams

# request field -> SamplingParams field
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
             "repetition_penalty": "repeat_penalty", "repeat_penalty": "repeat_penalty",
             "repeat_last_n": "repeat_last_n", "seed": "seed"}
MAX_STOP = 16


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Parsed:
    """A checked request: the prompt (messages, text or token ids) and how to generate."""

    kind: str  # "chat" or "completion"
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None
    text: str | None = None
    ids: list[int] | None = None


# ---- requests ----

def _opt(body: dict, name: str, types: tuple, what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise bad(f"'{name}' must be {what}, got {type(v).__name__} {v!r:.60}", name)
    return v


def _common(body: Any, model_id: str) -> None:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: a string naming the model (GET /v1/models lists it)", "model")
    if model != model_id:
        raise APIError(404, f"the model '{model}' does not exist: this server serves '{model_id}'",
                       param="model", code="model_not_found")
    n = _opt(body, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise bad(f"'n' is {n}: this server generates one choice per request (n = 1)", "n")
    for name in ("echo", "logprobs"):
        if body.get(name):
            raise bad(f"'{name}' is not supported by this server", name)
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' is not supported by this server (only 1)", "best_of")
    if body.get("suffix"):
        raise bad("'suffix' is not supported by this server", "suffix")
    if body.get("tools") or body.get("functions"):
        raise bad("tools and function calling are not supported by this server", "tools")


def _params(body: dict) -> SamplingParams:
    kw: dict[str, Any] = {}
    for name, field in _SAMPLING.items():
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"'{name}' must be a number, got {type(v).__name__} {v!r:.60}", name)
        if field in ("top_k", "seed", "repeat_last_n"):
            if isinstance(v, float) and not v.is_integer():
                raise bad(f"'{name}' must be an integer, got {v!r}", name)
            v = int(v)
        kw[field] = v
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if mt is not None:
        if isinstance(mt, bool) or not isinstance(mt, int):
            raise bad(f"'{name}' must be an integer >= 1, got {type(mt).__name__} {mt!r:.60}", name)
        if mt < 1:
            raise bad(f"'{name}' is {mt}: use an integer >= 1", name)
        kw["max_tokens"] = mt
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP):
            raise bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
        kw["stop"] = [s for s in stop if s]
    try:
        return SamplingParams(**kw)
    except InputError as e:
        field = str(e).split("=", 1)[0]
        param = next((k for k, f in _SAMPLING.items() if f == field and k in body), field or None)
        raise bad(str(e), param) from None


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = _opt(body, "stream", (bool,), "true or false") or False
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include = bool((opts or {}).get("include_usage", False))
    return stream, include


def parse_chat(body: Any, model_id: str) -> Parsed:
    """A POST /v1/chat/completions body."""
    _common(body, model_id)
    if "messages" not in body:
        raise bad("'messages' is required: a list of {role, content} objects", "messages")
    try:
        messages = validate_messages(body["messages"])
    except InputError as e:
        raise bad(str(e), "messages") from None
    if not messages:
        raise bad("'messages' is empty: give at least one message", "messages")
    stream, include = _stream_opts(body)
    return Parsed("chat", _params(body), stream, include, messages=messages)


def parse_completion(body: Any, model_id: str) -> Parsed:
    """A POST /v1/completions body: ``prompt`` is a string, a list of one string, or token ids."""
    _common(body, model_id)
    prompt = body.get("prompt")
    stream, include = _stream_opts(body)
    params = _params(body)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty: give some text", "prompt")
        return Parsed("completion", params, stream, include, text=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Parsed("completion", params, stream, include, ids=list(prompt))
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("several prompts in one request are not supported: send one request per prompt", "prompt")
    raise bad("'prompt' is required: a non-empty string or a list of token ids", "prompt")


def check_fit(n_prompt: int, params: SamplingParams, ctx: int) -> None:
    """400 when the prompt, or the prompt plus max_tokens, does not fit the context."""
    if n_prompt >= ctx:
        raise bad(f"the prompt is {n_prompt} tokens; this server's context is {ctx} tokens per request "
                  f"(--ctx), with room to generate: shorten the prompt", "messages", "context_length_exceeded")
    if params.max_tokens is not None and n_prompt + params.max_tokens > ctx:
        raise bad(f"this server's context is {ctx} tokens per request (--ctx); the prompt is {n_prompt} "
                  f"tokens and max_tokens asks for {params.max_tokens} more: lower max_tokens to at most "
                  f"{ctx - n_prompt}", "max_tokens", "context_length_exceeded")


# ---- responses ----

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(kind: str, rid: str, model: str, text: str, finish: str | None, use: dict) -> dict:
    """The whole answer of a non-streaming request."""
    created = int(time.time())
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                "usage": use, "system_fingerprint": "flashlm"}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": use, "system_fingerprint": "flashlm"}


def chunk(kind: str, rid: str, model: str, created: int, text: str | None, finish: str | None = None, *,
          role: bool = False, use: dict | None = None) -> dict:
    """One server-sent event of a streaming request (``use`` alone: the final usage chunk)."""
    if kind == "chat":
        obj = "chat.completion.chunk"
        choices = [] if use is not None else [{"index": 0, "delta": ({"role": "assistant", "content": ""} if role else
                                                                    {} if text is None else {"content": text}),
                                               "logprobs": None, "finish_reason": finish}]
    else:
        obj = "text_completion"
        choices = [] if use is not None else [{"index": 0, "text": text or "", "logprobs": None,
                                               "finish_reason": finish}]
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
           "system_fingerprint": "flashlm"}
    if use is not None:
        out["usage"] = use
    return out

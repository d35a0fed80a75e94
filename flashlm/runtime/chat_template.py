"""Chat templates: render a list of messages into a prompt string.

The templates are the Jinja2 sources that ship with the models (GGUF
``tokenizer.chat_template``, HF ``tokenizer_config.json``). They run in the same
kind of environment Hugging Face transformers uses, so the output matches
``apply_chat_template``: an immutable sandbox, ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension, and the helpers templates expect
(``raise_exception``, ``tojson``, ``strftime_now``).

Example:
    >>> tpl = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}")
    >>> tpl.render([{"role": "user", "content": "hi"}])
    'user: hi\\n'
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flashlm.errors import FlashlmError, InputError


class ChatTemplateError(FlashlmError):
    """A chat template that does not compile or fails while rendering."""


# ---- messages ----

def validate_messages(messages: Any) -> list[dict]:
    """Check chat messages and return them in the shape templates expect.

    Each message is a dict with a string ``role`` and a ``content`` that is a
    string or a list of ``{"type": "text", "text": ...}`` parts (joined with
    newlines, as vLLM does for text-only models). An assistant message that has
    ``tool_calls`` may have no content (None). Other keys (``name``,
    ``tool_calls``, ``tool_call_id``) are passed through.

    Args:
        messages: the list to check.

    Returns:
        A new list of new dicts, with every content a string (or None, see above).

    Raises:
        InputError: naming the first bad item and what is wrong with it.
    """
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of {{'role', 'content'}} dicts, "
                         f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InputError(f"messages[{i}]['role'] must be a non-empty string, "
                             f"got {role!r}")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                if (not isinstance(part, dict) or part.get("type") != "text"
                        or not isinstance(part.get("text"), str)):
                    raise InputError(f"messages[{i}]['content'][{j}] must be "
                                     f"{{'type': 'text', 'text': str}}, got {part!r:.80}")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None and role == "assistant" and m.get("tool_calls"):
            pass
        elif not isinstance(content, str):
            raise InputError(f"messages[{i}]['content'] must be a string or a list of "
                             f"text parts, got {type(content).__name__}")
        out.append({**m, "content": content})
    return out


# ---- environment ----

def _raise_exception(message: str) -> None:
    raise InputError(f"chat template: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's tojson: unlike Jinja's built-in it does not escape HTML or sort keys.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (as HF does): objects with
    methods the sandbox does not know about never reach the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (str enums...) back to the base type
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names (no route to internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}")


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: HF marks assistant spans with it;
    here it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


MAX_ITEMS = 1 << 20  # longest string or list a template may build with * (a template must not exhaust memory)
MAX_EXPONENT = 4096
MAX_OUTPUT = 4 << 20  # characters of a rendered prompt


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, stricter in two ways: reaching for an underscore attribute (``__class__``,
    ``__globals__``: the way out of a sandbox, as in CVE-2024-34359) is an error at once
    rather than a silent undefined, and ``*`` / ``**`` cannot build huge values."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed in a chat template")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_ITEMS:
                    raise jinja2.exceptions.SecurityError(
                        f"a chat template may not build a {type(seq).__name__} of more than {MAX_ITEMS} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise jinja2.exceptions.SecurityError(f"a chat template may not raise to a power above {MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: "
                                f"{e.message}") from None


# ---- rendering ----

class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja2 template text.

    Raises:
        ChatTemplateError: the template has a syntax error (message names the line).
    """

    def __init__(self, source: str):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("chat template is empty")
        self.source = source
        self._template = _compile(source)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, bos_token: str = "", eos_token: str = "",
               **kwargs: Any) -> str:
        """Render messages into a prompt.

        Args:
            messages: chat messages, checked by :func:`validate_messages`.
            add_generation_prompt: end with the header of an assistant turn.
            tools: tool (function) definitions, for templates that use them.
            bos_token: the BOS string, for templates that write it.
            eos_token: the EOS string, for templates that write it.
            **kwargs: extra template variables (e.g. ``enable_thinking``).

        Returns:
            The prompt text (special tokens as text; tokenize with parse_special).

        Raises:
            InputError: bad messages, or the template rejected them
                (``raise_exception``).
            ChatTemplateError: the template failed for another reason.
        """
        msgs = validate_messages(messages)
        try:
            parts, n = [], 0
            for piece in self._template.generate(messages=_plain(msgs), add_generation_prompt=add_generation_prompt,
                                                 tools=_plain(tools), bos_token=bos_token, eos_token=eos_token,
                                                 **_plain(kwargs)):
                n += len(piece)
                if n > MAX_OUTPUT:
                    raise ChatTemplateError(f"chat template failed: it renders more than {MAX_OUTPUT} characters")
                parts.append(piece)
            return "".join(parts)
        except FlashlmError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
                MemoryError, ZeroDivisionError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def render_chat_template(source: str, messages: list[dict], *, add_generation_prompt: bool = True,
                         tools: list[dict] | None = None, **kwargs: Any) -> str:
    """Compile (cached) and render a template; see :meth:`ChatTemplate.render`."""
    return ChatTemplate(source).render(messages, add_generation_prompt=add_generation_prompt,
                                       tools=tools, **kwargs)

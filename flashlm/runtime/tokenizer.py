"""Tokenizer: text <-> token ids, chat prompts, streaming decode, stop strings.

Wraps a Hugging Face ``tokenizers.Tokenizer`` (a tokenizer.json, or one built
from GGUF vocab and merges) and adds what a runtime needs from the model's
metadata: BOS/EOS ids, the ids that end a turn, whether to prepend BOS, and the
chat template.

Example:
    >>> tok = Tokenizer.from_files("tokenizer.json", special={"eos_token_id": 2})
    >>> ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    >>> detok = tok.detokenizer()
    >>> for t in generated:
    ...     print(detok.add(t), end="")
    >>> print(detok.flush())
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterable, Sequence

import tokenizers

from flashlm.errors import FlashlmError, InputError
from flashlm.runtime.chat_template import ChatTemplate

# Tokens that end a turn in common chat formats. As llama.cpp does for its
# end-of-generation set, a special token with one of these texts stops
# generation when the metadata gives no explicit list.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                      "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<｜end▁of▁sentence｜>")

_REPLACEMENT = "\ufffd"


# ---- tokenizer ----

class Tokenizer:
    """Encode, decode and render chat prompts for one model.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, or the text of a tokenizer.json.
        chat_template: Jinja2 chat template source, or None.
        bos_token_id, eos_token_id: None = looked up from bos_token / eos_token.
        stop_token_ids: ids that end generation; None = EOS plus the special
            tokens named in :data:`END_OF_TURN_TOKENS` that the vocabulary has.
        add_bos: prepend BOS when encoding with ``add_special=True``.
        bos_token, eos_token: None = looked up from the ids.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer | str, *, chat_template: str | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 stop_token_ids: Iterable[int] | None = None, add_bos: bool = False,
                 bos_token: str | None = None, eos_token: str | None = None):
        if isinstance(tokenizer, str):
            try:
                tokenizer = tokenizers.Tokenizer.from_str(tokenizer)
            except Exception as e:
                raise FlashlmError(f"cannot parse tokenizer JSON: {e}") from None
        self._tok = tokenizer
        self._lock = threading.Lock()  # encode_special_tokens is tokenizer state
        self.chat_template = chat_template
        self._template: ChatTemplate | None = None

        self.bos_token_id = _resolve_id(self._tok, bos_token_id, bos_token)
        self.eos_token_id = _resolve_id(self._tok, eos_token_id, eos_token)
        self.bos_token = bos_token if bos_token is not None else self._token_str(self.bos_token_id)
        self.eos_token = eos_token if eos_token is not None else self._token_str(self.eos_token_id)
        self.add_bos = bool(add_bos) and self.bos_token_id is not None
        if stop_token_ids is None:
            stops = {self._tok.token_to_id(t) for t in END_OF_TURN_TOKENS
                     if t in self._special_tokens()}
            stops.discard(None)
        else:
            stops = {int(i) for i in stop_token_ids}
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.stop_token_ids: set[int] = stops

    @classmethod
    def from_files(cls, tokenizer_json_path: str | os.PathLike, *,
                   chat_template: str | None = None,
                   special: dict[str, Any] | None = None) -> "Tokenizer":
        """Load a tokenizer.json and the model's special-token metadata.

        Args:
            tokenizer_json_path: path of a tokenizer.json (or its text, when the
                string starts with ``{``).
            chat_template: Jinja2 chat template source, or None.
            special: any of ``bos_token_id``, ``eos_token_id``, ``stop_token_ids``
                (list), ``add_bos_token``, ``bos_token``, ``eos_token``; missing
                keys get the defaults of :class:`Tokenizer`.

        Returns:
            The Tokenizer.

        Raises:
            FlashlmError: the file is missing or not a tokenizer.json.
        """
        special = dict(special or {})
        src = os.fspath(tokenizer_json_path)
        if src.lstrip().startswith("{"):
            text = src
        else:
            try:
                with open(src, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise FlashlmError(f"cannot read tokenizer file {src}: {e.strerror}") from None
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            raise FlashlmError(f"{src[:200]} is not a valid tokenizer.json: {e}") from None
        stops = special.get("stop_token_ids")
        return cls(tok, chat_template=chat_template,
                   bos_token_id=special.get("bos_token_id"),
                   eos_token_id=special.get("eos_token_id"),
                   stop_token_ids=None if stops is None else list(stops),
                   add_bos=bool(special.get("add_bos_token", False)),
                   bos_token=special.get("bos_token"), eos_token=special.get("eos_token"))

    # ---- basic ----

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Text -> token ids.

        Args:
            text: the text.
            add_special: prepend BOS if the model wants it (``add_bos``).
            parse_special: ``<|im_start|>`` and the like in the text become their
                special ids; False tokenizes them as plain text (use for user text).

        Returns:
            The ids.
        """
        return self.encode_batch([text], add_special=add_special, parse_special=parse_special)[0]

    def encode_batch(self, texts: Sequence[str], *, add_special: bool = False,
                     parse_special: bool = True) -> list[list[int]]:
        """:meth:`encode` for several texts (tokenized in parallel by the backend)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("encode_batch takes a list of strings")
        with self._lock:
            old = self._tok.encode_special_tokens
            self._tok.encode_special_tokens = not parse_special
            try:
                encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
            finally:
                self._tok.encode_special_tokens = old
        prefix = [self.bos_token_id] if add_special and self.add_bos else []
        return [prefix + e.ids for e in encs]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Token ids -> text.

        Args:
            ids: the ids.
            skip_special: drop special tokens (BOS, ``<|im_end|>``...).
        """
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special)

    # ---- chat ----

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render chat messages into a prompt with the model's template.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: end with the header of an assistant turn.
            tools: tool definitions for templates that take them.
            **kwargs: extra template variables.

        Returns:
            The prompt text; encode it with ``parse_special=True``.

        Raises:
            InputError: the model has no chat template, or bad messages.
            ChatTemplateError: the template fails.
        """
        if not self.chat_template:
            raise InputError("this model has no chat template: give a plain prompt, or "
                             "pass a chat_template")
        if self._template is None or self._template.source != self.chat_template:
            self._template = ChatTemplate(self.chat_template)
        kwargs.setdefault("bos_token", self.bos_token or "")
        kwargs.setdefault("eos_token", self.eos_token or "")
        return self._template.render(messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools, **kwargs)

    def detokenizer(self, *, skip_special: bool = False) -> "StreamingDetokenizer":
        """A fresh :class:`StreamingDetokenizer` for one generated sequence."""
        return StreamingDetokenizer(self, skip_special=skip_special)

    # ---- helpers ----

    def _special_tokens(self) -> set[str]:
        return {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}

    def _token_str(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tok.id_to_token(token_id)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, stop_token_ids={sorted(self.stop_token_ids)}, "
                f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})")


def _resolve_id(tok: tokenizers.Tokenizer, token_id: int | None, token: str | None) -> int | None:
    if token_id is not None:
        token_id = int(token_id)
        if not 0 <= token_id < tok.get_vocab_size(with_added_tokens=True):
            raise FlashlmError(f"special token id {token_id} is outside the vocabulary "
                               f"(size {tok.get_vocab_size(with_added_tokens=True)})")
        return token_id
    return tok.token_to_id(token) if token else None


# ---- streaming decode ----

class StreamingDetokenizer:
    """Decode generated tokens one at a time without splitting a character.

    Keeps two offsets into the ids, as HF's ``DecodeStream`` and TGI do: text is
    decoded from a short window ``ids[prefix:]`` and what follows the already
    emitted ``ids[prefix:read]`` is new. While the window decodes to text that
    ends in U+FFFD (a multi-byte character not complete yet) nothing is emitted.
    The extra prefix token keeps decoders that strip a leading space on the
    first token (SentencePiece) consistent with decoding the whole sequence.

    Args:
        tokenizer: the :class:`Tokenizer`.
        skip_special: drop special tokens from the text.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tok = tokenizer._tok
        self._skip = skip_special
        self.tokens: list[int] = []
        self._prefix = 0  # ids[prefix:read] were decoded and emitted
        self._read = 0
        self._chunks: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def add(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' if none yet)."""
        self.tokens.append(int(token_id))
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        new_text = self._decode(self.tokens[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        out = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.tokens)
        self._chunks.append(out)
        return out

    def flush(self) -> str:
        """At the end of generation: return what is held back (maybe U+FFFD)."""
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        new_text = self._decode(self.tokens[self._prefix:])
        out = new_text[len(prefix_text):]
        self._prefix = self._read = len(self.tokens)
        if out:
            self._chunks.append(out)
        return out

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)


# ---- stop strings ----

class StopChecker:
    """Cut generated text before the first stop string to complete, which may span pieces.

    Text that could be the start of a stop string is held back until it is
    known not to be one.

    Args:
        stops: the stop strings (non-empty).

    Example:
        >>> sc = StopChecker(["\\nUser:"])
        >>> sc.feed("Hi!\\nUs")
        ('Hi!', False)
        >>> sc.feed("er: more")
        ('', True)
    """

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = [stops]
        if not all(isinstance(s, str) and s for s in stops):
            raise InputError(f"stop strings must be non-empty strings, got {list(stops)!r}")
        self.stops = list(dict.fromkeys(stops))
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string found

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text.

        Returns:
            (text safe to show now, whether a stop string was found). After a
            stop, further calls return ('', True).
        """
        if self.stopped:
            return "", True
        buf = self._held + text
        # The stop string that completes first, as if the text came one character at a
        # time (generation ends there, so a longer one that would end later never can);
        # of two ending at the same place, the one that starts first.
        cut, end = -1, -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or (i + len(s), i) < (end, cut)):
                cut, end, self.matched = i, i + len(s), s
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:  # longest suffix of buf that starts some stop string
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if s.startswith(buf[-k:]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """Generation ended without a stop: return the held-back tail."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

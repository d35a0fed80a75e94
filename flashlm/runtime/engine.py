"""The engine: prompt ids in, tokens streamed out, for one sequence or a batch.

The Model, the Tokenizer and the Sampler meet only here. Each sequence has its own
KV cache, sampler (own seeded generator), logits processors, streaming detokenizer
and stop-string checker. Prompts are prefilled together in steps of at most
``prefill_rows`` rows (several prompts share a step; a long prompt takes several),
then decoded together: one ``forward_batch`` step runs the linear layers once over
a row per live sequence, so each step reads the weights once for all of them (when
weights stream from disk, a step costs one pass over the streamed bytes).

Example:
    >>> engine = Engine(model, tokenizer)
    >>> for ev in engine.generate([ids], SamplingParams.greedy(max_tokens=32)):
    ...     print(ev.text, end="")
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import psutil

from flashlm.errors import InputError
from flashlm.runtime.draft import lookup
from flashlm.runtime.sampler import SamplingParams, verify_draft
from flashlm.runtime.tokenizer import StopChecker, Tokenizer


@dataclass
class Stats:
    """Timings of one generate() call (all sequences together)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    decode_steps: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of which the model agreed with
    peak_rss: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second after the first (which prefill produces)."""
        n = self.generated_tokens - 1 if self.generated_tokens else 0
        return n / self.decode_s if self.decode_s and n > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens (after the first) per decode step: > 1 when drafts are accepted
        or several sequences decode together."""
        n = self.generated_tokens - (self.generated_tokens > 0)
        return n / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "prefill_tok_s": round(self.prefill_tok_s, 2),
            "decode_s": round(self.decode_s, 4),
            "decode_tok_s": round(self.decode_tok_s, 2),
            "ttft_s": round(self.ttft_s, 4),
            "decode_steps": self.decode_steps,
            "tokens_per_step": round(self.tokens_per_step, 3),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "peak_rss_bytes": self.peak_rss,
        }


@dataclass
class Event:
    """One generated token of sequence ``seq``; ``text`` is the new printable text."""

    seq: int
    token: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS / stop string) or "length"


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    params: SamplingParams
    cache: object
    sampler: object
    processors: list
    detok: object
    stops: StopChecker
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def _peak_rss() -> int:
    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", 0) or _linux_hwm() or info.rss)


def _linux_hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Engine:
    """Generation over a Model and a Tokenizer.

    Args:
        model: a flashlm model (forward, forward_batch, make_cache, config).
        tokenizer: the runtime Tokenizer (stop tokens, detokenizer).
        ctx: positions per sequence (prompt + generated); the KV cache size.
        prefill_rows: most prompt tokens per prefill step (all prompts together).
        draft_max: draft tokens (prompt lookup, ``runtime.draft``) verified per decode step
            and sequence; 0 = off. Greedy output is the same either way; sampled output
            keeps the model's distribution (``sampler.verify_draft``).
    """

    def __init__(self, model, tokenizer: Tokenizer, *, ctx: int = 4096, prefill_rows: int = 512, draft_max: int = 0):
        if ctx < 2:
            raise InputError(f"--ctx {ctx} is too small: use at least 2")
        if prefill_rows < 1:
            raise InputError(f"prefill_rows {prefill_rows} is invalid: use 1 or more")
        self.model, self.tokenizer, self.ctx = model, tokenizer, int(ctx)
        self.prefill_rows = int(prefill_rows)
        if draft_max < 0:
            raise InputError(f"--draft-max {draft_max} is invalid: use 0 or more")
        self.draft_max = int(draft_max)
        self.stats = Stats()
        self.on_decode = None  # called when the first decode step starts (offload statistics)
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop the running generate() after the current step (thread-safe)."""
        self._cancel.set()

    def _check_prompt(self, ids: Sequence[int], i: int) -> list[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise InputError("the prompt is empty: give some text to continue")
        if len(ids) >= self.ctx:
            raise InputError(
                f"the prompt{'' if i == 0 else f' {i}'} is {len(ids)} tokens, which does not fit the context "
                f"of {self.ctx} with room to generate; raise --ctx (the model allows "
                f"{self.model.config.max_position_embeddings}) or shorten the prompt"
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[Event]:
        """Generate for each prompt (token ids); yield an Event per new token as it comes.

        Args:
            prompts: one list of token ids per sequence (different lengths are fine).
            params: one SamplingParams for all, or one per prompt. Default: greedy.
        Yields:
            Event(seq, token, text, finished, finish_reason). The last event of a
            sequence has finished=True (its text is any held-back tail).
        """
        if params is None:
            params = SamplingParams.greedy()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(plist)} sampling parameter sets")
        checked = [self._check_prompt(p, i) for i, p in enumerate(prompts)]
        self._cancel.clear()
        self.stats = st = Stats(prompt_tokens=sum(len(p) for p in checked))
        seqs = [
            _Seq(i, ids, p, self.model.make_cache(self.ctx), p.make_sampler(), p.make_logits_processors(),
                 self.tokenizer.detokenizer(), StopChecker(p.stop))
            for i, (ids, p) in enumerate(zip(checked, plist))
        ]
        stop_ids = set(self.tokenizer.stop_token_ids)
        t0 = time.perf_counter()
        logits = self._prefill(seqs)
        st.prefill_s = time.perf_counter() - t0
        st.ttft_s = st.prefill_s
        if self.on_decode is not None:
            self.on_decode()
        t1 = time.perf_counter()
        live = seqs[: len(logits)]
        for sq, lg in zip(live, logits):  # the first token of each, from its prompt's logits
            yield from self._emit(sq, self._sample(sq, lg), stop_ids)
        live = [sq for sq in live if not sq.done]
        while live and not self._cancel.is_set():
            # one pass over the weights: each sequence's pending token, plus the draft tokens
            # prompt lookup proposes after it
            drafts = [self._draft(sq) for sq in live]
            feeds = [(np.asarray([sq.tokens[-1]] + d, np.int64), None, sq.cache) for sq, d in zip(live, drafts)]
            out = self.model.forward_batch(feeds, all_logits=any(drafts))
            st.decode_steps += 1
            row = 0
            for sq, d in zip(live, drafts):
                rows = out[row:row + len(d) + 1] if any(drafts) else out[row:row + 1]
                row += len(rows)
                st.drafted += len(d)
                for j, lg in enumerate(rows):
                    if j < len(d):
                        tok, ok = verify_draft(sq.sampler, self._process(sq, lg), d[j])
                    else:
                        tok, ok = self._sample(sq, lg), False
                    yield from self._emit(sq, tok, stop_ids)
                    if sq.done or not ok:
                        break
                    st.accepted += 1
                # positions of the rejected drafts (never part of the text) leave the cache
                sq.cache.trim(len(d) - j)
            live = [sq for sq in live if not sq.done]
        for s in seqs:  # cancelled or never started: close them
            if not s.done:
                s.done = True
                yield Event(s.index, None, s.stops.feed(s.detok.flush())[0] + s.stops.flush(), True, "cancelled")
        st.decode_s = time.perf_counter() - t1
        st.peak_rss = _peak_rss()

    def _prefill(self, seqs: list[_Seq]) -> list[np.ndarray]:
        """Feed every prompt in steps of at most ``prefill_rows`` rows; the logits of each
        prompt's last token, for the prompts finished before a cancel."""
        logits: dict[int, np.ndarray] = {}
        fed = [0] * len(seqs)
        todo = list(range(len(seqs)))
        while todo and not self._cancel.is_set():
            step, rows = [], 0
            for j in todo:
                take = min(len(seqs[j].prompt) - fed[j], self.prefill_rows - rows)
                if take <= 0:
                    break
                step.append((j, take))
                rows += take
            out = self.model.forward_batch(
                [(np.asarray(seqs[j].prompt[fed[j]:fed[j] + n], np.int64), None, seqs[j].cache) for j, n in step])
            for (j, n), lg in zip(step, out):
                fed[j] += n
                if fed[j] == len(seqs[j].prompt):
                    logits[j] = lg
            todo = [j for j in todo if j not in logits]
        out_list = []
        for j in range(len(seqs)):  # in order, up to the first unfinished prompt
            if j not in logits:
                break
            out_list.append(logits[j])
        return out_list

    def _process(self, s: _Seq, logits: np.ndarray) -> np.ndarray:
        history = s.prompt + s.tokens
        for proc in s.processors:
            logits = proc(history, logits)
        return logits

    def _sample(self, s: _Seq, logits: np.ndarray) -> int:
        return int(s.sampler(self._process(s, logits)))

    def _draft(self, s: _Seq) -> list[int]:
        """Draft tokens for ``s`` (prompt lookup), within its max_tokens and its cache."""
        if not self.draft_max:
            return []
        k = min(self.draft_max, s.cache.room - 1)
        if s.params.max_tokens is not None:
            k = min(k, s.params.max_tokens - len(s.tokens) - 1)
        return lookup(s.prompt + s.tokens, k) if k > 0 else []

    def _emit(self, s: _Seq, tok: int, stop_ids: set[int]) -> Iterator[Event]:
        self.stats.generated_tokens += 1
        if tok in stop_ids:
            s.done = True
            tail = s.stops.feed(s.detok.flush())[0] + s.stops.flush()
            yield Event(s.index, tok, tail, True, "stop")
            return
        s.tokens.append(tok)
        text, stopped = s.stops.feed(s.detok.add(tok))
        if stopped:
            s.done = True
            yield Event(s.index, tok, text, True, "stop")
            return
        limit = s.params.max_tokens
        # no room to feed this token back (the cache may hold draft positions beyond it now)
        if (limit is not None and len(s.tokens) >= limit) or len(s.prompt) + len(s.tokens) - 1 >= s.cache.max_ctx:
            s.done = True
            tail = s.stops.feed(s.detok.flush())[0] + s.stops.flush()
            yield Event(s.index, tok, text + tail, True, "length")
            return
        yield Event(s.index, tok, text)

"""The engine: prompt ids in, tokens streamed out, for one sequence or a batch.

The Model, the Tokenizer and the Sampler meet only here. Each sequence (:class:`Seq`)
has its own KV cache, sampler (own seeded generator), logits processors, streaming
detokenizer and stop-string checker.

Everything runs in steps (:meth:`Engine.step`) over a set of live sequences: one
``forward_batch`` call runs the linear layers once over the rows of all of them, so a
step reads the weights once for all (when weights stream from disk, a step costs one
pass over the streamed bytes). A decoding sequence feeds its pending token and the
draft tokens prompt lookup proposes; a prefilling one feeds the next chunk of its
prompt (at most ``prefill_rows`` prompt rows a step, all prompts together). Sequences
join (:meth:`Engine.add`) and leave between steps, which is how a server batches
requests continuously (:mod:`flashlm.runtime.scheduler`); :meth:`Engine.generate`
is the loop for a fixed set of prompts: prefill them all, then decode them together.

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
from flashlm.runtime.kvcache import check_kv
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
class Seq:
    """One sequence in the engine: its prompt, sampling, KV cache and what it generated.

    Made by :meth:`Engine.add`; advanced by :meth:`Engine.step` (prompt chunks first, then a
    token, plus draft tokens, per step) until ``done``.
    """

    index: int
    prompt: list[int]
    params: SamplingParams
    cache: object
    sampler: object
    processors: list
    detok: object
    stops: StopChecker
    tokens: list[int] = field(default_factory=list)
    fed: int = 0  # prompt tokens in the cache so far
    done: bool = False
    finish_reason: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)


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
        kv: the KV caches' element type, "f32" or "f16" (``runtime.kvcache``).
    """

    def __init__(self, model, tokenizer: Tokenizer, *, ctx: int = 4096, prefill_rows: int = 512, draft_max: int = 0,
                 kv: str = "f32"):
        if ctx < 2:
            raise InputError(f"--ctx {ctx} is too small: use at least 2")
        if prefill_rows < 1:
            raise InputError(f"prefill_rows {prefill_rows} is invalid: use 1 or more")
        self.model, self.tokenizer, self.ctx = model, tokenizer, int(ctx)
        self.prefill_rows = int(prefill_rows)
        if draft_max < 0:
            raise InputError(f"--draft-max {draft_max} is invalid: use 0 or more")
        self.draft_max = int(draft_max)
        self.kv = check_kv(kv)
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

    # ---- sequences and steps ----

    def add(self, ids: Sequence[int], params: SamplingParams | None = None, *, index: int = 0,
            cache=None) -> Seq:
        """A new sequence for prompt ``ids`` (checked against the context and vocabulary),
        ready for :meth:`step`. ``cache``: a KV cache to reuse (emptied), else a new one."""
        ids = self._check_prompt(ids, index)
        params = SamplingParams.greedy() if params is None else params
        if cache is None:
            cache = self.model.make_cache(self.ctx, kv=self.kv)
        else:
            cache.reset()
        return Seq(index, ids, params, cache, params.make_sampler(), params.make_logits_processors(),
                         self.tokenizer.detokenizer(), StopChecker(params.stop))

    def step(self, seqs: Sequence[Seq], *, mix: bool = True, max_rows: int = 0) -> list[Event]:
        """One pass over the weights for ``seqs``: each decoding sequence feeds its pending
        token and the draft tokens prompt lookup proposes after it; prefilling sequences feed
        the next chunks of their prompts, in order, in the rows left. A sequence whose prompt
        ends in this step gets its first token.

        Args:
            seqs: the live sequences (done ones are skipped). Sequences may join (from
                :meth:`add`) or leave between steps.
            mix: prompt chunks share the step with decode rows; False = while any sequence
                is prefilling, the step feeds prompts only (what :meth:`generate` does).
            max_rows: most rows in a step; the prompt chunks get what the decode rows leave
                of ``max(prefill_rows, max_rows)``.
        Returns:
            The step's events (a sequence's last one has finished=True).
        Raises:
            whatever the model raises (e.g. OffloadError for a failed read): no sequence
            advanced, their caches hold nothing new.
        """
        live = [s for s in seqs if not s.done]
        filling = [s for s in live if s.prefilling]
        decoding = [s for s in live if not s.prefilling] if (mix or not filling) else []
        work = []  # (sequence, rows fed, logit rows wanted, draft or None for a prompt chunk)
        rows = 0
        for s in decoding:
            d = self._draft(s)
            work.append((s, [s.tokens[-1]] + d, len(d) + 1, d))
            rows += len(d) + 1
        room = max(self.prefill_rows, max_rows) - rows
        for s in filling:
            take = min(len(s.prompt) - s.fed, room)
            if take <= 0:
                break
            work.append((s, s.prompt[s.fed:s.fed + take], int(s.fed + take == len(s.prompt)), None))
            room -= take
        if not work:
            return []
        out, at = self._forward(work)
        st = self.stats
        st.decode_steps += bool(decoding)
        stop_ids = self.tokenizer.stop_token_ids
        events: list[Event] = []
        for (s, fed, n, d), row in zip(work, at):
            if d is None:  # a prompt chunk; its last row's logits give the first token
                s.fed += len(fed)
                if n:
                    events.append(self._emit(s, self._sample(s, out[row]), stop_ids))
                continue
            st.drafted += len(d)
            for j in range(n):
                lg = out[row + j]
                if j < len(d):
                    tok, ok = verify_draft(s.sampler, self._process(s, lg), d[j])
                else:
                    tok, ok = self._sample(s, lg), False
                events.append(self._emit(s, tok, stop_ids))
                if s.done or not ok:
                    break
                st.accepted += 1
            # positions of the rejected drafts (never part of the text) leave the cache
            s.cache.trim(len(d) - j)
        return events

    def _forward(self, work: list) -> tuple[np.ndarray, list[int]]:
        """Run one step; (logits, index of each work item's first logit row)."""
        feeds = [(np.asarray(toks, np.int64), None, s.cache) for s, toks, _, _ in work]
        want = [n for _, _, n, _ in work]
        if all(n <= 1 for n in want):  # the last row of each (those of unfinished prompt chunks unused)
            return self.model.forward_batch(feeds), list(range(len(work)))
        at = np.cumsum([0] + want[:-1]).tolist()
        if all(n == len(toks) for _, toks, n, _ in work):  # decode rows with drafts, every row
            return self.model.forward_batch(feeds, all_logits=True), at
        return self.model.forward_batch(feeds, last=want), at

    def finish(self, s: Seq, reason: str = "cancelled") -> Event:
        """End ``s`` before its time (cancelled); the event carries any held-back text."""
        s.done, s.finish_reason = True, reason
        return Event(s.index, None, s.stops.feed(s.detok.flush())[0] + s.stops.flush(), True, reason)

    # ---- a fixed batch ----

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[Event]:
        """Generate for each prompt (token ids); yield an Event per new token as it comes.

        A thin loop over :meth:`step`: all prompts are prefilled together (in steps of at
        most ``prefill_rows`` rows), then decoded together.

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
        seqs = [self.add(ids, p, index=i) for i, (ids, p) in enumerate(zip(checked, plist))]
        t0 = t1 = time.perf_counter()
        prefilled = False
        live = seqs
        while live and not self._cancel.is_set():
            events = self.step(live, mix=False)
            if not prefilled and not any(s.prefilling for s in seqs):
                prefilled = True
                st.prefill_s = st.ttft_s = time.perf_counter() - t0
                if self.on_decode is not None:
                    self.on_decode()
                t1 = time.perf_counter()
            yield from events
            live = [s for s in live if not s.done]
        if not prefilled:
            st.prefill_s = st.ttft_s = time.perf_counter() - t0
            t1 = time.perf_counter()
        for s in seqs:  # cancelled or never started: close them
            if not s.done:
                yield self.finish(s)
        st.decode_s = time.perf_counter() - t1
        st.peak_rss = _peak_rss()

    # ---- per sequence ----

    def _process(self, s: Seq, logits: np.ndarray) -> np.ndarray:
        history = s.prompt + s.tokens
        for proc in s.processors:
            logits = proc(history, logits)
        return logits

    def _sample(self, s: Seq, logits: np.ndarray) -> int:
        return int(s.sampler(self._process(s, logits)))

    def _draft(self, s: Seq) -> list[int]:
        """Draft tokens for ``s`` (prompt lookup), within its max_tokens and its cache."""
        if not self.draft_max:
            return []
        k = min(self.draft_max, s.cache.room - 1)
        if s.params.max_tokens is not None:
            k = min(k, s.params.max_tokens - len(s.tokens) - 1)
        return lookup(s.prompt + s.tokens, k) if k > 0 else []

    def _emit(self, s: Seq, tok: int, stop_ids: set[int]) -> Event:
        self.stats.generated_tokens += 1
        if tok in stop_ids:
            s.done, s.finish_reason = True, "stop"
            tail = s.stops.feed(s.detok.flush())[0] + s.stops.flush()
            return Event(s.index, tok, tail, True, "stop")
        s.tokens.append(tok)
        text, stopped = s.stops.feed(s.detok.add(tok))
        if stopped:
            s.done, s.finish_reason = True, "stop"
            return Event(s.index, tok, text, True, "stop")
        limit = s.params.max_tokens
        # no room to feed this token back (the cache may hold draft positions beyond it now)
        if (limit is not None and len(s.tokens) >= limit) or len(s.prompt) + len(s.tokens) - 1 >= s.cache.max_ctx:
            s.done, s.finish_reason = True, "length"
            tail = s.stops.feed(s.detok.flush())[0] + s.stops.flush()
            return Event(s.index, tok, text + tail, True, "length")
        return Event(s.index, tok, text)

"""The public Python surface: ``load()`` and the LLM object it returns.

Example:
    >>> import flashlm
    >>> llm = flashlm.load("qwen2.5-coder-0.5b")
    >>> print(llm.generate("Write a prime check in Python", max_tokens=64, temperature=0))
    >>> for piece in llm.stream([{"role": "user", "content": "hi"}]):
    ...     print(piece, end="", flush=True)
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Iterator, Sequence

from flashlm.errors import InputError
from flashlm.models import build_model
from flashlm.models.registry import resolve
from flashlm.offload.budget import (DEFAULT_PREFILL, Layout, RamSpec, make_plan, measure_baseline, parse_ram, parse_size,
                                    process_rss, resolve_budget)
from flashlm.offload.store import Store
from flashlm.runtime.engine import Engine, Event, Stats
from flashlm.runtime.kvcache import DEFAULT_KV, check_kv
from flashlm.runtime.sampler import SamplingParams
from flashlm.runtime.tokenizer import Tokenizer

Prompt = str | Sequence[dict]


def open_tokenizer(store: Store) -> Tokenizer:
    """The runtime Tokenizer of a store: tokenizer.json, chat template, special tokens."""
    return Tokenizer.from_files(store.tokenizer_path, chat_template=store.chat_template, special=store.tokenizer_info)


COMPILE_NOTICE = ("flashlm: compiling kernels (the first run after an install only; then cached for every "
                  "later run)...")
COMPILE_FORMATS = "flashlm: compiling kernels for {} (first run only; then cached)..."


def _missing_kernels(store) -> list[str]:
    """The store's matmul formats whose kernels Numba's cache does not hold yet."""
    from flashlm.kernels import executor, matmul

    return executor.missing_formats(sorted({matmul.task_key(t["format"]) for t in store.tensor_info.values()
                                            if len(t["shape"]) == 2}))


@contextlib.contextmanager
def _say_if_slow(enabled: bool, message: str, after_s: float = 2.0):
    """Print ``message`` on stderr if the block is still running after ``after_s`` seconds
    (Numba compiles while holding the GIL, but a timer thread still gets its turn)."""
    if not enabled:
        yield
        return
    timer = threading.Timer(after_s, lambda: print(message, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def default_threads() -> int:
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


class LLM:
    """A loaded model: tokenizer, config, plan, weights, model and engine.

    Use :func:`load` to make one. ``llm.plan`` says where the weights live (all in RAM,
    or which stream from disk); ``llm.weights`` is the Store or the StreamingWeights.
    """

    def __init__(self, store: Store, *, threads: int | None = None, ctx: int | None = None, backend: str = "auto",
                 ram: int | str | RamSpec | None = None, batch: int = 1, draft: str = "auto", draft_max: int = 8,
                 read_mode: str | None = None, readers: int = 2, stream: bool = False,
                 prefill_rows: int | None = None, progress: bool = False, kv: str = DEFAULT_KV,
                 exact: bool = False):
        from flashlm.runtime.backend import get_backend

        self.store = store
        self.config = store.config
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise InputError(f"--threads {threads} is invalid: use 1 or more")
        check_ctx(ctx, self.config)
        check_draft(draft, draft_max)
        self.kv = check_kv(kv)
        self.exact = True  # the numpy backend multiplies in float32
        spec = parse_ram(ram)
        self.pool = None
        self.weights = None
        try:
            self.tokenizer = open_tokenizer(store)
            self.backend = get_backend(backend)  # "auto" never falls back to numpy silently
            if hasattr(self.backend, "warm_up"):  # the kernels
                from flashlm.kernels import matmul

                matmul.set_exact(exact)  # process-wide: the kernels every product runs from now on
                self.exact = matmul.is_exact()
            if hasattr(self.backend, "warm_up"):
                notice = COMPILE_NOTICE
                if progress:
                    missing = _missing_kernels(store)
                    if missing:  # a first run compiles them: say so now, and for which formats
                        print(COMPILE_FORMATS.format(", ".join(missing)), file=sys.stderr, flush=True)
                        notice = None
                room = max(0, resolve_budget(spec) - process_rss())  # for compile workers
                with _say_if_slow(progress and notice is not None, notice or ""):
                    self.backend.warm_up(store, self.config, room=room, kv=self.kv)  # in memory before the baseline
            baseline = measure_baseline()
            budget = resolve_budget(spec, rss=baseline)
            layout = Layout.of(store)
            self.plan = make_plan(layout, self.config, budget=budget, baseline=baseline, ctx=ctx,
                                  batch=batch, draft=draft_max if draft != "none" else 0, force_stream=stream,
                                  prefill_rows=prefill_rows or DEFAULT_PREFILL, kv=self.kv)
            if threads is None and self.plan.streams and \
                    4 * self.plan.streamed_bytes_per_token >= sum(layout.layer_bytes) + layout.head_bytes:
                # The disk sets the pace: a second compute thread only adds GIL hand-offs that delay
                # the readers (1.5B at --ram 318M: 0.74 vs 0.57 and 0.51 vs 0.47 tok/s, 1 vs 2 threads).
                self.threads = 1
            if self.threads > 1:
                from flashlm.runtime.threadpool import ThreadPool

                self.pool = ThreadPool(self.threads)
                self.backend.pool = self.pool
            if self.plan.streams:
                from flashlm.offload.streaming import StreamingWeights

                self.weights = StreamingWeights(store, self.plan, mode=read_mode, readers=readers)
                if self.pool is not None:  # idle compute threads must not spin while the readers work
                    self.weights.on_wait = self.pool.park
            else:
                self.weights = store
            self.model = build_model(self.config, self.weights, self.backend)
            # prompt lookup pays where a pass over the weights is what a token costs: when they stream
            self.draft = "ngram" if draft == "ngram" or (draft == "auto" and self.plan.streams) else "none"
            self.engine = Engine(self.model, self.tokenizer, ctx=self.plan.ctx, prefill_rows=self.plan.prefill_rows,
                                 draft_max=draft_max if self.draft == "ngram" else 0, kv=self.kv)
        except BaseException:
            self.close()
            raise

    @property
    def streams(self) -> bool:
        """True when some weights stream from disk (the model does not fit the RAM budget)."""
        return self.plan.streams

    def _reads(self) -> tuple[int, float, float]:
        return self.weights.reads()

    def events(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[Event]:
        """``engine.generate`` for token-id prompts, with the reads of a streaming run counted
        for this call (:meth:`offload_stats`)."""
        if not self.plan.streams:
            yield from self.engine.generate(prompt_ids, params)
            return
        self._mark = [self._reads(), None, None]

        def on_decode() -> None:
            self._mark[1] = self._reads()

        self.engine.on_decode = on_decode
        try:
            yield from self.engine.generate(prompt_ids, params)
        finally:
            self.engine.on_decode = None
            self._mark[2] = self._reads()

    def offload_stats(self) -> dict:
        """Reads of the last call of a streaming run: bytes read, read GB/s, I/O wait, overlap
        (share of read time hidden under compute), streamed bytes per generated token,
        resident bytes and the plan; {} when nothing streams."""
        if not self.plan.streams:
            return {}
        start, dec, end = getattr(self, "_mark", [None, None, None])
        now = self._reads()
        start, end = start or now, end or now
        nbytes, read_s, wait_s = (e - s for s, e in zip(start, end))
        st = self.engine.stats
        decode_tokens = max(0, st.generated_tokens - 1)
        per_token = (end[0] - dec[0]) / decode_tokens if dec and decode_tokens else 0
        return {"bytes_read": int(nbytes), "read_s": round(read_s, 4),
                "read_GB_s": round(nbytes / read_s / 1e9, 3) if read_s else 0.0, "io_wait_s": round(wait_s, 4),
                "overlap": round(max(0.0, 1 - wait_s / read_s), 3) if read_s else 0.0,
                "streamed_bytes_per_token": int(per_token), "resident_bytes": self.weights.plan.resident_bytes,
                "read_mode": self.weights.mode, "notices": list(self.weights.notices),
                **({k: v for k, v in self.weights.stats().items() if k.startswith("expert")}
                   if self.weights.experts_cache is not None else {}),
                "plan": self.weights.plan.as_dict()}

    def stats_dict(self) -> dict:
        """The last call's statistics (:attr:`stats`) with the offload figures when weights stream."""
        d = self.stats.as_dict()
        d["draft"] = self.draft
        if self.plan.streams:
            d["offload"] = self.offload_stats()
        return d

    @property
    def stats(self) -> Stats:
        """Timings of the last generate()/stream() call."""
        return self.engine.stats

    def prompt_ids(self, prompt: Prompt, *, raw: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a prompt: a string (through the chat template unless raw) or messages."""
        if isinstance(prompt, str):
            if raw or not self.tokenizer.chat_template:
                return self.tokenizer.encode(prompt, add_special=True)
            messages: list[dict] = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt})
        else:
            messages = list(prompt)
            if system:
                messages.insert(0, {"role": "system", "content": system})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special=False)

    def stream(self, prompt: Prompt, *, raw: bool = False, system: str | None = None, **sampling: Any) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens come.

        Args:
            prompt: a string, or a list of {role, content} messages.
            raw: do not apply the chat template to a string prompt.
            system: a system message to put first.
            **sampling: SamplingParams fields (temperature, top_k, top_p, min_p,
                repeat_penalty, presence_penalty, frequency_penalty, seed, max_tokens, stop).
        """
        params = SamplingParams(**sampling)
        ids = self.prompt_ids(prompt, raw=raw, system=system)
        for ev in self.events([ids], params):
            if ev.text:
                yield ev.text

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        """The whole answer as one string (see :meth:`stream` for the arguments)."""
        return "".join(self.stream(prompt, **kwargs))

    def generate_batch(self, prompts: Sequence[Prompt], *, raw: bool = False, **sampling: Any) -> list[str]:
        """Answers for several prompts, decoded together in one batch."""
        params = SamplingParams(**sampling)
        ids = [self.prompt_ids(p, raw=raw) for p in prompts]
        out = [""] * len(ids)
        for ev in self.events(ids, params):
            out[ev.seq] += ev.text
        return out

    def close(self) -> None:
        if self.weights is not None and self.weights is not self.store and hasattr(self.weights, "close"):
            self.weights.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_draft(draft: str, draft_max: int) -> None:
    if draft not in ("auto", "ngram", "none"):
        raise InputError(f"--draft {draft!r} is invalid: use ngram, none or auto")
    if isinstance(draft_max, bool) or not isinstance(draft_max, int) or not 0 <= draft_max <= 32:
        raise InputError(f"--draft-max {draft_max!r} is invalid: use an integer from 0 to 32")


def check_ctx(ctx: int | None, config) -> None:
    """InputError for a --ctx that is not a positive integer or exceeds what the model allows."""
    if ctx is None:
        return
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise InputError(f"--ctx {ctx!r} is invalid: use an integer >= 2")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and ctx > limit:
        raise InputError(f"--ctx {ctx} is more than this model's context length ({limit}): use at most {limit}")


def load(model: str | os.PathLike, *, threads: int | None = None, ram: int | str | None = None, ctx: int | None = None,
         backend: str = "auto", progress: bool = False, batch: int = 1, draft: str = "auto", draft_max: int = 8,
         read_mode: str | None = None, readers: int = 2, stream: bool = False,
         prefill_rows: int | None = None, kv: str = DEFAULT_KV, exact: bool = False) -> LLM:
    """Load a model for generation, planned into a RAM budget.

    Args:
        model: a known name (pulled on first use), a store directory, a .gguf file or an HF directory.
        threads: compute threads (default: physical cores).
        ram: RAM budget of the whole process: bytes, "560M"/"4G", "60%" of the machine, or
            "auto"/None (what is available now, less a margin). A model that does not fit
            streams its layers from disk (``llm.plan`` says how).
        ctx: context length (prompt + generated tokens) per sequence; default 4096, lowered
            to fit a tight budget when not given.
        backend: "auto" (Numba kernels), "kernels" or "numpy" (plain-numpy reference).
        progress: show progress bars when a model is pulled or imported, and a line on stderr
            while the kernels compile (the first run after an install).
        batch: sequences decoded together (the plan reserves their KV caches).
        draft: "ngram" (prompt lookup: verify up to ``draft_max`` tokens copied from the context
            per pass over the weights), "none", or "auto" (ngram when weights stream). Greedy
            output is the same either way.
        draft_max: most draft tokens per step.
        read_mode: "direct" (O_DIRECT), "buffered" or "mmap" for streamed reads; default the best available.
        readers: reader threads for streamed weights.
        stream: plan streaming even when the model fits (benchmarks, tests).
        prefill_rows: rows per prefill step (default 512, lowered to fit a tight budget).
        kv: the KV cache's element type: "f16" (half the memory of "f32"; the default) or "f32".
        exact: multiply with float32 activations everywhere (the reference path) instead of the
            integer path (int8 activations for the formats that have it: faster, perplexity within
            a few tenths of a percent). Process-wide: it applies to every model of the process.
    Returns:
        An :class:`LLM` with generate(), stream(), tokenizer, config, plan.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"--threads {threads!r} is invalid: use an integer >= 1")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2):
        raise InputError(f"--ctx {ctx!r} is invalid: use an integer >= 2")
    spec = parse_ram(ram)  # checked before a model is pulled
    check_draft(draft, draft_max)
    check_kv(kv)
    store = Store(resolve(model, progress=progress))
    return LLM(store, threads=threads, ctx=ctx, backend=backend, ram=spec, batch=batch, draft=draft,
               draft_max=draft_max, read_mode=read_mode, readers=readers, stream=stream, prefill_rows=prefill_rows,
               progress=progress, kv=kv, exact=exact)

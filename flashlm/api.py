"""The public Python surface: ``load()`` and the LLM object it returns.

Example:
    >>> import flashlm
    >>> llm = flashlm.load("qwen2.5-coder-0.5b")
    >>> print(llm.generate("Write a prime check in Python", max_tokens=64, temperature=0))
    >>> for piece in llm.stream([{"role": "user", "content": "hi"}]):
    ...     print(piece, end="", flush=True)
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from flashlm.errors import InputError
from flashlm.models import build_model
from flashlm.models.registry import resolve
from flashlm.offload.store import Store
from flashlm.runtime.engine import Engine, Stats
from flashlm.runtime.sampler import SamplingParams
from flashlm.runtime.tokenizer import Tokenizer

Prompt = str | Sequence[dict]


def open_tokenizer(store: Store) -> Tokenizer:
    """The runtime Tokenizer of a store: tokenizer.json, chat template, special tokens."""
    return Tokenizer.from_files(store.tokenizer_path, chat_template=store.chat_template, special=store.tokenizer_info)


def default_threads() -> int:
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


class LLM:
    """A loaded model: tokenizer, config, model and engine.

    Use :func:`load` to make one.
    """

    def __init__(self, store: Store, *, threads: int | None = None, ctx: int = 4096, backend: str = "auto"):
        from flashlm.runtime.backend import get_backend

        self.store = store
        self.config = store.config
        self.tokenizer = open_tokenizer(store)
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise InputError(f"--threads {threads} is invalid: use 1 or more")
        self.pool = None
        if self.threads > 1:
            from flashlm.runtime.threadpool import ThreadPool

            self.pool = ThreadPool(self.threads)
        self.backend = get_backend(backend, pool=self.pool)
        self.model = build_model(store.config, store, self.backend)
        self.engine = Engine(self.model, self.tokenizer, ctx=ctx)

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
        for ev in self.engine.generate([ids], params):
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
        for ev in self.engine.generate(ids, params):
            out[ev.seq] += ev.text
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(model: str | os.PathLike, *, threads: int | None = None, ram: int | str | None = None, ctx: int = 4096,
         backend: str = "auto", progress: bool = False) -> LLM:
    """Load a model for generation.

    Args:
        model: a known name (pulled on first use), a store directory, a .gguf file or an HF directory.
        threads: compute threads (default: physical cores).
        ram: RAM budget in bytes or as "512M"/"4G". The whole model is memory-mapped for now;
            a budget below its size is refused until streaming offload lands.
        ctx: context length (prompt + generated tokens) per sequence.
        backend: "auto" (Numba kernels), "kernels" or "numpy" (plain-numpy reference).
        progress: show progress bars when a model is pulled or imported.
    Returns:
        An :class:`LLM` with generate(), stream(), tokenizer, config.
    """
    store = Store(resolve(model, progress=progress))
    if ram is not None:
        from flashlm.runtime.kvcache import KVCache

        budget = parse_size(ram)
        need = store.nbytes + KVCache.bytes_for(store.config, ctx)
        if budget < need:
            from flashlm.errors import BudgetError

            raise BudgetError(
                f"--ram {ram}: this model needs {need / 2**20:.0f} MiB resident (weights + KV cache for ctx {ctx}); "
                "streaming offload under a smaller budget is not implemented yet: raise --ram or lower --ctx"
            )
    return LLM(store, threads=threads, ctx=ctx, backend=backend)


def parse_size(s: int | str) -> int:
    """'512M', '4G', '1.5GiB', or a byte count -> bytes."""
    if isinstance(s, int):
        return s
    t = str(s).strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise InputError(f"--ram {s!r} is not a size: use e.g. 512M or 4G") from None

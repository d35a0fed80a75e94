"""Perplexity over a text, with the definition the golden data uses.

Split the text's tokens (no BOS) into consecutive chunks of ``ctx`` tokens and drop
the remainder; in each chunk score tokens 1..ctx-1 given the tokens before them in
the same chunk; ppl = exp(mean negative log-likelihood).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flashlm.errors import InputError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    scored_tokens: int
    chunks: int
    ctx: int

    def as_dict(self) -> dict:
        return {"perplexity": self.ppl, "mean_nll": self.nll, "scored_tokens": self.scored_tokens,
                "chunks": self.chunks, "ctx": self.ctx}


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` (n,) under ``logits`` (n, vocab), in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(model, ids: list[int], *, ctx: int, chunks: int | None = None, on_chunk=None,
               kv: str = "f32") -> PerplexityResult:
    """Perplexity of token ids under ``model`` (see the module docstring).

    Args:
        model: a flashlm model (forward with all_logits, make_cache).
        ids: the text's token ids, no BOS.
        ctx: tokens per chunk.
        chunks: score only the first N chunks (default: all).
        on_chunk: called with (chunk index, running perplexity) after each chunk.
        kv: the KV cache's element type, "f32" or "f16".
    """
    if ctx < 2:
        raise InputError(f"--ctx {ctx} is too small for perplexity: use at least 2")
    n_chunks = len(ids) // ctx
    if chunks is not None:
        if chunks < 1:
            raise InputError(f"--chunks {chunks} is invalid: use 1 or more")
        n_chunks = min(n_chunks, chunks)
    if n_chunks == 0:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    total, count = 0.0, 0
    cache = model.make_cache(ctx, kv=kv)
    for c in range(n_chunks):
        chunk = np.asarray(ids[c * ctx : (c + 1) * ctx], dtype=np.int64)
        cache.reset()
        logits = model.forward(chunk, np.arange(ctx), cache, all_logits=True)  # (ctx, vocab)
        nll = chunk_nll(logits[:-1], chunk[1:])
        total += float(nll.sum())
        count += len(nll)
        if on_chunk:
            on_chunk(c, math.exp(total / count))
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, n_chunks, ctx)

"""Llama (and Mistral, SmolLM): pre-norm decoder, GQA attention with rope, SwiGLU MLP.

    x = embed(tokens)
    for each block:
        x += Wo . attention(rope(Wq . norm(x)), rope(Wk . norm(x)), Wv . norm(x))
        x += Wdown . (silu(Wgate . norm(x)) * (Wup . norm(x)))
    logits = Whead . norm(x[last])

Weights come by GGUF name from a weights source (``flashlm.models.weights``),
one layer at a time; arithmetic goes through a backend
(``flashlm.runtime.backend``); keys and values go to a KVCache per sequence.
"""
from __future__ import annotations

import numpy as np

from flashlm.models.base import Batch, attend, check_tokens, make_batch
from flashlm.models.config import ModelConfig
from flashlm.runtime.kvcache import KVCache


class Model:
    """A llama-family decoder.

    Args:
        config: the model's ModelConfig.
        weights: an object with ``tensor(name)``, ``has(name)``, ``layer(i)``.
        backend: a compute backend (NumpyBackend, KernelBackend).

    Example:
        >>> model = Model(config, weights, NumpyBackend())
        >>> cache = model.make_cache(2048)
        >>> logits = model.forward(ids, np.arange(len(ids)), cache)   # prefill
        >>> logits = model.forward([tok], [len(ids)], cache)          # one decode step
    """

    def __init__(self, config: ModelConfig, weights, backend) -> None:
        self.config, self.weights, self.backend = config, weights, backend

    def make_cache(self, max_ctx: int) -> KVCache:
        """An empty KV cache for one sequence of up to ``max_ctx`` positions."""
        return KVCache.for_config(self.config, max_ctx)

    # ---- blocks ----

    def attention(self, i: int, w: dict, h: np.ndarray, batch: Batch) -> np.ndarray:
        """Self-attention of block ``i`` on normed rows ``h`` (N, d) -> (N, d)."""
        c, be = self.config, self.backend
        n = h.shape[0]
        q, k, v = be.linear_many(h, [w["attn_q.weight"], w["attn_k.weight"], w["attn_v.weight"]],
                                 [w.get("attn_q.bias"), w.get("attn_k.bias"), w.get("attn_v.bias")])
        q = q.reshape(n, c.num_attention_heads, c.head_dim)
        k = k.reshape(n, c.num_key_value_heads, c.head_dim)
        v = v.reshape(n, c.num_key_value_heads, c.head_dim)
        be.rope(q, batch.positions, c.rope_theta, c.rope_layout, c.rope_scaling)
        be.rope(k, batch.positions, c.rope_theta, c.rope_layout, c.rope_scaling)
        o = attend(be, i, q, k, v, batch)  # (N, Hq, D)
        return be.linear(o.reshape(n, -1), w["attn_output.weight"])

    def mlp(self, w: dict, h: np.ndarray) -> np.ndarray:
        """SwiGLU feed-forward on normed rows ``h`` (N, d) -> (N, d)."""
        be = self.backend
        g, u = be.linear_many(h, [w["ffn_gate.weight"], w["ffn_up.weight"]])
        return be.linear(be.silu_mul(g, u), w["ffn_down.weight"])

    def block(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        """Decoder block ``i``: updates the residual stream ``x`` (N, d) in place."""
        eps, be = self.config.rms_norm_eps, self.backend
        w = self.weights.layer(i)  # asked every forward: a streaming source may swap buffers
        x += self.attention(i, w, be.rmsnorm(x, w["attn_norm.weight"], eps), batch)
        x += self.mlp(w, be.rmsnorm(x, w["ffn_norm.weight"], eps))
        return x

    # ---- forward ----

    def _run(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        c, be, wt = self.config, self.backend, self.weights
        check_tokens(batch.tokens, c.vocab_size)
        x = np.array(be.embed(wt.tensor("token_embd.weight"), batch.tokens), np.float32)  # (N, d)
        for i in range(c.num_hidden_layers):
            x = self.block(i, x, batch)
        h = be.rmsnorm(np.ascontiguousarray(x[rows]), wt.tensor("output_norm.weight"), c.rms_norm_eps)
        head = wt.tensor("output.weight") if wt.has("output.weight") else wt.tensor("token_embd.weight")
        logits = be.linear(h, head)  # only the rows asked for, not the whole prompt
        batch.finish()
        return logits

    def forward(self, tokens, positions, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run ``tokens`` (n,) at ``positions`` (n,) through the model, appending to ``cache``.

        Args:
            tokens: (n,) int token ids (a whole prompt, or one token to decode).
            positions: (n,) int rope positions, or None for cache.offset + arange(n).
            cache: this sequence's KV cache (advanced by n).
            all_logits: return the logits of every position, not only the last.

        Returns:
            (vocab,) float32 logits of the last position, or (n, vocab) with all_logits.
        """
        batch = make_batch([(tokens, positions, cache)])
        rows = np.arange(len(batch.tokens)) if all_logits else batch.last_rows
        logits = self._run(batch, rows)
        return logits if all_logits else logits[0]

    def forward_batch(self, seqs, *, all_logits: bool = False, last=None) -> np.ndarray:
        """One step for several sequences; the linear layers run once over all their rows.

        Args:
            seqs: list of (tokens (n_j,), positions (n_j,) or None, cache), one cache each.
            all_logits: the logits of every row (sequence after sequence), not only the last
                of each (draft verification).
            last: instead, the logits of the last ``last[j]`` rows of sequence j (0 = none;
                a step that mixes prompt chunks with decode rows and drafts).

        Returns:
            (B, vocab) float32 logits of the last position of each sequence, or (rows, vocab).
        """
        batch = make_batch(seqs)
        return self._run(batch, batch.logit_rows(all_logits, last))

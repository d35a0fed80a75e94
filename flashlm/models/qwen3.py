"""Qwen3: the llama decoder with an rmsnorm on every q and k head (before rope), no bias.

    x = embed(tokens)
    for each block:
        x += Wo . attention(rope(qnorm(Wq . norm(x))), rope(knorm(Wk . norm(x))), Wv . norm(x))
        x += Wdown . (silu(Wgate . norm(x)) * (Wup . norm(x)))
    logits = Whead . norm(x[last])

Weights come by GGUF name from a weights source (``flashlm.models.weights``),
one layer at a time; arithmetic goes through a backend
(``flashlm.runtime.backend``); keys and values go to a KVCache per sequence.
"""
from __future__ import annotations

import numpy as np

from flashlm.models import llama
from flashlm.models.base import Batch, Decoder, attend, program_vector


class Model(Decoder):
    """A Qwen3 decoder (per-head q/k rmsnorm, rope "neox").

    The forward driver (embed, the blocks, norm, head; forward and forward_batch) is
    :class:`flashlm.models.base.Decoder`; this class is the architecture's block.
    """

    # ---- blocks ----

    def attention(self, i: int, w: dict, h: np.ndarray, batch: Batch) -> np.ndarray:
        """Self-attention of block ``i`` on normed rows ``h`` (N, d) -> (N, d)."""
        c, be = self.config, self.backend
        n = h.shape[0]
        hq, hkv, d, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
        q, k, v = be.linear_many(h, [w["attn_q.weight"], w["attn_k.weight"], w["attn_v.weight"]])
        q = q.reshape(n * hq, d)
        k = k.reshape(n * hkv, d)
        v = v.reshape(n, hkv, d)
        q = be.rmsnorm(q, w["attn_q_norm.weight"], eps).reshape(n, hq, d)  # per head
        k = be.rmsnorm(k, w["attn_k_norm.weight"], eps).reshape(n, hkv, d)
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

    # the decode program: llama's block rows with the per-head q/k norms before rope
    program_block = llama.Model.program_block
    program_attention = llama.Model.program_attention
    program_mlp = llama.Model.program_mlp

    def program_qk(self, b, w: dict, buf) -> tuple[np.ndarray, np.ndarray]:
        """q and k normed per head (buf.qn, buf.kn), as ``attention`` does before rope."""
        c, be = self.config, self.backend
        b.norm(buf.q, program_vector(be, w["attn_q_norm.weight"]), buf.qn, c.rms_norm_eps, c.head_dim)
        b.norm(buf.k, program_vector(be, w["attn_k_norm.weight"]), buf.kn, c.rms_norm_eps, c.head_dim)
        return buf.qn, buf.kn

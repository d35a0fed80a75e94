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

from flashlm.models.base import Batch, Decoder, attend, program_matmul, program_rope, program_vector


class Model(Decoder):
    """A llama-family decoder.

    The forward driver (embed, the blocks, norm, head; forward and forward_batch) is
    :class:`flashlm.models.base.Decoder`; this class is the architecture's block.
    """

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

    def program_block(self, b, i: int, w: dict, buf, cache) -> None:
        """Block ``i``'s decode step as program rows (``Decoder._program``): ``block``'s operations."""
        self.program_attention(b, i, w, buf, cache)
        self.program_mlp(b, w, buf)

    def program_attention(self, b, i: int, w: dict, buf, cache) -> None:
        """x += attention(norm(x)), and h = ffn_norm(x), as program rows."""
        c, be = self.config, self.backend
        eps, d, hd = c.rms_norm_eps, c.hidden_size, c.head_dim
        hq, hkv = c.num_attention_heads, c.num_key_value_heads
        b.norm(buf.x, program_vector(be, w["attn_norm.weight"]), buf.h, eps, d)
        b.barrier()
        for name, out in (("attn_q", buf.q), ("attn_k", buf.k), ("attn_v", buf.v)):
            program_matmul(b, buf.h, w[name + ".weight"], out)
        b.barrier()
        for name, out in (("attn_q", buf.q), ("attn_k", buf.k), ("attn_v", buf.v)):
            if w.get(name + ".bias") is not None:
                b.add(out, program_vector(be, w[name + ".bias"]))
        q, k = self.program_qk(b, w, buf)
        program_rope(b, q, hq, c, cache.max_ctx)
        program_rope(b, k, hkv, c, cache.max_ctx)
        b.kv(k, buf.v, cache.k[i], cache.v[i])
        b.barrier()
        b.attention(q.reshape(1, hq, hd), cache.k[i], cache.v[i], buf.att.reshape(1, hq, hd))
        b.barrier()
        program_matmul(b, buf.att, w["attn_output.weight"], buf.o)
        b.barrier()
        b.add(buf.x, buf.o)
        b.norm(buf.x, program_vector(be, w["ffn_norm.weight"]), buf.h, eps, d)

    def program_mlp(self, b, w: dict, buf) -> None:
        """x += the SwiGLU MLP of h, as program rows."""
        b.barrier()
        program_matmul(b, buf.h, w["ffn_gate.weight"], buf.g)
        program_matmul(b, buf.h, w["ffn_up.weight"], buf.u)
        b.barrier()
        b.silu(buf.g, buf.u, buf.act)
        b.barrier()
        program_matmul(b, buf.act, w["ffn_down.weight"], buf.y)
        b.barrier()
        b.add(buf.x, buf.y)

    def program_qk(self, b, w: dict, buf) -> tuple[np.ndarray, np.ndarray]:
        """The q and k buffers rope rotates: llama's are the projections'."""
        return buf.q, buf.k

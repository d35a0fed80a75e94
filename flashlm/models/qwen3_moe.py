"""Qwen3-MoE: the Qwen3 decoder (q/k rmsnorm) with a sparse mixture-of-experts block.

    x = embed(tokens)
    for each block:
        x += Wo . attention(rope(qnorm(Wq . norm(x))), rope(knorm(Wk . norm(x))), Wv . norm(x))
        h = norm(x)
        p = softmax(Wrouter . h)                     over the E experts, float32
        top = the k largest p (ties: the lower expert id), renormalized if norm_topk_prob
        x += sum over e in top of p_e * Wdown_e . (silu(Wgate_e . h) * (Wup_e . h))
    logits = Whead . norm(x[last])

Layers in ``mlp_only_layers`` (or off ``decoder_sparse_step``) have a dense SwiGLU MLP.

The rows of a batch (a prompt, several sequences) are grouped by expert: each chosen
expert runs its gate/up/down once over the rows routed to it, and all chosen experts'
gate/up products of a layer go to the backend in one call, then all their downs
(``backend.linear_each``). One row (a decode step) goes through every chosen expert's
whole SwiGLU in one call (``backend.swiglu_each``: each expert one task of the pool). Routing, grouping and the weighted sum are the small pure
functions of ``flashlm.kernels.moe``. The layer's dense tensors come from ``weights.layer(i)``;
the experts from ``weights.experts(i, ids)``, asked once per MoE layer per forward
with the union of the experts every row chose (a streaming source reads each once).
"""
from __future__ import annotations

from functools import partial

import numpy as np

from flashlm.kernels.moe import combine, group, route
from flashlm.models import qwen3
from flashlm.models.base import Batch, program_experts, program_matmul


class Model(qwen3.Model):
    """A Qwen3-MoE decoder: Qwen3's attention (per-head q/k rmsnorm, rope "neox") and dense MLP
    (layers in ``mlp_only_layers``), and sparse MoE blocks. The forward driver is
    :class:`flashlm.models.base.Decoder`.
    """

    def moe(self, i: int, w: dict, h: np.ndarray) -> np.ndarray:
        """Sparse MoE block ``i`` on normed rows ``h`` (N, d) -> (N, d)."""
        c, be = self.config, self.backend
        n, d = h.shape
        k = c.num_experts_per_tok
        ids, wts = route(be.linear(h, w["ffn_gate_inp.weight"]), k, c.norm_topk_prob)  # (N, k) each
        # once per layer the union of the batch's experts (ascending); while the missing ones are
        # read, the next block's guessed experts are queued behind them
        predict = partial(self._predict, i + 1, h)
        if n == 1:  # a decode step: each chosen expert's whole SwiGLU, all in one call, in slot order
            slots = ids[0].tolist()
            ex = self.weights.experts(i, sorted(slots), on_submit=predict)
            y = np.empty((k, d), np.float32)
            be.swiglu_each(h, [ex[e]["ffn_gate.weight"] for e in slots], [ex[e]["ffn_up.weight"] for e in slots],
                           [ex[e]["ffn_down.weight"] for e in slots], y)
            return combine(y, np.arange(k), wts)
        order, experts, starts = group(ids)  # the N*k (row, slot) assignments, grouped by expert
        experts, starts = experts.tolist(), starts.tolist()
        ex = self.weights.experts(i, experts, on_submit=predict)
        segs = list(zip(starts[:-1], starts[1:]))  # expert experts[g] has grouped rows segs[g]
        xs = h[order // k]  # (N*k, d) the rows, grouped
        m, f = n * k, ex[experts[0]]["ffn_gate.weight"].shape[0]
        gate, up, y = np.empty((m, f), np.float32), np.empty((m, f), np.float32), np.empty((m, d), np.float32)
        mats, ins, outs = [], [], []
        for e, (s, t) in zip(experts, segs):
            mats += [ex[e]["ffn_gate.weight"], ex[e]["ffn_up.weight"]]
            ins += [xs[s:t], xs[s:t]]
            outs += [gate[s:t], up[s:t]]
        be.linear_each(ins, mats, outs)  # every chosen expert's gate and up
        act = be.silu_mul(gate, up)  # (N*k, F)
        be.linear_each([act[s:t] for s, t in segs], [ex[e]["ffn_down.weight"] for e in experts],
                       [y[s:t] for s, t in segs])  # every down
        return combine(y, order, wts)  # slot by slot: a row's sum does not depend on the rest of the batch

    def _predict(self, i: int, h: np.ndarray) -> None:
        """Where experts stream from disk: guess block ``i``'s experts by applying its router to
        this block's normed rows ``h`` (the residual stream changes little from one block to
        the next) and start reading them, behind this block's own reads, while this block
        waits and computes. Only timing depends on it."""
        wt = self.weights
        if i >= self.config.num_hidden_layers or not hasattr(wt, "prefetch_experts"):
            return
        router = wt.router(i)
        if router is None:
            return
        ids, _ = route(self.backend.linear(h, router), self.config.num_experts_per_tok, False)
        wt.prefetch_experts(i, np.unique(ids).tolist())

    def block(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        """Decoder block ``i``: updates the residual stream ``x`` (N, d) in place."""
        eps, be = self.config.rms_norm_eps, self.backend
        w = self.weights.layer(i)  # asked every forward: a streaming source may swap buffers
        x += self.attention(i, w, be.rmsnorm(x, w["attn_norm.weight"], eps), batch)
        h = be.rmsnorm(x, w["ffn_norm.weight"], eps)
        x += self.moe(i, w, h) if self.config.is_moe_layer(i) else self.mlp(w, h)
        return x

    def program_block(self, b, i: int, w: dict, buf, cache) -> None:
        """Block ``i``'s decode step as program rows: attention as Qwen3's, then the MoE block
        (router, top-k, each chosen expert one task, the weighted sum) or the dense MLP."""
        c = self.config
        self.program_attention(b, i, w, buf, cache)
        if not c.is_moe_layer(i):
            self.program_mlp(b, w, buf)
            return
        b.barrier()
        program_matmul(b, buf.h, w["ffn_gate_inp.weight"], buf.logits)
        b.barrier()
        template, keys, table, ex = program_experts(self.weights, i, c.num_experts, c.hidden_size)
        b.keep.append(ex)
        b.moe(buf.h, buf.logits, c.num_experts_per_tok, c.norm_topk_prob, buf.ids, buf.wts, table, template, keys,
              buf.ey, buf.escratch)
        b.barrier()
        b.combine(buf.x, buf.ey, buf.wts, buf.comb, buf.order)

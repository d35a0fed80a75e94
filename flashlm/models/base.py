"""What every architecture shares: the forward driver, a batch of sequences and its attention.

A forward pass runs the linear layers once over the rows of all sequences of a
batch (so each weight is read once per step), and attention per sequence against
its own KV cache. :class:`Batch` holds the concatenated rows and where each
sequence's rows are; :func:`attend` writes k/v into each cache and attends;
:class:`Decoder` is embed -> ``block(i)`` for every layer -> norm -> head, which an
architecture's ``Model`` completes with its ``block`` (attention, MLP or MoE).

A decode step of one sequence on the kernel backend, with the weights resident in memory, runs
its blocks as one program (``kernels.program``) when the architecture writes one
(``program_block``): every block's kernels in one pool dispatch, with the bits of ``block``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashlm.errors import InputError
from flashlm.runtime.kvcache import KVCache


@dataclass
class Batch:
    """Rows of several sequences, concatenated.

    Attributes:
        tokens: (N,) int64 token ids of every sequence, one after another.
        positions: (N,) int64 rope positions.
        caches: the KV cache of each sequence.
        starts: first row of each sequence (len B + 1, last = N).
        n_past: positions already in each cache.
    """

    tokens: np.ndarray
    positions: np.ndarray
    caches: list
    starts: list[int]
    n_past: list[int]

    @property
    def last_rows(self) -> np.ndarray:
        """Index of the last row of each sequence (B,)."""
        return np.asarray(self.starts[1:], np.int64) - 1

    def logit_rows(self, all_logits: bool = False, last=None) -> np.ndarray:
        """Rows whose logits a step returns, sequence after sequence: the last row of each
        (default), every row (``all_logits``), or the last ``last[j]`` rows of sequence j
        (0 = none of its rows: a prompt chunk that does not end its prompt)."""
        if last is None:
            return np.arange(self.starts[-1]) if all_logits else self.last_rows
        if len(last) != len(self.caches):
            raise InputError(f"{len(self.caches)} sequences but {len(last)} logit counts")
        out = []
        for n, s, e in zip(last, self.starts[:-1], self.starts[1:]):
            if not 0 <= n <= e - s:
                raise InputError(f"{n} logit rows asked of a sequence of {e - s} rows")
            out.append(np.arange(e - n, e))
        return np.concatenate(out).astype(np.int64)

    def finish(self) -> None:
        """Mark the new positions written in every cache (after all layers ran)."""
        for c, s, e in zip(self.caches, self.starts[:-1], self.starts[1:]):
            c.advance(e - s)


def make_batch(seqs) -> Batch:
    """Check and concatenate ``[(tokens, positions, cache), ...]``.

    ``positions`` may be None: then it is ``cache.offset + arange(n)``.

    Raises:
        InputError: an empty sequence, mismatched lengths, a cache used twice,
            or a sequence that does not fit in its cache.
    """
    if not seqs:
        raise InputError("forward needs at least one sequence")
    toks, poss, caches, starts, n_past = [], [], [], [0], []
    for j, (tokens, positions, cache) in enumerate(seqs):
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        n = len(tokens)
        if n == 0:
            raise InputError(f"sequence {j} has no tokens")
        if positions is None:
            positions = cache.offset + np.arange(n)
        positions = np.asarray(positions, np.int64).reshape(-1)
        if len(positions) != n:
            raise InputError(f"sequence {j}: {n} tokens but {len(positions)} positions")
        if any(cache is c for c in caches):
            raise InputError(f"sequence {j} shares its KV cache with an earlier sequence")
        n_past.append(cache.reserve(n))
        toks.append(tokens)
        poss.append(positions)
        caches.append(cache)
        starts.append(starts[-1] + n)
    return Batch(np.concatenate(toks), np.concatenate(poss), caches, starts, n_past)


def check_tokens(tokens: np.ndarray, vocab_size: int) -> None:
    """InputError when a token id is outside the vocabulary."""
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
        raise InputError(f"token id {int(bad)} is outside the vocabulary (0 .. {vocab_size - 1})")


def attend(backend, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: Batch) -> np.ndarray:
    """Write k/v of every sequence into its cache at ``layer`` and attend causally.

    Args:
        backend: the compute backend.
        layer: decoder block index.
        q: (N, Hq, D) roped queries of all rows.
        k, v: (N, Hkv, D) roped keys and values of all rows.
        batch: where each sequence's rows are.

    Returns:
        (N, Hq, D) attention output.
    """
    if len(batch.caches) == 1:
        c, p = batch.caches[0], batch.n_past[0]
        backend.kv_write(c.k[layer], c.v[layer], k, v, p)
        return backend.attention(q, c.k[layer], c.v[layer], p)
    if len(batch.caches) == len(batch.tokens) and hasattr(backend, "attention_batch") \
            and hasattr(backend, "kv_write_batch"):
        # one new token per sequence (a decode step of B sequences): one call for all of them
        ks, vs = [c.k[layer] for c in batch.caches], [c.v[layer] for c in batch.caches]
        backend.kv_write_batch(ks, vs, k, v, batch.n_past)
        return backend.attention_batch(q, ks, vs, batch.n_past)
    out = np.empty_like(q)
    for c, p, s, e in zip(batch.caches, batch.n_past, batch.starts[:-1], batch.starts[1:]):
        backend.kv_write(c.k[layer], c.v[layer], k[s:e], v[s:e], p)
        out[s:e] = backend.attention(q[s:e], c.k[layer], c.v[layer], p)
    return out


class Decoder:
    """The forward driver of a pre-norm decoder; a subclass defines ``block(i, x, batch)``,
    which updates the residual stream ``x`` (N, d) of layer ``i`` in place.

    Args:
        config: the model's ModelConfig.
        weights: an object with ``tensor(name)``, ``has(name)``, ``layer(i)`` (and
            ``experts(i, ids)`` for a mixture of experts).
        backend: a compute backend (NumpyBackend, KernelBackend).

    Example:
        >>> model = build_model(config, weights, NumpyBackend())
        >>> cache = model.make_cache(2048)
        >>> logits = model.forward(ids, np.arange(len(ids)), cache)   # prefill
        >>> logits = model.forward([tok], [len(ids)], cache)          # one decode step
    """

    def __init__(self, config, weights, backend) -> None:
        self.config, self.weights, self.backend = config, weights, backend

    def make_cache(self, max_ctx: int, *, kv: str = "f32") -> KVCache:
        """An empty KV cache for one sequence of up to ``max_ctx`` positions, of element type
        ``kv`` ("f32" or "f16"; ``flashlm.load`` chooses the user's default)."""
        return KVCache.for_config(self.config, max_ctx, dtype=kv)

    def block(self, i: int, x: np.ndarray, batch: Batch) -> np.ndarray:
        raise NotImplementedError

    def _run(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        c, be, wt = self.config, self.backend, self.weights
        if len(batch.tokens) == 1 and len(rows) == 1:  # a decode step of one sequence
            prog = self._program(batch.caches[0])
            if prog is not None and 0 <= batch.positions[0] < prog.positions:
                return self._decode(prog, batch)
        check_tokens(batch.tokens, c.vocab_size)
        x = np.array(be.embed(wt.tensor("token_embd.weight"), batch.tokens), np.float32)  # (N, d)
        for i in range(c.num_hidden_layers):
            x = self.block(i, x, batch)
        h = be.rmsnorm(np.ascontiguousarray(x[rows]), wt.tensor("output_norm.weight"), c.rms_norm_eps)
        head = wt.tensor("output.weight") if wt.has("output.weight") else wt.tensor("token_embd.weight")
        logits = be.linear(h, head)  # only the rows asked for, not the whole prompt
        batch.finish()
        return logits

    # Decode steps of one sequence run as a program where possible (False: always block by block).
    use_programs = True

    def program_block(self, b, i: int, w: dict, buf: "ProgramBuffers", cache: KVCache) -> None:
        """Append block ``i``'s decode step to the program builder ``b`` (``kernels.program``):
        an architecture that can defines it with the operations of its ``block``."""
        raise NotImplementedError

    def _program(self, cache: KVCache):
        """The decode program of this model on ``cache`` (made once per cache and path), or None
        where blocks run one by one: another backend, weights that stream, a format without a
        GEMV task, an architecture without ``program_block``."""
        be = self.backend
        if not (self.use_programs and getattr(be, "programs", False) and getattr(self.weights, "resident", False)
                and type(self).program_block is not Decoder.program_block and isinstance(cache, KVCache)):
            return None
        from flashlm.kernels import matmul  # (only here: the numpy backend runs without the kernels)

        key = (id(self), id(self.weights), matmul.is_exact())
        hit = getattr(cache, "_program", None)
        if hit is not None and hit[0] == key:
            return hit[1]
        prog = None
        try:
            prog = _build_program(self, cache)
        except _NoProgram:
            pass
        cache._program = (key, prog)
        return prog

    def _decode(self, prog: "DecodeProgram", batch: "Batch") -> np.ndarray:
        """One decode step through the program: embed, the blocks in one dispatch, norm, head."""
        c, be, wt = self.config, self.backend, self.weights
        check_tokens(batch.tokens, c.vocab_size)
        buf = prog.buf
        buf.x[:] = be.embed(wt.tensor("token_embd.weight"), batch.tokens)[0]
        prog.state[0], prog.state[1] = batch.positions[0], batch.n_past[0]
        prog.table[prog.attention_rows, prog.n_past_col] = batch.n_past[0]
        if be.pool is not None:
            be.pool.run_program(prog.table, prog.state, prog.bar)
        else:
            from flashlm.kernels import program

            program.run(prog.table, prog.table.shape[0], prog.state, prog.bar, 0, 1)
        h = be.rmsnorm(buf.x.reshape(1, -1), wt.tensor("output_norm.weight"), c.rms_norm_eps)
        head = wt.tensor("output.weight") if wt.has("output.weight") else wt.tensor("token_embd.weight")
        logits = be.linear(h, head)
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
        """One step for several sequences; the linear layers run once over all their rows
        (and each expert of a mixture once over the rows, of any sequence, routed to it).

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


# ---- decode programs ----


class _NoProgram(Exception):
    """A weight or cache a program cannot take: the blocks run one by one."""


class ProgramBuffers:
    """The activations of a decode program's step (float32, one row each)."""

    def __init__(self, config) -> None:
        c = config
        d, hd, hq, hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        f = c.intermediate_size
        z = lambda n: np.zeros(n, np.float32)  # noqa: E731
        self.x, self.h, self.o, self.y = z(d), z(d), z(d), z(d)
        self.q, self.qn, self.att = z(hq * hd), z(hq * hd), z(hq * hd)
        self.k, self.kn, self.v = z(hkv * hd), z(hkv * hd), z(hkv * hd)
        self.g, self.u, self.act = z(f), z(f), z(f)
        if c.num_experts:  # a mixture of experts: router logits, the chosen experts and their outputs
            k, fe = c.num_experts_per_tok, c.moe_intermediate_size
            self.logits, self.wts, self.comb = z(c.num_experts), z(k), z(d)
            self.ids, self.order = np.zeros(k, np.int64), np.arange(k, dtype=np.int64)
            self.ey, self.escratch = np.zeros((k, d), np.float32), np.zeros((k, 2 * fe), np.float32)


class DecodeProgram:
    """A model's decode step on one cache: the program table and what it reads and writes."""

    def __init__(self, table, buf, keep, attention_rows, positions) -> None:
        from flashlm.kernels import program

        self.table, self.buf, self.keep = table, buf, keep
        self.attention_rows = np.asarray(attention_rows, np.int64)
        self.n_past_col = program.N_PAST
        self.positions = positions  # rope positions the tables cover
        self.state = np.zeros(2, np.int64)
        self.bar = np.zeros(1, np.int64)


def program_matmul(b, x: np.ndarray, w, out: np.ndarray) -> None:
    """Append ``out = w . x`` (a QTensor with a GEMV task) to builder ``b``, or raise _NoProgram."""
    from flashlm.kernels import matmul
    from flashlm.kernels.formats import QTensor

    if not isinstance(w, QTensor) or not w.stable or w.fmt not in matmul.KERNELS or len(w.shape) != 2 \
            or w.shape != (out.size, x.size):
        raise _NoProgram
    data = w.data.view(np.uint16) if w.fmt == "F16" else w.data
    if data.ndim != 2 or not data.flags.c_contiguous:
        raise _NoProgram
    b.matmul(x, data, matmul.task_key(w.fmt), out)


def program_experts(weights, i: int, n: int, d: int):
    """Block ``i``'s ``n`` experts for a program: (template kernel arrays of one expert, their task
    keys, (n, 4) int64 table of every expert's gate, up, down addresses and up task (0: one
    product with the gate)), or raise _NoProgram."""
    from flashlm.kernels import executor, matmul
    from flashlm.kernels.moe import _expert_arrays

    ex = weights.experts(i, list(range(n)))
    names = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
    fmts = tuple(ex[0][m].fmt for m in names)
    if any(not getattr(ex[0][m], "stable", False) for m in names):
        raise _NoProgram
    keys = tuple(matmul.task_key(f) for f in fmts)
    _, gk, uk, _ = executor.expert_tasks(*keys)
    table = np.zeros((n, 4), np.int64)
    template = None
    for e in range(n):
        ts = [ex[e][m] for m in names]
        arrs = _expert_arrays(*ts, d, matmul.KERNELS)
        if arrs is None or tuple(t.fmt for t in ts) != fmts or not all(t.stable for t in ts):
            raise _NoProgram
        g, u, dn = arrs
        template = template or arrs
        if g.shape != template[0].shape or u.shape != template[1].shape or dn.shape != template[2].shape:
            raise _NoProgram
        table[e] = (g.ctypes.data, u.ctypes.data, dn.ctypes.data,
                    executor.up_task(g.ctypes.data, g.shape[0], g.strides[0], u.ctypes.data, gk, uk))
    return template, keys, table, ex


def program_vector(be, w) -> np.ndarray:
    """A norm weight or bias as the float32 vector the backend uses, or raise _NoProgram."""
    from flashlm.kernels.formats import QTensor

    if not isinstance(w, QTensor) or not w.stable:
        raise _NoProgram
    return be.vector(w)


def program_rope(b, x: np.ndarray, heads: int, config, positions: int) -> None:
    """Append rope of ``x`` (heads x head_dim) with ops.rope's tables for ``positions``."""
    from flashlm.kernels import ops

    c = config
    cos, sin = ops._rope_table(c.rope_theta, c.head_dim, c.rope_scaling, positions)
    if c.rope_layout not in ("neox", "interleaved"):
        raise _NoProgram
    b.rope(x, heads, c.head_dim, cos, sin, c.rope_layout == "neox")


def _build_program(model, cache: KVCache) -> DecodeProgram:
    from flashlm.kernels import ops, program

    c = model.config
    if cache.max_ctx >= ops._TABLE_MAX or cache.n_layers != c.num_hidden_layers:
        raise _NoProgram
    b = program.Builder()
    buf = ProgramBuffers(c)
    for i in range(c.num_hidden_layers):
        model.program_block(b, i, model.weights.layer(i), buf, cache)
    table = b.build()
    return DecodeProgram(table, buf, b.keep, np.flatnonzero(table[:, 0] == program.ATTENTION), cache.max_ctx)

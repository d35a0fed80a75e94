"""Compute backends: the only way a model does arithmetic.

A backend offers the operations of a decoder-only transformer on float32
activations and QTensor weights:

    linear(x, w, bias=None)      (n, cols) @ W.T (+ bias)       -> (n, rows)
    linear_each(xs, ws, outs)    outs[j] = xs[j] @ ws[j].T: products with an input each
                                 (the chosen experts of a MoE layer), in one call
    swiglu_each(x, gates, ups, downs, out)    out[j] = downs[j] . (silu(gates[j] . x) * (ups[j] . x))
                                 for one row x, out (k, d): a decode step's chosen experts, in one call
    embed(w, ids)                rows ``ids`` of the embedding  -> (n, d)
    rmsnorm(x, w, eps)           over the last axis of (n, d)   -> (n, d)
    rope(x, positions, theta, layout, scaling=None)   in place on (n, H, D)
    silu_mul(g, u)               silu(g) * u                    -> (n, F)
    attention(q, k_cache, v_cache, n_past)   causal, GQA        -> (n, Hq, D)
        (KV caches float32, or uint16 holding f16 bits: ``runtime.kvcache``)
    attention_batch(q, k_caches, v_caches, n_pasts)   one token per sequence, B caches -> (B, Hq, D)
    kv_write_batch(k_caches, v_caches, k, v, n_pasts) one position per sequence, k/v (B, Hkv, D)
    kv_write(k_cache, v_cache, k, v, pos)    caches (Hkv, T, D), k/v (n, Hkv, D)

:class:`NumpyBackend` is plain numpy: weights are dequantized to float32 once
(with the ``gguf`` package's reference dequantizers) and multiplied with BLAS. It
is the slow, obviously right reference and the "plain numpy" baseline of perf/.
:class:`KernelBackend` calls the Numba kernels in ``flashlm.kernels`` on the
weights as stored (block formats unchanged).
"""
from __future__ import annotations

import math

import numpy as np

from flashlm.errors import InputError, UnsupportedError
from flashlm.kernels.formats import QTensor, take_rows

# ---- shared helpers ----


def to_f32(w: QTensor) -> np.ndarray:
    """Dequantize a whole QTensor to float32 of its logical shape (reference path)."""
    if w.fmt == "F32":
        return np.asarray(w.data, np.float32).reshape(w.shape)
    if w.fmt == "F16":
        return w.data.astype(np.float32).reshape(w.shape)
    if w.fmt == "BF16":
        return (w.data.astype(np.uint32) << 16).view(np.float32).reshape(w.shape)
    import gguf

    from flashlm.kernels.repacked import unpack

    fmt, data = unpack(w.fmt, w.data, w.shape)  # a store layout (Q5_0R, Q4_KR, Q8_0S, ...): its GGUF blocks
    out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[fmt])
    return np.asarray(out, np.float32).reshape(w.shape)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Rotary inverse frequencies (head_dim // 2,) float64, with HF rope scaling applied.

    Supports ``rope_type`` default, linear and llama3 (the HF names).
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return np.where(medium, smoothed, out)
    raise UnsupportedError(f"rope scaling {kind!r} is not supported (default, linear, llama3)")


def _linear_blocks(linear, x: np.ndarray, w, bias: np.ndarray | None) -> np.ndarray:
    """``x @ W.T`` for a weight that arrives in row blocks (``w.blocks()`` yields (r0, r1, QTensor))."""
    out = np.empty(x.shape[:-1] + (w.shape[0],), np.float32)
    for r0, r1, part in w.blocks():
        out[..., r0:r1] = linear(x, part)
    if bias is not None:
        out += bias
    return out


def _swiglu_each(be, x: np.ndarray, gates: list, ups: list, downs: list, out: np.ndarray) -> None:
    """SwiGLU experts on one row as products and an activation: all gates and ups, then all downs."""
    x = np.ascontiguousarray(x, np.float32).reshape(1, -1)
    k, f = len(gates), gates[0].shape[0] if gates else 0
    g, u = np.empty((k, f), np.float32), np.empty((k, f), np.float32)
    be.linear_each([x] * (2 * k), [w for pair in zip(gates, ups) for w in pair],
                   [a[j:j + 1] for j in range(k) for a in (g, u)])
    act = be.silu_mul(g, u)
    be.linear_each([act[j:j + 1] for j in range(len(downs))], downs, [out[j:j + 1] for j in range(len(downs))])


# ---- plain numpy ----


class NumpyBackend:
    """Plain numpy: float32 weights dequantized once and cached, BLAS matmuls.

    Args:
        cache_weights: keep the float32 copy of each matrix (keyed by its buffer
            address, format and shape). Turn off when the weight buffers are
            reused for other layers (streaming), at the cost of dequantizing
            every call.
    """

    name = "numpy"

    def __init__(self, *, cache_weights: bool = True) -> None:
        self.cache_weights = cache_weights
        self._f32: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def f32(self, w: QTensor) -> np.ndarray:
        """The float32 (rows, cols) copy of ``w`` (cached, unless its buffer is reused: not ``w.stable``)."""
        if w.fmt == "F32":
            return np.asarray(w.data).reshape(w.shape)
        if not self.cache_weights or not w.stable:
            return to_f32(w)
        key = (w.data.__array_interface__["data"][0], w.fmt, w.shape)
        hit = self._f32.get(key)
        if hit is None:
            # keep w.data alive so its address is not reused by another buffer
            hit = self._f32[key] = (w.data, to_f32(w))
        return hit[1]

    @property
    def cached_nbytes(self) -> int:
        return sum(a.nbytes for _, a in self._f32.values())

    def clear(self) -> None:
        self._f32.clear()

    def linear(self, x: np.ndarray, w: QTensor, bias: QTensor | None = None) -> np.ndarray:
        if not isinstance(w, QTensor):  # streamed in row blocks (flashlm.offload.streaming.StreamedMatrix)
            return _linear_blocks(self.linear, x, w, bias and self.f32(bias))
        y = x @ self.f32(w).T  # (n, cols) @ (cols, rows)
        if bias is not None:
            y += self.f32(bias)
        return y

    def linear_many(self, x: np.ndarray, ws: list[QTensor], biases=None) -> list[np.ndarray]:
        """Several products sharing ``x`` (q/k/v, gate/up)."""
        biases = biases or [None] * len(ws)
        return [self.linear(x, w, b) for w, b in zip(ws, biases)]

    def linear_each(self, xs: list[np.ndarray], ws: list[QTensor], outs: list[np.ndarray]) -> None:
        """``outs[j][:] = xs[j] @ ws[j].T`` for every j (each product its own input and output)."""
        for x, w, o in zip(xs, ws, outs):
            np.matmul(x, self.f32(w).T, out=o)

    def swiglu_each(self, x: np.ndarray, gates: list, ups: list, downs: list, out: np.ndarray) -> None:
        """``out[j] = downs[j] . (silu(gates[j] . x) * (ups[j] . x))`` for one row ``x`` (d,) or (1, d);
        out (k, d) float32."""
        _swiglu_each(self, x, gates, ups, downs, out)

    def embed(self, w: QTensor, ids: np.ndarray) -> np.ndarray:
        if not isinstance(w, QTensor):  # rows read on demand (flashlm.offload.streaming.StreamedMatrix)
            return np.array(to_f32(w.rows(ids)), np.float32)
        rows = QTensor(take_rows(w.fmt, w.data, w.shape[-1], np.asarray(ids)), w.fmt, (len(ids),) + tuple(w.shape[1:]))
        return np.array(to_f32(rows), np.float32)  # (n, d), a fresh array

    def rmsnorm(self, x: np.ndarray, w: QTensor, eps: float) -> np.ndarray:
        ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
        return (x / np.sqrt(ms + np.float32(eps))) * self.f32(w)

    def rope(
        self,
        x: np.ndarray,  # (n, H, D) float32, rotated in place
        positions: np.ndarray,  # (n,) int
        theta: float,
        layout: str,
        scaling: dict | None = None,
    ) -> np.ndarray:
        d = x.shape[-1]
        ang = np.asarray(positions, np.float64)[:, None] * rope_inv_freq(d, theta, scaling)[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]  # (n, 1, D/2)
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        if layout == "neox":
            a, b = x[..., : d // 2].copy(), x[..., d // 2 :].copy()
            x[..., : d // 2] = a * cos - b * sin
            x[..., d // 2 :] = b * cos + a * sin
        elif layout == "interleaved":
            a, b = x[..., 0::2].copy(), x[..., 1::2].copy()
            x[..., 0::2] = a * cos - b * sin
            x[..., 1::2] = b * cos + a * sin
        else:
            raise ValueError(f"rope layout must be 'neox' or 'interleaved', got {layout!r}")
        return x

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g gives 0, as it should
            return g / (1.0 + np.exp(-g)) * u

    def kv_write(self, k_cache, v_cache, k: np.ndarray, v: np.ndarray, pos: int) -> None:
        n = k.shape[0]
        if k_cache.dtype == np.uint16:  # an f16 cache: half bits (runtime.kvcache); inf past 65504, as the kernels
            with np.errstate(over="ignore"):
                k, v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
        k_cache[:, pos : pos + n] = k.transpose(1, 0, 2)  # (n, Hkv, D) -> (Hkv, n, D)
        v_cache[:, pos : pos + n] = v.transpose(1, 0, 2)

    def attention(
        self,
        q: np.ndarray,  # (n, Hq, D)
        k_cache: np.ndarray,  # (Hkv, T_max, D) holding positions 0 .. n_past+n-1
        v_cache: np.ndarray,
        n_past: int,
        *,
        chunk: int = 256,
    ) -> np.ndarray:
        n, hq, d = q.shape
        hkv = k_cache.shape[0]
        g = hq // hkv
        t = n_past + n
        k, v = k_cache[:, :t], v_cache[:, :t]  # (Hkv, t, D)
        if k.dtype == np.uint16:  # an f16 cache (half bits): float32 for the arithmetic
            k, v = k.view(np.float16).astype(np.float32), v.view(np.float16).astype(np.float32)
        out = np.empty((n, hq, d), np.float32)
        for s in range(0, n, chunk):  # bound the (Hkv, rows, t) score matrix
            e = min(n, s + chunk)
            m = e - s
            qg = q[s:e].reshape(m, hkv, g, d).transpose(1, 0, 2, 3).reshape(hkv, m * g, d)
            sc = (qg @ k.transpose(0, 2, 1)) * np.float32(1.0 / math.sqrt(d))  # (Hkv, m*g, t)
            qpos = n_past + s + np.arange(m).repeat(g)  # position of each score row
            sc = np.where(np.arange(t)[None, :] <= qpos[:, None], sc, -np.inf)
            sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
            sc /= sc.sum(axis=-1, keepdims=True)
            o = sc @ v  # (Hkv, m*g, D)
            out[s:e] = o.reshape(hkv, m, g, d).transpose(1, 0, 2, 3).reshape(m, hq, d)
        return out

    def kv_write_batch(self, k_caches, v_caches, k: np.ndarray, v: np.ndarray, n_pasts) -> None:
        for b, (kc, vc, p) in enumerate(zip(k_caches, v_caches, n_pasts)):
            self.kv_write(kc, vc, k[b:b + 1], v[b:b + 1], p)

    def attention_batch(self, q, k_caches, v_caches, n_pasts) -> np.ndarray:
        """One new token per sequence (q (B, Hq, D)), each over its own cache."""
        return np.concatenate([self.attention(q[b:b + 1], k, v, p) for b, (k, v, p)
                               in enumerate(zip(k_caches, v_caches, n_pasts))])


# ---- Numba kernels ----


# CPU seconds warm_up compiles on a fresh install besides the formats' kernels (attention for
# one cache type 6.5-7 s, rope, norms, the table runner; 2-core AVX2 EPYC, shared with other
# work), what kernels.precompile weighs against a format's when it shares the formats between
# this process and its workers.
OPS_COMPILE_S = 10.0

# Multiply-adds of q.k from which attention is split over the pool's query heads
# (measured, qwen2.5-0.5b decode: 24 layers of attention over 1500 positions took
# 5.9 ms on one thread, 3.7 ms split on 2 as a nogil table task).
ATTN_PARALLEL_MIN = 1 << 17


class KernelBackend:
    """The Numba kernels of ``flashlm.kernels`` on the weights as stored.

    Args:
        pool: a ``flashlm.runtime.threadpool.ThreadPool`` the kernels split work
            over, or None for the kernels' default.
    """

    name = "kernels"
    programs = True  # runs a decode step's blocks as one program (models.base.Decoder._program)

    def __init__(self, pool=None) -> None:
        from flashlm.kernels import matmul, ops  # lazily: Numba compiles on first use

        self._matmul, self._ops = matmul, ops
        self.pool = pool
        self._vec: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def warm_up(self, weights, config, *, room: int | None = None, kv: str = "f32") -> None:
        """Load the kernels a model uses (compiling them on a fresh install) on tiny zero
        tensors of its formats and row lengths, so that their memory is part of the baseline
        the RAM planner measures and the first token does not wait for them.

        On a first run the formats' matmul kernels compile in worker processes
        (``kernels.precompile``) while this one compiles attention and the other ops, and
        then the formats no worker took.

        Args:
            weights: a Store (``tensor_info``) or anything with ``tensor_info``-like metadata.
            config: the ModelConfig (head sizes for rope and attention).
            room: bytes the process may still grow by (for the compile workers); None: no limit.
            kv: the KV caches' element type ("f32" or "f16") the attention kernels are loaded for.
        """
        from flashlm.kernels import executor, matmul, precompile
        from flashlm.kernels.formats import FLOAT_DTYPES, row_nbytes
        from flashlm.runtime.kvcache import KV_DTYPES

        shapes = {(t["format"], int(t["shape"][-1])) for t in weights.tensor_info.values() if len(t["shape"]) == 2}
        # Only the token embedding is looked up (dequantized by rows): its format's dequantizer is the
        # one a first token needs (another's cost Q4_1R's worker 7 s more, for nothing; a prompt of
        # matmul.BLAS_MIN_ROWS tokens or more compiles the others' on its first prefill).
        emb = weights.tensor_info.get("token_embd.weight", {}).get("format")
        key = matmul.task_key  # the kernels of the current path (integer or exact) of a format
        job = precompile.start(sorted({key(f) for f, _ in shapes}), room=room, dequant=[key(emb)] if emb else [],
                               here=OPS_COMPILE_S)
        c = config
        d, hd, hq, hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        x = np.ones((1, d), np.float32)
        self.rmsnorm(x, QTensor(np.ones(d, np.float32), "F32", (d,)), 1e-6)
        self.silu_mul(x, x)
        q, k = np.ones((1, hq, hd), np.float32), np.ones((1, hkv, hd), np.float32)
        for t in (q, k):
            self.rope(t, np.array([0]), c.rope_theta, c.rope_layout, c.rope_scaling)
        kc, vc = np.zeros((hkv, 4, hd), KV_DTYPES[kv]), np.zeros((hkv, 4, hd), KV_DTYPES[kv])
        self.kv_write(kc, vc, k, k, 0)
        self.attention(q, kc, vc, 0)
        executor.warm_up()  # the table runner and the pool's worker loop
        from flashlm.kernels import program

        program.warm_up()  # decode steps as one program (models.base.Decoder._program)
        # The formats no worker took first (this process compiles them while the workers run),
        # then the workers' (in the cache once they are done; one a worker failed on compiles here).
        for fmt, cols in sorted(shapes, key=lambda s: (key(s[0]) in job.formats, s)):
            if key(fmt) in job.formats:
                job.wait()  # (returns at once after the first time)
            if fmt in FLOAT_DTYPES:
                data = np.zeros((2, cols), FLOAT_DTYPES[fmt])
            else:
                data = np.zeros((2, row_nbytes(fmt, cols)), np.uint8)
            w = QTensor(data, fmt, (2, cols))
            for n in (1, 2):
                self.linear(np.zeros((n, cols), np.float32), w)
            if fmt == emb:
                self.embed(w, np.array([1]))

    def vector(self, w: QTensor) -> np.ndarray:
        """A norm weight or bias as float32 (converted once when stored as F16/BF16, unless its
        buffer is reused: not ``w.stable``)."""
        if w.fmt == "F32":
            return np.asarray(w.data, np.float32).reshape(-1)
        if not w.stable:
            return to_f32(w).reshape(-1)
        key = (w.data.__array_interface__["data"][0], w.fmt, w.shape)
        hit = self._vec.get(key)
        if hit is None:
            hit = self._vec[key] = (w.data, to_f32(w).reshape(-1))
        return hit[1]

    def linear(self, x: np.ndarray, w: QTensor, bias: QTensor | None = None) -> np.ndarray:
        if not isinstance(w, QTensor):  # streamed in row blocks (flashlm.offload.streaming.StreamedMatrix)
            return _linear_blocks(self.linear, x, w, bias and self.vector(bias))
        y = self._matmul.matmul(x, w, pool=self.pool)
        if bias is not None:
            y += self.vector(bias)
        return y

    def linear_many(self, x: np.ndarray, ws: list[QTensor], biases=None) -> list[np.ndarray]:
        """Several products sharing ``x`` (q/k/v, gate/up), in one pool dispatch."""
        ys = self._matmul.matmul_many(x, ws, pool=self.pool)
        for y, b in zip(ys, biases or []):
            if b is not None:
                y += self.vector(b)
        return ys

    def linear_each(self, xs: list[np.ndarray], ws: list[QTensor], outs: list[np.ndarray]) -> None:
        """``outs[j][:] = xs[j] @ ws[j].T`` for every j, in as few pool dispatches as fit."""
        self._matmul.matmul_each(xs, ws, outs, pool=self.pool)

    def swiglu_each(self, x: np.ndarray, gates: list, ups: list, downs: list, out: np.ndarray) -> None:
        """``out[j] = downs[j] . (silu(gates[j] . x) * (ups[j] . x))`` for one row ``x``: each
        expert one task (kernels.moe.swiglu_each), all in one pool dispatch; the same bits as the
        products and the activation one after another, which run where the task cannot."""
        from flashlm.kernels.moe import swiglu_each

        if not swiglu_each(x, gates, ups, downs, out, pool=self.pool):
            _swiglu_each(self, x, gates, ups, downs, out)

    def embed(self, w: QTensor, ids: np.ndarray) -> np.ndarray:
        if not isinstance(w, QTensor):  # rows read on demand (flashlm.offload.streaming.StreamedMatrix)
            return np.array(self._matmul.dequantize(w.rows(ids)), np.float32)
        return np.array(self._matmul.dequantize(w, rows=np.asarray(ids, np.int64)), np.float32)

    def rmsnorm(self, x: np.ndarray, w: QTensor, eps: float) -> np.ndarray:
        return self._ops.rmsnorm(np.ascontiguousarray(x), self.vector(w), eps)

    def rope(self, x, positions, theta, layout, scaling=None):
        self._ops.rope(x, np.asarray(positions, np.int64), theta, layout, scaling=scaling)
        return x

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        return self._ops.silu_mul(g, u)

    def kv_write(self, k_cache, v_cache, k, v, pos: int) -> None:
        self._ops.kv_write(k_cache, v_cache, np.ascontiguousarray(k), np.ascontiguousarray(v), pos)

    def attention(self, q, k_cache, v_cache, n_past: int) -> np.ndarray:
        n, hq, d = q.shape
        # A worker's wake-up costs more than a short decode attention: run those here.
        pool = self.pool if n * (n_past + n) * hq * d >= ATTN_PARALLEL_MIN else None
        return self._ops.attention(np.ascontiguousarray(q), k_cache, v_cache, n_past, pool=pool)

    def kv_write_batch(self, k_caches, v_caches, k, v, n_pasts) -> None:
        """One new position per sequence, in one call."""
        self._ops.kv_write_batch(k_caches, v_caches, np.ascontiguousarray(k), np.ascontiguousarray(v), n_pasts)

    def attention_batch(self, q, k_caches, v_caches, n_pasts) -> np.ndarray:
        """One new token per sequence (q (B, Hq, D)), each over its own cache, in one dispatch;
        row b has the bits of ``attention(q[b:b+1], k_caches[b], v_caches[b], n_pasts[b])``."""
        _, hq, d = q.shape
        work = sum(int(p) + 1 for p in n_pasts) * hq * d
        pool = self.pool if work >= ATTN_PARALLEL_MIN else None
        return self._ops.attention_batch(np.ascontiguousarray(q), k_caches, v_caches, n_pasts, pool=pool)


def kernels_error() -> str | None:
    """Why flashlm.kernels.matmul and .ops do not import, or None when they do."""
    try:
        from flashlm.kernels import matmul, ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - numba/llvmlite fail in many ways; the message says which
        return f"{type(e).__name__}: {e}"
    return None


def kernels_available() -> bool:
    """True when flashlm.kernels.matmul and .ops import."""
    return kernels_error() is None


def require_kernels() -> None:
    """UnsupportedError saying why the kernels do not import and what to do, unless they do."""
    why = kernels_error()
    if why is not None:
        raise UnsupportedError(
            f"flashlm's Numba kernels could not be loaded ({why}); reinstall flashlm (pip install -e .) "
            "and its numba, or pass --backend numpy to run the plain-numpy reference, which keeps float32 "
            "copies of every weight (4-8x the memory of the store)")


def get_backend(name: str = "auto", *, pool=None):
    """A backend by name: "kernels", "numpy", or "auto" (the kernels; never a silent fall
    back to numpy, whose float32 copies of every weight take 4-8x the memory).

    Raises:
        UnsupportedError: the kernels do not import (the message says why and what to do).
    """
    if name in ("auto", "kernels"):
        require_kernels()
        return KernelBackend(pool)
    if name == "numpy":
        return NumpyBackend()
    raise InputError(f"backend must be 'auto', 'kernels' or 'numpy', got {name!r}")

"""Per-sequence key/value cache, preallocated up to the context length.

Layout per layer: ``k[i]``, ``v[i]`` of shape (n_kv_heads, max_ctx, head_dim),
positions 0 .. offset-1 filled. The model writes new rows at ``offset`` (through
the backend's ``kv_write``) in every layer, then calls :meth:`KVCache.advance` once.

Two element types (``dtype``, the ``--kv`` option):

- ``"f32"``: float32 arrays, 4 bytes per element.
- ``"f16"``: uint16 arrays holding IEEE half bits, 2 bytes per element. uint16, not
  np.float16, in both backends: Numba has no float16 arrays, and one representation
  means one cache works with either backend. Values are rounded to half as numpy's
  ``astype(np.float16)`` rounds (to nearest even; inf past 65504) when written, and read
  back as float32 (``cache.k[i].view(np.float16)`` shows them); the attention arithmetic
  is float32 either way.
"""
from __future__ import annotations

import numpy as np

from flashlm.errors import InputError

# element type of each --kv choice, and its bytes per element
KV_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.uint16)}

# The default of ``flashlm.load`` and the CLI (``--kv``); see docs/performance.md for the
# perplexity measurements that chose it. Lower-level code (KVCache, make_cache, Engine) defaults
# to "f32", the exact reference the model tests compare against.
DEFAULT_KV = "f16"


def check_kv(kv) -> str:
    """``kv`` if it is a KV cache type ("f16" or "f32"), else InputError."""
    if not isinstance(kv, str) or kv not in KV_DTYPES:
        raise InputError(f"--kv {kv!r} is invalid: use f16 or f32 (the KV cache's element type)")
    return kv


class KVCache:
    """Keys and values of one sequence.

    Args:
        n_layers: decoder blocks.
        n_kv_heads: key/value heads per block.
        head_dim: size of a head.
        max_ctx: most positions the cache holds (prompt + generated tokens).
        dtype: "f32" (float32) or "f16" (IEEE half bits in uint16, half the memory).

    Example:
        >>> cache = KVCache.for_config(model.config, max_ctx=2048)
        >>> logits = model.forward(ids, np.arange(len(ids)), cache)
        >>> cache.offset == len(ids)
        True
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_ctx: int, *, dtype: str = "f32") -> None:
        if max_ctx < 1:
            raise InputError(f"context length must be at least 1, got {max_ctx}")
        self.dtype = check_kv(dtype)
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_ctx = int(max_ctx)
        shape = (n_kv_heads, self.max_ctx, head_dim)
        el = KV_DTYPES[dtype]
        # np.zeros maps fresh pages: memory is committed as positions are written.
        self.k = [np.zeros(shape, el) for _ in range(n_layers)]  # (Hkv, T, D) each
        self.v = [np.zeros(shape, el) for _ in range(n_layers)]
        self.offset = 0

    @classmethod
    def for_config(cls, config, max_ctx: int, *, dtype: str = "f32") -> "KVCache":
        """A cache shaped for a ModelConfig."""
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, max_ctx, dtype=dtype)

    @staticmethod
    def bytes_for(config, max_ctx: int, *, kv: str = "f32") -> int:
        """Bytes a cache of ``max_ctx`` positions of type ``kv`` ("f32": 4 bytes per element,
        "f16": 2) takes for ``config`` (for the RAM planner)."""
        return (2 * config.num_hidden_layers * config.num_key_value_heads * max_ctx * config.head_dim
                * KV_DTYPES[check_kv(kv)].itemsize)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    @property
    def room(self) -> int:
        """Positions still free."""
        return self.max_ctx - self.offset

    def reserve(self, n: int) -> int:
        """Check that ``n`` more positions fit; returns the position they start at.

        Raises:
            InputError: offset + n exceeds max_ctx.
        """
        if self.offset + n > self.max_ctx:
            raise InputError(
                f"context is full: {self.offset} positions used + {n} new > the limit of "
                f"{self.max_ctx}; raise --ctx (or shorten the prompt / -n)"
            )
        return self.offset

    def advance(self, n: int) -> None:
        """Mark ``n`` positions written (after every layer wrote them)."""
        self.reserve(n)
        self.offset += n

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions (e.g. rejected draft tokens); returns how many were dropped."""
        n = max(0, min(int(n), self.offset))
        self.offset -= n
        return n

    def reset(self) -> None:
        """Empty the cache (keeps the memory)."""
        self.offset = 0

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.n_layers}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"offset={self.offset}/{self.max_ctx}, {self.dtype}, {self.nbytes / 2**20:.1f} MiB)"
        )

"""Per-sequence key/value cache, preallocated up to the context length.

Layout per layer: ``k[i]``, ``v[i]`` of shape (n_kv_heads, max_ctx, head_dim)
float32, positions 0 .. offset-1 filled. The model writes new rows at
``offset`` (through the backend's ``kv_write``) in every layer, then calls
:meth:`KVCache.advance` once.
"""
from __future__ import annotations

import numpy as np

from flashlm.errors import InputError


class KVCache:
    """Keys and values of one sequence.

    Args:
        n_layers: decoder blocks.
        n_kv_heads: key/value heads per block.
        head_dim: size of a head.
        max_ctx: most positions the cache holds (prompt + generated tokens).

    Example:
        >>> cache = KVCache.for_config(model.config, max_ctx=2048)
        >>> logits = model.forward(ids, np.arange(len(ids)), cache)
        >>> cache.offset == len(ids)
        True
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_ctx: int) -> None:
        if max_ctx < 1:
            raise InputError(f"context length must be at least 1, got {max_ctx}")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_ctx = int(max_ctx)
        shape = (n_kv_heads, self.max_ctx, head_dim)
        # np.zeros maps fresh pages: memory is committed as positions are written.
        self.k = [np.zeros(shape, np.float32) for _ in range(n_layers)]  # (Hkv, T, D) each
        self.v = [np.zeros(shape, np.float32) for _ in range(n_layers)]
        self.offset = 0

    @classmethod
    def for_config(cls, config, max_ctx: int) -> "KVCache":
        """A cache shaped for a ModelConfig."""
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, max_ctx)

    @staticmethod
    def bytes_for(config, max_ctx: int) -> int:
        """Bytes a cache of ``max_ctx`` positions takes for ``config`` (for the RAM planner)."""
        return 2 * config.num_hidden_layers * config.num_key_value_heads * max_ctx * config.head_dim * 4

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
            f"offset={self.offset}/{self.max_ctx}, {self.nbytes / 2**20:.1f} MiB)"
        )

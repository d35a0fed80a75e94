"""Prompt lookup: draft tokens copied from earlier in the context.

When a model repeats what it has seen (code it is asked to edit, a quoted passage, a
list it enumerates), the tokens that followed the last occurrence of the current
n-gram are a good guess for what comes next. The engine verifies up to K such
guesses in one forward pass and keeps the prefix the model agrees with, so a pass
over the weights, which is what a token costs when they stream from disk, yields
several tokens. A wrong guess costs a few extra rows of arithmetic, never a different
result: greedy output is the same with and without drafts, and sampled output keeps
the model's distribution (``sampler.verify_draft``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

NGRAM_MAX = 3
NGRAM_MIN = 1


def lookup(tokens: Sequence[int], k: int, *, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the last n tokens.

    Longer n-grams are tried first (n = ngram_max .. ngram_min); the most recent match
    wins; a match must have at least one token after it.

    Args:
        tokens: the context (prompt + generated so far).
        k: most tokens to propose (0 = none).

    Returns:
        The draft (possibly empty).

    Example:
        >>> lookup([5, 6, 7, 8, 1, 5, 6], 3)
        [7, 8, 1]
    """
    n_tok = len(tokens)
    if k <= 0 or n_tok < 2:
        return []
    arr = np.asarray(tokens, np.int64)
    for n in range(min(ngram_max, n_tok - 1), ngram_min - 1, -1):
        tail = arr[n_tok - n:]
        # candidate starts i with arr[i:i+n] == tail and i + n < n_tok (something follows)
        starts = np.flatnonzero(arr[: n_tok - n] == tail[0])
        for j in range(1, n):
            starts = starts[arr[starts + j] == tail[j]]
        if starts.size:
            i = int(starts[-1]) + n
            return arr[i:i + k].tolist()
    return []

"""Sampling: logits -> next token id. Pure numpy, no model knowledge.

Like mlx-lm's ``sample_utils``: :func:`make_sampler` returns a function
``logits -> token id``; logits processors are plain functions
``(tokens, logits) -> logits`` that run before it (penalties).

Order of the sampler chain (llama.cpp's default): top-k -> top-p -> min-p ->
temperature -> draw. Top-p and min-p look at the probabilities at temperature 1,
as in llama.cpp and mlx-lm; temperature only reshapes what survives.

Example:
    >>> sampler = make_sampler(temperature=0.7, top_p=0.9, seed=0)
    >>> procs = make_logits_processors(repetition_penalty=1.1)
    >>> for p in procs:
    ...     logits = p(tokens, logits)
    >>> token = sampler(logits)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from flashlm.errors import InputError

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[Sequence[int], np.ndarray], np.ndarray]

# The filters first look only at tokens whose logit is within delta of the max,
# for these deltas in turn, then at the whole vocabulary (see _candidates).
_DELTAS = (8.0, 16.0, 32.0)
_BLOCK = 1024  # block size of the two-level draw (_draw)


# ---- validation ----

def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_sampler_args(temperature: float, top_k: int, top_p: float, min_p: float,
                        seed: int | None) -> None:
    if not _is_num(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature={temperature!r} is invalid: use a number >= 0 "
                         "(0 = greedy)")
    if not _is_int(top_k) or top_k < 0:
        raise InputError(f"top_k={top_k!r} is invalid: use an integer >= 0 (0 = off)")
    if not _is_num(top_p) or not (0.0 < top_p <= 1.0):
        raise InputError(f"top_p={top_p!r} is invalid: use a number in (0, 1] (1 = off)")
    if not _is_num(min_p) or not (0.0 <= min_p <= 1.0):
        raise InputError(f"min_p={min_p!r} is invalid: use a number in [0, 1] (0 = off)")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InputError(f"seed={seed!r} is invalid: use an integer >= 0, or None "
                         "for a random seed")


def _check_penalty_args(repetition_penalty: float, presence_penalty: float,
                        frequency_penalty: float, window: int) -> None:
    if (not _is_num(repetition_penalty) or not math.isfinite(repetition_penalty)
            or repetition_penalty <= 0):
        raise InputError(f"repeat_penalty={repetition_penalty!r} is invalid: use a "
                         "number > 0 (1 = off)")
    for name, v in (("presence_penalty", presence_penalty),
                    ("frequency_penalty", frequency_penalty)):
        if not _is_num(v) or not (-2.0 <= v <= 2.0):
            raise InputError(f"{name}={v!r} is invalid: use a number in [-2, 2] (0 = off)")
    if not _is_int(window) or window < -1:
        raise InputError(f"repeat_last_n={window!r} is invalid: use an integer >= -1 "
                         "(0 = off, -1 = all tokens)")


# ---- sampler ----

def _as_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array (vocab,), got shape {x.shape}")
    return x.astype(np.float32, copy=False)  # float32 exp is ~10x faster than float64


def _candidates(x: np.ndarray, mx: float, top_k: int, top_p: float,
                min_p: float) -> tuple[np.ndarray, float | None]:
    """Token ids that surely hold everything the filters keep, in id order.

    The filters keep tokens from the top of the distribution, so a threshold
    ``logit >= max - delta`` (widened until it holds the top k tokens, or mass
    >= top_p) narrows 150k tokens to a few without sorting.

    Returns:
        (candidate ids, sum of exp(x - max) over the whole vocabulary when top-p
        needs it to normalize, else None).
    """
    if top_k == 0 and top_p >= 1.0:
        if min_p > 0.0:
            return np.flatnonzero(x >= mx + math.log(min_p)), None
        return np.arange(x.size), None
    total = None
    if top_k == 0:
        e = np.exp(x - mx)
        total = float(e.sum(dtype=np.float64))
    for delta in _DELTAS:
        idx = np.flatnonzero(x >= mx - delta)
        if top_k and idx.size >= top_k:
            return idx, None
        if not top_k and float(e[idx].sum(dtype=np.float64)) >= top_p * total:
            return idx, total
    return np.arange(x.size), total


def _top_k(idx: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k largest logits. idx: candidate token ids, x: their logits."""
    if k <= 0 or k >= x.size:
        return idx, x
    keep = np.argpartition(x, x.size - k)[x.size - k:]
    return idx[keep], x[keep]


def _top_p(idx: np.ndarray, x: np.ndarray, p: float,
           total: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the smallest set of most likely tokens whose probability sums to >= p.

    ``total``: the softmax denominator, sum of exp(logit - max(x)), when x is only
    the top of a larger distribution; None = x is the whole distribution.
    """
    if p >= 1.0:
        return idx, x
    e = np.exp(x - x.max()).astype(np.float64)  # float32 exp, as in _candidates
    order = np.argsort(-e)
    cum = np.cumsum(e[order]) / (e.sum() if total is None else total)
    n = int(np.searchsorted(cum, p)) + 1  # first position where cum >= p
    keep = order[:min(n, order.size)]
    return idx[keep], x[keep]


def _min_p(idx: np.ndarray, x: np.ndarray, m: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep tokens with p >= m * p_max, i.e. logit >= max_logit + log(m)."""
    if m <= 0.0:
        return idx, x
    keep = x >= x.max() + math.log(m)
    return idx[keep], x[keep]


def _draw(w: np.ndarray, u: float) -> int:
    """Index i with probability w[i] / sum(w), for u uniform in [0, 1).

    Inverse CDF in two levels, so a 150k vocabulary needs block sums and one
    block's cumulative sum instead of a float64 cumsum of everything (~15x slower).
    """
    if w.size <= 2 * _BLOCK:
        cum = np.cumsum(w, dtype=np.float64)
        return min(int(np.searchsorted(cum, u * cum[-1], side="right")), w.size - 1)
    block_cum = np.cumsum(np.add.reduceat(w, np.arange(0, w.size, _BLOCK), dtype=np.float64))
    target = u * block_cum[-1]
    b = min(int(np.searchsorted(block_cum, target, side="right")), block_cum.size - 1)
    rest = target - (block_cum[b - 1] if b else 0.0)
    cum = np.cumsum(w[b * _BLOCK:(b + 1) * _BLOCK], dtype=np.float64)
    j = min(int(np.searchsorted(cum, rest, side="right")), cum.size - 1)
    return b * _BLOCK + j


def _filter(x: np.ndarray, mx: float, top_k: int, top_p: float,
            min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """top-k -> top-p -> min-p. Returns (kept token ids in id order, their logits)."""
    idx, total = _candidates(x, mx, top_k, top_p, min_p)
    xs = x[idx] if idx.size < x.size else x
    idx, xs = _top_k(idx, xs, top_k)
    idx, xs = _top_p(idx, xs, top_p, None if top_k else total)
    idx, xs = _min_p(idx, xs, min_p)
    if top_k or top_p < 1.0:  # they reorder: back to id order, so a seed gives one draw
        order = np.argsort(idx)
        idx, xs = idx[order], xs[order]
    return idx, xs


def make_sampler(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int | None = None) -> Sampler:
    """Build a function that picks the next token from a logits vector.

    Args:
        temperature: 0 picks the argmax (greedy; the other options are then
            ignored); > 0 divides the logits before the draw.
        top_k: keep only the k most likely tokens (0 = off).
        top_p: nucleus: keep the smallest set of most likely tokens whose
            probability sums to >= top_p (1 = off); always keeps one token.
        min_p: keep tokens whose probability is >= min_p * the top probability
            (0 = off).
        seed: seed of the sampler's own ``numpy.random.Generator``; the same seed
            and the same logits give the same tokens. None = random.

    Returns:
        ``sampler(logits) -> int`` where logits is a 1-D array (vocab,) (a
        (1, vocab) array is accepted too).

    Raises:
        InputError: an option outside its valid range.
    """
    _check_sampler_args(temperature, top_k, top_p, min_p, seed)
    if temperature == 0.0 or top_k == 1:
        def greedy(logits: np.ndarray) -> int:
            return int(np.argmax(_as_logits(logits)))

        def point_mass(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return np.array([greedy(logits)]), np.ones(1)

        greedy.distribution, greedy.rng = point_mass, None
        return greedy

    rng = np.random.default_rng(seed)
    inv_t = min(1.0 / float(temperature), 1e30)  # float32-safe: no 0 * inf
    filtered = top_k > 0 or top_p < 1.0 or min_p > 0.0

    def sample(logits: np.ndarray) -> int:
        x = _as_logits(logits)
        mx = float(x.max())
        if not filtered:
            return _draw(np.exp((x - mx) * np.float32(inv_t)), rng.random())
        idx, xs = _filter(x, mx, top_k, top_p, min_p)
        if idx.size == 1:
            return int(idx[0])
        w = np.exp((xs - mx) * np.float32(inv_t))  # (n,) float32 weights
        return int(idx[_draw(w, rng.random())])

    def distribution(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids in id order, their probabilities): what ``sample`` draws from."""
        x = _as_logits(logits)
        mx = float(x.max())
        idx, xs = (np.arange(x.size), x) if not filtered else _filter(x, mx, top_k, top_p, min_p)
        w = np.exp((xs - mx) * np.float32(inv_t)).astype(np.float64)
        return idx, w / w.sum()

    sample.distribution, sample.rng = distribution, rng
    return sample


def verify_draft(sampler: Sampler, logits: np.ndarray, draft: int) -> tuple[int, bool]:
    """Speculative sampling of one position whose draft token came from a deterministic
    proposer (prompt lookup: q(draft) = 1): accept ``draft`` with probability p(draft),
    else draw from p with ``draft`` removed. The token returned is distributed exactly as
    ``sampler(logits)`` (Leviathan et al. 2023, with a point-mass draft). Greedy: the
    argmax, accepted when it is the draft.

    Returns:
        (token, whether it is the draft).
    """
    if sampler.rng is None:  # greedy
        tok = sampler(logits)
        return tok, tok == draft
    ids, p = sampler.distribution(logits)
    j = int(np.searchsorted(ids, draft))
    pd = float(p[j]) if j < ids.size and ids[j] == draft else 0.0
    if sampler.rng.random() < pd:
        return int(draft), True
    if pd > 0.0:
        p = p.copy()
        p[j] = 0.0
    return int(ids[_draw(p, sampler.rng.random())]), False


# ---- logits processors ----

def _recent(tokens: Sequence[int], window: int) -> np.ndarray:
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    return t if window < 0 else t[max(t.size - window, 0):]


def make_repetition_penalty(penalty: float, window: int = 64) -> LogitsProcessor:
    """Penalize tokens seen in the last ``window`` tokens (llama.cpp / HF semantics).

    A positive logit is divided by ``penalty``, a negative one multiplied, once
    per distinct token however often it occurs.

    Args:
        penalty: > 0; 1 = off, > 1 discourages repeats.
        window: how many of the most recent tokens count; 0 = off, -1 = all.

    Returns:
        ``processor(tokens, logits) -> logits`` (a new array; the input is kept).
    """
    _check_penalty_args(penalty, 0.0, 0.0, window)

    def processor(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, copy=True)
        if window == 0:
            return out
        ids = np.unique(_recent(tokens, window))
        if ids.size:
            sel = out[..., ids]
            out[..., ids] = np.where(sel > 0, sel / penalty, sel * penalty)
        return out

    return processor


def make_presence_frequency_penalty(presence: float, frequency: float,
                                    window: int = 64) -> LogitsProcessor:
    """OpenAI penalties: ``logit -= presence * [count > 0] + frequency * count``.

    ``count`` is how often the token occurs in the last ``window`` tokens.

    Args:
        presence: in [-2, 2]; 0 = off.
        frequency: in [-2, 2]; 0 = off.
        window: how many of the most recent tokens count; 0 = off, -1 = all.

    Returns:
        ``processor(tokens, logits) -> logits`` (a new array; the input is kept).
    """
    _check_penalty_args(1.0, presence, frequency, window)

    def processor(tokens: Sequence[int], logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, copy=True)
        if window == 0:
            return out
        ids, counts = np.unique(_recent(tokens, window), return_counts=True)
        if ids.size:
            out[..., ids] -= (presence + frequency * counts).astype(out.dtype)
        return out

    return processor


def make_logits_processors(repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                           frequency_penalty: float = 0.0,
                           window: int = 64) -> list[LogitsProcessor]:
    """The processors for the given penalties, leaving out those that are off.

    Args:
        repetition_penalty: see :func:`make_repetition_penalty` (1 = off).
        presence_penalty: see :func:`make_presence_frequency_penalty` (0 = off).
        frequency_penalty: see :func:`make_presence_frequency_penalty` (0 = off).
        window: the last ``window`` tokens count (0 = off, -1 = all).

    Returns:
        A list of ``(tokens, logits) -> logits``, to apply in order.
    """
    _check_penalty_args(repetition_penalty, presence_penalty, frequency_penalty, window)
    procs: list[LogitsProcessor] = []
    if window == 0:
        return procs
    if repetition_penalty != 1.0:
        procs.append(make_repetition_penalty(repetition_penalty, window))
    if presence_penalty != 0.0 or frequency_penalty != 0.0:
        procs.append(make_presence_frequency_penalty(presence_penalty, frequency_penalty,
                                                     window))
    return procs


# ---- parameters ----

@dataclass
class SamplingParams:
    """Everything that decides how tokens are drawn and when generation stops.

    Defaults are llama.cpp's (``llama-cli``). Invalid values raise
    :class:`~flashlm.errors.InputError` at construction.

    Attributes:
        temperature: >= 0; 0 = greedy.
        top_k: >= 0; 0 = off.
        top_p: in (0, 1]; 1 = off.
        min_p: in [0, 1]; 0 = off.
        repeat_penalty: > 0; 1 = off.
        presence_penalty: in [-2, 2]; 0 = off.
        frequency_penalty: in [-2, 2]; 0 = off.
        repeat_last_n: window of the penalties; 0 = off, -1 = all tokens.
        seed: >= 0, or None for a random seed.
        max_tokens: >= 1, or None for no limit but the context.
        stop: strings that end generation (not included in the output); a single
            string is accepted and wrapped in a list.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_sampler_args(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)
        _check_penalty_args(self.repeat_penalty, self.presence_penalty,
                            self.frequency_penalty, self.repeat_last_n)
        if self.max_tokens is not None and (not _is_int(self.max_tokens)
                                            or self.max_tokens < 1):
            raise InputError(f"max_tokens={self.max_tokens!r} is invalid: use an integer "
                             ">= 1, or None for no limit")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(
                isinstance(s, str) and s for s in self.stop):
            raise InputError(f"stop={self.stop!r} is invalid: use a list of non-empty strings")
        self.stop = list(self.stop)

    @classmethod
    def greedy(cls, **kwargs) -> "SamplingParams":
        """Greedy decoding (temperature 0), other fields as given."""
        return cls(temperature=0.0, **kwargs)

    def make_sampler(self) -> Sampler:
        """:func:`make_sampler` with these parameters."""
        return make_sampler(temperature=self.temperature, top_k=self.top_k,
                            top_p=self.top_p, min_p=self.min_p, seed=self.seed)

    def make_logits_processors(self) -> list[LogitsProcessor]:
        """:func:`make_logits_processors` with these parameters."""
        return make_logits_processors(self.repeat_penalty, self.presence_penalty,
                                      self.frequency_penalty, self.repeat_last_n)

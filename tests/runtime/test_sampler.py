"""Sampler and logits processors on hand-made logits."""
from __future__ import annotations

import math

import numpy as np
import pytest

from flashlm.errors import InputError
from flashlm.runtime.sampler import (SamplingParams, make_logits_processors,
                                     make_presence_frequency_penalty,
                                     make_repetition_penalty, make_sampler)


def logits_of(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def drawn(sampler, logits, n=2000) -> set[int]:
    return {sampler(logits) for _ in range(n)}


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


# ---- greedy ----

def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    s = make_sampler()
    assert s(x) == int(np.argmax(x))
    assert s(x[None, :]) == int(np.argmax(x))  # (1, vocab) accepted


def test_greedy_ignores_filters_and_picks_first_of_ties():
    x = np.array([0.0, 5.0, 5.0, 1.0], dtype=np.float32)
    assert make_sampler(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2)(x) == 1
    assert make_sampler(temperature=1.0, top_k=1, seed=0)(x) == 1  # top_k=1 is greedy


def test_tiny_temperature_is_greedy_not_nan():
    x = np.array([0.0, 1.0, 0.999, -np.inf], dtype=np.float32)
    for kw in ({}, {"top_p": 0.9}, {"top_k": 3}):
        assert drawn(make_sampler(temperature=1e-40, seed=0, **kw), x, n=50) == {1}


def test_bad_logits_shape():
    with pytest.raises(ValueError, match="1-D"):
        make_sampler()(np.zeros((2, 3), np.float32))


# ---- filters ----

def test_top_k_keeps_exactly_k():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(300).astype(np.float32)
    for k in (1, 2, 5, 17):
        # a huge temperature flattens what survives, so every kept token shows up
        s = make_sampler(temperature=1e4, top_k=k, seed=k)
        assert drawn(s, x, n=300 * k) == set(np.argsort(-x)[:k].tolist())


@pytest.mark.parametrize("p, expected", [
    (1e-6, {0}),
    (0.5 - 1e-6, {0}),
    (0.5 + 1e-6, {0, 1}),
    (0.75 - 1e-6, {0, 1}),
    (0.75 + 1e-6, {0, 1, 2}),
    (0.9 + 1e-6, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_boundary(p, expected):
    x = logits_of([0.5, 0.25, 0.15, 0.1])
    assert drawn(make_sampler(temperature=1e4, top_p=p, seed=0), x) == expected


def _filter_reference(x: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Full sort, llama.cpp order: top-k, top-p on the renormalized rest, min-p."""
    order = np.argsort(-x.astype(np.float64), kind="stable")
    if top_k:
        order = order[:top_k]
    probs = softmax(x[order].astype(np.float64))
    cum = np.cumsum(probs)
    if top_p < 1.0:
        n = int(np.argmax(cum >= top_p)) + 1 if cum[-1] >= top_p else len(order)
        order, probs = order[:n], probs[:n]
    if min_p > 0:
        order = order[probs >= min_p * probs[0]]
    return set(order.tolist())


@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("top_k, top_p, min_p", [
    (0, 0.9, 0.0), (0, 0.5, 0.0), (0, 0.99, 0.0), (40, 1.0, 0.0), (3000, 0.95, 0.0),
    (40, 0.95, 0.05), (0, 1.0, 0.1), (0, 0.95, 0.3), (100, 0.5, 0.0)])
def test_filters_match_full_sort_reference(scale, top_k, top_p, min_p):
    # scale 10: the mass is in a few tokens; scale 0.01: nearly flat, so the
    # threshold prefilter must widen to the whole vocabulary
    from flashlm.runtime.sampler import _filter
    rng = np.random.default_rng(int(scale * 100) + top_k)
    x = (scale * rng.standard_normal(20000)).astype(np.float32)
    idx, xs = _filter(x, float(x.max()), top_k, top_p, min_p)
    assert np.all(np.diff(idx) > 0) and np.array_equal(xs, x[idx])
    assert set(idx.tolist()) == _filter_reference(x, top_k, top_p, min_p)


@pytest.mark.parametrize("m, expected", [
    (0.0, {0, 1, 2, 3}),
    (0.2, {0, 1, 2, 3}),     # threshold 0.08
    (0.45, {0, 1, 2}),       # threshold 0.18
    (0.6, {0, 1}),           # threshold 0.24
    (0.9, {0}),              # threshold 0.36
    (1.0, {0}),
])
def test_min_p(m, expected):
    x = logits_of([0.4, 0.3, 0.2, 0.1])
    assert drawn(make_sampler(temperature=1e4, min_p=m, seed=0), x) == expected


def test_filter_order_top_k_then_top_p_renormalized():
    # after top-k=2 the kept probs are 0.4/0.7, 0.3/0.7 = 0.571, 0.429, so top-p 0.55
    # keeps one token (llama.cpp order); on the full distribution it would keep two
    x = logits_of([0.4, 0.3, 0.2, 0.1])
    assert drawn(make_sampler(temperature=1e4, top_k=2, top_p=0.55, seed=0), x) == {0}
    assert drawn(make_sampler(temperature=1e4, top_p=0.55, seed=0), x) == {0, 1}


def test_masked_logits_are_never_drawn():
    x = np.array([1.0, -np.inf, 0.5, -np.inf], dtype=np.float32)
    assert drawn(make_sampler(temperature=1e3, seed=0), x) == {0, 2}


# ---- temperature ----

@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_temperature_distribution(temp):
    x = np.array([2.0, 1.0, 0.0, -1.0, 0.5], dtype=np.float32)
    n = 20000
    s = make_sampler(temperature=temp, seed=123)
    freq = np.bincount([s(x) for _ in range(n)], minlength=x.size) / n
    expected = softmax(x / temp)
    tol = 5 * np.sqrt(expected * (1 - expected) / n)  # 5 standard errors per bin
    assert np.all(np.abs(freq - expected) <= tol), (freq, expected)
    # the test has power: the untempered distribution would be rejected
    if temp != 1.0:
        assert np.any(np.abs(freq - softmax(x)) > tol)


def test_draw_two_level_matches_inverse_cdf():
    from flashlm.runtime.sampler import _draw
    rng = np.random.default_rng(5)
    w = rng.random(151936).astype(np.float32) ** 8
    w[rng.random(w.size) < 0.3] = 0.0  # masked tokens are never drawn
    cum = np.cumsum(w.astype(np.float64))
    for u in rng.random(2000):
        i = _draw(w, u)
        assert w[i] > 0
        assert i == min(int(np.searchsorted(cum, u * cum[-1], side="right")), w.size - 1)
    assert _draw(w, 0.0) == int(np.flatnonzero(w)[0])


def test_temperature_distribution_large_vocab():
    # vocabulary > 2 blocks: the two-level draw; mass on a few tokens plus a flat tail
    x = np.full(10000, -4.0, dtype=np.float32)
    x[[7, 3000, 9999]] = [3.0, 2.0, 2.5]
    n = 20000
    s = make_sampler(temperature=0.7, seed=9)
    counts = np.bincount([s(x) for _ in range(n)], minlength=x.size)
    p = softmax(x.astype(np.float64) / 0.7)
    for ids in ([7], [3000], [9999], np.setdiff1d(np.arange(x.size), [7, 3000, 9999])):
        f, q = counts[ids].sum() / n, p[ids].sum()
        assert abs(f - q) <= 5 * np.sqrt(q * (1 - q) / n), (ids, f, q)


# ---- seeds ----

def test_same_seed_same_tokens_different_seed_different():
    rng = np.random.default_rng(3)
    logits = [rng.standard_normal(500).astype(np.float32) for _ in range(64)]

    def run(seed):
        s = make_sampler(temperature=1.0, top_p=0.95, min_p=0.01, seed=seed)
        return [s(x) for x in logits]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---- penalties ----

def test_repetition_penalty_exact():
    x = np.array([2.0, -1.0, 0.5, 3.0, -2.0], dtype=np.float32)
    out = make_repetition_penalty(2.0, window=64)([0, 1, 1, 4], x)
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, 3.0, -4.0])
    np.testing.assert_array_equal(x, [2.0, -1.0, 0.5, 3.0, -2.0])  # input kept
    assert out.dtype == np.float32


def test_repetition_penalty_window():
    x = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    tokens = [3, 0, 1]
    np.testing.assert_array_equal(make_repetition_penalty(2.0, window=2)(tokens, x),
                                  [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(make_repetition_penalty(2.0, window=-1)(tokens, x),
                                  [1.0, -2.0, 0.5, 1.5])
    np.testing.assert_array_equal(make_repetition_penalty(2.0, window=0)(tokens, x), x)
    np.testing.assert_array_equal(make_repetition_penalty(2.0)([], x), x)


def test_presence_frequency_penalty_exact():
    x = np.array([1.0, 1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    out = make_presence_frequency_penalty(0.5, 0.25)(np.array([0, 1, 1, 4, 4, 4]), x)
    np.testing.assert_allclose(out, [1 - 0.75, 1 - 1.0, 1.0, 1.0, 1 - 1.25], rtol=0, atol=1e-7)
    out = make_presence_frequency_penalty(0.0, 1.0, window=2)([0, 1, 1, 4, 4, 4], x)
    np.testing.assert_allclose(out, [1.0, 1.0, 1.0, 1.0, -1.0], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(x, 1.0)


def test_make_logits_processors():
    assert make_logits_processors() == []
    assert make_logits_processors(1.3, window=0) == []
    procs = make_logits_processors(repetition_penalty=2.0, presence_penalty=1.0)
    assert len(procs) == 2
    x = np.array([2.0, -1.0, 0.0], dtype=np.float32)
    for p in procs:
        x = p([0, 1], x)
    np.testing.assert_allclose(x, [0.0, -3.0, 0.0])


# ---- parameters ----

@pytest.mark.parametrize("kwargs, word", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"seed": -3}, "seed"),
    ({"seed": 1.5}, "seed"),
])
def test_make_sampler_rejects_bad_values(kwargs, word):
    with pytest.raises(InputError, match=word):
        make_sampler(**kwargs)
    with pytest.raises(InputError, match=word):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, word", [
    ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop": [1]}, "stop"),
])
def test_sampling_params_rejects_bad_values(kwargs, word):
    with pytest.raises(InputError, match=word) as e:
        SamplingParams(**kwargs)
    assert "use" in str(e.value)  # says what is valid


def test_sampling_params_defaults_and_factories():
    p = SamplingParams(stop="\n\n", seed=1)
    assert p.stop == ["\n\n"]
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    x = np.array([0.0, 3.0, 1.0], dtype=np.float32)
    assert p.make_sampler()(x) in (0, 1, 2)
    assert p.make_logits_processors() == []
    assert SamplingParams.greedy().make_sampler()(x) == 1
    assert len(SamplingParams(repeat_penalty=1.1).make_logits_processors()) == 1
    assert not math.isnan(SamplingParams(top_p=1.0).top_p)

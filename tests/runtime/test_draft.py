"""Prompt-lookup drafts: the proposer, exact speculative sampling, and the engine's
verification (acceptance, cache trimming, limits) on a scripted model and a tiny real one."""
from __future__ import annotations

import numpy as np
import pytest
from synth import tiny_store

from flashlm.models import build_model
from flashlm.runtime.backend import KernelBackend
from flashlm.runtime.draft import lookup
from flashlm.runtime.engine import Engine
from flashlm.runtime.kvcache import KVCache
from flashlm.runtime.sampler import SamplingParams, make_sampler, verify_draft
from flashlm.runtime.tokenizer import Tokenizer


# ---- the proposer ----

def test_lookup_takes_what_followed_the_latest_match():
    assert lookup([5, 6, 7, 8, 1, 5, 6], 3) == [7, 8, 1]
    assert lookup([5, 6, 7, 9, 5, 6, 8, 2, 5, 6], 2) == [8, 2]  # the latest of two matches
    assert lookup([1, 2, 3, 9, 2, 3, 4, 7, 1, 2, 3], 2) == [9, 2]  # the 3-gram beats a later 2-gram
    assert lookup([1, 2, 3], 4) == [] and lookup([4], 3) == [] and lookup([1, 2, 1], 0) == []
    assert lookup([7, 8, 9, 7], 10) == [8, 9, 7]
    assert lookup([3, 4, 3, 4], 4, ngram_min=3) == []


# ---- exact speculative sampling ----

@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                                dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)])
@pytest.mark.parametrize("draft", [0, 3, 9])  # the likeliest token, a middling one, one filtered out
def test_verify_draft_keeps_the_distribution(kw, draft):
    logits = np.array([3.0, 1.0, 0.5, 2.5, -1.0, 0.0, 2.0, 1.5, -3.0, -9.0], np.float32)
    sampler = make_sampler(seed=0, **kw)
    ids, p = sampler.distribution(logits)
    want = np.zeros(10)
    want[ids] = p
    n = 40000
    got = np.zeros(10)
    accepted = 0
    for _ in range(n):
        tok, ok = verify_draft(sampler, logits, draft)
        got[tok] += 1
        accepted += ok
        assert ok == (tok == draft)
    assert np.abs(got / n - want).sum() / 2 < 0.012  # total variation, ~4 sigma at this n
    assert abs(accepted / n - want[draft]) < 0.012


def test_verify_draft_greedy_accepts_the_argmax_only():
    g = make_sampler(temperature=0.0)
    logits = np.array([0.1, 2.0, 1.0], np.float32)
    assert verify_draft(g, logits, 1) == (1, True)
    assert verify_draft(g, logits, 2) == (1, False)


# ---- the engine, with a scripted model ----

class CycleModel:
    """A fake model whose next token after t is (t + 1) % 16, unless t is 7 (then 3):
    so the text repeats and prompt lookup finds it. Tracks rows and cache positions."""

    class config:
        vocab_size, max_position_embeddings = 16, 512

    def __init__(self):
        self.rows, self.steps = [], 0

    def make_cache(self, n, *, kv="f32"):
        return KVCache(1, 1, 2, n, dtype=kv)

    def forward_batch(self, seqs, *, all_logits=False):
        out = []
        self.steps += 1
        for toks, pos, cache in seqs:
            toks = np.asarray(toks).reshape(-1)
            cache.reserve(len(toks))
            cache.k[0][0, cache.offset:cache.offset + len(toks), 0] = toks  # the cache remembers its inputs
            cache.advance(len(toks))
            self.rows.append(len(toks))
            lg = np.full((len(toks), 16), -5.0, np.float32)
            nxt = np.where(toks == 7, 3, (toks + 1) % 16)
            lg[np.arange(len(toks)), nxt] = 5.0
            out.extend(lg if all_logits else lg[-1:])
        return np.stack(out)


class ToyTokenizer:
    stop_token_ids = {15}

    def detokenizer(self):
        class D:
            def add(self, t):
                return f"<{t}>"

            def flush(self):
                return ""
        return D()


def run_engine(draft_max, prompt, **kw):
    m = CycleModel()
    eng = Engine(m, ToyTokenizer(), ctx=kw.pop("ctx", 64), draft_max=draft_max)
    caches = []
    orig = m.make_cache
    m.make_cache = lambda n, kv="f32": caches.append(orig(n, kv=kv)) or caches[-1]
    toks = [ev.token for ev in eng.generate([prompt], SamplingParams.greedy(**kw)) if ev.token is not None]
    return toks, eng.stats, m, caches[0]


def test_drafts_give_several_tokens_per_step_and_the_same_tokens():
    prompt = [3, 4, 5, 6, 7, 3, 4]
    plain, st0, m0, c0 = run_engine(0, prompt, max_tokens=20)
    drafted, st1, m1, c1 = run_engine(8, prompt, max_tokens=20)
    assert plain == drafted and len(plain) == 20
    assert st1.accepted > 10 and st1.decode_steps < st0.decode_steps / 3
    assert st1.tokens_per_step > 3
    # the cache holds exactly prompt + the fed tokens (the last token is never fed)
    n = len(prompt) + len(plain) - 1
    assert c1.offset == c0.offset == n
    np.testing.assert_array_equal(c1.k[0][0, :n, 0], c0.k[0][0, :n, 0])


def test_a_wrong_draft_is_trimmed_from_the_cache():
    # the model says 7 after 6, and 3 after 7; the prompt has 8 after "6 7": that draft is rejected
    prompt = [6, 7, 8, 9, 5, 6]
    plain, _, _, c0 = run_engine(0, prompt, max_tokens=6)
    drafted, st, m, c1 = run_engine(4, prompt, max_tokens=6)
    assert plain == drafted
    assert st.drafted > st.accepted
    assert c1.offset == c0.offset
    np.testing.assert_array_equal(c1.k[0][0, :c0.offset, 0], c0.k[0][0, :c0.offset, 0])


def test_drafts_respect_max_tokens_stop_and_context():
    prompt = [10, 11, 12, 13, 14, 10, 11]  # 12 13 14 15(stop)
    toks, st, m, _ = run_engine(8, prompt, max_tokens=50)
    assert toks == [12, 13, 14, 15]
    toks, st, m, _ = run_engine(8, [3, 4, 5, 6, 7, 3, 4], max_tokens=3)
    assert len(toks) == 3 and max(m.rows[1:]) <= 3  # decode steps: the pending token + at most 2 drafts
    toks, st, m, cache = run_engine(8, [3, 4, 5, 6, 7, 3, 4], ctx=12, max_tokens=100)
    assert cache.offset <= 12 and len(toks) == 12 - 7 + 1


# ---- the engine, with a tiny real model ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    store = tiny_store(tmp_path_factory.mktemp("d"), arch="qwen2", n_layers=2, hidden=64, ffn=128)
    from flashlm.api import open_tokenizer

    return build_model(store.config, store, KernelBackend()), open_tokenizer(store)


def test_sampled_tokens_keep_their_distribution_with_drafts(tiny):
    """Token frequencies over 300 seeds, with and without drafts: the same distribution."""
    model, tok = tiny
    base = list(np.random.default_rng(0).integers(0, 250, 6))
    greedy = Engine(model, tok, ctx=64)
    cont = [ev.token for ev in greedy.generate([base], SamplingParams.greedy(max_tokens=8))]
    prompt = base + cont + base  # the model's likeliest continuation is in the prompt: lookup proposes it
    params = dict(temperature=1.5, top_k=6, top_p=1.0, min_p=0.0, max_tokens=3)
    counts, drafted = {}, 0
    for draft in (0, 4):
        eng = Engine(model, tok, ctx=64, draft_max=draft)
        c = np.zeros((3, model.config.vocab_size))
        for seed in range(300):
            toks = [ev.token for ev in eng.generate([prompt], SamplingParams(seed=seed, **params))
                    if ev.token is not None]
            for j, t in enumerate(toks):
                c[j, t] += 1
            drafted += eng.stats.drafted
        counts[draft] = c / 300
    assert drafted > 100  # the drafted path was exercised
    tv = np.abs(counts[0] - counts[4]).sum(axis=1) / 2
    assert tv.max() < 0.16, tv  # 6 outcomes, 300 draws: sampling noise is ~0.07


def test_greedy_is_the_same_with_drafts_on_a_tiny_model(tiny):
    model, tok = tiny
    rng = np.random.default_rng(3)
    base = list(rng.integers(0, 250, 8))
    prompt = base * 3
    outs = []
    for draft in (0, 6):
        eng = Engine(model, tok, ctx=96, draft_max=draft)
        outs.append([ev.token for ev in eng.generate([prompt], SamplingParams.greedy(max_tokens=24))])
    assert outs[0] == outs[1]

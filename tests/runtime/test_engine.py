"""Engine and API on a tiny synthetic model: batches, stops, limits, cancel, errors."""
from __future__ import annotations

import numpy as np
import pytest
from synth import write_tiny_gguf

import flashlm
from flashlm.errors import BudgetError, InputError, ModelNotFoundError
from flashlm.runtime.sampler import SamplingParams


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    src = write_tiny_gguf(d / "tiny.gguf", arch="qwen2", hidden=64, ffn=128)
    from flashlm.models.gguf_import import import_gguf

    store = import_gguf(src, d / "store")
    llm = flashlm.load(store, threads=2, ctx=64)
    yield llm
    llm.close()


def gen(llm, prompts, **kw):
    params = SamplingParams(**{"temperature": 0.0, **kw})
    out = {i: [] for i in range(len(prompts))}
    reasons = {}
    for ev in llm.engine.generate(prompts, params):
        if ev.token is not None and ev.token not in llm.tokenizer.stop_token_ids:
            out[ev.seq].append(ev.token)
        if ev.finished:
            reasons[ev.seq] = ev.finish_reason
    return out, reasons


def test_batch_equals_each_alone(tiny_llm):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, n)) for n in (3, 11, 1, 7)]
    batch, _ = gen(tiny_llm, prompts, max_tokens=12)
    for i, p in enumerate(prompts):
        alone, _ = gen(tiny_llm, [p], max_tokens=12)
        assert batch[i] == alone[0], i


def test_max_tokens_and_reason(tiny_llm):
    out, reasons = gen(tiny_llm, [[5, 6, 7]], max_tokens=5)
    assert reasons[0] in ("length", "stop")
    if reasons[0] == "length":
        assert len(out[0]) == 5


def test_context_limit_ends_generation(tiny_llm):
    out, reasons = gen(tiny_llm, [list(range(60))], max_tokens=100)
    # 4 free positions hold 4 fed-back tokens; the 5th is sampled from the last one
    assert len(out[0]) <= 64 - 60 + 1 and reasons[0] in ("length", "stop")


def test_stop_token_ends_sequence(tiny_llm):
    eos = tiny_llm.tokenizer.eos_token_id
    forced = SamplingParams(temperature=0.0, max_tokens=10)
    forced_sampler = lambda logits: eos  # noqa: E731
    params = SamplingParams(temperature=0.0, max_tokens=10)
    params.make_sampler = lambda: forced_sampler
    evs = list(tiny_llm.engine.generate([[1, 2, 3]], params))
    assert len(evs) == 1 and evs[0].finished and evs[0].finish_reason == "stop" and evs[0].token == eos
    assert forced.max_tokens == 10


def test_stop_string_cuts_text(tiny_llm):
    full = "".join(tiny_llm.stream("hello", raw=True, temperature=0, max_tokens=16))
    if len(full) < 4:
        pytest.skip("the tiny model produced too little text to cut")
    stop = full[2:4]
    cut = "".join(tiny_llm.stream("hello", raw=True, temperature=0, max_tokens=16, stop=[stop]))
    assert cut == full[: full.index(stop)]


def test_same_seed_same_tokens(tiny_llm):
    a = gen(tiny_llm, [[1, 2, 3]], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=10)[0]
    b = gen(tiny_llm, [[1, 2, 3]], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, max_tokens=10)[0]
    assert a == b


def test_cancel(tiny_llm):
    it = tiny_llm.engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=50))
    first = next(it)
    tiny_llm.engine.cancel()
    rest = list(it)
    assert not first.finished or first.finish_reason == "stop"
    assert len(rest) <= 2 and (first.finished or rest[-1].finished)


def test_stats(tiny_llm):
    gen(tiny_llm, [[1, 2, 3, 4]], max_tokens=4)
    st = tiny_llm.stats
    assert st.prompt_tokens == 4 and 1 <= st.generated_tokens <= 4
    assert st.peak_rss > 0 and st.prefill_s > 0


def test_errors(tiny_llm):
    with pytest.raises(InputError, match="prompt is empty"):
        gen(tiny_llm, [[]])
    with pytest.raises(InputError, match=r"is 64 tokens, which does not fit the context of 64"):
        gen(tiny_llm, [list(range(64))])
    with pytest.raises(InputError, match="outside the vocabulary"):
        gen(tiny_llm, [[10**7]])
    with pytest.raises(InputError, match="temperature"):
        tiny_llm.generate("x", temperature=-1)


def test_load_errors(tmp_path, flashlm_home):
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        flashlm.load("nope")
    src = write_tiny_gguf(tmp_path / "t.gguf")
    with pytest.raises(BudgetError, match="raise --ram"):
        flashlm.load(src, ram="1K")
    with pytest.raises(InputError, match="not a size"):
        flashlm.load(src, ram="lots")


def test_generate_messages_and_batch_api(tiny_llm):
    one = tiny_llm.generate([{"role": "user", "content": "hello"}], temperature=0, max_tokens=5)
    assert isinstance(one, str)
    batch = tiny_llm.generate_batch(["hello", "world hello"], temperature=0, max_tokens=5)
    assert batch[0] == tiny_llm.generate("hello", temperature=0, max_tokens=5)
    assert tiny_llm.config.num_hidden_layers == 2 and tiny_llm.tokenizer.vocab_size > 256

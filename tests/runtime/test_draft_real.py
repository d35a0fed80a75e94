"""Prompt-lookup drafts on the real models, in RAM: greedy output identical with and
without them, and more than one token per pass on a code-editing prompt."""
from __future__ import annotations

import pytest
from realmodels import REAL_MODELS, real_store_path

import flashlm

CODE = '''def mean(xs):
    total = 0
    for x in xs:
        total += x
    return total / len(xs)


def variance(xs):
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)
'''
EDIT = "Repeat this code exactly, changing only the name of the function `variance` to `var`:\n\n" + CODE


@pytest.fixture(scope="module", params=REAL_MODELS)
def llm(request):
    with flashlm.load(real_store_path(request.param), ctx=1024, draft="ngram", draft_max=8) as m:
        yield m


@pytest.mark.parametrize("prompt", [EDIT, "Write a haiku about the sea."], ids=["code-edit", "haiku"])
def test_greedy_output_identical_with_and_without_drafts(llm, prompt):
    ids = llm.prompt_ids(prompt)
    params = flashlm.api.SamplingParams.greedy(max_tokens=48)
    with_drafts = [ev.token for ev in llm.engine.generate([ids], params)]
    drafted = llm.engine.stats
    llm.engine.draft_max = 0
    try:
        plain = [ev.token for ev in llm.engine.generate([ids], params)]
    finally:
        llm.engine.draft_max = 8
    assert with_drafts == plain
    if prompt is EDIT:
        assert drafted.tokens_per_step > 1.0 and drafted.accepted > 0

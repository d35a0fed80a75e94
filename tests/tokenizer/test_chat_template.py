"""Chat templates: environment semantics, message checks, and the models' own
templates against the golden prompts."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import pytest
from realmodels import GOLDEN, gguf_by_stem

from flashlm.errors import FlashlmError, InputError
from flashlm.runtime.chat_template import (ChatTemplate, ChatTemplateError,
                                           render_chat_template, validate_messages)
from flashlm.runtime.tokenizer import Tokenizer

GOLDEN_DIR = GOLDEN
GOLDEN = sorted(p.stem for p in GOLDEN_DIR.glob("*.json"))
USER = [{"role": "user", "content": "hi"}]


@lru_cache(maxsize=None)
def gguf_tokenizer_meta(stem: str) -> dict:
    """The ``tokenizer.*`` metadata of a GGUF (flashlm's own header parser when it is
    there: gguf.GGUFReader takes ~10 s on a 150k-token vocabulary)."""
    from flashlm.models.gguf_file import GGUFFile

    path = gguf_by_stem(stem)
    assert path.exists(), f"{path} is missing after pulling its model"
    return GGUFFile(path).tokenizer_meta()


def gguf_chat_template(stem: str) -> str:
    template = gguf_tokenizer_meta(stem).get("tokenizer.chat_template")
    if template is None:
        pytest.skip(f"{stem}.gguf has no tokenizer.chat_template")
    return template


def golden_cases(stem: str) -> list[dict]:
    return json.loads((GOLDEN_DIR / f"{stem}.json").read_text(encoding="utf-8"))["chat"]


# ---- golden prompts ----

@pytest.mark.parametrize("stem", GOLDEN)
def test_golden_prompt_text(stem):
    template = ChatTemplate(gguf_chat_template(stem))
    cases = golden_cases(stem)
    assert cases
    for case in cases:
        assert template.render(case["messages"], add_generation_prompt=True) == case["prompt"]


@pytest.mark.parametrize("stem", GOLDEN)
def test_golden_prompt_ids(stem):
    import flashlm.models.gguf_tokenizer as mod
    path = gguf_by_stem(stem)
    assert path.exists(), f"{path} is missing after pulling its model"
    meta = gguf_tokenizer_meta(stem)
    tok = Tokenizer.from_files(mod.tokenizer_json_from_gguf(meta, path),
                               chat_template=gguf_chat_template(stem),
                               special=mod.special_tokens(meta))
    for case in golden_cases(stem):
        prompt = tok.apply_chat_template(case["messages"])
        assert prompt == case["prompt"]
        assert tok.encode(prompt, add_special=True) == case["prompt_ids"]


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo <now> & later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "sunny"},
]


@pytest.mark.parametrize("stem", GOLDEN)
def test_matches_transformers_with_tools(stem):
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    source = gguf_chat_template(stem)
    for messages, tools in [(USER, None), (USER, TOOLS), (TOOL_CHAT, TOOLS)]:
        if "tool_calls" in json.dumps(messages) and "tool_calls" not in source:
            continue
        expected = hf.render_jinja_template([messages], tools=tools, chat_template=source,
                                            add_generation_prompt=True)
        expected = expected[0][0] if isinstance(expected, tuple) else expected
        assert render_chat_template(source, messages, tools=tools) == expected


# ---- environment ----

def test_trim_and_lstrip_blocks():
    src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert render_chat_template(src, USER * 2) == "[hi]\n[hi]\n"


def test_loopcontrols_and_variables():
    src = ("{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
           "{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
           "{{ eos_token }}{{ extra }}")
    out = render_chat_template(src, USER * 3, bos_token="<s>", eos_token="</s>", extra="!")
    assert out == "<s>hi></s>!"
    assert render_chat_template(src, USER, add_generation_prompt=False) == "hi"


def test_raise_exception_is_input_error():
    src = "{% if messages[0].role != 'system' %}{{ raise_exception('First message must be system') }}{% endif %}"
    with pytest.raises(InputError, match="First message must be system"):
        render_chat_template(src, USER)


def test_tojson_hf_semantics():
    data = {"z": 1, "a": "é<&>'", "l": [1, 2]}
    assert render_chat_template("{{ tools | tojson }}", USER, tools=data) == \
        '{"z": 1, "a": "é<&>\'", "l": [1, 2]}'  # no ASCII/HTML escaping, key order kept
    assert render_chat_template("{{ tools | tojson(indent=2) }}", USER, tools={"a": [1]}) == \
        '{\n  "a": [\n    1\n  ]\n}'
    assert render_chat_template("{{ tools | tojson(ensure_ascii=True) }}", USER,
                                tools=["é"]) == '["\\u00e9"]'


def test_strftime_now():
    out = render_chat_template("{{ strftime_now('%Y') }}", USER)
    assert out in {str(datetime.now().year), str(datetime.now().year - 1)}


def test_generation_tag_renders_body():
    assert render_chat_template("{% generation %}x{{ messages[0].content }}{% endgeneration %}",
                                USER) == "xhi"


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="line 2") as e:
        ChatTemplate("ok\n{% for m in messages %}{{ m }}")
    assert isinstance(e.value, FlashlmError)
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("   ")


def test_sandbox_blocks_mutation_and_internals():
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        render_chat_template("{% set x = [] %}{{ x.append(1) }}", USER)
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__ }}", USER)
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", USER)
    ns = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    assert render_chat_template(ns, USER * 3) == "3"


def test_template_runtime_error():
    with pytest.raises(ChatTemplateError, match="failed"):
        render_chat_template("{{ messages[0].content + 1 }}", USER)


def test_inputs_are_plain_data():
    import numpy as np
    out = render_chat_template("{{ tools | tojson }}", USER, tools=[np.int64(3), (1, 2), object()])
    assert out == '[3, [1, 2], "<object>"]'


# ---- messages ----

def test_validate_messages_ok_and_parts_joined():
    msgs = [{"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}], "name": "bob"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
    out = validate_messages(msgs)
    assert out[1] == {"role": "user", "content": "a\nb", "name": "bob"}
    assert out[2]["content"] is None
    assert msgs[1]["content"][0] == {"type": "text", "text": "a"}  # input untouched
    assert render_chat_template("{{ messages[1].content }}", msgs) == "a\nb"


@pytest.mark.parametrize("messages, where", [
    ("hello", "list"),
    ([["user", "hi"]], r"messages\[0\]"),
    ([{"content": "hi"}], r"messages\[0\]\['role'\]"),
    ([{"role": 3, "content": "hi"}], r"messages\[0\]\['role'\]"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], r"messages\[1\]\['content'\]"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\]"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}],
     r"messages\[0\]\['content'\]\[0\]"),
    ([{"role": "assistant", "content": None}], r"messages\[0\]\['content'\]"),
])
def test_validate_messages_rejects(messages, where):
    with pytest.raises(InputError, match=where):
        validate_messages(messages)
    with pytest.raises(InputError, match=where):
        render_chat_template("x", messages)

"""Chat templates that try to leave the sandbox (attribute escapes, the payload of
CVE-2024-34359, which ran shell commands through llama-cpp-python) or to exhaust memory:
each renders as a ChatTemplateError, nothing runs, nothing is written; the same template
inside a GGUF gives `error: ...` from `flashlm run` and a 500 from the server."""
from __future__ import annotations

import subprocess
import sys

import pytest
from synth import write_tiny_gguf

from flashlm.runtime.chat_template import ChatTemplate, ChatTemplateError

MSGS = [{"role": "user", "content": "hi"}]


def cve_payload(marker) -> str:
    # CVE-2024-34359 (llama-cpp-python < 0.2.72): a GGUF's chat template runs os.popen
    return ("{% for x in ().__class__.__base__.__subclasses__() %}{% if \"warning\" in x.__name__ %}"
            "{{x()._module.__builtins__['__import__']('os').popen(\"touch " + str(marker) + "\")}}"
            "{%endif%}{% endfor %}")


ESCAPES = {
    "__class__": "{{ ''.__class__ }}",
    "__mro__ and __subclasses__": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "__subclasses__ in a loop": "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "cycler.__init__.__globals__": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner.__init__.__globals__": "{{ joiner.__init__.__globals__['__builtins__'] }}",
    "function __globals__": "{{ raise_exception.__globals__ }}",
    "self.__init__": "{{ self.__init__.__globals__.__builtins__.open('/etc/passwd').read() }}",
    "message dict __class__": "{{ messages[0].__class__.__init__ }}",
    "getattr filter": "{{ messages|attr('__class__') }}",
    "namespace underscore": "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "format string": "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
    "mutating the messages": "{{ messages.append({'role': 'x'}) }}",
    "mutating a dict": "{{ messages[0].update({'content': 'pwned'}) }}",
    "huge range": "{% for i in range(10**9) %}{% endfor %}",
    "huge string": "{{ 'a' * 10**10 }}",
    "huge list": "{{ (messages * 10**9)|length }}",
    "huge power": "{{ 2 ** 100000000 }}",
    "huge output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_escapes_are_errors(case):
    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatTemplate(ESCAPES[case]).render(MSGS)


def test_the_cve_payload_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ChatTemplateError, match="not allowed"):
        ChatTemplate(cve_payload(marker)).render(MSGS)
    assert not marker.exists()
    assert MSGS == [{"role": "user", "content": "hi"}]


def test_a_normal_template_still_renders():
    tpl = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m['content'] | trim }}{% if not loop.last %}|"
                       "{% endif %}{% endfor %}{% if tools %}T{% endif %}{{ 'ab' * 3 }}{{ 2 ** 10 }}")
    assert tpl.render(MSGS + [{"role": "assistant", "content": " yo "}]) == "<user>hi|<assistant>yoababab1024"


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    """A tiny model whose GGUF carries the CVE payload as its chat template."""
    import gguf

    from flashlm.models.gguf_import import import_gguf

    d = tmp_path_factory.mktemp("hostile")
    marker = d / "pwned"
    real = gguf.GGUFWriter.add_chat_template
    gguf.GGUFWriter.add_chat_template = lambda self, _t: real(self, cve_payload(marker))
    try:
        src = write_tiny_gguf(d / "evil.gguf", arch="qwen2")
    finally:
        gguf.GGUFWriter.add_chat_template = real
    store = import_gguf(src, d / "store")
    assert "__subclasses__" in (store / "chat_template.jinja").read_text()
    return store, marker


def test_run_with_a_hostile_template_is_an_error(hostile_store):
    store, marker = hostile_store
    r = subprocess.run([sys.executable, "-m", "flashlm", "run", str(store), "hi", "-n", "2"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: chat template failed") and "Traceback" not in r.stderr
    assert not marker.exists()


def test_server_with_a_hostile_template_answers_500(hostile_store):
    from starlette.testclient import TestClient

    import flashlm
    from flashlm.server.app import create_app

    store, marker = hostile_store
    with flashlm.load(store, threads=1, ctx=64) as llm, TestClient(create_app(llm, model_id="evil")) as c:
        r = c.post("/v1/chat/completions", json={"model": "evil", "messages": MSGS})
        assert r.status_code == 500 and "not allowed in a chat template" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": "evil", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200  # raw completions do not use the template
    assert not marker.exists()

"""CLI generation commands on a tiny model: run (text and --json), perplexity, bench, chat, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from synth import write_tiny_gguf

from flashlm.cli import main


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from flashlm.models.gguf_import import import_gguf

    d = tmp_path_factory.mktemp("cli")
    return str(import_gguf(write_tiny_gguf(d / "t.gguf", arch="qwen2"), d / "store"))


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "flashlm", *args], capture_output=True, text=True, input=stdin)


def test_run_json(tiny_store, capsys):
    assert main(["run", tiny_store, "hello", "-n", "6", "--temp", "0", "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "tokens", "prompt_tokens", "stats"}
    assert 1 <= len(out["tokens"]) <= 6 and out["prompt_tokens"] > 1
    assert out["stats"]["generated_tokens"] >= len(out["tokens"])


def test_run_streams_text_and_stats(tiny_store, capsys):
    assert main(["run", tiny_store, "hello", "-n", "6", "--temp", "0", "--raw"]) == 0
    cap = capsys.readouterr()
    assert "tok/s" in cap.err and "peak RSS" in cap.err


def test_run_json_same_seed_same_tokens(tiny_store, capsys):
    outs = []
    for _ in range(2):
        assert main(["run", tiny_store, "hello", "-n", "8", "--temp", "1", "--seed", "3", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert outs[0] == outs[1]


def test_run_messages_file(tiny_store, tmp_path, capsys):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]))
    assert main(["run", tiny_store, "--messages", str(f), "-n", "3", "--temp", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] > 5


@pytest.mark.parametrize("content,message", [
    ('{"role": "user"}', "messages must be a list"),
    ('[{"role": "user"}]', "messages[0]"),
    ('[{"content": "hi"}]', "messages[0]['role']"),
    ("not json", "not valid JSON"),
])
def test_run_bad_messages_file(tiny_store, tmp_path, content, message):
    f = tmp_path / "m.json"
    f.write_text(content)
    r = run_cli("run", tiny_store, "--messages", str(f))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args,message", [
    (["hello", "--ctx", "4"], "does not fit the context of 4"),
    (["  "], "the prompt is empty"),
    (["hi", "--temp", "-1"], "temperature=-1.0 is invalid"),
    (["hi", "--top-p", "0"], "top_p=0.0 is invalid"),
    (["hi", "--threads", "0"], "--threads 0 is invalid"),
])
def test_run_bad_input(tiny_store, args, message):
    r = run_cli("run", tiny_store, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("cmd", ["run", "chat", "perplexity", "bench", "plan", "serve"])
def test_bad_kv_is_refused_before_the_model_is_looked_up(flashlm_home, tmp_path, cmd):
    (tmp_path / "t.txt").write_text("some text")
    extra = {"run": ["hi"], "perplexity": [str(tmp_path / "t.txt")], "serve": ["--port", "0"]}.get(cmd, [])
    r = run_cli(cmd, "no-such-model", *extra, "--kv", "bogus")
    assert r.returncode == 2 and "--kv 'bogus' is invalid: use f16 or f32" in r.stderr, r.stderr
    assert "unknown model" not in r.stderr and "Traceback" not in r.stderr


def test_kv_choice_reaches_the_cache_and_the_plan(tiny_store, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 40)
    ppl = {}
    for kv in ("f32", "f16"):
        assert main(["perplexity", tiny_store, str(f), "--ctx", "16", "--chunks", "2", "--json", "--kv", kv]) == 0
        ppl[kv] = json.loads(capsys.readouterr().out)["perplexity"]
        assert main(["plan", tiny_store, "--ctx", "64", "--json", "--kv", kv]) == 0
        p = json.loads(capsys.readouterr().out)
        assert p["kv"] == kv and p["kv_bytes"] > 0
        ppl[kv + "_bytes"] = p["kv_bytes"]
        assert main(["bench", tiny_store, "-p", "8", "-n", "2", "--json", "--kv", kv]) == 0
        assert json.loads(capsys.readouterr().out)["kv"] == kv
    assert ppl["f32_bytes"] == 2 * ppl["f16_bytes"]
    assert ppl["f16"] != ppl["f32"] and abs(ppl["f16"] / ppl["f32"] - 1) < 0.01


def test_exact_choice_reaches_the_kernels(tmp_path, capsys):
    """--exact runs the float32 kernels, the default the integer path (a Q4_K model: it has integer
    kernels where the CPU has AVX2): bench says which, and the greedy logits differ between them."""
    from flashlm.kernels import matmul
    from flashlm.models.gguf_import import import_gguf

    store = str(import_gguf(write_tiny_gguf(tmp_path / "k.gguf", arch="qwen2", fmt="Q4_K", hidden=256, ffn=512,
                                            extra_tensor_fmt={"token_embd.weight": "F16"}), tmp_path / "store"))
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 40)
    ppl = {}
    for exact in (True, False):
        flag = ["--exact"] if exact else []
        assert main(["bench", store, "-p", "8", "-n", "2", "--json", *flag]) == 0
        assert json.loads(capsys.readouterr().out)["exact"] is (exact or not matmul.INT_KERNELS)
        assert main(["perplexity", store, str(f), "--ctx", "16", "--chunks", "2", "--json", *flag]) == 0
        ppl[exact] = json.loads(capsys.readouterr().out)["perplexity"]
    if matmul.INT_KERNELS:
        assert ppl[True] != ppl[False] and abs(ppl[True] / ppl[False] - 1) < 0.01


def test_run_unknown_model(flashlm_home):
    r = run_cli("run", "no-such-model", "hi")
    assert r.returncode == 2 and "unknown model 'no-such-model'" in r.stderr and "Traceback" not in r.stderr


def test_run_prompt_from_stdin(tiny_store):
    r = run_cli("run", tiny_store, "-n", "3", "--temp", "0", "--json", stdin="hello")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_tokens"] > 1


def test_chat_piped(tiny_store):
    r = run_cli("chat", tiny_store, "-n", "3", "--temp", "0", stdin="hello\n/reset\nworld\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "(history cleared)" in r.stderr


def test_perplexity_and_bench(tiny_store, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 40)
    assert main(["perplexity", tiny_store, str(f), "--ctx", "16", "--chunks", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["chunks"] == 2 and r["scored_tokens"] == 30 and r["perplexity"] > 1
    assert main(["bench", tiny_store, "-p", "16", "-n", "4", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["prefill_tok_s"] > 0 and b["decode_tok_s"] > 0 and b["decode_weight_GB_s"] > 0


def test_perplexity_errors(tiny_store, tmp_path):
    r = run_cli("perplexity", tiny_store, str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    f = tmp_path / "short.txt"
    f.write_text("hello")
    r = run_cli("perplexity", tiny_store, str(f), "--ctx", "256")
    assert r.returncode == 2 and "fewer than one chunk" in r.stderr

"""User mistakes on the command line: each is `error: ...` and exit 2, checked before any
model is pulled (a bad option must not cost a download first); backend "auto" never falls
back to numpy silently; a broken install is an ImportError, not missing commands."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from synth import write_tiny_gguf

import flashlm
from flashlm.cli import build_parser, main
from flashlm.errors import UnsupportedError
from flashlm.offload.budget import parse_ram

M = "smollm2-135m"  # a catalog name: resolving it would pull it


@pytest.fixture
def no_pull(flashlm_home, monkeypatch):
    """An empty FLASHLM_HOME where pulling a model fails the test."""
    import flashlm.models.pull as pull

    def refuse(*a, **k):
        raise AssertionError("an option error must be found before the model is pulled")

    monkeypatch.setattr(pull, "pull_model", refuse)
    return flashlm_home


@pytest.fixture(scope="module")
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield str(s.getsockname()[1])
    s.close()


CASES = [
    (["run", M, "hi", "--ram", "infG"], "--ram 'infG' is not a size"),
    (["run", M, "hi", "--ram", "lots"], "is not a size"),
    (["run", M, "hi", "--ram=-5G"], "--ram"),
    (["run", M, "hi", "--threads", "0"], "--threads 0 is invalid"),
    (["run", M, "hi", "--ctx", "1"], "--ctx 1 is invalid"),
    (["run", M, "hi", "--temp", "-1"], "temperature=-1.0 is invalid"),
    (["run", M, "hi", "-n", "0"], "max_tokens=0 is invalid"),
    (["run", M, "hi", "--top-k", "-2"], "top_k=-2 is invalid"),
    (["run", M, "hi", "--draft-max", "99"], "--draft-max 99 is invalid"),
    (["run", M, "hi", "--system", "be brief", "--raw"], "--system has no effect with --raw"),
    (["run", M, "  "], "the prompt is empty"),
    (["run", M, "--messages", "/no/such/file.json"], "cannot read"),
    (["run", M, "hi", "--messages", "/no/such/file.json"], "give one of PROMPT, --messages or --prompts"),
    (["chat", M, "--top-p", "0"], "top_p=0.0 is invalid"),
    (["bench", M, "-p", "-1"], "-p -1 is invalid"),
    (["bench", M, "-n", "0"], "-n 0 is invalid"),
    (["bench", M, "-r", "0"], "-r 0 is invalid"),
    (["bench", M, "-p", "512", "-n", "64", "--ctx", "100"], "does not fit --ctx 100"),
    (["bench", M, "--ram", "1e"], "not a size"),
    (["perplexity", M, "README.md", "--chunks", "0"], "--chunks 0 is invalid"),
    (["perplexity", M, "/no/such/text.txt"], "cannot read"),
    (["plan", M, "--batch", "0"], "--batch 0 is invalid"),
    (["serve", M, "--port", "70000"], "--port 70000 is invalid"),
    (["serve", M, "--port", "0", "--max-batch", "0"], "--max-batch 0 is invalid"),
    (["serve", M, "--port", "0", "--max-queue", "-1"], "--max-queue -1 is invalid"),
    (["serve", M, "--port", "0", "--api-key", " "], "--api-key is empty"),
    (["serve", M, "--port", "0", "--max-body", "10"], "--max-body 10 is invalid"),
    (["serve", M, "--port", "0", "--ram", "lots"], "is not a size"),
    (["serve", M, "--port", "0", "--threads", "0"], "--threads 0 is invalid"),
    (["serve", M, "--host", "no-such-host.invalid", "--port", "0"], "cannot resolve"),
    (["serve", M, "--port", "BUSY"], "cannot listen on 127.0.0.1:"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a[2:]) or a[0] for a, _ in CASES])
def test_option_errors_come_before_any_download(no_pull, busy_port, args, message, capsys):
    args = [busy_port if a == "BUSY" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (no_pull / "models").exists() and not (no_pull / "downloads").exists()


@pytest.mark.parametrize("args,message", [
    (["bench", M, "-p", "-1"], "-p -1 is invalid"),
    (["run", M, "hi", "--ram", "infG"], "is not a size"),
])
def test_as_a_user_runs_it(flashlm_home, args, message):
    r = subprocess.run([sys.executable, "-m", "flashlm", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
    assert not (flashlm_home / "models").exists()


def test_ram_sizes():
    assert parse_ram("1e9").value == 10**9
    assert parse_ram("1.5G").value == int(1.5 * 2**30)
    for bad in ("infG", "nanM", "1e999", "-1G", "0", "", "G"):
        with pytest.raises(flashlm.errors.InputError, match="--ram"):
            parse_ram(bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "t.gguf", arch="qwen2")


def test_ctx_above_the_models_context_length(tiny, flashlm_home, capsys):
    assert main(["run", str(tiny), "hi", "--ctx", "100000"]) == 2
    assert "more than this model's context length (256)" in capsys.readouterr().err


def _break_kernels(monkeypatch):
    import flashlm.kernels

    for mod in ("matmul", "ops"):
        monkeypatch.setitem(sys.modules, f"flashlm.kernels.{mod}", None)
        monkeypatch.delattr(flashlm.kernels, mod, raising=False)


def test_backend_auto_never_falls_back_to_numpy(tiny, flashlm_home, monkeypatch, capsys):
    from flashlm.runtime.backend import NumpyBackend, get_backend

    _break_kernels(monkeypatch)
    for name in ("auto", "kernels"):
        with pytest.raises(UnsupportedError, match=r"kernels could not be loaded \((ModuleNotFound|Import)Error.*--backend numpy"):
            get_backend(name)
    assert isinstance(get_backend("numpy"), NumpyBackend)  # asked for by name, it is there
    assert main(["run", str(tiny), "hi", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "kernels could not be loaded" in err and "4-8x the memory" in err
    assert main(["run", str(tiny), "hi", "-n", "2", "--backend", "numpy", "--temp", "0"]) == 0


def test_a_broken_install_is_an_import_error(monkeypatch):
    import flashlm as pkg

    monkeypatch.setitem(sys.modules, "flashlm.cli_run", None)
    monkeypatch.delattr(pkg, "cli_run", raising=False)
    with pytest.raises(ImportError):
        build_parser()


def test_serve_without_the_server_packages(no_pull, monkeypatch, capsys):
    import flashlm.server

    monkeypatch.setitem(sys.modules, "flashlm.server.app", None)
    monkeypatch.delattr(flashlm.server, "app", raising=False)
    assert main(["serve", M, "--port", "0"]) == 2
    assert "pip install 'flashlm[serve]'" in capsys.readouterr().err

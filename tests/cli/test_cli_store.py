"""CLI store commands: convert, info, verify, list, pull errors; exit code 2 and no traceback on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from synth import write_tiny_gguf, write_tiny_hf

from flashlm.cli import main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flashlm", *args], capture_output=True, text=True, env=env)


def test_convert_gguf_info_verify(tmp_path, capsys, flashlm_home):
    src = write_tiny_gguf(tmp_path / "m.gguf", arch="qwen2")
    out = tmp_path / "store"
    assert main(["convert", str(src), str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "qwen2" and info["layers"] == 2
    assert info["formats"]["Q8_0S"]["tensors"] == 2 + 7 * 2  # Q8_0 as a store keeps it (column slabs)
    assert main(["verify", str(out)]) == 0
    assert "files ok" in capsys.readouterr().out
    layer = out / "layer_001.bin"
    b = bytearray(layer.read_bytes())
    b[0] ^= 1
    layer.write_bytes(bytes(b))
    assert main(["verify", str(out)]) == 1
    assert "checksum mismatch in layer_001.bin" in capsys.readouterr().err


def test_convert_hf_quant(tmp_path, capsys):
    write_tiny_hf(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "s"), "--quant", "q8_0", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    assert "Q8_0S" in json.loads(capsys.readouterr().out)["formats"]  # Q8_0 as a store keeps it


def test_convert_refuses_existing_out(tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["info", "no-such-model"], "unknown model 'no-such-model'"),
    (["tokenize", "no-such-model", "hi"], "unknown model"),
    (["pull", "no-such-model"], "unknown model 'no-such-model'; known models"),
    (["convert", "/nonexistent/x.gguf", "/tmp/flashlm-never"], "no such file or directory"),
    (["verify", "/nonexistent"], "not a flashlm store"),
])
def test_bad_input_exit_2_no_traceback(args, message, flashlm_home):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_gguf_exit_2(tmp_path, flashlm_home):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"XXXX" + bytes(64))
    r = run_cli("info", str(p))
    assert r.returncode == 2 and "bad.gguf: not a GGUF file (bad magic" in r.stderr and "Traceback" not in r.stderr


def test_list(tmp_path, capsys, flashlm_home):
    assert main(["list"]) == 0
    assert "no models yet" in capsys.readouterr().out
    src = write_tiny_gguf(tmp_path / "m.gguf")
    assert main(["info", str(src)]) == 0  # imports into FLASHLM_HOME/imported
    capsys.readouterr()
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "NAME" in out and "m-" in out and "llama" in out

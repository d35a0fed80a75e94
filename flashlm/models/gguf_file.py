"""A strict GGUF reader: header, metadata and tensor table, with bounds checked.

gguf-py's GGUFReader maps every tensor eagerly and fails on a damaged file with a
numpy reshape error; this reader parses the header itself so that every problem is a
:class:`~flashlm.errors.GGUFError` naming the file and what is wrong, then hands out
zero-copy views of tensor bytes from one memory map.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flashlm.errors import GGUFError, UnsupportedError
from flashlm.kernels.formats import GGUF_FORMATS, GGUF_ID_TO_NAME, tensor_nbytes

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_DEPTH = 8  # arrays of arrays: real files nest at most 2 deep
_MAX_DIM = 1 << 40  # elements along one dimension
# GGML type ids with names, for error messages about types flashlm does not run.
_GGML_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    fmt: str  # a flashlm.kernels.formats name
    shape: tuple[int, ...]  # logical numpy shape (rows, cols): GGUF dims reversed
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF file (ends inside the header, reading {what})")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: corrupt GGUF header: {what} is not UTF-8 text "
                            f"(byte {raw[e.start]:#04x} at offset {self.pos + e.start})") from None
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise GGUFError(f"{self.path}: corrupt GGUF metadata ({what} nests arrays more than {_MAX_DEPTH} deep)")
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NP_SCALARS:
                dt = np.dtype(_NP_SCALARS[etype])
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
            if etype not in (_STRING, _ARRAY):
                raise GGUFError(f"{self.path}: corrupt GGUF metadata (unknown value type {etype} in {what})")
            self.need(count * 8, what)  # each element takes at least 8 bytes: a lying count fails here
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise GGUFError(f"{self.path}: corrupt GGUF metadata (unknown value type {vtype} in {what})")


class GGUFFile:
    """Parse a GGUF file's header; tensor bytes are read through :meth:`tensor_bytes`.

    Raises:
        GGUFError: not a GGUF file, truncated, or a tensor whose data lies past the end.
        UnsupportedError: a tensor type flashlm does not run.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror})") from None
        if self.size < 24:
            raise GGUFError(f"{self.path}: not a GGUF file (only {self.size} bytes)")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self.data)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic {bytes(buf[:4])!r}, expected b'GGUF')")
        cur = _Cursor(buf, self.path)
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFError(f"{self.path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        self.meta: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            vtype = cur.scalar("<I", f"type of {key}")
            if key in self.meta:
                raise GGUFError(f"{self.path}: corrupt GGUF metadata (key {key!r} appears twice)")
            self.meta[key] = cur.value(vtype, key)
        raw = []
        seen: set[str] = set()
        for i in range(n_tensors):
            name = cur.string(f"tensor {i} name")
            if name in seen:
                raise GGUFError(f"{self.path}: corrupt GGUF header (tensor {name!r} appears twice)")
            seen.add(name)
            n_dims = cur.scalar("<I", f"dims of {name}")
            if not name or not 0 < n_dims <= 4:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (corrupt header)")
            dims = [cur.scalar("<Q", f"dims of {name}") for _ in range(n_dims)]
            if any(d == 0 or d > _MAX_DIM for d in dims):
                raise GGUFError(f"{self.path}: tensor {name} has dimensions {dims} (corrupt header)")
            ttype = cur.scalar("<I", f"type of {name}")
            offset = cur.scalar("<Q", f"offset of {name}")
            raw.append((name, dims, ttype, offset))
        align = self.meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1) or align > 1 << 20:
            raise GGUFError(f"{self.path}: corrupt GGUF metadata (general.alignment {align!r} is not a power of two)")
        self.data_start = cur.pos + (-cur.pos) % align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ttype, offset in raw:
            fmt = GGUF_ID_TO_NAME.get(ttype)
            if fmt is None:
                tname = _GGML_NAMES.get(ttype, f"type id {ttype}")
                raise UnsupportedError(
                    f"{self.path}: tensor {name} has type {tname}, which flashlm does not run "
                    f"(supported: {', '.join(GGUF_FORMATS)}); re-quantize the model to one of those"
                )
            shape = tuple(int(d) for d in reversed(dims)) or (1,)
            try:
                nbytes = tensor_nbytes(fmt, shape)
            except ValueError as e:
                raise GGUFError(f"{self.path}: tensor {name}: {e}") from None
            start = self.data_start + offset
            if start + nbytes > self.size:
                raise GGUFError(
                    f"{self.path}: tensor {name} data ({nbytes} bytes at offset {start}) lies past the "
                    f"end of the file ({self.size} bytes); the file is truncated or corrupt"
                )
            if offset % align:
                raise GGUFError(f"{self.path}: tensor {name} data offset {offset} is not a multiple of the "
                                f"alignment {align} (corrupt header)")
            self.tensors[name] = GGUFTensor(name, fmt, shape, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise GGUFError(f"{self.path}: tensors {an} and {bn} overlap (bytes {b0}..{min(a1, b1)}); "
                                "the file is corrupt")

    @property
    def architecture(self) -> str:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture in the GGUF metadata")
        return arch

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view of one tensor's stored bytes."""
        t = self.tensors[name]
        return self.data[t.offset : t.offset + t.nbytes]

    def tokenizer_meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k.startswith("tokenizer.")}

    def close(self) -> None:
        self.data = None  # type: ignore[assignment]

"""Where a model gets its weights: an object with ``tensor``, ``has``, ``layer`` (and ``experts``).

The model never opens files; it asks a weights source for tensors by GGUF name:

- ``tensor(name) -> QTensor`` for the global tensors ``token_embd.weight``,
  ``output_norm.weight`` and ``output.weight`` (absent when the embedding is tied;
  check with ``has(name)``);
- ``layer(i) -> dict[str, QTensor]`` for decoder block ``i``, keyed by the GGUF
  short names (``attn_norm.weight``, ``attn_q.weight``, ``attn_q.bias``, ...,
  ``ffn_down.weight``). The model calls it once per layer per forward, so a
  streaming source can hand out a different buffer every time. It holds the
  layer's dense tensors only; in a mixture-of-experts layer those include the
  router ``ffn_gate_inp.weight`` (experts, hidden), never an expert's matrices;
- ``experts(i, ids) -> dict[int, dict[str, QTensor]]`` for a mixture-of-experts
  block ``i`` (qwen3_moe): for a sorted sequence of expert ids,
  ``{e: {"ffn_gate.weight": ..., "ffn_up.weight": ..., "ffn_down.weight": ...}}``
  (gate and up (ffn, hidden), down (hidden, ffn)). The model calls it once per
  MoE layer per forward, after the router, with the union of the experts chosen
  by every row of the batch, so a streaming source reads each needed expert once
  per step (and may hand out different buffers every time).

In a store each expert's matrices are the tensors ``blk.{i}.expert.{e}.ffn_gate.weight``,
``...ffn_up.weight``, ``...ffn_down.weight``, written one after another (gate, up,
down) for e = 0 .. E-1 after all the layer's dense tensors, so one expert is one
contiguous, 4096-aligned byte range of ``layer_NNN.bin``. A GGUF file keeps them
as 3-D tensors ``blk.{i}.ffn_{gate,up,down}_exps.weight`` (experts, rows, cols).

:class:`DictWeights` keeps every tensor in a dict (tests, a GGUF read in place);
:func:`gguf_weights` reads a GGUF file with zero-copy views of its memory map.
The offload store (``flashlm.offload.store.Store``) offers the same interface.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from flashlm.errors import GGUFError, UnsupportedError
from flashlm.kernels.formats import FLOAT_DTYPES, GGUF_FORMATS, QTensor, row_nbytes
from flashlm.models.config import ModelConfig


class Weights(Protocol):
    """What a model needs from a weights source."""

    def tensor(self, name: str) -> QTensor: ...

    def has(self, name: str) -> bool: ...

    def layer(self, i: int) -> dict[str, QTensor]: ...

    def experts(self, i: int, ids, on_submit=None) -> dict[int, dict[str, QTensor]]: ...  # MoE models only


EXPERT_MATS = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")  # an expert's matrices, in store order
_EXPS = {"ffn_gate_exps.weight": "ffn_gate.weight", "ffn_up_exps.weight": "ffn_up.weight",
         "ffn_down_exps.weight": "ffn_down.weight"}  # GGUF 3-D tensor -> per-expert name


def expert_name(i: int, e: int, mat: str) -> str:
    """The store name of expert ``e``'s matrix ``mat`` (``ffn_gate.weight`` ...) in block ``i``."""
    return f"blk.{i}.expert.{e}.{mat}"


def is_expert(short: str) -> bool:
    """A layer-local name that belongs to the experts (``expert.3.ffn_up.weight``, ``ffn_up_exps.weight``)."""
    return short.startswith("expert.") or short in _EXPS


def expert_slice(t: QTensor, e: int) -> QTensor:
    """Expert ``e`` of a 3-D (experts, rows, cols) tensor: a zero-copy 2-D view."""
    return QTensor(t.data[e], t.fmt, tuple(t.shape[1:]))


# ---- a dict of tensors ----


class DictWeights:
    """Weights held in a dict keyed by full GGUF names (``blk.{i}.attn_q.weight``).

    Args:
        tensors: full GGUF name -> QTensor.

    Example:
        >>> w = DictWeights({"token_embd.weight": qt, "blk.0.attn_q.weight": q0})
        >>> w.layer(0)["attn_q.weight"] is q0
        True
    """

    resident = True  # tensors stay at their addresses (a decode program may hold them)

    def __init__(self, tensors: dict[str, QTensor]) -> None:
        self.tensors = dict(tensors)
        self._layers: dict[int, dict[str, QTensor]] = {}
        self._experts: dict[int, dict[int, dict[str, QTensor]]] = {}  # per-expert names
        self._exps: dict[int, dict[str, QTensor]] = {}  # GGUF 3-D tensors
        for name, t in self.tensors.items():
            if name.startswith("blk."):
                _, idx, short = name.split(".", 2)
                i = int(idx)
                if short.startswith("expert."):
                    _, e, mat = short.split(".", 2)
                    self._experts.setdefault(i, {}).setdefault(int(e), {})[mat] = t
                elif short in _EXPS:
                    self._exps.setdefault(i, {})[_EXPS[short]] = t
                    self._layers.setdefault(i, {})
                else:
                    self._layers.setdefault(i, {})[short] = t

    def tensor(self, name: str) -> QTensor:
        """The global tensor ``name``; KeyError naming it when absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"weights have no tensor {name!r}") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def layer(self, i: int) -> dict[str, QTensor]:
        """Dense tensors of decoder block ``i`` keyed by short name (a fresh dict; no expert matrices)."""
        if i not in self._layers:
            raise KeyError(f"weights have no tensors for layer {i}")
        return dict(self._layers[i])

    def experts(self, i: int, ids, on_submit=None) -> dict[int, dict[str, QTensor]]:
        """The matrices of experts ``ids`` of block ``i``: per-expert tensors, or zero-copy
        slices of the GGUF 3-D ``ffn_*_exps.weight`` tensors. (``on_submit``: for a source that
        reads experts; nothing is read here.)"""
        out: dict[int, dict[str, QTensor]] = {}
        per, exps = self._experts.get(i, {}), self._exps.get(i)
        for e in ids:
            e = int(e)
            if e in per:
                out[e] = dict(per[e])
            elif exps is not None and len(exps) == 3 and 0 <= e < exps["ffn_gate.weight"].shape[0]:
                out[e] = {m: expert_slice(exps[m], e) for m in EXPERT_MATS}
            else:
                raise KeyError(f"weights have no expert {e} in layer {i}")
        return out

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---- GGUF ----


def gguf_meta(reader: Any, *, skip_prefixes: tuple[str, ...] = ("tokenizer.ggml.",)) -> dict:
    """Metadata of an open ``gguf.GGUFReader`` as ``{key: python value}``.

    Args:
        reader: a ``gguf.GGUFReader``.
        skip_prefixes: keys to leave out (by default the large tokenizer arrays,
            except the special token ids).

    Returns:
        dict of key -> int/float/str/bool/list.
    """
    keep = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith(skip_prefixes) and key not in keep:
            continue
        meta[key] = field.contents()
    return meta


def qtensor_from_gguf(t: Any) -> QTensor:
    """A zero-copy QTensor of one ``gguf.ReaderTensor`` (shape = reversed GGUF shape)."""
    fmt = t.tensor_type.name
    if fmt not in GGUF_FORMATS:
        raise UnsupportedError(f"tensor {t.name}: GGUF type {fmt} is not supported")
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    data = np.asarray(t.data)
    if fmt in FLOAT_DTYPES:
        data = data.view(FLOAT_DTYPES[fmt]).reshape(shape)
    else:
        data = data.view(np.uint8).reshape(shape[:-1] + (row_nbytes(fmt, shape[-1]),))
    return QTensor(data, fmt, shape)


def gguf_weights(path: str | os.PathLike) -> tuple[ModelConfig, DictWeights]:
    """Open a GGUF model file in place (memory-mapped, nothing copied).

    Args:
        path: the .gguf file.

    Returns:
        (config, weights).

    Raises:
        GGUFError: the file cannot be read as GGUF.
    """
    import gguf

    from flashlm.models.gguf_import import config_from_gguf_meta  # the importer's, one source of truth

    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: cannot read as GGUF: {e}") from e
    tensors = {t.name: qtensor_from_gguf(t) for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor; not a language model file")
    config = config_from_gguf_meta(gguf_meta(reader), {k: t.shape for k, t in tensors.items()}, os.fspath(path))
    weights = DictWeights(tensors)
    weights.reader = reader  # keeps the memory map alive with the views
    return config, weights

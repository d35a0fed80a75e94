"""Golden data and the real models from the catalog, for real-model tests.

Real-model tests use the stores under FLASHLM_HOME (default ~/.cache/flashlm),
pulling a model on first use like `flashlm pull` does (the download is cached, so
only the first run pays for it). Set FLASHLM_SKIP_REAL=1 to skip them visibly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
if not GOLDEN.is_dir():  # CI clones main with shared/ beside it
    GOLDEN = Path(os.environ.get("FLASHLM_GOLDEN", "../shared/golden")).resolve()

REAL_MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def golden(name: str) -> dict:
    """The golden JSON of a catalog model (by its GGUF file stem)."""
    from flashlm.models.registry import catalog

    stem = Path(catalog()[name]["file"]).stem
    path = GOLDEN / f"{stem}.json"
    if not path.is_file():
        pytest.skip(f"golden data {path} not found (shared/ must sit beside the repo)")
    return json.loads(path.read_text())


def golden_logits(name: str):
    import numpy as np
    from flashlm.models.registry import catalog

    stem = Path(catalog()[name]["file"]).stem
    return np.load(GOLDEN / f"{stem}.logits.npz")


def reference_ids(name: str, text: str) -> list[int]:
    """transformers' token ids of ``text`` (the golden perplexity was computed on them; for
    smollm2 they differ from llama.cpp's, which flashlm follows)."""
    transformers = pytest.importorskip("transformers", reason="the parity extra (transformers) gives the reference ids")
    from flashlm.models.pull import gguf_path

    path = gguf_path(name)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tok(text, add_special_tokens=False)["input_ids"]


_pulled: dict[str, Path] = {}


def real_store_path(name: str) -> Path:
    """Store path of a catalog model, pulled on first use (cached in FLASHLM_HOME)."""
    if os.environ.get("FLASHLM_SKIP_REAL"):
        pytest.skip("FLASHLM_SKIP_REAL is set: real-model tests skipped")
    if name not in _pulled:
        from flashlm.models.pull import pull_model

        _pulled[name] = pull_model(name, progress=False)
    return _pulled[name]


def gguf_by_stem(stem: str) -> Path:
    """The GGUF file of the catalog model whose file stem is ``stem``, pulled on first use."""
    from flashlm.models.pull import gguf_path
    from flashlm.models.registry import catalog

    for name, entry in catalog().items():
        if Path(entry["file"]).stem == stem:
            real_store_path(name)
            return gguf_path(name)
    pytest.skip(f"no catalog model has the GGUF file {stem}.gguf")

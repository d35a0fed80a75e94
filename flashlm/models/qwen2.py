"""Qwen2 / Qwen2.5: the llama decoder with a bias on the q, k and v projections.

    x += Wo . attention(rope(Wq . norm(x) + bq), rope(Wk . norm(x) + bk), Wv . norm(x) + bv)

The forward pass is llama's (``flashlm.models.llama``), which adds a projection's
bias whenever the layer carries one; Qwen2 GGUF files keep q/k in the HF layout,
so the importer records rope "neox". One class, so the two cannot drift apart.
"""
from __future__ import annotations

from flashlm.models.llama import Model

__all__ = ["Model"]

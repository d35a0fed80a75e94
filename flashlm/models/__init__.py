"""What a model is: config, architectures (one module each), weights sources, importers."""
from __future__ import annotations

import importlib

from flashlm.errors import UnsupportedError
from flashlm.models.config import ARCH_ALIASES, ModelConfig


def get_model_class(model_type: str) -> type:
    """The ``Model`` class of an architecture, e.g. ``get_model_class("qwen2")``.

    ``model_type`` is the HF ``config.json`` name; ARCH_ALIASES maps it to the module
    in flashlm.models that implements it ("mistral" -> llama).

    Raises:
        UnsupportedError: no module implements ``model_type``.
    """
    module = ARCH_ALIASES.get(model_type)
    if module is None:
        raise UnsupportedError(
            f"model type {model_type!r} is not supported (supported: {', '.join(sorted(ARCH_ALIASES))})"
        )
    return importlib.import_module(f"flashlm.models.{module}").Model


def build_model(config: ModelConfig, weights, backend):
    """``get_model_class(config.model_type)(config, weights, backend)``."""
    return get_model_class(config.model_type)(config, weights, backend)


__all__ = ["ModelConfig", "build_model", "get_model_class"]

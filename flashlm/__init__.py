"""flashlm: run large language models on machines whose RAM is smaller than the model."""
from __future__ import annotations

from flashlm.errors import FlashlmError

__version__ = "0.1.0"
__all__ = ["FlashlmError", "load", "__version__"]


def load(model: str, **kwargs):
    """Load a model by name, store directory, GGUF file or HF directory. See flashlm.api.load."""
    from flashlm.api import load as _load

    return _load(model, **kwargs)

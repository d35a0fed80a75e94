"""Errors flashlm raises for things a user can fix.

Every error that reaches the CLI because of bad input is a :class:`FlashlmError`;
the CLI prints its message (which names the file and the problem) and exits 2.
"""
from __future__ import annotations


class FlashlmError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class GGUFError(FlashlmError):
    """A GGUF file that cannot be read: bad magic, truncated, out-of-bounds data."""


class UnsupportedError(FlashlmError):
    """An architecture, tensor type or option flashlm does not handle."""


class StoreError(FlashlmError):
    """A flashlm store that is missing files, resized, corrupt or too new."""


class ImportError_(FlashlmError):
    """A source model directory that lacks what an import needs."""


class PullError(FlashlmError):
    """`flashlm pull` could not fetch or check a model."""


class ModelNotFoundError(FlashlmError):
    """A MODEL argument that is no known name, store, GGUF file or HF directory."""


class InputError(FlashlmError):
    """Bad arguments: empty prompt, prompt longer than the context, bad messages."""


class BudgetError(FlashlmError):
    """A RAM budget too small to run the model."""


class OffloadError(FlashlmError):
    """A weight could not be read from the store while streaming (path, offset and the OS error)."""

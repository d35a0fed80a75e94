"""Kernel test setup: puts this folder on sys.path so tests can ``import _blocks``
(random valid weights in every GGUF format, float64 references, error measures)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)

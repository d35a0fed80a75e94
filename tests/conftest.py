"""Shared fixtures: tiny synthetic models (tests/synth.py) and the real models (tests/realmodels.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from realmodels import REAL_MODELS


@pytest.fixture(autouse=True)
def _matmul_mode():
    """Every test starts on the default path (int8 activations where a format has integer
    kernels); a test or a load(exact=True) that switches to the exact path does not leak."""
    from flashlm.kernels import matmul

    matmul.set_exact(False)
    yield
    matmul.set_exact(False)


@pytest.fixture
def exact_path():
    """The exact float32 kernels for this test (references are float32's)."""
    from flashlm.kernels import matmul

    matmul.set_exact(True)
    yield
    matmul.set_exact(False)


@pytest.fixture(params=REAL_MODELS)
def real_model(request) -> str:
    return request.param


@pytest.fixture
def flashlm_home(tmp_path, monkeypatch) -> Path:
    """An empty FLASHLM_HOME for tests that pull or import."""
    home = tmp_path / "home"
    monkeypatch.setenv("FLASHLM_HOME", str(home))
    return home

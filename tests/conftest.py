"""Shared fixtures: tiny synthetic models (tests/synth.py) and the real models (tests/realmodels.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from realmodels import REAL_MODELS


@pytest.fixture(params=REAL_MODELS)
def real_model(request) -> str:
    return request.param


@pytest.fixture
def flashlm_home(tmp_path, monkeypatch) -> Path:
    """An empty FLASHLM_HOME for tests that pull or import."""
    home = tmp_path / "home"
    monkeypatch.setenv("FLASHLM_HOME", str(home))
    return home

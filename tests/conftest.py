"""Shared fixtures: every test gets its own embedded home (sqlite MLflow and Optuna, local artifacts)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SETTINGS_VARS = [v for v in os.environ if v.startswith("DISTILLERY_")]
# The package's default (distillery/__init__.py), set before any test module imports torch first.
import distillery  # noqa: E402,F401


def pytest_collection_modifyitems(items):
    """Tests that need the built image run last: `make test` builds it in the background meanwhile."""
    items.sort(key=lambda item: "image" in getattr(item, "fixturenames", ()))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh DISTILLERY_HOME; the settings object is rebuilt around it."""
    from distillery.settings import get_settings

    for var in _SETTINGS_VARS:
        monkeypatch.delenv(var, raising=False)
    h = tmp_path / "home"
    monkeypatch.setenv("DISTILLERY_HOME", str(h))
    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(REPO / "data"))
    get_settings.cache_clear()
    yield h
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads spinning against
    other processes make each step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

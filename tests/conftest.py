"""Shared test setup: hermetic paths, offscreen Qt, no hub, and the tiny random models built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own data, cache and config dirs: nothing touches the user's real ones."""
    root = tmp_path_factory.mktemp("owl-home")
    monkeypatch.setenv("OWL_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("OWL_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("OWL_CONFIG_DIR", str(root / "config"))

"""Every location comes from platformdirs unless an OWL_* variable relocates it."""

from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from owl_desktop import paths


def test_environment_overrides_every_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OWL_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("OWL_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("OWL_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("OWL_LOG_DIR", raising=False)
    assert paths.data_dir() == tmp_path / "d"
    assert paths.cache_dir() == tmp_path / "c"
    assert paths.config_dir() == tmp_path / "cfg"
    assert paths.log_dir() == tmp_path / "c" / "logs"
    assert paths.models_dir() == tmp_path / "d" / "models"
    monkeypatch.setenv("OWL_LOG_DIR", str(tmp_path / "logs"))
    assert paths.log_dir() == tmp_path / "logs"


def test_defaults_are_the_platform_user_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OWL_DATA_DIR", "OWL_CACHE_DIR", "OWL_CONFIG_DIR", "OWL_LOG_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert paths.data_dir() == Path(platformdirs.user_data_dir("owl-desktop", appauthor=False))
    assert paths.cache_dir() == Path(platformdirs.user_cache_dir("owl-desktop", appauthor=False))
    assert paths.config_dir() == Path(platformdirs.user_config_dir("owl-desktop", appauthor=False))
    assert paths.log_dir() == Path(platformdirs.user_log_dir("owl-desktop", appauthor=False))

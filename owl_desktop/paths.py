"""Every location the app writes to, from platformdirs, each overridable by an environment variable.

OWL_DATA_DIR (models, conversations), OWL_CACHE_DIR (encodes, partial downloads), OWL_CONFIG_DIR (settings),
OWL_LOG_DIR (logs; defaults under the cache dir when OWL_CACHE_DIR is set).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "owl-desktop"


def _dir(env: str, default: str) -> Path:
    value = os.environ.get(env)
    path = Path(value).expanduser() if value else Path(default)
    return path


def data_dir() -> Path:
    return _dir("OWL_DATA_DIR", platformdirs.user_data_dir(APP_NAME, appauthor=False))


def cache_dir() -> Path:
    return _dir("OWL_CACHE_DIR", platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def config_dir() -> Path:
    return _dir("OWL_CONFIG_DIR", platformdirs.user_config_dir(APP_NAME, appauthor=False))


def log_dir() -> Path:
    if "OWL_LOG_DIR" in os.environ:
        return _dir("OWL_LOG_DIR", "")
    if "OWL_CACHE_DIR" in os.environ:
        return cache_dir() / "logs"
    return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))


def models_dir() -> Path:
    """Where installed model bundles live, one folder per bundle id."""
    return data_dir() / "models"


def downloads_dir() -> Path:
    """Source checkpoints being (or having been) downloaded from the hub."""
    return data_dir() / "downloads"


def ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Start-up stays light: the command line and the window load no engine, model-file or network stack before use.

The window must show fast (the goal is under a second): torch and llama.cpp are imported on the engine thread when
a model is loaded, the hub's HTTP client when a download starts. Each check runs a fresh interpreter (this one has
imported everything already) and lists the packages that interpreter loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "llama_cpp", "transformers", "peft", "safetensors", "gguf", "huggingface_hub", "httpx2", "numpy")


def loaded_by(code: str, watched: tuple[str, ...], then: str = "") -> list[str]:
    """The `watched` top-level packages in sys.modules after `code` ran in a new interpreter (`then` runs after)."""
    script = f"{code}\nimport sys\nprint(' '.join(m for m in {watched!r} if m in sys.modules))\n{then}\n"
    done = subprocess.run(
        [sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_command_line_loads_neither_qt_nor_the_engine() -> None:
    assert loaded_by("import owl_desktop.cli", (*HEAVY, "PySide6")) == []


def test_the_window_shows_before_the_engine_or_the_hub_client_is_loaded() -> None:
    """What `owl-desktop` does before its window is painted: the app, the services, the theme, the shown window.
    (The window starts loading the last model only after that: MainWindow.start.)"""
    pytest.importorskip("PySide6")
    code = """
from PySide6.QtTest import QTest

from owl_desktop.gui.app import create_application
from owl_desktop.gui.main_window import MainWindow
from owl_desktop.gui.services import build_services
from owl_desktop.gui.theme import apply_theme

app = create_application()
services = build_services()
apply_theme(services.settings.theme, app)
window = MainWindow(services)
window.show()
assert QTest.qWaitForWindowExposed(window)
app.processEvents()
"""
    assert loaded_by(code, HEAVY, then="window.close()") == []


def test_missing_qt_system_libraries_are_named_with_the_command_that_installs_them() -> None:
    from owl_desktop import qt_system_libs

    found = qt_system_libs.missing()  # this machine runs the window tests: nothing is missing
    assert found == [], qt_system_libs.message(found)
    absent = qt_system_libs.missing({"libowl-surely-absent.so.7": "libowl-absent7", "libc.so.6": "libc6"})
    assert absent == [("libowl-surely-absent.so.7", "libowl-absent7")]
    text = qt_system_libs.message([*absent, ("libxcb-cursor.so.0", "libxcb-cursor0")])
    assert "libowl-surely-absent.so.7, libxcb-cursor.so.0" in text
    assert "sudo apt install libowl-absent7 libxcb-cursor0" in text
    assert set(qt_system_libs.needed("offscreen")) < set(qt_system_libs.needed("xcb"))


def test_the_readme_lists_every_system_package_the_check_asks_for() -> None:
    from pathlib import Path

    from owl_desktop import qt_system_libs

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert [p for p in qt_system_libs.needed("xcb").values() if f" {p}" not in readme] == []

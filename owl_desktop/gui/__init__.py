"""The desktop app (PySide6). The only package that imports Qt; gui/services.py builds what it works with."""

from __future__ import annotations

from pathlib import Path


def run_app(argv: list[str] | None = None, open_files: list[Path] | None = None) -> int:
    """Open the main window (with `open_files` attached to a new chat) and run the event loop until it closes.

    First the system libraries Qt needs are looked for: a missing one is a message naming it and the command that
    installs it (exit code 1), not Qt's abort."""
    import sys

    from owl_desktop import qt_system_libs

    absent = qt_system_libs.missing()
    if absent:
        print(qt_system_libs.message(absent), file=sys.stderr)
        return 1
    try:
        from owl_desktop.gui.app import run
    except ImportError as exc:  # a library outside our list (or PySide6 itself) is missing
        print(f"Owl cannot open its window: {exc}. See the README's system packages.", file=sys.stderr)
        return 1
    return run(argv, open_files or [])


def run_self_test(screenshot: Path | None = None) -> int:
    """Headless end-to-end check of the real window with the demo model; 0 when it all worked."""
    from owl_desktop.gui.self_test import run_self_test as _run

    return _run(screenshot)

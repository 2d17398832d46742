"""Entry script of the frozen app (PyInstaller), the counterpart of the `owl-desktop` console script."""

from __future__ import annotations

import multiprocessing

if __name__ == "__main__":
    # First thing: the converter quantizes in a "spawn" child process, which in a frozen app is this same executable
    # started with multiprocessing's arguments. freeze_support() runs that child's work and exits; without it the child
    # would parse them as our CLI and fail (or open a second window).
    multiprocessing.freeze_support()

    from owl_desktop.cli import main

    raise SystemExit(main())

"""The app's log: rotating files in the platform's log folder (paths.log_dir()), for every process of owl-desktop.

Errors go here with their traceback, never in the user's face; the messages users see name this file ("details
are in the log: …"). llama.cpp's warnings and errors are routed here too (engine/llm.py). Conversation content
(questions, answers, images) is never logged: only events, sizes, timings and errors.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from owl_desktop import paths

LOG_FILE = "owl-desktop.log"
MAX_BYTES = 2 * 1024 * 1024
BACKUPS = 4
FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"

_handler: logging.Handler | None = None


def log_file() -> Path:
    return paths.log_dir() / LOG_FILE


def setup(level: int = logging.INFO) -> Path | None:
    """Send the `owl_desktop` loggers to the rotating log file (once per process); returns the file, or None when
    the log folder cannot be written (the app then runs without a log rather than not at all)."""
    global _handler
    if _handler is not None:
        return log_file()
    path = log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8", delay=True
        )
    except OSError as exc:
        print(f"owl-desktop: cannot write the log in {path.parent} ({exc.strerror or exc})", file=sys.stderr)
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger("owl_desktop")
    root.addHandler(handler)
    root.setLevel(level)
    _handler = handler
    return path


def see_the_log() -> str:
    """The end of a message that sends the user to the log for details."""
    return f"details are in the log: {log_file()}"

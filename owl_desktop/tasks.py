"""The one contract every long job follows: progress through a callback, cancellation through a token.

The CLI wraps a job in a progress bar, the GUI in a worker that forwards progress as Qt signals; the job
itself only calls `task.report(...)` and `task.check()`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from owl_desktop.errors import Cancelled


@dataclass(frozen=True)
class Progress:
    stage: str  # short label of the current step, e.g. "writing GGUF"
    done: float  # units done in this stage
    total: float | None  # units in this stage, None when unknown
    unit: str = ""  # "B", "tensors", "tokens", ...

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)


ProgressCallback = Callable[[Progress], None]


class CancelToken:
    """Thread-safe flag; a job polls it, any thread may set it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


class Task:
    """What a long job receives: where to report progress and how to learn it was cancelled."""

    def __init__(self, progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> None:
        self._progress = progress
        self.cancel_token = cancel or CancelToken()

    def report(self, stage: str, done: float, total: float | None = None, unit: str = "") -> None:
        self.emit(Progress(stage, done, total, unit))

    def emit(self, progress: Progress) -> None:
        """Pass a ready-made Progress (or a richer subclass, e.g. a download's speed and time left)."""
        if self._progress is not None:
            self._progress(progress)

    def check(self) -> None:
        """Raise `Cancelled` if the job was cancelled; call between units of work."""
        self.cancel_token.raise_if_cancelled()

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.cancelled

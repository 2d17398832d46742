"""Byte progress of a download, with speed and time left, through the Task callback.

`DownloadProgress` is a `Progress` (stage, done, total, unit "B") with `speed` (bytes/s over the last few seconds),
`eta` (seconds left) and `file`; a consumer that knows only `Progress` still gets a byte bar. While no byte arrives
the speed decays and the stage says so, instead of a frozen readout (those reports come from the download's
watcher thread; every other report comes from the thread running the job).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from owl_desktop.tasks import Progress, Task

WINDOW_S = 5.0
MIN_INTERVAL_S = 0.1
QUIET_AFTER_S = 2.0


@dataclass(frozen=True)
class DownloadProgress(Progress):
    speed: float | None = None  # bytes per second
    eta: float | None = None  # seconds left
    file: str = ""


class TransferMeter:
    """Counts bytes for one repository download and reports them, at most every 100 ms (thread-safe)."""

    def __init__(self, task: Task, total: int, done: int = 0, label: str = "downloading") -> None:
        self.task = task
        self.total = total
        self.done = done
        self.label = label
        self.file = ""
        self._samples: deque[tuple[float, int]] = deque()
        self._last_emit = 0.0
        self._last_byte = time.monotonic()
        self._lock = threading.Lock()

    def start_file(self, name: str) -> None:
        with self._lock:
            self.file = name
            self._emit(force=True)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            self._last_byte = now
            self._samples.append((now, self.done))
            self._emit(now=now, force=self.done >= self.total)

    def skip(self, n: int) -> None:
        """Bytes that were already on disk: counted as done, but not as speed."""
        with self._lock:
            self.done += n
            self._samples.clear()
            self._emit(force=True)

    def reset_file_bytes(self, lost: int) -> None:
        """Bytes counted for the current file were discarded (the server ignored a Range request)."""
        with self._lock:
            self.done -= lost
            self._samples.clear()
            self._emit(force=True)

    def tick(self) -> None:
        """Called while waiting: after a quiet spell, say so and let the speed fall."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_byte >= QUIET_AFTER_S and now - self._last_emit >= 1.0:
                self._emit(now=now, force=True, stage=f"{self.label} {self.file}: waiting for data")

    def note(self, stage: str) -> None:
        with self._lock:
            self._emit(force=True, stage=stage)

    def speed(self, now: float | None = None) -> float | None:
        now = now or time.monotonic()
        while self._samples and now - self._samples[0][0] > WINDOW_S:
            self._samples.popleft()
        if len(self._samples) < 2:
            return None
        t0, b0 = self._samples[0]
        span = now - t0
        return (self.done - b0) / span if span >= 0.5 else None

    def _emit(self, now: float | None = None, force: bool = False, stage: str | None = None) -> None:
        now = now or time.monotonic()
        if not force and now - self._last_emit < MIN_INTERVAL_S:
            return
        self._last_emit = now
        speed = self.speed(now)
        eta = (self.total - self.done) / speed if speed else None
        progress = DownloadProgress(
            stage or f"{self.label} {self.file}".rstrip(), self.done, self.total, "B", speed, eta, self.file
        )
        self.task.emit(progress)

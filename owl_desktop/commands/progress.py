"""A terminal progress line for long jobs (the CLI side of the task contract)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from owl_desktop.tasks import Progress


def human_size(n: float, unit: str = "B") -> str:
    """`n` with its unit; bytes in B/KiB/MiB/GiB/TiB."""
    if unit != "B":
        return f"{n:.0f}{(' ' + unit) if unit else ''}"
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or suffix == "TiB":
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressLine:
    """Callable progress sink that redraws one status line on a terminal, or prints stage changes otherwise."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._last_draw = 0.0
        self._stage = ""
        self._tty = self.stream.isatty()

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        new_stage = p.stage != self._stage
        done_now = p.total is not None and p.done >= p.total
        if not new_stage and not done_now and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        if not self._tty:
            if new_stage:
                print(f"{p.stage}...", file=self.stream, flush=True)
            self._stage = p.stage
            return
        self._stage = p.stage
        if p.fraction is not None:
            width = 30
            filled = int(width * p.fraction)
            bar = "#" * filled + "-" * (width - filled)
            amount = f"{human_size(p.done, p.unit)}/{human_size(p.total or 0, p.unit)}"
            text = f"{p.stage:<28} [{bar}] {p.fraction * 100:5.1f}% {amount}"
        else:
            text = f"{p.stage:<28} {human_size(p.done, p.unit)}"
        self.stream.write("\r" + text[:110].ljust(110))
        if done_now:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()

"""Numbers as people read them: sizes, speeds, time left, and an answer's figures. No Qt here."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from owl_desktop.engine.pipeline import AnswerRecord


def size(n: float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit in ("B", "KB") else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class RateMeter:
    """Speed over the last few seconds, and the time left at that speed."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, done: float, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # a new stage or a restart
        self._samples.append((t, done))
        while len(self._samples) > 2 and t - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self, total: float | None) -> float | None:
        r = self.rate()
        if not r or r <= 0 or total is None or not self._samples:
            return None
        return max(0.0, (total - self._samples[-1][1]) / r)


def progress_line(
    stage: str,
    done: float,
    total: float | None,
    unit: str,
    meter: RateMeter | None = None,
    *,
    speed: float | None = None,
    eta: float | None = None,
) -> str:
    """e.g. 'downloading · 1.2 GB of 4.1 GB · 35.0 MB/s · 1 min 23 s left'.

    `speed` (bytes/s) and `eta` (s), when the job measured them, are shown instead of the meter's."""
    parts = [stage]
    if unit == "B":
        parts.append(f"{size(done)} of {size(total)}" if total else size(done))
        if speed is None and meter is not None:
            speed = meter.rate()
            eta = meter.eta(total) if speed else None
        if speed:
            parts.append(f"{size(speed)}/s")
            if eta is not None:
                parts.append(f"{duration(eta)} left")
    elif total:
        parts.append(f"{done:.0f} of {total:.0f} {unit}".rstrip())
        if eta is None and meter is not None:
            eta = meter.eta(total)
        if eta is not None:
            parts.append(f"{duration(eta)} left")
    return " · ".join(parts)


def paused_line(done: float, total: float | None) -> str:
    """e.g. 'Paused · 1.2 GB of 4.1 GB downloaded · Resume continues from there, also after a restart'."""
    got = f"{size(done)} of {size(total)}" if total else size(done)
    return f"Paused · {got} downloaded · Resume continues from there, also after a restart"


def figure(record: AnswerRecord | Mapping[str, Any], name: str) -> Any:
    """A field of an AnswerRecord, or a key of the meta a stored answer keeps of it (other names there)."""
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def answer_speed(record: AnswerRecord | Mapping[str, Any] | None) -> str:
    """e.g. '12.4 tok/s · first token 0.31 s' from an AnswerRecord or a stored answer's meta."""
    if record is None:
        return ""
    parts = []
    if tps := figure(record, "decode_tokens_per_s") or figure(record, "tokens_per_s"):
        parts.append(f"{round(tps, 2):.1f} tok/s")  # as the saved meta keeps it: the same figure after a restart
    if ttft := figure(record, "time_to_first_token_ms") or figure(record, "ttft_ms"):
        parts.append(f"first token {round(ttft, 1) / 1000:.2f} s")
    return " · ".join(parts)


def record_summary(record: AnswerRecord | Mapping[str, Any] | None) -> str:
    """e.g. '12.4 tok/s · first token 0.31 s · 612 / 2048 context · stopped' under an answer."""
    if record is None:
        return ""
    speed = answer_speed(record)
    parts = [speed] if speed else []
    if (used := figure(record, "context_used")) and (context := figure(record, "context_size")):
        parts.append(f"{used} / {context} context")
    if figure(record, "state") == "failed":
        parts.append("interrupted by an error")
    elif figure(record, "stop_reason") in ("cancelled", "abandoned") or figure(record, "state") == "stopped":
        parts.append("stopped")
    elif figure(record, "stop_reason") == "length":
        parts.append("cut at the length limit")
    return " · ".join(parts)


def stage_line(stage: str, done: float, total: float | None) -> str:
    """What a question waits on before its first token, e.g. 'encoding image 3 of 25'."""
    n = int(total or 0)
    if stage == "storing images" and n:
        return f"checking image {min(int(done) + 1, n)} of {n}…"
    if stage == "encoding images" and n:
        if done >= n:
            return "reading the conversation…"
        return f"encoding image {min(int(done) + 1, n)} of {n}…"
    return f"{stage}…"

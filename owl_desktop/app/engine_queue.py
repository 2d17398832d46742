"""One loaded model, one user at a time: a first-come-first-served queue in front of the engine.

The window's chat and the local API server share it, so they never run the model at once and neither loads a
second copy. Whoever wants the engine enters the queue and gets a `Turn`; it waits for the turn, uses the engine,
then leaves. At most `max_waiting` bounded entries may wait behind the one running (the API answers "busy" beyond
that); an unbounded entry (the window) always gets a place. A waiting entry can leave at any time, e.g. when its
HTTP client went away, without having run.

Background work (preparing the next prompt while the user types) takes the engine only when nobody runs or waits,
and gives it up at once: `enter_if_idle` gets a turn that is preempted (its callback fires, e.g. a cancel token) as
soon as anyone else enters the queue, so it never delays a real request by more than its cancel takes.

Listeners hear every change (who runs, how many wait), from whichever thread made it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from owl_desktop.errors import OwlError

log = logging.getLogger(__name__)


# labels of the queue's usual users (the status line tells them apart)
WINDOW = "the window"
API_REQUEST = "API request"


class QueueFull(OwlError):
    """Every place in the queue is taken; try again later."""


@dataclass(frozen=True)
class QueueState:
    running: str | None  # the label of the turn using the engine, None when idle
    waiting: int


Listener = Callable[[QueueState], None]


class Turn:
    """A place in the queue. `wait()` until it is this turn's go, use the engine, then `leave()` (idempotent)."""

    def __init__(self, queue: EngineQueue, label: str, bounded: bool) -> None:
        self._queue = queue
        self.label = label
        self.bounded = bounded
        self.active = False  # it is this turn's go (and it has not left)
        self.left = False
        self.on_preempt: Callable[[], None] | None = None  # background work: told to stop when anyone else enters

    def wait(self, timeout: float | None = None) -> bool:
        """Block until it is this turn's go; False when the timeout passed or the turn left the queue first."""
        return self._queue._wait(self, timeout)

    def leave(self) -> None:
        """Leave the queue: give the engine back, or give up the place while still waiting."""
        self._queue._leave(self, only_waiting=False)

    def withdraw(self) -> bool:
        """Give up the place only if the turn has not started (safe from any thread); True when it left."""
        return self._queue._leave(self, only_waiting=True)

    def __enter__(self) -> Turn:
        self.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()


class EngineQueue:
    def __init__(self, max_waiting: int = 4) -> None:
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[Turn] = deque()
        self._running: Turn | None = None
        self._listeners: list[Listener] = []

    def enter(self, label: str, *, bounded: bool = True) -> Turn:
        """A place at the end of the queue; raises QueueFull when `bounded` and `max_waiting` already wait."""
        with self._cond:
            busy = self._running is not None and self._running.on_preempt is None  # background work yields at once
            if bounded and busy and self._bounded_waiting() >= self.max_waiting:
                raise QueueFull(f"the model is busy and {self._bounded_waiting()} request(s) are already waiting")
            turn = Turn(self, label, bounded)
            self._waiting.append(turn)
            self._advance()
            state = self._state()
            preempt = self._running.on_preempt if self._running is not None and self._running is not turn else None
        if preempt is not None:
            preempt()
        self._notify(state)
        return turn

    def enter_if_idle(self, label: str, on_preempt: Callable[[], None]) -> Turn | None:
        """A turn at once for background work, or None when someone runs or waits. `on_preempt` is called (from the
        entering thread) when anyone enters while this turn holds the engine: stop quickly and `leave()`."""
        with self._cond:
            if self._running is not None or self._waiting:
                return None
            turn = Turn(self, label, bounded=False)
            turn.on_preempt = on_preempt
            self._waiting.append(turn)
            self._advance()
            state = self._state()
        self._notify(state)
        return turn

    @property
    def state(self) -> QueueState:
        with self._cond:
            return self._state()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None

    def add_listener(self, listener: Listener) -> None:
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nobody runs or waits (for shutdown and tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running is None and not self._waiting, timeout)

    # ---------------------------------------------------------------- internals (called by Turn)

    def _bounded_waiting(self) -> int:
        return sum(1 for t in self._waiting if t.bounded)

    def _state(self) -> QueueState:
        return QueueState(self._running.label if self._running is not None else None, len(self._waiting))

    def _advance(self) -> None:
        if self._running is None and self._waiting:
            self._running = self._waiting.popleft()
            self._running.active = True
            self._cond.notify_all()

    def _wait(self, turn: Turn, timeout: float | None) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: turn.active or turn.left, timeout)
            return turn.active

    def _leave(self, turn: Turn, only_waiting: bool) -> bool:
        with self._cond:
            if turn.left or (only_waiting and turn.active):
                return False
            turn.left = True
            if turn.active:
                turn.active = False
                self._running = None
            else:
                self._waiting.remove(turn)
            self._advance()
            self._cond.notify_all()
            state = self._state()
        self._notify(state)
        return True

    def _notify(self, state: QueueState) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(state)
            except Exception:  # noqa: BLE001 - a broken listener must not break the queue
                log.exception("engine queue listener failed")

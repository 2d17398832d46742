"""Keeps Python's full garbage collections short, so that no thread's allocation stops the window.

A full collection walks every object the collector tracks while it holds the GIL: with Qt, torch and a model loaded
that is ~200,000 objects and 100+ ms, and any thread can set one off (a download importing the hub client did, in
`bench gui-stall`), during which the window's event loop cannot run a line of Python. The objects alive once the
window is up, and again once a model is loaded and warmed up, live about as long as the app: `settle` moves them out
of the collector's walks (gc.freeze). Reference counting still frees them; only a reference cycle among them, if one
ever became garbage, would stay.

A model load makes most of them: the engine's first load imports torch and the engine (~1,000 modules), and every
load builds the model. Full collections set off meanwhile walked the growing heap (20-60 ms each, on the engine
thread with the GIL held): `no_full_collections` puts them off for the load and its warm-up, whose objects are then
frozen instead of walked. Young collections go on as usual, so short-lived garbage is still freed.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_PUT_OFF = 1 << 30  # a full collection's threshold (young collections between full ones) that is never reached
_lock = threading.Lock()
_holders = 0
_threshold: tuple[int, int, int] = (0, 0, 0)  # as it was before the first holder


def settle() -> None:
    """The objects alive now are treated as long-lived: later full collections walk only newer ones."""
    gc.collect(1)  # the young garbage first (cheap): it is not long-lived
    gc.freeze()


def held() -> bool:
    """Whether full collections are put off now (a load or its warm-up runs somewhere)."""
    with _lock:
        return _holders > 0


@contextmanager
def no_full_collections() -> Iterator[None]:
    """No automatic full collection while it lasts (any thread); at its end what it made is settled. Nestable and
    usable from several threads at once: the last one out settles and restores the collector's thresholds."""
    global _holders, _threshold
    with _lock:
        if _holders == 0:
            _threshold = gc.get_threshold()
            gc.set_threshold(_threshold[0], _threshold[1], _PUT_OFF)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                settle()
                gc.set_threshold(*_threshold)

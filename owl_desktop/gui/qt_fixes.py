"""Work-arounds for defects of particular Qt for Python releases, applied once when the GUI starts.

PySide6 6.12.0: `SignalInstance.emit()` returns `True` without taking a reference to it, so every emit made from
Python (a streamed piece of an answer, a download's progress) drops one reference to `True` for good. On Python
3.11, where `True` is not immortal, the interpreter aborts ("bool_dealloc: deallocating True or False") once those
drops add up to the references it had: some ten thousand emits into a session, i.e. during a long chat or a
download. 6.11 does not have the defect. Where it is measured here, `True` and `False` get a reserve of references
so large that no session can use it up, which is what Python 3.12 and newer do for them anyway (immortal objects).
"""

from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, Signal

_RESERVE = 1 << 40
_applied = False


class _Probe(QObject):
    ping = Signal()


def emit_drops_references() -> bool:
    """Whether emitting a signal from Python loses a reference to `True` (the PySide6 6.12.0 defect)."""
    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(16):
        probe.ping.emit()
    return sys.getrefcount(True) <= before - 16


def apply() -> bool:
    """Guard against the defect where it is present; True when the guard was applied (now or before)."""
    global _applied
    if _applied:
        return True
    debug_build = hasattr(sys, "gettotalrefcount")  # other fields come before the count there
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython" or debug_build:
        return False
    if not emit_drops_references():
        return False
    for singleton in (True, False):
        # ob_refcnt is the first field of every object in CPython's non-debug builds up to 3.11; a reference that
        # another thread takes or drops between this read and write would be lost, which is nothing beside _RESERVE
        ctypes.c_ssize_t.from_address(id(singleton)).value += _RESERVE
    _applied = True
    return True

"""Keeps Python's full garbage collections short, so that no thread's allocation stops the window.

A full collection walks every object the collector tracks while it holds the GIL: with Qt, torch and a model loaded
that is ~200,000 objects and 100+ ms, and any thread can set one off (a download importing the hub client did, in
`bench gui-stall`), during which the window's event loop cannot run a line of Python. The objects alive once the
window is up, and again once a model is loaded, live about as long as the app: `settle` moves them out of the
collector's walks (gc.freeze). Reference counting still frees them; only a reference cycle among them, if one ever
became garbage, would stay.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """The objects alive now are treated as long-lived: later full collections walk only newer ones."""
    gc.collect(1)  # the young garbage first (cheap): it is not long-lived
    gc.freeze()

"""A real app process that closes its window in the middle of a stage: `python close_mid_work.py STAGE IMAGE`.

STAGE is "load" (the model load at start-up), "encode" (the image encode of a question) or "answer" (its tokens).
The app starts as `owl-desktop` does (show_main_window, then the event loop), with the OWL_* dirs of the caller and
the demo model installed there. When the engine thread reaches STAGE it asks the window to close and waits there
until the window tells the engine to stop (a slow stage, held where the real one checks for a stop). Prints one JSON
line: how long the close took and whether the stop reached the stage; the caller reads stderr for crashes at exit.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from PySide6.QtCore import QObject, Qt, Signal, Slot

from owl_desktop.gui.app import create_application, show_main_window
from owl_desktop.tasks import Progress

HOLD_S = 60.0


class Closer(QObject):
    """Lives on the GUI thread; the engine thread asks it to close the window through a queued signal."""

    close_wanted = Signal()

    def __init__(self, window) -> None:  # noqa: ANN001
        super().__init__()
        self.window = window
        self.closed_at: float | None = None
        self.close_wanted.connect(self.close, Qt.ConnectionType.QueuedConnection)

    @Slot()
    def close(self) -> None:
        self.closed_at = time.monotonic()
        self.window.close()


def main(stage: str, image: Path) -> int:
    app = create_application(sys.argv[:1])
    window = show_main_window(app)
    worker = window.engine.worker
    closer = Closer(window)
    stop = threading.Event()
    worker.stop_requested.connect(stop.set, Qt.ConnectionType.DirectConnection)
    held: dict[str, bool | None] = {"released_by_stop": None, "visible_at_stop": None, "model_loaded": False}
    worker.stop_requested.connect(
        lambda: held.update(visible_at_stop=window.isVisible()), Qt.ConnectionType.DirectConnection
    )  # the window's shutdown calls stop on the GUI thread: is the window still on screen meanwhile?
    worker.model_loaded.connect(lambda *_: held.update(model_loaded=True), Qt.ConnectionType.DirectConnection)

    def hold() -> None:  # on the engine thread, in the middle of the stage
        if held["released_by_stop"] is None:
            held["released_by_stop"] = False
            closer.close_wanted.emit()
            held["released_by_stop"] = stop.wait(HOLD_S)

    if stage == "load":
        worker.model_loading.connect(lambda _ref: hold(), Qt.ConnectionType.DirectConnection)
    else:
        if stage == "encode":
            worker.stage.connect(
                lambda p: hold() if isinstance(p, Progress) and p.stage == "encoding images" else None,
                Qt.ConnectionType.DirectConnection,
            )
        else:
            worker.piece.connect(lambda _text: hold(), Qt.ConnectionType.DirectConnection)

        def ask(_model: str) -> None:
            window.composer.add_files([image])
            window.composer.edit.setPlainText("What is in this picture?")
            window.composer.submit()

        window.model_ready.connect(ask)
    app.exec()
    ended = time.monotonic()
    report = {
        "stage": stage,
        "close_s": None if closer.closed_at is None else ended - closer.closed_at,
        "released_by_stop": held["released_by_stop"],
        "visible_at_stop": held["visible_at_stop"],
        "model_loaded": held["model_loaded"],
        "engine_thread_running": window.engine.thread.isRunning(),
        "conversations": [c.id for c in window.services.store.list()],
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], Path(sys.argv[2])))

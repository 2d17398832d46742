"""`owl-desktop --self-test`: the real window, headless, with the demo model: drop an image, ask, get an answer."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What is in this picture?"
TIMEOUT_S = 180.0
ANSWER_TOKENS = 64


def _say(text: str) -> None:
    print(f"self-test: {text}", file=sys.stderr, flush=True)


def run_self_test(screenshot: Path | None = None) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    with tempfile.TemporaryDirectory(prefix="owl-self-test-") as tmp:
        root = Path(tmp)
        for var, sub in (("OWL_DATA_DIR", "data"), ("OWL_CACHE_DIR", "cache"), ("OWL_CONFIG_DIR", "config")):
            os.environ[var] = str(root / sub)  # hermetic: the user's data is never touched
        try:
            return _run(screenshot)
        except Exception as exc:  # noqa: BLE001 - the self-test reports, it does not crash
            _say(f"FAILED: {exc.__class__.__name__}: {exc}")
            return 1


def _wait(app: object, condition: object, timeout_s: float) -> bool:
    """Run the event loop until `condition()` holds. (A QEventLoop with a timer, not processEvents(flags, ms):
    that PySide6 overload crashed the interpreter while llama.cpp called back into Python on another thread.)"""
    from PySide6.QtCore import QEventLoop, QTimer

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        loop = QEventLoop()
        QTimer.singleShot(25, loop.quit)
        loop.exec()
    return bool(condition())  # type: ignore[operator]


def _run(screenshot: Path | None) -> int:

    from owl_desktop.devtools.demo import ensure_demo_bundle
    from owl_desktop.gui.app import create_application
    from owl_desktop.gui.main_window import MainWindow
    from owl_desktop.gui.services import build_services
    from owl_desktop.gui.theme import apply_theme

    t0 = time.monotonic()
    app = create_application([sys.argv[0]])
    _say("building the demo model")
    ensure_demo_bundle()
    services = build_services()
    # a short answer is proof enough, and keeps a software GPU (lavapipe in verify-deb) well inside TIMEOUT_S;
    # in memory only, the user's saved settings are not changed
    services.settings.sampling.max_new_tokens = min(services.settings.sampling.max_new_tokens, ANSWER_TOKENS)
    apply_theme("light", app)
    window = MainWindow(services)
    try:
        return _drive(app, window, screenshot, t0)
    finally:
        window.close()


def _drive(app: object, window: object, screenshot: Path | None, t0: float) -> int:
    from PySide6.QtCore import QMimeData, QUrl

    from owl_desktop.devtools.demo import DEMO_BUNDLE_ID, demo_image
    from owl_desktop.engine.llm import backends
    from owl_desktop.gui.dnd import simulate_drop
    from owl_desktop.gui.main_window import State

    window.resize(1100, 740)
    window.show()
    window.start()
    if not _wait(app, lambda: window.state is State.READY, 120):
        _say(f"FAILED: the demo model did not load (state: {window.state.value}: {window.banner.text.text()})")
        return 1
    if window.services.chat.loaded_model_id != DEMO_BUNDLE_ID:
        _say("FAILED: a different model was loaded")
        return 1
    _say(f"llama.cpp: {backends().summary()}")
    _say(f"running on {window.services.chat.device_description}")
    _say("dropping an image")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(demo_image()))])
    simulate_drop(window.composer, mime)
    if len(window.composer.images()) != 1:
        _say(f"FAILED: the dropped image was not attached ({window.banner.text.text()})")
        return 1
    window.composer.edit.setPlainText(QUESTION)
    answered: list[bool] = []
    window.answer_finished.connect(lambda: answered.append(True))
    window.composer.submit()
    _say("asking")
    if not _wait(app, lambda: bool(answered), TIMEOUT_S):
        _say("FAILED: no answer in time")
        return 1
    if window.banner.isVisible():
        _say(f"FAILED: {window.banner.text.text()}")
        return 1
    bubbles = window.chat.bubbles()
    roles = [b.role for b in bubbles]
    if roles != ["user", "assistant"] or not bubbles[-1].text.strip():
        _say(f"FAILED: unexpected conversation {roles}")
        return 1
    _wait(app, lambda: False, 0.2)  # let the last layout settle before the picture
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        if not window.grab().save(str(screenshot)):
            _say(f"FAILED: could not save the screenshot to {screenshot}")
            return 1
        _say(f"screenshot saved to {screenshot}")
    _say(f"OK in {time.monotonic() - t0:.1f} s: the demo model answered {len(bubbles[-1].text)} characters")
    return 0

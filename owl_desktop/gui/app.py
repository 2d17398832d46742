"""Start the desktop app: the QApplication, the services, the theme, the main window, the event loop.

Start-up is built to show the window fast: nothing here or in the window's modules imports torch, llama.cpp or the
hub's HTTP client (tests/test_startup.py checks it). The window is painted with its conversations and the page it
starts on, and only then starts its work on other threads (loading the last model, which imports the engine).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, Qt, QTimer
from PySide6.QtGui import QFont, QGuiApplication
from PySide6.QtWidgets import QApplication, QWidget

from owl_desktop.gui.icons import app_icon
from owl_desktop.gui.main_window import MainWindow
from owl_desktop.gui.services import build_services
from owl_desktop.gui.theme import apply_theme

APP_DISPLAY_NAME = "Owl"
FIRST_PAINT_WAIT_MS = 1000  # start anyway when a window is not painted by then (e.g. mapped on a hidden desktop)


def create_application(argv: list[str] | None = None) -> QApplication:
    """The one QApplication (reused when it exists, as under pytest-qt)."""
    existing = QApplication.instance()
    if isinstance(existing, QApplication):
        app = existing
    else:
        QGuiApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
        app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setApplicationName("owl-desktop")
    app.setApplicationDisplayName(APP_DISPLAY_NAME)
    app.setDesktopFileName("owl-desktop")
    app.setWindowIcon(app_icon())
    app.setStyle("Fusion")
    font = QFont(app.font())
    if font.pointSizeF() < 10:
        font.setPointSizeF(10)
    app.setFont(font)
    return app


class _AfterFirstPaint(QObject):
    """Calls `then` once, on the event loop's next turn after the widget's first paint (or after a time limit)."""

    def __init__(self, widget: QWidget, then: Callable[[], None]) -> None:
        super().__init__(widget)
        self._then: Callable[[], None] | None = then
        widget.installEventFilter(self)
        QTimer.singleShot(FIRST_PAINT_WAIT_MS, self, self._fire)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        if event.type() == QEvent.Type.Paint and self._then is not None:
            QTimer.singleShot(0, self, self._fire)  # the whole window is painted and shown by then
        return False

    def _fire(self) -> None:
        then, self._then = self._then, None
        if then is not None:
            self.parent().removeEventFilter(self)
            then()


def show_main_window(app: QApplication, open_files: list[Path] | None = None) -> MainWindow:
    """The app's start-up, short of the event loop: the window is shown with its start page (and `open_files`
    attached to a new chat); its work on other threads starts once it has been painted."""
    services = build_services()
    apply_theme(services.settings.theme, app)
    window = MainWindow(services)
    window.show_start_page()
    if open_files:
        window.open_files(open_files)
    _AfterFirstPaint(window, window.start_background_work)
    window.show()
    return window


def run(argv: list[str] | None = None, open_files: list[Path] | None = None) -> int:
    """Open the main window (with `open_files` attached to a new chat) and run the event loop until it closes."""
    app = create_application(argv)
    window = show_main_window(app, open_files)  # noqa: F841 - the window lives as long as the event loop runs
    return int(app.exec())

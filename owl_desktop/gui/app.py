"""Start the desktop app: the QApplication, the services, the theme, the main window, the event loop."""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont, QGuiApplication
from PySide6.QtWidgets import QApplication

from owl_desktop.gui.icons import app_icon
from owl_desktop.gui.main_window import MainWindow
from owl_desktop.gui.services import build_services
from owl_desktop.gui.theme import apply_theme

APP_DISPLAY_NAME = "Owl"


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


def run(argv: list[str] | None = None, open_files: list[Path] | None = None) -> int:
    """Open the main window (with `open_files` attached to a new chat) and run the event loop until it closes."""
    app = create_application(argv)
    services = build_services()
    apply_theme(services.settings.theme, app)
    window = MainWindow(services)
    window.show()
    window.start()
    if open_files:
        window.open_files(open_files)
    return int(app.exec())

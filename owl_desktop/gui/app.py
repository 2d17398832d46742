"""QApplication setup, the theme, the services the window talks to, and the event loop."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QFont, QGuiApplication
from PySide6.QtWidgets import QApplication

from owl_desktop.gui import qt_fixes, theme
from owl_desktop.gui.icons import app_icon

APP_DISPLAY_NAME = "Owl"


class ThemeBus(QObject):
    """Tells widgets that the theme changed, so they can re-tint their icons."""

    changed = Signal(object)  # theme.Colors

    def __init__(self) -> None:
        super().__init__()
        self.colors: theme.Colors = theme.LIGHT


_bus: ThemeBus | None = None


def theme_bus() -> ThemeBus:
    global _bus
    if _bus is None:
        _bus = ThemeBus()
    return _bus


def colors() -> theme.Colors:
    return theme_bus().colors


def create_application(argv: list[str] | None = None) -> QApplication:
    """The one QApplication (reused when it exists, as under pytest-qt)."""
    qt_fixes.apply()
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


def apply_theme(name: str, app: QApplication | None = None) -> theme.Colors:
    """Apply 'system' | 'light' | 'dark' to the whole app and tell every widget."""
    qapp = app or QApplication.instance()
    c = theme.resolve(name)
    if isinstance(qapp, QApplication):
        qapp.setPalette(theme.palette(c))
        qapp.setStyleSheet(theme.stylesheet(c))
    bus = theme_bus()
    bus.colors = c
    bus.changed.emit(c)
    return c


@dataclass
class Services:
    """What the window works with; built from the app layer, nothing here knows Qt."""

    settings: Any
    store: Any
    images: Any
    chat: Any
    models: Any


def build_services() -> Services:
    from owl_desktop.app.chat_service import ChatService
    from owl_desktop.app.settings import Settings, apply_data_dir
    from owl_desktop.hub.manager import ModelManager
    from owl_desktop.store.conversations import ConversationStore
    from owl_desktop.store.images import ImageStore

    settings = Settings.load()
    apply_data_dir(settings)
    store = ConversationStore()
    images = ImageStore()
    chat = ChatService(store, images, settings)
    return Services(settings=settings, store=store, images=images, chat=chat, models=ModelManager())


def run(argv: list[str] | None = None, open_files: list[Path] | None = None) -> int:
    from owl_desktop.gui.main_window import MainWindow

    app = create_application(argv)
    services = build_services()
    apply_theme(getattr(services.settings, "theme", "system"), app)
    window = MainWindow(services)
    window.show()
    window.start()
    if open_files:
        window.open_files(open_files)
    return int(app.exec())

"""The light and dark themes (colours, palette, style sheet) and the one theme in force.

`apply_theme()` sets the theme for the whole app; widgets read `colors()` when they draw, and re-tint their icons
when `theme_bus().changed` fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QAbstractSpinBox, QApplication, QProxyStyle

from owl_desktop.gui.icons import icon_file


@dataclass(frozen=True)
class Colors:
    name: str
    window: str
    surface: str
    sidebar: str
    text: str
    muted: str
    border: str
    accent: str
    accent_text: str
    accent_soft: str
    user_bubble: str
    assistant_bubble: str
    code_bg: str
    danger: str
    danger_soft: str
    notice: str
    hover: str
    selection: str


LIGHT = Colors(
    name="light",
    window="#f7f8fa",
    surface="#ffffff",
    sidebar="#eff1f5",
    text="#1d2230",
    muted="#6b7385",
    border="#e1e4eb",
    accent="#4f6bed",
    accent_text="#ffffff",
    accent_soft="#e7ebfd",
    user_bubble="#e4e9fd",
    assistant_bubble="#ffffff",
    code_bg="#f2f4f8",
    danger="#c8423f",
    danger_soft="#fbeaea",
    notice="#8a6d1f",
    hover="#e4e7ee",
    selection="#dde3fb",
)

DARK = Colors(
    name="dark",
    window="#15171c",
    surface="#1c1f26",
    sidebar="#111318",
    text="#e5e7ee",
    muted="#9199a8",
    border="#2b2f39",
    accent="#7b91ff",
    accent_text="#0f1220",
    accent_soft="#262d4a",
    user_bubble="#2a3152",
    assistant_bubble="#1f232b",
    code_bg="#15181e",
    danger="#f07470",
    danger_soft="#3a2022",
    notice="#e0c070",
    hover="#232731",
    selection="#2a3152",
)


class ThemeBus(QObject):
    """Holds the colours in force and tells widgets when they change, so they can re-tint their icons."""

    changed = Signal(object)  # Colors

    def __init__(self) -> None:
        super().__init__()
        self.colors: Colors = LIGHT


_bus: ThemeBus | None = None


def theme_bus() -> ThemeBus:
    """The one bus (made on first use, on the GUI thread)."""
    global _bus
    if _bus is None:
        _bus = ThemeBus()
    return _bus


def colors() -> Colors:
    """The colours of the theme in force (light until a theme is applied)."""
    return theme_bus().colors


def apply_theme(name: str, app: QApplication | None = None) -> Colors:
    """Apply 'system' | 'light' | 'dark' to the whole app and tell every widget."""
    qapp = app or QApplication.instance()
    c = resolve(name)
    if isinstance(qapp, QApplication):
        _install_style(qapp)
        qapp.setPalette(palette(c))
        qapp.setStyleSheet(stylesheet(c))
    bus = theme_bus()
    bus.colors = c
    bus.changed.emit(c)
    return c


SPIN_TEXT_INSET = 7  # px: a spin box's text starts where a drop-down's does (their border and padding are shared)


class _AppStyle(QProxyStyle):
    """What the style sheet cannot say. Qt lays a spin box's text field from its buttons alone, ignoring the
    sheet's horizontal padding, so the number would touch the left border: its text is inset here instead."""

    def polish(self, target: Any) -> Any:  # noqa: ANN401 - Qt's overloads: a widget, the application, a palette
        result = super().polish(target)
        if isinstance(target, QAbstractSpinBox):
            target.lineEdit().setTextMargins(SPIN_TEXT_INSET, 0, 0, 0)
        return result


_app_style: _AppStyle | None = None


def _install_style(app: QApplication) -> None:
    """The app's base style (the platform's, wrapped once); the style sheet draws on top of it."""
    global _app_style
    if _app_style is None:
        _app_style = _AppStyle()
        app.setStyle(_app_style)


def resolve(theme: str) -> Colors:
    """'light' | 'dark' | 'system' (follows the platform's colour scheme; light when unknown)."""
    if theme == "dark":
        return DARK
    if theme == "light":
        return LIGHT
    hints = QGuiApplication.styleHints()
    return DARK if hints.colorScheme() == Qt.ColorScheme.Dark else LIGHT


def palette(c: Colors) -> QPalette:
    p = QPalette()
    role = QPalette.ColorRole
    for r, value in (
        (role.Window, c.window),
        (role.WindowText, c.text),
        (role.Base, c.surface),
        (role.AlternateBase, c.sidebar),
        (role.Text, c.text),
        (role.Button, c.surface),
        (role.ButtonText, c.text),
        (role.Highlight, c.accent),
        (role.HighlightedText, c.accent_text),
        (role.ToolTipBase, c.surface),
        (role.ToolTipText, c.text),
        (role.PlaceholderText, c.muted),
        (role.Link, c.accent),
        (role.Mid, c.border),
    ):
        p.setColor(r, QColor(value))
    p.setColor(QPalette.ColorGroup.Disabled, role.Text, QColor(c.muted))
    p.setColor(QPalette.ColorGroup.Disabled, role.ButtonText, QColor(c.muted))
    p.setColor(QPalette.ColorGroup.Disabled, role.WindowText, QColor(c.muted))
    return p


def stylesheet(c: Colors) -> str:
    return f"""
* {{ font-size: 10pt; }}
QMainWindow, QDialog {{ background: {c.window}; }}
QToolTip {{ background: {c.surface}; color: {c.text}; border: 1px solid {c.border}; padding: 4px 6px; }}

#Sidebar {{ background: {c.sidebar}; border-right: 1px solid {c.border}; }}
#Sidebar QListWidget {{ background: transparent; border: none; outline: none; }}
#Sidebar QListWidget::item {{ padding: 8px 10px; border-radius: 8px; margin: 1px 0; color: {c.text}; }}
#Sidebar QListWidget::item:hover {{ background: {c.hover}; }}
#Sidebar QListWidget::item:selected {{ background: {c.selection}; color: {c.text}; }}
#AppTitle {{ font-size: 13pt; font-weight: 600; color: {c.text}; }}

QLineEdit, QPlainTextEdit, QTextEdit, QSpinBox, QDoubleSpinBox, QComboBox {{
    background: {c.surface}; color: {c.text}; border: 1px solid {c.border}; border-radius: 8px;
    padding: 6px 8px; selection-background-color: {c.accent}; selection-color: {c.accent_text};
}}
QLineEdit:focus, QPlainTextEdit:focus, QTextEdit:focus, QSpinBox:focus, QDoubleSpinBox:focus, QComboBox:focus {{
    border: 1px solid {c.accent};
}}
QComboBox::drop-down {{ border: none; width: 22px; subcontrol-origin: padding; subcontrol-position: center right; }}
QComboBox::down-arrow {{ image: url({icon_file("chevron-down", c.muted)}); width: 12px; height: 12px; }}
QSpinBox, QDoubleSpinBox {{ padding: 5px 24px 5px 8px; }}  /* the height of a drop-down; text inset: _AppStyle */
QSpinBox::up-button, QDoubleSpinBox::up-button, QSpinBox::down-button, QDoubleSpinBox::down-button {{
    subcontrol-origin: border; width: 20px; border: none; background: transparent; }}
QSpinBox::up-button, QDoubleSpinBox::up-button {{ subcontrol-position: top right; margin: 3px 3px 0 0; }}
QSpinBox::down-button, QDoubleSpinBox::down-button {{ subcontrol-position: bottom right; margin: 0 3px 3px 0; }}
QSpinBox::up-button:hover, QDoubleSpinBox::up-button:hover, QSpinBox::down-button:hover,
QDoubleSpinBox::down-button:hover {{ background: {c.hover}; border-radius: 4px; }}
QSpinBox::up-arrow, QDoubleSpinBox::up-arrow {{ image: url({icon_file("chevron-up", c.muted, 10)}); width: 10px;
    height: 10px; }}
QSpinBox::down-arrow, QDoubleSpinBox::down-arrow {{ image: url({icon_file("chevron-down", c.muted, 10)});
    width: 10px; height: 10px; }}
QDialogButtonBox {{ dialogbuttonbox-buttons-have-icons: 0; }}
QCheckBox {{ spacing: 8px; }}
QCheckBox::indicator {{ width: 14px; height: 14px; border: 1px solid {c.muted}; border-radius: 4px;
    background: {c.surface}; }}
QCheckBox::indicator:hover, QCheckBox::indicator:focus {{ border-color: {c.accent}; }}
QCheckBox::indicator:checked {{ background: {c.accent}; border-color: {c.accent};
    image: url({icon_file("check", c.accent_text, 12)}); }}
QCheckBox::indicator:disabled {{ background: {c.border}; border-color: {c.border}; }}
QComboBox QAbstractItemView {{ background: {c.surface}; color: {c.text}; border: 1px solid {c.border};
    selection-background-color: {c.selection}; selection-color: {c.text}; }}

QPushButton, QToolButton {{
    background: {c.surface}; color: {c.text}; border: 1px solid {c.border}; border-radius: 8px; padding: 6px 12px;
}}
QPushButton:hover, QToolButton:hover {{ background: {c.hover}; }}
QPushButton:focus, QToolButton:focus {{ border: 1px solid {c.accent}; }}
QPushButton:disabled, QToolButton:disabled {{ color: {c.muted}; }}
QPushButton[primary="true"] {{ background: {c.accent}; color: {c.accent_text}; border: 1px solid {c.accent};
    font-weight: 600; }}
QPushButton[primary="true"]:disabled {{ background: {c.border}; border-color: {c.border}; color: {c.muted}; }}
QToolButton[flat="true"] {{ background: transparent; border: 1px solid transparent; padding: 4px; }}
QToolButton[flat="true"]:hover {{ background: {c.hover}; }}
QToolButton[flat="true"]:focus {{ border: 1px solid {c.accent}; }}
QPushButton[danger="true"] {{ color: {c.danger}; }}

#ChatHeader {{ background: {c.window}; border-bottom: 1px solid {c.border}; }}
#ChatTitle {{ font-size: 12pt; font-weight: 600; color: {c.text}; }}
#ChatScroll, #ChatScroll > QWidget > QWidget {{ background: {c.window}; border: none; }}

#Bubble[role="user"] {{ background: {c.user_bubble}; border-radius: 14px; }}
#Bubble[role="assistant"] {{ background: {c.assistant_bubble}; border: 1px solid {c.border}; border-radius: 14px; }}
#Bubble[role="error"] {{ background: {c.danger_soft}; border: 1px solid {c.danger}; border-radius: 14px; }}
#Bubble[unseen="true"] {{ border: 1px dashed {c.muted}; }}
#BubbleText {{ color: {c.text}; background: transparent; }}
#BubbleMeta, #Muted {{ color: {c.muted}; font-size: 9pt; }}
#Muted[kind="error"] {{ color: {c.danger}; }}
#Muted[kind="warn"] {{ color: {c.notice}; }}
#Notice {{ color: {c.notice}; font-size: 9pt; font-style: italic; }}
#Thumb {{ border: 1px solid {c.border}; border-radius: 8px; background: {c.surface}; }}

#Composer {{ background: {c.surface}; border: 1px solid {c.border}; border-radius: 16px; }}
#Composer[dragging="true"] {{ border: 2px dashed {c.accent}; background: {c.accent_soft}; }}
#ComposerEdit {{ border: none; background: transparent; padding: 4px 2px; }}
#AttachmentStrip, #AttachmentRow {{ background: transparent; border: none; }}
#Thumb:focus {{ border: 2px solid {c.accent}; }}
#Banner {{ background: {c.danger_soft}; border: 1px solid {c.danger}; border-radius: 10px; }}
#Banner[kind="info"] {{ background: {c.accent_soft}; border: 1px solid {c.accent}; }}
#BannerText {{ color: {c.text}; }}

#StatusLine {{ background: {c.window}; border-top: 1px solid {c.border}; }}
#StatusLine QLabel {{ color: {c.muted}; font-size: 9pt; }}
QProgressBar {{ background: {c.border}; border: none; border-radius: 4px; height: 8px; text-align: center;
    color: transparent; }}
QProgressBar::chunk {{ background: {c.accent}; border-radius: 4px; }}

#Card {{ background: {c.surface}; border: 1px solid {c.border}; border-radius: 14px; }}
#CardTitle {{ font-size: 11pt; font-weight: 600; color: {c.text}; }}
#Headline {{ font-size: 20pt; font-weight: 600; color: {c.text}; }}
#Subhead {{ font-size: 11pt; color: {c.muted}; }}
#Badge {{ min-height: 14px; }}
#Badge[kind="ok"] {{ background: #2f9e6a; color: white; border-radius: 9px; padding: 2px 8px; font-size: 8pt; }}
#Badge[kind="warn"] {{ background: #c98a1b; color: white; border-radius: 9px; padding: 2px 8px; font-size: 8pt; }}
#Badge[kind="bad"] {{ background: {c.danger}; color: white; border-radius: 9px; padding: 2px 8px; font-size: 8pt; }}
#Badge[kind="info"] {{ background: {c.accent_soft}; color: {c.text}; border-radius: 9px; padding: 2px 8px;
    font-size: 8pt; }}

QTabWidget::pane {{ border: 1px solid {c.border}; border-radius: 10px; background: {c.surface}; top: -1px; }}
QTabBar::tab {{ background: transparent; color: {c.muted}; padding: 8px 14px; border: none; }}
QTabBar::tab:selected {{ color: {c.text}; border-bottom: 2px solid {c.accent}; }}
QScrollBar:vertical {{ background: transparent; width: 10px; margin: 2px; }}
QScrollBar::handle:vertical {{ background: {c.border}; border-radius: 4px; min-height: 30px; }}
QScrollBar::add-line:vertical, QScrollBar::sub-line:vertical {{ height: 0; }}
QScrollBar:horizontal {{ background: transparent; height: 10px; margin: 2px; }}
QScrollBar::handle:horizontal {{ background: {c.border}; border-radius: 4px; min-width: 30px; }}
QScrollBar::add-line:horizontal, QScrollBar::sub-line:horizontal {{ width: 0; }}
QMenu {{ background: {c.surface}; color: {c.text}; border: 1px solid {c.border}; padding: 4px; }}
QMenu::item {{ padding: 6px 18px; border-radius: 6px; }}
QMenu::item:selected {{ background: {c.selection}; }}
"""

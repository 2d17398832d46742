"""Delivering a drop without a platform drag loop: the self-test and the tests use it on the real widgets."""

from __future__ import annotations

import warnings

from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QWidget


def simulate_drop(widget: QWidget, mime: QMimeData, pos: QPoint | None = None) -> bool:
    """Send the drag-enter a real drag would, then the drop; True when the widget accepted the drag."""
    point = pos if pos is not None else widget.rect().center()
    action = Qt.DropAction.CopyAction
    buttons, mods = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the QPoint overload is the one PySide6 offers
        enter = QDragEnterEvent(point, action, mime, buttons, mods)
    QApplication.sendEvent(widget, enter)
    if not enter.isAccepted():
        return False
    drop = QDropEvent(QPointF(point), action, mime, buttons, mods)
    QApplication.sendEvent(widget, drop)
    return True

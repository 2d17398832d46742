"""The sheet that lists every key of the window (F1 or Ctrl+/): the window's shortcuts and the keys of its parts."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QGridLayout, QLabel, QVBoxLayout, QWidget

# keys that belong to one part of the window (handled there, not window shortcuts)
LOCAL_KEYS: tuple[tuple[str, str], ...] = (
    ("Enter", "Send the message (Shift+Enter: a new line)"),
    ("Esc", "Stop the answer · close a message · clear the search"),
    ("Tab", "Move between the list, the attached images and the question"),
    ("↑ ↓, Enter", "Move through the conversations, open one"),
    ("F2 · Delete", "Rename · delete the highlighted conversation"),
    ("Ctrl+← / Ctrl+→", "Move the attached image that has the focus"),
    ("Delete", "Remove the attached image that has the focus"),
)


class ShortcutsSheet(QDialog):
    def __init__(self, window_keys: Sequence[tuple[str, str]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        self.setObjectName("ShortcutsSheet")
        v = QVBoxLayout(self)
        grid = QGridLayout()
        grid.setHorizontalSpacing(18)
        grid.setVerticalSpacing(6)
        self.rows: list[tuple[str, str]] = []
        for row, (keys, what) in enumerate([*window_keys, *LOCAL_KEYS]):
            shown = QKeySequence(keys).toString(QKeySequence.SequenceFormat.NativeText) if "+" in keys else keys
            key = QLabel(shown or keys)
            key.setObjectName("KeyCap")
            key.setTextFormat(Qt.TextFormat.PlainText)
            text = QLabel(what)
            text.setTextFormat(Qt.TextFormat.PlainText)
            grid.addWidget(key, row, 0, Qt.AlignmentFlag.AlignRight)
            grid.addWidget(text, row, 1)
            self.rows.append((keys, what))
        v.addLayout(grid)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        v.addWidget(buttons)

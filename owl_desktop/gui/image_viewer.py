"""A larger view of an image: Esc closes, Left/Right step through the images of the same message."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QKeyEvent, QPixmap, QResizeEvent
from PySide6.QtWidgets import QDialog, QLabel, QVBoxLayout, QWidget


class ImageViewer(QDialog):
    def __init__(self, images: list[tuple[Path, str]], index: int = 0, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ImageViewer")
        self.setModal(True)
        self._images = images
        self._index = max(0, min(index, len(images) - 1))
        self._pixmap = QPixmap()
        self._label = QLabel(alignment=Qt.AlignmentFlag.AlignCenter)
        self._label.setMinimumSize(200, 150)
        self._caption = QLabel(alignment=Qt.AlignmentFlag.AlignCenter)
        self._caption.setObjectName("Muted")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 16, 16, 12)
        layout.addWidget(self._label, 1)
        layout.addWidget(self._caption)
        self.resize(900, 680)
        self._show_current()

    @property
    def index(self) -> int:
        return self._index

    def _show_current(self) -> None:
        path, name = self._images[self._index]
        self._pixmap = QPixmap(str(path))
        self.setWindowTitle(name)
        self._label.setAccessibleName(f"Image {name}")
        size = f"{self._pixmap.width()} × {self._pixmap.height()}" if not self._pixmap.isNull() else "unreadable"
        count = f"  ·  {self._index + 1} of {len(self._images)}" if len(self._images) > 1 else ""
        self._caption.setText(f"{name}  ·  {size}{count}")
        self._rescale()

    def _rescale(self) -> None:
        if self._pixmap.isNull():
            self._label.setText("This image cannot be shown.")
            return
        target = self._label.size() * self.devicePixelRatioF()
        scaled = self._pixmap.scaled(
            target, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
        )
        if scaled.width() > self._pixmap.width():  # never blow a small image up past its real size
            scaled = self._pixmap
        scaled.setDevicePixelRatio(self.devicePixelRatioF())
        self._label.setPixmap(scaled)

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._rescale()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() == Qt.Key.Key_Right and self._index + 1 < len(self._images):
            self._index += 1
            self._show_current()
        elif event.key() == Qt.Key.Key_Left and self._index > 0:
            self._index -= 1
            self._show_current()
        else:
            super().keyPressEvent(event)

"""An image shown scaled to fit, on which a drag draws a rectangle: the region comes back in the original's pixels."""

from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import QMouseEvent, QPixmap
from PySide6.QtWidgets import QLabel, QRubberBand, QWidget

from owl_desktop.image_region import Region

MIN_DRAG = 4  # logical pixels: a shorter drag is a click, not a region


class RegionSelectLabel(QLabel):
    """Shows `pixmap` (the full-resolution original) scaled down to fit; a drag emits the region it covers."""

    region_selected = Signal(object)  # image_region.Region in the original's pixels

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setCursor(Qt.CursorShape.CrossCursor)
        self._source = QSize()
        self._band = QRubberBand(QRubberBand.Shape.Rectangle, self)
        self._origin: QPoint | None = None

    def show_scaled(self, original: QPixmap) -> None:
        """Display `original` scaled to the label (never blown up past its real size)."""
        self._source = original.size()
        dpr = self.devicePixelRatioF()
        scaled = original.scaled(
            self.size() * dpr, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
        )
        if scaled.width() > original.width():
            scaled = original
        scaled.setDevicePixelRatio(dpr)
        self.setPixmap(scaled)

    def image_rect(self) -> QRect:
        """Where the shown image lies in the label, in logical pixels."""
        pix = self.pixmap()
        if pix is None or pix.isNull():
            return QRect()
        size = pix.deviceIndependentSize().toSize()
        return QRect((self.width() - size.width()) // 2, (self.height() - size.height()) // 2, *size.toTuple())

    def to_region(self, rect: QRect) -> Region | None:
        """A rectangle of the label (logical pixels) as a region of the original, clipped to the image."""
        shown = self.image_rect()
        if shown.isEmpty() or self._source.isEmpty():
            return None
        rect = rect.intersected(shown)
        if rect.isEmpty():
            return None
        sx = self._source.width() / shown.width()
        sy = self._source.height() / shown.height()
        x0 = round((rect.left() - shown.left()) * sx)
        y0 = round((rect.top() - shown.top()) * sy)
        x1 = round((rect.left() + rect.width() - shown.left()) * sx)
        y1 = round((rect.top() + rect.height() - shown.top()) * sy)
        x1, y1 = min(x1, self._source.width()), min(y1, self._source.height())
        if x1 <= x0 or y1 <= y0:
            return None
        return Region(x0, y0, x1 - x0, y1 - y0)

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton:
            self._origin = event.position().toPoint()
            self._band.setGeometry(QRect(self._origin, QSize()))
            self._band.show()
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._origin is not None:
            self._band.setGeometry(_between(self._origin, event.position().toPoint()))
        super().mouseMoveEvent(event)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        origin, self._origin = self._origin, None
        self._band.hide()
        if origin is not None and event.button() == Qt.MouseButton.LeftButton:
            end = event.position().toPoint()
            if (end - origin).manhattanLength() >= MIN_DRAG:
                region = self.to_region(_between(origin, end))
                if region is not None:
                    self.region_selected.emit(region)
        super().mouseReleaseEvent(event)


def _between(a: QPoint, b: QPoint) -> QRect:
    """The rectangle two drag points span (its width is the distance, not the distance + 1 of QRect(a, b))."""
    return QRect(min(a.x(), b.x()), min(a.y(), b.y()), abs(a.x() - b.x()), abs(a.y() - b.y()))

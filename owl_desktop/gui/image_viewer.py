"""A larger view of an image: Esc closes, Left/Right step through the images of the same message.

Drag a rectangle on the image to attach that region of the full-resolution original as an image of its own
(`crop_ready`); "What the model sees" shows the pixels the loaded model gets and what they cost (gui/region_select.py,
gui/model_view_preview.py).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QImageReader, QKeyEvent, QPixmap, QResizeEvent
from PySide6.QtWidgets import QDialog, QHBoxLayout, QLabel, QPushButton, QStackedWidget, QVBoxLayout, QWidget

from owl_desktop.errors import OwlError
from owl_desktop.gui.attachments import PREVIEW, PendingImage
from owl_desktop.gui.region_select import RegionSelectLabel
from owl_desktop.image_region import Region
from owl_desktop.model_family import ImagePlan, single_view_plan

ZOOM_HINT = "Drag a rectangle to attach that part of the image, at full resolution, as an image of its own."


class ImageViewer(QDialog):
    crop_ready = Signal(object)  # PendingImage: a region of the shown image, "crop of NAME (x,y,w,h)"

    def __init__(
        self,
        images: list[tuple[Path, str]],
        index: int = 0,
        parent: QWidget | None = None,
        plan: ImagePlan | None = None,
        context: int | None = None,
    ) -> None:
        super().__init__(parent)
        self._plan = plan  # the loaded model's image plan (None: no model loaded; the preview assumes mPLUG-Owl)
        self._context = context
        self.setObjectName("ImageViewer")
        self.setModal(True)
        self._images = images
        self._index = max(0, min(index, len(images) - 1))
        self._pixmap = QPixmap()
        self._label = RegionSelectLabel()
        self._label.setMinimumSize(200, 150)
        self._label.region_selected.connect(self.attach_region)
        self._caption = QLabel(alignment=Qt.AlignmentFlag.AlignCenter)
        self._caption.setObjectName("Muted")
        self._caption.setTextFormat(Qt.TextFormat.PlainText)
        self.hint = QLabel(ZOOM_HINT)
        self.hint.setObjectName("Muted")
        self.hint.setWordWrap(True)
        self.model_view_button = QPushButton("What the model sees")
        self.model_view_button.setCheckable(True)
        self.model_view_button.setToolTip("The exact pixels the model gets from this image, and what they cost")
        self.model_view_button.toggled.connect(self.show_model_view)
        self.preview: QWidget | None = None  # gui/model_view_preview.ModelViewPreview while it is shown
        self._stack = QStackedWidget()
        self._stack.addWidget(self._label)
        top = QHBoxLayout()
        top.addWidget(self.hint, 1)
        top.addWidget(self.model_view_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 16, 16, 12)
        layout.addLayout(top)
        layout.addWidget(self._stack, 1)
        layout.addWidget(self._caption)
        self.resize(900, 680)
        self._show_current()

    @property
    def index(self) -> int:
        return self._index

    def _show_current(self) -> None:
        path, name = self._images[self._index]
        reader = QImageReader(str(path))
        reader.setAutoTransform(True)  # EXIF orientation, as image_intake decodes it: regions match the original
        self._pixmap = QPixmap.fromImage(reader.read())
        self.setWindowTitle(name)
        self._label.setAccessibleName(f"Image {name}")
        size = f"{self._pixmap.width()} × {self._pixmap.height()}" if not self._pixmap.isNull() else "unreadable"
        count = f"  ·  {self._index + 1} of {len(self._images)}" if len(self._images) > 1 else ""
        self._caption.setText(f"{name}  ·  {size}{count}")
        self._rescale()
        if self.model_view_button.isChecked():
            self.show_model_view(True)

    def _rescale(self) -> None:
        if self._pixmap.isNull():
            self._label.setText("This image cannot be shown.")
            return
        self._label.show_scaled(self._pixmap)

    def attach_region(self, region: Region) -> PendingImage | None:
        """Cut `region` out of the current image's original file and offer it as a new attachment."""
        from PySide6.QtGui import QImage

        from owl_desktop.image_intake import read_source
        from owl_desktop.image_region import crop_bytes

        path, name = self._images[self._index]
        try:
            png, crop_name = crop_bytes(read_source(path, name)[0], name, region)
        except OwlError as exc:
            self.hint.setText(f"That region cannot be attached: {exc}")
            return None
        preview = QImage.fromData(png, "PNG").scaled(
            PREVIEW * 2, PREVIEW * 2, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
        )
        image = PendingImage(png, crop_name, preview)
        self.hint.setText(f"Attached {crop_name}. {ZOOM_HINT}")
        self.crop_ready.emit(image)
        return image

    def show_model_view(self, on: bool) -> None:
        """Swap the image for the preview of the model's views (built from the engine's own view code)."""
        if self.preview is not None:
            self._stack.removeWidget(self.preview)
            self.preview.deleteLater()
            self.preview = None
        if not on:
            self._stack.setCurrentWidget(self._label)
            return
        from owl_desktop.gui.model_view_preview import ModelViewPreview
        from owl_desktop.image_intake import load_image

        path, name = self._images[self._index]
        try:
            img = load_image(path, name)
        except OwlError as exc:
            self.hint.setText(str(exc))
            self.model_view_button.setChecked(False)
            return
        self.preview = ModelViewPreview(img, self._plan or single_view_plan(), context=self._context)
        if self._plan is None:
            self.preview.cost.setText(self.preview.cost.text() + " (no model is loaded: shown as mPLUG-Owl reads it)")
        self._stack.addWidget(self.preview)
        self._stack.setCurrentWidget(self.preview)

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

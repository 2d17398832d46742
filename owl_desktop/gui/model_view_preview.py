"""What the model sees of an image: exactly the pixels of its views, and the context positions they cost.

The views come from engine/doc_crops.py (plan_views, view_images), the code the engine encodes from: for mPLUG-Owl the
whole image stretched to 224×224; for UReader the global view, then the crops of the chosen grid, laid out as the
grid they were cut from. Each view is shown at its real size, one screen pixel per model pixel.
"""

from __future__ import annotations

from PIL import Image
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QScrollArea, QVBoxLayout, QWidget

from owl_desktop.engine.doc_crops import ViewLayout, plan_views, view_images
from owl_desktop.model_family import ImagePlan

ROWS_PER_VIEW = 65  # LLM positions per view (mPLUG-Owl v1's abstractor: 64 queries + 1)
GAP = 4


def to_qimage(img: Image.Image) -> QImage:
    """An RGB Pillow image as a QImage that owns its pixels."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    data = rgb.tobytes()
    return QImage(data, rgb.width, rgb.height, 3 * rgb.width, QImage.Format.Format_RGB888).copy()


def cost_text(layout: ViewLayout, rows_per_view: int = ROWS_PER_VIEW, context: int | None = None) -> str:
    positions = layout.rows(rows_per_view)
    of = f" of the {context:,}" if context else ""
    if layout.grid is None:
        side = layout.crop_size
        return f"One {side}×{side} view of the whole image · {positions:,}{of} context positions"
    g = layout.grid
    return (
        f"A global view + a {g} grid of {g.cells} crop{'s' * (g.cells != 1)}, {layout.crop_size}×{layout.crop_size} "
        f"each · {positions:,}{of} context positions"
    )


class ModelViewPreview(QWidget):
    """The views of one decoded image under an image plan; `views` and `view_labels` are in the model's order."""

    def __init__(
        self,
        img: Image.Image,
        plan: ImagePlan,
        rows_per_view: int = ROWS_PER_VIEW,
        context: int | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setObjectName("ModelViewPreview")
        self.layout_ = plan_views(img.width, img.height, plan)
        self.views = view_images(img, self.layout_)
        self.view_labels: list[QLabel] = []
        for i, view in enumerate(self.views):
            label = QLabel()
            label.setPixmap(QPixmap.fromImage(to_qimage(view)))
            label.setFixedSize(view.width, view.height)
            label.setAccessibleName("Global view" if i == 0 and self.layout_.grid else f"View {i + 1}")
            self.view_labels.append(label)
        self.cost = QLabel(cost_text(self.layout_, rows_per_view, context))
        self.cost.setWordWrap(True)
        self.cost.setAccessibleName("Context cost")

        canvas = QWidget()
        row = QHBoxLayout(canvas)
        row.setSpacing(GAP * 4)
        row.addWidget(self._titled("Global view" if self.layout_.grid else "The model's input", self.view_labels[0]))
        if self.layout_.grid is not None:
            grid_box = QWidget()
            grid = QGridLayout(grid_box)
            grid.setSpacing(GAP)
            grid.setContentsMargins(0, 0, 0, 0)
            cols = self.layout_.grid.cols
            for k, label in enumerate(self.view_labels[1:]):
                grid.addWidget(label, k // cols, k % cols)
            row.addWidget(self._titled(f"Crops, {self.layout_.grid} grid", grid_box))
        row.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(canvas)
        scroll.setWidgetResizable(True)  # the fixed-size views set its minimum; scroll bars only when needed
        scroll.setAlignment(Qt.AlignmentFlag.AlignCenter)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 4)
        outer.addWidget(scroll, 1)
        outer.addWidget(self.cost)

    @staticmethod
    def _titled(title: str, body: QWidget) -> QWidget:
        box = QWidget()
        col = QVBoxLayout(box)
        col.setContentsMargins(0, 0, 0, 0)
        caption = QLabel(title)
        caption.setObjectName("Muted")
        col.addWidget(caption)
        col.addWidget(body, 0, Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        col.addStretch(1)
        return box

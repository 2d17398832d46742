"""Attaching a PDF: its pages rendered off the GUI thread (pdf_intake), with a page picker for long documents."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QMimeData, QObject, Qt, Signal
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QLineEdit, QVBoxLayout, QWidget

from owl_desktop import pdf_intake
from owl_desktop.gui.attachments import PREVIEW, PendingImage
from owl_desktop.gui.workers import TaskRunner
from owl_desktop.model_family import ImagePlan
from owl_desktop.tasks import Task


def split_pdfs(mime: QMimeData) -> tuple[list[Path], QMimeData | None]:
    """The local PDF files a drop carries, and what is left of the drop for the image path (None if nothing)."""
    if not mime.hasUrls():
        return [], mime
    pdfs = [Path(u.toLocalFile()) for u in mime.urls() if u.isLocalFile() and pdf_intake.is_pdf(u.toLocalFile())]
    if not pdfs:
        return [], mime
    rest = [u for u in mime.urls() if not (u.isLocalFile() and pdf_intake.is_pdf(u.toLocalFile()))]
    if not rest:
        return pdfs, None
    left = QMimeData()
    left.setUrls(rest)
    return pdfs, left


class PdfPagePicker(QDialog):
    """Which pages of a long PDF to attach: a range field ("1-3, 7"), checked as it is typed."""

    def __init__(self, name: str, count: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("PdfPagePicker")
        self.setWindowTitle(f"Pages of {name}")
        self._count = count
        self._pages: list[int] = []
        layout = QVBoxLayout(self)
        intro = QLabel(
            f"{name} has {count:,} pages. Choose up to {pdf_intake.MAX_PAGES} to attach; each page is one image "
            "the model reads."
        )
        intro.setWordWrap(True)
        self.field = QLineEdit(f"1-{min(count, pdf_intake.MAX_PAGES)}")
        self.field.setAccessibleName("Pages to attach")
        self.field.setPlaceholderText("e.g. 1-3, 7")
        self.hint = QLabel()
        self.hint.setObjectName("Muted")
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Attach pages")
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        for w in (intro, self.field, self.hint, self.buttons):
            layout.addWidget(w)
        self.field.textChanged.connect(self._check)
        self._check()

    def pages(self) -> list[int]:
        return list(self._pages)

    def _check(self) -> None:
        try:
            pages = pdf_intake.parse_pages(self.field.text(), self._count)
            if len(pages) > pdf_intake.MAX_PAGES:
                raise ValueError(f"{len(pages)} pages chosen; choose at most {pdf_intake.MAX_PAGES}")
        except ValueError as exc:
            self._pages = []
            self.hint.setText(str(exc))
        else:
            self._pages = pages
            self.hint.setText(f"{len(pages)} page{'s' * (len(pages) != 1)} will be attached.")
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(bool(self._pages))


class PdfAttacher(QObject):
    """PDF files in, one PendingImage per chosen page out (`pages_ready`), or a message (`refused`)."""

    pages_ready = Signal(object)  # [PendingImage], in page order
    refused = Signal(str)

    def __init__(self, parent: QWidget, plan: Callable[[], ImagePlan | None] = lambda: None) -> None:
        super().__init__(parent)
        self._parent = parent
        self.plan = plan  # the loaded model's image plan (None: none loaded), read when a PDF is rendered
        self._runner = TaskRunner(self, max_threads=1, quick_threads=1)
        self.picker: PdfPagePicker | None = None  # the open page picker, if any

    def busy(self) -> bool:
        return bool(self._runner.running()) or self.picker is not None

    def attach(self, paths: list[Path]) -> None:
        for path in paths:
            handle = self._runner.start(f"pdf:{path}", lambda _task, p=path: _count(p))
            handle.succeeded.connect(self._counted)
            handle.failed.connect(self.refused)

    def _counted(self, result: tuple[bytes, str, int]) -> None:
        data, name, count = result
        if count <= pdf_intake.MAX_PAGES:
            self._render(data, name, None)
            return
        picker = PdfPagePicker(name, count, self._parent)
        picker.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.picker = picker

        def done(code: int) -> None:
            self.picker = None
            if code == QDialog.DialogCode.Accepted:
                self._render(data, name, picker.pages())

        picker.finished.connect(done)
        picker.open()

    def _render(self, data: bytes, name: str, pages: list[int] | None) -> None:
        side = pdf_intake.render_side(self.plan())
        handle = self._runner.start(f"pdf-render:{name}", lambda task: _render(data, name, pages, side, task))
        handle.succeeded.connect(self.pages_ready)
        handle.failed.connect(self.refused)

    def shutdown(self) -> None:
        self._runner.shutdown()


def _count(path: Path) -> tuple[bytes, str, int]:
    data, name = pdf_intake.read_pdf(path)
    return data, name, pdf_intake.page_count(data, name)


def _render(data: bytes, name: str, pages: list[int] | None, side: int, task: Task) -> list[PendingImage]:
    """Runs on a pool thread: every page rendered, or an error (nothing is attached half-way)."""
    rendered = pdf_intake.render_pages(data, name, pages, side)
    task.check()
    out = []
    for page in rendered:
        preview = QImage.fromData(page.png, "PNG").scaled(
            PREVIEW * 2, PREVIEW * 2, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
        )
        out.append(PendingImage(page.png, page.name, preview))
    return out

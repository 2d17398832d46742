"""Where a question is written: text, attached images (drop, paste, file dialog), send and stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QMimeData, QPoint, QSize, Qt, Signal
from PySide6.QtGui import (
    QDragEnterEvent,
    QDragMoveEvent,
    QDropEvent,
    QFocusEvent,
    QImage,
    QKeyEvent,
    QMouseEvent,
    QPixmap,
    QResizeEvent,
)
from PySide6.QtWidgets import (
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from owl_desktop.gui import attachments
from owl_desktop.gui.attachments import PendingImage, PreviewPool
from owl_desktop.gui.icons import icon, render
from owl_desktop.gui.pdf_attach import PdfAttacher, split_pdfs
from owl_desktop.gui.theme import colors, theme_bus

CHIP = 72


class AttachmentChip(QFrame):
    """One pending image: a thumbnail with a remove button. Drag sideways (or Ctrl+←/→) to reorder."""

    remove_clicked = Signal(object)
    move_by = Signal(object, int)
    drag_to = Signal(object, QPoint)  # global position while dragging
    open_clicked = Signal(object)
    focused = Signal(object)

    def __init__(self, image: PendingImage) -> None:
        super().__init__()
        self.image = image
        self.setObjectName("Thumb")
        self.setFixedSize(CHIP, CHIP)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setToolTip(f"{image.name}: drag or Ctrl+←/→ to reorder, Delete to remove")
        self.setAccessibleName(f"Attached image {image.name}")
        self.pic = QLabel(self)
        self.pic.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.pic.setGeometry(2, 2, CHIP - 4, CHIP - 4)
        self.show_preview()
        self.remove_button = QToolButton(self)
        self.remove_button.setObjectName("ChipRemove")
        self.remove_button.setIcon(icon("close", "#ffffff"))
        self.remove_button.setIconSize(QSize(12, 12))
        self.remove_button.setGeometry(CHIP - 24, 4, 20, 20)
        self.remove_button.setStyleSheet(
            "QToolButton#ChipRemove { background: rgba(20,22,30,170); border-radius: 10px; border: none; padding: 0; }"
        )
        self.remove_button.setToolTip(f"Remove {image.name}")
        self.remove_button.setAccessibleName(f"Remove {image.name}")
        self.remove_button.clicked.connect(lambda: self.remove_clicked.emit(self))
        self._press: QPoint | None = None
        self._dragging = False

    def show_preview(self) -> None:
        """The image's preview, or a placeholder while the pool still reads it."""
        dpr = self.devicePixelRatioF()
        if self.image.preview is None or self.image.preview.isNull():
            self.pic.setPixmap(render("image", 28, colors().muted, dpr))
            self.pic.setToolTip("reading the image…")
            return
        side = round((CHIP - 4) * dpr)
        pix = QPixmap.fromImage(self.image.preview).scaled(
            side, side, Qt.AspectRatioMode.KeepAspectRatioByExpanding, Qt.TransformationMode.SmoothTransformation
        )
        pix = pix.copy((pix.width() - side) // 2, (pix.height() - side) // 2, side, side)
        pix.setDevicePixelRatio(dpr)
        self.pic.setPixmap(pix)
        self.pic.setToolTip("")

    def focusInEvent(self, event: QFocusEvent) -> None:  # noqa: N802 - Qt override
        super().focusInEvent(event)
        self.focused.emit(self)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        ctrl = event.modifiers() & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier)
        if event.key() in (Qt.Key.Key_Delete, Qt.Key.Key_Backspace):
            self.remove_clicked.emit(self)
        elif ctrl and event.key() == Qt.Key.Key_Left:
            self.move_by.emit(self, -1)
        elif ctrl and event.key() == Qt.Key.Key_Right:
            self.move_by.emit(self, 1)
        elif event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter, Qt.Key.Key_Space):
            self.open_clicked.emit(self)
        else:
            super().keyPressEvent(event)

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton:
            self._press = event.position().toPoint()
            self._dragging = False
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._press is not None and (event.position().toPoint() - self._press).manhattanLength() > 8:
            self._dragging = True
            self.setCursor(Qt.CursorShape.ClosedHandCursor)
            self.drag_to.emit(self, event.globalPosition().toPoint())
        super().mouseMoveEvent(event)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if self._press is not None and not self._dragging and event.button() == Qt.MouseButton.LeftButton:
            self.open_clicked.emit(self)
        self._press = None
        self._dragging = False
        self.unsetCursor()
        super().mouseReleaseEvent(event)


class AttachmentStrip(QScrollArea):
    """The pending images in a row that scrolls sideways: every chip keeps its size and its ×, at any count."""

    changed = Signal()
    open_requested = Signal(list, int)  # [(source, name)], index

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("AttachmentStrip")
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setWidgetResizable(True)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        inner = QWidget()
        inner.setObjectName("AttachmentRow")
        self._row = QHBoxLayout(inner)
        self._row.setContentsMargins(4, 4, 4, 4)
        self._row.setSpacing(8)
        self._row.addStretch(1)
        self.setWidget(inner)
        self.setFixedHeight(CHIP + 8 + self.horizontalScrollBar().sizeHint().height())
        self._chips: list[AttachmentChip] = []
        self.setVisible(False)

    def images(self) -> list[PendingImage]:
        return [c.image for c in self._chips]

    def chip_of(self, image: PendingImage) -> AttachmentChip | None:
        return next((c for c in self._chips if c.image is image), None)

    def add(self, image: PendingImage) -> None:
        chip = AttachmentChip(image)
        chip.remove_clicked.connect(self._remove_chip)
        chip.move_by.connect(lambda c, d: self.move(self._chips.index(c), self._chips.index(c) + d))
        chip.drag_to.connect(self._drag_chip)
        chip.open_clicked.connect(lambda c: self.open_requested.emit(self._entries(), self._chips.index(c)))
        chip.focused.connect(lambda c: self.ensureWidgetVisible(c, 8, 0))
        self._chips.append(chip)
        self._row.insertWidget(len(self._chips) - 1, chip)
        self._changed()

    def _entries(self) -> list[tuple[Path | bytes, str]]:
        return [(c.image.source, c.image.name) for c in self._chips]

    def remove(self, index: int) -> None:
        self._remove_chip(self._chips[index])

    def _remove_chip(self, chip: AttachmentChip) -> None:
        i = self._chips.index(chip)
        self._chips.pop(i)
        chip.setParent(None)
        chip.deleteLater()
        if self._chips:
            self._chips[min(i, len(self._chips) - 1)].setFocus()
        self._changed()

    def move(self, src: int, dst: int) -> None:
        if not (0 <= src < len(self._chips)) or not (0 <= dst < len(self._chips)) or src == dst:
            return
        chip = self._chips.pop(src)
        self._chips.insert(dst, chip)
        self._row.removeWidget(chip)
        self._row.insertWidget(dst, chip)
        chip.setFocus()
        self._changed()

    def _drag_chip(self, chip: AttachmentChip, global_pos: QPoint) -> None:
        x = self.widget().mapFromGlobal(global_pos).x()
        target = max(0, min(len(self._chips) - 1, (x - 4) // (CHIP + 8)))
        self.move(self._chips.index(chip), int(target))

    def clear(self) -> None:
        for chip in self._chips:
            chip.setParent(None)
            chip.deleteLater()
        self._chips.clear()
        self._changed()

    def _changed(self) -> None:
        self.setVisible(bool(self._chips))
        self.changed.emit()


class ComposerEdit(QPlainTextEdit):
    """The text box: Enter sends, Shift+Enter starts a new line; pasted images become attachments."""

    submit = Signal()
    mime_pasted = Signal(QMimeData)
    escape = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("ComposerEdit")
        self.send_on_enter = True
        self._keys = ""
        self.set_keys_hint("Enter to send, Shift+Enter for a new line")
        self.setAccessibleName("Question")
        self.setTabChangesFocus(True)
        self.document().contentsChanged.connect(self._fit_height)
        self._fit_height()

    PLACEHOLDER = "Ask about your images…"

    def set_keys_hint(self, keys: str) -> None:
        """How to send, after the placeholder when the box is wide enough for both on one line (always the tooltip)."""
        self._keys = keys
        self.setToolTip(keys)
        self._fit_placeholder()

    def _fit_placeholder(self) -> None:
        full = f"{self.PLACEHOLDER}  ({self._keys})"
        room = self.viewport().width() - 2 * int(self.document().documentMargin()) - 4
        fits = self.fontMetrics().horizontalAdvance(full) <= room
        self.setPlaceholderText(full if fits else self.PLACEHOLDER)  # a wrapped placeholder would be cut off

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._fit_placeholder()

    def _fit_height(self) -> None:
        lines = max(1, min(8, int(self.document().size().height())))
        line_h = self.fontMetrics().lineSpacing()
        policy = Qt.ScrollBarPolicy.ScrollBarAsNeeded if lines >= 8 else Qt.ScrollBarPolicy.ScrollBarAlwaysOff
        self.setVerticalScrollBarPolicy(policy)
        self.setFixedHeight(lines * line_h + 16)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        enter = event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        mods = event.modifiers()
        if enter and not (mods & Qt.KeyboardModifier.ShiftModifier):
            if self.send_on_enter or mods & Qt.KeyboardModifier.ControlModifier:
                self.submit.emit()
                return
        if event.key() == Qt.Key.Key_Escape:
            self.escape.emit()
            return
        super().keyPressEvent(event)

    def canInsertFromMimeData(self, source: QMimeData) -> bool:  # noqa: N802 - Qt override
        return source.hasImage() or source.hasUrls() or super().canInsertFromMimeData(source)

    def insertFromMimeData(self, source: QMimeData) -> None:  # noqa: N802 - Qt override
        if source.hasImage() or (source.hasUrls() and any(u.isLocalFile() for u in source.urls())):
            self.mime_pasted.emit(source)
            return
        super().insertFromMimeData(source)


class Composer(QFrame):
    send_requested = Signal(str, list)  # text, [PendingImage]
    edit_submitted = Signal(object, str)  # user message id, new text
    stop_requested = Signal()
    refused = Signal(str)  # a message for the user about what could not be attached
    open_requested = Signal(list, int)

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("Composer")
        self.setAcceptDrops(True)
        self._busy = False
        self._paste_count = 0
        self._editing: object | None = None
        self._send_when_ready = False  # Enter came while a pasted image was still being encoded
        self.previews = PreviewPool(self)
        self.previews.done.connect(self._on_prepared)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(10, 8, 10, 8)
        outer.setSpacing(4)
        self.edit_hint = QLabel()
        self.edit_hint.setObjectName("Muted")
        self.edit_hint.setVisible(False)
        outer.addWidget(self.edit_hint)
        self.budget_line = QLabel()
        self.budget_line.setObjectName("Muted")
        self.budget_line.setWordWrap(True)
        self.budget_line.setTextFormat(Qt.TextFormat.PlainText)
        self.budget_line.setAccessibleName("What this message costs in the model's context")
        self.budget_line.setVisible(False)
        self._budget_kind = "ok"
        self.budget_source: Callable[[str, list[tuple[int, int] | None]], tuple[str, str] | None] | None = None
        self.strip = AttachmentStrip()
        self.strip.changed.connect(self._update_buttons)
        self.strip.open_requested.connect(self.open_requested)
        outer.addWidget(self.strip)
        row = QHBoxLayout()
        row.setSpacing(6)
        self.attach_button = QToolButton()
        self.attach_button.setProperty("flat", True)
        self.attach_button.setIconSize(QSize(20, 20))
        self.attach_button.setToolTip("Attach images (Ctrl+O)")
        self.attach_button.setAccessibleName("Attach images")
        self.attach_button.clicked.connect(self.choose_files)
        self.edit = ComposerEdit()
        self.edit.submit.connect(self.submit)
        self.edit.escape.connect(self.cancel_edit)
        self.edit.mime_pasted.connect(self.add_mime)
        self.edit.textChanged.connect(self._update_buttons)
        self.send_button = QToolButton()
        self.send_button.setObjectName("SendButton")
        self.send_button.setIconSize(QSize(18, 18))
        self.send_button.setFixedSize(36, 36)
        self.send_button.clicked.connect(self._send_or_stop)
        row.addWidget(self.attach_button, 0, Qt.AlignmentFlag.AlignBottom)
        row.addWidget(self.edit, 1)
        row.addWidget(self.send_button, 0, Qt.AlignmentFlag.AlignBottom)
        outer.addLayout(row)
        outer.addWidget(self.budget_line)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)
        self.pdfs = PdfAttacher(self)  # PDF pages are rendered off the GUI thread, then attached like images
        self.pdfs.pages_ready.connect(lambda pages: [self.strip.add(p) for p in pages])
        self.pdfs.refused.connect(self.refused)
        theme_bus().changed.connect(self._retint)
        self._retint()

    # ------------------------------------------------------------ state

    def images(self) -> list[PendingImage]:
        return self.strip.images()

    def text(self) -> str:
        return self.edit.toPlainText()

    @property
    def editing(self) -> bool:
        """An earlier message is being edited (its text is in the box), not a new question."""
        return self._editing is not None

    def set_busy(self, busy: bool) -> None:
        self._busy = busy
        self._retint()
        self._update_buttons()

    def set_send_on_enter(self, value: bool) -> None:
        self.edit.send_on_enter = value
        self.edit.set_keys_hint("Enter to send, Shift+Enter for a new line" if value else "Ctrl+Enter to send")

    def _update_buttons(self) -> None:
        self.update_budget()
        can_send = bool(self.text().strip()) and not self._busy and self._budget_kind != "error"
        self.send_button.setEnabled(self._busy or can_send)

    def update_budget(self) -> None:
        """Say what the message costs in the model's context, and refuse one that cannot fit (see budget_source)."""
        images = self.images()
        verdict = None
        if self.budget_source is not None and (images or self.text().strip()) and self._editing is None:
            verdict = self.budget_source(self.text(), [i.size for i in images])
        kind, line = verdict or ("ok", "")
        self._budget_kind = kind
        self.budget_line.setText(line)
        self.budget_line.setProperty("kind", kind)
        self.budget_line.style().unpolish(self.budget_line)
        self.budget_line.style().polish(self.budget_line)
        self.budget_line.setVisible(bool(line) and (bool(images) or kind != "ok"))

    def budget_kind(self) -> str:
        """ "ok", "warn" (old turns will leave the model's view) or "error" (cannot be sent)."""
        return self._budget_kind

    def _retint(self, _colors: object = None) -> None:
        c = colors()
        self.attach_button.setIcon(icon("attach", c.muted))
        if self._busy:
            self.send_button.setIcon(icon("stop", c.accent_text))
            self.send_button.setToolTip("Stop the answer (Esc)")
            self.send_button.setAccessibleName("Stop")
        else:
            self.send_button.setIcon(icon("send", c.accent_text))
            self.send_button.setToolTip("Send (Enter)")
            self.send_button.setAccessibleName("Send")
        self.send_button.setStyleSheet(
            f"QToolButton#SendButton {{ background: {c.accent}; border: none; border-radius: 18px; }}"
            f"QToolButton#SendButton:disabled {{ background: {c.border}; }}"
            f"QToolButton#SendButton:focus {{ border: 2px solid {c.text}; }}"
        )

    # ------------------------------------------------------------ actions

    def _send_or_stop(self) -> None:
        if self._busy:
            self.stop_requested.emit()
        else:
            self.submit()

    def submit(self) -> None:
        text = self.text().strip()
        if self._busy or not text:
            return
        if self._editing is None:
            if any(img.source is None for img in self.images()):  # a paste still being encoded: send when ready
                self._send_when_ready = True
                self.budget_line.setText("Preparing the pasted image; the message goes out when it is ready.")
                self.budget_line.setVisible(True)
                return
            self.update_budget()
            if self._budget_kind == "error":
                self.refused.emit(self.budget_line.text())
                return
        if self._editing is not None:
            msg_id, self._editing = self._editing, None
            self.edit_hint.setVisible(False)
            self.edit.clear()
            self.edit_submitted.emit(msg_id, text)
            return
        images = self.images()
        self.edit.clear()
        self.strip.clear()
        self.send_requested.emit(text, images)

    def start_edit(self, msg_id: object, text: str) -> None:
        self._editing = msg_id
        self.edit.setPlainText(text)
        self.edit_hint.setText("Editing your last question: Enter asks again with the new text, Esc cancels.")
        self.edit_hint.setVisible(True)
        self.edit.setFocus()

    def cancel_edit(self) -> None:
        if self._busy:
            self.stop_requested.emit()
            return
        if self._editing is not None:
            self._editing = None
            self.edit.clear()
            self.edit_hint.setVisible(False)

    def choose_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(
            self,
            "Attach images",
            str(Path.home()),
            "Images and PDFs (*.png *.jpg *.jpeg *.webp *.gif *.bmp *.tif *.tiff *.pdf);;All files (*)",
        )
        self.add_files([Path(f) for f in files])

    def add_files(self, files: list[Path]) -> None:
        """Attach files at once; their previews follow from the pool (a damaged one is then removed, and said)."""
        self.pdfs.attach([p for p in files if p.suffix.lower() == ".pdf"])
        refused = []
        for path in (p for p in files if p.suffix.lower() != ".pdf"):
            try:
                self.attach(attachments.check_file(path))
            except attachments.AttachmentError as exc:
                refused.append(str(exc))
        if refused:
            self.refused.emit(" ".join(refused))

    def attach(self, image: PendingImage, bitmap: QImage | None = None) -> None:
        self.strip.add(image)
        if not image.ready:
            self.previews.prepare(image, bitmap)

    def _on_prepared(self, image: PendingImage, error: str) -> None:
        chip = self.strip.chip_of(image)
        if error:
            if chip is not None:
                self.strip.remove(self.strip.images().index(image))
            self.refused.emit(error)
        elif chip is not None:
            chip.show_preview()
            self._update_buttons()
        if self._send_when_ready and not any(img.source is None for img in self.images()):
            self._send_when_ready = False
            self.submit()

    def add_mime(self, mime: QMimeData) -> bool:
        """Attach what a drop or paste carries; refused items are reported. True when something was added."""
        pdfs, rest = split_pdfs(mime)
        self.pdfs.attach(pdfs)  # their pages arrive later, rendered off the GUI thread
        if rest is None:
            return bool(pdfs)
        mime = rest
        self._paste_count += 1 if mime.hasImage() and not mime.hasUrls() else 0
        images, refused = attachments.from_mime(mime, self._paste_count)
        for image, bitmap in images:
            self.attach(image, bitmap)
        if refused:
            self.refused.emit(" ".join(refused))
        elif not images:
            self.refused.emit("Nothing in what was dropped could be attached; drop image files.")
        return bool(images)

    # ------------------------------------------------------------ drop

    def set_drag_highlight(self, on: bool) -> None:
        self.setProperty("dragging", on)
        self.style().unpolish(self)
        self.style().polish(self)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 - Qt override
        if attachments.mime_has_candidates(event.mimeData()):
            event.acceptProposedAction()
            self.set_drag_highlight(True)

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:  # noqa: N802 - Qt override
        if attachments.mime_has_candidates(event.mimeData()):
            event.acceptProposedAction()

    def dragLeaveEvent(self, event: object) -> None:  # noqa: N802 - Qt override
        self.set_drag_highlight(False)

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 - Qt override
        self.set_drag_highlight(False)
        event.acceptProposedAction()
        self.add_mime(event.mimeData())

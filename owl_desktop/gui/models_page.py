"""The model manager: installed models (use, verify, delete), the catalog (download with speed and time left)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from owl_desktop.bundle import NAME_MAX
from owl_desktop.gui import format as fmt
from owl_desktop.gui.model_controller import (
    ModelController,
    entry_field,
    entry_key,
    model_id,
    model_name,
    result_model_id,
)
from owl_desktop.gui.welcome import JobCard, badge, fit_badge
from owl_desktop.gui.workers import user_message


def _section(title: str) -> QLabel:
    label = QLabel(title)
    label.setObjectName("CardTitle")
    return label


class InstalledRow(QFrame):
    use_clicked = Signal(str)
    verify_clicked = Signal(str)
    delete_clicked = Signal(str)
    rename_requested = Signal(str, str)  # id, the name typed

    def __init__(self, model: Any, loaded: bool) -> None:
        super().__init__()
        self.setObjectName("Card")
        self.model_id = model_id(model)
        self.name = model_name(model)
        h = QHBoxLayout(self)
        h.setContentsMargins(16, 10, 12, 10)
        text = QVBoxLayout()
        self.title = QLabel(self.name)
        self.title.setObjectName("CardTitle")
        self.title.setTextFormat(Qt.TextFormat.PlainText)  # a name from a manifest or the user: never rich text
        self.title.setWordWrap(True)
        text.addWidget(self.title)
        self.name_edit = QLineEdit(self.name)
        self.name_edit.setMaxLength(NAME_MAX)
        self.name_edit.setAccessibleName(f"New name for {self.name}")
        self.name_edit.setVisible(False)
        self.name_edit.installEventFilter(self)
        text.addWidget(self.name_edit)
        bits = [self.model_id] if self.model_id != self.name else []
        if quant := entry_field(model, "quant", "quantization"):
            bits.append(str(quant))
        if size := entry_field(model, "size_bytes", "size", "disk_bytes"):
            bits.append(fmt.size(size))
        if source := entry_field(model, "source_repo", "repo_id"):
            bits.append(str(source))
        if problem := entry_field(model, "problem"):
            bits.append(f"⚠ {problem}")
        self.detail = QLabel(" · ".join(bits))
        self.detail.setObjectName("Muted")
        self.detail.setTextFormat(Qt.TextFormat.PlainText)
        self.detail.setWordWrap(True)
        text.addWidget(self.detail)
        h.addLayout(text, 1)
        if loaded:
            h.addWidget(badge("In use", "ok"), 0, Qt.AlignmentFlag.AlignVCenter)
        self.rename = QPushButton("Rename")
        self.rename.setAccessibleName(f"Rename {self.name}")
        self.rename.setToolTip("Give this model a name of your own (Enter keeps it, Esc cancels)")
        self.rename.clicked.connect(self.start_rename)
        self.use = QPushButton("Use")
        self.use.setProperty("primary", True)
        self.use.setEnabled(not loaded)
        self.use.setAccessibleName(f"Use {self.name}")
        self.verify = QPushButton("Verify")
        self.verify.setAccessibleName(f"Verify {self.name}")
        self.delete = QPushButton("Delete")
        self.delete.setProperty("danger", True)
        self.delete.setAccessibleName(f"Delete {self.name}")
        self.use.clicked.connect(lambda: self.use_clicked.emit(self.model_id))
        self.verify.clicked.connect(lambda: self.verify_clicked.emit(self.model_id))
        self.delete.clicked.connect(lambda: self.delete_clicked.emit(self.model_id))
        for b in (self.rename, self.verify, self.delete, self.use):
            h.addWidget(b)

    def start_rename(self) -> None:
        """The name becomes a field: Enter asks for the new name, Esc (or Rename again) puts the name back."""
        if self.name_edit.isVisible():
            self.end_rename()
            return
        self.title.setVisible(False)
        self.name_edit.setText(self.name)
        self.name_edit.setVisible(True)
        self.name_edit.selectAll()
        self.name_edit.setFocus()

    def end_rename(self) -> None:
        self.name_edit.setVisible(False)
        self.title.setVisible(True)

    def eventFilter(self, watched: Any, event: Any) -> bool:  # noqa: N802 - Qt override
        """Enter and Esc belong to the name field: they never reach the window (its default button, or closing)."""
        if watched is self.name_edit and event.type() == QEvent.Type.KeyPress:
            if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
                self.rename_requested.emit(self.model_id, self.name_edit.text())
                return True
            if event.key() == Qt.Key.Key_Escape:
                self.end_rename()
                self.rename.setFocus()
                return True
        return super().eventFilter(watched, event)


class ModelsWindow(QDialog):
    """Non-modal: downloads keep going while the user chats, and survive closing this window."""

    use_requested = Signal(str)

    def __init__(self, models: ModelController, loaded_id: Any = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Models")
        self.setObjectName("ModelsWindow")
        self.models = models
        self.loaded_id = loaded_id
        self.confirm_delete = True
        self.resize(760, 640)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(20, 18, 20, 18)
        outer.setSpacing(12)
        top = QHBoxLayout()
        head = QLabel("Models")
        head.setObjectName("Headline")
        top.addWidget(head, 1)
        self.import_button = QPushButton("Import a model…")
        self.import_button.setAccessibleName("Import a model folder")
        self.import_button.clicked.connect(self.choose_import)
        top.addWidget(self.import_button)
        outer.addLayout(top)
        self.notice = QLabel()
        self.notice.setObjectName("Muted")
        self.notice.setWordWrap(True)
        self.notice.setVisible(False)
        outer.addWidget(self.notice)
        self.import_card = JobCard("Importing a model", "", "Import", "Import a model")
        self.import_card.cancel.setText("Cancel")
        self.import_card.cancel.setAccessibleName("Cancel the import")
        self.import_card.cancel.clicked.connect(lambda: self.models.cancel(self._import_key or ""))
        self.import_card.setVisible(False)
        self._import_key: str | None = None
        outer.addWidget(self.import_card)
        scroll = QScrollArea()
        scroll.setObjectName("ChatScroll")
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        body = QWidget()
        self._column = QVBoxLayout(body)
        self._column.setContentsMargins(0, 0, 6, 0)
        self._column.setSpacing(10)
        scroll.setWidget(body)
        outer.addWidget(scroll, 1)
        self._cards: dict[str, JobCard] = {}
        self._installed_rows: list[InstalledRow] = []
        models.installed_changed.connect(self.refresh)
        models.job_progress.connect(self._on_progress)
        models.job_done.connect(self._on_done)
        models.job_failed.connect(self._on_failed)
        models.job_cancelled.connect(self._on_cancelled)
        self.refresh()

    def set_loaded(self, model_id: Any) -> None:
        self.loaded_id = model_id
        self.refresh()

    # ------------------------------------------------------------ content

    def refresh(self) -> None:
        while self._column.count():
            item = self._column.takeAt(0)
            if (w := item.widget()) is not None:
                w.deleteLater()
        self._cards.clear()
        self._installed_rows.clear()
        self._column.addWidget(_section("On this computer"))
        installed = self.models.installed()
        if not installed:
            empty = QLabel("No models yet. Download one below, or import a converted model folder.")
            empty.setObjectName("Muted")
            self._column.addWidget(empty)
        for model in installed:
            row = InstalledRow(model, model_id(model) == self.loaded_id)
            row.use_clicked.connect(self.use_requested)
            row.verify_clicked.connect(self._verify)
            row.delete_clicked.connect(self._delete)
            row.rename_requested.connect(self._rename)
            self._installed_rows.append(row)
            self._column.addWidget(row)
        catalog = self.models.catalog()
        partials = {entry_key(d): d for d in self.models.partial_downloads()}
        others = [d for key, d in partials.items() if key not in {entry_key(e) for e in catalog}]
        if others:
            self._column.addSpacing(8)
            self._column.addWidget(_section("Unfinished downloads"))
            for download in others:
                self._column.addWidget(self._partial_card(download))
        self._column.addSpacing(8)
        self._column.addWidget(_section("Available to download"))
        if not catalog:
            empty = QLabel("The catalog is not available.")
            empty.setObjectName("Muted")
            self._column.addWidget(empty)
        sources = {str(entry_field(m, "source_repo", default="")) for m in installed}
        for entry in catalog:
            self._column.addWidget(self._catalog_card(entry, partials.get(entry_key(entry)), sources))
        self._column.addStretch(1)

    def installed_ids(self) -> list[str]:
        return [r.model_id for r in self._installed_rows]

    def installed_row(self, model_id: str) -> InstalledRow | None:
        return next((r for r in self._installed_rows if r.model_id == model_id), None)

    def card(self, key: str) -> JobCard | None:
        """The download card of a catalog entry or a partial download (by entry_key, e.g. the repo id)."""
        return self._cards.get(key)

    def _catalog_card(self, entry: Any, partial: Any, installed_sources: set[str]) -> JobCard:
        key = entry_key(entry)
        name = entry_field(entry, "title", "name", "display_name", default=key)
        quant = entry_field(entry, "quant", default="")
        desc = entry_field(entry, "description", "summary", default=str(entry_field(entry, "repo_id", default="")))
        card = JobCard(f"{name}" + (f"  ·  {quant}" if quant else ""), str(desc), "Download", f"Download {name}")
        size = entry_field(entry, "download_bytes", "size_bytes", "size")
        installed = str(entry_field(entry, "repo_id", default="")) in installed_sources
        extra = [("Installed", "ok")] if installed else []
        card.set_badges([fit_badge(None), (f"{fmt.size(size)}", "info"), *extra])
        self._wire(card, key, entry, partial)
        if (offline := self.models.offline_reason()) and self.models.running(key) is None:
            card.set_unavailable(offline)
        preflight = self.models.preflight(entry)
        preflight.succeeded.connect(lambda r, c=card, s=size, x=extra: self._on_preflight(c, s, r, x))
        return card

    def _partial_card(self, download: Any) -> JobCard:
        """A download of a repository outside the catalog that stopped part way."""
        key = entry_key(download)
        repo = str(entry_field(download, "repo_id", default=key))
        card = JobCard(repo, "A model download that did not finish.", "Resume", f"Resume the download of {repo}")
        total = entry_field(download, "bytes_total")
        card.set_badges([(fmt.size(total), "info")] if total else [])
        self._wire(card, key, download, download)
        return card

    def _wire(self, card: JobCard, key: str, target: Any, partial: Any) -> None:
        """Download/Resume, Pause and Discard of a card, and its state now: running, paused part way, or idle."""
        card.button.clicked.connect(lambda _=False, t=target, c=card: self._download(t, c))
        card.cancel.setText("Pause")
        card.cancel.setAccessibleName(f"Pause {card.title.text()}")
        card.cancel.setToolTip("Stop the download; Resume continues where it left off, now or after a restart")
        card.cancel.clicked.connect(lambda _=False, k=key: self.models.cancel(k))
        repo = str(entry_field(target, "repo_id", "repo", default=key))
        card.discard.clicked.connect(lambda _=False, r=repo: self._discard(r))
        self._cards[key] = card
        if self.models.running(key) is not None:
            card.set_running(True)
            card.set_progress(None, "downloading…")
        elif partial is not None:
            self._show_partial(card, partial)

    def _show_partial(self, card: JobCard, download: Any) -> bool:
        """The card of a download that stopped part way (None: there is none): its bar, what is kept, Resume."""
        if download is None:
            return False
        done = entry_field(download, "bytes_done", default=0)
        total = entry_field(download, "bytes_total")
        card.set_paused(entry_field(download, "fraction", default=0.0), fmt.paused_line(done, total))
        return True

    def _on_preflight(self, card: JobCard, size: Any, report: Any, extra: list[tuple[str, str]]) -> None:
        try:
            quant = getattr(report, "quant", None)
            badges = [fit_badge(report), *[(str(quant), "info")] * bool(quant), (fmt.size(size), "info")]
            card.set_badges(badges + extra)
            if lines := getattr(report, "lines", None):
                card.setToolTip("\n".join(lines))
        except RuntimeError:  # the card was rebuilt meanwhile
            pass

    # ------------------------------------------------------------ actions

    def _download(self, entry: Any, card: JobCard) -> None:
        partial = self.models.partial_download(entry_key(entry))
        card.set_running(True)
        if partial is not None:
            card.set_progress(entry_field(partial, "fraction", default=0.0), "resuming…")
        else:
            card.set_progress(None, "starting…")
        self.models.pull(entry)

    def _discard(self, repo_id: str) -> None:
        if self.confirm_delete:
            answer = QMessageBox.question(
                self, "Discard download", f"Delete what was downloaded of {repo_id}? It would start from zero."
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        try:
            freed = self.models.discard_download(repo_id)
        except Exception as exc:  # noqa: BLE001 - shown, never raised
            self._say(f"Could not discard the download of {repo_id}: {user_message(exc)}")
            return
        self._say(f"The download of {repo_id} was discarded ({fmt.size(freed)} freed).")

    def choose_import(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Import a model folder (a bundle or an mPLUG-Owl checkpoint)")
        if folder:
            self.import_model(Path(folder))

    def import_model(self, path: Path) -> None:
        """An import (a bundle copied and checked, or a checkpoint converted) in its own card: a bar, what it is
        doing with the time left, and Cancel."""
        self._say("")
        self._import_key = f"import:{path}"
        card = self.import_card
        card.title.setText(f"Importing {path.name}")
        card.body.setText(str(path))
        card.reset()
        card.set_running(True)
        card.set_progress(None, "starting…")
        card.setVisible(True)
        self.models.import_path(path)

    def _rename(self, ref: str, name: str) -> None:
        try:
            stored = self.models.rename(ref, name)  # the page is rebuilt with the new name (installed_changed)
        except Exception as exc:  # noqa: BLE001 - shown, never raised; the field stays open to fix the name
            self._say(f"⚠ Could not rename: {user_message(exc)}")
            return
        self._say(f"Renamed to “{stored}”.")

    def _verify(self, model_id: str) -> None:
        self._say(f"Verifying {self.models.display_name(model_id)}…")
        self.models.verify(model_id)

    def _delete(self, model_id: str) -> None:
        name = self.models.display_name(model_id)
        if self.confirm_delete:
            answer = QMessageBox.question(
                self, "Delete model", f"Delete {name} from this computer? Your conversations are kept."
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        try:
            self.models.remove(model_id)
            self._say(f"{name} was deleted.")
        except Exception as exc:  # noqa: BLE001 - shown, never raised
            self._say(f"Could not delete {name}: {user_message(exc)}")

    def _say(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.setVisible(bool(text))

    # ------------------------------------------------------------ job events

    def _on_progress(self, key: str, p: Any, line: str) -> None:
        if (card := self._cards.get(key)) is not None:
            card.set_running(True)
            card.set_progress(p.fraction, line)
        elif key == self._import_key:
            self.import_card.set_progress(p.fraction, line)
        elif key.startswith(("import:", "verify:")):
            self._say(line)

    def _on_done(self, key: str, _result: Any) -> None:
        if key.startswith("verify:"):
            self._say(f"{self.models.display_name(key.split(':', 1)[1])} is complete and intact.")
        elif key.startswith("import:"):
            self._end_import()
            name = self.models.display_name(result_model_id(_result))
            self._say(f"Imported as “{name}”; Rename gives it a name of your own.")
        elif (card := self._cards.get(key)) is not None:
            card.set_running(False)
            card.set_progress(1.0, "Installed.")

    def _on_failed(self, key: str, message: str) -> None:
        if (card := self._cards.get(key)) is not None:
            self._show_partial(card, self.models.partial_download(key))  # what was kept; trying again resumes it
            card.set_failed(message)
        elif not key.startswith("preflight:"):
            if key == self._import_key:
                self._end_import()
            self._say(f"⚠ {message}")

    def _end_import(self) -> None:
        self._import_key = None
        self.import_card.set_running(False)
        self.import_card.setVisible(False)

    def _on_cancelled(self, key: str) -> None:
        if key == self._import_key:
            self._end_import()
            self._say("The import was cancelled; nothing was installed.")
            return
        card = self._cards.get(key)
        if card is not None and not self._show_partial(card, self.models.partial_download(key)):
            card.reset()

    def keyPressEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        if event.key() == Qt.Key.Key_Escape:
            self.close()
        else:
            super().keyPressEvent(event)

"""First run: get the default model (its size, whether it fits this machine) or try the offline demo."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from owl_desktop.gui import format as fmt
from owl_desktop.gui.icons import render
from owl_desktop.gui.model_controller import DEMO_KEY, ModelController, entry_field, entry_key, result_model_id
from owl_desktop.gui.workers import user_message


def badge(text: str, kind: str) -> QLabel:
    label = QLabel(text)
    label.setObjectName("Badge")
    label.setProperty("kind", kind)
    label.setAccessibleName(text)
    return label


def fit_badge(report: Any) -> tuple[str, str]:
    """(text, kind) from a preflight report: fits, too big (with the quantization that would fit), no disk."""
    if report is None:
        return "checking this computer…", "info"
    if getattr(report, "disk_ok", True) is False:
        return "Not enough disk space", "bad"
    memory_ok = getattr(report, "memory_ok", None)
    if memory_ok is None:
        memory_ok = entry_field(report, "fits", "ok")
    if memory_ok is True:
        return "Fits this computer", "ok"
    if memory_ok is False:
        recommended = getattr(report, "recommended", None)
        return (f"Too big here; {recommended} fits", "warn") if recommended else ("Won't fit in memory", "bad")
    return "Fit unknown", "info"


class JobCard(QFrame):
    """A card with a title, a description, a primary action and a progress line."""

    def __init__(self, title: str, body: str, action: str, accessible: str) -> None:
        super().__init__()
        self.setObjectName("Card")
        v = QVBoxLayout(self)
        v.setContentsMargins(20, 18, 20, 18)
        v.setSpacing(8)
        self.title = QLabel(title)
        self.title.setObjectName("CardTitle")
        self.title.setWordWrap(True)
        v.addWidget(self.title)
        # the badges have a line of their own under the title, as tall as a badge once the card has had badges
        # (a card without any, like an import's, has no such line): when they change (e.g. "checking this
        # computer…" becomes "Fits this computer") no card moves, and a narrow window is not widened by them
        self._badge_row = row = QWidget()
        row.setFixedHeight(badge("Ag", "info").sizeHint().height())
        row.setVisible(False)
        self.badges = QHBoxLayout(row)
        self.badges.setContentsMargins(0, 0, 0, 0)
        self.badges.setSpacing(6)
        self.badges.addStretch(1)
        v.addWidget(row)
        self.body = QLabel(body)
        self.body.setWordWrap(True)
        self.body.setObjectName("Muted")
        v.addWidget(self.body)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.progress.setAccessibleName(f"{title} progress")
        v.addWidget(self.progress)
        self.line = QLabel()
        self.line.setObjectName("Muted")
        self.line.setWordWrap(True)
        self.line.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.line.setVisible(False)
        v.addWidget(self.line)
        row = QHBoxLayout()
        row.addStretch(1)
        self.discard = QPushButton("Discard")
        self.discard.setProperty("danger", True)
        self.discard.setVisible(False)
        self.discard.setAccessibleName(f"Discard the download of {title}")
        self.discard.setToolTip("Delete what was downloaded so far")
        self.cancel = QPushButton("Cancel")
        self.cancel.setVisible(False)
        self.cancel.setAccessibleName(f"Cancel {title}")
        self.button = QPushButton(action)
        self.button.setProperty("primary", True)
        self.button.setAccessibleName(accessible)
        self._action = action
        row.addWidget(self.discard)
        row.addWidget(self.cancel)
        row.addWidget(self.button)
        v.addLayout(row)

    def set_badges(self, items: list[tuple[str, str]]) -> None:
        while self.badges.count() > 1:  # the last item is the stretch that keeps them to the left
            w = self.badges.takeAt(0).widget()
            if w is not None:
                w.hide()  # gone now, not when the deletion is processed
                w.deleteLater()
        for i, (text, kind) in enumerate(items):
            self.badges.insertWidget(i, badge(text, kind))
        self._badge_row.setVisible(True)

    def badge_texts(self) -> list[str]:
        return [w.text() for i in range(self.badges.count()) if isinstance(w := self.badges.itemAt(i).widget(), QLabel)]

    def set_running(self, running: bool) -> None:
        self.progress.setVisible(running)
        self.line.setVisible(running or bool(self.line.text()))
        self.cancel.setVisible(running)
        self.button.setEnabled(not running)
        self.button.setVisible(not running)  # while it runs, Pause/Cancel is the one action
        if running:
            self.discard.setVisible(False)

    def set_paused(self, fraction: float, line: str, action: str = "Resume") -> None:
        """Stopped part way with the bytes kept: the bar stays at `fraction`, the primary button resumes."""
        self.set_running(False)
        self.progress.setRange(0, 1000)
        self.progress.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        self.progress.setVisible(True)
        self.line.setText(line)
        self._line_kind(None)
        self.line.setVisible(True)
        self.button.setText(action)
        self.discard.setVisible(True)

    def set_unavailable(self, reason: str) -> None:
        """The action cannot run here (e.g. offline): the button is off and the card says why, in its own line."""
        self.button.setEnabled(False)
        self.button.setToolTip(reason)
        self.line.setText(reason)
        self._line_kind(None)
        self.line.setVisible(True)

    def set_failed(self, message: str, action: str = "Try again") -> None:
        self.set_running(False)
        self.line.setText(f"⚠ {message}")
        self._line_kind("error")
        self.line.setVisible(True)
        self.button.setText(action)

    def _line_kind(self, kind: str | None) -> None:
        if self.line.property("kind") != kind:
            self.line.setProperty("kind", kind)
            self.line.style().unpolish(self.line)
            self.line.style().polish(self.line)

    def reset(self) -> None:
        """Back to the card's first state: its action, no progress, no message."""
        self.set_running(False)
        self.line.setText("")
        self._line_kind(None)
        self.line.setVisible(False)
        self.discard.setVisible(False)
        self.button.setText(self._action)

    def set_progress(self, fraction: float | None, line: str) -> None:
        if fraction is None:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(fraction * 1000))
        self.line.setText(line)
        self._line_kind(None)
        self.line.setVisible(True)


class WelcomePage(QScrollArea):
    model_ready = Signal(str)  # the id of a model that is now installed
    open_models = Signal()
    COLUMN_WIDTH = 720

    def __init__(self, models: ModelController) -> None:
        super().__init__()
        self.setObjectName("ChatScroll")
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.models = models
        self._entry: Any = None
        body = QWidget()
        outer = QHBoxLayout(body)
        # the column fills a narrow window and stays at a readable width in a wide one; its width never follows
        # its content, so a card whose badges change does not widen it
        holder = QWidget()
        holder.setMaximumWidth(self.COLUMN_WIDTH)
        column = QVBoxLayout(holder)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(14)
        outer.addStretch(1)
        outer.addWidget(holder, 100)
        outer.addStretch(1)
        column.addStretch(1)
        logo = QLabel(alignment=Qt.AlignmentFlag.AlignCenter)
        logo.setPixmap(render("owl", 88, "#000", self.devicePixelRatioF()))
        column.addWidget(logo)
        head = QLabel("Welcome to Owl", alignment=Qt.AlignmentFlag.AlignCenter)
        head.setObjectName("Headline")
        column.addWidget(head)
        sub = QLabel(
            "Chat about screenshots, documents and photos with mPLUG-Owl. "
            "The model runs on this computer: your images never leave it.",
            alignment=Qt.AlignmentFlag.AlignCenter,
        )
        sub.setObjectName("Subhead")
        sub.setWordWrap(True)
        column.addWidget(sub)
        column.addSpacing(8)
        self.download_card = JobCard(
            "mPLUG-Owl 7B",
            "The full model, downloaded once from Hugging Face, checked and converted for this computer.",
            "Download",
            "Download the default model",
        )
        self.download_card.button.clicked.connect(self.start_download)
        self.download_card.cancel.setText("Pause")
        self.download_card.cancel.setAccessibleName("Pause the download")
        self.download_card.cancel.clicked.connect(lambda: self._cancel(self._download_key()))
        self.download_card.discard.clicked.connect(self._discard)
        column.addWidget(self.download_card)
        self.demo_card = JobCard(
            "Offline demo model",
            "A tiny model with random weights, built in seconds without a download. Its answers are nonsense; "
            "it lets you try every part of the app right away.",
            "Try the demo",
            "Use the offline demo model",
        )
        self.demo_card.set_badges([("No download", "info"), ("A few seconds", "info")])
        self.demo_card.button.clicked.connect(self.start_demo)
        self.demo_card.cancel.clicked.connect(lambda: self._cancel(DEMO_KEY))
        column.addWidget(self.demo_card)
        more = QPushButton("Import or manage models…")
        more.setAccessibleName("Open the model manager")
        more.clicked.connect(self.open_models)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(more)
        row.addStretch(1)
        column.addLayout(row)
        column.addStretch(2)
        self.setWidget(body)
        models.job_progress.connect(self._on_progress)
        models.job_done.connect(self._on_done)
        models.job_failed.connect(self._on_failed)
        models.job_cancelled.connect(self._on_cancelled)

    # ------------------------------------------------------------ default model

    def refresh(self) -> None:
        """Show the default model's card, then check how it would fit this computer."""
        self.show_default_model()
        self.check_fit()

    def show_default_model(self) -> None:
        """The default model's card as far as the catalog and the downloads folder tell (quick, on this thread)."""
        catalog = self.models.catalog()
        self._entry = next((e for e in catalog if entry_field(e, "default", "recommended")), None) or (
            catalog[0] if catalog else None
        )
        card = self.download_card
        if self._entry is None:
            card.body.setText("The model catalog is not available in this build. Import a converted model instead.")
            card.button.setEnabled(False)
            card.set_badges([])
            return
        name = entry_field(self._entry, "title", "name", "display_name", default=entry_key(self._entry))
        card.title.setText(str(name))
        size = entry_field(self._entry, "download_bytes", "size_bytes", "size")
        card.set_badges([fit_badge(None), (f"{fmt.size(size)} download", "info")])  # the fit first: it changes
        if self.models.running(self._download_key()) is not None:
            card.set_running(True)
        elif not self._show_partial():
            card.reset()
        if (offline := self.models.offline_reason()) and self.models.running(self._download_key()) is None:
            card.set_unavailable(offline)

    def check_fit(self) -> None:
        """Whether the default model fits this computer, estimated on the pool; the card's badge shows it."""
        if self._entry is None:
            return
        card = self.download_card
        size = entry_field(self._entry, "download_bytes", "size_bytes", "size")
        handle = self.models.preflight(self._entry)
        handle.succeeded.connect(self._on_preflight)
        handle.failed.connect(lambda _m: card.set_badges([(f"{fmt.size(size)} download", "info")]))

    def _on_preflight(self, report: Any) -> None:
        size = entry_field(report, "download_needed", "download_bytes") or entry_field(
            self._entry, "download_bytes", "size_bytes", "size"
        )
        quant = getattr(report, "quant", None)
        badges = [fit_badge(report), *[(str(quant), "info")] * bool(quant), (f"{fmt.size(size)} download", "info")]
        self.download_card.set_badges(badges)
        lines = getattr(report, "lines", None)
        if lines:
            self.download_card.setToolTip("\n".join(lines))

    def _download_key(self) -> str:
        return entry_key(self._entry) if self._entry is not None else ""

    def _show_partial(self) -> bool:
        """A download of the default model that stopped part way: the card offers to resume it."""
        partial = self.models.partial_download(self._download_key()) if self._entry is not None else None
        if partial is None:
            return False
        done = entry_field(partial, "bytes_done", default=0)
        total = entry_field(partial, "bytes_total")
        self.download_card.set_paused(entry_field(partial, "fraction", default=0.0), fmt.paused_line(done, total))
        return True

    def start_download(self) -> None:
        if self._entry is None:
            return
        partial = self.models.partial_download(self._download_key())
        self.download_card.set_running(True)
        if partial is not None:
            self.download_card.set_progress(entry_field(partial, "fraction", default=0.0), "resuming…")
        else:
            self.download_card.set_progress(None, "starting…")
        self.models.pull(self._entry)

    def _discard(self) -> None:
        if self._entry is None:
            return
        repo = str(entry_field(self._entry, "repo_id", default=self._download_key()))
        try:
            self.models.discard_download(repo)
        except Exception as exc:  # noqa: BLE001 - shown in the card, never raised
            self.download_card.set_failed(user_message(exc), "Resume")
            return
        self.download_card.reset()

    def start_demo(self) -> None:
        self.demo_card.set_running(True)
        self.demo_card.set_progress(None, "building the demo model…")
        self.models.build_demo()

    def _cancel(self, key: str) -> None:
        self.models.cancel(key)

    # ------------------------------------------------------------ job events

    def _card(self, key: str) -> JobCard | None:
        if key == DEMO_KEY:
            return self.demo_card
        if self._entry is not None and key == self._download_key():
            return self.download_card
        return None

    def _on_progress(self, key: str, p: Any, line: str) -> None:
        card = self._card(key)
        if card is not None:
            card.set_running(True)
            card.set_progress(p.fraction, line)

    def _on_done(self, key: str, result: Any) -> None:
        card = self._card(key)
        if card is None:
            return
        card.set_running(False)
        card.set_progress(1.0, "Ready.")
        self.model_ready.emit(result_model_id(result))

    def _on_failed(self, key: str, message: str) -> None:
        card = self._card(key)
        if card is None:
            return
        if card is self.download_card:
            self._show_partial()  # what was kept (Discard offered); trying again continues from it
        card.set_failed(message)

    def _on_cancelled(self, key: str) -> None:
        card = self._card(key)
        if card is None:
            return
        if card is self.download_card and self._show_partial():
            return
        card.reset()
        card.line.setText("Stopped. Start again to continue where it left off.")
        card.line.setVisible(True)

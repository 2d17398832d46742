"""The main window: conversations on the left, the chat (or the welcome page) on the right, status at the bottom.

It wires widgets to the services and the engine thread; what happens to a conversation is decided in
owl_desktop.app, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QSize, Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from owl_desktop.app.settings import Settings
from owl_desktop.engine.prompt import settled_words
from owl_desktop.gui import attachments, gc_pauses
from owl_desktop.gui.api_server import ApiServerToggle
from owl_desktop.gui.attachments import PendingImage
from owl_desktop.gui.chat_view import ChatView
from owl_desktop.gui.composer import Composer
from owl_desktop.gui.icons import icon
from owl_desktop.gui.image_viewer import ImageViewer
from owl_desktop.gui.model_controller import ModelController
from owl_desktop.gui.private_files import PrivateFiles
from owl_desktop.gui.services import Services
from owl_desktop.gui.sidebar import Sidebar
from owl_desktop.gui.status_line import StatusLine
from owl_desktop.gui.theme import apply_theme, colors, theme_bus
from owl_desktop.gui.welcome import WelcomePage
from owl_desktop.gui.workers import EngineHost, ImageSource, TaskRunner, user_message
from owl_desktop.model_family import ImagePlan
from owl_desktop.store.conversations import Conversation, Message
from owl_desktop.tasks import Progress

if TYPE_CHECKING:
    from owl_desktop.engine.pipeline import AnswerRecord
    from owl_desktop.gui.models_page import ModelsWindow
    from owl_desktop.gui.settings_dialog import SettingsDialog


PREPARE_DEBOUNCE_MS = 300  # the composer's attachments must be still this long before work ahead starts


class State(Enum):
    NO_MODEL = "no model"
    LOADING = "loading"
    READY = "ready"
    ANSWERING = "answering"


class Banner(QFrame):
    """A message in the window (never a dialog, never a traceback), dismissed with its button or Esc.

    An error stays until dismissed or until what it is about is over (`clears_on`: "model" when a model is loaded,
    "answer" when an answer ends, "composer" when the message changes). A notice (export done, chat deleted) has
    an optional action (Undo) and goes away by itself."""

    NOTICE_MS = 6000

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("Banner")
        h = QHBoxLayout(self)
        h.setContentsMargins(12, 8, 8, 8)
        self.icon = QLabel()
        self.text = QLabel()
        self.text.setObjectName("BannerText")
        self.text.setTextFormat(Qt.TextFormat.PlainText)  # messages quote file names and model text
        self.text.setWordWrap(True)
        self.text.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.close_button = QToolButton()
        self.close_button.setProperty("flat", True)
        self.close_button.setAccessibleName("Dismiss message")
        self.close_button.clicked.connect(self.hide)
        self.action_button = QPushButton()
        self.action_button.setVisible(False)
        self.action_button.clicked.connect(self._act)
        self._action: Callable[[], None] | None = None
        self.clears_on: str | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.hide)
        h.addWidget(self.icon)
        h.addWidget(self.text, 1)
        h.addWidget(self.action_button)
        h.addWidget(self.close_button)
        self.setVisible(False)
        self.setAccessibleName("Message")

    def show_message(self, text: str, clears_on: str | None = None) -> None:
        self._show(text, "error")
        self.clears_on = clears_on

    def show_notice(
        self, text: str, action: str = "", on_action: Callable[[], None] | None = None, ms: int = NOTICE_MS
    ) -> None:
        self._show(text, "info")
        self._action = on_action
        self.action_button.setText(action)
        self.action_button.setVisible(bool(action))
        self._timer.start(ms)

    def clear_if(self, reason: str) -> None:
        """The problem an error was about is gone: close it."""
        if self.isVisible() and self.clears_on == reason:
            self.hide()

    def kind(self) -> str:
        return str(self.property("kind") or "")

    def _show(self, text: str, kind: str) -> None:
        self._timer.stop()
        self._action = None
        self.clears_on = None
        self.action_button.setVisible(False)
        self.setProperty("kind", kind)
        self.style().unpolish(self)
        self.style().polish(self)
        self.retint()
        self.text.setText(text)
        self.setAccessibleDescription(text)
        self.setVisible(True)

    def retint(self) -> None:
        c = colors()
        error = self.kind() != "info"
        self.icon.setPixmap(icon("warning" if error else "export", c.danger if error else c.accent).pixmap(18, 18))
        self.close_button.setIcon(icon("close", c.muted))

    def _act(self) -> None:
        action, self._action = self._action, None
        self.hide()
        if action is not None:
            action()


def export_stem(title: str) -> str:
    """A file name from a chat's title: letters, digits, spaces, dashes; at most 60 characters."""
    stem = "".join(ch for ch in title if ch.isalnum() or ch in " -_").strip()
    return " ".join(stem.split())[:60].strip() or "conversation"


class MainWindow(QMainWindow):
    state_changed = Signal(object)
    answer_finished = Signal()  # after the view shows a finished, stopped or failed answer
    model_ready = Signal(str)

    def __init__(self, services: Services) -> None:
        super().__init__()
        self.services = services
        self.setWindowTitle("Owl")
        self.setObjectName("MainWindow")
        self.resize(1120, 760)
        self.setMinimumSize(QSize(720, 480))
        self.setAcceptDrops(True)
        self.state = State.NO_MODEL
        self.current_id: str | None = None
        self._chat_used = 0  # context positions the open chat took at its last answer
        self._pending_submission: tuple[str, list[ImageSource]] | None = None  # asked while the model loads
        self._pending_images: list[PendingImage] = []
        self._question_shown = False  # the question being sent is in the chat (before it is stored)
        self._drafts: dict[str | None, tuple[str, list[PendingImage]]] = {}  # unsent messages of other chats
        self._deleting: str | None = None  # a chat deleted with its Undo still offered
        self._delete_timer = QTimer(self)
        self._delete_timer.setSingleShot(True)
        self._delete_timer.timeout.connect(self.finish_deletes)
        self._last_submission: tuple[str, list[PendingImage]] | None = None
        self._models_window: ModelsWindow | None = None
        self._start_model: str | None = None  # what start_background_work loads
        self._closing = False
        self.private_files = PrivateFiles("owl-pasted-")  # pasted images handed to the viewer; removed at close

        self.engine = EngineHost(services.chat, self)
        # work ahead for the next question (encode the attachments, prefill the prompt) once the composer settles
        self._prepared_words = ""  # the draft's words the last work ahead was asked to prefill
        self._prepare_timer = QTimer(self)
        self._prepare_timer.setSingleShot(True)
        self._prepare_timer.setInterval(PREPARE_DEBOUNCE_MS)
        self._prepare_timer.timeout.connect(self._prepare_ahead)
        self.runner = TaskRunner(self)
        self.models = ModelController(services.models, self.runner, self)
        self.api_server = ApiServerToggle(services.chat, self)

        self.sidebar = Sidebar()
        self.welcome = WelcomePage(self.models)
        self.chat = ChatView(services.images)
        self.composer = Composer()
        self.composer.pdfs.plan = self._image_plan  # PDF pages render at the size the loaded model uses
        self.banner = Banner()
        self.status = StatusLine()
        self.api_server.status_changed.connect(self.status.set_api)
        self.title = QLabel("New conversation")
        self.title.setObjectName("ChatTitle")
        self.title.setTextFormat(Qt.TextFormat.PlainText)  # the model writes titles: never rich text
        self._build_layout()
        self._connect()
        self._shortcuts()
        self.composer.set_send_on_enter(services.settings.send_on_enter)
        self.composer.budget_source = self._message_budget
        self.set_sidebar_visible(not services.settings.sidebar_hidden)
        theme_bus().changed.connect(self._retint)
        self._retint()

    # ------------------------------------------------------------ layout

    def _build_layout(self) -> None:
        chat_page = QWidget()
        v = QVBoxLayout(chat_page)
        v.setContentsMargins(0, 0, 0, 0)
        v.setSpacing(0)
        header = QFrame()
        header.setObjectName("ChatHeader")
        hh = QHBoxLayout(header)
        hh.setContentsMargins(20, 10, 12, 10)
        hh.addWidget(self.title, 1)
        self.export_button = QToolButton()
        self.export_button.setProperty("flat", True)
        self.export_button.setToolTip("Export this conversation (Ctrl+E)")
        self.export_button.setAccessibleName("Export conversation")
        self.export_button.clicked.connect(lambda: self.export_conversation(self.current_id))
        hh.addWidget(self.export_button)
        v.addWidget(header)
        banner_box = QWidget()
        bb = QVBoxLayout(banner_box)
        bb.setContentsMargins(20, 8, 20, 0)
        bb.addWidget(self.banner)
        v.addWidget(banner_box)
        v.addWidget(self.chat, 1)
        composer_box = QWidget()
        cb = QHBoxLayout(composer_box)
        cb.setContentsMargins(20, 6, 20, 14)
        cb.addWidget(self.composer)
        v.addWidget(composer_box)
        self.chat_page = chat_page

        self.pages = QStackedWidget()
        self.pages.addWidget(self.welcome)
        self.pages.addWidget(chat_page)
        splitter = QSplitter()
        splitter.addWidget(self.sidebar)
        splitter.addWidget(self.pages)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([260, 860])
        splitter.setChildrenCollapsible(False)
        splitter.setHandleWidth(1)
        root = QWidget()
        rv = QVBoxLayout(root)
        rv.setContentsMargins(0, 0, 0, 0)
        rv.setSpacing(0)
        rv.addWidget(splitter, 1)
        rv.addWidget(self.status)
        self.setCentralWidget(root)

    def _connect(self) -> None:
        s = self.sidebar
        s.new_requested.connect(self.new_conversation)
        s.selected.connect(self.open_conversation)
        s.search_changed.connect(lambda text: self.refresh_conversations(text))
        s.rename_requested.connect(self.rename_conversation)
        s.delete_requested.connect(self.delete_conversation)
        s.export_requested.connect(self.export_conversation)
        s.import_requested.connect(self.import_conversation)
        s.models_requested.connect(self.show_models)
        s.settings_requested.connect(self.show_settings)
        c = self.composer
        c.send_requested.connect(self.send)
        c.edit_submitted.connect(self.edit_and_resend)
        c.stop_requested.connect(self.stop)
        c.refused.connect(lambda text: self.show_error(text, clears_on="composer"))
        c.strip.changed.connect(lambda: self.banner.clear_if("composer"))
        c.open_requested.connect(self._open_pending_images)
        c.strip.changed.connect(self.schedule_prepare)
        c.edit.textChanged.connect(self._on_draft_changed)
        self.chat.regenerate_requested.connect(self.regenerate)
        self.chat.edit_requested.connect(self.composer.start_edit)
        self.chat.image_requested.connect(self.show_images)
        w = self.engine.worker
        w.model_loading.connect(self._on_model_loading)
        w.model_loaded.connect(self._on_model_loaded)
        w.model_failed.connect(self._on_model_failed)
        w.progress.connect(self._on_engine_progress)
        w.started.connect(self._on_started)
        w.piece.connect(self.chat.append_text)
        w.stage.connect(self._on_stage)
        w.finished.connect(self._on_finished)
        w.failed.connect(self._on_failed)
        self.welcome.model_ready.connect(self._on_model_installed)
        self.welcome.open_models.connect(self.show_models)
        self.models.installed_changed.connect(self._on_installed_changed)

    def _shortcuts(self) -> None:
        self.window_keys: list[tuple[str, str]] = []  # what the shortcuts sheet lists
        for keys, what, slot in (
            ("Ctrl+N", "New conversation (takes the unsent message with it)", self.new_conversation),
            ("Ctrl+F", "Search the conversations", lambda: self.sidebar.search.setFocus()),
            ("Ctrl+L", "Go to the question", lambda: self.composer.edit.setFocus()),
            ("Ctrl+O", "Attach images", self.composer.choose_files),
            ("Ctrl+Shift+V", "Paste an image", self.paste_image),
            ("Ctrl+Shift+R", "Regenerate the last answer", self.regenerate),
            ("Ctrl+E", "Export this conversation", lambda: self.export_conversation(self.current_id)),
            ("Ctrl+B", "Show or hide the conversations", self.toggle_sidebar),
            ("Ctrl+M", "Models", self.show_models),
            ("Ctrl+,", "Settings", self.show_settings),
            ("F1", "This list of keys (also Ctrl+/)", self.show_shortcuts),
            ("Ctrl+Q", "Quit", self.close),
        ):
            QShortcut(QKeySequence(keys), self, activated=slot, context=Qt.ShortcutContext.WindowShortcut)
            self.window_keys.append((keys, what))
        QShortcut(QKeySequence("Ctrl+/"), self, activated=self.show_shortcuts)
        QShortcut(QKeySequence(Qt.Key.Key_Escape), self, activated=self._escape)

    def show_shortcuts(self) -> QDialog:
        from owl_desktop.gui.shortcuts_sheet import ShortcutsSheet

        sheet = ShortcutsSheet(self.window_keys, self)
        sheet.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        sheet.open()
        return sheet

    def toggle_sidebar(self) -> None:
        """Ctrl+B: the conversations list shown or hidden, remembered across restarts."""
        self.set_sidebar_visible(not self.sidebar.isVisible())
        self.services.settings.sidebar_hidden = not self.sidebar.isVisible()
        self._save_settings()

    def set_sidebar_visible(self, visible: bool) -> None:
        self.sidebar.setVisible(visible)

    def _retint(self, _colors: object = None) -> None:
        self.export_button.setIcon(icon("export", colors().muted))
        self.banner.retint()

    # ------------------------------------------------------------ start

    def start(self) -> None:
        """Show the conversations and load the last model (or offer one on the welcome page)."""
        self.show_start_page()
        self.start_background_work()

    def show_start_page(self) -> None:
        """What the window shows first: the conversations (the latest one open) and the chat page when a model is
        installed, else the welcome page. Quick, and nothing starts on another thread yet."""
        self.refresh_conversations()
        ids = self.models.installed_ids() or [m.id for m in self._installed_from_service()]
        last = self.services.settings.last_model_id
        self._start_model = (last if last in ids else ids[0]) if ids else None
        if self._start_model is not None:
            self.pages.setCurrentWidget(self.chat_page)
        else:
            self.pages.setCurrentWidget(self.welcome)
            self.welcome.show_default_model()
        conversations = self.services.store.list()
        if conversations:
            self.open_conversation(conversations[0].id)
        self.composer.edit.setFocus()

    def start_background_work(self) -> None:
        """After show_start_page: load the model chosen there on the engine thread (this imports the engine), or
        check on the pool how the welcome page's model would fit this computer; start the local API server if on."""
        gc_pauses.settle()  # what start-up made lives as long as the window
        if self._start_model is not None:
            self.load_model(self._start_model)
        elif self.pages.currentWidget() is self.welcome:
            self.welcome.check_fit()
        self.apply_api_server()

    def apply_api_server(self) -> None:
        """Start or stop the local API server as the settings say (it answers 503 until a model is loaded)."""
        problem = self.api_server.apply(self.services.settings.api_server)
        if problem:
            self.show_error(f"The local API server is off: {problem}")

    def _installed_from_service(self) -> list[Any]:
        try:
            return list(self.services.chat.installed_models())
        except Exception:  # noqa: BLE001
            return []

    def show_welcome(self) -> None:
        self.pages.setCurrentWidget(self.welcome)
        self.welcome.refresh()

    # ------------------------------------------------------------ state

    def set_state(self, state: State) -> None:
        self.state = state
        self.composer.set_busy(state is State.ANSWERING)
        self.state_changed.emit(state)

    # ------------------------------------------------------------ model

    def load_model(self, model_id: str) -> None:
        if self.engine.busy:
            self.stop()
        self.pages.setCurrentWidget(self.chat_page)
        self.set_state(State.LOADING)
        self.engine.load(model_id)

    def _on_model_loading(self, ref: str) -> None:
        self.status.set_model(self.models.display_name(ref))
        self.status.set_activity("loading the model…", None, True)

    def _on_engine_progress(self, p: Progress) -> None:
        if self.state is State.LOADING:
            self.status.set_activity(f"{p.stage}…", p.fraction, True)

    def _on_model_loaded(self, model_id: str, device: str) -> None:
        self.status.set_model(self.models.display_name(model_id), device)
        self.status.set_activity("")
        self.set_state(State.READY)
        self.banner.clear_if("model")
        self.composer.update_budget()
        self.services.settings.last_model_id = model_id
        self._save_settings()
        if self._models_window is not None:
            self._models_window.set_loaded(model_id)
        self.model_ready.emit(model_id)
        if self._pending_submission is not None:
            text, sources = self._pending_submission
            self._pending_submission = None
            self._ask(text, sources)
        else:
            self.schedule_prepare()  # runs after the engine's warm-up

    def _on_model_failed(self, message: str) -> None:
        self.status.set_model(None)
        self.status.set_activity("")
        self.set_state(State.NO_MODEL)
        if self._withdraw_pending():  # the question asked while it loaded goes back, never out later
            self._reshow_current()
        self.show_error(f"The model could not be loaded: {message}")

    def _on_model_installed(self, model_id: str) -> None:
        """The welcome page's download or demo finished: use it, unless the user already chats with a model (a
        download from the model manager can end in the middle of an answer, which must not be cut short)."""
        if self.state is State.NO_MODEL or self.pages.currentWidget() is self.welcome:
            self.load_model(model_id)
        else:
            name = self.models.display_name(model_id)
            self.status.set_activity(f"{name} is installed; choose it in Models to use it")

    def _on_installed_changed(self) -> None:
        if loaded := self.services.chat.loaded_model_id:
            self.status.set_model_name(self.models.display_name(loaded))  # e.g. renamed in the model manager
        if self.state is State.NO_MODEL and self.pages.currentWidget() is self.welcome:
            self.welcome.refresh()

    # ------------------------------------------------------------ conversations

    def refresh_conversations(self, search: str | None = None) -> None:
        query = self.sidebar.search.text().strip() if search is None else search
        try:
            conversations = self.services.store.list(search=query or None)
        except Exception as exc:  # noqa: BLE001
            self.show_error(user_message(exc))
            return
        hidden = self._deleting
        self.sidebar.set_conversations([c for c in conversations if c.id != hidden], self.current_id)

    def new_conversation(self) -> None:
        """An empty chat; it is stored when its first question is sent."""
        if self.state is State.ANSWERING:
            return
        self._withdraw_pending()  # a question waiting for the model stays in the composer, unsent
        self.current_id = None
        self.title.setText("New conversation")
        self.chat.clear()
        self._show_chat_figures([])
        self.sidebar.list.clearSelection()
        self.sidebar.list.setCurrentItem(None)
        self.composer.edit.setFocus()
        self.schedule_prepare()

    def schedule_prepare(self) -> None:
        """The attachments or the conversation changed: work ahead for the next question once things settle."""
        self._prepare_timer.start()

    def _draft(self) -> str:
        """The question being typed, as far as work ahead can use it (not while an earlier message is edited)."""
        return "" if self.composer.editing else self.composer.text()

    def _on_draft_changed(self) -> None:
        """A word of the question was finished (or taken back): its tokens can be prefilled while the user types."""
        if settled_words(self._draft()) != self._prepared_words:
            self.schedule_prepare()

    def _prepare_ahead(self) -> None:
        if self.state is not State.READY or self.engine.busy:
            return  # an answer or a load runs; the next change (or the answer's end) schedules it again
        if self.chat.filling():
            self.schedule_prepare()  # the chat just opened is built first: both would share the same cores
            return
        sources = [(img.source, img.name) for img in self.composer.images()]
        draft = self._draft()
        self._prepared_words = settled_words(draft)
        self.engine.prepare(self.current_id, sources, draft)

    def open_files(self, files: list[Path]) -> None:
        """Images handed to the app at launch ("Open with"): a new chat with them attached, ready for a question."""
        self.new_conversation()
        self.composer.add_files(files)

    def open_conversation(self, conv_id: str) -> None:
        if self.state is State.ANSWERING and conv_id != self.current_id:
            self.sidebar.select(self.current_id)
            self.show_error("Stop the answer being written before switching conversations.", clears_on="answer")
            return
        try:
            conv = self.services.store.get(conv_id)
            messages = self.services.store.messages(conv_id)
        except Exception as exc:  # noqa: BLE001
            self.show_error(user_message(exc))
            return
        if conv_id != self.current_id:
            self._withdraw_pending()  # a question waiting for the model becomes its chat's draft, unsent
            self.chat.clear()
            self._swap_draft(conv_id)
        self.current_id = conv_id
        self.title.setText(conv.title)
        self.chat.show_messages(messages)
        self._show_chat_figures(messages)
        self.sidebar.select(conv_id)
        self.schedule_prepare()
        if self.pages.currentWidget() is not self.welcome:
            self.pages.setCurrentWidget(self.chat_page)

    def _swap_draft(self, conv_id: str | None) -> None:
        """Drafts belong to their chat: keep the open chat's unsent message, bring back the other's."""
        text, images = self.composer.text(), self.composer.images()
        if text.strip() or images:
            self._drafts[self.current_id] = (text, images)
        else:
            self._drafts.pop(self.current_id, None)
        self.composer.edit.clear()
        self.composer.strip.clear()
        text, images = self._drafts.pop(conv_id, ("", []))
        self._restore_composer(text, images)

    def _show_chat_figures(self, messages: list[Message]) -> None:
        """The status line and the composer's budget follow the chat shown: its last answer's figures, or none."""
        self.export_button.setEnabled(bool(messages))
        last = next((m for m in reversed(messages) if m.role == "assistant" and m.meta.get("context_size")), None)
        self.status.set_record(last.meta if last is not None else None)
        self._chat_used = int(last.meta.get("context_used") or 0) if last is not None else 0
        self.composer.update_budget()

    def _message_budget(self, text: str, sizes: list[tuple[int, int] | None]) -> tuple[str, str] | None:
        """What the composer's message costs with the loaded model (None when no model is loaded)."""
        from owl_desktop.app import context_budget

        pipe = self.services.chat.pipeline
        if pipe is None or self.state is State.LOADING:
            return None
        try:
            n_ctx = pipe.llm.n_ctx
            b, least = context_budget.budget(
                text,
                sizes,
                pipe.bundle.image_plan,
                pipe.bundle.config.image_rows,
                n_ctx,
                self._chat_used,
                self.services.settings.sampling.max_new_tokens,
            )
        except Exception:  # noqa: BLE001 - a model being swapped on the engine thread: no estimate this time
            return None
        return context_budget.describe(b, least)

    def rename_conversation(self, conv_id: str, title: str) -> None:
        try:
            self.services.store.rename(conv_id, title)
        except Exception as exc:  # noqa: BLE001
            self.show_error(user_message(exc))
            return
        if conv_id == self.current_id:
            self.title.setText(title)
        self.refresh_conversations()

    def delete_conversation(self, conv_id: str) -> None:
        """The chat leaves the list at once; it is deleted for real (ChatService.delete_conversation) when the
        notice's Undo has not been pressed for a few seconds, or when the window closes."""
        if self.state is State.ANSWERING and conv_id == self.current_id:
            self.show_error("Stop the answer being written before deleting this conversation.", clears_on="answer")
            return
        try:
            title = self.services.store.get(conv_id).title
        except Exception as exc:  # noqa: BLE001
            self.show_error(user_message(exc))
            return
        self.finish_deletes()  # one undo at a time: an earlier deletion becomes final now
        self._deleting = conv_id
        self._delete_timer.start(Banner.NOTICE_MS)
        self._drafts.pop(conv_id, None)
        if conv_id == self.current_id:
            self.new_conversation()
        self.refresh_conversations()
        self.banner.show_notice(f"Deleted “{title}”.", "Undo", self.undo_delete)

    def undo_delete(self) -> None:
        conv_id, self._deleting = self._deleting, None
        self._delete_timer.stop()
        if conv_id is not None:
            self.refresh_conversations()
            self.open_conversation(conv_id)

    def finish_deletes(self) -> None:
        """Delete for real what is waiting for its Undo to run out."""
        conv_id, self._deleting = self._deleting, None
        self._delete_timer.stop()
        if conv_id is None:
            return
        try:
            self.services.chat.delete_conversation(conv_id)
        except Exception as exc:  # noqa: BLE001
            self.show_error(user_message(exc))
        self.refresh_conversations()

    def export_conversation(self, conv_id: str | None, target: Path | None = None) -> Path | None:
        from owl_desktop.store import exchange

        if conv_id is None:
            self.show_error("Nothing to export yet: ask something first, then export the conversation.")
            return None
        try:
            if not self.services.store.messages(conv_id):
                self.show_error("Nothing to export yet: this conversation is empty.")
                return None
        except Exception as exc:  # noqa: BLE001
            self.show_error(user_message(exc))
            return None
        title = self.services.store.get(conv_id).title
        if target is None:
            target = self._ask_export_target(title)
            if target is None:
                return None
        try:
            if target.suffix.lower() == ".md":
                done = exchange.export_markdown(self.services.store, self.services.images, conv_id, target)
            elif target.suffix.lower() == ".zip":
                done = exchange.export_zip(self.services.store, self.services.images, conv_id, target)
            else:
                done = exchange.export_folder(self.services.store, self.services.images, conv_id, target)
        except Exception as exc:  # noqa: BLE001
            self.show_error(f"The conversation could not be exported: {user_message(exc)}")
            return None
        self.banner.show_notice(f"Exported “{title}” to {done}")
        return done

    def _ask_export_target(self, title: str) -> Path | None:
        """The save dialog, with the chat's title as the name and the three formats the README describes."""
        archive = "Conversation archive (*.owlchat.zip)"
        folder = "Folder: conversation.json with the images (*)"
        md = "Markdown with images (*.md)"
        stem = export_stem(title)
        name, kind = QFileDialog.getSaveFileName(
            self, "Export conversation", str(Path.home() / f"{stem}.owlchat.zip"), f"{archive};;{folder};;{md}"
        )
        if not name:
            return None
        target = Path(name)
        if kind == folder:
            return target.with_name(target.name.removesuffix(".owlchat.zip").removesuffix(".zip"))
        if kind == md and target.suffix.lower() != ".md":
            return target.with_name(target.name.removesuffix(".owlchat.zip") + ".md")
        if kind == archive and not target.name.lower().endswith(".zip"):
            return target.with_name(target.name + ".owlchat.zip")
        return target

    def import_conversation(self, source: Path | None = None) -> Conversation | None:
        from owl_desktop.store import exchange

        if source is None:
            name, _ = QFileDialog.getOpenFileName(
                self,
                "Import a conversation",
                str(Path.home()),
                "Conversations (*.zip *.json);;All files (*)",
            )
            if not name:
                return None
            source = Path(name)
            if source.name == "conversation.json":
                source = source.parent
        try:
            conv = exchange.import_conversation(self.services.store, self.services.images, source)
        except Exception as exc:  # noqa: BLE001
            self.show_error(f"The conversation could not be imported: {user_message(exc)}")
            return None
        self.refresh_conversations()
        self.open_conversation(conv.id)
        return conv

    # ------------------------------------------------------------ asking

    def send(self, text: str, images: list[PendingImage]) -> None:
        sources = [(img.source, img.name) for img in images]
        if self.state is State.ANSWERING:
            return
        if self.state is State.NO_MODEL:
            self._restore_composer(text, images)
            self.show_error(
                "No model is loaded yet. Download one or try the demo model from the Models window.", clears_on="model"
            )
            return
        self.banner.hide()
        self._pending_images = images
        if self.state is State.LOADING:
            self._pending_submission = (text, sources)
            self.status.set_activity("waiting for the model to load…", None, True)
            self._show_question(text, images)
            self.chat.set_stage("waiting for the model to load…")
            return
        self._ask(text, sources)

    def _withdraw_pending(self) -> bool:
        """Put a question that waits for the model back into the composer (its chat's draft), so that it is sent
        only where and when the user sends it again. True when there was one."""
        if self._pending_submission is None:
            return False
        text, _sources = self._pending_submission
        self._pending_submission = None
        self._question_shown = False
        self._restore_composer(text, self._pending_images)
        self._pending_images = []
        if self.state is State.LOADING:
            self.status.set_activity("loading the model…", None, True)
        return True

    def _reshow_current(self) -> None:
        """The open chat as stored (e.g. without a question shown and then taken back)."""
        self.chat.clear()
        if self.current_id is not None:
            try:
                self.chat.show_messages(self.services.store.messages(self.current_id))
            except Exception:  # noqa: BLE001 - a conversation deleted meanwhile
                pass

    def _show_question(self, text: str, images: list[PendingImage]) -> None:
        if self.pages.currentWidget() is not self.chat_page:
            self.pages.setCurrentWidget(self.chat_page)
        self.chat.show_question(text, [(img.preview, img.name) for img in images])
        self._question_shown = True

    def _ask(self, text: str, sources: list[ImageSource]) -> None:
        continues_ahead = self.engine.continues_ahead(self.current_id, sources)  # before a new chat gets its id
        if self.current_id is None:
            try:
                conv = self.services.store.create()
            except Exception as exc:  # noqa: BLE001
                self.show_error(user_message(exc))
                return
            self.current_id = conv.id
            self.chat.clear()
            self._question_shown = False
            self.refresh_conversations()
        if not self._question_shown:
            self._show_question(text, self._pending_images)
        self._question_shown = False
        self._last_submission = (text, list(self._pending_images))
        self.set_state(State.ANSWERING)
        self.status.clear_speed()
        self.status.set_activity("reading the images…" if sources else "thinking…", None, True)
        self.engine.ask(self.current_id, text, sources, continues_ahead=continues_ahead)

    def regenerate(self) -> None:
        if self.state is not State.READY or self.current_id is None:
            return
        self.banner.hide()
        self._last_submission = None
        self.set_state(State.ANSWERING)
        self.status.clear_speed()
        self.status.set_activity("thinking…", None, True)
        self.engine.regenerate(self.current_id)

    def edit_and_resend(self, msg_id: int, text: str) -> None:
        if self.state is not State.READY or self.current_id is None:
            return
        self.banner.hide()
        self._last_submission = None
        self.set_state(State.ANSWERING)
        self.status.clear_speed()
        self.engine.edit_and_resend(self.current_id, msg_id, text)

    def stop(self) -> None:
        if self.engine.busy:
            self.engine.stop()
            self.status.set_activity("stopping…", None, True)

    def _escape(self) -> None:
        if self.state is State.ANSWERING:
            self.stop()
        elif self.banner.isVisible():
            self.banner.hide()

    def _on_started(self, conv_id: str, user_msg: Message, assistant_msg: Message) -> None:
        if conv_id != self.current_id:
            return
        try:
            # The conversation up to the question, then the new answer. A regenerated or edited question's old
            # answer leaves the store only at the new answer's first token, which the engine thread may or may not
            # have reached by now: it is not shown either way (a Stop before that token finishes with it again).
            # An edited question shows its new text, though the store too changes it only at that token.
            messages = [
                user_msg if m.id == user_msg.id else m
                for m in self.services.store.messages(conv_id)
                if m.seq <= user_msg.seq
            ]
        except Exception:  # noqa: BLE001
            messages = []
        self.chat.show_messages(messages)
        self.chat.begin_answer(assistant_msg)
        self.export_button.setEnabled(True)
        self.status.set_activity("answering…", None, True)
        self._refresh_title(conv_id)

    def _on_stage(self, p: Progress) -> None:
        from owl_desktop.gui.format import stage_line

        if self.state is State.ANSWERING:
            line = stage_line(p.stage, p.done, p.total)
            self.chat.set_stage(line)
            self.status.set_activity(line, p.fraction, True)

    def _on_finished(self, conv_id: str, message: Message, record: AnswerRecord) -> None:
        if conv_id == self.current_id:
            self.chat.finish_answer(message, record)
            if record.context_size:
                self.status.set_record(record)
                self._chat_used = record.context_used
        self.status.set_activity("")
        self.set_state(State.READY)
        self.banner.clear_if("answer")
        self.refresh_conversations()
        self.answer_finished.emit()
        self.schedule_prepare()

    def _on_failed(self, conv_id: str | None, message: str, stored: bool) -> None:
        self.chat.fail_answer(message)
        self.status.set_activity("")
        if self.state is State.ANSWERING:
            self.set_state(State.READY if self.services.chat.loaded_model_id else State.NO_MODEL)
        if not stored and self._last_submission is not None:
            text, images = self._last_submission
            self._restore_composer(text, images)
        self._last_submission = None
        if conv_id == self.current_id and conv_id is not None:
            try:
                self.chat.show_messages(self.services.store.messages(conv_id))
            except Exception:  # noqa: BLE001 - a conversation deleted meanwhile
                pass
        self.show_error(message)
        self.refresh_conversations()
        self.answer_finished.emit()

    def _restore_composer(self, text: str, images: list[PendingImage]) -> None:
        if not self.composer.text().strip():
            self.composer.edit.setPlainText(text)
        if not self.composer.images():
            for image in images:
                self.composer.attach(image)

    def _refresh_title(self, conv_id: str) -> None:
        try:
            self.title.setText(self.services.store.get(conv_id).title)
        except Exception:  # noqa: BLE001
            pass
        self.refresh_conversations()

    # ------------------------------------------------------------ images

    def paste_image(self) -> None:
        from PySide6.QtGui import QGuiApplication

        mime = QGuiApplication.clipboard().mimeData()
        if mime is None or not attachments.mime_has_candidates(mime):
            self.show_error("The clipboard holds no image.")
            return
        self.composer.add_mime(mime)

    def _image_plan(self) -> ImagePlan | None:
        pipe = self.services.chat.pipeline
        return pipe.bundle.image_plan if pipe is not None else None

    def show_images(self, images: list[tuple[Path, str]], index: int) -> None:
        if images:
            pipe = self.services.chat.pipeline
            viewer = ImageViewer(images, index, self, self._image_plan(), pipe.llm.n_ctx if pipe else None)
            viewer.crop_ready.connect(self.composer.strip.add)  # a dragged region becomes an attachment
            viewer.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
            viewer.open()

    def _open_pending_images(self, entries: list[ImageSource], index: int) -> None:
        shown = []
        for source, name in entries:
            if source is None:  # a paste still being encoded
                continue
            if isinstance(source, bytes):  # a paste: the viewer reads a file, one only this user can read
                shown.append((self.private_files.write(source, Path(name).suffix or ".png"), name))
            else:
                shown.append((Path(source), name))
        self.show_images(shown, index)

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 - Qt override
        if attachments.mime_has_candidates(event.mimeData()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 - Qt override
        event.acceptProposedAction()
        if self.pages.currentWidget() is self.welcome and self.state is State.NO_MODEL:
            self.show_error("Get a model first (download it or try the demo); then drop your images again.")
            return
        self.composer.add_mime(event.mimeData())

    # ------------------------------------------------------------ messages

    def show_error(self, text: str, clears_on: str | None = None) -> None:
        self.banner.show_message(text, clears_on)
        if self.pages.currentWidget() is self.welcome:
            self.status.set_activity(f"⚠ {text}")

    # ------------------------------------------------------------ windows

    def show_models(self) -> ModelsWindow:
        from owl_desktop.gui.models_page import ModelsWindow

        if self._models_window is None:
            self._models_window = ModelsWindow(self.models, self.services.chat.loaded_model_id, self)
            self._models_window.use_requested.connect(self.load_model)
        self._models_window.show()
        self._models_window.raise_()
        return self._models_window

    def show_settings(self) -> SettingsDialog:
        from owl_desktop.gui.settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.services.settings, self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self.apply_settings(dialog.values()))
        dialog.open()
        return dialog

    def apply_settings(self, new: Settings) -> None:
        old = self.services.settings
        engine_changed = old.engine != new.engine
        for name in ("theme", "system_prompt", "send_on_enter", "data_dir", "sampling", "engine", "api_server"):
            setattr(old, name, getattr(new, name))
        self._save_settings()
        self.apply_api_server()
        apply_theme(old.theme)
        self.composer.set_send_on_enter(old.send_on_enter)
        model = self.services.chat.loaded_model_id
        if engine_changed and model and self.state is State.READY:
            self.load_model(model)

    def _save_settings(self) -> None:
        try:
            self.services.settings.save()
        except Exception as exc:  # noqa: BLE001
            self.show_error(f"Settings could not be saved: {user_message(exc)}")

    # ------------------------------------------------------------ closing

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        """Stop the answer (what was written is saved), pause downloads (resumable), free the model."""
        if not self._closing:
            self._closing = True
            self.hide()  # gone at once, whatever the engine thread needs to end its stage
            self.finish_deletes()
            self.api_server.shutdown()  # API requests in flight end within a token
            self.runner.shutdown(timeout_ms=30_000)
            self.engine.shutdown(timeout_ms=60_000)
            self._save_settings()
            self.private_files.remove_all()
            if self._models_window is not None:
                self._models_window.close()
        event.accept()

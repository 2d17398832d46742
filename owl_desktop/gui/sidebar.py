"""The list of conversations: new, search, rename (F2), delete (Del), and the way to models and settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import QEvent, QModelIndex, QObject, QPoint, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeyEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QToolButton,
    QVBoxLayout,
)

from owl_desktop.gui.icons import icon, render
from owl_desktop.gui.theme import colors, theme_bus

ID_ROLE = Qt.ItemDataRole.UserRole


class ConversationList(QListWidget):
    """Arrows and Tab only move the highlight; a click, Enter or Space opens the chat."""

    rename_key = Signal()
    delete_key = Signal()
    open_key = Signal()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() == Qt.Key.Key_F2:
            self.rename_key.emit()
        elif event.key() == Qt.Key.Key_Delete:
            self.delete_key.emit()
        elif event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter, Qt.Key.Key_Space):
            self.open_key.emit()
        else:
            super().keyPressEvent(event)


class Sidebar(QFrame):
    new_requested = Signal()
    selected = Signal(object)  # conversation id
    search_changed = Signal(str)
    rename_requested = Signal(object, str)
    delete_requested = Signal(object)
    export_requested = Signal(object)
    import_requested = Signal()
    models_requested = Signal()
    settings_requested = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("Sidebar")
        self.setMinimumWidth(220)
        self.setMaximumWidth(340)
        v = QVBoxLayout(self)
        v.setContentsMargins(12, 14, 12, 12)
        v.setSpacing(10)
        head = QHBoxLayout()
        self.logo = QLabel()
        head.addWidget(self.logo)
        title = QLabel("Owl")
        title.setObjectName("AppTitle")
        head.addWidget(title, 1)
        self.new_button = QToolButton()
        self.new_button.setProperty("flat", True)
        self.new_button.setIconSize(QSize(20, 20))
        self.new_button.setToolTip("New conversation (Ctrl+N)")
        self.new_button.setAccessibleName("New conversation")
        self.new_button.clicked.connect(self.new_requested)
        head.addWidget(self.new_button)
        v.addLayout(head)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search conversations")
        self.search.setAccessibleName("Search conversations")
        self.search.setClearButtonEnabled(True)
        self._search_action = QAction(self.search)
        self.search.addAction(self._search_action, QLineEdit.ActionPosition.LeadingPosition)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(200)
        self._debounce.timeout.connect(lambda: self.search_changed.emit(self.search.text().strip()))
        self.search.textChanged.connect(lambda _t: self._debounce.start())
        v.addWidget(self.search)
        self.list = ConversationList()
        self.list.setAccessibleName("Conversations")
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.list.itemClicked.connect(lambda item: self._open(item))
        self.list.open_key.connect(lambda: self._open(self.list.currentItem()))
        self.list.rename_key.connect(lambda: self._rename(self.current_id()))
        self.list.delete_key.connect(lambda: self._delete(self.current_id()))
        self.list.setUniformItemSizes(True)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        # the hover affordance: a delete button at the right of the row under the pointer (besides the menu and Del)
        self.list.setMouseTracking(True)
        self.hover_delete = QToolButton(self.list.viewport())
        self.hover_delete.setObjectName("HoverDelete")
        self.hover_delete.setProperty("flat", True)
        self.hover_delete.setIconSize(QSize(14, 14))
        self.hover_delete.setCursor(Qt.CursorShape.PointingHandCursor)
        self.hover_delete.setVisible(False)
        self.hover_delete.clicked.connect(lambda: self._delete(self.hover_delete.property("conv_id")))
        self.list.entered.connect(self._show_hover_delete)
        self.list.viewport().installEventFilter(self)
        self.search.installEventFilter(self)  # both filters after both widgets exist
        v.addWidget(self.list, 1)
        self.empty = QLabel("No conversations yet.")
        self.empty.setObjectName("Muted")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        v.addWidget(self.empty)
        self.models_button = QPushButton("Models")
        self.models_button.setAccessibleName("Model manager")
        self.models_button.setToolTip("Download, import and remove models (Ctrl+M)")
        self.models_button.clicked.connect(self.models_requested)
        self.settings_button = QPushButton("Settings")
        self.settings_button.setAccessibleName("Settings")
        self.settings_button.setToolTip("Settings (Ctrl+,)")
        self.settings_button.clicked.connect(self.settings_requested)
        foot = QHBoxLayout()
        foot.addWidget(self.models_button)
        foot.addWidget(self.settings_button)
        v.addLayout(foot)
        self._suppress = False
        theme_bus().changed.connect(self._retint)
        self._retint()

    def _show_hover_delete(self, index: QModelIndex) -> None:
        item = self.list.item(index.row())
        if item is None:
            self.hover_delete.setVisible(False)
            return
        rect = self.list.visualItemRect(item)
        side = 24
        self.hover_delete.setGeometry(rect.right() - side - 4, rect.center().y() - side // 2, side, side)
        self.hover_delete.setProperty("conv_id", item.data(ID_ROLE))
        title = item.text()
        self.hover_delete.setToolTip(f"Delete “{title}” (Undo follows)")
        self.hover_delete.setAccessibleName(f"Delete {title}")
        self.hover_delete.setVisible(True)
        self.hover_delete.raise_()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        """Esc in a search with text clears it (ahead of the window's Esc, which stops an answer); the hover delete
        button leaves with the pointer."""
        if watched is self.list.viewport() and event.type() == QEvent.Type.Leave:
            self.hover_delete.setVisible(False)
        if watched is self.search and event.type() in (QEvent.Type.ShortcutOverride, QEvent.Type.KeyPress):
            if isinstance(event, QKeyEvent) and event.key() == Qt.Key.Key_Escape and self.search.text():
                event.accept()
                if event.type() == QEvent.Type.KeyPress:
                    self.search.clear()
                return event.type() == QEvent.Type.KeyPress
        return super().eventFilter(watched, event)

    def _retint(self, _colors: object = None) -> None:
        c = colors()
        self.logo.setPixmap(render("owl", 26, "#000", self.devicePixelRatioF()))
        self.new_button.setIcon(icon("new-chat", c.text))
        self._search_action.setIcon(icon("search", c.muted))
        self.models_button.setIcon(icon("models", c.text))
        self.settings_button.setIcon(icon("settings", c.text))
        self.hover_delete.setIcon(icon("trash", c.muted))

    # ------------------------------------------------------------ content

    def set_conversations(self, conversations: Sequence[Any], current: Any = None) -> None:
        self.hover_delete.setVisible(False)
        self._suppress = True
        self.list.clear()
        for conv in conversations:
            item = QListWidgetItem(conv.title or "Untitled")
            item.setData(ID_ROLE, conv.id)
            item.setToolTip(conv.title or "Untitled")
            self.list.addItem(item)
            if current is not None and conv.id == current:
                self.list.setCurrentItem(item)
        self.empty.setVisible(self.list.count() == 0)
        if self.search.text().strip() and self.list.count() == 0:
            self.empty.setText("Nothing matches your search.")
        else:
            self.empty.setText("No conversations yet.")
        self._suppress = False

    def select(self, conv_id: Any) -> None:
        for i in range(self.list.count()):
            if self.list.item(i).data(ID_ROLE) == conv_id:
                self._suppress = True
                self.list.setCurrentRow(i)
                self._suppress = False
                return

    def current_id(self) -> Any:
        item = self.list.currentItem()
        return item.data(ID_ROLE) if item is not None else None

    def titles(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def _open(self, item: QListWidgetItem | None) -> None:
        if item is not None and not self._suppress:
            self.selected.emit(item.data(ID_ROLE))

    # ------------------------------------------------------------ actions

    def _menu(self, pos: QPoint) -> None:
        item = self.list.itemAt(pos)
        menu = QMenu(self)
        if item is not None:
            conv_id = item.data(ID_ROLE)
            menu.addAction("Rename…", lambda: self._rename(conv_id))
            menu.addAction("Export…", lambda: self.export_requested.emit(conv_id))
            menu.addSeparator()
            menu.addAction("Delete", lambda: self._delete(conv_id))
            menu.addSeparator()
        menu.addAction("Import a conversation…", self.import_requested.emit)
        menu.exec(self.list.viewport().mapToGlobal(pos))

    def _rename(self, conv_id: Any) -> None:
        if conv_id is None:
            return
        item = next(
            (self.list.item(i) for i in range(self.list.count()) if self.list.item(i).data(ID_ROLE) == conv_id), None
        )
        old = item.text() if item is not None else ""
        title, ok = QInputDialog.getText(self, "Rename conversation", "Title:", QLineEdit.EchoMode.Normal, old)
        if ok and title.strip():
            self.rename_requested.emit(conv_id, title.strip())

    def _delete(self, conv_id: Any) -> None:
        if conv_id is not None:
            self.delete_requested.emit(conv_id)

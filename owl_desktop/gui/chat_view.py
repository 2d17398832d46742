"""The conversation: rounded message bubbles with Markdown, image thumbnails, copy/regenerate/edit, streaming."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import shiboken6
from PySide6.QtCore import QElapsedTimer, QEvent, QObject, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication, QImage, QKeyEvent, QMouseEvent, QPixmap, QResizeEvent
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from owl_desktop.gui import markdown
from owl_desktop.gui.attachments import PendingImage, PreviewPool
from owl_desktop.gui.format import record_summary
from owl_desktop.gui.icons import icon, render
from owl_desktop.gui.theme import colors, theme_bus
from owl_desktop.store.conversations import ImageRef, Message
from owl_desktop.store.images import ImageStore

if TYPE_CHECKING:
    from owl_desktop.engine.pipeline import AnswerRecord

FLUSH_MS = 40  # streamed text is shown at most this often: one layout pass per flush, not per token
THUMB = 96
FILL_SLICE_MS = 8  # opening a chat: older messages are built in slices of about this much work between events
FIRST_MESSAGES = 2  # at least the newest question and answer are built at once (then up to a slice's time)
TRASH_BATCH = 20  # rows of a chat that was left deleted per turn of the event loop
THUMB_CACHE = 300  # thumbnails kept (by image) so a chat opened again shows its pictures at once (~35 kB each)


def _flat_button(name: str, tip: str, slot: Callable[[], Any]) -> QToolButton:
    b = QToolButton()
    b.setProperty("flat", True)
    b.setIconSize(QSize(16, 16))
    b.setToolTip(tip)
    b.setAccessibleName(tip)
    b.setProperty("icon_name", name)
    b.setIcon(icon(name, colors().muted))
    b.setCursor(Qt.CursorShape.PointingHandCursor)
    b.clicked.connect(slot)
    return b


class Thumbnail(QLabel):
    """A clickable image thumbnail. `waiting`: its picture comes later (set_image), decoded off the GUI thread."""

    clicked = Signal()

    def __init__(self, image: QImage | None, name: str, size: int = THUMB, *, waiting: bool = False) -> None:
        super().__init__()
        self.setObjectName("Thumb")
        self.setFixedSize(size, size)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setToolTip(name)
        self.setAccessibleName(f"Image {name}; press Enter to enlarge")
        self.ready = False  # whether it shows its picture (or the placeholder of one that cannot be shown)
        if not waiting:
            self.set_image(image)

    def set_image(self, image: QImage | QPixmap | None) -> None:
        """Show `image` cropped to a square (a QPixmap is taken as already cropped); None or an empty image: the
        placeholder of a picture that cannot be shown."""
        self.ready = True
        if isinstance(image, QPixmap) and not image.isNull():
            self.setPixmap(image)
            return
        if image is None or image.isNull():
            self.setPixmap(render("image", 32, colors().muted, self.devicePixelRatioF()))
            return
        dpr = self.devicePixelRatioF()
        side = round((self.width() - 4) * dpr)
        scaled = image.scaled(
            side, side, Qt.AspectRatioMode.KeepAspectRatioByExpanding, Qt.TransformationMode.SmoothTransformation
        )
        x, y = (scaled.width() - side) // 2, (scaled.height() - side) // 2
        cropped = QPixmap.fromImage(scaled.copy(x, y, side, side))
        cropped.setDevicePixelRatio(dpr)
        self.setPixmap(cropped)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt override
        if event.button() == Qt.MouseButton.LeftButton:
            self.clicked.emit()
        super().mouseReleaseEvent(event)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter, Qt.Key.Key_Space):
            self.clicked.emit()
        else:
            super().keyPressEvent(event)


class MessageBubble(QFrame):
    """One message. Assistant text is Markdown; the user's is shown as typed."""

    copy_clicked = Signal()
    regenerate_clicked = Signal()
    edit_clicked = Signal()
    image_clicked = Signal(int)

    def __init__(
        self,
        role: str,
        text: str,
        images: Sequence[tuple[QImage | None, str]] = (),
        msg_id: int | None = None,
        *,
        waiting: bool = False,  # the thumbnails' pictures come later (Thumbnail.set_image)
    ) -> None:
        super().__init__()
        self.role = role
        self.msg_id = msg_id
        self.text = text
        self.streaming = False
        self._settled: list[QLabel] = []  # while streaming: labels of the blocks that can no longer change
        self._settled_at = 0  # where the text they show ends
        self.setObjectName("Bubble")
        self.setProperty("role", role)
        # Preferred, not Maximum, vertically: a Maximum policy caps the bubble at its sizeHint's height, which Qt
        # works out for the text at its natural (wide) width, so a narrow bubble cut its wrapped text off and its
        # fixed-size thumbnails ran over the question. Its height comes from heightForWidth at the width it gets.
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 10, 14, 8)
        layout.setSpacing(6)
        self._thumbs: list[Thumbnail] = []
        self._grid = QGridLayout()
        self._grid.setSpacing(6)
        self._grid_cols = 0
        for i, (image, name) in enumerate(images):
            thumb = Thumbnail(image, name, waiting=waiting)
            thumb.clicked.connect(lambda i=i: self.image_clicked.emit(i))
            self._thumbs.append(thumb)
        if images:
            layout.addLayout(self._grid)
            self._wrap(len(self._thumbs))
        self.label = QLabel()
        self.label.setObjectName("BubbleText")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse | Qt.TextInteractionFlag.TextSelectableByKeyboard
        )
        self.label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Minimum)
        layout.addWidget(self.label)
        footer = QHBoxLayout()
        footer.setSpacing(2)
        self.meta = QLabel()
        self.meta.setObjectName("BubbleMeta")
        self.meta.setTextFormat(Qt.TextFormat.PlainText)
        self.meta.setWordWrap(True)  # a narrow window wraps the figures instead of cutting them
        footer.addWidget(self.meta, 1)
        self.copy_button = _flat_button("copy", "Copy message", self.copy_clicked.emit)
        self.edit_button = _flat_button("edit", "Edit and ask again", self.edit_clicked.emit)
        self.regenerate_button = _flat_button("regenerate", "Regenerate answer", self.regenerate_clicked.emit)
        for b in (self.edit_button, self.regenerate_button, self.copy_button):
            footer.addWidget(b)
        self.edit_button.setVisible(False)
        self.regenerate_button.setVisible(False)
        layout.addLayout(footer)
        self.set_text(text)
        self.setAccessibleName("Your message" if role == "user" else "Answer")

    def _wrap(self, cols: int) -> None:
        """Lay the thumbnails out `cols` to a row (many images wrap instead of widening the bubble)."""
        cols = max(1, min(cols, len(self._thumbs)))
        if cols == self._grid_cols:
            return
        self._grid.setColumnStretch(self._grid_cols, 0)  # the old filler column holds thumbnails now, or nothing
        self._grid_cols = cols
        for thumb in self._thumbs:
            self._grid.removeWidget(thumb)
        for i, thumb in enumerate(self._thumbs):
            self._grid.addWidget(thumb, i // cols, i % cols)
        self._grid.setColumnStretch(cols, 1)

    def thumbnails(self) -> list[Thumbnail]:
        return list(self._thumbs)

    def thumbnail_rows(self) -> int:
        return -(-len(self._thumbs) // self._grid_cols) if self._thumbs else 0

    def set_text(self, text: str) -> None:
        self.text = text
        if self.role == "assistant" and self.streaming:
            self._set_streamed(text)
        elif self.role == "assistant":
            self._drop_settled()
            self.label.setTextFormat(Qt.TextFormat.RichText)
            self.label.setText(markdown.render(text if text else "*Stopped before the first word.*", colors()))
        else:
            self.label.setTextFormat(Qt.TextFormat.PlainText)
            self.label.setText(text)
        self.label.setAccessibleDescription(text)

    def _set_streamed(self, text: str) -> None:
        """While an answer streams: blocks that can no longer change are rendered once, each into a label of its
        own, and only the open block is rendered again at each flush, so a flush costs the same at any length."""
        settled = markdown.settled_length(text)
        if settled < self._settled_at:  # the text was replaced, not extended
            self._drop_settled()
        if settled > self._settled_at:
            block = self._text_label(markdown.render(text[self._settled_at : settled], colors()))
            layout = self.layout()
            layout.insertWidget(layout.indexOf(self.label), block)
            self._settled.append(block)
            self._settled_at = settled
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setText(markdown.render((text[settled:] or ("" if settled else "…")) + " ▍", colors()))

    def _text_label(self, html: str) -> QLabel:
        label = QLabel(html)
        label.setObjectName("BubbleText")
        label.setTextFormat(Qt.TextFormat.RichText)
        label.setWordWrap(True)
        label.setTextInteractionFlags(self.label.textInteractionFlags())
        label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Minimum)
        label.setMinimumWidth(self.label.minimumWidth())
        return label

    def _drop_settled(self) -> None:
        for block in self._settled:
            block.setParent(None)
            block.deleteLater()
        self._settled, self._settled_at = [], 0

    def fit(self, max_width: int) -> None:
        """As wide as its content needs, never wider than `max_width` (long text wraps)."""
        self.setMaximumWidth(max_width)
        lines = (self.text or "…").splitlines() or [""]
        fm = self.label.fontMetrics()
        natural = int(max(fm.horizontalAdvance(line) for line in lines[:200]) * 1.05) + 12
        if self.role == "assistant" and ("```" in self.text or "|" in self.text):
            natural = max_width  # code blocks and tables get the room they need
        if self._thumbs:
            self._wrap((max_width - 28 + 6) // (THUMB + 6))
        natural = max(natural, self._grid_cols * (THUMB + 6), 120)
        for label in (*self._settled, self.label):
            label.setMinimumWidth(min(natural, max_width - 28))

    def set_meta(self, text: str) -> None:
        self.meta.setText(text)

    def retint(self) -> None:
        for b in (self.copy_button, self.edit_button, self.regenerate_button):
            b.setIcon(icon(b.property("icon_name"), colors().muted))
        self._drop_settled()  # rendered with the old colours
        self.set_text(self.text)


class _MoveWatch(QObject):
    """Says when the widget it filters moves."""

    moved = Signal()

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        if event.type() == QEvent.Type.Move:
            self.moved.emit()
        return False


@dataclass
class _Pending:
    """A stored message not built into a bubble yet (opening a long chat builds the newest first)."""

    message: Message
    turn: int  # the question it belongs to: 1 for the first question and its answer (0 before any)
    notice: str  # the notice that follows it ("" for none), e.g. that old turns were left out


class ChatView(QScrollArea):
    """The messages of one conversation. Holds no state beyond what it shows.

    Opening a chat builds its newest messages at once (the view at the bottom) and the older ones above them in
    slices of about FILL_SLICE_MS between events; a reader who scrolled up meanwhile keeps what they read in place.
    The thumbnails of stored images are decoded on the attachments' preview pool and set when ready."""

    regenerate_requested = Signal()
    edit_requested = Signal(object, str)  # user message id, its text
    image_requested = Signal(list, int)  # [(path, name)], index

    def __init__(self, images: ImageStore) -> None:
        super().__init__()
        self.setObjectName("ChatScroll")
        self._images = images
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        body = QWidget()
        self._column = QVBoxLayout(body)
        self._column.setContentsMargins(24, 20, 24, 20)
        self._column.setSpacing(14)
        self._empty = self._make_empty_state()
        self._column.addWidget(self._empty, 1)
        self.stage = QLabel()  # what a question waits on before its first token; rows go above it
        self.stage.setObjectName("Notice")
        self.stage.setTextFormat(Qt.TextFormat.PlainText)
        self.stage.setAccessibleName("Progress of the question")
        self.stage.setVisible(False)
        self._column.addWidget(self.stage)
        self._column.addStretch(0)
        self.setWidget(body)
        self._rows: list[tuple[QWidget, MessageBubble | None]] = []  # (row widget, bubble or None for notices)
        self._streaming: MessageBubble | None = None
        self._buffer: list[str] = []
        self._flush_timer = QTimer(self)
        self._flush_timer.setSingleShot(True)
        self._flush_timer.setInterval(FLUSH_MS)
        self._flush_timer.timeout.connect(self.flush)
        self.flush_count = 0  # how many layout updates the stream caused (tests check it is coalesced)
        self._stick_to_bottom = True
        self._backlog: list[_Pending] = []  # older messages still to build, oldest first (built from the end)
        self._fill_timer = QTimer(self)
        self._fill_timer.setSingleShot(True)
        self._fill_timer.setInterval(0)
        self._fill_timer.timeout.connect(self._fill_slice)
        self._unseen_turns = 0  # the first turns the model no longer sees (their bubbles are marked)
        self._anchor: QWidget | None = None  # while older rows go in above: the row that keeps its place on screen
        self._anchor_offset = 0  # where it is: its y in the content less the scroll position
        self._anchoring = False
        self._anchor_watch = _MoveWatch(self)
        self._anchor_watch.moved.connect(self._keep_anchor)
        self._anchor_timer = QTimer(self)
        self._anchor_timer.setSingleShot(True)
        self._anchor_timer.setInterval(200)
        self._anchor_timer.timeout.connect(lambda: self._set_anchor(None))
        self._trash: list[QWidget] = []  # rows that went, hidden, to be deleted a batch at a time
        self._trash_timer = QTimer(self)
        self._trash_timer.setSingleShot(True)
        self._trash_timer.setInterval(0)
        self._trash_timer.timeout.connect(self._empty_trash)
        self._previews = PreviewPool(self)
        self._previews.done.connect(self._on_preview)
        self._waiting: dict[int, tuple[Thumbnail, str]] = {}  # id(PendingImage) → its thumbnail, image sha256
        self._thumb_cache: OrderedDict[str, QPixmap] = OrderedDict()
        self.verticalScrollBar().rangeChanged.connect(self._on_range_changed)
        self.verticalScrollBar().valueChanged.connect(self._on_scrolled)
        theme_bus().changed.connect(self._retint)

    # ------------------------------------------------------------ building

    def _make_empty_state(self) -> QWidget:
        box = QWidget()
        v = QVBoxLayout(box)
        v.addStretch(1)
        logo = QLabel(alignment=Qt.AlignmentFlag.AlignCenter)
        logo.setPixmap(render("owl", 72, "#000", self.devicePixelRatioF()))
        title = QLabel("Ask about your images", alignment=Qt.AlignmentFlag.AlignCenter)
        title.setObjectName("Headline")
        hint = QLabel(
            "Drop, paste or attach screenshots and photos, then ask a question.\nEverything stays on this computer.",
            alignment=Qt.AlignmentFlag.AlignCenter,
        )
        hint.setObjectName("Subhead")
        for w in (logo, title, hint):
            v.addWidget(w)
        v.addStretch(2)
        return box

    def _request_thumbnails(self, bubble: MessageBubble, refs: Sequence[ImageRef]) -> None:
        """Each thumbnail's picture from the cache, or decoded on the preview pool (set in _on_preview)."""
        for thumb, ref in zip(bubble.thumbnails(), refs, strict=True):
            cached = self._thumb_cache.get(ref.sha256)
            if cached is not None:
                self._thumb_cache.move_to_end(ref.sha256)
                thumb.set_image(cached)
                continue
            image = PendingImage(None, ref.name or "image")
            self._waiting[id(image)] = (thumb, ref.sha256)
            self._previews.prepare_stored(image, lambda sha=ref.sha256: Path(self._images.thumbnail(sha, 256)))

    def _on_preview(self, image: PendingImage, error: str) -> None:
        thumb, sha = self._waiting.pop(id(image), (None, ""))
        if thumb is None or not shiboken6.isValid(thumb):
            return  # its chat was closed meanwhile
        thumb.set_image(None if error else image.preview)
        if not error:
            self._thumb_cache[sha] = thumb.pixmap()
            while len(self._thumb_cache) > THUMB_CACHE:
                self._thumb_cache.popitem(last=False)

    def thumbnails_pending(self) -> int:
        """How many thumbnails of the chat shown still wait for their picture."""
        return len(self._waiting)

    def _full_images(self, refs: Sequence[ImageRef]) -> list[tuple[Path, str]]:
        out = []
        for ref in refs:
            try:
                out.append((Path(self._images.path(ref.sha256)), str(ref.name or "image")))
            except Exception:  # noqa: BLE001
                continue
        return out

    def _add_bubble(
        self,
        role: str,
        text: str,
        refs: Sequence[ImageRef] = (),
        msg_id: int | None = None,
        previews: Sequence[tuple[QImage, str]] = (),
        *,
        top: bool = False,
    ) -> MessageBubble:
        images = list(previews) or [(None, ref.name or "image") for ref in refs]
        bubble = MessageBubble(role, text, images, msg_id, waiting=not previews)
        bubble.copy_clicked.connect(lambda b=bubble: QGuiApplication.clipboard().setText(b.text))
        bubble.regenerate_clicked.connect(self.regenerate_requested.emit)
        bubble.edit_clicked.connect(lambda b=bubble: self.edit_requested.emit(b.msg_id, b.text))
        full = list(refs)
        bubble.image_clicked.connect(lambda i, refs=full: self.image_requested.emit(self._full_images(refs), i))
        row = QWidget()
        h = QHBoxLayout(row)
        h.setContentsMargins(0, 0, 0, 0)
        if role == "user":
            h.addStretch(1)
            h.addWidget(bubble, 0)
        else:
            h.addWidget(bubble, 0)
            h.addStretch(1)
        self._insert_row(row, bubble, top)
        self._apply_width(bubble)
        if refs and not previews:
            self._request_thumbnails(bubble, refs)
        return bubble

    def _insert_row(self, row: QWidget, bubble: MessageBubble | None, top: bool = False) -> None:
        """At the end (above the stage line), or `top`: above every row."""
        self._empty.setVisible(False)
        if top:
            self._column.insertWidget(self._column.indexOf(self._empty) + 1, row)
            self._rows.insert(0, (row, bubble))
        else:
            self._column.insertWidget(self._column.indexOf(self.stage), row)
            self._rows.append((row, bubble))
        row.show()  # now (the layout would only post it): a fill slice's cost includes its rows' show

    def add_notice(self, text: str, *, top: bool = False) -> None:
        """A quiet line in the conversation, e.g. that old turns were left out."""
        row = QLabel(text, alignment=Qt.AlignmentFlag.AlignCenter)
        row.setObjectName("Notice")
        row.setTextFormat(Qt.TextFormat.PlainText)
        row.setWordWrap(True)
        row.setAccessibleName(text)
        self._insert_row(row, None, top)

    # ------------------------------------------------------------ content

    def bubbles(self) -> list[MessageBubble]:
        return [b for _, b in self._rows if b is not None]

    def notices(self) -> list[str]:
        return [w.text() for w, b in self._rows if b is None and isinstance(w, QLabel)]

    def show_question(self, text: str, previews: Sequence[tuple[QImage, str]]) -> MessageBubble:
        """A question at once, with its images, before it is stored; the stored one replaces it at Started."""
        bubble = self._add_bubble("user", text, previews=previews)
        self.set_stage("sending…")
        self._stick_to_bottom = True
        return bubble

    def set_stage(self, text: str) -> None:
        """The line under the question until the first token ("" hides it); once the answer's bubble is there, its
        footer says it instead."""
        if self._streaming is not None and text:
            if not self.streaming_text():
                self._streaming.set_meta(text)
            text = ""
        self.stage.setText(text)
        self.stage.setVisible(bool(text))

    def clear(self) -> None:
        self.set_stage("")
        self._flush_timer.stop()
        self._buffer.clear()
        self._streaming = None
        self._drop_rows(0)
        self._unseen_turns = 0
        self._empty.setVisible(True)

    def _drop_rows(self, cut: int) -> None:
        """Remove the rows from index `cut` on; from 0, also the messages still to be built."""
        if cut == 0:
            self._backlog.clear()
            self._fill_timer.stop()
            self._hold_paint(False)
            self._waiting.clear()  # the pictures still decoding belong to rows that go
        if any(row is self._anchor for row, _ in self._rows[cut:]):
            self._set_anchor(None)
        for row, _ in self._rows[cut:]:
            self._column.removeWidget(row)
            row.hide()
            self._trash.append(row)
        del self._rows[cut:]
        if self._trash:
            self._trash_timer.start()

    def _empty_trash(self) -> None:
        """Rows that went are deleted a batch per turn of the event loop: a long chat's 1,000 widgets at once would
        hold it up as long as building a slice does."""
        batch, self._trash = self._trash[:TRASH_BATCH], self._trash[TRASH_BATCH:]
        for row in batch:
            row.deleteLater()
        if self._trash:
            self._trash_timer.start()

    def show_messages(self, messages: Sequence[Message]) -> None:
        """Show `messages` (the store's Message objects), keeping bubbles that are already right. Into an empty view
        (a chat opened) the newest are built at once and the older ones above them, a slice at a time."""
        current = [(p.message.id, p.message.role, p.message.text) for p in self._backlog]
        current += [(b.msg_id, b.role, b.text) for b in self.bubbles()]
        wanted = [(m.id, m.role, m.text) for m in messages]
        keep = 0
        while keep < min(len(current), len(wanted)) and current[keep] == wanted[keep]:
            keep += 1
        if keep < len(self._backlog):  # a message not built yet changed (or went): build them all again
            self._drop_rows(0)
            self._unseen_turns = 0
            keep = 0
        elif any(b is None for _, b in self._rows) or keep < len(current):
            kept_bubbles = keep - len(self._backlog)
            bubble_rows = 0
            cut = len(self._rows)
            for i, (_, b) in enumerate(self._rows):
                if b is not None:
                    if bubble_rows == kept_bubbles:
                        cut = i
                        break
                    bubble_rows += 1
            self._drop_rows(cut)
        new = self._pending(messages, keep)
        self._unseen_turns = max([self._unseen_turns, *(int(m.meta.get("dropped_turns") or 0) for m in messages)])
        if self._rows:  # the new messages follow the bubbles shown
            for pending in new:
                self._build(pending)
        else:
            self._backlog.extend(new)
            self._fill_first()
        if self._unseen_turns:
            self._mark_unseen(self._unseen_turns)
        self._empty.setVisible(not self._rows)
        self._update_actions()
        self._stick_to_bottom = True

    def _pending(self, messages: Sequence[Message], start: int) -> list[_Pending]:
        """messages[start:] with their turn and the notice after them (what the model no longer sees)."""
        out: list[_Pending] = []
        turn = 0
        images_by_turn: list[int] = []  # images of the questions so far, by turn
        for i, m in enumerate(messages):
            if m.role == "user":
                turn += 1
                images_by_turn.append(len(m.images))
            if i < start:
                continue
            notice = ""
            if m.role == "assistant" and (dropped := int(m.meta.get("dropped_turns") or 0)):
                notice = _dropped_notice(dropped, sum(images_by_turn[:dropped]))
            out.append(_Pending(m, turn, notice))
        return out

    def _build(self, pending: _Pending, top: bool = False) -> None:
        """The bubble of a stored message (and its notice), at the end or `top`: above every row."""
        m = pending.message
        if top and pending.notice:
            self.add_notice(pending.notice, top=True)
        bubble = self._add_bubble(m.role, m.text, m.images, m.id, top=top)
        if m.role == "assistant":
            bubble.set_meta(record_summary(m.meta))
        if pending.turn <= self._unseen_turns:
            _mark_bubble_unseen(bubble)
        if not top and pending.notice:
            self.add_notice(pending.notice)

    def _fill_first(self) -> None:
        """The newest messages at once (at least FIRST_MESSAGES, then for up to a slice's time); the rest follows in
        slices. Until the view is full the viewport is not repainted, so the chat appears whole at the bottom
        instead of growing downwards from the top for a few frames."""
        clock = QElapsedTimer()
        clock.start()
        built = 0
        while self._backlog and (built < FIRST_MESSAGES or clock.elapsed() < FILL_SLICE_MS):
            self._build(self._backlog.pop(), top=True)
            built += 1
        if self._backlog:
            self._hold_paint(True)
            self._fill_timer.start()

    def _fill_slice(self) -> None:
        """Older messages above the ones shown, for about FILL_SLICE_MS; the next slice after the pending events.
        A reader scrolled up keeps what they read in place: the content goes in above and the view moves with it."""
        bar = self.verticalScrollBar()
        if bar.maximum() > 0:  # laid out since the last slice: the view is full
            self._hold_paint(False)
        clock = QElapsedTimer()
        clock.start()
        if not self._stick_to_bottom and self._anchor is None and self._rows:
            self._set_anchor(self._rows[0][0])  # every later row goes in above it
        while self._backlog and clock.elapsed() < FILL_SLICE_MS:
            self._build(self._backlog.pop(), top=True)
        if self._backlog:
            self._fill_timer.start()
        else:
            self._hold_paint(False)
            self._update_actions()
            self._anchor_timer.start()  # kept until the last rows are laid out

    def _set_anchor(self, row: QWidget | None) -> None:
        """While older messages go in above: `row` stays where it is in the viewport (the reader's place)."""
        self._anchor_timer.stop()
        if self._anchor is not None and shiboken6.isValid(self._anchor):
            self._anchor.removeEventFilter(self._anchor_watch)
        self._anchor = row
        if row is not None:
            row.installEventFilter(self._anchor_watch)
            self._anchor_offset = row.y() - self.verticalScrollBar().value()

    def _keep_anchor(self) -> None:
        if self._anchor is None or self._stick_to_bottom:
            return
        self._anchoring = True
        try:
            self.verticalScrollBar().setValue(self._anchor.y() - self._anchor_offset)
        finally:
            self._anchoring = False

    def _hold_paint(self, hold: bool) -> None:
        if self.viewport().updatesEnabled() == hold:
            self.viewport().setUpdatesEnabled(not hold)

    def filling(self) -> bool:
        """Whether older messages of the chat shown are still being built."""
        return bool(self._backlog)

    def _update_actions(self) -> None:
        bubbles = self.bubbles()
        last_user = next((b for b in reversed(bubbles) if b.role == "user"), None)
        last_assistant = bubbles[-1] if bubbles and bubbles[-1].role == "assistant" else None
        for b in bubbles:
            b.edit_button.setVisible(b is last_user and self._streaming is None)
            b.regenerate_button.setVisible(b is last_assistant and self._streaming is None)

    # ------------------------------------------------------------ streaming

    def begin_answer(self, assistant_msg: Message | None = None) -> MessageBubble:
        self.flush()
        bubble = self._add_bubble("assistant", "", (), assistant_msg.id if assistant_msg is not None else None)
        bubble.streaming = True
        bubble.set_text("")
        bubble.set_meta(self.stage.text() or "writing…")
        self.stage.setVisible(False)
        self._streaming = bubble
        self._stick_to_bottom = True
        self._update_actions()
        return bubble

    def append_text(self, piece: str) -> None:
        """Buffer a streamed piece; the bubble is updated at most every FLUSH_MS."""
        if self._streaming is None:
            return
        if not self._buffer and not self._streaming.text:
            self._streaming.set_meta("writing…")
        self._buffer.append(piece)
        if not self._flush_timer.isActive():
            self._flush_timer.start()

    def flush(self) -> None:
        if self._streaming is None or not self._buffer:
            return
        self._streaming.set_text(self._streaming.text + "".join(self._buffer))
        self._apply_width(self._streaming)
        self._buffer.clear()
        self.flush_count += 1

    def streaming_text(self) -> str:
        if self._streaming is None:
            return ""
        return self._streaming.text + "".join(self._buffer)

    def finish_answer(self, message: Message | None, record: AnswerRecord | None) -> None:
        self.set_stage("")
        bubble = self._streaming
        self.flush()
        self._flush_timer.stop()
        self._streaming = None
        if bubble is None:
            return
        bubble.streaming = False
        if message is not None:
            bubble.msg_id = message.id
            bubble.set_text(message.text)
        else:
            bubble.set_text(bubble.text)
        bubble.set_meta(record_summary(record))
        self._apply_width(bubble)
        dropped = record.dropped_turns if record is not None else 0
        if dropped:
            self.add_notice(_dropped_notice(int(dropped), self._mark_unseen(int(dropped))))
        self._update_actions()

    def _mark_unseen(self, dropped: int) -> int:
        """Mark the first `dropped` turns (a question and its answer) as out of the model's view; their image count.
        Messages not built yet are marked when they are."""
        self._unseen_turns = max(self._unseen_turns, dropped)
        images = 0
        turn = 0
        shown: list[tuple[str, int, MessageBubble | None]] = [
            (p.message.role, len(p.message.images), None) for p in self._backlog
        ]
        shown += [(b.role, len(b.thumbnails()), b) for b in self.bubbles()]
        for role, pictures, bubble in shown:
            if role == "user":
                turn += 1
                if turn > dropped:
                    break
                images += pictures
            if bubble is not None:
                _mark_bubble_unseen(bubble)
        return images

    def unseen_bubbles(self) -> list[MessageBubble]:
        return [b for b in self.bubbles() if b.property("unseen")]

    def fail_answer(self, message: str) -> None:
        """End a stream that failed: keep what was written, if anything, and say what happened."""
        self.set_stage("")
        bubble = self._streaming
        self.flush()
        self._flush_timer.stop()
        self._streaming = None
        if bubble is not None:
            bubble.streaming = False
            if bubble.text:
                bubble.set_text(bubble.text)
                bubble.set_meta("stopped by an error")
            else:
                bubble.setProperty("role", "error")
                bubble.role = "error"
                bubble.set_text(message)
                bubble.set_meta("")
                bubble.style().unpolish(bubble)
                bubble.style().polish(bubble)
        self._update_actions()

    # ------------------------------------------------------------ layout

    def _apply_width(self, bubble: MessageBubble) -> None:
        width = self.viewport().width() - 48
        bubble.fit(max(260, int(width * (0.78 if bubble.role == "user" else 0.9))))

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        for b in self.bubbles():
            self._apply_width(b)

    def _on_range_changed(self, _lo: int, hi: int) -> None:
        if self._stick_to_bottom:
            self.verticalScrollBar().setValue(hi)
        else:
            self._keep_anchor()

    def _on_scrolled(self, value: int) -> None:
        if self._anchoring:
            return  # the view keeping the reader's place, not the reader moving
        bar = self.verticalScrollBar()
        self._stick_to_bottom = value >= bar.maximum() - 40
        if self._anchor is not None:
            self._anchor_offset = self._anchor.y() - value

    def _retint(self, _colors: object = None) -> None:
        for b in self.bubbles():
            b.retint()


def _mark_bubble_unseen(bubble: MessageBubble) -> None:
    if bubble.property("unseen"):
        return
    bubble.setProperty("unseen", True)
    bubble.setToolTip("The model no longer sees this message: it was left out to make room in its context.")
    if bubble.role == "user":
        bubble.set_meta("no longer seen by the model")
    bubble.style().unpolish(bubble)
    bubble.style().polish(bubble)


def _dropped_notice(n: int, images: int = 0) -> str:
    """e.g. "The model no longer sees your first 2 questions, their 5 images and their answers: …"."""
    pics = f"{images} image" + ("s" if images != 1 else "")
    if n == 1:
        what = f"your first question, its {pics} and its answer" if images else "your first question and its answer"
        they = "they were" if images else "both were"
    else:
        what = f"your first {n} questions, their {pics} and their answers" if images else f"your first {n} questions"
        what += "" if images else " and their answers"
        they = "they were"
    return (
        f"The model no longer sees {what}: {they} left out to make room in its context. "
        "Start a new chat to ask about them again."
    )

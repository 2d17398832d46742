# ruff: noqa: F811 - the fixtures imported from test_gui are parameters of the tests
"""Issue 12 through the real window: a long conversation opens with its newest messages at the bottom and the
older ones follow above, in order; switching chats mid-way shows only the new chat; a reader scrolled up keeps
their place; the thumbnails arrive from the preview pool. (How fast is `owl-desktop bench gui-stall`'s job.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytestqt")

from PySide6.QtCore import QPoint  # noqa: E402
from test_gui import demo_bundle, make_window, save_shot  # noqa: E402, F401

from owl_desktop.gui.chat_view import Thumbnail  # noqa: E402
from owl_desktop.gui.theme import apply_theme  # noqa: E402

ANSWER = (
    "The screenshot shows a **settings dialog** with three tabs; the first one is open and lists the options for "
    "the network connection, each with a short explanation under it."
)


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)  # [H, W, 3]
    arr[:60, :, seed % 3] = 230  # a coloured band: the thumbnails differ visibly
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _long_chat(window, tag: str, turns: int = 50, images: int = 20, dropped: int = 0) -> str:  # noqa: ANN001
    """A stored chat of `turns` questions and answers, the first `images` questions each with a picture named
    "<tag>-<turn>.png"; its last answer says the first `dropped` turns were left out of the model's view."""
    store, image_store = window.services.store, window.services.images
    conv = store.create(f"A long chat {tag}")
    for t in range(turns):
        refs = [image_store.add(_png(t), f"{tag}-{t + 1}.png")] if t < images else []
        store.add_message(conv.id, "user", f"{tag} question {t + 1}", refs)
        meta = {"state": "done"} | ({"dropped_turns": dropped} if dropped and t == turns - 1 else {})
        store.add_message(conv.id, "assistant", f"**{tag} answer {t + 1}.** {ANSWER}", meta=meta)
    window.refresh_conversations()
    return conv.id


def _shown(window) -> list[tuple[str, str]]:  # noqa: ANN001
    return [(b.role, b.text) for b in window.chat.bubbles()]


def _stored(window, conv_id: str) -> list[tuple[str, str]]:  # noqa: ANN001
    return [(m.role, m.text) for m in window.services.store.messages(conv_id)]


def _at_bottom(window) -> bool:  # noqa: ANN001
    bar = window.chat.verticalScrollBar()
    return bar.maximum() > 0 and bar.value() == bar.maximum()


def _thumbnails(window) -> list[Thumbnail]:  # noqa: ANN001
    return [t for b in window.chat.bubbles() for t in b.thumbnails()]


def test_a_long_chat_opens_at_the_bottom_and_fills_in_order(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window()
    conv_id = _long_chat(window, "a")
    window.open_conversation(conv_id)
    assert window.chat.filling(), "100 messages are not all built at once"
    shown = _shown(window)
    assert 2 <= len(shown) < 100 and shown == _stored(window, conv_id)[-len(shown) :], "the newest, in order"
    qtbot.waitUntil(lambda: not window.chat.filling())
    assert _shown(window) == _stored(window, conv_id)
    qtbot.waitUntil(lambda: _at_bottom(window))
    qtbot.waitUntil(lambda: window.chat.thumbnails_pending() == 0)
    thumbs = _thumbnails(window)
    assert [t.toolTip() for t in thumbs] == [f"a-{t + 1}.png" for t in range(20)]
    assert all(t.ready and not t.pixmap().isNull() for t in thumbs)
    assert window.chat.bubbles()[-1].regenerate_button.isVisible() and window.chat.bubbles()[-2].edit_button.isVisible()
    assert not any(b.edit_button.isVisible() or b.regenerate_button.isVisible() for b in window.chat.bubbles()[:-2])
    for theme in ("light", "dark"):
        apply_theme(theme)
        save_shot(window, f"long-chat-{theme}")
    apply_theme("light")


def test_switching_chats_while_one_fills_shows_only_the_new_one(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window()
    first, second = _long_chat(window, "first"), _long_chat(window, "second", turns=30, images=5)
    window.open_conversation(first)
    assert window.chat.filling()
    window.open_conversation(second)
    qtbot.waitUntil(lambda: not window.chat.filling() and window.chat.thumbnails_pending() == 0)
    assert _shown(window) == _stored(window, second)
    assert [t.toolTip() for t in _thumbnails(window)] == [f"second-{t + 1}.png" for t in range(5)]
    qtbot.waitUntil(lambda: _at_bottom(window))
    window.open_conversation(first)  # and back: the whole first chat again, its pictures from the cache or pool
    qtbot.waitUntil(lambda: not window.chat.filling() and window.chat.thumbnails_pending() == 0)
    assert _shown(window) == _stored(window, first)
    assert all(t.ready and not t.pixmap().isNull() for t in _thumbnails(window))


def test_reading_up_while_older_messages_arrive_keeps_the_place(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window()
    conv_id = _long_chat(window, "a")
    window.open_conversation(conv_id)
    qtbot.waitUntil(lambda: window.chat.verticalScrollBar().maximum() > 0)
    assert window.chat.filling()
    bar = window.chat.verticalScrollBar()
    bar.setValue(0)  # the reader goes to the top of what is there so far
    oldest = window.chat.bubbles()[0]
    viewport = window.chat.viewport()
    where = oldest.mapTo(viewport, QPoint(0, 0)).y()
    qtbot.waitUntil(lambda: not window.chat.filling())
    qtbot.wait(50)  # the last slice's layout
    assert _shown(window) == _stored(window, conv_id)
    assert oldest.mapTo(viewport, QPoint(0, 0)).y() == where, "what the reader looked at did not move"
    assert bar.value() > 0, "the older messages are above it"


def test_turns_out_of_the_models_view_are_marked_when_they_are_built(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window()
    conv_id = _long_chat(window, "a", dropped=10)
    window.open_conversation(conv_id)
    qtbot.waitUntil(lambda: not window.chat.filling())
    assert window.chat.unseen_bubbles() == window.chat.bubbles()[:20]
    [notice] = window.chat.notices()
    assert "your first 10 questions, their 10 images and their answers" in notice

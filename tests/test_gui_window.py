# ruff: noqa: F811 - the fixtures imported from test_gui are parameters of the tests
"""Issue 14 through the real window: honest about what the model sees, figures per chat, model text kept inert,
previews of large images off the GUI thread. Fixtures (the demo model on the real engine thread) from test_gui."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytestqt")

from PySide6.QtCore import QEvent, QObject, QPoint, QRect, Qt, Slot  # noqa: E402
from PySide6.QtWidgets import QApplication, QDialog, QLabel, QWidget  # noqa: E402
from test_gui import (  # noqa: E402, F401
    ANSWER_MS,
    ask,
    demo_bundle,
    hold_after_pieces,
    make_window,
    pictures,
    save_shot,
    screenshot_dir,
)

from owl_desktop.gui.format import answer_speed, stage_line  # noqa: E402
from owl_desktop.gui.main_window import MainWindow, State  # noqa: E402
from owl_desktop.gui.theme import apply_theme  # noqa: E402
from owl_desktop.tasks import Progress  # noqa: E402


def test_the_question_shows_at_once_with_a_stage_line_until_the_first_token(qtbot, make_window, tmp_path: Path) -> None:  # noqa: ANN001
    window = make_window()
    shots = []
    for i in range(3):
        p = tmp_path / f"shot-{i}.png"
        Image.fromarray(np.full((90, 120, 3), 40 * i + 30, np.uint8)).save(p)
        shots.append(p)
    window.composer.add_files(shots)
    shown: list[str] = []

    class Seen(QObject):
        @Slot(object)
        def after_the_window(self, _p: Progress) -> None:  # on the GUI thread, after the window's own slot
            bubble = window.chat.bubbles()[-1]
            shown.append(window.chat.stage.text() if window.chat.stage.isVisible() else bubble.meta.text())

    seen = Seen()
    window.engine.worker.stage.connect(seen.after_the_window)
    window.composer.edit.setFocus()
    qtbot.keyClicks(window.composer.edit, "What differs?")
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
        # before any event from the engine thread: the question and its three images are in the chat
        [question] = window.chat.bubbles()
        assert question.role == "user" and question.text == "What differs?"
        assert len(question._thumbs) == 3 and window.chat.stage.isVisible()
        assert window.pages.currentWidget() is window.chat_page
    print("stage lines:", shown)
    assert shown[:3] == ["checking image 1 of 3…", "checking image 2 of 3…", "checking image 3 of 3…"], shown
    assert "encoding image 1 of 3…" in shown and shown[-1] == "reading the conversation…", shown
    assert not window.chat.stage.isVisible()
    assert [b.role for b in window.chat.bubbles()] == ["user", "assistant"]
    assert window.chat.bubbles()[0].msg_id is not None  # the stored question replaced the one shown at Enter


def test_status_figures_belong_to_the_chat_shown(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    window = make_window()
    window.composer.add_files(pictures[:1])
    window.composer.edit.setPlainText("Describe it")
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        window.composer.submit()
    first = window.current_id
    meta = window.services.store.messages(first)[-1].meta
    assert window.status.speed.text() == answer_speed(meta) != ""
    assert window.status.context.isVisible()

    window.new_conversation()
    assert window.status.speed.text() == "" and not window.status.context.isVisible()
    assert window.status.context_label.text() == ""

    window.open_conversation(first)
    assert window.status.speed.text() == answer_speed(meta)
    assert f"({meta['context_used']} / {meta['context_size']})" in window.status.context_label.text()

    hold_after_pieces(window, 2)
    window.composer.edit.setPlainText("And again")
    window.composer.submit()
    qtbot.waitUntil(lambda: window.chat.streaming_text() != "", timeout=ANSWER_MS)
    assert window.status.speed.text() == ""  # no previous turn's tok/s while this one streams
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        window.stop()
    assert window.state is State.READY


def test_model_text_is_inert_and_small(qtbot, make_window) -> None:  # noqa: ANN001
    """Issue 10: an answer (or a title) with raw HTML or Markdown images reads no file and does not hang."""
    window = make_window(with_model=False)
    store = window.services.store
    conv = store.create('<img src="/dev/zero"> title')
    store.add_message(conv.id, "user", "show me")
    store.add_message(
        conv.id,
        "assistant",
        '# Huge heading\n\nraw <img src="/dev/zero"> and ![zero](/dev/zero) and <b>bold?</b>',
        meta={"state": "done"},
    )
    store.add_message(conv.id, "user", "again")
    store.add_message(conv.id, "assistant", "", meta={"state": "stopped"})
    window.open_conversation(conv.id)
    qtbot.waitUntil(lambda: not window.chat.filling())  # older messages are built after the newest
    assert window.title.text() == '<img src="/dev/zero"> title'
    assert window.title.textFormat() == Qt.TextFormat.PlainText
    answer = window.chat.bubbles()[1]
    html = answer.label.text()
    assert "<img" not in html and "&lt;img" in html and "[image: zero]" in html
    assert "<h1" not in html and "xx-large" not in html
    assert "Stopped before the first word" in window.chat.bubbles()[3].label.text()


def test_stage_lines_read_naturally() -> None:
    assert stage_line("storing images", 0, 25) == "checking image 1 of 25…"
    assert stage_line("encoding images", 8, 25) == "encoding image 9 of 25…"
    assert stage_line("encoding images", 25, 25) == "reading the conversation…"
    assert stage_line("reading the conversation", 0, None) == "reading the conversation…"


def _big_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG of width×height, written quickly (a gradient, little compression)."""
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(path, compress_level=1)
    return path


def test_large_images_are_previewed_and_only_the_engine_limit_refuses(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001
    window = make_window()
    wide = _big_png(tmp_path / "wide.png", 10000, 8000)  # 80 MP: above Qt's 256 MB image allocation limit as RGB32
    window.composer.add_files([wide])
    [image] = window.composer.images()
    chip = window.composer.strip.chip_of(image)
    assert chip is not None and image.preview is None  # shown at once, previewed off the GUI thread
    qtbot.waitUntil(lambda: image.preview is not None, timeout=ANSWER_MS)
    assert image.size == (10000, 8000) and max(image.preview.width(), image.preview.height()) <= 320
    assert not window.banner.isVisible()

    huge = _big_png(tmp_path / "huge.png", 12000, 12000)  # 144 MP: the engine's limit, said as the engine says it
    window.composer.add_files([huge])
    qtbot.waitUntil(window.banner.isVisible, timeout=ANSWER_MS)
    message = window.banner.text.text()
    assert "huge.png" in message and "image too large (12000×12000" in message, message
    assert "damaged" not in message and "corrupt" not in message
    assert [i.name for i in window.composer.images()] == ["wide.png"]


def test_pasting_a_50_megapixel_image_does_not_stall_the_window(qtbot, make_window) -> None:  # noqa: ANN001
    """A timer ticks every 5 ms on the GUI thread while the paste is encoded and previewed; the longest gap between
    ticks is the longest the window could not answer. The issue's goal is < 50 ms; asserted with room for a busy
    machine, the figure is printed."""
    import time

    from PySide6.QtCore import QTimer
    from PySide6.QtGui import QGuiApplication, QImage

    window = make_window()
    bitmap = QImage(8660, 5774, QImage.Format.Format_RGB32)  # 50 MP, as a screenshot tool puts it on the clipboard
    bitmap.fill(Qt.GlobalColor.darkCyan)
    QGuiApplication.clipboard().setImage(bitmap)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.wait(50)
    window.composer.edit.setFocus()
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_V, Qt.KeyboardModifier.ControlModifier)
    [image] = window.composer.images()
    qtbot.waitUntil(lambda: image.ready, timeout=ANSWER_MS)
    qtbot.wait(30)
    timer.stop()
    worst_ms = max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) * 1000
    print(f"stall probe: longest GUI-thread gap while pasting 50 MP: {worst_ms:.1f} ms over {len(ticks)} ticks")
    assert image.size == (8660, 5774) and isinstance(image.source, bytes)
    assert worst_ms < 250


def _shots(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"shot-{i:02d}.png"
        Image.fromarray(np.full((60, 80, 3), (i * 10) % 256, np.uint8)).save(p)
        out.append(p)
    return out


def test_twenty_five_pending_images_scroll_and_each_keeps_its_remove_button(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001
    from owl_desktop.gui.composer import CHIP

    window = make_window()
    window.resize(900, 700)
    shots = _shots(tmp_path, 25)
    window.composer.add_files(shots)
    strip = window.composer.strip
    qtbot.waitUntil(lambda: all(i.ready for i in window.composer.images()), timeout=ANSWER_MS)
    chips = [strip.chip_of(i) for i in window.composer.images()]
    qtbot.waitUntil(lambda: strip.horizontalScrollBar().maximum() > 0)  # the row scrolls instead of squeezing
    assert all(c is not None and c.width() == CHIP and c.height() == CHIP for c in chips)
    xs = [c.x() for c in chips]
    assert all(b - a >= CHIP for a, b in zip(xs, xs[1:], strict=False))  # side by side, never overlapping
    assert window.composer.width() <= window.width()
    # the last chip reached by keyboard scrolls into view; Ctrl+← moves it, Delete removes it
    last = chips[-1]
    last.setFocus()
    qtbot.waitUntil(lambda: strip.horizontalScrollBar().value() > 0)
    assert last.visibleRegion().boundingRect().width() == CHIP
    qtbot.keyClick(last, Qt.Key.Key_Left, Qt.KeyboardModifier.ControlModifier)
    assert window.composer.images()[23].name == "shot-24.png"
    qtbot.keyClick(last, Qt.Key.Key_Delete)
    assert len(window.composer.images()) == 24 and "shot-24.png" not in [i.name for i in window.composer.images()]
    # every × still works, the last one too
    remaining = window.composer.images()
    qtbot.mouseClick(strip.chip_of(remaining[-1]).remove_button, Qt.MouseButton.LeftButton)
    assert len(window.composer.images()) == 23


def _varied_shots(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 120, (150, 200, 3), dtype=np.uint8)
        arr[:, : 20 * (i % 10 + 1), i % 3] = 230
        p = tmp_path / f"screen-{i + 1:02d}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


def test_screenshots_for_issue_14(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001
    """Chat with 8 images, the composer with 25 pending (and its budget line), and the minimum size, both themes."""
    shots = _varied_shots(tmp_path, 25)
    for theme in ("light", "dark"):
        window = make_window(theme=theme, max_new_tokens=60)
        window.new_conversation()
        window.composer.add_files(shots[:8])
        ask(qtbot, window, "Which of these screenshots shows the settings page?")
        save_shot(window, f"chat-8-images-{theme}")
        window.composer.add_files(shots)
        window.composer.edit.setPlainText("Compare all of them")
        qtbot.waitUntil(lambda: all(i.ready for i in window.composer.images()), timeout=ANSWER_MS)  # noqa: B023
        assert window.composer.budget_kind() == "warn"  # 25 × 65 positions: only without the earlier turn
        save_shot(window, f"composer-25-pending-{theme}")
        window.resize(720, 480)
        qtbot.waitUntil(lambda: window.width() == 720)  # noqa: B023
        save_shot(window, f"minimum-size-{theme}")
        question = window.chat.bubbles()[0]
        window.chat.ensureWidgetVisible(question.label, 0, 120)  # the question's text and the images above it
        save_shot(window, f"minimum-size-question-{theme}")
        settings = window.show_settings()
        qtbot.waitExposed(settings)
        for i in range(settings.tabs.count()):
            settings.tabs.setCurrentIndex(i)
            name = settings.tabs.tabText(i).lower().replace(" ", "-")
            save_shot(settings, f"settings-{name}-{theme}")
        settings.reject()
        window.close()
    print(f"screenshots in {screenshot_dir()}")


def _in_window(widget: QWidget, window: QWidget) -> QRect:
    return QRect(widget.mapTo(window, QPoint(0, 0)), widget.size())


def _layout_faults(window: MainWindow) -> list[str]:
    """What is wrong with the bubbles' layout once it has settled: a bubble shorter than its content, text cut off (a
    label shorter than its text at its width), thumbnails over each other or over the question, anything outside its
    bubble. Geometry in the window's coordinates."""
    for _ in range(4):  # the layout passes the resize set off, and the ones those set off
        QApplication.sendPostedEvents(None, QEvent.Type.LayoutRequest)
        QApplication.processEvents()
    faults = []
    for n, bubble in enumerate(window.chat.bubbles()):
        where = f"bubble {n} ({bubble.role}, {bubble.width()} px wide)"
        box = _in_window(bubble, window)
        if bubble.height() < (needed := bubble.heightForWidth(bubble.width())):
            faults.append(f"{where}: {bubble.height()} px tall, its content needs {needed}")
        for label in [*bubble.findChildren(QLabel, "BubbleText"), bubble.meta]:
            if label.isVisible() and label.height() < (needed := label.heightForWidth(label.width())):
                faults.append(f"{where}: {label.objectName()} {label.height()} px tall, its text needs {needed}")
            if label.isVisible() and not box.contains(_in_window(label, window)):
                faults.append(f"{where}: {label.objectName()} outside the bubble")
        thumbs = bubble.thumbnails()
        if thumbs:
            grid = QRect()
            for thumb in thumbs:
                grid = grid.united(_in_window(thumb, window))
            rects = [_in_window(t, window) for t in thumbs]
            if any(a.intersects(b) for i, a in enumerate(rects) for b in rects[i + 1 :]):
                faults.append(f"{where}: thumbnails overlap each other")
            if grid.intersects(_in_window(bubble.label, window)):
                faults.append(f"{where}: the images {grid} overlap the question {_in_window(bubble.label, window)}")
            if not box.contains(grid):
                faults.append(f"{where}: the images {grid} reach outside the bubble {box}")
    return faults


LONG_QUESTION = (  # more than four lines at 80 characters: Qt's sizeHint for it is then wider than a narrow bubble
    "Which of these screenshots shows the settings page, and what changed between the first and the last one? "
    "Look at the toolbar, the sidebar and the dialogs: some of them were taken before the update and some after "
    "it, and I would like to know which buttons moved, which labels were renamed and whether the colours of the "
    "dark theme changed anywhere, because a user told us the contrast got worse in the new version."
)


def test_bubbles_lay_out_again_at_every_width(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001
    """A long streamed answer and an 8-image question: at 1100×740, at the minimum size and back, nothing is cut off
    and the images stay above the question; and a window that starts at the minimum size opens the chat right."""
    window = make_window(max_new_tokens=120)
    window.composer.add_files(_varied_shots(tmp_path, 8))
    ask(qtbot, window, LONG_QUESTION)
    question, answer = window.chat.bubbles()
    assert len(question.thumbnails()) == 8 and len(answer.text) > 200
    assert _layout_faults(window) == []
    wide = answer.label.height()
    window.resize(720, 480)
    qtbot.waitUntil(lambda: window.width() == 720)
    assert _layout_faults(window) == []
    assert answer.label.height() > wide and question.thumbnail_rows() > 2  # the narrow view wrapped
    window.resize(1100, 740)
    qtbot.waitUntil(lambda: window.width() == 1100)
    assert _layout_faults(window) == []
    assert answer.label.height() == wide and question.thumbnail_rows() == 2

    small = make_window(size=(720, 480))
    assert small.width() == 720
    small.open_conversation(window.current_id)
    qtbot.waitUntil(lambda: small.chat.thumbnails_pending() == 0 and not small.chat.filling(), timeout=ANSWER_MS)
    assert [b.role for b in small.chat.bubbles()] == ["user", "assistant"]
    assert _layout_faults(small) == []
    small.resize(1100, 740)
    qtbot.waitUntil(lambda: small.width() == 1100)
    assert _layout_faults(small) == []


def test_keyboard_moves_through_chats_without_opening_them_and_drafts_stay(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    store = window.services.store
    first, second = store.create("first chat"), store.create("second chat")
    for conv in (first, second):
        store.add_message(conv.id, "user", f"hello from {conv.title}")
    window.refresh_conversations()
    window.open_conversation(first.id)
    qtbot.keyClicks(window.composer.edit, "a draft for the first chat")

    window.sidebar.list.setFocus()
    qtbot.keyClick(window.sidebar.list, Qt.Key.Key_Up)
    qtbot.keyClick(window.sidebar.list, Qt.Key.Key_Down)
    qtbot.keyClick(window.sidebar.list, Qt.Key.Key_Up)
    assert window.current_id == first.id  # arrows move the highlight only
    assert window.sidebar.current_id() == second.id
    qtbot.keyClick(window.sidebar.list, Qt.Key.Key_Return)
    assert window.current_id == second.id and window.composer.text() == ""  # the draft stayed with its chat
    window.open_conversation(first.id)
    assert window.composer.text() == "a draft for the first chat"


def test_window_keys(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window()
    window.new_conversation()
    window.services.store.create("a chat about cats")
    window.refresh_conversations()
    # Esc clears the search where the search has the focus
    window.sidebar.search.setFocus()
    qtbot.keyClicks(window.sidebar.search, "cats")
    qtbot.keyClick(window.sidebar.search, Qt.Key.Key_Escape)
    assert window.sidebar.search.text() == ""
    # Ctrl+E from the text boxes: a new chat has nothing to export, and says so
    for box in (window.composer.edit, window.sidebar.search):
        window.banner.text.setText("")
        box.setFocus()
        qtbot.keyClick(box, Qt.Key.Key_E, Qt.KeyboardModifier.ControlModifier)
        assert "export" in window.banner.text.text().lower()
    # Ctrl+B hides the conversations and the choice is remembered
    window.composer.edit.setFocus()
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_B, Qt.KeyboardModifier.ControlModifier)
    assert not window.sidebar.isVisible()
    assert type(window.services.settings).load().sidebar_hidden is True
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_B, Qt.KeyboardModifier.ControlModifier)
    assert window.sidebar.isVisible()
    # F1 lists every window key
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_F1)
    sheets = [w for w in window.findChildren(QDialog) if w.objectName() == "ShortcutsSheet"]
    assert sheets and sheets[-1].isVisible()
    listed = [k for k, _ in sheets[-1].rows]
    for keys in ("Ctrl+N", "Ctrl+E", "Ctrl+B", "Ctrl+Q", "Ctrl+Shift+V", "Esc", "F2 · Delete"):
        assert keys in listed
    sheets[-1].reject()
    # Ctrl+Q closes the window
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Q, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(lambda: not window.isVisible())


def test_delete_can_be_undone_then_is_final(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    store = window.services.store
    keep, gone = store.create("keep me"), store.create("delete me")
    store.add_message(gone.id, "user", "a question")
    window.refresh_conversations()
    window.pages.setCurrentWidget(window.chat_page)
    window.open_conversation(gone.id)
    window.sidebar.list.setFocus()
    qtbot.keyClick(window.sidebar.list, Qt.Key.Key_Delete)
    assert window.sidebar.titles() == ["keep me"] and window.current_id is None
    assert window.banner.isVisible() and window.banner.text.text() == "Deleted “delete me”."
    assert window.banner.action_button.text() == "Undo"
    assert {c.id for c in store.list()} == {keep.id, gone.id}  # nothing is deleted while Undo is offered
    qtbot.mouseClick(window.banner.action_button, Qt.MouseButton.LeftButton)
    assert sorted(window.sidebar.titles()) == ["delete me", "keep me"] and window.current_id == gone.id
    assert [b.text for b in window.chat.bubbles()] == ["a question"]

    window.delete_conversation(gone.id)
    with qtbot.waitSignal(window._delete_timer.timeout, timeout=10_000):  # the notice's few seconds run out
        pass
    assert [c.id for c in store.list()] == [keep.id] and window.sidebar.titles() == ["keep me"]
    qtbot.waitUntil(lambda: not window.banner.isVisible(), timeout=10_000)


def test_export_names_the_file_and_is_off_for_an_empty_chat(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001
    from owl_desktop.gui.main_window import export_stem

    window = make_window()
    window.new_conversation()
    assert not window.export_button.isEnabled()
    window.composer.edit.setPlainText("What is: this/that?")
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        window.composer.submit()
    assert window.export_button.isEnabled()
    title = window.title.text()
    assert export_stem(title) == "What is thisthat" and export_stem("///") == "conversation"
    folder = window.export_conversation(window.current_id, tmp_path / "as-folder")
    assert folder is not None and (folder / "conversation.json").is_file()
    assert window.banner.kind() == "info" and window.banner.text.text() == f"Exported “{title}” to {folder}"
    qtbot.waitUntil(lambda: not window.banner.isVisible(), timeout=10_000)


def test_an_error_closes_when_its_problem_is_gone(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001
    window = make_window()
    window.new_conversation()
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all, only text")
    window.composer.add_files([bad])
    qtbot.waitUntil(window.banner.isVisible)
    assert "notes.png" in window.banner.text.text()
    window.composer.add_files(_shots(tmp_path, 1))  # the composer changed: the message about it goes
    assert not window.banner.isVisible()


def test_offline_download_buttons_say_why(qtbot, make_window, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    window = make_window(with_model=False)
    card = window.welcome.download_card
    qtbot.waitUntil(lambda: window.models.runner.running() == [])  # the fit check has ended
    assert not card.button.isEnabled() and card.line.isVisible()
    assert "HF_HUB_OFFLINE is set" in card.line.text() and "command line" not in card.line.text()
    models = window.show_models()
    qtbot.waitExposed(models)
    cards = [c for c in models.findChildren(type(card)) if c.button.text() == "Download"]
    assert cards and all(not c.button.isEnabled() and "HF_HUB_OFFLINE" in c.button.toolTip() for c in cards)
    models.close()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from owl_desktop.devtools.tiny_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("import") / "owl-tiny", "bin", preset="tiny", seed=1)


def test_model_import_shows_a_bar_with_time_left_and_can_be_cancelled(qtbot, make_window, tiny_checkpoint) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    models = window.show_models()
    qtbot.waitExposed(models)
    card = models.import_card
    key = f"import:{tiny_checkpoint}"

    # first import: cancelled from its card (the converter meets the cancel at its next check)
    models.import_model(tiny_checkpoint)
    assert card.isVisible() and card.progress.isVisible() and card.cancel.isVisible()
    assert card.title.text() == f"Importing {tiny_checkpoint.name}"
    with qtbot.waitSignal(window.models.job_cancelled, timeout=ANSWER_MS):
        qtbot.mouseClick(card.cancel, Qt.MouseButton.LeftButton)
    assert not card.isVisible() and "cancelled" in models.notice.text()
    assert window.models.installed_ids() == []

    # again, to the end: the bar moved, the line said what and how long, the model is installed
    lines: list[str] = []
    shots: list[Path] = []

    def seen(k: str, _p: Progress, line: str) -> None:
        if k != key:
            return
        lines.append(line)
        if " of " in line and not shots:
            for theme in ("light", "dark"):
                apply_theme(theme)
                shots.append(save_shot(models, f"models-importing-{theme}", layouts_only=True))
            apply_theme("light")

    window.models.job_progress.connect(seen)
    with qtbot.waitSignal(window.models.job_done, timeout=ANSWER_MS * 3, check_params_cb=lambda k, _r: k == key):
        models.import_model(tiny_checkpoint)
    print("import progress lines:", lines[:3], "…", lines[-3:])
    assert any(" of " in line for line in lines) and any(line.endswith(" left") for line in lines), lines
    assert not card.isVisible() and models.notice.text().startswith("Imported as ")
    assert len(window.models.installed_ids()) == 1 and shots
    models.close()


def test_hovering_a_chat_offers_its_delete_button(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    store = window.services.store
    first, second = store.create("first chat"), store.create("second chat")
    window.refresh_conversations()
    lst = window.sidebar.list
    row = next(i for i in range(lst.count()) if lst.item(i).text() == "first chat")
    rect = lst.visualItemRect(lst.item(row))
    qtbot.mouseMove(lst.viewport(), rect.center())
    button = window.sidebar.hover_delete
    qtbot.waitUntil(button.isVisible)
    assert rect.contains(button.geometry().center()) and button.accessibleName() == "Delete first chat"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    assert window.sidebar.titles() == ["second chat"] and window.banner.action_button.text() == "Undo"
    window.finish_deletes()
    assert [c.id for c in store.list()] == [second.id] and first.id not in {c.id for c in store.list()}


def test_welcome_cards_stay_put_when_the_fit_check_ends(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    welcome = window.welcome
    card = welcome.download_card
    qtbot.waitUntil(lambda: window.models.runner.running() == [])

    def settled() -> list[tuple[int, int, int, int]]:
        for _ in range(3):
            QApplication.processEvents()
        return [c.geometry().getRect() for c in (card, welcome.demo_card, card.button, welcome.demo_card.button)]

    for width, height in ((1100, 740), (720, 480)):
        window.resize(width, height)
        qtbot.waitUntil(lambda w=width: window.width() == w)
        welcome.show_default_model()  # the page as it first shows: the fit is being checked
        before = settled()
        assert card.badge_texts()[0] == "checking this computer…"
        welcome.check_fit()
        qtbot.waitUntil(lambda: window.models.runner.running() == [])
        after = settled()
        assert card.badge_texts()[0] != "checking this computer…" and len(card.badge_texts()) >= 2
        assert after == before, (width, before, after)
        assert welcome.horizontalScrollBar().maximum() == 0  # nothing wider than the window, at 720 too


def test_an_imported_model_can_be_renamed_and_the_name_shows_everywhere(qtbot, make_window, tiny_checkpoint) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    models = window.show_models()
    qtbot.waitExposed(models)
    imported = lambda k, _r: k.startswith("import:")  # noqa: E731 - not the fit checks the page starts
    with qtbot.waitSignal(window.models.job_done, timeout=ANSWER_MS * 3, check_params_cb=imported):
        models.import_model(tiny_checkpoint)
    [model_id] = window.models.installed_ids()

    def shown_row():  # noqa: ANN202 - the row of the model, once the rebuilt list is on screen
        qtbot.waitUntil(lambda: (r := models.installed_row(model_id)) is not None and r.isVisible())
        return models.installed_row(model_id)

    row = shown_row()
    readable = f"{tiny_checkpoint.name} · Q4_K_M"
    assert row.title.text() == readable and model_id in row.detail.text()  # the id stays in small print
    assert f"“{readable}”" in models.notice.text()
    with qtbot.waitSignal(window.model_ready, timeout=ANSWER_MS):
        qtbot.mouseClick(row.use, Qt.MouseButton.LeftButton)
    assert window.status.model.text() == f"Model: {readable}"

    # Rename, type, Enter: stored through the bundle's manifest, shown in the list and the status line
    row = shown_row()
    qtbot.mouseClick(row.rename, Qt.MouseButton.LeftButton)
    assert row.name_edit.isVisible() and row.name_edit.hasFocus() and not row.title.isVisible()
    row.name_edit.clear()
    qtbot.keyClicks(row.name_edit, "Tiny owl for tests")
    qtbot.keyClick(row.name_edit, Qt.Key.Key_Return)
    row = shown_row()
    assert row.title.text() == "Tiny owl for tests" and row.title.isVisible()
    assert window.status.model.text() == "Model: Tiny owl for tests"
    save_shot(models, "models-renamed-light")
    assert window.models.display_name(model_id) == "Tiny owl for tests"
    assert window.services.chat.loaded_model_id == model_id  # the id, the folder and the loaded model stay

    # a name that cannot be one is refused with a message, the field stays open; Esc puts the name back
    qtbot.mouseClick(row.rename, Qt.MouseButton.LeftButton)
    row.name_edit.setText("   ")
    qtbot.keyClick(row.name_edit, Qt.Key.Key_Return)
    assert "cannot be empty" in models.notice.text() and row.name_edit.isVisible()
    qtbot.keyClick(row.name_edit, Qt.Key.Key_Escape)
    assert models.isVisible() and row.title.isVisible() and not row.name_edit.isVisible()
    assert row.title.text() == "Tiny owl for tests"

    # a new window (a restart) reads the name back
    models.close()
    again = make_window(with_model=False)
    assert again.models.display_name(model_id) == "Tiny owl for tests"


def test_a_model_load_sets_off_no_full_collection_and_freezes_what_it_made(qtbot, make_window) -> None:  # noqa: ANN001
    """Full garbage collections hold the GIL (the window waits): none runs during a load and its warm-up, whose
    objects are frozen out of later ones, and the collector's thresholds are as before afterwards."""
    import gc

    from owl_desktop.gui import gc_pauses

    window = make_window()
    model_id = window.services.settings.last_model_id
    qtbot.waitUntil(lambda: not gc_pauses.held(), timeout=ANSWER_MS)  # a warm-up still running from the window's start
    threshold = gc.get_threshold()
    full: list[str] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(threading.current_thread().name)

    prepared: list[object] = []

    class Seen(QObject):
        @Slot(object)
        def on_prepared(self, record: object) -> None:
            prepared.append(record)

    watcher = Seen()
    window.engine.worker.prepared.connect(watcher.on_prepared)
    frozen = gc.get_freeze_count()
    gc.callbacks.append(seen)
    try:
        window.load_model(model_id)
        qtbot.waitUntil(lambda: window.state is State.READY and bool(prepared), timeout=ANSWER_MS)
    finally:
        gc.callbacks.remove(seen)
    assert prepared[0] is not None  # the warm-up ran
    assert full == []
    assert gc.get_freeze_count() > frozen
    assert gc.get_threshold() == threshold

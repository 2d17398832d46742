"""The real window, offscreen, with the tiny demo model on the real engine thread.

The model manager downloads from devtools/hubserver.py (a hub on 127.0.0.1 serving the tiny checkpoint under the
default catalog id). Screenshots of the main states land in test-artifacts/screenshots/ (or $OWL_SCREENSHOT_DIR);
the path is printed. models-light/-dark are taken mid-way through a real download from that server.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl_desktop.devtools.hubserver import Fault, HubServer, point_hub_clients_at

pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QEvent, QMimeData, QObject, Qt, QTimer, QUrl, Signal  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from owl_desktop import paths  # noqa: E402
from owl_desktop.devtools.demo import DEMO_BUNDLE_ID, ensure_demo_bundle  # noqa: E402
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint  # noqa: E402
from owl_desktop.gui import attachments  # noqa: E402
from owl_desktop.gui.app import show_main_window  # noqa: E402
from owl_desktop.gui.chat_view import Thumbnail  # noqa: E402
from owl_desktop.gui.dnd import simulate_drop  # noqa: E402
from owl_desktop.gui.main_window import MainWindow, State  # noqa: E402
from owl_desktop.gui.services import build_services  # noqa: E402
from owl_desktop.gui.theme import apply_theme  # noqa: E402
from owl_desktop.hub.catalog import DEFAULT_REPO  # noqa: E402
from owl_desktop.hub.download import partial_path  # noqa: E402
from owl_desktop.hub.retry import RetryPolicy  # noqa: E402
from owl_desktop.hub.snapshot import folder_name  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ANSWER_MS = 60_000


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("OWL_SCREENSHOT_DIR", ROOT / "test-artifacts" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_shot(widget, name: str, *, layouts_only: bool = False) -> Path:  # noqa: ANN001
    """`layouts_only`: settle pending layouts but deliver nothing else, so a picture taken in a signal handler shows
    that moment (e.g. a job's progress) and not the job's later events."""
    for _ in range(3):  # pending layouts first, so the picture shows the settled window
        if layouts_only:
            QCoreApplication.sendPostedEvents(None, QEvent.Type.LayoutRequest)
        else:
            QApplication.processEvents()
    path = screenshot_dir() / f"{name}.png"
    assert widget.grab().save(str(path))
    img = QImage(str(path))
    assert img.width() > 200 and img.height() > 200
    colors = {img.pixel(x, y) for x in range(0, img.width(), 37) for y in range(0, img.height(), 37)}
    assert len(colors) > 5, "the screenshot is blank"
    print(f"screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle, built once for the module (a few seconds) and linked into each test's data dir."""
    root = tmp_path_factory.mktemp("gui-demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OWL_DATA_DIR", str(root / "data"))
        mp.setenv("OWL_CACHE_DIR", str(root / "cache"))
        return ensure_demo_bundle()


def link_demo(demo_bundle: Path) -> None:
    """Install the module's demo bundle in this test's data dir (a link: nothing is copied)."""
    link = paths.ensure(paths.models_dir()) / DEMO_BUNDLE_ID
    if not link.exists():
        link.symlink_to(demo_bundle, target_is_directory=True)


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    out = []
    for i, (w, h) in enumerate([(320, 200), (200, 260)]):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[: h // 2, :, i] = 230  # a coloured band, so the thumbnails differ visibly
        p = tmp_path / f"screen-{i + 1}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


WindowFactory = Callable[..., MainWindow]


@pytest.fixture
def make_window(qtbot, demo_bundle: Path) -> Iterator[WindowFactory]:  # noqa: ANN001
    made: list[MainWindow] = []

    def make(
        with_model: bool = True,
        theme: str = "light",
        max_new_tokens: int = 48,
        n_ctx: int | None = None,
        size: tuple[int, int] = (1100, 740),
    ) -> MainWindow:
        if with_model:
            link_demo(demo_bundle)
        services = build_services()
        services.settings.sampling.max_new_tokens = max_new_tokens
        services.settings.engine.threads = 2
        if n_ctx is not None:
            services.settings.engine.n_ctx = n_ctx
        apply_theme(theme)
        window = MainWindow(services)
        made.append(window)
        qtbot.addWidget(window)
        window.resize(*size)
        window.show()
        qtbot.waitExposed(window)
        window.start()
        if with_model:
            qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
        return window

    yield make
    for window in made:
        window.engine.worker.stop()  # releases an engine held by hold_after_pieces when a test failed early
    apply_theme("light")


def urls_mime(files: list[Path]) -> QMimeData:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(f)) for f in files])
    return mime


def hold_after_pieces(window: MainWindow, n: int) -> None:
    """Hold the engine thread at its n-th piece until the window asks it to stop (Stop, or closing the window): the
    tiny model is so fast that a Stop would otherwise race the end of the answer. No time limit short enough to
    run out on a loaded machine; the make_window fixture stops every window's engine at teardown."""
    count = [0]
    worker = window.engine.worker
    stop_requested = threading.Event()
    worker.stop_requested.connect(stop_requested.set, Qt.ConnectionType.DirectConnection)

    def hold(_piece: str) -> None:
        count[0] += 1
        if count[0] == n:
            stop_requested.wait(ANSWER_MS / 1000)

    worker.piece.connect(hold, Qt.ConnectionType.DirectConnection)


def ask(qtbot, window: MainWindow, text: str) -> None:  # noqa: ANN001
    window.composer.edit.setFocus()
    qtbot.keyClicks(window.composer.edit, text)
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)


# ---------------------------------------------------------------------------------------------------- chat


def test_drop_two_images_and_ask_streams_the_answer(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    window = make_window()
    mime = urls_mime(pictures)
    assert simulate_drop(window.composer, mime)
    assert [i.name for i in window.composer.images()] == ["screen-1.png", "screen-2.png"]
    seen: list[str] = []
    window.engine.worker.piece.connect(lambda _p: seen.append(window.chat.streaming_text()))
    ask(qtbot, window, "What differs between these screenshots?")

    assert not window.banner.isVisible()
    bubbles = window.chat.bubbles()
    assert [b.role for b in bubbles] == ["user", "assistant"]
    final = bubbles[-1].text
    assert final.strip()
    assert len(seen) >= 2 and len(seen[0]) < len(final), "pieces arrived while the answer was written"
    assert 1 <= window.chat.flush_count < len(seen), "streamed updates are coalesced"
    assert len(bubbles[0].findChildren(Thumbnail)) == 2
    assert window.composer.images() == [] and window.composer.text() == ""
    assert "tok/s" in bubbles[-1].meta.text()
    assert "context" in window.status.context_label.text()
    stored = window.services.store.messages(window.current_id)
    assert [m.role for m in stored] == ["user", "assistant"]
    assert [r.name for r in stored[0].images] == ["screen-1.png", "screen-2.png"]
    assert stored[1].text == final
    assert window.sidebar.titles() == ["What differs between these screenshots?"]


def test_stop_mid_answer_keeps_the_partial_text(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    window = make_window(max_new_tokens=1500)
    window.composer.add_files([pictures[0]])
    pieces: list[str] = []
    window.engine.worker.piece.connect(pieces.append)
    hold_after_pieces(window, 3)
    qtbot.keyClicks(window.composer.edit, "Describe it at length")
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: len(pieces) >= 3, timeout=ANSWER_MS)
    assert window.state is State.ANSWERING
    assert window.composer.send_button.accessibleName() == "Stop"
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        qtbot.mouseClick(window.composer.send_button, Qt.MouseButton.LeftButton)
    answer = window.services.store.messages(window.current_id)[-1]
    assert answer.role == "assistant" and answer.stopped
    assert answer.text and answer.text == window.chat.bubbles()[-1].text
    assert len(answer.text) < 1500 * 8
    assert "stopped" in window.chat.bubbles()[-1].meta.text()
    assert window.state is State.READY and window.composer.send_button.accessibleName() == "Send"


def test_stop_works_when_the_question_goes_out_before_the_load_has_ended(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    """The window is ready at `model_loaded`; the engine's end-of-request `idle` comes after it and may arrive once
    the next question is on its way (a loaded machine). Held here in that order: Stop must still stop the answer."""
    window = make_window(max_new_tokens=1500)
    question_sent = threading.Event()
    worker = window.engine.worker
    worker.model_loaded.connect(
        lambda *_: question_sent.wait(ANSWER_MS / 1000), Qt.ConnectionType.DirectConnection
    )  # the engine thread waits here, between model_loaded and its idle
    window.load_model(DEMO_BUNDLE_ID)  # e.g. after a change of settings
    qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
    window.composer.add_files([pictures[0]])
    pieces: list[str] = []
    worker.piece.connect(pieces.append)
    hold_after_pieces(window, 3)
    qtbot.keyClicks(window.composer.edit, "Describe it")
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    question_sent.set()
    qtbot.waitUntil(lambda: len(pieces) >= 3, timeout=ANSWER_MS)
    assert window.engine.busy
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        qtbot.mouseClick(window.composer.send_button, Qt.MouseButton.LeftButton)
    answer = window.services.store.messages(window.current_id)[-1]
    assert answer.role == "assistant" and answer.stopped and answer.text
    assert window.state is State.READY
    qtbot.waitUntil(lambda: not window.engine.busy)  # its idle follows the answer's end, as the load's did


def test_stop_before_the_engine_thread_takes_the_question_up_still_stops_it(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    """Stop pressed while the question still waits in the engine thread's queue (here: the thread is held busy) is
    not lost: the question is kept and its answer ends stopped, without a word generated."""
    window = make_window(max_new_tokens=1500)
    release = threading.Event()
    worker = window.engine.worker
    QTimer.singleShot(0, worker, lambda: release.wait(ANSWER_MS / 1000))  # runs on the engine thread: it is busy
    window.composer.add_files([pictures[0]])
    pieces: list[str] = []
    worker.piece.connect(pieces.append)
    qtbot.keyClicks(window.composer.edit, "Describe it")
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    assert window.state is State.ANSWERING
    qtbot.mouseClick(window.composer.send_button, Qt.MouseButton.LeftButton)  # Stop, before the thread is free
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        release.set()
    messages = window.services.store.messages(window.current_id)
    assert [m.role for m in messages] == ["user", "assistant"] and messages[0].text == "Describe it"
    assert messages[1].stopped and not pieces
    assert window.state is State.READY


def test_regenerate_replaces_the_last_answer(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    window = make_window()
    window.composer.add_files(pictures[:1])
    ask(qtbot, window, "What is this?")
    first = window.services.store.messages(window.current_id)
    bubble = window.chat.bubbles()[-1]
    assert bubble.regenerate_button.isVisibleTo(window)
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        qtbot.mouseClick(bubble.regenerate_button, Qt.MouseButton.LeftButton)
    after = window.services.store.messages(window.current_id)
    assert [m.role for m in after] == ["user", "assistant"]
    assert after[0].id == first[0].id and after[1].id != first[1].id
    assert [b.role for b in window.chat.bubbles()] == ["user", "assistant"]
    assert window.chat.bubbles()[-1].text == after[1].text


def test_edit_last_question_and_ask_again(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    window = make_window()
    window.composer.add_files(pictures[:1])
    ask(qtbot, window, "What is this?")
    user_bubble = window.chat.bubbles()[0]
    qtbot.mouseClick(user_bubble.edit_button, Qt.MouseButton.LeftButton)
    assert window.composer.text() == "What is this?"
    window.composer.edit.selectAll()
    qtbot.keyClicks(window.composer.edit, "Which colours are there?")
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    stored = window.services.store.messages(window.current_id)
    assert [m.text for m in stored][0] == "Which colours are there?"
    assert len(stored) == 2 and len(stored[0].images) == 1


def test_restart_finds_the_conversation_with_its_images(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    window = make_window()
    simulate_drop(window.composer, urls_mime(pictures))
    ask(qtbot, window, "Compare the two")
    conv_id = window.current_id
    answer = window.chat.bubbles()[-1].text
    window.close()
    for p in pictures:
        p.unlink()  # history keeps its own copies

    again = make_window()
    assert again.sidebar.titles() == ["Compare the two"]
    assert again.current_id == conv_id
    bubbles = again.chat.bubbles()
    assert [b.text for b in bubbles] == ["Compare the two", answer]
    thumbs = bubbles[0].findChildren(Thumbnail)
    assert len(thumbs) == 2
    qtbot.waitUntil(lambda: all(t.ready for t in thumbs))  # decoded on the preview pool
    assert all(not t.pixmap().isNull() for t in thumbs)
    assert "tok/s" in bubbles[1].meta.text()


def test_paste_an_image_from_the_clipboard(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window()
    image = QImage(120, 80, QImage.Format.Format_RGB32)
    image.fill(Qt.GlobalColor.darkCyan)
    QGuiApplication.clipboard().setImage(image)
    window.composer.edit.setFocus()
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_V, Qt.KeyboardModifier.ControlModifier)
    assert [i.name for i in window.composer.images()] == ["pasted-1.png"]
    assert window.composer.text() == ""
    ask(qtbot, window, "What colour is it?")
    stored = window.services.store.messages(window.current_id)[0]
    assert [r.name for r in stored.images] == ["pasted-1.png"]
    assert Image.open(window.services.images.path(stored.images[0].sha256)).size == (120, 80)


def test_non_images_are_refused_with_a_message(qtbot, make_window, tmp_path, pictures) -> None:  # noqa: ANN001
    window = make_window()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    simulate_drop(window.composer, urls_mime([notes]))
    assert window.composer.images() == []
    assert window.banner.isVisible() and "notes.txt" in window.banner.text.text()
    assert "not an image" in window.banner.text.text()
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(pictures[0].read_bytes()[:120])
    simulate_drop(window.composer, urls_mime([damaged, pictures[1]]))
    # both show at once; the damaged one leaves when its preview fails (off the GUI thread), with a message
    qtbot.waitUntil(lambda: [i.name for i in window.composer.images()] == ["screen-2.png"])
    assert "damaged.png" in window.banner.text.text() and "corrupt or truncated" in window.banner.text.text()
    qtbot.keyClick(window, Qt.Key.Key_Escape)
    assert not window.banner.isVisible()


def test_a_broken_model_is_a_message_and_the_question_stays(qtbot, make_window, demo_bundle) -> None:  # noqa: ANN001
    import shutil

    broken = paths.ensure(paths.models_dir()) / DEMO_BUNDLE_ID
    shutil.copytree(demo_bundle, broken)
    for gguf in broken.glob("*.gguf"):
        gguf.unlink()
    window = make_window(with_model=False)
    qtbot.waitUntil(lambda: window.state is State.NO_MODEL and window.banner.isVisible(), timeout=ANSWER_MS)
    assert "could not be loaded" in window.banner.text.text()
    window.composer.edit.setPlainText("Is anyone there?")
    window.composer.submit()
    assert "No model is loaded" in window.banner.text.text()
    assert window.composer.text() == "Is anyone there?"
    assert window.services.store.list() == []


def test_export_then_import_round_trips(qtbot, make_window, pictures, tmp_path) -> None:  # noqa: ANN001
    window = make_window()
    simulate_drop(window.composer, urls_mime(pictures))
    ask(qtbot, window, "Two pictures")
    original = window.services.store.messages(window.current_id)
    archive = window.export_conversation(window.current_id, tmp_path / "chat.owlchat.zip")
    assert archive is not None and archive.is_file()
    markdown = window.export_conversation(window.current_id, tmp_path / "chat.md")
    assert markdown is not None and "Two pictures" in markdown.read_text()
    imported = window.import_conversation(archive)
    assert imported is not None and imported.id != original[0].conversation_id
    assert window.current_id == imported.id
    copy = window.services.store.messages(imported.id)
    assert [(m.role, m.text) for m in copy] == [(m.role, m.text) for m in original]
    assert [r.sha256 for r in copy[0].images] == [r.sha256 for r in original[0].images]
    assert len(window.sidebar.titles()) == 2
    assert len(window.chat.bubbles()[0].findChildren(Thumbnail)) == 2


def test_sidebar_search_rename_delete(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window()
    ask(qtbot, window, "first about cats")
    window.new_conversation()
    ask(qtbot, window, "second about dogs")
    assert window.sidebar.titles() == ["second about dogs", "first about cats"]
    qtbot.keyClicks(window.sidebar.search, "cats")
    qtbot.waitUntil(lambda: window.sidebar.titles() == ["first about cats"])
    window.sidebar.search.clear()
    qtbot.waitUntil(lambda: len(window.sidebar.titles()) == 2)
    window.rename_conversation(window.current_id, "Dogs")
    assert window.title.text() == "Dogs" and "Dogs" in window.sidebar.titles()
    window.delete_conversation(window.current_id)
    assert window.sidebar.titles() == ["first about cats"]
    assert window.chat.bubbles() == []
    window.finish_deletes()  # what the Undo notice's timer does
    assert [c.title for c in window.services.store.list()] == ["first about cats"]


def test_close_during_an_answer_loses_nothing(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    window = make_window(max_new_tokens=1500)
    window.composer.add_files(pictures[:1])
    pieces: list[str] = []
    window.engine.worker.piece.connect(pieces.append)
    hold_after_pieces(window, 2)
    qtbot.keyClicks(window.composer.edit, "Go on")
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: len(pieces) >= 2, timeout=ANSWER_MS)
    conv_id = window.current_id
    window.close()
    assert not window.engine.thread.isRunning()
    store = window.services.store
    messages = store.messages(conv_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].text and messages[1].stopped


# ---------------------------------------------------------------------------------------------------- pages


def test_welcome_offers_the_demo_and_it_works(qtbot, make_window, demo_bundle) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    assert window.pages.currentWidget() is window.welcome
    assert window.welcome.demo_card.button.isEnabled()
    link = paths.ensure(paths.models_dir()) / DEMO_BUNDLE_ID
    link.symlink_to(demo_bundle, target_is_directory=True)  # the build is the module's; here it is instant
    events: list[str] = []
    window.models.job_failed.connect(lambda key, message: events.append(f"{key} failed: {message}"))
    window.models.job_done.connect(lambda key, _r: events.append(f"{key} done"))
    window.welcome.demo_card.button.click()
    qtbot.waitUntil(lambda: any(e.startswith("demo") for e in events), timeout=ANSWER_MS)
    assert [e for e in events if e.startswith("demo")] == ["demo done"], events
    qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
    assert window.pages.currentWidget() is window.chat_page
    assert window.services.chat.loaded_model_id == DEMO_BUNDLE_ID


def test_a_job_that_ends_at_once_still_reports_to_late_listeners(qtbot, make_window) -> None:  # noqa: ANN001
    """Callers connect to a job's signals right after starting it (the demo build with the bundle already there
    ends in a millisecond): its outcome must reach them however the threads were scheduled."""
    window = make_window(with_model=False)
    runner = window.models.runner
    handles = [runner.start(f"instant-{i}", lambda _task, i=i: i) for i in range(20)]
    runner.pool.waitForDone(10_000)  # every job has ended on its thread before anyone listens
    results: list[int] = []
    for handle in handles:
        handle.succeeded.connect(results.append)
    qtbot.waitUntil(lambda: len(results) == 20, timeout=ANSWER_MS)
    assert sorted(results) == list(range(20)) and not any(h.running for h in handles)


class _Pinger(QObject):
    ping = Signal()


def test_a_long_session_of_signals_leaves_the_interpreter_whole(make_window) -> None:  # noqa: ANN001
    """A long answer or a download emits tens of thousands of signals from Python. PySide6 6.12.0 dropped a reference
    to True at every such emit, and Python 3.11 (where True is not immortal) aborts when True's count runs out; the
    package excludes that release, and this catches one like it."""
    import sys

    make_window(with_model=False)
    pinger = _Pinger()
    for _ in range(30_000):  # more than the references True has in this process (about 12,000)
        pinger.ping.emit()
    assert sys.getrefcount(True) > 1_000


def test_settings_dialog_applies_theme_and_sampling(qtbot, make_window) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    dialog = window.show_settings()
    dialog.theme.setCurrentIndex(dialog.theme.findData("dark"))
    dialog.temperature.setValue(0.3)
    dialog.seed.setValue(7)
    dialog.accept()
    settings = window.services.settings
    assert settings.theme == "dark" and settings.sampling.temperature == pytest.approx(0.3)
    assert settings.sampling.seed == 7
    from owl_desktop.app.settings import Settings

    assert Settings.load().theme == "dark"


def test_screenshots_of_the_main_states(qtbot, make_window, pictures) -> None:  # noqa: ANN001
    for theme in ("light", "dark"):  # first run: no model yet
        welcome = make_window(with_model=False, theme=theme)
        assert welcome.pages.currentWidget() is welcome.welcome
        qtbot.waitUntil(lambda: welcome.models.runner.running() == [])  # noqa: B023 - the fit badge, now
        save_shot(welcome, f"welcome-{theme}")
        settings = welcome.show_settings()
        qtbot.waitExposed(settings)
        save_shot(settings, f"settings-{theme}")
        settings.reject()
        welcome.resize(720, 480)  # the minimum size
        qtbot.waitUntil(lambda: welcome.width() == 720)  # noqa: B023
        save_shot(welcome, f"welcome-minimum-size-{theme}")
        welcome.close()
    for theme in ("light", "dark"):
        window = make_window(theme=theme, max_new_tokens=120)
        window.new_conversation()
        simulate_drop(window.composer, urls_mime(pictures))
        ask(qtbot, window, "What differs between these two screenshots?")
        window.composer.add_files(pictures[:1])
        window.composer.edit.setPlainText("And which one is brighter?")
        qtbot.waitUntil(lambda: all(i.ready for i in window.composer.images()), timeout=ANSWER_MS)  # noqa: B023
        save_shot(window, f"chat-{theme}")
        window.close()
    print(f"screenshots in {screenshot_dir()}")


# ---------------------------------------------------------------------------------------------------- context


def _colour_pictures(folder: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        arr = np.full((96, 128, 3), 40 * i, dtype=np.uint8)
        arr[:, : 32 * (i + 1), i % 3] = 250
        p = folder / f"shot-{i + 1}.png"
        Image.fromarray(arr).save(p)
        out.append(p)
    return out


def test_a_full_context_leaves_out_old_turns_and_refuses_what_cannot_fit(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001
    """256 positions: one image (65) + the system prompt + a question + 16 for the answer fit, two such turns don't."""
    window = make_window(n_ctx=256, max_new_tokens=16)
    shots = _colour_pictures(tmp_path, 4)
    for i, question in enumerate(["What is in the first one?", "And in this one?"]):
        window.composer.add_files([shots[i]])
        ask(qtbot, window, question)
    assert not window.banner.isVisible()
    assert [b.role for b in window.chat.bubbles()] == ["user", "assistant"] * 2
    [notice] = window.chat.notices()
    assert notice.startswith("The model no longer sees your first question, its 1 image and its answer"), notice
    first_question, first_answer = window.chat.bubbles()[:2]
    assert window.chat.unseen_bubbles() == [first_question, first_answer]
    assert first_question.meta.text() == "no longer seen by the model"
    stored = window.services.store.messages(window.current_id)
    assert stored[-1].meta["dropped_turns"] == 1 and stored[-1].meta["context_size"] == 256
    before = [(m.id, m.role, m.text) for m in stored]
    shown = [(b.role, b.text) for b in window.chat.bubbles()]

    window.composer.add_files(shots)  # 4 × 65 positions: more than the whole context
    qtbot.keyClicks(window.composer.edit, "Compare all four")
    # refused in the composer, before anything is sent or encoded, with what to do
    assert window.composer.budget_kind() == "error" and window.composer.budget_line.isVisible()
    line = window.composer.budget_line.text()
    assert "4 images need 260 positions" in line and "Remove 1 image" in line, line
    assert not window.composer.send_button.isEnabled()
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    assert window.state is State.READY and window.banner.isVisible()
    assert window.banner.text.text() == line and len(window.composer.images()) == 4
    window.composer.strip.clear()
    window.composer.edit.clear()
    # the engine's own refusal stays for what reaches it: the message sent without the composer's check
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        window.send("Compare all four", [attachments.from_file(s) for s in shots])
    assert window.banner.isVisible()
    message = window.banner.text.text()
    assert "too many images for one question" in message and "at most" in message, message
    assert "Traceback" not in message
    assert window.state is State.READY
    after = window.services.store.messages(window.current_id)
    assert [(m.id, m.role, m.text) for m in after[: len(before)]] == before  # nothing earlier was lost
    assert [(b.role, b.text) for b in window.chat.bubbles()[: len(shown)]] == shown
    assert not any(b.role == "error" for b in window.chat.bubbles())
    assert window.chat.notices() == [notice]

    window.composer.strip.clear()
    window.composer.edit.clear()
    window.composer.add_files([shots[2], shots[3]])  # fits alone, but only by leaving old turns out: said so
    assert window.composer.budget_kind() == "warn", window.composer.budget_line.text()
    assert "oldest questions will leave the model's view" in window.composer.budget_line.text()
    window.composer.strip.remove(0)
    assert window.composer.budget_kind() == "ok", window.composer.budget_line.text()
    assert "positions (1 image)" in window.composer.budget_line.text()
    ask(qtbot, window, "Then just this one?")
    assert not window.banner.isVisible()
    assert window.chat.bubbles()[-1].role == "assistant" and window.chat.bubbles()[-1].text


# ---------------------------------------------------------------------------------------------------- model manager

BIN = "pytorch_model.bin"
DOWNLOADED_ID = "mplug-owl-llama-7b-q4_k_m"  # the default catalog entry, converted as Q4_K_M


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gui-hub") / "mplug-owl-tiny", "bin", preset="tiny", seed=0)


@pytest.fixture
def hub(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """devtools/hubserver.py on 127.0.0.1 serving the tiny checkpoint as the default catalog repository, with
    HF_ENDPOINT pointed at it and the offline mode of conftest lifted (also huggingface_hub's import-time copy)."""
    server = HubServer()
    server.add_repo(DEFAULT_REPO, tiny_ckpt)
    with server:
        point_hub_clients_at(server, monkeypatch, tmp_path)
        yield server


def bin_gets(server: HubServer) -> list[str | None]:
    """The Range header of every GET of the weights file that reached the CDN."""
    return [h.range for h in server.hits if h.server == "cdn" and h.method == "GET" and h.file == BIN]


class CardWatch:
    """What a model card showed after each progress report of its job: (bar value, bar maximum, line, unit)."""

    def __init__(self, window: MainWindow, models, key: str) -> None:  # noqa: ANN001
        self.seen: list[tuple[int, int, str, str]] = []
        self.models = models
        self.key = key
        window.models.job_progress.connect(self._on_progress)  # after the window's own: the card is updated

    def _on_progress(self, key: str, p, _line: str) -> None:  # noqa: ANN001
        card = self.models.card(self.key)
        if key == self.key and card is not None:
            self.seen.append((card.progress.value(), card.progress.maximum(), card.line.text(), p.unit))

    def bytes_seen(self) -> list[tuple[int, str]]:
        """The download's reports (the conversion that follows counts bytes too, per stage)."""
        return [
            (value, line)
            for value, top, line, unit in self.seen
            if unit == "B" and top == 1000 and line.startswith("downloading")
        ]

    def downloading_at(self, least: int) -> bool:
        return any(v >= least and "/s" in line and "left" in line for v, line in self.bytes_seen())


def test_models_window_downloads_from_the_hub_and_the_new_model_answers(
    qtbot, make_window, hub: HubServer, tiny_ckpt: Path, pictures
) -> None:  # noqa: ANN001
    window = make_window()  # chatting with the demo model meanwhile
    models = window.show_models()
    qtbot.waitExposed(models)
    card = models.card(DEFAULT_REPO)
    assert card is not None and card.button.text() == "Download" and card.button.isEnabled()
    watch = CardWatch(window, models, DEFAULT_REPO)
    size = (tiny_ckpt / BIN).stat().st_size
    hub.throttle(size / 4)  # slow enough to watch it for a few seconds, and to take its pictures
    qtbot.mouseClick(card.button, Qt.MouseButton.LeftButton)
    assert not card.button.isEnabled() and card.cancel.isVisible() and card.cancel.text() == "Pause"
    qtbot.waitUntil(lambda: watch.downloading_at(250), timeout=ANSWER_MS)
    for theme in ("light", "dark"):
        apply_theme(theme)
        save_shot(models, f"models-{theme}")
    apply_theme("light")
    hub.throttle(0)
    qtbot.waitUntil(lambda: DOWNLOADED_ID in models.installed_ids(), timeout=ANSWER_MS)

    values = [v for v, _ in watch.bytes_seen()]
    assert len(set(values)) >= 3 and values == sorted(values), "the bar moved forward with the bytes"
    lines = [line for _, line in watch.bytes_seen()]
    assert len(set(lines)) >= 3 and any("MB of" in line and "MB/s" in line for line in lines), lines
    assert any(line.startswith("quantizing") for _, _, line, _ in watch.seen), "and so did the conversion"
    assert hub.bytes_sent(BIN) == size
    assert window.services.chat.loaded_model_id == DEMO_BUNDLE_ID, "a finished download does not swap models"

    row = models.installed_row(DOWNLOADED_ID)
    assert row is not None and row.use.isEnabled()
    with qtbot.waitSignal(window.model_ready, timeout=ANSWER_MS):
        qtbot.mouseClick(row.use, Qt.MouseButton.LeftButton)
    assert window.state is State.READY and window.services.chat.loaded_model_id == DOWNLOADED_ID
    window.new_conversation()
    window.composer.add_files(pictures[:1])
    pieces: list[str] = []
    window.engine.worker.piece.connect(pieces.append)
    ask(qtbot, window, "What is in this picture?")
    answer = window.services.store.messages(window.current_id)[-1]
    assert answer.role == "assistant" and answer.text and len(pieces) >= 2
    assert answer.meta["model_id"] == DOWNLOADED_ID
    assert not models.installed_row(DOWNLOADED_ID).use.isEnabled()  # "In use" now


def test_pause_then_resume_after_a_restart(qtbot, make_window, hub: HubServer, tiny_ckpt: Path) -> None:  # noqa: ANN001
    size = (tiny_ckpt / BIN).stat().st_size
    window = make_window(with_model=False)
    models = window.show_models()
    qtbot.waitExposed(models)
    card = models.card(DEFAULT_REPO)
    watch = CardWatch(window, models, DEFAULT_REPO)
    hub.throttle(size / 3)
    qtbot.mouseClick(card.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: watch.downloading_at(150), timeout=ANSWER_MS)
    with qtbot.waitSignal(window.models.job_cancelled, timeout=ANSWER_MS):
        qtbot.mouseClick(card.cancel, Qt.MouseButton.LeftButton)
    assert card.button.text() == "Resume" and card.button.isEnabled() and card.discard.isVisible()
    assert "Paused" in card.line.text() and card.progress.isVisible() and card.progress.value() > 0
    [partial] = window.services.models.partial_downloads()
    assert partial.repo_id == DEFAULT_REPO and 0 < partial.bytes_done < partial.bytes_total
    part = partial_path(paths.downloads_dir() / folder_name(DEFAULT_REPO) / BIN)
    kept = part.stat().st_size
    assert 0 < kept < size
    assert window.welcome.download_card.button.text() == "Resume"
    window.close()

    again = make_window(with_model=False)  # a restart of the app on the same data folder
    assert again.welcome.download_card.button.text() == "Resume"
    models = again.show_models()
    qtbot.waitExposed(models)
    card = models.card(DEFAULT_REPO)
    assert card.button.text() == "Resume" and "Paused" in card.line.text()
    assert card.progress.value() == int(partial.fraction * 1000)
    save_shot(models, "models-paused-light")
    hub.throttle(0)
    qtbot.mouseClick(card.button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: DOWNLOADED_ID in models.installed_ids(), timeout=ANSWER_MS)
    gets = bin_gets(hub)
    assert gets[0] is None and gets[-1] == f"bytes={kept}-", gets
    assert hub.bytes_sent(BIN) < 1.1 * size
    assert again.services.models.partial_downloads() == []
    # with no model yet, the welcome page's model is put to use once it is in
    qtbot.waitUntil(lambda: again.state is State.READY, timeout=ANSWER_MS)
    assert again.services.chat.loaded_model_id == DOWNLOADED_ID


def test_a_failed_download_is_a_message_in_its_card(qtbot, make_window, hub: HubServer, tiny_ckpt: Path) -> None:  # noqa: ANN001
    window = make_window(with_model=False)
    window.services.models.retry = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, stall_timeout=5.0)
    models = window.show_models()
    qtbot.waitExposed(models)
    card = models.card(DEFAULT_REPO)
    hub.inject(Fault("corrupt", BIN, at=(tiny_ckpt / BIN).stat().st_size // 3, times=-1))
    with qtbot.waitSignal(window.models.job_failed, timeout=ANSWER_MS):
        qtbot.mouseClick(card.button, Qt.MouseButton.LeftButton)
    line = card.line.text()
    assert line.startswith("⚠") and "corrupted" in line and "sha256" in line, line
    assert "Traceback" not in line and "\n" not in line
    assert card.button.text() == "Try again" and card.button.isEnabled() and not card.cancel.isVisible()
    assert models.installed_ids() == []
    assert not partial_path(paths.downloads_dir() / folder_name(DEFAULT_REPO) / BIN).exists()

    hub.clear_faults()
    hub.inject(Fault("status", None, status=500, times=-1))
    with qtbot.waitSignal(window.models.job_failed, timeout=ANSWER_MS):
        qtbot.mouseClick(card.button, Qt.MouseButton.LeftButton)
    line = card.line.text()
    assert line.startswith("⚠") and "500" in line and "Traceback" not in line, line
    assert window.welcome.download_card.line.text() == line  # the welcome page tells the same
    assert not window.banner.isVisible() or "Traceback" not in window.banner.text.text()

    assert card.discard.isVisible()  # the small files of the first try are kept; Discard deletes them
    models.confirm_delete = False
    qtbot.mouseClick(card.discard, Qt.MouseButton.LeftButton)
    assert window.services.models.partial_downloads() == []
    card = models.card(DEFAULT_REPO)  # the page was rebuilt from the disk
    assert card.button.text() == "Download" and not card.discard.isVisible() and "freed" in models.notice.text()


def test_open_with_attaches_the_images_to_a_new_chat(qtbot, make_window, pictures, tmp_path) -> None:  # noqa: ANN001
    """`owl-desktop a.png b.png` (the desktop file's "Open with"): a new chat with both images waiting."""
    from owl_desktop.cli import split_open_files

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    argv, files = split_open_files([str(pictures[0]), str(pictures[1]), str(notes)], {"ask", "chat"})
    assert argv == [] and files == [pictures[0], pictures[1], notes]
    assert split_open_files(["ask", "--model", "x", "q"], {"ask"}) == (["ask", "--model", "x", "q"], [])
    window = make_window()
    refused: list[str] = []
    window.composer.refused.connect(refused.append)
    window.open_files(files)
    assert window.current_id is None
    assert [i.name for i in window.composer.strip.images()] == [pictures[0].name, pictures[1].name]
    assert refused and "notes.txt" in refused[0]


def test_start_up_shows_the_window_then_loads_the_model(qtbot, demo_bundle, pictures) -> None:  # noqa: ANN001
    """`owl-desktop IMAGE...` short of its event loop: the window is shown on its chat page with the images attached,
    and loading the model (which imports torch and llama.cpp) waits until the window has been painted."""
    link = paths.ensure(paths.models_dir()) / DEMO_BUNDLE_ID
    link.symlink_to(demo_bundle, target_is_directory=True)
    window = show_main_window(QApplication.instance(), pictures)
    qtbot.addWidget(window)
    assert window.isVisible() and window.pages.currentWidget() is window.chat_page
    assert [i.name for i in window.composer.images()] == [p.name for p in pictures]
    assert window.state is State.NO_MODEL and not window.engine.busy, "nothing was sent to the engine before the paint"
    qtbot.waitExposed(window)
    qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
    assert window.services.chat.loaded_model_id == DEMO_BUNDLE_ID
    assert [i.name for i in window.composer.images()] == [p.name for p in pictures]


# ---------------------------------------------------------------------------------------------------- local API


def test_local_api_server_answers_with_the_window_model_and_the_chat_still_works(
    qtbot,
    make_window,
    pictures,  # noqa: ANN001
) -> None:
    import base64
    import copy
    import socket

    import openai

    window = make_window()
    statuses: list[str] = []
    window.api_server.status_changed.connect(statuses.append)
    turned_on = copy.deepcopy(window.services.settings)
    turned_on.api_server.enabled = True
    turned_on.api_server.port = 0  # any free port
    window.apply_settings(turned_on)
    url = window.api_server.url
    assert url and url.startswith("http://127.0.0.1:")
    assert window.status.api.text() == f"· API on {url.removeprefix('http://')}"

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.models.list().data[0].id == window.services.chat.loaded_model_id  # the window's model, not a copy
    image = "data:image/png;base64," + base64.b64encode(pictures[0].read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]
    answers: list = []
    thread = threading.Thread(
        target=lambda: answers.append(
            client.chat.completions.create(
                model=window.services.chat.loaded_model_id,
                messages=[{"role": "user", "content": content}],
                max_tokens=8,
            )
        )
    )
    thread.start()
    qtbot.waitUntil(lambda: bool(answers), timeout=ANSWER_MS)
    thread.join()
    assert answers[0].choices[0].message.content
    qtbot.waitUntil(lambda: any("answering a request" in s for s in statuses), timeout=ANSWER_MS)
    qtbot.waitUntil(lambda: not window.status.api.text().endswith("answering a request"), timeout=ANSWER_MS)

    # the window's own chat goes on, on the same engine
    window.composer.add_files([pictures[1]])
    ask(qtbot, window, "And this one?")
    assert window.chat.bubbles()[-1].role == "assistant" and window.chat.bubbles()[-1].text.strip()

    turned_off = copy.deepcopy(window.services.settings)
    turned_off.api_server.enabled = False
    window.apply_settings(turned_off)
    assert window.status.api.text() == "" and window.api_server.url is None
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass

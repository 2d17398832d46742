"""The real window, offscreen, with the tiny demo model on the real engine thread.

Screenshots of the main states land in test-artifacts/screenshots/ (or $OWL_SCREENSHOT_DIR); the path is printed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytestqt")

from PySide6.QtCore import QMimeData, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from owl_desktop import paths  # noqa: E402
from owl_desktop.devtools.demo import DEMO_BUNDLE_ID, ensure_demo_bundle  # noqa: E402
from owl_desktop.gui.app import apply_theme, build_services  # noqa: E402
from owl_desktop.gui.chat_view import Thumbnail  # noqa: E402
from owl_desktop.gui.dnd import simulate_drop  # noqa: E402
from owl_desktop.gui.format import RateMeter, progress_line  # noqa: E402
from owl_desktop.gui.main_window import MainWindow, State  # noqa: E402
from owl_desktop.gui.model_controller import entry_key  # noqa: E402
from owl_desktop.tasks import Progress  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ANSWER_MS = 60_000


def screenshot_dir() -> Path:
    folder = Path(os.environ.get("OWL_SCREENSHOT_DIR", ROOT / "test-artifacts" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_shot(widget, name: str) -> Path:  # noqa: ANN001
    for _ in range(3):
        QApplication.processEvents()  # pending layouts first, so the picture shows the settled window
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
    def make(with_model: bool = True, theme: str = "light", max_new_tokens: int = 48) -> MainWindow:
        if with_model:
            link = paths.ensure(paths.models_dir()) / DEMO_BUNDLE_ID
            if not link.exists():
                link.symlink_to(demo_bundle, target_is_directory=True)
        services = build_services()
        services.settings.sampling.max_new_tokens = max_new_tokens
        services.settings.engine.threads = 2
        apply_theme(theme)
        window = MainWindow(services)
        qtbot.addWidget(window)
        window.resize(1100, 740)
        window.show()
        qtbot.waitExposed(window)
        window.start()
        if with_model:
            qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
        return window

    yield make
    apply_theme("light")


def urls_mime(files: list[Path]) -> QMimeData:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(f)) for f in files])
    return mime


def hold_after_pieces(window: MainWindow, n: int) -> threading.Event:
    """Pause the engine thread at its n-th piece (until the returned gate opens, 2 s at most): the tiny model is
    so fast that a Stop would otherwise race the end of the answer."""
    gate = threading.Event()
    count = [0]

    def hold(_piece: str) -> None:
        count[0] += 1
        if count[0] == n:
            gate.wait(2.0)

    window.engine.worker.piece.connect(hold, Qt.ConnectionType.DirectConnection)
    return gate


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
    gate = hold_after_pieces(window, 3)
    qtbot.keyClicks(window.composer.edit, "Describe it at length")
    qtbot.keyClick(window.composer.edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: len(pieces) >= 3, timeout=ANSWER_MS)
    assert window.state is State.ANSWERING
    assert window.composer.send_button.accessibleName() == "Stop"
    with qtbot.waitSignal(window.answer_finished, timeout=ANSWER_MS):
        qtbot.mouseClick(window.composer.send_button, Qt.MouseButton.LeftButton)
        gate.set()
    answer = window.services.store.messages(window.current_id)[-1]
    assert answer.role == "assistant" and answer.stopped
    assert answer.text and answer.text == window.chat.bubbles()[-1].text
    assert len(answer.text) < 1500 * 8
    assert "stopped" in window.chat.bubbles()[-1].meta.text()
    assert window.state is State.READY and window.composer.send_button.accessibleName() == "Send"


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
    assert len(thumbs) == 2 and all(not t.pixmap().isNull() for t in thumbs)
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
    assert [i.name for i in window.composer.images()] == ["screen-2.png"]
    assert "damaged.png" in window.banner.text.text()
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
    window.delete_conversation(window.current_id, confirm=False)
    assert window.sidebar.titles() == ["first about cats"]
    assert window.chat.bubbles() == []


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
        save_shot(welcome, f"welcome-{theme}")
        settings = welcome.show_settings()
        qtbot.waitExposed(settings)
        save_shot(settings, f"settings-{theme}")
        settings.reject()
        welcome.close()
    for theme in ("light", "dark"):
        window = make_window(theme=theme, max_new_tokens=120)
        window.new_conversation()
        simulate_drop(window.composer, urls_mime(pictures))
        ask(qtbot, window, "What differs between these two screenshots?")
        window.composer.add_files(pictures[:1])
        window.composer.edit.setPlainText("And which one is brighter?")
        save_shot(window, f"chat-{theme}")
        models = window.show_models()
        qtbot.waitExposed(models)
        runner = window.models.runner
        qtbot.waitUntil(lambda: runner.running() == [])  # noqa: B023 - the fit badges, now
        entry = window.models.catalog()[0]
        meter = RateMeter()  # a download mid-way, as the pool reports it
        for t, done in ((0.0, 4.1e9), (4.0, 4.26e9)):
            meter.add(done, now=t)
        p = Progress("downloading", 4.26e9, entry.download_bytes, "B")
        window.models.job_progress.emit(entry_key(entry), p, progress_line(p.stage, p.done, p.total, p.unit, meter))
        save_shot(models, f"models-{theme}")
        window.close()
    print(f"screenshots in {screenshot_dir()}")

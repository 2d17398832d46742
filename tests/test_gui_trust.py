# ruff: noqa: F811 - the fixtures imported from test_gui are parameters of the tests
"""Issue 10 through the real window: closing it in the middle of the work, a question asked while a load fails or
while the user moves to another chat, pasted images kept out of world-readable files.

The closing tests run a real app process (tests/close_mid_work.py) so that a crash at exit shows: Qt prints
"QThread: Destroyed while thread is still running" and aborts when the engine thread outlives the app."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytestqt")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QGuiApplication, QImage  # noqa: E402
from test_gui import ANSWER_MS, demo_bundle, link_demo, make_window, pictures  # noqa: E402, F401

from owl_desktop import paths  # noqa: E402
from owl_desktop.devtools.demo import DEMO_BUNDLE_ID  # noqa: E402
from owl_desktop.gui.composer import AttachmentChip  # noqa: E402
from owl_desktop.gui.image_viewer import ImageViewer  # noqa: E402
from owl_desktop.gui.main_window import State  # noqa: E402

HERE = Path(__file__).resolve().parent
PROCESS_LIMIT_S = 300  # a hang fails the test instead of the whole run; the figures below are printed


@pytest.mark.parametrize("stage", ["load", "encode", "answer"])
def test_closing_mid_stage_ends_the_app_cleanly(stage: str, demo_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    link_demo(demo_bundle)
    image = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(image)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(HERE / "close_mid_work.py"), stage, str(image)],
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_LIMIT_S,
    )
    wall = time.monotonic() - started
    print(f"{stage}: process {wall:.1f} s; stdout {done.stdout.strip()}")
    assert "QThread" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{stage}: close to end of event loop {report['close_s']:.3f} s")
    assert report["released_by_stop"] is True, "the close never told the engine to stop"
    assert report["visible_at_stop"] is False, "the window stayed on screen while the engine thread ended its stage"
    assert report["engine_thread_running"] is False
    if stage == "load":  # the load stopped before reading the weights: no model, no warm-up, nothing stored
        assert report["model_loaded"] is False and report["conversations"] == []
    else:  # the question was stored before the close and stays
        assert report["model_loaded"] is True and len(report["conversations"]) == 1


def _hold_the_next_load(window) -> threading.Event:  # noqa: ANN001
    """The engine thread waits at the start of the next load until the returned event is set."""
    go = threading.Event()
    held = [False]

    def hold(_ref: str) -> None:
        if not held[0]:
            held[0] = True
            go.wait(ANSWER_MS / 1000)

    window.engine.worker.model_loading.connect(hold, Qt.ConnectionType.DirectConnection)
    return go


def test_a_question_asked_while_a_load_fails_comes_back_and_is_never_sent(
    qtbot, make_window, demo_bundle, pictures
) -> None:  # noqa: ANN001, F811, E501
    window = make_window(with_model=False)
    broken = paths.ensure(paths.models_dir()) / DEMO_BUNDLE_ID
    shutil.copytree(demo_bundle, broken)
    for gguf in broken.glob("*.gguf"):
        gguf.unlink()
    go = _hold_the_next_load(window)
    try:
        window.load_model(DEMO_BUNDLE_ID)
        assert window.state is State.LOADING
        window.composer.add_files([pictures[0]])
        window.composer.edit.setPlainText("Is anyone there?")
        window.composer.submit()
        assert window.composer.text() == "" and [b.role for b in window.chat.bubbles()] == ["user"]
    finally:
        go.set()
    qtbot.waitUntil(lambda: window.state is State.NO_MODEL and window.banner.isVisible(), timeout=ANSWER_MS)
    assert "could not be loaded" in window.banner.text.text()
    assert window.composer.text() == "Is anyone there?"
    assert [i.name for i in window.composer.images()] == [pictures[0].name]
    assert window.chat.bubbles() == []
    # a working model loads next: the question is not sent by itself
    shutil.rmtree(broken)
    broken.symlink_to(demo_bundle, target_is_directory=True)
    window.load_model(DEMO_BUNDLE_ID)
    qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
    qtbot.wait(50)  # queued events after the load, if any would send it
    assert window.services.store.list() == [] and window.chat.bubbles() == []
    assert window.composer.text() == "Is anyone there?"


def test_a_question_waiting_for_the_model_stays_with_its_chat(qtbot, make_window) -> None:  # noqa: ANN001, F811
    window = make_window()
    store = window.services.store
    first, second = store.create(), store.create()
    window.refresh_conversations()
    window.open_conversation(first.id)
    go = _hold_the_next_load(window)
    try:
        window.load_model(DEMO_BUNDLE_ID)
        window.composer.edit.setPlainText("Meant for the first chat")
        window.composer.submit()
        window.open_conversation(second.id)  # while the model still loads
        assert window.composer.text() == ""
    finally:
        go.set()
    qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
    qtbot.wait(50)
    assert store.messages(first.id) == [] and store.messages(second.id) == []
    assert window.chat.bubbles() == []
    window.open_conversation(first.id)
    assert window.composer.text() == "Meant for the first chat"


def test_a_pasted_image_opened_in_the_viewer_is_never_world_readable(qtbot, make_window) -> None:  # noqa: ANN001, F811
    window = make_window(with_model=False)
    image = QImage(90, 60, QImage.Format.Format_RGB32)
    image.fill(Qt.GlobalColor.darkMagenta)
    QGuiApplication.clipboard().setImage(image)
    old_umask = os.umask(0o022)  # the usual umask: files anyone on the computer can read, unless we say otherwise
    try:
        window.composer.edit.setFocus()
        qtbot.keyClick(window.composer.edit, Qt.Key.Key_V, Qt.KeyboardModifier.ControlModifier)
        qtbot.waitUntil(lambda: all(i.ready for i in window.composer.images()))
        [pasted] = window.composer.images()
        assert isinstance(pasted.source, bytes)
        [chip] = window.composer.strip.findChildren(AttachmentChip)
        qtbot.mouseClick(chip, Qt.MouseButton.LeftButton)
        [viewer] = [w for w in window.findChildren(ImageViewer) if w.isVisible()]
        folder = window.private_files.folder
        assert folder is not None
        written = list(folder.iterdir())
        assert [p.read_bytes() for p in written] == [pasted.source]
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)
        viewer.close()
    finally:
        os.umask(old_umask)
    window.close()
    assert not folder.exists()

"""Work ahead while the user types: the window encodes attached images and prefills the prompt in the background,
and that work never changes an answer nor delays one. Real window (offscreen), real engine thread, tiny demo model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytestqt")

from PySide6.QtCore import QElapsedTimer, QTimer  # noqa: E402
from test_gui import demo_bundle, link_demo  # noqa: E402, F401

from owl_desktop.app.chat_service import ChatService, Finished  # noqa: E402
from owl_desktop.devtools.demo import DEMO_BUNDLE_ID  # noqa: E402
from owl_desktop.engine.pipeline import AnswerRecord, PrepareRecord  # noqa: E402
from owl_desktop.gui.main_window import PREPARE_DEBOUNCE_MS, MainWindow, State  # noqa: E402
from owl_desktop.gui.services import build_services  # noqa: E402
from owl_desktop.tasks import CancelToken  # noqa: E402

WAIT_MS = 60_000


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    out = []
    for i, (w, h) in enumerate([(320, 200), (200, 260), (240, 240)]):
        p = tmp_path / f"shot-{i}.png"
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture
def window(qtbot, demo_bundle: Path) -> Iterator[MainWindow]:  # noqa: ANN001, F811
    link_demo(demo_bundle)
    services = build_services()
    services.settings.sampling.max_new_tokens = 24
    services.settings.sampling.temperature = 0.0  # greedy: answers comparable token for token
    services.settings.engine.threads = 2
    # Flash attention on the CPU computes a position a little differently depending on the batch it is in (up to
    # 0.06 in the demo model's logits); without it a position's values do not depend on how the prompt was split,
    # so an answer after work ahead can be compared token for token with a cold run's.
    services.settings.engine.flash_attn = "off"
    win = MainWindow(services)
    qtbot.addWidget(win)
    win.show()
    qtbot.waitExposed(win)
    prepared: list[PrepareRecord | None] = []
    win.engine.worker.prepared.connect(prepared.append)
    win.start()
    qtbot.waitUntil(lambda: win.state is State.READY, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: len(prepared) >= 1, timeout=WAIT_MS)  # the warm-up after the load
    yield win
    win.engine.worker.stop()


def _wait_prepared(qtbot, win: MainWindow, act: Callable[[], None]) -> PrepareRecord:  # noqa: ANN001
    """Do `act` and wait for the background work it starts (after the debounce) to end."""
    records: list[PrepareRecord | None] = []
    win.engine.worker.prepared.connect(records.append)
    act()
    qtbot.waitUntil(lambda: bool(records) and records[-1] is not None, timeout=WAIT_MS)
    win.engine.worker.prepared.disconnect(records.append)
    record = records[-1]
    assert record is not None
    return record


def _send(qtbot, win: MainWindow, text: str) -> AnswerRecord:  # noqa: ANN001
    records: list[AnswerRecord] = []
    win.engine.worker.finished.connect(lambda _c, _m, r: records.append(r))
    win.composer.edit.setPlainText(text)
    win.composer.submit()
    qtbot.waitUntil(lambda: bool(records) and win.state is State.READY, timeout=WAIT_MS)
    return records[-1]


def _cold_tokens(chat: ChatService, images: list[Path], text: str, system: str) -> list[int]:
    """The same question on an empty KV cache (what the answer must be whatever was worked ahead)."""
    pipe = chat.pipeline
    assert pipe is not None
    with chat.queue.enter("test", bounded=False):
        pipe.llm.reset()
        stream = pipe.ask(images, text, sampling=chat.default_sampling(), system=system)
        stream.read()
        return stream.record.token_ids


def test_attached_image_is_ready_when_sent(qtbot, window: MainWindow, pictures: list[Path]) -> None:  # noqa: ANN001
    prep = _wait_prepared(qtbot, window, lambda: window.composer.add_files(pictures[:1]))
    assert not prep.cancelled and prep.positions > 65 and prep.encode_ms > 0
    record = _send(qtbot, window, "What is on the screen?")
    print(f"worked ahead: {prep}; answer: reused {record.reused_positions}, encode {record.encode_ms} ms")
    assert record.reused_positions >= prep.positions  # only the question's own tokens were prefilled on Enter
    assert record.encode_ms == 0 and [t.cached for t in record.images] == [True]
    stored = window.services.store.messages(window.current_id)[-1]
    assert stored.meta["reused_positions"] == record.reused_positions and stored.meta["images"][0]["encode_ms"] == 0
    system = window.services.settings.system_prompt
    assert record.token_ids == _cold_tokens(window.services.chat, pictures[:1], "What is on the screen?", system)


def test_typed_words_are_prefilled_before_enter(qtbot, window: MainWindow, pictures: list[Path]) -> None:  # noqa: ANN001
    """While the question is typed, its finished words are prefilled too; a word still being typed starts nothing.
    On Enter only the rest of the question is prefilled, and the answer equals a cold run's."""
    image_only = _wait_prepared(qtbot, window, lambda: window.composer.add_files(pictures[:1]))
    typed = _wait_prepared(qtbot, window, lambda: window.composer.edit.setPlainText("Which colours does the "))
    assert not typed.cancelled and typed.positions > image_only.positions + 3
    requested: list[object] = []
    window.engine.prepare_requested.connect(lambda *args: requested.append(args))
    window.composer.edit.setPlainText("Which colours does the pic")  # the same whole words: nothing new to do
    qtbot.wait(3 * PREPARE_DEBOUNCE_MS)
    assert requested == []
    record = _send(qtbot, window, "Which colours does the picture show?")
    print(f"image only: {image_only.positions}, typed: {typed.positions}, answer reused {record.reused_positions}")
    assert record.reused_positions >= typed.positions
    system = window.services.settings.system_prompt
    question = "Which colours does the picture show?"
    assert record.token_ids == _cold_tokens(window.services.chat, pictures[:1], question, system)


def test_typing_keeps_the_running_work_ahead_and_skips_superseded_requests(
    qtbot,  # noqa: ANN001
    window: MainWindow,
    pictures: list[Path],
) -> None:
    """A finished word does not stop the work ahead that runs (that would throw away a half-computed image batch at
    every word); requests that queued up behind it are skipped for the newest one. Another image does stop it."""
    release = threading.Event()
    QTimer.singleShot(0, window.engine.worker, lambda: release.wait(WAIT_MS / 1000))  # the engine thread is busy
    requested: list[tuple[object, ...]] = []
    window.engine.prepare_requested.connect(lambda *args: requested.append(args))
    records: list[PrepareRecord | None] = []
    window.engine.worker.prepared.connect(records.append)
    window.composer.add_files(pictures[:1])
    qtbot.waitUntil(lambda: len(requested) == 1, timeout=WAIT_MS)
    for n, text in enumerate(("Which ", "Which colours ", "Which colours does "), start=2):
        window.composer.edit.setPlainText(text)
        qtbot.waitUntil(lambda n=n: len(requested) == n, timeout=WAIT_MS)
    tokens = [args[3] for args in requested]
    assert all(t is tokens[0] for t in tokens) and not tokens[0].cancelled  # type: ignore[attr-defined]
    release.set()
    qtbot.waitUntil(lambda: bool(records), timeout=WAIT_MS)
    qtbot.wait(3 * PREPARE_DEBOUNCE_MS)
    assert len(records) == 1 and records[0] is not None  # only the newest request ran, with every typed word
    assert records[0].positions > 65
    window.composer.add_files(pictures[1:2])  # other images: what runs for the old ones is stopped
    qtbot.waitUntil(lambda: len(requested) == 5, timeout=WAIT_MS)
    assert tokens[0].cancelled and not requested[-1][3].cancelled  # type: ignore[attr-defined]


def test_sent_with_the_same_images_the_work_ahead_goes_on(qtbot, window: MainWindow, pictures: list[Path]) -> None:  # noqa: ANN001
    """Enter while the work ahead for these very images is still queued or running: that work is what the answer
    needs first, so it is finished rather than thrown away, and the answer only prefills the question."""
    release = threading.Event()
    QTimer.singleShot(0, window.engine.worker, lambda: release.wait(WAIT_MS / 1000))  # the engine thread is busy
    requested: list[object] = []
    window.engine.prepare_requested.connect(lambda *args: requested.append(args))
    records: list[PrepareRecord | None] = []
    window.engine.worker.prepared.connect(records.append)
    window.composer.add_files(pictures[:1])
    qtbot.waitUntil(lambda: bool(requested), timeout=WAIT_MS)  # the work ahead waits behind the busy thread
    answers: list[AnswerRecord] = []
    window.engine.worker.finished.connect(lambda _c, _m, r: answers.append(r))
    window.composer.edit.setPlainText("What is on the screen?")
    window.composer.submit()  # Enter before the work ahead could even start
    release.set()
    qtbot.waitUntil(lambda: bool(answers) and window.state is State.READY, timeout=WAIT_MS)
    prep = records[-1]
    assert prep is not None and not prep.cancelled and prep.positions > 65
    assert answers[-1].reused_positions >= prep.positions and answers[-1].encode_ms == 0
    system = window.services.settings.system_prompt
    assert answers[-1].token_ids == _cold_tokens(window.services.chat, pictures[:1], "What is on the screen?", system)


def test_removed_image_is_left_out(qtbot, window: MainWindow, pictures: list[Path]) -> None:  # noqa: ANN001
    prep = _wait_prepared(qtbot, window, lambda: window.composer.add_files(pictures[:2]))
    assert prep.positions > 2 * 65
    window.composer.strip.remove(0)  # sent at once, before any new background work could start
    record = _send(qtbot, window, "Describe it.")
    assert [t.sha256 for t in record.images] == [window.services.images.add(pictures[1]).sha256]
    system = window.services.settings.system_prompt
    assert record.token_ids == _cold_tokens(window.services.chat, pictures[1:2], "Describe it.", system)


def test_typing_never_waits_on_background_work(qtbot, window: MainWindow, pictures: list[Path]) -> None:  # noqa: ANN001
    """A timer probe measures the event loop's longest stall while images are encoded and prefilled behind it."""
    clock = QElapsedTimer()
    clock.start()
    last = [clock.elapsed()]
    worst = [0]

    def tick() -> None:
        now = clock.elapsed()
        worst[0] = max(worst[0], now - last[0])
        last[0] = now

    probe = QTimer()
    probe.setInterval(5)
    probe.timeout.connect(tick)
    probe.start()
    prep = _wait_prepared(qtbot, window, lambda: window.composer.add_files(pictures))
    probe.stop()
    print(
        f"longest event-loop stall during background work ({prep.encode_ms:.0f} ms encode, "
        f"{prep.prefill_ms:.0f} ms prefill): {worst[0]} ms"
    )
    assert prep.encode_ms > 0 and worst[0] < 200


def test_prepare_never_delays_an_ask(demo_bundle: Path, pictures: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """A question asked while the engine works ahead takes the engine at once and gets a cold run's tokens."""
    link_demo(demo_bundle)
    services = build_services()
    services.settings.sampling.temperature = 0.0
    services.settings.sampling.max_new_tokens = 24
    chat = services.chat
    chat.load_model(DEMO_BUNDLE_ID)
    try:
        many = []
        for i in range(8):  # enough fresh images that the background work is still encoding when the ask comes
            p = tmp_path / f"many-{i}.png"
            Image.fromarray(np.random.default_rng(100 + i).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(p)
            many.append(p)
        conv = services.store.create()
        token = CancelToken()
        result: list[PrepareRecord | None] = []
        worker = threading.Thread(target=lambda: result.append(chat.prepare(conv.id, many, token)))
        worker.start()
        while chat.queue.state.running != "preparing":
            time.sleep(0.001)
        events = list(chat.ask(conv.id, "What is it?", [pictures[0]]))
        worker.join()
        finished = [e for e in events if isinstance(e, Finished)]
        assert len(finished) == 1 and finished[0].record.token_ids
        assert token.cancelled and result[0] is not None and result[0].cancelled
        system = services.settings.system_prompt
        assert finished[0].record.token_ids == _cold_tokens(chat, pictures[:1], "What is it?", system)
    finally:
        chat.close()
        services.store.close()


def test_streamed_answer_renders_each_finished_block_once(qtbot) -> None:  # noqa: ANN001
    """Blocks before a blank line (outside code fences) are settled; the streamed answer ends as one rendering."""
    from owl_desktop.gui import markdown
    from owl_desktop.gui.chat_view import ChatView
    from owl_desktop.store.images import ImageStore

    assert markdown.settled_length("One.\n\nTwo") == len("One.\n\n")
    assert markdown.settled_length("```\ncode\n\nmore") == 0  # inside a fence nothing is settled
    assert markdown.settled_length("One.\n\n") == 0  # the blank line may still grow into the next block
    view = ChatView(ImageStore())
    qtbot.addWidget(view)
    bubble = view.begin_answer()
    text = "\n\n".join(f"Paragraph {i} with **bold** words." for i in range(6))
    for word in text.split(" "):
        view.append_text(word + " ")
        view.flush()
    assert view.streaming_text().strip() == text
    view.finish_answer(None, None)
    assert bubble.text.strip() == text and "Paragraph 5" in bubble.label.text() and "Paragraph 0" in bubble.label.text()


def test_bench_latency_runs_on_the_tiny_bundle(demo_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """`owl-desktop bench latency` end to end on the demo bundle; its structural figures (positions, not times):
    a 5-second head start leaves the ask only the question (less of it when it was typed meanwhile), and a
    conversation that overflows its context drops old turns in steps, re-prefilling more than half the context in
    fewer turns than dropping just enough, and nothing but each turn's own positions when the kept turns move up."""
    import json

    from owl_desktop.cli import main as cli_main
    from owl_desktop.engine.llm import MIN_SHIFT

    args = ["bench", "latency", "--model", str(demo_bundle), "--repeats", "1", "--turns", "12", "--n-ctx", "512"]
    assert cli_main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert "(goal <= 0.2)" in out and "saving" in out and "ratio first / steady" in out
    ask_only = figures["head_start_positions"]["5.0"]
    assert 0 < ask_only < figures["cold_positions"] - 65  # the image and the prompt before the question were ready
    typed_rest = figures["typed_positions"]["5.0"]
    assert 0 < typed_rest < ask_only  # typed during the head start, the question's finished words were ready too
    # the system prompt's share of a new chat (the same prompt as the cold question): what its cache can save at most
    system = figures["system_share"] * figures["cold_positions"]
    assert abs(system - round(system)) < 1e-6 and 0 < round(system) < figures["cold_positions"] - 65

    def big(turns: list[dict[str, float]]) -> int:
        return sum(t["new_positions"] > 256 for t in turns)

    def beyond_own(turns: list[dict[str, float]]) -> float:
        """Most positions an overflowed turn prefilled beyond its own (its question, image, previous answer)."""
        return max(t["new_positions"] - t["own_positions"] for t in turns if t["dropped_turns"] > 0)

    moved, steps, just_enough = figures["turns"], figures["turns_recomputed"], figures["turns_just_enough"]
    assert all(max(t["dropped_turns"] for t in turns) > 0 for turns in (moved, steps, just_enough))
    assert big(steps) < big(just_enough)
    # moved up in the KV cache, the kept turns are not computed again: each turn costs about its own positions
    assert any(t["shifted_positions"] > 0 for t in moved) and beyond_own(moved) < MIN_SHIFT < beyond_own(steps)
    assert figures["overflowed_own_cost_ratio"] > 0

"""`owl-desktop bench gui-stall`: the longest the window's event loop stalls (a 5 ms timer probe measures the
largest gap between its ticks) while

- the engine works ahead in the background (images attached: encode + prefill on the engine thread);
- a 500-token answer streams into the chat view at a 7B model's pace on a laptop (the view's real flush path), against
  the same stream rendered the way it was before (the whole answer re-rendered at every flush);
- a long conversation (50 turns, 20 images) is opened, then scrolled from top to bottom;
- a model download runs (a few hundred MB from a hub started here on 127.0.0.1 in a process of its own,
  devtools/hubserver.py, at the speed of loopback), with the models window open, until its bytes are in.

The window runs on a throw-away data folder, with the bundle linked into it (the demo's tiny one by default).
Goal: ≤ 50 ms each.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PySide6.QtCore import QElapsedTimer, QEventLoop, QTimer
from PySide6.QtWidgets import QApplication

PROBE_MS = 5
DOWNLOAD_MB = 300
ANSWER_WORDS = (
    "The screenshot shows a **settings dialog** with three tabs; the first one is open and lists the options for "
    "the network connection, each with a short explanation under it."
).split()


class StallProbe:
    """Measures the longest gap between ticks of a fast timer: how long the event loop could not run."""

    def __init__(self) -> None:
        self._clock = QElapsedTimer()
        self._timer = QTimer()
        self._timer.setInterval(PROBE_MS)
        self._timer.timeout.connect(self._tick)
        self._last = 0
        self.worst_ms = 0

    def __enter__(self) -> StallProbe:
        self._clock.start()
        self._last = 0
        self.worst_ms = 0
        self._timer.start()
        return self

    def _tick(self) -> None:
        now = self._clock.elapsed()
        self.worst_ms = max(self.worst_ms, now - self._last)
        self._last = now

    def __exit__(self, *exc: object) -> None:
        self._tick()
        self._timer.stop()


@dataclass
class StallFigures:
    background_prefill_ms: int
    background_work_ms: float  # how long that background work ran (encode + prefill)
    streaming_ms: int
    streaming_full_render_ms: int  # the same stream, the whole answer re-rendered at each flush
    open_long_ms: int
    open_all_ms: float  # from the click until every message and thumbnail of that conversation was in
    scroll_long_ms: int
    download_ms: int
    download_mb: float
    download_s: float  # how long that download ran

    def report(self) -> str:
        return "\n".join(
            [
                "longest event-loop stall (goal <= 50 ms each):",
                f"  background encode + prefill ({self.background_work_ms:.0f} ms of work): "
                f"{self.background_prefill_ms:5d} ms",
                f"  a 500-token answer streaming:                  {self.streaming_ms:5d} ms",
                f"    the same, whole answer re-rendered per flush: {self.streaming_full_render_ms:5d} ms"
                f"   ratio {self.streaming_ms / max(1, self.streaming_full_render_ms):.3f}",
                f"  opening a 50-turn conversation with 20 images: {self.open_long_ms:5d} ms"
                f"   (all of it in after {self.open_all_ms:.0f} ms)",
                f"  scrolling it from top to bottom:               {self.scroll_long_ms:5d} ms",
                f"  a {self.download_mb:.0f} MB model download from 127.0.0.1:         {self.download_ms:5d} ms"
                f"   ({self.download_s:.1f} s, {self.download_mb / max(self.download_s, 1e-3):.0f} MB/s)",
            ]
        )


def _wait(until: Callable[[], bool], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("the window did not get there in time")
        QApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 20)
        time.sleep(0.002)


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    _wait(lambda: time.monotonic() >= end)


def _picture(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8)  # [H, W, 3]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def run(bundle: Path, tokens_per_s: float = 25.0, download_mb: int = DOWNLOAD_MB) -> StallFigures:
    from owl_desktop.devtools.hubserver import ChildHub
    from owl_desktop.gui.main_window import MainWindow, State
    from owl_desktop.gui.services import build_services
    from owl_desktop.hub.catalog import DEFAULT_REPO
    from owl_desktop.hub.manager import ModelManager
    from owl_desktop.hub.settings import HubSettings

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory(prefix="owl-stall-") as tmp, ChildHub(DEFAULT_REPO, download_mb) as hub:
        for var, sub in (("OWL_DATA_DIR", "data"), ("OWL_CACHE_DIR", "cache"), ("OWL_CONFIG_DIR", "config")):
            os.environ[var] = str(Path(tmp) / sub)
        from owl_desktop import bundle as bundle_mod
        from owl_desktop import paths

        models = paths.ensure(paths.models_dir())
        bundle_id = bundle_mod.load(bundle, verify=False).id  # the window finds a model by id, not by folder name
        (models / bundle_id).symlink_to(bundle.resolve(), target_is_directory=True)
        services = build_services()
        services.settings.last_model_id = bundle_id
        services.models = ModelManager(settings=HubSettings(endpoint=hub.endpoint))  # never the real hub
        window = MainWindow(services)
        window.resize(1100, 760)
        window.show()
        prepared: list[object] = []
        window.engine.worker.prepared.connect(prepared.append)
        window.start()
        _wait(lambda: window.state is State.READY and bool(prepared))  # loaded and warmed up

        # 1. background work: attach three new images, the engine encodes and prefills behind the window
        from owl_desktop.gui import attachments

        pending = [attachments.from_file(_save(Path(tmp), i)) for i in range(3)]
        prepared.clear()
        t0 = time.perf_counter()
        with StallProbe() as background:
            for img in pending:
                window.composer.strip.add(img)
            _wait(lambda: any(p is not None for p in prepared))
        work_ms = (time.perf_counter() - t0) * 1000 - 300  # less the debounce
        window.composer.strip.clear()

        # 2. streaming into the chat view at a steady pace, then the old way (no incremental render) as baseline
        streaming = _stream(window, tokens_per_s, incremental=True)
        full = _stream(window, tokens_per_s, incremental=False)

        # 3. a long conversation: open it, then scroll through it
        conv_id = _long_conversation(services, Path(tmp))
        with StallProbe() as opening:
            t0 = time.perf_counter()
            window.open_conversation(conv_id)
            _wait(lambda: not window.chat.filling() and not window.chat.thumbnails_pending())
            open_all_ms = (time.perf_counter() - t0) * 1000
            _spin(0.3)
        bar = window.chat.verticalScrollBar()
        with StallProbe() as scrolling:
            bar.setValue(0)
            steps = 40
            for i in range(steps + 1):
                bar.setValue(bar.maximum() * i // steps)
                _spin(0.02)

        # 4. a model download, as from the models window's Download button
        downloading, download_s = _download(window, DEFAULT_REPO)
        window.engine.shutdown()
        window.close()
        app.processEvents()
        return StallFigures(
            background.worst_ms,
            work_ms,
            streaming,
            full,
            opening.worst_ms,
            open_all_ms,
            scrolling.worst_ms,
            downloading,
            download_mb * 2**20 / 1e6,
            download_s,
        )


def _download(window: object, repo_id: str) -> tuple[int, float]:
    """Click Download on `repo_id`'s card in the models window; the longest stall until all its bytes are in (then
    the job is cancelled), and how long the bytes took."""
    from owl_desktop.hub.progress import DownloadProgress

    models = window.show_models()  # type: ignore[attr-defined]
    _spin(0.3)
    card = models.card(repo_id)
    if card is None:
        raise RuntimeError(f"the models window has no card for {repo_id}")
    controller = window.models  # type: ignore[attr-defined]
    seen: dict[str, DownloadProgress] = {}  # the job's key → its latest report
    ended: list[str] = []
    controller.job_progress.connect(lambda k, p, _l: seen.update({k: p}) if isinstance(p, DownloadProgress) else None)
    for signal in (controller.job_done, controller.job_failed, controller.job_cancelled):
        signal.connect(lambda key, *_: None if key.startswith(("preflight:", "verify:")) else ended.append(key))

    def bytes_in() -> bool:
        return bool(ended) or any(p.total and p.done >= p.total for p in seen.values())

    with StallProbe() as probe:
        card.button.click()
        _wait(lambda: bool(seen) or bool(ended))
        t0 = time.perf_counter()
        _wait(bytes_in)
        took = time.perf_counter() - t0
    for key in seen:
        controller.cancel(key)
    _wait(lambda: bool(ended))
    models.close()
    return probe.worst_ms, took


def _save(folder: Path, seed: int) -> Path:
    path = folder / f"attached-{seed}.png"
    path.write_bytes(_picture(1000 + seed))
    return path


def _stream(window: object, tokens_per_s: float, *, incremental: bool) -> int:
    """500 tokens (words, with a paragraph break every 60) into a new answer bubble at `tokens_per_s`."""
    chat = window.chat  # type: ignore[attr-defined]
    chat.clear()
    bubble = chat.begin_answer()
    bubble.streaming = incremental  # False: every flush renders the whole answer again (the old behaviour)
    pieces = [("\n\n" if i and i % 60 == 0 else " ") + ANSWER_WORDS[i % len(ANSWER_WORDS)] for i in range(500)]
    with StallProbe() as probe:
        start = time.monotonic()
        for i, piece in enumerate(pieces):
            chat.append_text(piece)
            _wait(lambda i=i: time.monotonic() >= start + (i + 1) / tokens_per_s)
    chat.finish_answer(None, None)  # one full render at the end, not part of the stream
    return probe.worst_ms


def _long_conversation(services: object, folder: Path, turns: int = 50, images: int = 20) -> str:
    store = services.store  # type: ignore[attr-defined]
    image_store = services.images  # type: ignore[attr-defined]
    conv = store.create("A long conversation")
    answer = " ".join(ANSWER_WORDS * 4)
    every = max(1, turns // images)
    for t in range(turns):
        refs = [image_store.add(_picture(t), f"shot-{t}.png")] if t % every == 0 and t // every < images else []
        store.add_message(conv.id, "user", f"Question {t + 1}: what is in this part?", refs)
        store.add_message(conv.id, "assistant", f"**Turn {t + 1}.** {answer}", meta={"state": "done"})
    return conv.id

"""Threads: the engine worker on its own QThread, and a pool for downloads and conversions.

The GUI thread never waits on either: requests go out as queued signals, results come back as signals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QRunnable, Qt, QThread, QThreadPool, Signal, Slot

from owl_desktop.app.chat_service import ChatEvent, ChatService, Failed, Finished, Piece, Started
from owl_desktop.errors import Cancelled, OwlError
from owl_desktop.gui import gc_pauses
from owl_desktop.logs import see_the_log
from owl_desktop.tasks import CancelToken, Progress, Task

ImageSource = tuple[Path | bytes, str]  # a file or encoded bytes (a paste), and the name to keep for it


def user_message(exc: BaseException) -> str:
    """The one line a user sees for an error: ours as written, anything else without a traceback."""
    if isinstance(exc, OwlError):
        return exc.message
    if isinstance(exc, MemoryError):
        return "Out of memory. Try a smaller model or a shorter context."
    if isinstance(exc, OSError):
        return f"A file could not be read or written: {exc.strerror or exc}"
    logging.getLogger(__name__).error("unexpected error", exc_info=exc)
    return f"Something went wrong ({exc.__class__.__name__}); {see_the_log()}"


class EngineWorker(QObject):
    """Owns the ChatService's use of the model. Lives on the engine thread; every slot runs there.

    Each request (load, ask, regenerate, edit_and_resend) ends with exactly one `idle`. `stop()` is the one method
    meant for other threads: it ends the load or answer in progress, then emits `stop_requested` on the calling
    thread, so a direct connection to it runs with the stop already in force.
    """

    model_loading = Signal(str)  # model ref
    model_loaded = Signal(str, str)  # model id, device description
    model_failed = Signal(str)  # message
    model_unloaded = Signal()
    progress = Signal(object)  # tasks.Progress
    started = Signal(object, object, object)  # conversation id, user message, assistant message
    piece = Signal(str)
    stage = Signal(object)  # tasks.Progress: what a question waits on before its first token (storing, encoding…)
    finished = Signal(object, object, object)  # conversation id, message, record
    failed = Signal(object, str, bool)  # conversation id, message, whether the question was stored
    idle = Signal()  # the current request is over, whatever the outcome
    prepared = Signal(object)  # engine.pipeline.PrepareRecord of background work that ran (None: it did not run)
    stop_requested = Signal()  # stop() was called (emitted on the thread that called it, after the stop took effect)

    def __init__(self, service: ChatService) -> None:
        super().__init__()
        self._service = service
        self._load_cancel = CancelToken()
        self._ahead = CancelToken()  # the background work's (warm-up, prepare); every real request fires it first
        self.newest_prepare = 0  # set by the controller (GUI thread): the number of the newest prepare request

    @property
    def service(self) -> ChatService:
        return self._service

    # ----------------------------------------------------------- model

    @Slot(str)
    def load(self, ref: str) -> None:
        """Load, then warm the model up in the background. The objects both make (the engine's modules at the first
        load, the model's) are frozen out of full garbage collections, which are put off until then (gc_pauses):
        those walks held the GIL 20-60 ms at a time while the window waited."""
        self._load_cancel = CancelToken()
        self.model_loading.emit(ref)
        task = Task(progress=self.progress.emit, cancel=self._load_cancel)
        with gc_pauses.no_full_collections():
            try:
                self._service.load_model(ref, task=task)
            except Cancelled:
                self.model_failed.emit("Loading the model was cancelled.")
            except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the window
                self.model_failed.emit(user_message(exc))
            else:
                ahead = self._ahead = CancelToken()  # before the window hears of the model: its first ask cancels it
                if self._load_cancel.cancelled:  # a stop (or the window closing) came as the load ended: no warm-up
                    ahead.cancel()
                gc_pauses.settle()  # the load's objects, before the window hears of the model
                self.model_loaded.emit(self._service.loaded_model_id or ref, self._service.device_description)
                self.idle.emit()
                self.prepared.emit(self._service.warm_up(ahead))  # what the warm-up made is settled as the hold ends
                return
        self.idle.emit()

    @Slot()
    def unload(self) -> None:
        try:
            self._service.unload()
        finally:
            self.model_unloaded.emit()

    # ----------------------------------------------------------- chat

    @Slot(object, list, str, object, int)
    def prepare(
        self, conv_id: str | None, sources: list[ImageSource], draft: str, token: CancelToken, number: int
    ) -> None:
        """Background work while the user types (see ChatService.prepare); emits `prepared`, never `idle`. A request
        that a newer one superseded while it waited in the queue is skipped: the newer one does its work."""
        if number != self.newest_prepare:
            return
        self._ahead = token
        self.prepared.emit(self._service.prepare(conv_id, [src for src, _name in sources], token, draft))

    def cancel_ahead(self) -> None:
        """Thread-safe: stop the background work now (a real request is coming)."""
        self._ahead.cancel()

    @Slot(object, str, list, object)
    def ask(self, conv_id: str, text: str, sources: list[ImageSource], token: CancelToken) -> None:
        """`sources` go into the image store with their names kept, then the question is asked about them."""

        def events() -> Iterable[ChatEvent]:
            try:
                stored = []
                for i, (src, name) in enumerate(sources):
                    self.stage.emit(Progress("storing images", i, len(sources), "images"))
                    stored.append(self._service.images.add(src, name))
            except Exception as exc:  # noqa: BLE001 - e.g. ImageError: nothing was stored, the question returns
                self.failed.emit(conv_id, user_message(exc), False)
                return iter(())
            return self._service.ask(conv_id, text, stored, progress=self.stage.emit, token=token)

        self._run(conv_id, events)

    @Slot(object, object)
    def regenerate(self, conv_id: str, token: CancelToken) -> None:
        self._run(conv_id, lambda: self._service.regenerate(conv_id, progress=self.stage.emit, token=token))

    @Slot(object, object, str, object)
    def edit_and_resend(self, conv_id: str, user_msg_id: int, text: str, token: CancelToken) -> None:
        self._run(
            conv_id,
            lambda: self._service.edit_and_resend(conv_id, user_msg_id, text, progress=self.stage.emit, token=token),
        )

    def stop(self) -> None:
        """Thread-safe: called directly from the GUI thread while a slot runs here."""
        self._ahead.cancel()
        self._load_cancel.cancel()
        self._service.stop()
        self.stop_requested.emit()  # after the service knows: a direct connection sees a stop already in force

    def _run(self, conv_id: str, events: Callable[[], Iterable[ChatEvent]]) -> None:
        try:
            for event in events():
                match event:
                    case Piece(text):
                        self.piece.emit(text)
                    case Started(user_msg, assistant_msg):
                        self.started.emit(conv_id, user_msg, assistant_msg)
                    case Finished(message, record):
                        self.finished.emit(conv_id, message, record)
                    case Failed(message, user_msg):
                        self.failed.emit(conv_id, message, user_msg is not None)
        except Exception as exc:  # noqa: BLE001 - a failure is a message, never a traceback
            self.failed.emit(conv_id, user_message(exc), False)
        finally:
            self.idle.emit()


class EngineHost(QObject):
    """Starts the engine thread and forwards requests to the worker as queued signals."""

    load_requested = Signal(str)
    # each with the request's cancel token, made here as the user sends (a Stop before the engine thread takes the
    # request up cancels it too)
    ask_requested = Signal(object, str, list, object)
    regenerate_requested = Signal(object, object)
    edit_requested = Signal(object, object, str, object)
    unload_requested = Signal()
    prepare_requested = Signal(object, list, str, object, int)

    def __init__(self, service: ChatService, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.thread = QThread()
        self.thread.setObjectName("owl-engine")
        self.worker = EngineWorker(service)
        self.worker.moveToThread(self.thread)
        self.load_requested.connect(self.worker.load)
        self.ask_requested.connect(self.worker.ask)
        self.regenerate_requested.connect(self.worker.regenerate)
        self.edit_requested.connect(self.worker.edit_and_resend)
        self.unload_requested.connect(self.worker.unload)
        self.prepare_requested.connect(self.worker.prepare)
        self._ahead = CancelToken()  # the last prepare request's
        self._ahead_for: tuple[str | None, list[object]] | None = None  # its (conversation, image sources)
        self.worker.idle.connect(self._on_idle)
        self._pending = 0  # requests sent and not yet answered by `idle` (each request ends with exactly one)
        self.thread.start()

    @property
    def busy(self) -> bool:
        """True from a request until its own `idle`. A count, not a flag: the `idle` of a model load can arrive
        after the next question was sent (the window is ready at `model_loaded`, which comes first), and must not
        make that question look finished, or Stop would be ignored."""
        return self._pending > 0

    def prepare(self, conv_id: str | None, sources: list[ImageSource], draft: str = "") -> None:
        """Work ahead for the next question, with its `draft` typed so far (replaces the previous background work; a
        warm-up after a load goes on first); the window never waits on it.

        When only the draft changed (same conversation, same images), the work ahead that runs goes on: stopping it
        at every word typed would throw away a half-computed batch (an image's 65 rows take seconds on a CPU) again
        and again. The new request runs after it and prefills only the new words."""
        target = (conv_id, [src for src, _name in sources])
        if target != self._ahead_for or self._ahead.cancelled:
            self._ahead.cancel()
            self._ahead = CancelToken()
        self._ahead_for = target
        self.worker.newest_prepare += 1
        self.prepare_requested.emit(conv_id, list(sources), draft, self._ahead, self.worker.newest_prepare)

    def continues_ahead(self, conv_id: str | None, sources: list[ImageSource]) -> bool:
        """Whether a question in `conv_id` (None: a new chat) with these images is what the last prepare() worked
        for, with no other request since."""
        return self._ahead_for == (conv_id, [src for src, _name in sources])

    def _cancel_ahead(self) -> None:
        self._ahead_for = None
        self._ahead.cancel()
        self.worker.cancel_ahead()  # the warm-up after a load has the worker's own token

    def load(self, ref: str) -> None:
        self._cancel_ahead()
        self._pending += 1
        self.load_requested.emit(ref)

    def ask(self, conv_id: str, text: str, sources: list[ImageSource], *, continues_ahead: bool = False) -> None:
        """`continues_ahead` (see continues_ahead(), asked before a new chat got its id): what the last prepare()
        still computes is what the answer needs first, so it goes on (the answer waits for nothing it would not
        compute itself) instead of being thrown away half-way through a batch."""
        if continues_ahead:
            self._ahead_for = None  # used up: the next question needs its own work ahead
        else:
            self._cancel_ahead()
        self._pending += 1
        self.ask_requested.emit(conv_id, text, sources, self.worker.service.request_token())

    def regenerate(self, conv_id: str) -> None:
        self._cancel_ahead()
        self._pending += 1
        self.regenerate_requested.emit(conv_id, self.worker.service.request_token())

    def edit_and_resend(self, conv_id: str, user_msg_id: int, text: str) -> None:
        self._cancel_ahead()
        self._pending += 1
        self.edit_requested.emit(conv_id, user_msg_id, text, self.worker.service.request_token())

    def stop(self) -> None:
        self.worker.stop()

    def _on_idle(self) -> None:
        self._pending = max(0, self._pending - 1)

    def shutdown(self, timeout_ms: int = 30_000) -> bool:
        """Stop what runs, free the model on its own thread, end the thread. True when it ended in time."""
        ended = True
        if self.thread.isRunning():
            self.worker.stop()  # the answer ends within a token; the service saves what was written
            self.thread.quit()  # the event loop ends once the current request returns
            ended = bool(self.thread.wait(timeout_ms))
        if ended:
            self.worker.service.close()  # the engine thread is gone: free the model here
        return ended


# ------------------------------------------------------------------ background tasks


class TaskHandle(QObject):
    """One background job: progress, result, error; `cancel()` from the GUI thread.

    The public signals are emitted on the GUI thread only. The pool thread reports through `_report`, whose one
    connection (made here, before the job starts) queues each report to the GUI thread; so a caller may connect
    to the public signals right after `TaskRunner.start()`, even for a job that ends at once, and no signal is
    connected on one thread while another thread emits it.
    """

    progress = Signal(object)  # tasks.Progress (at most ~10 per second, plus every stage change)
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    ended = Signal()  # after any of the three above

    _report = Signal(str, object)  # (kind, payload) from the pool thread

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.token = CancelToken()
        self.running = True  # read and written on the GUI thread only
        self._report.connect(self._deliver, Qt.ConnectionType.QueuedConnection)

    def cancel(self) -> None:
        self.token.cancel()

    @Slot(str, object)
    def _deliver(self, kind: str, payload: Any) -> None:
        if not self.running:
            return
        if kind == "progress":
            self.progress.emit(payload)
            return
        self.running = False
        if kind == "succeeded":
            self.succeeded.emit(payload)
        elif kind == "failed":
            self.failed.emit(str(payload))
        else:
            self.cancelled.emit()
        self.ended.emit()


class _Runnable(QRunnable):
    def __init__(self, fn: Callable[[Task], Any], handle: TaskHandle) -> None:
        super().__init__()
        self.setAutoDelete(True)
        self._fn = fn
        self._handle = handle
        self._last_emit = 0.0
        self._last_stage = ""
        self._lock = threading.Lock()

    def _progress(self, p: Progress) -> None:
        now = time.monotonic()
        with self._lock:
            final = p.total is not None and p.done >= p.total
            if p.stage == self._last_stage and now - self._last_emit < 0.1 and not final:
                return
            self._last_emit, self._last_stage = now, p.stage
        self._handle._report.emit("progress", p)

    def run(self) -> None:
        report = self._handle._report
        try:
            if self._handle.token.cancelled:
                raise Cancelled()
            result = self._fn(Task(progress=self._progress, cancel=self._handle.token))
        except Cancelled:
            report.emit("cancelled", None)
        except Exception as exc:  # noqa: BLE001 - reported as a message in the window
            report.emit("failed", user_message(exc))
        else:
            report.emit("succeeded", result)


class TaskRunner(QObject):
    """Downloads, conversions, preflights: run in thread pools with the tasks.Task progress/cancel contract.

    Two lanes: `quick` jobs (fit estimates for badges, answered from the disk) have their own pool, so they never
    wait behind downloads and conversions, and a job the user started never waits behind them.
    """

    def __init__(self, parent: QObject | None = None, max_threads: int = 3, quick_threads: int = 2) -> None:
        super().__init__(parent)
        self.pool = QThreadPool()
        self.pool.setMaxThreadCount(max_threads)
        self.quick_pool = QThreadPool()
        self.quick_pool.setMaxThreadCount(quick_threads)
        self._handles: list[TaskHandle] = []

    def start(self, name: str, fn: Callable[[Task], Any], *, quick: bool = False) -> TaskHandle:
        handle = TaskHandle(name)
        self._handles.append(handle)
        handle.ended.connect(lambda h=handle: self._forget(h))
        (self.quick_pool if quick else self.pool).start(_Runnable(fn, handle))
        return handle

    def _forget(self, handle: TaskHandle) -> None:
        self._handles = [h for h in self._handles if h is not handle]

    def running(self) -> list[TaskHandle]:
        return [h for h in self._handles if h.running]

    def find(self, name: str) -> TaskHandle | None:
        return next((h for h in self._handles if h.name == name and h.running), None)

    def shutdown(self, timeout_ms: int = 30_000) -> bool:
        """Cancel every job and wait for them to end (partial downloads stay resumable)."""
        for handle in list(self._handles):
            handle.cancel()
        deadline = time.monotonic() + timeout_ms / 1000
        done = bool(self.pool.waitForDone(timeout_ms))
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))
        return bool(self.quick_pool.waitForDone(left_ms)) and done

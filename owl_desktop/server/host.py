"""Where the server's model comes from: anything with a pipeline, an engine queue and sampling defaults.

In the app that is the window's ChatService (one engine, one queue: the window and API clients take turns); for
`owl-desktop serve` it is a `StandaloneModel` loaded here. The pipeline may only be used while holding a turn of
the queue: whoever loads or unloads a model holds one too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from owl_desktop.app.engine_queue import EngineQueue
from owl_desktop.errors import OwlError
from owl_desktop.tasks import CancelToken

if TYPE_CHECKING:
    from owl_desktop.engine.options import Sampling
    from owl_desktop.engine.pipeline import ChatPipeline, EngineSettings

log = logging.getLogger(__name__)


class ModelHost(Protocol):
    @property
    def queue(self) -> EngineQueue: ...

    @property
    def pipeline(self) -> ChatPipeline | None: ...

    @property
    def loading(self) -> bool: ...

    def default_sampling(self) -> Sampling: ...


class StandaloneModel:
    """One bundle loaded for the headless server, on a background thread so the port answers 503 meanwhile."""

    def __init__(
        self, ref: str | Path, settings: EngineSettings, sampling: Sampling, queue: EngineQueue | None = None
    ) -> None:
        self.ref = ref
        self.settings = settings
        self._sampling = sampling
        self._queue = queue or EngineQueue()
        self._pipeline: ChatPipeline | None = None
        self._loading = False
        self.error: OwlError | None = None

    @property
    def queue(self) -> EngineQueue:
        return self._queue

    @property
    def pipeline(self) -> ChatPipeline | None:
        return self._pipeline

    @property
    def loading(self) -> bool:
        return self._loading

    def default_sampling(self) -> Sampling:
        return self._sampling

    def load(self) -> str:
        """Load the bundle (blocking); returns its id. Raises OwlError."""
        from owl_desktop.engine.pipeline import ChatPipeline

        self._loading = True
        try:
            with self._queue.enter("loading", bounded=False):
                self._pipeline = ChatPipeline.open(self.ref, self.settings)
                return self._pipeline.bundle.id
        finally:
            self._loading = False

    def warm_up(self) -> None:
        """After a load, while no request came yet: the vision tower's first run and the default system prompt's KV
        (engine/pipeline.py); the first request preempts it at once."""
        token = CancelToken()
        turn = self._queue.enter_if_idle("warming up", token.cancel)
        if turn is None:
            return
        try:
            if self._pipeline is not None:
                self._pipeline.warm_up(cancel=token)
        except Exception:  # noqa: BLE001 - background work: a failure here only costs speed
            log.exception("warming the model up failed")
        finally:
            turn.leave()

    def load_in_background(self, done: Callable[[str | None, OwlError | None], None]) -> threading.Thread:
        """Start loading; `done(model_id, None)` or `done(None, error)` is called from the loading thread."""
        self._loading = True  # at once: requests arriving before the thread runs get 503, not "no model"

        def run() -> None:
            try:
                model_id = self.load()
            except OwlError as exc:
                self.error = exc
                done(None, exc)
                return
            except Exception as exc:  # noqa: BLE001 - reported as a failed load, not a dead thread
                log.exception("loading the model failed")
                self.error = OwlError(f"loading the model failed: {exc}")
                done(None, self.error)
                return
            done(model_id, None)
            self.warm_up()

        thread = threading.Thread(target=run, name="owl-model-load", daemon=True)
        thread.start()
        return thread

    def close(self, timeout: float = 30.0) -> None:
        """Wait for the running request to end (the server cancels it first), then free the model."""
        turn = self._queue.enter("closing", bounded=False)
        try:
            if turn.wait(timeout) and self._pipeline is not None:
                self._pipeline.close()
                self._pipeline = None
        finally:
            turn.leave()

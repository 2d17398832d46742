"""One generation for one HTTP request, on its own thread: wait for the engine, build the prompt, stream, end.

The request handler (on the event loop) reads the job's events: `Ready` once the prompt is built and the images
encoded (errors before it are plain HTTP errors), then `Piece`s, then `Done` (or `Failed`). `cancel()` from the event
loop ends the job within one token wherever it is: still waiting in the queue (it leaves without running), reading
and encoding images, prefilling or generating. Each job has its own cancel token, handed to the engine with its
request, so one client going away never stops another client's answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from owl_desktop.app.engine_queue import API_REQUEST
from owl_desktop.errors import Cancelled, OwlError
from owl_desktop.server.errors import INTERNAL, ApiError, from_owl_error
from owl_desktop.server.host import ModelHost
from owl_desktop.server.requests import ApiImage, ChatRequest
from owl_desktop.tasks import CancelToken

if TYPE_CHECKING:
    from owl_desktop.engine.pipeline import AnswerRecord, AnswerStream, ChatPipeline, ImageSource

log = logging.getLogger(__name__)

_ids = itertools.count(1)
CANCELLED = 499  # nginx's "client closed request": only ever in the log, nobody is left to read it


@dataclass
class JobResult:
    text: str
    finish_reason: str  # "stop" (end of answer, or a stop string) | "length" (token limit or context full)
    record: AnswerRecord
    model: str
    queued_ms: float  # waiting for the engine

    @property
    def completion_tokens(self) -> int:
        return len(self.record.token_ids)

    @property
    def prompt_tokens(self) -> int:
        return self.record.context_used - self.completion_tokens

    @property
    def cached_tokens(self) -> int:
        return self.record.reused_positions

    @property
    def decode_ms(self) -> float:
        tps = self.record.decode_tokens_per_s
        return self.completion_tokens / tps * 1000 if tps > 0 else 0.0


@dataclass(frozen=True)
class Ready:
    model: str


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Done:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Ready | Piece | Done | Failed


class Job:
    """Create on the event loop, `start()`, then `await next()` until Done or Failed."""

    def __init__(self, host: ModelHost, request: ChatRequest, label: str = API_REQUEST) -> None:
        self.id = next(_ids)
        self.host = host
        self.request = request
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._token = CancelToken()
        self._turn = host.queue.enter(label)  # QueueFull when the queue is full
        self._started = time.perf_counter()
        self._finished = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"owl-api-job-{self.id}", daemon=True).start()

    async def next(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        """End the job within one token (any thread; a no-op once it ended)."""
        self._token.cancel()
        if self._turn.withdraw():  # it was still waiting: it leaves without running
            self._post(Failed(ApiError(CANCELLED, "cancelled")))

    @property
    def finished(self) -> bool:
        """The worker is done and the engine's turn given back."""
        return self._finished.is_set()

    # ---------------------------------------------------------------- worker thread

    def _post(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shut down): nobody reads any more
            self._token.cancel()

    def _run(self) -> None:
        try:
            if self._turn.wait():  # False: withdrawn before its go (cancel() posted the event)
                self._post(self._outcome())
        finally:
            self._finished.set()

    def _outcome(self) -> Done | Failed:
        try:
            return Done(self._generate())
        except ApiError as exc:
            return Failed(exc)
        except Cancelled:
            return Failed(ApiError(CANCELLED, "cancelled"))
        except OwlError as exc:
            err = from_owl_error(exc)
            if err.status >= 500:
                log.error("job %d failed: %s", self.id, exc.message)
            return Failed(err)
        except Exception:  # noqa: BLE001 - the client gets a plain 500, the log gets the traceback
            log.exception("job %d failed", self.id)
            return Failed(ApiError(500, INTERNAL))

    def _generate(self) -> JobResult:
        queued_ms = (time.perf_counter() - self._started) * 1000
        try:
            pipe = self.host.pipeline
            if pipe is None:
                raise ApiError(503, "no model is loaded", headers={"Retry-After": "5"})
            if self.request.model not in (None, "", pipe.bundle.id):
                raise ApiError(404, f"model '{self.request.model}' is not loaded", code="model_not_found")
            stream = self._ask(pipe)
            self._post(Ready(pipe.bundle.id))
            text = self._relay(stream)
            record = stream.record
            log.info(
                "job %d: %s, %d prompt positions (%d reused), %d tokens, %.0f ms",
                self.id,
                record.stop_reason,
                record.context_used - len(record.token_ids),
                record.reused_positions,
                len(record.token_ids),
                (time.perf_counter() - self._started) * 1000,
            )
        finally:
            self._turn.leave()  # the next request may start now
        if record.stop_reason == "cancelled":
            raise Cancelled()
        finish = "stop" if record.stop_reason in ("eos", "stop") else "length"
        return JobResult(text, finish, record, pipe.bundle.id, queued_ms)

    def _ask(self, pipe: ChatPipeline) -> AnswerStream:
        """Decode the new images, encode them, build the prompt (every turn kept, or ContextFull)."""
        from owl_desktop.engine.pipeline import HistoryTurn

        turns = self.request.turns
        history = [HistoryTurn(self._sources(t.images), t.question, t.answer or "") for t in turns[:-1]]
        return pipe.ask(
            self._sources(turns[-1].images),
            turns[-1].question,
            history,
            sampling=self.request.sampling,
            system=self.request.system,
            cancel=self._token,
            drop_old_turns=False,
            stop=self.request.stop,
        )

    def _relay(self, stream: AnswerStream) -> str:
        """Post the answer's pieces as they come; the text sent."""
        sent: list[str] = []
        for piece in stream:
            sent.append(piece)
            self._post(Piece(piece))
        return "".join(sent)

    def _sources(self, images: tuple[ApiImage, ...]) -> list[ImageSource]:
        """Each image as the pipeline takes it: its bytes with its place in the request as the name, so a broken one
        names its place. Not decoded here: the pipeline decodes only what it has not encoded before, and a UReader
        model must crop the image itself (a 224×224 stretch made here would be refused)."""
        return [(img.data, img.label) for img in images]

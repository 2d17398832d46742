"""One generation for one HTTP request, on its own thread: wait for the engine, build the prompt, stream, end.

The request handler (on the event loop) reads the job's events: `Ready` once the prompt is built and the images
encoded (errors before it are plain HTTP errors), then `Piece`s, then `Done` (or `Failed`). `cancel()` from the event
loop ends the job within one token wherever it is: still waiting in the queue (it leaves without running), building
the prompt, or generating. A cancel only ever reaches the engine while this job holds the engine's turn, so one
client going away never stops another client's answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from owl_desktop.errors import OwlError
from owl_desktop.server.errors import INTERNAL, ApiError, from_owl_error
from owl_desktop.server.host import ModelHost
from owl_desktop.server.requests import ApiImage, ChatRequest

if TYPE_CHECKING:
    from owl_desktop.engine.pipeline import AnswerRecord, AnswerStream, ChatPipeline, ImageSource

log = logging.getLogger(__name__)

_ids = itertools.count(1)


@dataclass
class JobResult:
    text: str
    finish_reason: str  # "stop" (end of answer or a stop string) | "length" (token limit or context full)
    record: AnswerRecord
    model: str
    queued_ms: float  # waiting for the engine
    build_ms: float  # decoding new images, encoding them, building the prompt
    total_ms: float  # from the job's start to its end

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
    def encode_ms(self) -> float:
        return sum(t.encode_ms for t in self.record.images)

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


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back only what could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string ended the answer)."""
        if not self.stops:
            return piece, False
        buf = self._held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)

    def ms(self, since: float | None = None) -> float:
        return (time.perf_counter() - (self.start if since is None else since)) * 1000


class Job:
    """Create on the event loop, `start()`, then `await next()` until Done or Failed."""

    def __init__(self, host: ModelHost, request: ChatRequest, label: str = "API request") -> None:
        self.id = next(_ids)
        self.host = host
        self.request = request
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._pipe: ChatPipeline | None = None  # set while this job holds the engine's turn
        self._turn = host.queue.enter(label)  # QueueFull when the queue is full
        self._clock = _Clock()
        self._finished = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"owl-api-job-{self.id}", daemon=True).start()

    async def next(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        """End the job within one token (any thread; a no-op once it ended)."""
        self._cancel.set()
        if self._turn.withdraw():
            self._post(Failed(ApiError(499, "cancelled")))
            return
        with self._lock:
            if self._pipe is not None:
                self._pipe.cancel()

    @property
    def finished(self) -> bool:
        """The worker is done and the engine's turn given back."""
        return self._finished.is_set()

    # ---------------------------------------------------------------- worker thread

    def _post(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shut down): nobody reads any more
            self._cancel.set()

    def _run(self) -> None:
        try:
            self._work()
        finally:
            self._finished.set()

    def _work(self) -> None:
        if not self._turn.wait():
            return  # withdrawn before its go; cancel() posted the event
        queued_ms = self._clock.ms()
        try:
            result = self._generate(queued_ms)
        except ApiError as exc:
            self._post(Failed(exc))
        except OwlError as exc:
            err = from_owl_error(exc)
            if err.status >= 500:
                log.error("job %d failed: %s", self.id, exc.message)
            self._post(Failed(err))
        except Exception:  # noqa: BLE001 - the client gets a plain 500, the log gets the traceback
            log.exception("job %d failed", self.id)
            self._post(Failed(ApiError(500, INTERNAL)))
        else:
            self._post(Done(result))

    def _generate(self, queued_ms: float) -> JobResult:
        try:
            pipe = self._claim()
            t_build = time.perf_counter()
            stream = self._ask(pipe)
            build_ms = self._clock.ms(t_build)
            self._post(Ready(pipe.bundle.id))
            text, by_stop_string = self._relay(stream) if not self._cancel.is_set() else ("", False)
            record = stream.record
            if self._cancel.is_set() and not by_stop_string:
                record.stop_reason = "cancelled"
            log.info(
                "job %d: %s, %d prompt positions (%d reused), %d tokens, %.0f ms",
                self.id,
                "stop string" if by_stop_string else record.stop_reason,
                record.context_used - len(record.token_ids),
                record.reused_positions,
                len(record.token_ids),
                self._clock.ms(),
            )
        finally:
            with self._lock:
                self._pipe = None
            self._turn.leave()  # the next request may start now
        if record.stop_reason == "cancelled" and not by_stop_string:
            raise ApiError(499, "cancelled")
        finish = "stop" if by_stop_string or record.stop_reason == "eos" else "length"
        return JobResult(text, finish, record, pipe.bundle.id, queued_ms, build_ms, self._clock.ms())

    def _claim(self) -> ChatPipeline:
        """The loaded pipeline, now this job's to use (and to cancel) until it leaves the turn."""
        pipe = self.host.pipeline
        if pipe is None:
            raise ApiError(503, "no model is loaded", headers={"Retry-After": "5"})
        if self.request.model not in (None, "", pipe.bundle.id):
            raise ApiError(404, f"model '{self.request.model}' is not loaded", code="model_not_found")
        with self._lock:
            self._pipe = pipe
        if self._cancel.is_set():
            raise ApiError(499, "cancelled")
        return pipe

    def _ask(self, pipe: ChatPipeline) -> AnswerStream:
        """Decode the new images, encode them, build the prompt (every turn kept, or ContextFull)."""
        from owl_desktop.engine.pipeline import HistoryTurn

        turns = self.request.turns
        history = [HistoryTurn(self._sources(pipe, t.images), t.question, t.answer or "") for t in turns[:-1]]
        return pipe.ask(
            self._sources(pipe, turns[-1].images),
            turns[-1].question,
            history,
            sampling=self.request.sampling,
            system=self.request.system,
            drop_old_turns=False,
        )

    def _relay(self, stream: AnswerStream) -> tuple[str, bool]:
        """Post the answer's pieces, cut at a stop string; (text sent, whether a stop string ended it)."""
        matcher = StopMatcher(self.request.stop)
        sent: list[str] = []
        stopped = False
        for piece in stream:
            if self._cancel.is_set() or stopped:
                stream.cancel()  # the stream ends within one token; what comes meanwhile is not sent
                continue
            out, stopped = matcher.feed(piece)
            if out:
                sent.append(out)
                self._post(Piece(out))
        if not stopped and not self._cancel.is_set():
            tail = matcher.flush()
            if tail:
                sent.append(tail)
                self._post(Piece(tail))
        return "".join(sent), stopped

    def _sources(self, pipe: ChatPipeline, images: tuple[ApiImage, ...]) -> list[ImageSource]:
        """Each image as the pipeline takes it: new ones decoded here, so a broken one names its place."""
        from owl_desktop.engine.preprocess import preprocess

        return [img.data if pipe.has_encoding(img.sha256) else preprocess(img.data, img.label) for img in images]

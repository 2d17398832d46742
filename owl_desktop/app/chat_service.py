"""Chat use cases without Qt: a conversation in the store → a streamed answer from the loaded model → the store.

The GUI's engine worker (one thread) drives these blocking generators and forwards their events as signals:

    for event in service.ask(conv_id, "What differs?", [path_a, png_bytes]):
        match event:
            case Started(user_msg, assistant_msg): ...   # both are in the store now
            case Piece(text): ...                        # a bit more of the answer
            case Finished(message, record): ...          # the saved answer (message.stopped after Stop)
            case Failed(message): ...                    # a one-line reason; re-read store.messages(conv_id)

`stop()` may be called from any thread; the answer ends within one token and what was written is kept, marked
stopped. The model is used through an EngineQueue shared with the local API server: an answer (or a model load)
waits while an API request holds the engine, and API requests wait while the window answers.

Errors never escape as exceptions and never lose the conversation: a bad image fails before anything is stored; a
failure after the question is stored keeps it (regenerate() retries it) and keeps any partial answer.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from owl_desktop import bundle as bundle_mod
from owl_desktop.app.engine_queue import API_REQUEST, WINDOW, EngineQueue, Turn
from owl_desktop.app.settings import Settings
from owl_desktop.bundle import InstalledModel
from owl_desktop.errors import Cancelled, EngineError, OwlError
from owl_desktop.logs import see_the_log
from owl_desktop.store.conversations import ConversationStore, ImageRef, Message, StoreError, qa_pairs
from owl_desktop.store.images import ImageStore, StoredImage
from owl_desktop.tasks import CancelToken, Progress, ProgressCallback

if TYPE_CHECKING:
    from owl_desktop.engine.options import Sampling
    from owl_desktop.engine.pipeline import (
        AnswerRecord,
        AnswerStream,
        ChatPipeline,
        HashedImage,
        HistoryTurn,
        PrepareRecord,
    )
    from owl_desktop.tasks import Task

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 1.0  # the partial answer is written to the store at most this often while streaming
NO_MODEL = "No model is loaded: download or import one in the model manager, or try the demo model."
BUSY = "An answer is already being written; stop it or wait for it to finish."
LOAD_WAITED_FOR = (
    "The model was not changed: the engine is still busy with {holder}. Try again when it has finished, or turn "
    "the local API server off in Settings."
)
STOPPED_WAITING = "Stopped while waiting for the model, which was answering another program's request."
WAIT_FOR_ENGINE_S = 30.0  # a model load waits this long for the answer or API request using the engine

ImageInput = Path | str | bytes | StoredImage | ImageRef
"""A file path, encoded image bytes (e.g. a paste), or an image already in the ImageStore."""


# ---------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Started:
    """The question and an empty answer are stored; pieces of the answer follow."""

    user_msg: Message
    assistant_msg: Message


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    """The answer is complete (or stopped: `message.stopped`) and saved with its meta."""

    message: Message
    record: AnswerRecord


@dataclass(frozen=True)
class Failed:
    """A one-line reason for the user. `user_msg`: the stored question (None if nothing was stored);
    `partial`: the answer kept when the failure came mid-answer (None if there was nothing to keep)."""

    message: str
    user_msg: Message | None = None
    partial: Message | None = None


ChatEvent = Started | Piece | Finished | Failed


def installed_models(root: Path | None = None) -> list[InstalledModel]:
    """Complete bundles in the models dir (every file present with its size); reads manifests only, hashes nothing."""
    return [m for m in bundle_mod.scan(root) if m.ok]


# ---------------------------------------------------------------------------------------------------- service


class ChatService:
    """Owns at most one loaded ChatPipeline and answers questions of stored conversations with it."""

    def __init__(
        self,
        store: ConversationStore,
        images: ImageStore,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        queue: EngineQueue | None = None,
    ) -> None:
        self.store = store
        self.images = images
        self.settings = settings
        self._clock = clock
        self._pipeline: ChatPipeline | None = None
        self.queue = queue or EngineQueue()  # one user of the engine at a time: the window, a load or an API request
        self._turn: Turn | None = None  # the window's place in the queue while one of its use cases runs or waits
        self._loading = False
        self._cancel = CancelToken()  # the running use case's; stop() fires it, whatever stage the answer is in
        self._progress: ProgressCallback | None = None  # the running use case's listener for its stages
        # every use case asked for and not yet over (a Stop must also reach one that has not started running)
        self._live: weakref.WeakSet[CancelToken] = weakref.WeakSet()
        interrupted = store.mark_interrupted()
        if interrupted:
            log.warning("%d answer(s) were interrupted by the end of an earlier run; marked as such", len(interrupted))

    # ------------------------------------------------------------------ model

    def load_model(self, ref: str | Path, task: Task | None = None) -> str:
        """Load a bundle (installed id or folder) with the current engine settings; returns its id.

        The previous model is unloaded first. Raises OwlError (BundleError, EngineError…) on failure.
        """
        if task is not None:
            task.check()  # stopped before it began (e.g. the window closed): not even the engine's import
        from owl_desktop.engine.pipeline import ChatPipeline

        turn = self.queue.enter("loading the model", bounded=False)
        try:
            deadline = time.monotonic() + WAIT_FOR_ENGINE_S
            while not turn.wait(0.05):  # an answer or another program's request holds the engine: wait, unless stopped
                if task is not None:
                    task.check()
                if time.monotonic() > deadline:
                    holder = self.queue.state.running
                    if holder in (None, WINDOW):
                        raise EngineError(BUSY)
                    who = "another program's request to the local API server" if holder == API_REQUEST else holder
                    raise EngineError(LOAD_WAITED_FOR.format(holder=who))
            self._loading = True
            if task is not None:
                task.check()
            self._unload_locked()
            self._pipeline = ChatPipeline.open(ref, self.settings.to_engine_settings(), task)
            self.settings.last_model_id = self._pipeline.bundle.id
            return self._pipeline.bundle.id
        finally:
            self._loading = False
            turn.leave()

    def unload(self) -> None:
        self.stop()
        with self.queue.enter("unloading the model", bounded=False):
            self._unload_locked()

    def _unload_locked(self) -> None:
        pipe, self._pipeline = self._pipeline, None
        if pipe is not None:
            pipe.close()

    @property
    def loaded_model_id(self) -> str | None:
        pipe = self._pipeline
        return pipe.bundle.id if pipe is not None else None

    @property
    def pipeline(self) -> ChatPipeline | None:
        """The loaded model; use it only while holding a turn of `queue`."""
        return self._pipeline

    @property
    def loading(self) -> bool:
        return self._loading

    def default_sampling(self) -> Sampling:
        """The sampling the settings give a new answer (the API server's defaults too)."""
        return self.settings.to_sampling()

    @property
    def device_description(self) -> str:
        """e.g. "vision: cpu, bf16 · LLM: CPU zen4, 8 threads · context 2048", or "" with no model."""
        pipe = self._pipeline
        if pipe is None:
            return ""
        llm = pipe.llm
        return f"vision: {pipe.vision.description} · LLM: {llm.device}, {llm.threads} threads · context {llm.n_ctx}"

    def installed_models(self) -> list[InstalledModel]:
        return installed_models()

    def delete_conversation(self, conv_id: str) -> int:
        """Delete a conversation with the images, thumbnails and cached encodes nothing else uses; returns how many
        images were removed."""
        from owl_desktop.engine import encode_cache

        orphans = self.store.delete(conv_id)
        removed = sum(self.images.remove(sha) for sha in orphans)
        encode_cache.forget(orphans)
        return removed

    def close(self) -> None:
        """Stop any answer, wait for it to end, and free the model."""
        self.stop()
        turn = self.queue.enter("closing", bounded=False)
        try:
            if turn.wait(WAIT_FOR_ENGINE_S):
                self._unload_locked()
        finally:
            turn.leave()

    # ------------------------------------------------------------------ use cases

    def stop(self) -> None:
        """End the answer being written (thread-safe): reading images, encoding, prefilling or generating all stop
        within a few hundred milliseconds; what was written is kept. A use case asked for but not yet running (or
        waiting for the engine) is stopped too. An API request using the engine goes on: the window's tokens are its
        own."""
        for token in list(self._live):
            token.cancel()
        self._cancel.cancel()

    def prepare(
        self, conv_id: str | None, image_sources: Sequence[Path | bytes], cancel: CancelToken, draft: str = ""
    ) -> PrepareRecord | None:
        """Work ahead while the user types: encode the attached images and prefill the conversation's prompt up to
        the question (a new conversation: the system prompt), and the whole words of its `draft` so far. Runs only
        while nobody else uses the engine and stops at once (within one vision layer or graph node) when anyone asks
        for it, or when `cancel` fires; returns None when it did not run. Never raises: background work that fails is
        only logged."""

        def work(pipe: ChatPipeline) -> PrepareRecord:
            history: list[HistoryTurn] = []
            system = self.settings.system_prompt
            if conv_id is not None:
                conv = self.store.get(conv_id)
                system = conv.system_prompt if conv.system_prompt is not None else system
                history = self._history(conv_id)
            room = self.settings.to_sampling().max_new_tokens  # the answer's room decides which old turns fit
            return pipe.prepare(
                list(image_sources), history, system=system, cancel=cancel, max_new_tokens=room, draft=draft
            )

        return self._in_background("preparing", cancel, work)

    def warm_up(self, cancel: CancelToken) -> PrepareRecord | None:
        """Right after a load, in the background: the vision tower's first (slow) run, and the system prompt's KV, so
        the first question after a load costs what later ones cost. Yields to anyone at once, like prepare()."""
        return self._in_background("warming up", cancel, lambda pipe: pipe.warm_up(self.settings.system_prompt, cancel))

    def _in_background(
        self, label: str, cancel: CancelToken, work: Callable[[ChatPipeline], PrepareRecord]
    ) -> PrepareRecord | None:
        """Run `work` on the loaded pipeline only while nobody else uses the engine (anyone who asks for it fires
        `cancel`); None when it did not run or failed (logged: background work must never take the window down)."""
        if cancel.cancelled or self._pipeline is None:
            return None
        turn = self.queue.enter_if_idle(label, cancel.cancel)
        if turn is None:
            return None
        try:
            pipe = self._pipeline
            if pipe is None or cancel.cancelled:
                return None
            return work(pipe)
        except OwlError as exc:
            log.info("%s did not work out: %s", label, exc.message)
            return None
        except Exception:  # noqa: BLE001 - background work must never take the window down
            log.exception("%s failed", label)
            return None
        finally:
            turn.leave()

    @property
    def busy(self) -> bool:
        """One of the window's use cases (or a model load) runs or waits for the engine."""
        return self._turn is not None or self._loading

    def ask(
        self,
        conv_id: str,
        text: str,
        image_sources: Sequence[ImageInput] = (),
        progress: ProgressCallback | None = None,
        token: CancelToken | None = None,
    ) -> Iterator[ChatEvent]:
        """Store the images and the question, then stream the answer. `progress` hears the stages before the first
        token: "storing images" and "encoding images" (done of total), then "reading the conversation".
        `token`: from request_token() when the request was made (default: a new one now)."""
        return self._exclusive(token or self.request_token(), lambda: self._ask(conv_id, text, image_sources), progress)

    def regenerate(
        self, conv_id: str, progress: ProgressCallback | None = None, token: CancelToken | None = None
    ) -> Iterator[ChatEvent]:
        """Replace the last answer with a new one (fresh seed); with an unanswered last question, answer it."""
        return self._exclusive(token or self.request_token(), lambda: self._regenerate(conv_id), progress)

    def edit_and_resend(
        self,
        conv_id: str,
        user_msg_id: int,
        new_text: str,
        progress: ProgressCallback | None = None,
        token: CancelToken | None = None,
    ) -> Iterator[ChatEvent]:
        """Change a question's text (its images stay), drop everything after it, and answer it again."""
        return self._exclusive(
            token or self.request_token(), lambda: self._edit_and_resend(conv_id, user_msg_id, new_text), progress
        )

    def _report(self, stage: str, done: float, total: float | None = None, unit: str = "") -> None:
        if self._progress is not None:
            self._progress(Progress(stage, done, total, unit))

    def request_token(self) -> CancelToken:
        """A use case's cancel token, made when it is asked for (not when it starts running): the window makes it as
        the user sends, so a Stop that comes before the engine thread takes the request up still stops it."""
        token = CancelToken()
        self._live.add(token)
        return token

    def _exclusive(
        self,
        token: CancelToken,
        body: Callable[[], Iterator[ChatEvent]],
        progress: ProgressCallback | None = None,
    ) -> Iterator[ChatEvent]:
        if self._turn is not None:
            self._live.discard(token)
            yield Failed(BUSY)
            return
        turn = self._turn = self.queue.enter(WINDOW, bounded=False)
        try:
            self._cancel = token
            self._progress = progress
            while not turn.wait(0.05):  # another program's request holds the engine: wait, unless Stop comes first
                if token.cancelled:
                    yield Failed(STOPPED_WAITING)
                    return
            yield from body()
        except OwlError as exc:
            yield Failed(exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the window down with it
            log.exception("chat use case failed")
            yield Failed(f"Something went wrong ({type(exc).__name__}); {see_the_log()}")
        finally:
            self._live.discard(token)
            self._progress = None
            turn.leave()
            self._turn = None

    def _ask(self, conv_id: str, text: str, image_sources: Sequence[ImageInput]) -> Iterator[ChatEvent]:
        if not text.strip():
            yield Failed("Type a question about the images first.")
            return
        self.store.get(conv_id)  # NotFound before anything is stored
        stored = []
        for i, src in enumerate(image_sources):  # ImageError before anything is stored
            if not isinstance(src, (StoredImage, ImageRef)):  # already stored ones take no time
                self._report("storing images", i, len(image_sources), "images")
            stored.append(self._store_image(src))
        user_msg = self.store.add_message(conv_id, "user", text, stored)
        yield from self._answer(conv_id, user_msg)

    def _store_image(self, src: ImageInput) -> ImageRef:
        if isinstance(src, (StoredImage, ImageRef)):
            self.images.path(src.sha256)  # ImageError if it is not in the store
            return ImageRef(src.sha256, src.name)
        img = self.images.add(src)
        return ImageRef(img.sha256, img.name)

    def _regenerate(self, conv_id: str) -> Iterator[ChatEvent]:
        self._require_pipeline()
        messages = self.store.messages(conv_id)
        users = [m for m in messages if m.role == "user"]
        if not users:
            yield Failed("There is no question to answer again.")
            return
        question = users[-1]
        old = [m.id for m in messages if m.seq > question.seq]  # kept until the new answer's first token
        yield from self._answer(conv_id, question, fresh_seed=True, replaces=old)

    def _edit_and_resend(self, conv_id: str, user_msg_id: int, new_text: str) -> Iterator[ChatEvent]:
        if not new_text.strip():
            yield Failed("Type a question about the images first.")
            return
        self._require_pipeline()
        msg = self.store.message(user_msg_id)
        if msg.conversation_id != conv_id or msg.role != "user":
            yield Failed("Only your own questions in this conversation can be edited.")
            return
        later = [m.id for m in self.store.messages(conv_id) if m.seq > msg.seq]
        # the question keeps its old text and the old answer stays until the new answer's first token
        yield from self._answer(conv_id, msg, replaces=later, new_text=new_text)

    # ------------------------------------------------------------------ answering

    def _require_pipeline(self) -> ChatPipeline:
        pipe = self._pipeline
        if pipe is None:
            raise EngineError(NO_MODEL)
        return pipe

    def _history(self, conv_id: str, question: Message | None = None) -> list[HistoryTurn]:
        """The exchanges before `question` (all of them when None: the next question's history)."""
        from owl_desktop.engine.pipeline import HistoryTurn

        messages = self.store.messages(conv_id)
        earlier = [m for m in messages if question is None or m.seq < question.seq]
        # an answer stopped before its first word is no exchange: its question (and images) stay out of the prompt
        pairs = [p for p in qa_pairs(earlier) if p.answer.text.strip()]
        return [
            HistoryTurn(self._sources(p.question), p.question.text, p.answer.text, _token_ids(p.answer.meta))
            for p in pairs
        ]

    def _sources(self, msg: Message) -> list[HashedImage]:
        """A message's images for the engine: the store knows their sha256, so a cached one is never read again."""
        from owl_desktop.engine.pipeline import HashedImage

        return [HashedImage(self.images.path(r.sha256), r.sha256, r.name) for r in msg.images]

    def _answer(
        self,
        conv_id: str,
        question: Message,
        *,
        fresh_seed: bool = False,
        replaces: Sequence[int] = (),
        new_text: str | None = None,
    ) -> Iterator[ChatEvent]:
        """Stream an answer to a stored question into a new assistant message.

        `replaces` (messages after the question) and `new_text` (an edited question) take effect only once the new
        answer has its first token: a failure or a Stop before that leaves the conversation as it was.
        """
        started = self._clock()
        answer = self.store.add_message(
            conv_id, "assistant", "", meta={"state": "streaming", "model_id": self.loaded_model_id}
        )
        shown = question if new_text is None else replace(question, text=new_text)
        yield Started(shown, answer)
        pending_swap = bool(replaces) or new_text is not None
        parts: list[str] = []
        stream: AnswerStream | None = None
        sampling = self.settings.to_sampling()
        if fresh_seed:
            sampling = replace(sampling, seed=None)
        try:
            pipe = self._require_pipeline()
            model_id = pipe.bundle.id
            conv = self.store.get(conv_id)
            system = conv.system_prompt if conv.system_prompt is not None else self.settings.system_prompt
            history = self._history(conv_id, question)
            if self._cancel.cancelled:
                raise _StoppedEarly
            stream = pipe.ask(
                self._sources(question),
                shown.text,
                history,
                sampling=sampling,
                system=system,
                cancel=self._cancel,
                progress=self._progress,
            )
            self._report("reading the conversation", 0, None)
            last_save = self._clock()
            for piece in stream:
                if self._cancel.cancelled:
                    stream.cancel()  # the stream ends within a token; what comes after Stop is not kept
                    continue
                if pending_swap:
                    self._swap_in(question, shown, replaces)
                    pending_swap = False
                parts.append(piece)
                yield Piece(piece)
                if self._clock() - last_save >= SAVE_INTERVAL_S:
                    self.store.update_message(answer.id, text="".join(parts))
                    last_save = self._clock()
        except (_StoppedEarly, Cancelled):
            pass
        except GeneratorExit:  # the consumer went away mid-answer: keep what was written, as stopped
            self._cancel.cancel()
            _drain(stream)
            self._save_stopped(answer, parts, "abandoned")
            raise
        except OwlError as exc:
            _drain(stream)  # e.g. the store failed mid-answer: end the generation, or the engine stays locked
            yield self._fail(answer, question, parts, exc.message)
            return
        except Exception:  # noqa: BLE001
            log.exception("answering failed")
            _drain(stream)
            yield self._fail(answer, question, parts, f"Something went wrong while answering; {see_the_log()}")
            return
        record = stream.record if stream is not None else _empty_record()
        stopped = self._cancel.cancelled or record.stop_reason == "cancelled"
        if stopped:
            record.stop_reason = "cancelled"
        if pending_swap and not parts:  # stopped before the first token: what it was to replace stays
            self.store.delete_message(answer.id)
            kept = [m for m in self.store.messages(conv_id) if m.id in set(replaces) and m.role == "assistant"]
            yield Finished(kept[-1] if kept else replace(answer, stopped=True), record)
            return
        meta = {
            "state": "stopped" if stopped else "done",
            "model_id": model_id,
            **_record_meta(record),
            "sampling": {**asdict(sampling), "seed": record.seed if stream is not None else sampling.seed},
            "elapsed_ms": round((self._clock() - started) * 1000, 1),
        }
        saved = self.store.update_message(answer.id, text="".join(parts), meta=meta, stopped=stopped)
        self.store.set_model(conv_id, model_id)
        yield Finished(saved, record)

    def _swap_in(self, question: Message, shown: Message, replaces: Sequence[int]) -> None:
        """The new answer has begun: drop what it replaces, and give an edited question its new text."""
        with self.store.transaction():
            for msg_id in replaces:
                self.store.delete_message(msg_id)
            if shown.text != question.text:
                meta = {**question.meta, "edited_at": time.time()}
                meta.setdefault("original_text", question.text)
                self.store.update_message(question.id, text=shown.text, meta=meta)

    def _fail(self, answer: Message, question: Message, parts: list[str], reason: str) -> Failed:
        try:
            if not parts:
                self.store.delete_message(answer.id)  # keep the question alone: regenerate() retries it
                return Failed(reason, question, None)
            meta = {**answer.meta, "state": "failed", "error": reason}
            kept = self.store.update_message(answer.id, text="".join(parts), meta=meta, stopped=True)
            return Failed(reason, question, kept)
        except StoreError as exc:
            return Failed(f"{reason} (and the answer could not be saved: {exc.message})", question, None)

    def _save_stopped(self, answer: Message, parts: list[str], reason: str) -> None:
        try:
            meta = {**answer.meta, "state": "stopped", "stop_reason": reason}
            self.store.update_message(answer.id, text="".join(parts), meta=meta, stopped=True)
        except StoreError:
            log.exception("could not save a stopped answer")


class _StoppedEarly(Exception):
    """Stop came before generation started."""


def _drain(stream: AnswerStream | None) -> None:
    """Cancel a stream and run it to its end (a no-op for one already finished), so the engine is free again."""
    if stream is None:
        return
    stream.cancel()
    try:
        for _ in stream:
            pass
    except Exception:  # noqa: BLE001 - only ending the stream matters here
        log.debug("error while draining a cancelled stream", exc_info=True)


def _empty_record() -> AnswerRecord:
    from owl_desktop.engine.pipeline import AnswerRecord

    return AnswerRecord(stop_reason="cancelled")


def _token_ids(meta: dict[str, Any]) -> list[int]:
    """The tokens the model wrote for a stored answer (none for answers imported or saved before they were kept)."""
    ids = meta.get("token_ids")
    return ids if isinstance(ids, list) and all(isinstance(t, int) for t in ids) else []


def _record_meta(record: AnswerRecord) -> dict[str, Any]:
    """What the UI shows about an answer (and what the history keeps of it)."""
    return {
        "stop_reason": record.stop_reason,
        "seed": record.seed,
        "tokens": len(record.token_ids),
        "tokens_per_s": round(record.decode_tokens_per_s, 2),
        "ttft_ms": round(record.time_to_first_token_ms, 1),
        "prefill_ms": round(record.prefill_ms, 1),
        "context_used": record.context_used,
        "context_size": record.context_size,
        "reused_positions": record.reused_positions,
        "dropped_turns": record.dropped_turns,
        "token_ids": list(record.token_ids),  # the prompt of a follow-up holds the answer in these tokens
        "notices": list(record.notices),
        "images": [
            {"name": t.name, "sha256": t.sha256, "encode_ms": round(t.encode_ms, 1), "cached": t.cached, "grid": t.grid}
            for t in record.images
        ],
    }

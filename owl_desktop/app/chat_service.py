"""Chat use cases without Qt: a conversation in the store → a streamed answer from the loaded model → the store.

The GUI's engine worker (one thread) drives these blocking generators and forwards their events as signals:

    for event in service.ask(conv_id, "What differs?", [path_a, png_bytes]):
        match event:
            case Started(user_msg, assistant_msg): ...   # both are in the store now
            case Piece(text): ...                        # a bit more of the answer
            case Finished(message, record): ...          # the saved answer (message.stopped after Stop)
            case Failed(message): ...                    # a one-line reason; re-read store.messages(conv_id)

`stop()` may be called from any thread; the answer ends within one token and what was written is kept, marked
stopped. Errors never escape as exceptions and never lose the conversation: a bad image fails before anything is
stored; a failure after the question is stored keeps it (regenerate() retries it) and keeps any partial answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from owl_desktop import bundle as bundle_mod
from owl_desktop.app.settings import Settings
from owl_desktop.bundle import InstalledModel
from owl_desktop.errors import EngineError, OwlError
from owl_desktop.store.conversations import ConversationStore, ImageRef, Message, StoreError, qa_pairs
from owl_desktop.store.images import ImageStore, StoredImage

if TYPE_CHECKING:
    from owl_desktop.engine.pipeline import AnswerRecord, AnswerStream, ChatPipeline, HistoryTurn
    from owl_desktop.tasks import Task

log = logging.getLogger(__name__)

SAVE_INTERVAL_S = 1.0  # the partial answer is written to the store at most this often while streaming
NO_MODEL = "No model is loaded: download or import one in the model manager, or try the demo model."
BUSY = "An answer is already being written; stop it or wait for it to finish."

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
    ) -> None:
        self.store = store
        self.images = images
        self.settings = settings
        self._clock = clock
        self._pipeline: ChatPipeline | None = None
        self._busy = threading.Lock()  # one answer (or model load) at a time
        self._stop = threading.Event()

    # ------------------------------------------------------------------ model

    def load_model(self, ref: str | Path, task: Task | None = None) -> str:
        """Load a bundle (installed id or folder) with the current engine settings; returns its id.

        The previous model is unloaded first. Raises OwlError (BundleError, EngineError…) on failure.
        """
        from owl_desktop.engine.pipeline import ChatPipeline

        if not self._busy.acquire(timeout=30):
            raise EngineError(BUSY)
        try:
            self._unload_locked()
            self._pipeline = ChatPipeline.open(ref, self.settings.to_engine_settings(), task)
            self.settings.last_model_id = self._pipeline.bundle.id
            return self._pipeline.bundle.id
        finally:
            self._busy.release()

    def unload(self) -> None:
        self.stop()
        with self._busy:
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
        return self._pipeline

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

    def close(self) -> None:
        """Stop any answer, wait for it to end, and free the model."""
        self.stop()
        if self._busy.acquire(timeout=30):
            try:
                self._unload_locked()
            finally:
                self._busy.release()

    # ------------------------------------------------------------------ use cases

    def stop(self) -> None:
        """End the answer being written within one token (thread-safe); what was written is kept."""
        self._stop.set()
        pipe = self._pipeline
        if pipe is not None:
            pipe.cancel()

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    def ask(self, conv_id: str, text: str, image_sources: Sequence[ImageInput] = ()) -> Iterator[ChatEvent]:
        """Store the images and the question, then stream the answer."""
        return self._exclusive(lambda: self._ask(conv_id, text, image_sources))

    def regenerate(self, conv_id: str) -> Iterator[ChatEvent]:
        """Replace the last answer with a new one (fresh seed); with an unanswered last question, answer it."""
        return self._exclusive(lambda: self._regenerate(conv_id))

    def edit_and_resend(self, conv_id: str, user_msg_id: int, new_text: str) -> Iterator[ChatEvent]:
        """Change a question's text (its images stay), drop everything after it, and answer it again."""
        return self._exclusive(lambda: self._edit_and_resend(conv_id, user_msg_id, new_text))

    def _exclusive(self, body: Callable[[], Iterator[ChatEvent]]) -> Iterator[ChatEvent]:
        if not self._busy.acquire(blocking=False):
            yield Failed(BUSY)
            return
        try:
            self._stop.clear()
            yield from body()
        except OwlError as exc:
            yield Failed(exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug must not take the window down with it
            log.exception("chat use case failed")
            yield Failed(f"Something went wrong: {exc}")
        finally:
            self._busy.release()

    def _ask(self, conv_id: str, text: str, image_sources: Sequence[ImageInput]) -> Iterator[ChatEvent]:
        if not text.strip():
            yield Failed("Type a question about the images first.")
            return
        self.store.get(conv_id)  # NotFound before anything is stored
        stored = [self._store_image(src) for src in image_sources]  # ImageError before anything is stored
        user_msg = self.store.add_message(conv_id, "user", text, stored)
        yield from self._answer(conv_id, user_msg)

    def _store_image(self, src: ImageInput) -> ImageRef:
        if isinstance(src, (StoredImage, ImageRef)):
            self.images.path(src.sha256)  # ImageError if it is not in the store
            return ImageRef(src.sha256, src.name)
        img = self.images.add(src)
        return ImageRef(img.sha256, img.name)

    def _regenerate(self, conv_id: str) -> Iterator[ChatEvent]:
        self._require_pipeline()  # check before anything changes: a failed regenerate keeps the old answer
        messages = self.store.messages(conv_id)
        users = [m for m in messages if m.role == "user"]
        if not users:
            yield Failed("There is no question to answer again.")
            return
        question = users[-1]
        self.store.truncate_after(question.id)
        yield from self._answer(conv_id, question, fresh_seed=True)

    def _edit_and_resend(self, conv_id: str, user_msg_id: int, new_text: str) -> Iterator[ChatEvent]:
        if not new_text.strip():
            yield Failed("Type a question about the images first.")
            return
        self._require_pipeline()
        msg = self.store.message(user_msg_id)
        if msg.conversation_id != conv_id or msg.role != "user":
            yield Failed("Only your own questions in this conversation can be edited.")
            return
        meta = {**msg.meta, "edited_at": time.time()}
        meta.setdefault("original_text", msg.text)
        with self.store.transaction():
            self.store.truncate_after(msg.id)
            msg = self.store.update_message(msg.id, text=new_text, meta=meta)
        yield from self._answer(conv_id, msg)

    # ------------------------------------------------------------------ answering

    def _require_pipeline(self) -> ChatPipeline:
        pipe = self._pipeline
        if pipe is None:
            raise EngineError(NO_MODEL)
        return pipe

    def _history(self, conv_id: str, question: Message) -> list[HistoryTurn]:
        from owl_desktop.engine.pipeline import HistoryTurn

        earlier = [m for m in self.store.messages(conv_id) if m.seq < question.seq]
        return [
            HistoryTurn([self.images.path(r.sha256) for r in p.question.images], p.question.text, p.answer.text)
            for p in qa_pairs(earlier)
        ]

    def _answer(self, conv_id: str, question: Message, *, fresh_seed: bool = False) -> Iterator[ChatEvent]:
        """Stream an answer to a stored question into a new assistant message."""
        started = self._clock()
        answer = self.store.add_message(
            conv_id, "assistant", "", meta={"state": "streaming", "model_id": self.loaded_model_id}
        )
        yield Started(question, answer)
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
            images = [self.images.path(r.sha256) for r in question.images]
            if self._stop.is_set():
                raise _StoppedEarly
            stream = pipe.ask(images, question.text, history, sampling=sampling, system=system)
            last_save = self._clock()
            for piece in stream:
                if self._stop.is_set():
                    stream.cancel()  # the stream ends within a token; what comes after Stop is not kept
                    continue
                parts.append(piece)
                yield Piece(piece)
                if self._clock() - last_save >= SAVE_INTERVAL_S:
                    self.store.update_message(answer.id, text="".join(parts))
                    last_save = self._clock()
        except _StoppedEarly:
            pass
        except GeneratorExit:  # the consumer went away mid-answer: keep what was written, as stopped
            self._stop.set()
            _drain(stream)
            self._save_stopped(answer, parts, "abandoned")
            raise
        except OwlError as exc:
            _drain(stream)  # e.g. the store failed mid-answer: end the generation, or the engine stays locked
            yield self._fail(answer, question, parts, exc.message)
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("answering failed")
            _drain(stream)
            yield self._fail(answer, question, parts, f"Something went wrong while answering: {exc}")
            return
        record = stream.record if stream is not None else _empty_record()
        stopped = self._stop.is_set() or record.stop_reason == "cancelled"
        if stopped:
            record.stop_reason = "cancelled"
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
        "images": [
            {"name": t.name, "sha256": t.sha256, "encode_ms": round(t.encode_ms, 1), "cached": t.cached}
            for t in record.images
        ],
    }

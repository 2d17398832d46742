"""A chat with a loaded model bundle: images + question (+ history) in, streamed answer and timings out.

Images are encoded through a cache keyed by (image sha256, bundle id), in memory and on disk, so the same image
is never encoded twice; the LLM keeps its KV cache between calls, so a follow-up question only prefills what is new.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from owl_desktop import bundle as bundle_mod
from owl_desktop.bundle import Bundle
from owl_desktop.engine import encode_cache
from owl_desktop.engine import prompt as prompt_mod
from owl_desktop.engine.llm import Embeddings, GenerationStats, LlamaEngine, LlmSettings, Sampling, Segment, Tokens
from owl_desktop.engine.preprocess import PreparedImage, preprocess
from owl_desktop.engine.vision import VisionEncoder, dtype_name
from owl_desktop.errors import ImageError, PromptError
from owl_desktop.hashing import sha256_bytes
from owl_desktop.image_intake import read_source
from owl_desktop.tasks import CancelToken, Task


@dataclass(frozen=True)
class HashedImage:
    """An image file whose sha256 is already known (the store names files by it): read only if it must be encoded."""

    path: Path
    sha256: str
    name: str


ImageSource = Path | str | bytes | PreparedImage | HashedImage


@dataclass(frozen=True)
class EngineSettings:
    llm: LlmSettings = field(default_factory=LlmSettings)
    vision_device: str = "auto"  # auto | cuda | mps | cpu
    vision_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    disk_cache: bool = True  # keep image encodes in the cache dir across runs
    memory_cache_images: int = 64


@dataclass(frozen=True)
class HistoryTurn:
    """An earlier exchange of the conversation, as the app exports it."""

    images: Sequence[ImageSource]
    question: str
    answer: str


@dataclass
class ImageTiming:
    name: str
    sha256: str
    encode_ms: float  # 0 when the encode came from the cache
    cached: bool


@dataclass
class AnswerRecord:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    images: list[ImageTiming] = field(default_factory=list)
    dropped_turns: int = 0  # oldest turns left out to fit the context
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    context_used: int = 0
    context_size: int = 0
    reused_positions: int = 0
    encode_ms: float = 0.0  # images encoded for this answer (0 when every one came from the cache)
    stop_reason: str = ""
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AnswerStream:
    """Iterate for text pieces; `record` holds the timings once the iteration ends. `cancel()` from any thread."""

    def __init__(self, pipeline: ChatPipeline, pieces: Iterator[str], record: AnswerRecord) -> None:
        self._pipeline = pipeline
        self._pieces = pieces
        self.record = record

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self.record.text += piece
            yield piece

    def cancel(self) -> None:
        self._pipeline.cancel()

    def read(self) -> str:
        for _ in self:
            pass
        return self.record.text


class ChatPipeline:
    """A loaded bundle: the vision encoder in torch and the LLM in llama.cpp."""

    def __init__(self, bundle: Bundle, settings: EngineSettings | None = None) -> None:
        self.bundle = bundle
        self.settings = settings or EngineSettings()
        self.vision = VisionEncoder.from_file(
            bundle.vision_path, bundle.config, device=self.settings.vision_device, dtype=self.settings.vision_dtype
        )
        self.llm = LlamaEngine(bundle.llm_path, self.settings.llm)
        if self.llm.n_embd != bundle.config.text.hidden_size:
            self.llm.close()
            raise PromptError(
                f"bundle {bundle.id}: the LLM is {self.llm.n_embd} wide but the vision output is "
                f"{bundle.config.text.hidden_size}; the bundle is inconsistent, convert it again"
            )
        key = encode_cache.encoder_key(bundle.files[bundle_mod.VISION_FILE].sha256, dtype_name(self.vision.dtype))
        self._cache = encode_cache.EncodeCache(key, self.settings.memory_cache_images, self.settings.disk_cache)
        self._request = CancelToken()  # the current request's: cancel() stops it at whatever stage it is in
        # the answer ends where the model starts the template's next turn, before it can write the user's line
        self._stop_texts = ("\n" + bundle.prompt.human.strip(), "\n" + bundle.prompt.ai.strip())

    @classmethod
    def open(cls, ref: str | Path, settings: EngineSettings | None = None, task: Task | None = None) -> ChatPipeline:
        return cls(bundle_mod.load(ref, task=task), settings)

    # ---------------------------------------------------------------- images

    def encode_images(self, images: Sequence[PreparedImage], task: Task | None = None) -> list[ImageTiming]:
        """Encode what the cache lacks, in one batch; returns one timing per image. `task` may cancel it."""
        timings: list[ImageTiming] = []
        todo: list[PreparedImage] = []
        for img in images:
            cached = self._cache.get(img.sha256) is not None or any(t.sha256 == img.sha256 for t in todo)
            timings.append(ImageTiming(img.name, img.sha256, 0.0, cached))
            if not cached:
                todo.append(img)
        if todo:
            t0 = time.perf_counter()
            rows = self.vision.encode(np.stack([img.pixels for img in todo]), task=task)  # [N, 65, n_embd] float32
            per_image = (time.perf_counter() - t0) * 1000 / len(todo)
            for img, r in zip(todo, rows, strict=True):
                self._cache.put(img.sha256, np.ascontiguousarray(r))
            for t in timings:
                if not t.cached:
                    t.encode_ms = per_image
        return timings

    def has_encoding(self, sha256: str) -> bool:
        """Whether the image with these file bytes is in the encode cache (it will not be decoded or encoded)."""
        return self._cache.get(sha256) is not None

    def image_rows(self, image: ImageSource) -> np.ndarray:
        """The 65 rows one image contributes to the LLM ([65, n_embd] float32), through the cache."""
        prepared = image if isinstance(image, PreparedImage) else preprocess(image)
        self.encode_images([prepared])
        rows = self._cache.get(prepared.sha256)
        assert rows is not None
        return rows

    # ---------------------------------------------------------------- chat

    def build(
        self,
        images: Sequence[ImageSource],
        question: str,
        history: Sequence[HistoryTurn] = (),
        *,
        system: str | None = None,
        max_new_tokens: int = prompt_mod.MAX_NEW_TOKENS,
        task: Task | None = None,
        drop_old_turns: bool = True,
    ) -> tuple[prompt_mod.Prompt, list[Segment], list[ImageTiming]]:
        """Turn a conversation into LLM segments, encoding only the images of the turns that fit.

        `task` may cancel it between images and between the vision tower's layers (raises Cancelled). With
        `drop_old_turns` False a conversation that does not fit raises ContextFull instead of losing turns.
        """
        # each file is read once: the bytes that were hashed are the bytes that get encoded
        keyed: dict[str, PreparedImage | HashedImage | tuple[bytes, str]] = {}

        def keys_of(sources: Sequence[ImageSource]) -> list[str]:
            out = []
            for src in sources:
                if task is not None:
                    task.check()
                if isinstance(src, (PreparedImage, HashedImage)):
                    sha = src.sha256
                    keyed.setdefault(sha, src)
                else:
                    data, label = read_source(src)
                    sha = sha256_bytes(data)
                    keyed.setdefault(sha, (data, label))
                out.append(sha)
            return out

        turns = [prompt_mod.Turn(keys_of(h.images), h.question, h.answer) for h in history]
        turns.append(prompt_mod.Turn(keys_of(images), question))
        prompt = prompt_mod.build_prompt(
            turns,
            self.llm.tokenize,
            template=self.bundle.prompt,
            system=system,
            n_ctx=self.llm.n_ctx,
            max_new_tokens=max_new_tokens,
            image_rows=self.bundle.config.image_rows,
            bos_id=self.bundle.config.text.bos_token_id,
            drop_old_turns=drop_old_turns,
        )
        timings: list[ImageTiming] = []
        to_encode: list[PreparedImage] = []
        for sha in dict.fromkeys(prompt.image_keys):
            src = keyed[sha]
            if self._cache.get(sha) is not None:
                name = src[1] if isinstance(src, tuple) else src.name
                timings.append(ImageTiming(name, sha, 0.0, True))
            else:
                if task is not None:
                    task.check()
                to_encode.append(_prepare(src))
        timings += self.encode_images(to_encode, task)
        order = {sha: i for i, sha in enumerate(dict.fromkeys(prompt.image_keys))}
        timings.sort(key=lambda t: order[t.sha256])
        segments: list[Segment] = []
        for seg in prompt.segments:
            if isinstance(seg, prompt_mod.TextSegment):
                segments.append(Tokens(seg.ids))
            else:
                rows = self._cache.get(seg.image_key)
                assert rows is not None
                segments.append(Embeddings(rows, f"{self.bundle.id}:{seg.image_key}"))
        return prompt, segments, timings

    def ask(
        self,
        images: Sequence[ImageSource],
        question: str,
        history: Sequence[HistoryTurn] = (),
        *,
        sampling: Sampling | None = None,
        system: str | None = None,
        cancel: CancelToken | None = None,
        drop_old_turns: bool = True,
        stop: Sequence[str] = (),
    ) -> AnswerStream:
        """Ask about `images`; iterate the returned stream for text pieces.

        Stop it with `cancel` (or `cancel()`), at any stage: reading and encoding images (Cancelled is raised from
        here), prefilling or generating (the stream ends within a token). The record's time to first token counts
        from this call, image encoding included. The prompt is built and the images encoded before this returns
        (errors are raised here). The answer also ends before any of `stop` (besides the template's next turn).
        """
        t0 = time.perf_counter()
        token = cancel or CancelToken()
        self._request = token
        s = sampling or Sampling()
        prompt, segments, timings = self.build(
            images,
            question,
            history,
            system=system,
            max_new_tokens=s.max_new_tokens,
            task=Task(cancel=token),
            drop_old_turns=drop_old_turns,
        )
        record = AnswerRecord(images=timings, dropped_turns=prompt.dropped_turns, context_size=self.llm.n_ctx)
        record.encode_ms = sum(t.encode_ms for t in timings)
        capped = replace(s, max_new_tokens=prompt.max_new_tokens)
        stops = (*self._stop_texts, *stop)
        return AnswerStream(self, self._run(segments, capped, record, token, t0, stops), record)

    def _run(
        self,
        segments: list[Segment],
        sampling: Sampling,
        record: AnswerRecord,
        token: CancelToken,
        t0: float,
        stops: Sequence[str],
    ) -> Iterator[str]:
        stats = GenerationStats()
        started = time.perf_counter()
        try:
            yield from self.llm.generate(segments, sampling, stats, cancel=token, stop_texts=stops)
        finally:
            record.token_ids = list(stats.token_ids)
            record.prefill_ms = stats.prefill_ms
            if stats.time_to_first_token_ms:
                record.time_to_first_token_ms = stats.time_to_first_token_ms + (started - t0) * 1000
            record.decode_tokens_per_s = stats.decode_tokens_per_s
            record.context_used = stats.context_used
            record.reused_positions = stats.reused_positions
            record.stop_reason = stats.stop_reason
            record.seed = stats.seed

    def cancel(self) -> None:
        """Stop the current request at whatever stage it is in (thread-safe)."""
        self._request.cancel()
        self.llm.cancel()

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> ChatPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare(src: PreparedImage | HashedImage | tuple[bytes, str]) -> PreparedImage:
    if isinstance(src, PreparedImage):
        return src
    if isinstance(src, HashedImage):
        prepared = preprocess(src.path, src.name)
        if prepared.sha256 != src.sha256:
            raise ImageError(f"{src.name}: the stored file changed on disk (its content no longer matches its name)")
        return prepared
    return preprocess(src[0], src[1])

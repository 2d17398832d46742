"""A chat with a loaded model bundle: images + question (+ history) in, streamed answer and timings out.

Images are encoded through a cache keyed by (image sha256, bundle id), in memory and on disk, so the same image
is never encoded twice; the LLM keeps its KV cache between calls, so a follow-up question only prefills what is new.

The bundle's image plan decides what an image becomes (model_family.py, engine/doc_crops.py): one 224×224 view
(mPLUG-Owl, 65 positions), or a global view plus the crops of a grid chosen from the image's size (UReader,
65 per view); a UReader image's views run through the vision tower as one batch and are cached per (image, grid).
Several UReader images in one conversation each get their own grid and crop positions: the model code computes
exactly that when handed every image's positions (the reference processor passes only the last image's and fails),
though the model was trained with one image per prompt. When the current turn cannot fit the context, its images
take smaller grids, and `AnswerRecord.notices` says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from owl_desktop import bundle as bundle_mod
from owl_desktop.bundle import Bundle
from owl_desktop.engine import encode_cache
from owl_desktop.engine import prompt as prompt_mod
from owl_desktop.engine.doc_crops import ViewLayout, detail_levels, plan_views, view_pixels
from owl_desktop.engine.llm import (
    Embeddings,
    GenerationStats,
    LlamaEngine,
    LlmSettings,
    Sampling,
    Segment,
    Tokens,
    common_prefix,
)
from owl_desktop.engine.preprocess import PreparedImage, preprocess
from owl_desktop.engine.vision import VisionEncoder, dtype_name
from owl_desktop.errors import Cancelled, ImageError, PromptError
from owl_desktop.hashing import sha256_bytes
from owl_desktop.image_intake import decode, read_source
from owl_desktop.model_family import CUT_EMBEDDING_ROWS
from owl_desktop.tasks import CancelToken, ProgressCallback, Task


@dataclass(frozen=True)
class HashedImage:
    """An image file whose sha256 is already known (the store names files by it): read only if it must be encoded."""

    path: Path
    sha256: str
    name: str


ImageSource = Path | str | bytes | tuple[bytes, str] | PreparedImage | HashedImage
"""A file, encoded bytes, encoded bytes with the name to show (a PDF page, a region), or a prepared/stored image."""


@dataclass(frozen=True)
class EngineSettings:
    llm: LlmSettings = field(default_factory=LlmSettings)
    vision_device: str = "auto"  # auto | cuda | mps | cpu
    vision_dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    disk_cache: bool = True  # keep image encodes in the cache dir across runs
    memory_cache_images: int = 64  # in-memory encodes: this many mPLUG-Owl images' rows (a UReader image holds 2-21x)


@dataclass(frozen=True)
class HistoryTurn:
    """An earlier exchange of the conversation, as the app exports it.

    `answer_ids`: the tokens the model wrote for the answer (`AnswerRecord.token_ids`), when the caller kept them.
    Where a prefix of them spells the answer's text exactly, the prompt holds those tokens instead of the text's own
    tokenization, so a follow-up reuses the answer's KV cache even where the model wrote a word in unusual tokens.
    """

    images: Sequence[ImageSource]
    question: str
    answer: str
    answer_ids: Sequence[int] = ()


@dataclass
class ImageTiming:
    name: str
    sha256: str
    encode_ms: float  # 0 when the encode came from the cache
    cached: bool
    views: int = 1  # views encoded for this image (UReader: 1 + rows·cols)
    grid: str = ""  # UReader: the crop grid used, e.g. "4×5"
    full_grid: str = ""  # UReader: the grid it would get with room to spare, when a smaller one was used


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
    shifted_positions: int = 0  # of the reused, moved up over old turns left out (see ChatPipeline.shift_dropped)
    encode_ms: float = 0.0  # images encoded for this answer (0 when every one came from the cache)
    stop_reason: str = ""
    seed: int = 0
    notices: list[str] = field(default_factory=list)  # e.g. an image read with a smaller grid to fit the context

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PrepareRecord:
    """What a `ChatPipeline.prepare` did: the prompt's known beginning now in the KV cache (or how far it got)."""

    positions: int = 0  # positions of the prompt known before the question (the target)
    reused_positions: int = 0  # of those, already in the KV cache
    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    cancelled: bool = False


# Two endings that share no first token: where the prompts with them part is where the unknown rest of the question
# begins.
_PROBE_QUESTIONS = ("a", "Z")


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
            bundle.vision_path,
            bundle.config,
            device=self.settings.vision_device,
            dtype=self.settings.vision_dtype,
            crop_positions=CUT_EMBEDDING_ROWS if bundle.image_plan.crops else 0,
        )
        self.llm = LlamaEngine(bundle.llm_path, self.settings.llm)
        if self.llm.n_embd != bundle.config.text.hidden_size:
            self.llm.close()
            raise PromptError(
                f"bundle {bundle.id}: the LLM is {self.llm.n_embd} wide but the vision output is "
                f"{bundle.config.text.hidden_size}; the bundle is inconsistent, convert it again"
            )
        plan = bundle.image_plan
        key = encode_cache.encoder_key(
            bundle.files[bundle_mod.VISION_FILE].sha256,
            dtype_name(self.vision.dtype),
            encode_cache.plan_key(plan.to_dict()) if plan.crops else "",
        )
        self._cache = encode_cache.EncodeCache(
            key, self.settings.memory_cache_images, self.settings.disk_cache, rows_per_entry=bundle.config.image_rows
        )
        self._levels = detail_levels(plan)  # most crops per image at each level of detail
        self._sizes: dict[str, tuple[int, int]] = {}  # image sha256 → decoded (width, height): the grid choice
        # old turns leave the prompt in steps of half the context, so the kept prefix stays reusable turn after turn
        self.drop_block = self.llm.n_ctx // 2
        # and when they leave, the turns kept are moved up in the KV cache rather than computed again (a turn then
        # costs about its own positions; its answer is no longer exactly a cold prefill's, see LlamaEngine.prefill)
        self.shift_dropped = True
        self._request = CancelToken()  # the current request's: cancel() stops it at whatever stage it is in
        # the answer ends where the model starts the template's next turn, before it can write the user's line
        self._stop_texts = ("\n" + bundle.prompt.human.strip(), "\n" + bundle.prompt.ai.strip())

    @classmethod
    def open(cls, ref: str | Path, settings: EngineSettings | None = None, task: Task | None = None) -> ChatPipeline:
        bundle = bundle_mod.load(ref, task=task)
        if task is not None:
            task.check()  # a stop during the checks ends here, before the weights are read
        return cls(bundle, settings)

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

    def image_rows(self, image: ImageSource) -> np.ndarray:
        """The rows one image contributes to the LLM at full detail, through the cache: [65, n_embd] float32 for
        mPLUG-Owl, [65 · views, n_embd] for UReader (the global view's rows first, then each crop's)."""
        if self.bundle.image_plan.crops:
            data, label = _raw(image)
            sha = sha256_bytes(data)
            decoded = self._learn_sizes({sha: (data, label)})
            img = decoded[sha] if sha in decoded else None
            return self._encode_views(sha, label, self.layout(sha), lambda: img or decode(data, label))[1]
        prepared = image if isinstance(image, PreparedImage) else _prepare(_read(image))
        self.encode_images([prepared])
        rows = self._cache.get(prepared.sha256)
        assert rows is not None
        return rows

    def layout(self, sha: str, level: int = 0) -> ViewLayout:
        """The views of an image already seen by this pipeline, at a level of detail (0 = full)."""
        width, height = self._sizes[sha]
        return plan_views(width, height, self.bundle.image_plan, self._levels[level])

    @staticmethod
    def _views_key(sha: str, layout: ViewLayout) -> str:
        grid = layout.grid
        return sha if grid is None else f"{sha}-{grid.rows}x{grid.cols}"

    def _encode_views(
        self,
        sha: str,
        name: str,
        layout: ViewLayout,
        load: Callable[[], Image.Image],
        task: Task | None = None,
    ) -> tuple[ImageTiming, np.ndarray]:
        """One image's rows [V · 65, n_embd] (UReader): from the cache, or its views encoded in one batch."""
        key = self._views_key(sha, layout)
        timing = ImageTiming(name, sha, 0.0, True, layout.n_views, str(layout.grid or ""))
        rows = self._cache.get(key)
        if rows is not None:
            return timing, rows
        t0 = time.perf_counter()
        pixels = view_pixels(load(), layout)  # [V, 3, 224, 224]
        positions = np.asarray(layout.positions)  # [V, 2]
        views = self.vision.encode(pixels, batch_size=len(pixels), task=task, positions=positions)
        rows = np.ascontiguousarray(views.reshape(-1, views.shape[-1]))  # [V · 65, n_embd]
        self._cache.put(key, rows)
        timing.encode_ms = (time.perf_counter() - t0) * 1000
        timing.cached = False
        return timing, rows

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
        keyed: dict[str, _Keyed] = {}

        def keys_of(sources: Sequence[ImageSource]) -> list[str]:
            out = []
            for src in sources:
                if task is not None:
                    task.check()
                if isinstance(src, (PreparedImage, HashedImage)):
                    sha = src.sha256
                    keyed.setdefault(sha, src)
                else:
                    data, label = src if isinstance(src, tuple) else read_source(src)
                    sha = sha256_bytes(data)
                    keyed.setdefault(sha, (data, label))
                out.append(sha)
            return out

        turns = [
            prompt_mod.Turn(keys_of(h.images), h.question, h.answer, self._spelling(h.answer, h.answer_ids))
            for h in history
        ]
        turns.append(prompt_mod.Turn(keys_of(images), question))
        crops = self.bundle.image_plan.crops
        decoded = self._learn_sizes(keyed, task) if crops else {}
        rows_per_view = self.bundle.config.image_rows
        levels = range(len(self._levels))
        prompt = prompt_mod.build_prompt(
            turns,
            self.llm.tokenize,
            template=self.bundle.prompt,
            system=system,
            n_ctx=self.llm.n_ctx,
            max_new_tokens=max_new_tokens,
            image_rows=self._rows_at(0, rows_per_view) if crops else rows_per_view,
            reduced_image_rows=[self._rows_at(level, rows_per_view) for level in levels[1:]],
            bos_id=self.bundle.config.text.bos_token_id,
            drop_old_turns=drop_old_turns,
            drop_block=self.drop_block,
        )
        if crops:
            timings, encoded = self._encode_prompt_views(prompt, keyed, decoded, task)
        else:
            timings = self._encode_prompt_images(prompt, keyed, task)
            encoded = {}
        segments: list[Segment] = []
        for seg in prompt.segments:
            if isinstance(seg, prompt_mod.TextSegment):
                segments.append(Tokens(seg.ids))
                continue
            key, rows = encoded.get((seg.image_key, seg.level)) or (seg.image_key, self._cache.get(seg.image_key))
            assert rows is not None and rows.shape[0] == seg.rows
            segments.append(Embeddings(rows, f"{self.bundle.id}:{key}"))
        return prompt, segments, timings

    def _spelling(self, text: str, ids: Sequence[int]) -> tuple[int, ...] | None:
        """The shortest prefix of `ids` whose text is `text` (stripped; the tokens' text may only start with spaces),
        or None: the tokens a model wrote go on past its answer's text when a stop text cut it (a token holding the
        cut, e.g. ".\n", spells no prefix: the text's own tokens are used), and may not be this model's tokens."""
        want = text.strip()
        if not want or not ids or not all(isinstance(t, int) and 0 <= t < self.llm.n_vocab for t in ids):
            return None
        spelled = b""
        for k, t in enumerate(ids, start=1):
            spelled += self.llm.token_bytes(t)
            if len(spelled) < len(want):  # each character takes a byte at least (U+FFFD: one or more bad bytes)
                continue
            got = spelled.decode("utf-8", "replace").lstrip()
            if got == want:
                return tuple(ids[:k])
            if len(got) > len(want) + 4:  # past the answer (a UTF-8 tail shows as one U+FFFD): no prefix spells it
                return None
        return None

    def _encode_prompt_images(
        self, prompt: prompt_mod.Prompt, keyed: dict[str, _Keyed], task: Task | None
    ) -> list[ImageTiming]:
        """mPLUG-Owl: encode the prompt's images the cache lacks, in one batch."""
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
        return timings

    def _learn_sizes(self, keyed: dict[str, _Keyed], task: Task | None = None) -> dict[str, Image.Image]:
        """UReader: the size of every image of the conversation (its grid, hence its cost, depends on it).

        Images not seen before are decoded here (bad files fail here, before anything runs); those decodes are
        returned for the encode that may follow. A PreparedImage is refused: crops need the image itself.
        """
        decoded: dict[str, Image.Image] = {}
        for sha, src in keyed.items():
            if isinstance(src, PreparedImage):
                _raw(src)  # raises
            if sha in self._sizes:
                continue
            if task is not None:
                task.check()
            data, label = _raw(src)
            decoded[sha] = decode(data, label)
            self._sizes[sha] = decoded[sha].size
        return decoded

    def _rows_at(self, level: int, rows_per_view: int) -> Callable[[str], int]:
        return lambda sha: self.layout(sha, level).rows(rows_per_view)

    def _encode_prompt_views(
        self,
        prompt: prompt_mod.Prompt,
        keyed: dict[str, _Keyed],
        decoded: dict[str, Image.Image],
        task: Task | None,
    ) -> tuple[list[ImageTiming], dict[tuple[str, int], tuple[str, np.ndarray]]]:
        """UReader: each image of the prompt at its level of detail → (its cache key, its rows), encoded if need be."""
        timings: list[ImageTiming] = []
        encoded: dict[tuple[str, int], tuple[str, np.ndarray]] = {}
        for seg in prompt.segments:
            if not isinstance(seg, prompt_mod.ImageSegment) or (seg.image_key, seg.level) in encoded:
                continue
            if task is not None:
                task.check()
            sha, src = seg.image_key, keyed[seg.image_key]
            layout = self.layout(sha, seg.level)
            name = src[1] if isinstance(src, tuple) else src.name

            def load(sha: str = sha, src: _Keyed = src) -> Image.Image:
                return decoded[sha] if sha in decoded else decode(*_raw(src))

            timing, rows = self._encode_views(sha, name, layout, load, task)
            encoded[sha, seg.level] = (self._views_key(sha, layout), rows)
            if seg.level > 0:
                timing.full_grid = str(self.layout(sha).grid)
            timings.append(timing)
        return timings, encoded

    def prepare(
        self,
        images: Sequence[ImageSource] = (),
        history: Sequence[HistoryTurn] = (),
        *,
        system: str | None = None,
        cancel: CancelToken | None = None,
        max_new_tokens: int = prompt_mod.MAX_NEW_TOKENS,
        draft: str = "",
    ) -> PrepareRecord:
        """Work ahead while the user types: encode `images` and prefill the prompt up to the question's own text,
        and into it as far as the `draft` of the question has whole words (see prompt.settled_words).

        A later `ask` with the same images, history and system prompt then only prefills the question (the KV cache
        is reused position by position, so whatever changed in between is simply computed again: the answer is a
        cold run's, exactly so without flash attention; with it llama.cpp's CPU code computes a position a little
        differently depending on the batch it is in). Stops within one vision layer or one graph node once `cancel`
        fires; the record then says `cancelled`, and what was done by then (encodes, prefilled positions) stays
        useful.
        """
        token = cancel or CancelToken()
        record = PrepareRecord()
        try:
            task = Task(cancel=token)
            typed = prompt_mod.settled_words(draft)
            builds = [
                self.build(images, typed + q, history, system=system, max_new_tokens=max_new_tokens, task=task)
                for q in _PROBE_QUESTIONS
            ]
            record.encode_ms = sum(t.encode_ms for t in builds[0][2])
            shared = common_prefix(LlamaEngine.positions(builds[0][1]), LlamaEngine.positions(builds[1][1]))
            # one token of margin: the probe's first token may merge with what comes before it
            ahead = _first_positions(builds[0][1], max(0, shared - 1))
            # on a GPU backend the prefill stops between its batches rather than inside a graph (see LlamaEngine)
            t1 = time.perf_counter()
            record.positions, record.reused_positions = self.llm.prefill_ahead(
                ahead, token, self._shift_within(builds[0][0])
            )
            record.prefill_ms = (time.perf_counter() - t1) * 1000
        except Cancelled:
            record.cancelled = True
        return record

    def warm_up(self, system: str | None = None, cancel: CancelToken | None = None) -> PrepareRecord:
        """After a load, in the background: run the vision tower once (its first run is several times slower than
        the next ones) and prefill the system prompt, so a new conversation starts from it already in the cache."""
        token = cancel or CancelToken()
        try:
            self._warm_vision(token)
        except Cancelled:
            return PrepareRecord(cancelled=True)
        return self.prepare((), (), system=system, cancel=token)

    def _warm_vision(self, token: CancelToken) -> None:
        size = self.bundle.config.vision.image_size
        pixels = np.zeros((1, 3, size, size), dtype=np.float32)  # [1, 3, 224, 224]
        positions = np.zeros((1, 2), dtype=np.int64) if self.bundle.image_plan.crops else None  # [1, 2]
        self.vision.encode(pixels, task=Task(cancel=token), positions=positions)

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
        progress: ProgressCallback | None = None,
    ) -> AnswerStream:
        """Ask about `images`; iterate the returned stream for text pieces.

        Stop it with `cancel` (or `cancel()`), at any stage: reading and encoding images (Cancelled is raised from
        here), prefilling or generating (the stream ends within a token). The record's time to first token counts
        from this call, image encoding included. The prompt is built and the images encoded before this returns
        (errors are raised here). The answer also ends before any of `stop` (besides the template's next turn).
        `progress` hears how the image encoding goes ("encoding images", done of total).
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
            task=Task(progress=progress, cancel=token),
            drop_old_turns=drop_old_turns,
        )
        record = AnswerRecord(images=timings, dropped_turns=prompt.dropped_turns, context_size=self.llm.n_ctx)
        record.encode_ms = sum(t.encode_ms for t in timings)
        record.notices = [grid_notice(t, self.bundle.config.image_rows) for t in timings if t.full_grid]
        capped = replace(s, max_new_tokens=prompt.max_new_tokens)
        stops = (*self._stop_texts, *stop)
        shift_within = self._shift_within(prompt)
        return AnswerStream(self, self._run(segments, capped, record, token, t0, stops, shift_within), record)

    def _shift_within(self, prompt: prompt_mod.Prompt) -> int:
        """How far the KV cache may move positions up over old turns that left the prompt (LlamaEngine.prefill)."""
        return prompt.history_positions if self.shift_dropped and prompt.dropped_turns > 0 else 0

    def _run(
        self,
        segments: list[Segment],
        sampling: Sampling,
        record: AnswerRecord,
        token: CancelToken,
        t0: float,
        stops: Sequence[str],
        shift_within: int,
    ) -> Iterator[str]:
        stats = GenerationStats()
        started = time.perf_counter()
        try:
            yield from self.llm.generate(
                segments, sampling, stats, cancel=token, stop_texts=stops, shift_within=shift_within
            )
        finally:
            record.token_ids = list(stats.token_ids)
            record.prefill_ms = stats.prefill_ms
            if stats.time_to_first_token_ms:
                record.time_to_first_token_ms = stats.time_to_first_token_ms + (started - t0) * 1000
            record.decode_tokens_per_s = stats.decode_tokens_per_s
            record.context_used = stats.context_used
            record.reused_positions = stats.reused_positions
            record.shifted_positions = stats.shifted_positions
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


_Keyed = PreparedImage | HashedImage | tuple[bytes, str]


def _first_positions(segments: Sequence[Segment], n: int) -> list[Segment]:
    """The segments cut after their first `n` positions."""
    out: list[Segment] = []
    left = n
    for seg in segments:
        if left <= 0:
            break
        if isinstance(seg, Tokens):
            out.append(Tokens(list(seg.ids)[:left]))
            left -= len(seg.ids)
        else:
            out.append(Embeddings(seg.rows[:left], seg.key))
            left -= len(seg.rows)
    return out


def _read(src: ImageSource) -> _Keyed:
    if isinstance(src, (PreparedImage, HashedImage, tuple)):
        return src
    return read_source(src)


def _raw(src: ImageSource | tuple[bytes, str]) -> tuple[bytes, str]:
    """The bytes and name of an image for a crop plan (UReader crops the decoded image itself)."""
    if isinstance(src, PreparedImage):
        raise ValueError("a UReader model crops the image itself: pass the image file or its bytes")
    if isinstance(src, tuple):
        return src
    if isinstance(src, HashedImage):
        data, label = read_source(src.path, src.name)
        if sha256_bytes(data) != src.sha256:
            raise ImageError(f"{src.name}: the stored file changed on disk (its content no longer matches its name)")
        return data, label
    return read_source(src)


def grid_notice(timing: ImageTiming, rows_per_view: int) -> str:
    """What to tell the user when an image was read with a smaller grid than its size asks for."""
    used = timing.views * rows_per_view
    return (
        f"{timing.name}: read as a {timing.grid} grid of crops ({used} positions) instead of {timing.full_grid}, "
        "so that the question fits the model's context; fine print may be harder for the model to read"
    )


def _prepare(src: _Keyed) -> PreparedImage:
    if isinstance(src, PreparedImage):
        return src
    if isinstance(src, HashedImage):
        prepared = preprocess(src.path, src.name)
        if prepared.sha256 != src.sha256:
            raise ImageError(f"{src.name}: the stored file changed on disk (its content no longer matches its name)")
        return prepared
    return preprocess(src[0], src[1])

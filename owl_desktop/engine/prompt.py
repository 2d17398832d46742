"""The mPLUG-Owl prompt: a conversation becomes ordered token and image segments that fit the context.

Text form (mplug-owl-reference.md §4), with one `Human: <image>` line per image of a turn, before its question,
and the text ending in "AI: " with its trailing space:

    {system}\\nHuman: <image>\\nHuman: {q1}\\nAI: {a1}\\nHuman: <image>\\nHuman: {q2}\\nAI:␠

Ids as the reference processor makes them (§2.5): the text between images is tokenized chunk by chunk, each chunk in
its own SentencePiece call without BOS (so each starts with the dummy-prefix "▁"), BOS is prepended once, and every
image takes `image_rows` (65) positions filled by the vision encoder's rows. llama.cpp's
`llama_tokenize(add_special=False, parse_special=False)` called once per chunk gives the same ids.

Chunks are cut where the conversation has images, never by searching the text for "<image>": a user who types
"<image>" gets those characters as text, not a phantom image slot (the reference would make one). Questions and
answers are stripped of surrounding whitespace.

An earlier answer is a chunk of its own, and so is the text after it ("\nHuman: …"), where the reference processor
tokenizes "AI: {a1}\nHuman: …" as one chunk. The reason is the KV cache: when a1 was written, the prompt ended with
"AI: " (`:` `▁`) and the model's tokens came after that `▁`; one chunk "AI: a1" would merge them into `▁a1` instead,
so a follow-up's positions would part from the cache at the last position of the previous prompt and the whole
previous answer would be prefilled again. Tokenized on its own, the answer gets its dummy-prefix `▁`, which is the
token form mPLUG-Owl was trained on (its training split cuts at 'AI: ' and '\nHuman: ', mplug-owl-reference.md §4) and
writes after "AI: ", so the follow-up's prompt starts with the previous prompt and answer token for token. A model
may write a word in other tokens than its text tokenizes into (a random test model nearly always does); a caller that
kept the tokens it wrote can pass them (`Turn.answer_ids`) to keep the cache for those answers too.

The answer's room adapts: the whole conversation is kept while it leaves the answer at least `answer_floor` positions
(a quarter of the longest answer asked for), the answer getting what is left up to that longest. Only below the floor
are the oldest turns left out, whole and with their images (the current turn is never cut); the pipeline leaves them
in blocks of half the context, so the room grows back to the full answer once a block has left.

Images need not all cost the same: `image_rows` may be a function of the image key (UReader: 65·(1 + rows·cols)
positions for a global view and the crops of its grid). When the current turn does not fit even alone, the
`reduced_image_rows` functions (each a smaller level of detail, e.g. a smaller grid) are tried in order for the
current turn's images; the prompt records the level it used (`Prompt.image_level`, 0 = full detail) so the caller
can encode at that level and tell the user. Earlier turns keep full detail (or are left out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from owl_desktop.bundle import PromptTemplate
from owl_desktop.errors import ContextFull, PromptError

Tokenize = Callable[[str], list[int]]
"""SentencePiece-like tokenizer of one text chunk: no BOS, dummy-prefix "▁" at the start, special text not parsed."""

ImageRows = int | Callable[[str], int]
"""Positions each image takes: one count for all, or a function of the image key."""

N_CTX = 2048
MAX_NEW_TOKENS = 512
MIN_NEW_TOKENS = 16  # the least room for an answer that still makes a turn worth sending
ANSWER_FLOOR_SHARE = 4  # old turns leave the prompt only when less than 1/4 of the longest answer would fit
IMAGE_ROWS = 65  # OwlConfig.image_rows: 64 queries + vit_eos
BOS_ID = 1


@dataclass(frozen=True)
class Turn:
    """One exchange: images (their keys, e.g. sha256, in order), the question, and the answer (None while asked).

    `answer_ids`, when given, are the tokens the model wrote for the answer, which the caller has checked spell its
    text (a model's tokens need not be the ones its text tokenizes into); they stand for the answer in the prompt.
    """

    images: Sequence[str]
    question: str
    answer: str | None = None
    answer_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.images, str):
            raise TypeError("Turn.images is a sequence of image keys, not one string")
        object.__setattr__(self, "images", tuple(self.images))
        if self.answer_ids is not None:
            object.__setattr__(self, "answer_ids", tuple(self.answer_ids))


@dataclass(frozen=True)
class TextSegment:
    """Token ids decoded as one token batch (the first segment starts with BOS)."""

    ids: list[int]

    @property
    def n_positions(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ImageSegment:
    """The rows of one image: `index` is its place among the prompt's images (0-based), `rows` its positions,
    `level` the level of detail they were counted at (0 = full; see build_prompt's reduced_image_rows)."""

    image_key: str
    index: int
    rows: int = IMAGE_ROWS
    level: int = 0

    @property
    def n_positions(self) -> int:
        return self.rows


Segment = TextSegment | ImageSegment


@dataclass(frozen=True)
class Prompt:
    """A conversation ready for the LLM.

    `dropped_turns` oldest turns were left out to fit the context (the prompt covers turns[dropped_turns:]).
    `max_new_tokens` is the room left for the answer: the requested count, capped by what the context still holds.
    `image_level` is the level of detail of the current turn's images: 0 = full, k = reduced_image_rows[k - 1].
    `history_positions` come before the current turn: the system prompt and the turns kept.
    """

    segments: list[Segment]
    n_positions: int
    history_positions: int
    dropped_turns: int
    max_new_tokens: int
    text: str
    image_level: int = 0

    @property
    def image_keys(self) -> list[str]:
        """Image keys in prompt order, one per image segment (a key repeats if the image was given twice)."""
        return [s.image_key for s in self.segments if isinstance(s, ImageSegment)]

    def input_ids(self, placeholder: int = -1) -> list[int]:
        """The reference processor's input_ids: token ids with `placeholder` in every image position."""
        out: list[int] = []
        for s in self.segments:
            out.extend(s.ids if isinstance(s, TextSegment) else [placeholder] * s.rows)
        return out


@dataclass(frozen=True)
class _Answer:
    """An earlier answer: tokenized on its own, never merged with the text around it (see the module doc), or the
    tokens the model wrote for it."""

    text: str
    ids: Sequence[int] | None = None


@dataclass
class _Parts:
    """Text, answers and images in order; consecutive texts are merged (an answer is never merged)."""

    items: list[str | _Answer | ImageSegment] = field(default_factory=list)
    n_images: int = 0
    current_start: int = 0  # index of the item the current turn begins in

    def start_current(self, first_text: str) -> None:
        """The current turn begins here: with an item of its own, or inside the last one if its text merges."""
        self.current_start = len(self.items) - (1 if self._joins_last(first_text) else 0)

    def _joins_last(self, s: str) -> bool:
        """Whether text `s` would be merged into the last item (see text)."""
        return bool(s) and bool(self.items) and isinstance(self.items[-1], str)

    def text(self, s: str) -> None:
        if not s:
            return
        if self._joins_last(s):
            self.items[-1] += s
        else:
            self.items.append(s)

    def answer(self, s: str, ids: Sequence[int] | None) -> None:
        if s:
            self.items.append(_Answer(s, ids))

    def render(self, image: str) -> str:
        """The prompt's text, `image` standing for each image."""
        return "".join(i if isinstance(i, str) else i.text if isinstance(i, _Answer) else image for i in self.items)

    def image(self, key: str, rows: int, level: int) -> None:
        if rows <= 0:
            raise ValueError(f"image {key} would take {rows} positions")
        self.items.append(ImageSegment(key, self.n_images, rows, level))
        self.n_images += 1


def answer_floor(max_new_tokens: int, min_new_tokens: int = MIN_NEW_TOKENS) -> int:
    """The least room the answer keeps before old turns leave the prompt: a share of the longest answer asked for
    (128 of 512), at least `min_new_tokens` and at most the longest answer."""
    return min(max_new_tokens, max(min_new_tokens, max_new_tokens // ANSWER_FLOOR_SHARE))


def _rows_fn(rows: ImageRows) -> Callable[[str], int]:
    if isinstance(rows, int):
        return lambda _key: rows
    return rows


def render_text(turns: Sequence[Turn], template: PromptTemplate | None = None, system: str | None = None) -> str:
    """The full prompt text, `<image>` marking each image: for display, logs and the all-torch reference path.

    A last turn without answer ends the text with "AI: " (trailing space kept); answered turns end with their answer.
    """
    tpl = template or PromptTemplate()
    full = _rows_fn(IMAGE_ROWS)
    return _layout(turns, tpl, tpl.system if system is None else system, full, full, 0).render(tpl.image)


def settled_words(draft: str) -> str:
    """The part of a question still being typed that should not change any more: its words up to the last
    whitespace (the word being typed may still grow). Empty while no word is finished."""
    text = draft.lstrip()
    cut = max((i for i, ch in enumerate(text) if ch.isspace()), default=-1)
    return text[: cut + 1]


def build_prompt(
    turns: Sequence[Turn],
    tokenize: Tokenize,
    *,
    template: PromptTemplate | None = None,
    system: str | None = None,
    n_ctx: int = N_CTX,
    max_new_tokens: int = MAX_NEW_TOKENS,
    min_new_tokens: int = MIN_NEW_TOKENS,
    image_rows: ImageRows = IMAGE_ROWS,
    reduced_image_rows: Sequence[ImageRows] = (),
    bos_id: int = BOS_ID,
    drop_old_turns: bool = True,
    drop_block: int = 0,
) -> Prompt:
    """Segments for the conversation `turns`, the last of which is the question being asked (answer None).

    The current turn must fit with at least `min_new_tokens` to spare (at the first level of detail, of `image_rows`
    then each of `reduced_image_rows`, at which it fits); older turns are then added newest first while they leave
    the answer `answer_floor(max_new_tokens, min_new_tokens)` (or all the room the current turn leaves, if less), and
    the rest are dropped. The answer gets the room left, up to `max_new_tokens` (`Prompt.max_new_tokens`).
    With `drop_old_turns` False every turn is kept and the answer gets what room is left (at least
    `min_new_tokens`), or ContextFull is raised: for callers that must not lose history silently (the API).
    With `drop_block` > 0, turns are left out in blocks of at least that many positions, counted from the start of
    the conversation: the kept turns then stay the same, and their KV cache reusable, for many turns in a row
    (dropping just enough would change the prompt's beginning, so re-prefill nearly all of it, at every turn).
    Raises PromptError for an empty question, ContextFull for a conversation (or a current turn, at every level of
    detail) that cannot fit.
    """
    if not turns:
        raise PromptError("there is no question to ask")
    if n_ctx <= 0 or min_new_tokens <= 0 or max_new_tokens <= 0:
        raise ValueError("n_ctx, min_new_tokens and max_new_tokens must be positive")
    levels = [_rows_fn(image_rows), *(_rows_fn(r) for r in reduced_image_rows)]
    tpl = template or PromptTemplate()
    sys_text = tpl.system if system is None else system
    _validate(turns)

    memo: dict[str, list[int]] = {}

    def ids_of(chunk: str) -> list[int]:
        if chunk not in memo:
            memo[chunk] = list(tokenize(chunk))
        return memo[chunk]

    def plan(first: int, level: int) -> tuple[list[Segment], int, str, int]:
        parts = _layout(turns[first:], tpl, sys_text, levels[0], levels[level], level)
        segments: list[Segment] = []
        history = 0  # positions before the current turn
        for index, item in enumerate(parts.items):
            if index == parts.current_start:
                history = sum(s.n_positions for s in segments)
            if isinstance(item, ImageSegment):
                if not segments:  # an image first (empty system): BOS still comes first
                    segments.append(TextSegment([bos_id]))
                segments.append(item)
                continue
            if isinstance(item, str):
                ids = ids_of(item)
            else:
                ids = list(item.ids) if item.ids is not None else ids_of(item.text)
            if not segments:
                ids = [bos_id, *ids]
            if segments and isinstance(segments[-1], TextSegment):  # text after an answer: one token batch
                segments[-1] = TextSegment([*segments[-1].ids, *ids])
            else:
                segments.append(TextSegment(ids))
        return segments, sum(s.n_positions for s in segments), parts.render(tpl.image), history

    last = len(turns) - 1
    for level in range(len(levels)):
        best = plan(last, level)
        if best[1] + min_new_tokens <= n_ctx:
            break
    else:
        image_positions = [levels[-1](k) for k in turns[last].images]
        message = _too_big_message(best[1], image_positions, n_ctx, min_new_tokens, len(levels) > 1)
        raise ContextFull(message, best[1] + min_new_tokens, n_ctx)
    first = last
    if not drop_old_turns:
        best, first = plan(0, level), 0
        if best[1] + min_new_tokens > n_ctx:
            raise ContextFull(
                f"the conversation needs {best[1] + min_new_tokens} positions ({best[1]} for its {len(turns)} turns, "
                f"at least {min_new_tokens} for the answer) but the model's context holds {n_ctx}; "
                "leave out earlier turns or images",
                best[1] + min_new_tokens,
                n_ctx,
            )
    floor = min(answer_floor(max_new_tokens, min_new_tokens), n_ctx - best[1])
    while first > 0:
        candidate = plan(first - 1, level)
        if candidate[1] + floor > n_ctx:
            break
        best, first = candidate, first - 1
    if drop_block > 0 and first > 0:
        boundary = _block_boundary(turns[:last], first, drop_block, lambda t: _turn_cost(t, tpl, levels[0], ids_of))
        if boundary != first:
            best, first = plan(boundary, level), boundary
    segments, n_positions, text, history = best
    return Prompt(
        segments=segments,
        n_positions=n_positions,
        history_positions=history,
        dropped_turns=first,
        max_new_tokens=min(max_new_tokens, n_ctx - n_positions),
        text=text,
        image_level=level,
    )


def _layout(
    turns: Sequence[Turn],
    tpl: PromptTemplate,
    system: str,
    rows: Callable[[str], int],
    current_rows: Callable[[str], int],
    current_level: int,
) -> _Parts:
    """Text and images of `turns`; the last turn's images are counted with `current_rows` at `current_level`."""
    parts = _Parts()
    sep = ""
    if system:
        parts.text(system)
        sep = "\n"
    for i, turn in enumerate(turns):
        current = i == len(turns) - 1
        if current:
            parts.start_current(sep + tpl.human)
        for key in turn.images:
            parts.text(sep + tpl.human)
            parts.image(key, current_rows(key) if current else rows(key), current_level if current else 0)
            sep = "\n"
        parts.text(sep + tpl.human + turn.question.strip() + "\n" + tpl.ai)
        if turn.answer is not None:
            parts.answer(turn.answer.strip(), turn.answer_ids)
        sep = "\n"
    return parts


def _turn_cost(turn: Turn, tpl: PromptTemplate, rows: Callable[[str], int], ids_of: Tokenize) -> int:
    """About the positions one answered turn takes (its own text tokenized alone): what drop blocks are counted in."""
    text = tpl.human + turn.question.strip() + "\n" + tpl.ai + (turn.answer or "").strip()
    return len(ids_of(text)) + sum(rows(k) + len(ids_of(tpl.human)) for k in turn.images)


def _block_boundary(history: Sequence[Turn], first: int, block: int, cost: Callable[[Turn], int]) -> int:
    """The first turn to keep: the earliest start of a block at or after `first` (blocks of at least `block`
    positions from the conversation's start; with none, every earlier turn is left out)."""
    start, acc = 0, 0
    for i, turn in enumerate(history):
        if start >= first:
            return start
        acc += cost(turn)
        if acc >= block:
            start, acc = i + 1, 0
    return start if start >= first else len(history)


def _validate(turns: Sequence[Turn]) -> None:
    current = turns[-1]
    if not current.question.strip():
        raise PromptError("the question is empty: type what you want to know about the image")
    if current.answer is not None:
        raise PromptError("the last turn of the conversation is already answered; there is nothing to ask")
    for number, turn in enumerate(turns[:-1], start=1):
        if turn.answer is None:
            raise PromptError(f"turn {number} of the conversation has no answer; only the last turn may be open")
    for turn in turns:
        if any(not isinstance(k, str) or not k for k in turn.images):
            raise PromptError("an image of the conversation has no key")


def _too_big_message(positions: int, image_positions: list[int], n_ctx: int, min_new: int, reduced: bool) -> str:
    """Why the current turn cannot fit; `image_positions` are its images' costs at the smallest level tried."""
    n_img = len(image_positions)
    text_positions = positions - sum(image_positions)
    room = n_ctx - min_new
    if text_positions > room:
        return (
            f"the question is too long: with the system prompt it takes {text_positions} tokens, and the model's "
            f"context holds {n_ctx} (at least {min_new} kept for the answer); shorten it by about "
            f"{text_positions - room} tokens"
        )
    fit, used = 0, text_positions
    for cost in sorted(image_positions):
        if used + cost > room:
            break
        fit, used = fit + 1, used + cost
    lo, hi = min(image_positions), max(image_positions)
    each = f"{lo} each" if lo == hi else f"{lo} to {hi} each"
    smallest = " even at the smallest level of detail" if reduced else ""
    return (
        f"too many images for one question: {n_img} images take {sum(image_positions)} positions ({each}){smallest} "
        f"and the text {text_positions} tokens, but the model's context holds {n_ctx} (at least {min_new} kept for "
        f"the answer); at most {fit} image{'s' if fit != 1 else ''} fit with this question"
    )

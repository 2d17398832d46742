"""`owl-desktop bench latency`: how soon the first token comes after Enter, each figure against a baseline of the
same run (issue 12's goals on the 7B-shaped bundle in brackets):

- the image attached N seconds before Enter (work ahead: `ChatPipeline.prepare` ran, and went on to its end as in
  the window) against the same question sent cold (≤ 0.2× after 5 s): once on an empty KV cache with nothing typed
  before Enter, once as in the window after a load (the warm-up left the system prompt in the cache) with the
  question typed during those N seconds, a word at a time (each finished word is prefilled too);
- a new conversation with the system prompt already in the KV cache (`warm_up` after a load) against without (the
  cache saves ≥ 40 % of the prefill);
- the first real encode after a load (the vision tower warmed up) against a steady encode (≤ 1.2×); the warm-up's own
  run shows what the first encode cost without it;
- the turns of a conversation that overflowed the context: each one's prefill against what its own new positions
  (its question, image, and the answer before it) cost at turn 2's rate (≤ 2×): old turns leave in steps and the
  turns kept move up in the KV cache; the same without moving them (computed again); and the baseline where old
  turns leave just enough at every turn.

Every "cold" question uses an image never seen before (a pixel changed), so nothing comes from the encode cache.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from owl_desktop.engine.llm import LlamaEngine, Sampling
from owl_desktop.engine.pipeline import AnswerRecord, ChatPipeline, EngineSettings, HistoryTurn, ImageSource

QUESTION = "What is shown in this picture, and what stands out?"
HEAD_STARTS_S = (0.0, 2.0, 5.0)
ANSWER_SENTENCE = "The picture shows a small scene with several objects, and each of them is described in turn. "


@dataclass
class LatencyBench:
    threads: int
    n_ctx: int
    cold_ttft_ms: float
    cold_positions: float  # positions prefilled after Enter
    head_start_ttft_ms: dict[float, float]  # seconds of head start → TTFT
    head_start_positions: dict[float, float]  # seconds of head start → positions prefilled after Enter
    typed_ttft_ms: dict[float, float]  # the same after a warm-up, with the question typed during the head start
    typed_positions: dict[float, float]
    new_chat_ttft_ms: float  # system prompt prefilled at load
    new_chat_scratch_ttft_ms: float  # nothing in the KV cache
    system_share: float  # the cached system prompt's share of a new chat's positions: the most its cache can save
    warm_up_encode_ms: float  # the vision tower's first run after the load (what the first encode cost before)
    first_encode_ms: float  # the first real encode, after the warm-up
    steady_encode_ms: float
    turns: list[dict[str, float]] = field(default_factory=list)  # per turn: ttft, prefill, positions (see _turns)
    turns_recomputed: list[dict[str, float]] = field(default_factory=list)  # the same, kept turns computed again
    turns_just_enough: list[dict[str, float]] = field(default_factory=list)  # ... and old turns dropped one by one

    def head_start_ratio(self, seconds: float, typed: bool = False) -> float:
        return (self.typed_ttft_ms if typed else self.head_start_ttft_ms)[seconds] / self.cold_ttft_ms

    @property
    def system_saving(self) -> float:
        return 1 - self.new_chat_ttft_ms / self.new_chat_scratch_ttft_ms

    @property
    def first_encode_ratio(self) -> float:
        return self.first_encode_ms / self.steady_encode_ms

    def report(self) -> str:
        lines = [
            f"LLM threads: {self.threads}; context {self.n_ctx}",
            f"cold question (new image, empty KV):      {self.cold_ttft_ms:9.1f} ms to the first token "
            f"({self.cold_positions:.0f} positions prefilled after Enter, the image encoded)",
        ]
        for typed, ttft, left in (
            (False, self.head_start_ttft_ms, self.head_start_positions),
            (True, self.typed_ttft_ms, self.typed_positions),
        ):
            lines.append(
                "after a load's warm-up, the question typed during the head start:"
                if typed
                else "empty KV cache, nothing typed before Enter:"
            )
            for s, ms in ttft.items():
                lines.append(
                    f"  image attached {s:3.0f} s before Enter:     {ms:9.1f} ms   "
                    f"ratio {self.head_start_ratio(s, typed):6.3f}"
                    + ("   (goal <= 0.2)" if s >= 5 else "")
                    + f"   ({left[s]:.0f} positions left to the ask once the work ahead ended)"
                )
        lines += [
            f"new chat, system prompt cached:           {self.new_chat_ttft_ms:9.1f} ms",
            f"new chat, from scratch:                   {self.new_chat_scratch_ttft_ms:9.1f} ms"
            f"   saving {self.system_saving:6.1%} (goal >= 40 %; the system prompt is {self.system_share:.1%} of the "
            "positions, the most it can save)",
            f"vision warm-up run after load:            {self.warm_up_encode_ms:9.1f} ms (the first encode, unwarmed)",
            f"first real encode after warm-up:          {self.first_encode_ms:9.1f} ms",
            f"steady encode:                            {self.steady_encode_ms:9.1f} ms"
            f"   ratio first / steady {self.first_encode_ratio:6.3f} (goal <= 1.2)",
        ]
        for title, turns in (
            ("old turns leave in steps of half the context, the kept ones move up in the KV cache", self.turns),
            ("old turns leave in steps, the kept ones computed again", self.turns_recomputed),
            ("baseline: old turns leave just enough", self.turns_just_enough),
        ):
            if turns:
                lines += _turns_report(title, turns, self.n_ctx)
        if self.turns and self.turns_just_enough:
            ours, theirs = _overflowed_mean(self.turns), _overflowed_mean(self.turns_just_enough)
            lines.append(f"mean overflowed turn, steps and moved / just enough: {ours / theirs:6.3f}")
        return "\n".join(lines)


def _overflowed_mean(turns: list[dict[str, float]]) -> float:
    over = [t["ttft_ms"] for t in turns if t["dropped_turns"] > 0] or [t["ttft_ms"] for t in turns]
    return statistics.fmean(over)


def own_cost_ratio(turns: list[dict[str, float]]) -> float:
    """Mean over the overflowed turns of: its prefill / (its own new positions × turn 2's prefill per position)."""
    base = turns[1] if len(turns) > 1 else turns[0]
    per_new = base["prefill_ms"] / max(1.0, base["new_positions"])
    over = [t for t in turns if t["dropped_turns"] > 0] or turns
    return statistics.fmean(t["prefill_ms"] / max(1e-9, per_new * t["own_positions"]) for t in over)


def _turns_report(title: str, turns: list[dict[str, float]], n_ctx: int) -> list[str]:
    base = turns[1] if len(turns) > 1 else turns[0]
    last = turns[-1]
    per_new = base["prefill_ms"] / max(1.0, base["new_positions"])
    moved = sum(t["shifted_positions"] > 0 for t in turns)
    big = [str(i + 1) for i, t in enumerate(turns) if t["new_positions"] > n_ctx / 2]
    drops = [
        f"{i + 1} ({t['dropped_turns']:.0f} out)"
        for i, t in enumerate(turns)
        if t["dropped_turns"] != (turns[i - 1]["dropped_turns"] if i else 0)
    ]
    over = _overflowed_mean(turns)
    return [
        f"long conversation ({title}):",
        f"  turn 2:                                 {base['ttft_ms']:9.1f} ms "
        f"({base['new_positions']:.0f} new positions, {base['reused_positions']:.0f} reused)",
        f"  turn {len(turns):<3d}:                               {last['ttft_ms']:9.1f} ms "
        f"({last['new_positions']:.0f} new, {last['reused_positions']:.0f} reused, "
        f"{last['dropped_turns']:.0f} old turns out)   ratio to turn 2 {last['ttft_ms'] / base['ttft_ms']:6.3f}",
        f"  mean overflowed turn:                   {over:9.1f} ms   ratio to turn 2 {over / base['ttft_ms']:6.3f}",
        f"  turn {len(turns)}'s prefill / its new positions at turn 2's rate: "
        f"{last['prefill_ms'] / max(1e-9, per_new * last['new_positions']):6.3f}",
        f"  mean overflowed turn's prefill / its own new positions at turn 2's rate: {own_cost_ratio(turns):6.3f}"
        "   (goal <= 2)",
        f"  turns whose kept turns moved up in the KV cache: {moved}",
        "  turns that re-prefilled more than half the context: " + (", ".join(big) or "none"),
        "  turns where old turns left the model's view: " + (", ".join(drops) or "none"),
    ]


def as_dict(b: LatencyBench) -> dict[str, Any]:
    out = asdict(b)
    out["head_start_ttft_ms"] = {str(k): v for k, v in b.head_start_ttft_ms.items()}
    out["head_start_positions"] = {str(k): v for k, v in b.head_start_positions.items()}
    out["typed_ttft_ms"] = {str(k): v for k, v in b.typed_ttft_ms.items()}
    out["typed_positions"] = {str(k): v for k, v in b.typed_positions.items()}
    extra = {
        "system_saving": b.system_saving,
        "system_share": b.system_share,
        "first_encode_ratio": b.first_encode_ratio,
    }
    if b.turns:
        extra["overflowed_own_cost_ratio"] = own_cost_ratio(b.turns)
    return {**out, **extra}


def _fresh_images(image: Path) -> Iterator[bytes]:
    """PNG bytes of `image` with one pixel changed each time: a new sha256, so never in the encode cache."""
    base = np.asarray(Image.open(image).convert("RGB")).copy()  # [H, W, 3] uint8
    n = 0
    while True:
        n += 1
        arr = base.copy()
        arr[0, 0] = (n % 256, (n // 256) % 256, 7)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        yield buf.getvalue()


def _greedy(n: int) -> Sampling:
    return Sampling(greedy=True, max_new_tokens=n)


def _ask(pipe: ChatPipeline, images: list[ImageSource], question: str, history: list[HistoryTurn]) -> AnswerRecord:
    stream = pipe.ask(images, question, history, sampling=_greedy(1))
    stream.read()
    return stream.record


def _with_head_start(pipe: ChatPipeline, image: bytes, seconds: float, typed: bool = False) -> float:
    """Work ahead for `seconds` (as the window does after a drop), then Enter with that same image: as in the
    window, the work ahead goes on to its end (it computes what the answer needs first), then the ask. With `typed`
    the question is typed during those seconds at an even pace; as in the window, each finished word asks for the
    work ahead again, which runs once the one before has ended, with the newest draft. Returns the time from Enter
    to the first token, the wait for the work ahead included."""
    t0 = time.perf_counter()
    drafts = [""] + ([QUESTION[: i + 1] for i, ch in enumerate(QUESTION) if ch == " "] if typed else [])
    newest = {"draft": "", "typing": True}

    def work_ahead() -> None:
        done = None
        while True:
            draft, typing = newest["draft"], newest["typing"]
            if draft != done:
                pipe.prepare([image], draft=str(draft))
                done = draft
            elif not typing:
                return
            else:
                time.sleep(0.005)

    worker = threading.Thread(target=work_ahead)
    worker.start()
    for k, draft in enumerate(drafts[1:], start=1):
        time.sleep(max(0.0, seconds * k / len(drafts) - (time.perf_counter() - t0)))
        newest["draft"] = draft
    time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
    newest["typing"] = False
    enter = time.perf_counter()
    worker.join()
    waited = (time.perf_counter() - enter) * 1000
    record = _ask(pipe, [image], QUESTION, [])
    _computed_on_enter.append(_new_positions(record))
    return waited + record.time_to_first_token_ms


_computed_on_enter: list[int] = []  # positions prefilled after Enter, per head-start run (the structural figure)


def _new_positions(record: AnswerRecord) -> int:
    return record.context_used - len(record.token_ids) - record.reused_positions


def _median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def _encode_ms(pipe: ChatPipeline, data: bytes) -> float:
    from owl_desktop.engine.preprocess import preprocess

    return pipe.encode_images([preprocess(data, "bench")])[0].encode_ms


def run(
    bundle_ref: str | Path,
    settings: EngineSettings,
    image: Path,
    *,
    repeats: int = 3,
    turns: int = 30,
    system: str | None = None,
) -> LatencyBench:
    fresh = _fresh_images(image)
    with ChatPipeline.open(bundle_ref, replace(settings, disk_cache=False)) as pipe:
        # encodes: the warm-up is the vision tower's first run in this process; then a first real encode, then steady
        t0 = time.perf_counter()
        pipe.warm_up(system)
        warm_up_ms = (time.perf_counter() - t0) * 1000
        pipe.llm.reset()
        first_encode = _encode_ms(pipe, next(fresh))
        steady = _median(lambda: _encode_ms(pipe, next(fresh)), repeats)

        cold_positions: list[int] = []

        def cold() -> float:
            pipe.llm.reset()
            record = _ask(pipe, [next(fresh)], QUESTION, [])
            cold_positions.append(_new_positions(record))
            return record.time_to_first_token_ms

        def ahead(seconds: float) -> float:
            pipe.llm.reset()
            return _with_head_start(pipe, next(fresh), seconds)

        def typed_ahead(seconds: float) -> float:
            pipe.llm.reset()
            pipe.prepare(system=system)  # what warm_up leaves in the KV cache after a load
            return _with_head_start(pipe, next(fresh), seconds, typed=True)

        cold_ms = _median(cold, repeats)
        head, head_positions = {}, {}
        for s in HEAD_STARTS_S:
            _computed_on_enter.clear()
            head[s] = _median(lambda s=s: ahead(s), repeats)
            head_positions[s] = statistics.median(_computed_on_enter)
        typed, typed_positions = {}, {}
        for s in HEAD_STARTS_S:
            _computed_on_enter.clear()
            typed[s] = _median(lambda s=s: typed_ahead(s), repeats)
            typed_positions[s] = statistics.median(_computed_on_enter)

        # a new conversation: its image already encoded, so only the LLM's prefill differs
        known = next(fresh)
        _ask(pipe, [known], QUESTION, [])

        shares: list[float] = []

        def new_chat(cached_system: bool) -> float:
            pipe.llm.reset()
            if cached_system:
                pipe.prepare(system=system)  # what warm_up leaves in the KV cache after a load
            record = _ask(pipe, [known], QUESTION, [])
            if cached_system:
                shares.append(record.reused_positions / (record.reused_positions + _new_positions(record)))
            return record.time_to_first_token_ms

        with_system = _median(lambda: new_chat(True), repeats)
        scratch = _median(lambda: new_chat(False), repeats)

        return LatencyBench(
            threads=pipe.llm.threads,
            n_ctx=pipe.llm.n_ctx,
            cold_ttft_ms=cold_ms,
            cold_positions=statistics.median(cold_positions),
            head_start_ttft_ms=head,
            head_start_positions=head_positions,
            typed_ttft_ms=typed,
            typed_positions=typed_positions,
            new_chat_ttft_ms=with_system,
            new_chat_scratch_ttft_ms=scratch,
            system_share=statistics.median(shares),
            warm_up_encode_ms=warm_up_ms,
            first_encode_ms=first_encode,
            steady_encode_ms=steady,
            turns=_long_conversation(pipe, fresh, turns),
            turns_recomputed=_long_conversation(pipe, fresh, turns, shift=False),
            turns_just_enough=_long_conversation(pipe, fresh, turns, drop_block=0, shift=False),
        )


def _long_conversation(
    pipe: ChatPipeline, fresh: Iterator[bytes], n_turns: int, drop_block: int | None = None, shift: bool = True
) -> list[dict[str, float]]:
    """Turn after turn of one conversation (an image every third turn, answers long enough to overflow the context
    within a few turns), each asked after the previous one, as a user would: per turn TTFT and positions.
    `drop_block` 0: old turns leave just enough at a time (the baseline); None: the pipeline's steps. `shift`: the
    turns kept move up in the KV cache when old ones leave (ChatPipeline.shift_dropped)."""
    pipe.llm.reset()
    kept = pipe.drop_block, pipe.shift_dropped
    if drop_block is not None:
        pipe.drop_block = drop_block
    pipe.shift_dropped = shift
    try:
        return _turns(pipe, fresh, n_turns)
    finally:
        pipe.drop_block, pipe.shift_dropped = kept


def _own_positions(pipe: ChatPipeline, images: list[ImageSource], question: str, previous: list[HistoryTurn]) -> int:
    """The positions a turn adds to the conversation: its question and images, and the answer before it."""
    if not previous:
        return len(LlamaEngine.positions(pipe.build(images, question, [])[1]))
    before = previous[0]
    with_it = pipe.build(images, question, previous)[1]
    alone = pipe.build(before.images, before.question, [])[1]
    return len(LlamaEngine.positions(with_it)) - len(LlamaEngine.positions(alone))


def _turns(pipe: ChatPipeline, fresh: Iterator[bytes], n_turns: int) -> list[dict[str, float]]:
    answer_tokens = max(24, pipe.llm.n_ctx // 12)
    sentence_tokens = max(1, len(pipe.llm.tokenize(ANSWER_SENTENCE)))
    answer = (ANSWER_SENTENCE * (answer_tokens // sentence_tokens + 1)).strip()
    history: list[HistoryTurn] = []
    out: list[dict[str, float]] = []
    for i in range(n_turns):
        images: list[ImageSource] = [next(fresh)] if i % 3 == 0 else []
        question = f"Question {i + 1}: what about the part numbered {i + 1}?"
        record = _ask(pipe, images, question, history)
        out.append(
            {
                "ttft_ms": record.time_to_first_token_ms - record.encode_ms,
                "prefill_ms": record.prefill_ms,
                "new_positions": _new_positions(record),
                "own_positions": _own_positions(pipe, images, question, history[-1:]),
                "reused_positions": record.reused_positions,
                "shifted_positions": record.shifted_positions,
                "dropped_turns": record.dropped_turns,
            }
        )
        history.append(HistoryTurn(images, question, answer))
    return out

"""The mPLUG-Owl prompt: exact text, reference-identical ids with a real SentencePiece model, context budget."""

from __future__ import annotations

import re

import pytest
import sentencepiece as spm

from owl_desktop.bundle import DEFAULT_SYSTEM, PromptTemplate
from owl_desktop.devtools.tiny_checkpoint import train_tokenizer
from owl_desktop.engine.prompt import (
    ImageSegment,
    Prompt,
    TextSegment,
    Turn,
    answer_floor,
    build_prompt,
    render_text,
    settled_words,
)
from owl_desktop.errors import ContextFull, PromptError

SYS = DEFAULT_SYSTEM
Q1, A1 = "What is in this picture?", "A cat sitting on a wooden chair near the window."
Q2, A2 = "What colour is the cat?", "The cat is orange with white paws."
Q3 = "Compare the two photos."


@pytest.fixture(scope="session")
def sp(tmp_path_factory: pytest.TempPathFactory) -> spm.SentencePieceProcessor:
    path = train_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
    proc = spm.SentencePieceProcessor(model_file=str(path))
    assert (proc.bos_id(), proc.eos_id()) == (1, 2)
    return proc


def encode(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    return list(sp.encode(text))  # no BOS: SentencePiece adds none unless asked


def chunks(text: str, answers: list[str]) -> list[str]:
    """The prompt text's chunks: split at <image> as the reference processor does, and (where ours differs from it)
    around each earlier answer, which is tokenized on its own, as is the text after it."""
    for a in answers:
        text = text.replace(f"AI: {a}\n", f"AI: <cut>{a}<cut>\n", 1)
    return [c for c in re.split("(<image>|<cut>)", text) if c and c != "<cut>"]


def answers_of(turns: list[Turn]) -> list[str]:
    return [t.answer.strip() for t in turns if t.answer is not None]


def reference_ids(sp: spm.SentencePieceProcessor, text: str, answers: list[str], rows: int = 65) -> list[int]:
    """The reference processor's _tokenize_prompt, written out: BOS, then each chunk on its own."""
    ids = [1]
    for chunk in chunks(text, answers):
        ids += [-1] * rows if chunk == "<image>" else encode(sp, chunk)
    return ids


def three_turns() -> list[Turn]:
    return [
        Turn(["img-a"], Q1, A1),
        Turn([], Q2, A2),
        Turn(["img-b", "img-c"], Q3),
    ]


# ---------------------------------------------------------------------------------------------- text


def test_text_one_image() -> None:
    assert render_text([Turn(["k"], Q1)]) == f"{SYS}\nHuman: <image>\nHuman: {Q1}\nAI: "


def test_text_two_images() -> None:
    text = render_text([Turn(["k1", "k2"], Q3)])
    assert text == f"{SYS}\nHuman: <image>\nHuman: <image>\nHuman: {Q3}\nAI: "


def test_text_only() -> None:
    assert render_text([Turn([], "Hello?")]) == f"{SYS}\nHuman: Hello?\nAI: "


def test_text_three_turns() -> None:
    expected = (
        f"{SYS}\nHuman: <image>\nHuman: {Q1}\nAI: {A1}"
        f"\nHuman: {Q2}\nAI: {A2}"
        f"\nHuman: <image>\nHuman: <image>\nHuman: {Q3}\nAI: "
    )
    assert render_text(three_turns()) == expected


def test_custom_system_and_whitespace() -> None:
    turns = [Turn(["k"], "  Describe it.\n", " An owl. "), Turn([], "Why?")]
    assert (
        render_text(turns, system="Be brief.")
        == "Be brief.\nHuman: <image>\nHuman: Describe it.\nAI: An owl.\nHuman: Why?\nAI: "
    )
    assert render_text([Turn([], "Hi")], system="") == "Human: Hi\nAI: "
    tpl = PromptTemplate(system="S", human="User: ", ai="Bot: ")
    assert render_text([Turn(["k"], "Hi")], template=tpl) == "S\nUser: <image>\nUser: Hi\nBot: "


# ---------------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "turns",
    [
        [Turn(["k"], Q1)],
        [Turn(["k1", "k2"], Q3)],
        [Turn([], "Hello, how are you today?")],
        three_turns(),
    ],
    ids=["one-image", "two-images", "text-only", "three-turns"],
)
def test_ids_match_reference_processor(sp: spm.SentencePieceProcessor, turns: list[Turn]) -> None:
    prompt = build_prompt(turns, lambda t: encode(sp, t))
    assert prompt.text == render_text(turns)
    assert prompt.input_ids() == reference_ids(sp, prompt.text, answers_of(turns))
    assert prompt.n_positions == len(prompt.input_ids())
    assert prompt.dropped_turns == 0 and prompt.max_new_tokens == 512
    # segments alternate text / image, BOS once at the very start, images in order with their keys
    assert isinstance(prompt.segments[0], TextSegment) and prompt.segments[0].ids[0] == 1
    assert sum(isinstance(s, TextSegment) and 1 in s.ids for s in prompt.segments) == 1
    kinds = [type(s) for s in prompt.segments]
    assert all(a is not b for a, b in zip(kinds, kinds[1:], strict=False))
    keys = [k for t in turns for k in t.images]
    assert prompt.image_keys == keys
    images = [s for s in prompt.segments if isinstance(s, ImageSegment)]
    assert [s.index for s in images] == list(range(len(keys)))
    assert all(s.rows == 65 for s in images)


def test_dummy_prefix_and_trailing_space(sp: spm.SentencePieceProcessor) -> None:
    prompt = build_prompt([Turn(["k1", "k2"], Q1)], lambda t: encode(sp, t))
    texts = [s for s in prompt.segments if isinstance(s, TextSegment)]
    assert len(texts) == 3
    for after_image in texts[1:]:
        pieces = [sp.id_to_piece(i) for i in after_image.ids[:2]]
        assert pieces == ["▁", "<0x0A>"]  # "\nHuman: …" tokenized alone: dummy prefix, then the newline byte
    assert sp.id_to_piece(texts[-1].ids[-1]) == "▁"  # "AI: " keeps its trailing space
    assert sp.decode(texts[0].ids[1:]) == f"{SYS}\nHuman: "  # the chunk before the image keeps its space


def test_a_follow_up_starts_with_the_previous_prompt_then_the_answer_as_a_model_writes_it(
    sp: spm.SentencePieceProcessor,
) -> None:
    tok = lambda t: encode(sp, t)  # noqa: E731
    asked = build_prompt([Turn(["k"], Q1)], tok).input_ids()
    follow = build_prompt([Turn(["k"], Q1, A1), Turn([], Q2)], tok).input_ids()
    # what the KV cache holds after the first answer: its prompt ("…AI: " ends with "▁"), then the answer's tokens
    assert follow[: len(asked)] == asked and sp.id_to_piece(asked[-1]) == "▁"
    written = encode(sp, A1)  # a model trained on mPLUG-Owl's data writes "▁A", "▁cat", … after that "▁"
    assert follow[len(asked) : len(asked) + len(written)] == written
    assert follow[len(asked) + len(written) :] == encode(sp, f"\nHuman: {Q2}\nAI: ")  # on its own, as after an image


def test_tokenizer_sees_only_text_chunks(sp: spm.SentencePieceProcessor) -> None:
    seen: list[str] = []

    def tokenize(text: str) -> list[int]:
        seen.append(text)
        return encode(sp, text)

    build_prompt(three_turns(), tokenize)
    assert seen and all("<image>" not in s for s in seen)
    assert "\nHuman: " in seen  # the text between two images of one turn


def test_typed_image_tag_is_text_not_a_slot(sp: spm.SentencePieceProcessor) -> None:
    prompt = build_prompt([Turn(["k"], "What does <image> mean?")], lambda t: encode(sp, t))
    assert prompt.image_keys == ["k"]
    assert prompt.input_ids().count(-1) == 65
    assert "What does <image> mean?" in sp.decode([i for i in prompt.input_ids() if i >= 0])


def test_custom_image_rows_and_bos(sp: spm.SentencePieceProcessor) -> None:
    prompt = build_prompt([Turn(["k"], Q1)], lambda t: encode(sp, t), image_rows=5, bos_id=7)
    assert prompt.input_ids()[0] == 7
    assert prompt.input_ids().count(-1) == 5


# ---------------------------------------------------------------------------------------------- budget


def cost(sp: spm.SentencePieceProcessor, turns: list[Turn], system: str = SYS) -> int:
    return len(reference_ids(sp, render_text(turns, system=system), answers_of(turns)))


def long_conversation(n: int) -> list[Turn]:
    turns = [
        Turn([f"img-{i}"] if i % 2 == 0 else [], f"Question number {i}: what do you see?", f"Answer {i}: " + A1 * 2)
        for i in range(n)
    ]
    return [*turns, Turn(["img-now"], "And in this one?")]


def test_drops_oldest_turns_to_fit(sp: spm.SentencePieceProcessor) -> None:
    turns = long_conversation(12)
    n_ctx, reserve = 700, 128
    prompt = build_prompt(turns, lambda t: encode(sp, t), n_ctx=n_ctx, max_new_tokens=reserve)
    k = prompt.dropped_turns
    assert 0 < k < len(turns) - 1
    # independent check: the kept turns are the longest suffix that leaves the answer its floor (a quarter of 128)
    floor = answer_floor(reserve)
    assert floor == 32
    assert prompt.text == render_text(turns[k:])
    assert prompt.input_ids() == reference_ids(sp, prompt.text, answers_of(turns[k:]))
    assert prompt.n_positions == cost(sp, turns[k:]) and prompt.n_positions + floor <= n_ctx
    assert cost(sp, turns[k - 1 :]) + floor > n_ctx
    assert prompt.max_new_tokens == min(reserve, n_ctx - prompt.n_positions)
    assert prompt.image_keys[-1] == "img-now"
    assert prompt.image_keys == [key for t in turns[k:] for key in t.images]


def test_old_turns_leave_in_blocks_so_the_prefix_stays_the_same(sp: spm.SentencePieceProcessor) -> None:
    """Turn after turn of a growing conversation: dropping just enough changes the kept first turn at nearly every
    turn (so the KV cache is re-prefilled), dropping in blocks keeps it for several turns, then jumps."""
    n_ctx, reserve, block = 700, 128, 350
    grown = long_conversation(24)
    history, asked = grown[:-1], grown[-1]
    firsts: dict[int, list[int]] = {0: [], block: []}
    for n in range(1, len(history) + 1):
        turns = [*history[:n], asked]
        for step in firsts:
            prompt = build_prompt(turns, lambda t: encode(sp, t), n_ctx=n_ctx, max_new_tokens=reserve, drop_block=step)
            k = prompt.dropped_turns
            assert prompt.text == render_text(turns[k:]) and prompt.n_positions + prompt.max_new_tokens <= n_ctx
            firsts[step].append(k)
    just_enough, blocks = firsts[0], firsts[block]
    assert all(b >= j for b, j in zip(blocks, just_enough, strict=True))  # never more than fits
    changes = [sum(1 for a, b in zip(ks, ks[1:], strict=False) if a != b) for ks in (just_enough, blocks)]
    print(f"turns whose kept prefix changed: just enough {changes[0]}, in blocks {changes[1]} of {len(history)}")
    assert changes[0] > 2 * changes[1] > 0


def test_the_answer_room_shrinks_to_its_floor_before_old_turns_leave_and_grows_back(
    sp: spm.SentencePieceProcessor,
) -> None:
    """A growing conversation, built as the pipeline builds it (old turns leave in blocks of half the context)."""
    n_ctx, longest, block = 1200, 256, 600
    floor = answer_floor(longest)
    assert floor == 64
    grown = long_conversation(30)
    history, asked = grown[:-1], grown[-1]
    rooms: list[tuple[int, int]] = []  # (turns left out, room for the answer) at each turn
    for n in range(len(history) + 1):
        turns = [*history[:n], asked]
        prompt, one_by_one = (
            build_prompt(turns, lambda t: encode(sp, t), n_ctx=n_ctx, max_new_tokens=longest, drop_block=step)
            for step in (block, 0)
        )
        k, least = prompt.dropped_turns, one_by_one.dropped_turns
        assert prompt.max_new_tokens == min(longest, n_ctx - prompt.n_positions) >= floor
        if least:  # turns leave only when keeping one more would cut the answer's room below its floor
            assert cost(sp, turns[least - 1 :]) + floor > n_ctx
        assert k >= least and (k == 0) == (least == 0)
        rooms.append((k, prompt.max_new_tokens))
    print("(turns left out, answer room) per turn:", rooms)
    drops = [i for i in range(1, len(rooms)) if rooms[i][0] > rooms[i - 1][0]]
    assert len(drops) >= 2
    for start, drop in zip([0, *drops], drops, strict=False):
        kept = [room for _, room in rooms[start:drop]]
        # with the same turns kept, the room shrank from the longest answer towards its floor, turn by turn …
        assert kept[0] == longest and kept == sorted(kept, reverse=True) and kept[-1] < longest
        # … until a block of old turns left, and the room grew back to the longest answer
        assert rooms[drop][1] == longest


def test_keeping_every_turn_refuses_what_cannot_fit(sp: spm.SentencePieceProcessor) -> None:
    turns = long_conversation(12)
    needed = cost(sp, turns) + 16
    with pytest.raises(ContextFull, match=rf"needs {needed} positions.*holds 700") as err:
        build_prompt(turns, lambda t: encode(sp, t), n_ctx=700, drop_old_turns=False)
    assert (err.value.needed, err.value.available) == (needed, 700)
    # with room for every turn, all are kept and the answer gets what is left
    prompt = build_prompt(turns, lambda t: encode(sp, t), n_ctx=needed + 10, drop_old_turns=False)
    assert prompt.dropped_turns == 0 and prompt.text == render_text(turns)
    assert prompt.max_new_tokens == 26


def test_nothing_dropped_when_it_fits(sp: spm.SentencePieceProcessor) -> None:
    turns = long_conversation(3)
    prompt = build_prompt(turns, lambda t: encode(sp, t))
    assert prompt.dropped_turns == 0
    assert prompt.max_new_tokens == 512


def test_answer_room_is_capped_so_the_current_turn_fits(sp: spm.SentencePieceProcessor) -> None:
    n = next(n for n in range(1, 40) if cost(sp, [Turn(["k"] * n, Q3)]) > 2048 - 512)  # the answer's room is cut
    turns = [Turn([f"old{i}" for i in range(8)], Q1, A1), Turn([f"k{i}" for i in range(n)], Q3)]
    current = cost(sp, turns[-1:])
    assert 2048 - 512 < current < 2048 - 16 and cost(sp, turns) + answer_floor(512) > 2048
    prompt = build_prompt(turns, lambda t: encode(sp, t))
    assert prompt.dropped_turns == 1
    assert prompt.n_positions == current
    assert prompt.max_new_tokens == 2048 - current
    assert prompt.image_keys == [f"k{i}" for i in range(n)]


def test_too_many_images_for_one_turn(sp: spm.SentencePieceProcessor) -> None:
    turn = Turn([f"k{i}" for i in range(40)], Q3)
    text_tokens = cost(sp, [turn]) - 40 * 65
    fit = (2048 - 16 - text_tokens) // 65
    with pytest.raises(PromptError, match=rf"too many images.*40 images.*at most {fit} images fit") as err:
        build_prompt([Turn(["a"], Q1, A1), turn], lambda t: encode(sp, t))
    assert "65 each" in str(err.value)


def test_too_long_question(sp: spm.SentencePieceProcessor) -> None:
    with pytest.raises(PromptError, match=r"question is too long.*shorten it by about \d+ tokens"):
        build_prompt([Turn([], "the cat sat on the mat " * 400)], lambda t: encode(sp, t))


@pytest.mark.parametrize("question", ["", "   ", "\n\t "])
def test_empty_question(sp: spm.SentencePieceProcessor, question: str) -> None:
    with pytest.raises(PromptError, match="question is empty"):
        build_prompt([Turn(["k"], question)], lambda t: encode(sp, t))


def test_malformed_conversations(sp: spm.SentencePieceProcessor) -> None:
    tok = lambda t: encode(sp, t)  # noqa: E731
    with pytest.raises(PromptError, match="no question"):
        build_prompt([], tok)
    with pytest.raises(PromptError, match="already answered"):
        build_prompt([Turn([], Q1, A1)], tok)
    with pytest.raises(PromptError, match="turn 1 .* no answer"):
        build_prompt([Turn([], Q1), Turn([], Q2)], tok)


def test_prompt_is_plain_data(sp: spm.SentencePieceProcessor) -> None:
    prompt = build_prompt([Turn(("k",), Q1)], lambda t: encode(sp, t))
    assert isinstance(prompt, Prompt)
    assert Turn(["k"], Q1) == Turn(("k",), Q1)


# ---------------------------------------------------------------------------------------------- images of many sizes


def test_each_image_counts_its_own_positions_ureader_form(sp: spm.SentencePieceProcessor) -> None:
    # UReader: no system text; an image's views are contiguous, 65 positions each (here 4 and 21 views)
    views = {"receipt": 4, "card": 21}
    turns = [Turn(["receipt"], Q1, A1), Turn(["card"], Q2)]
    tok = lambda t: encode(sp, t)  # noqa: E731
    prompt = build_prompt(turns, tok, system="", image_rows=lambda k: 65 * views[k], max_new_tokens=64)
    text = f"Human: <image>\nHuman: {Q1}\nAI: {A1}\nHuman: <image>\nHuman: {Q2}\nAI: "
    assert prompt.text == text and prompt.dropped_turns == 0 and prompt.image_level == 0
    want = [1]
    for chunk in chunks(text, [A1]):
        if chunk == "<image>":
            want += [-1] * 65 * views["receipt" if want.count(-1) == 0 else "card"]
        else:
            want += encode(sp, chunk)
    assert prompt.input_ids() == want
    assert [s.rows for s in prompt.segments if isinstance(s, ImageSegment)] == [260, 1365]


def test_a_current_turn_too_big_takes_the_first_smaller_level_that_fits(sp: spm.SentencePieceProcessor) -> None:
    full = lambda k: 1365  # noqa: E731
    levels = [lambda k: 1105, lambda k: 845, lambda k: 390, lambda k: 130]
    turns = [Turn(["old"], Q1, A1), Turn(["a", "b"], Q3)]  # two 1,365-position documents: 2,730 > 2,048
    prompt = build_prompt(turns, lambda t: encode(sp, t), system="", image_rows=full, reduced_image_rows=levels)
    assert prompt.image_level == 2  # 2 × 845 fits, 2 × 1,105 does not
    images = [s for s in prompt.segments if isinstance(s, ImageSegment)]
    assert [(s.image_key, s.rows, s.level) for s in images] == [("a", 845, 2), ("b", 845, 2)]
    assert prompt.dropped_turns == 1  # the old turn (full detail, 1,365) is left out whole, never shrunk
    assert prompt.n_positions + 16 <= 2048

    fits = build_prompt([Turn(["a"], Q3)], lambda t: encode(sp, t), image_rows=full, reduced_image_rows=levels)
    assert fits.image_level == 0  # one document fits as it is: nothing is reduced without need

    with pytest.raises(PromptError, match=r"40 images take 5200 positions \(130 each\) even at the smallest level"):
        build_prompt(
            [Turn([f"k{i}" for i in range(40)], Q3)],
            lambda t: encode(sp, t),
            image_rows=full,
            reduced_image_rows=levels,
        )


def test_settled_words_are_the_finished_words_of_a_draft() -> None:
    """Work ahead prefills these while the question is typed: never the word still being typed."""
    assert settled_words("") == "" and settled_words("What") == "" and settled_words("  What") == ""
    assert settled_words("What is") == "What " and settled_words("What is ") == "What is "
    assert settled_words("  What is on\nthe sc") == "What is on\nthe "


def test_history_positions_end_where_the_current_turn_begins(sp: spm.SentencePieceProcessor) -> None:
    tpl = PromptTemplate()
    ids_of = lambda t: encode(sp, t)  # noqa: E731
    for current in (Turn([], Q2), Turn(["k"], Q2)):
        prompt = build_prompt([Turn(["a"], Q1, A1), current], ids_of)
        tail = prompt.input_ids()[prompt.history_positions :]
        question = ids_of("\n" + tpl.human + Q2 + "\n" + tpl.ai)
        if current.images:  # the image comes first, after its own "Human: " line
            assert tail == [*ids_of("\n" + tpl.human), *[-1] * 65, *question]
        else:
            assert tail == question
        assert prompt.history_positions == prompt.n_positions - len(tail)
    # a first question: its text joins the system prompt's, so nothing before it counts as history
    assert build_prompt([Turn([], Q1)], ids_of).history_positions == 0

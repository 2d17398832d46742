"""A conversation that outgrew the context: the turns kept are moved up in the KV cache, not computed again.

The model here is the tiny random checkpoint with its first layer's attention output zeroed: the keys and values
of its last layer then depend only on each position's own input (token or image row) and its position, never on
the positions before it. For it, a cache whose old turns were removed and the rest moved up (llama.cpp's position
shift, with RoPE turning the moved keys) holds what a cold prefill of the shortened prompt would, so the answers must
be the same. A shift that left the keys at their old angles, or moved them by the wrong amount, changes the last
layer's attention and the answer. (For a full model the moved positions keep what they attended to: close, not equal.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.engine.llm import MIN_SHIFT, LlmSettings, Sampling, Tokens
from owl_desktop.engine.pipeline import AnswerRecord, ChatPipeline, EngineSettings, HistoryTurn

EXACT = EngineSettings(llm=LlmSettings(flash_attn="off", kv_type="f32", n_threads=2, n_ctx=512), vision_dtype="float32")
GREEDY = Sampling(greedy=True, max_new_tokens=24)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shift")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=3)
    weights = ckpt / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True, map_location="cpu")
    state["language_model.model.layers.0.self_attn.o_proj.weight"].zero_()  # layer 0: no mixing across positions
    torch.save(state, weights)
    return convert_checkpoint(ckpt, root / "bundle", quant="F32")


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Iterator[ChatPipeline]:
    with ChatPipeline.open(bundle, EXACT) as p:
        yield p


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pictures")
    out = []
    for i in range(10):  # a new picture at every turn (one seen before would match the cache where it is)
        p = root / f"p{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def _tokens(pipe: ChatPipeline, n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(10, pipe.llm.n_vocab - 10, n)]


def test_removing_a_stretch_and_moving_the_rest_up_equals_a_cold_prefill(pipe: ChatPipeline) -> None:
    llm = pipe.llm
    head, gap, tail = _tokens(pipe, 20, 1), _tokens(pipe, 90, 2), _tokens(pipe, 120, 3)
    llm.reset()
    llm.prefill([Tokens(head + gap + tail)])
    positions, reused = llm.prefill([Tokens(head + tail)], shift_within=10_000)
    assert (positions, reused, llm.last_shifted) == (len(head + tail), len(head + tail) - 1, len(tail))
    moved = llm.last_logits()

    llm.reset()
    assert llm.prefill([Tokens(head + tail)]) == (len(head + tail), 0)
    cold = llm.last_logits()
    np.testing.assert_allclose(moved, cold, rtol=0, atol=1e-3 * float(np.abs(cold).max()))

    # without `shift` the same cache is computed again from the gap on: nothing moves
    llm.reset()
    llm.prefill([Tokens(head + gap + tail)])
    assert llm.prefill([Tokens(head + tail)]) == (len(head + tail), len(head))
    assert llm.last_shifted == 0


def test_a_short_stretch_is_computed_again_rather_than_moved(pipe: ChatPipeline) -> None:
    llm = pipe.llm
    head, gap, tail = _tokens(pipe, 20, 4), _tokens(pipe, 50, 5), _tokens(pipe, MIN_SHIFT - 1, 6)  # too few to move
    llm.reset()
    llm.prefill([Tokens(head + gap + tail)])
    assert llm.prefill([Tokens(head + tail)], shift_within=10_000) == (len(head + tail), len(head))
    assert llm.last_shifted == 0


def test_only_the_history_moves(pipe: ChatPipeline) -> None:
    """Positions past `shift_within` (the question being asked) are never moved: a word deleted from a question
    must not leave the words after it with what they attended to."""
    llm = pipe.llm
    head, gap, tail = _tokens(pipe, 20, 7), _tokens(pipe, 30, 8), _tokens(pipe, 40, 9)
    llm.reset()
    llm.prefill([Tokens(head + gap + tail)])
    assert llm.prefill([Tokens(head + tail)], shift_within=len(head)) == (len(head + tail), len(head))
    assert llm.last_shifted == 0
    llm.reset()
    llm.prefill([Tokens(head + gap + tail)])
    llm.prefill([Tokens(head + tail)], shift_within=len(head) + 25)  # only the history's 25 positions move
    assert llm.last_shifted == 25


def test_a_moved_conversation_saved_and_restored_is_still_right(pipe: ChatPipeline) -> None:
    """Other prompts in between copy the cache to host memory and back: no copy holds keys the shift has not
    turned yet (the cache held a long stretch after the moved one, which a copy would have been taken for)."""
    llm = pipe.llm
    head, gap, tail, extra, other = (
        _tokens(pipe, n, seed) for n, seed in ((20, 10), (90, 11), (120, 12), (80, 13), (200, 14))
    )
    llm.reset()
    llm.prefill([Tokens(head + gap + tail + extra)])
    llm.prefill([Tokens(head + tail + [5])], shift_within=10_000)
    assert llm.last_shifted == len(tail)
    llm.prefill([Tokens(other)])  # a different conversation: the moved one is saved
    for prompt in (head + tail + [5, 6], head + tail + extra + [6]):
        llm.prefill([Tokens(prompt)])
        kept = llm.last_logits()
        llm.prefill([Tokens(other)])
        llm.reset()
        llm.prefill([Tokens(prompt)])
        cold = llm.last_logits()
        np.testing.assert_allclose(kept, cold, rtol=0, atol=1e-3 * float(np.abs(cold).max()))
        llm.reset()
        llm.prefill([Tokens(head + gap + tail + extra)])
        llm.prefill([Tokens(head + tail + [5])], shift_within=10_000)
        llm.prefill([Tokens(other)])


def _cold(pipe: ChatPipeline, imgs: list[Path], question: str, history: list[HistoryTurn], seen: AnswerRecord) -> str:
    """The turn asked again on an empty cache: the same tokens, the same turns left out."""
    pipe.llm.reset()
    stream = pipe.ask(imgs, question, history, sampling=GREEDY)
    text = stream.read()
    assert stream.record.token_ids == seen.token_ids and stream.record.dropped_turns == seen.dropped_turns
    return text


def _conversation(pipe: ChatPipeline, images: list[Path]) -> Iterator[tuple[AnswerRecord, int, Callable[[], str]]]:
    """Ten turns, a new picture each: per turn its record, the positions it prefilled beyond its own (the
    question, image and template, and the answer before it), and a cold run of the same turn (which leaves the
    cache as the conversation needs it). Yields before the turn joins the history."""
    pipe.llm.reset()
    history: list[HistoryTurn] = []
    for i in range(10):
        imgs = [images[i]]
        question = f"Question {i}: and what does part {i} say about the rest?"
        stream = pipe.ask(imgs, question, history, sampling=GREEDY)
        text = stream.read()
        record = stream.record
        new = record.context_used - len(record.token_ids) - record.reused_positions
        own = 65 + len(pipe.llm.tokenize(question)) + 40  # the turn and its template, the answer before it

        yield record, new - own, partial(_cold, pipe, imgs, question, list(history), record)
        history.append(HistoryTurn(imgs, question, text, record.token_ids))


def test_an_overflowing_conversation_moves_its_kept_turns_and_answers_as_cold(
    pipe: ChatPipeline, images: list[Path]
) -> None:
    """Turn after turn until old turns leave: the turn where they leave prefills only its own new positions, and
    its answer equals a cold run of the same (shortened) conversation."""
    shifted = 0
    for record, beyond_own, cold in _conversation(pipe, images):
        if record.shifted_positions:
            shifted += 1
            assert record.dropped_turns > 0 and beyond_own < 0
            kept = pipe.llm.last_logits()
            cold()
            np.testing.assert_allclose(pipe.llm.last_logits(), kept, rtol=0, atol=1e-3 * float(np.abs(kept).max()))
    assert shifted, "the conversation never outgrew the context"


def test_without_shifting_an_overflowing_turn_computes_the_kept_turns_again(
    pipe: ChatPipeline, images: list[Path]
) -> None:
    pipe.shift_dropped = False
    try:
        recomputed = []
        for record, beyond_own, _cold in _conversation(pipe, images):
            assert record.shifted_positions == 0
            recomputed.append(beyond_own)
        assert max(recomputed) > 64  # a kept turn computed again
    finally:
        pipe.shift_dropped = True

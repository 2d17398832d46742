"""A follow-up question reuses the previous turn's KV cache: its prompt, and its answer token for token.

The model here is scripted (scripted_model.py): after the prompt's last token (the `▁` of "AI: ") it writes 64
distinct words of the tiny tokenizer, then "." and an ending: EOS, the template's next "\\nHuman:" turn (a stop text),
or nothing (the answer is cut at its length limit). Its tokens are the ones the tokenizer gives the answer's text, as
a trained model's are (a random model's tokens are not: their text tokenizes otherwise, and a cache keyed by token
can only keep what matches). Checked through the engine, the app's chat service and the local API server.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image
from scripted_model import Vocab, make_scripted_bundle
from test_app_chat import make_settings

from owl_desktop.app.chat_service import ChatService, Finished
from owl_desktop.app.engine_queue import EngineQueue
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.engine.llm import LlamaEngine, LlmSettings, Sampling
from owl_desktop.engine.pipeline import AnswerRecord, ChatPipeline, EngineSettings, HistoryTurn
from owl_desktop.server.config import ServerConfig
from owl_desktop.server.host import StandaloneModel
from owl_desktop.server.runner import ApiServer
from owl_desktop.store.conversations import ConversationStore
from owl_desktop.store.images import ImageStore

EXACT = EngineSettings(llm=LlmSettings(flash_attn="off", kv_type="f32", n_threads=1), vision_dtype="float32")
N_WORDS = 64
ENDINGS = {"eos": ["</s>"], "next turn": ["<0x0A>", "H", "uman", ":", "▁mo", "</s>"]}
QUESTION, FOLLOW_UP = "Describe this picture in detail.", "Why is that?"


@dataclass(frozen=True)
class Talker:
    bundle: Path
    image: Path
    answer: str  # the text the model writes before its ending


def _words(vocab: Vocab) -> list[str]:
    """N_WORDS whole-word pieces ("▁chair") whose text the tokenizer splits back into exactly those pieces."""
    sp = vocab.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    words = [p for p in pieces if p.startswith("▁") and p[1:].isalpha() and len(p) > 3 and p != "▁mo"][:N_WORDS]
    assert len(words) == N_WORDS
    assert sp.encode(" ".join(w[1:] for w in words) + ".", out_type=str) == [*words, "."]
    return words


@pytest.fixture(scope="module", params=list(ENDINGS))
def talker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Talker:
    root = tmp_path_factory.mktemp("talker")
    words = _words(Vocab(make_checkpoint(root / "tok", "bin", preset="tiny", seed=0) / "tokenizer.model"))
    chain = [*words, ".", *ENDINGS[request.param]]
    bundle = make_scripted_bundle(root, dict(zip(chain, chain[1:], strict=False)), default=words[0])
    image = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 320, 3), dtype=np.uint8)).save(image)
    return Talker(bundle, image, " ".join(w[1:] for w in words) + ".")


def prompt_positions(record: AnswerRecord) -> int:
    return record.context_used - len(record.token_ids)


def answer_in_cache(record: AnswerRecord) -> int:
    """The tokens of the answer's text (its words and ".") that went into the KV cache. A token's KV is computed
    only when the model is to write another after it: so not for the last one of an answer cut at its length limit
    (the one position a follow-up then prefills of the previous turn). What the model wrote after the text (the
    template's next turn, cut as a stop text) is in the cache too, but no part of the next prompt; EOS never is."""
    return min(len(record.token_ids) - (record.stop_reason == "length"), N_WORDS + 1)


def test_a_follow_up_reuses_the_whole_previous_turn_and_answers_as_from_scratch(talker: Talker) -> None:
    with ChatPipeline.open(talker.bundle, EXACT) as pipe:
        for limit in (N_WORDS + 16, N_WORDS - 4):  # the whole answer, then one cut at its length limit
            pipe.llm.reset()
            greedy = Sampling(greedy=True, max_new_tokens=limit)
            first = pipe.ask([talker.image], QUESTION, sampling=greedy)
            text = first.read()
            assert talker.answer.startswith(text) and len(first.record.token_ids) >= N_WORDS - 4
            history = [HistoryTurn([talker.image], QUESTION, text)]
            follow = pipe.ask([], FOLLOW_UP, history, sampling=greedy)
            follow.read()
            assert follow.record.reused_positions == prompt_positions(first.record) + answer_in_cache(first.record)
            answer_tokens = min(len(first.record.token_ids), N_WORDS + 1)
            assert follow.record.reused_positions >= prompt_positions(first.record) + answer_tokens - 1

            pipe.llm.reset()
            cold = pipe.ask([], FOLLOW_UP, history, sampling=greedy)
            cold.read()
            assert cold.record.reused_positions == 0 and cold.record.token_ids == follow.record.token_ids
            assert prompt_positions(cold.record) == prompt_positions(follow.record)


def test_the_apps_follow_up_reuses_the_previous_turn(talker: Talker) -> None:
    svc = ChatService(ConversationStore(), ImageStore(), make_settings(max_new_tokens=N_WORDS + 16))
    try:
        svc.load_model(talker.bundle)
        conv = svc.store.create()
        first = [e for e in svc.ask(conv.id, QUESTION, [talker.image]) if isinstance(e, Finished)][0]
        follow = [e for e in svc.ask(conv.id, FOLLOW_UP, []) if isinstance(e, Finished)][0]
        assert first.message.text == talker.answer
        reused = follow.message.meta["reused_positions"]
        assert reused >= prompt_positions(first.record) + N_WORDS + 1  # the words and "." of the answer
    finally:
        svc.close()
        svc.store.close()


@pytest.fixture
def api(talker: Talker) -> Iterator[openai.OpenAI]:
    model = StandaloneModel(talker.bundle, EXACT, Sampling(), EngineQueue(max_waiting=1))
    model.load()
    try:
        with ApiServer(model, ServerConfig(port=0)) as server:
            yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    finally:
        model.close()


def test_an_api_client_sending_the_answer_back_gets_it_reused(talker: Talker, api: openai.OpenAI) -> None:
    image = "data:image/png;base64," + base64.b64encode(talker.image.read_bytes()).decode()
    messages: Any = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": QUESTION}],
        }
    ]
    model = api.models.list().data[0].id
    first = api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=N_WORDS + 16)
    answer = first.choices[0].message.content
    assert answer == talker.answer and first.usage is not None
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
    follow = api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    cached = (follow.model_extra or {})["timings"]["cache_n"]
    assert cached >= first.usage.prompt_tokens + N_WORDS + 1  # the previous prompt, the words and "."


# ---------------------------------------------------------------------------------------------------- a random model


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Talker:
    """The tiny random model: its tokens are seldom the ones its answer's text tokenizes into."""
    root = tmp_path_factory.mktemp("noisy")
    bundle = convert_checkpoint(
        make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0), root / "bundle", quant="F32"
    )
    image = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 320, 3), dtype=np.uint8)).save(image)
    return Talker(bundle, image, "")


def test_an_answer_given_back_in_the_tokens_the_model_wrote_is_reused_whole(noisy: Talker) -> None:
    greedy = Sampling(greedy=True, max_new_tokens=N_WORDS)
    with ChatPipeline.open(noisy.bundle, EXACT) as pipe:
        first = pipe.ask([noisy.image], QUESTION, sampling=greedy)
        text = first.read()
        written = first.record.token_ids
        assert first.record.stop_reason == "length" and pipe.llm.tokenize(text) != written
        follow_ups = {}
        for kept in (False, True):
            history = [HistoryTurn([noisy.image], QUESTION, text, written if kept else ())]
            pipe.llm.reset()
            pipe.ask([noisy.image], QUESTION, sampling=greedy).read()  # the KV cache as the first answer left it
            follow = pipe.ask([], FOLLOW_UP, history, sampling=greedy)
            follow.read()
            pipe.llm.reset()
            cold = pipe.ask([], FOLLOW_UP, history, sampling=greedy)
            cold.read()
            assert cold.record.token_ids == follow.record.token_ids
            follow_ups[kept] = follow.record.reused_positions
        previous = prompt_positions(first.record)
        # from its text alone, the answer is reused only as far as its text tokenizes into what the model wrote
        assert previous <= follow_ups[False] < previous + len(written) // 2
        # in its own tokens, all but the last (cut at the length limit, so never decoded: see answer_in_cache)
        assert follow_ups[True] == previous + len(written) - 1

        # tokens that do not spell the answer's text (an answer edited since, another model's tokens) are not used
        edited = [HistoryTurn([noisy.image], QUESTION, text + " (edited)", ids) for ids in (written, ())]
        with_ids, without = (pipe.build([], FOLLOW_UP, [turn])[1] for turn in edited)
        assert LlamaEngine.positions(with_ids) == LlamaEngine.positions(without)


def test_the_app_keeps_the_tokens_of_each_answer_for_the_follow_up(noisy: Talker) -> None:
    svc = ChatService(ConversationStore(), ImageStore(), make_settings(max_new_tokens=N_WORDS))
    try:
        svc.load_model(noisy.bundle)
        conv = svc.store.create()
        first = [e for e in svc.ask(conv.id, QUESTION, [noisy.image]) if isinstance(e, Finished)][0]
        follow = [e for e in svc.ask(conv.id, FOLLOW_UP, []) if isinstance(e, Finished)][0]
        seam = first.record.stop_reason == "length"  # the last token of a cut answer was never decoded
        written = len(first.record.token_ids)
        assert follow.message.meta["reused_positions"] == prompt_positions(first.record) + written - seam
    finally:
        svc.close()
        svc.store.close()

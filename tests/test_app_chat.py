"""ChatService end to end: the real engine on a tiny F32 bundle, the real SQLite store and image store."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl_desktop import paths
from owl_desktop.app.chat_service import (
    BUSY,
    NO_MODEL,
    ChatEvent,
    ChatService,
    Failed,
    Finished,
    Piece,
    Started,
    installed_models,
)
from owl_desktop.app.settings import Settings
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.errors import EngineError
from owl_desktop.store.conversations import ConversationStore
from owl_desktop.store.images import ImageStore

SEED = 1234


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("app-chat")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    bundle = convert_checkpoint(ckpt, root / "bundle-f32", quant="F32")
    out = {"bundle": bundle, "root": root}
    for i, (w, h) in enumerate([(320, 200), (150, 260)]):
        p = root / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out[f"img{i}"] = p
    (root / "notes.txt").write_text("not an image", encoding="utf-8")
    out["text"] = root / "notes.txt"
    return out


def make_settings(max_new_tokens: int = 8) -> Settings:
    s = Settings()
    s.engine.threads = 1  # the test machine is shared: one thread decodes the tiny model fastest
    s.engine.flash_attn = "off"
    s.engine.kv_type = "f32"
    s.engine.vision_dtype = "float32"
    s.sampling.seed = SEED
    s.sampling.max_new_tokens = max_new_tokens
    return s


class StepClock:
    """A clock that moves `step` seconds each time it is read (so every piece counts as a save point)."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def service(tiny: dict[str, Path]) -> Iterator[ChatService]:
    svc = ChatService(ConversationStore(), ImageStore(), make_settings(), clock=StepClock(2.0))
    svc.load_model(tiny["bundle"])
    yield svc
    svc.close()
    svc.store.close()


def run(events: Iterator[ChatEvent]) -> list[ChatEvent]:
    return list(events)


def text_of(events: list[ChatEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, Piece))


# ---------------------------------------------------------------------------------------------------- ask


def test_ask_streams_pieces_and_stores_both_messages_with_meta(service: ChatService, tiny: dict[str, Path]) -> None:
    store = service.store
    conv = store.create()
    events: list[ChatEvent] = []
    seen_while_streaming: list[tuple[str, str]] = []
    for ev in service.ask(conv.id, "What is in these pictures?", [tiny["img0"], tiny["img1"].read_bytes()]):
        events.append(ev)
        if isinstance(ev, Piece):
            started = events[0]
            assert isinstance(started, Started)
            saved = store.message(started.assistant_msg.id)
            seen_while_streaming.append((saved.meta["state"], saved.text))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    pieces = [e.text for e in events if isinstance(e, Piece)]
    assert len(pieces) >= 2  # the answer arrived in pieces, before the end
    # the partial answer is saved while streaming (every piece here, as the test clock moves 2 s per read)
    assert seen_while_streaming[0] == ("streaming", "")
    assert seen_while_streaming[-1] == ("streaming", "".join(pieces[:-1]))

    started, finished = events[0], events[-1]
    user, answer = store.messages(conv.id)
    assert user == started.user_msg and user.text == "What is in these pictures?"
    assert [r.name for r in user.images] == ["img0.png", "pasted image"]
    assert [service.images.read(r.sha256) for r in user.images] == [
        tiny["img0"].read_bytes(),
        tiny["img1"].read_bytes(),
    ]
    assert answer == finished.message and answer.id == started.assistant_msg.id
    assert answer.text == "".join(pieces) == finished.record.text and not answer.stopped
    meta = answer.meta
    assert meta["state"] == "done" and meta["model_id"] == service.loaded_model_id == "ckpt-f32"
    assert meta["seed"] == SEED == meta["sampling"]["seed"] and meta["sampling"]["max_new_tokens"] == 8
    assert meta["tokens"] == len(finished.record.token_ids) > 0
    assert meta["stop_reason"] in ("length", "eos") and meta["dropped_turns"] == 0
    assert meta["tokens_per_s"] > 0 and meta["ttft_ms"] > 0 and meta["prefill_ms"] > 0
    assert meta["context_size"] == 2048 and meta["context_used"] > 2 * 65
    assert [i["cached"] for i in meta["images"]] == [False, False]
    got = store.get(conv.id)
    assert got.title == "What is in these pictures?" and got.model_id == "ckpt-f32"
    assert "threads" in service.device_description

    # a follow-up question is answered with the first turn (and its images) as history
    events2 = run(service.ask(conv.id, "And the colours?", []))
    record2 = events2[-1].record
    assert isinstance(events2[-1], Finished) and record2.context_used > finished.record.context_used
    assert record2.reused_positions > 2 * 65  # the KV cache of the first turn was kept
    assert [m.role for m in store.messages(conv.id)] == ["user", "assistant", "user", "assistant"]


def test_same_seed_gives_the_same_answer(service: ChatService) -> None:
    a, b = service.store.create(), service.store.create()
    first = text_of(run(service.ask(a.id, "Tell me about owls.", [])))
    second = text_of(run(service.ask(b.id, "Tell me about owls.", [])))
    assert first == second and first


def test_old_turns_are_dropped_to_fit_a_small_context(tiny: dict[str, Path]) -> None:
    s = make_settings(max_new_tokens=64)
    s.engine.n_ctx = 256  # two turns with an image each and room for 64 new tokens do not fit
    svc = ChatService(ConversationStore(), ImageStore(), s)
    svc.load_model(tiny["bundle"])
    try:
        conv = svc.store.create()
        run(svc.ask(conv.id, "Describe it.", [tiny["img0"]]))
        last = run(svc.ask(conv.id, "Describe this one too.", [tiny["img1"]]))[-1]
        assert isinstance(last, Finished)
        assert last.record.dropped_turns == 1 == last.message.meta["dropped_turns"]
    finally:
        svc.close()
        svc.store.close()


# ---------------------------------------------------------------------------------------------------- stop


def test_stop_mid_answer_keeps_the_partial_text_marked_stopped(tiny: dict[str, Path]) -> None:
    svc = ChatService(ConversationStore(), ImageStore(), make_settings(max_new_tokens=200))
    svc.load_model(tiny["bundle"])
    try:
        conv = svc.store.create()
        events: list[ChatEvent] = []
        shown = ""
        for ev in svc.ask(conv.id, "Write a long story.", [tiny["img0"]]):
            events.append(ev)
            if isinstance(ev, Piece):
                shown += ev.text
                if sum(isinstance(e, Piece) for e in events) == 3:
                    t = threading.Thread(target=svc.stop)  # as the GUI thread would
                    t.start()
                    t.join()
        finished = events[-1]
        assert isinstance(finished, Finished)
        assert sum(isinstance(e, Piece) for e in events) == 3  # nothing after Stop
        msg = finished.message
        assert msg.stopped and msg.text == shown and msg.meta["state"] == "stopped"
        assert msg.meta["stop_reason"] == "cancelled" and msg.meta["tokens"] < 200
        assert svc.store.messages(conv.id)[-1] == msg
        # the next question works normally again
        again = run(svc.ask(conv.id, "Go on.", []))
        assert isinstance(again[-1], Finished) and not again[-1].message.stopped
    finally:
        svc.close()
        svc.store.close()


def test_stop_before_the_first_token_keeps_an_empty_stopped_answer(service: ChatService) -> None:
    conv = service.store.create()
    events = []
    for ev in service.ask(conv.id, "Never mind", []):
        events.append(ev)
        if isinstance(ev, Started):
            service.stop()
    assert [type(e) for e in events] == [Started, Finished]
    msg = events[-1].message
    assert msg.stopped and msg.text == "" and msg.meta["state"] == "stopped"
    assert isinstance(run(service.ask(conv.id, "Now answer", []))[-1], Finished)


def test_deleting_the_conversation_mid_answer_fails_cleanly(service: ChatService) -> None:
    conv = service.store.create()
    events = []
    for ev in service.ask(conv.id, "Talk to me", []):
        events.append(ev)
        if isinstance(ev, Piece):
            service.store.delete(conv.id)  # the next periodic save finds no message
    assert isinstance(events[-1], Failed)
    other = service.store.create()
    assert isinstance(run(service.ask(other.id, "Still working?", []))[-1], Finished)  # the engine is free


def test_an_abandoned_stream_is_saved_as_stopped(service: ChatService) -> None:
    conv = service.store.create()
    gen = service.ask(conv.id, "Hello there", [])
    started = next(gen)
    assert isinstance(started, Started)
    first = next(gen)
    assert isinstance(first, Piece)
    gen.close()  # e.g. the worker shutting down
    answer = service.store.message(started.assistant_msg.id)
    assert answer.stopped and answer.text == first.text and answer.meta["state"] == "stopped"
    assert not service.busy


def test_a_second_request_while_answering_is_refused(service: ChatService) -> None:
    conv = service.store.create()
    gen = service.ask(conv.id, "first", [])
    next(gen)
    assert run(service.ask(conv.id, "second", [])) == [Failed(BUSY)]
    rest = list(gen)
    assert isinstance(rest[-1], Finished)
    assert [m.text for m in service.store.messages(conv.id) if m.role == "user"] == ["first"]


# ---------------------------------------------------------------------------------------------------- regenerate / edit


def test_regenerate_replaces_the_last_answer_with_a_new_seed(service: ChatService, tiny: dict[str, Path]) -> None:
    store = service.store
    conv = store.create()
    run(service.ask(conv.id, "What is this?", [tiny["img0"]]))
    run(service.ask(conv.id, "Are you sure?", []))
    before = store.messages(conv.id)
    events = run(service.regenerate(conv.id))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    assert events[0].user_msg == before[2]
    after = store.messages(conv.id)
    assert len(after) == 4 and after[:3] == before[:3]
    assert after[3].id != before[3].id and after[3] == events[-1].message
    assert after[3].meta["seed"] != SEED  # a fresh seed even though the settings fix one
    assert all(t.cached for t in events[-1].record.images) and events[-1].record.reused_positions > 0


def test_edit_and_resend_rewrites_the_question_and_drops_what_followed(
    service: ChatService, tiny: dict[str, Path]
) -> None:
    store = service.store
    conv = store.create()
    run(service.ask(conv.id, "What colour is it?", [tiny["img0"]]))
    run(service.ask(conv.id, "Why?", []))
    first_q = store.messages(conv.id)[0]
    events = run(service.edit_and_resend(conv.id, first_q.id, "What shape is it?"))
    assert isinstance(events[-1], Finished)
    msgs = store.messages(conv.id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[0].id == first_q.id and msgs[0].text == "What shape is it?" and msgs[0].images == first_q.images
    assert msgs[0].meta["original_text"] == "What colour is it?"
    assert store.get(conv.id).title == "What shape is it?"
    assert events[-1].record.context_used < 200  # the second turn is gone from the prompt
    answer = msgs[1]
    assert run(service.edit_and_resend(conv.id, answer.id, "x")) == [
        Failed("Only your own questions in this conversation can be edited.")
    ]


# ---------------------------------------------------------------------------------------------------- failures


def test_a_bad_image_fails_before_anything_is_stored(service: ChatService, tiny: dict[str, Path]) -> None:
    store = service.store
    conv = store.create()
    run(service.ask(conv.id, "First question", [tiny["img0"]]))
    before = store.messages(conv.id)
    events = run(service.ask(conv.id, "Compare", [tiny["img1"], tiny["text"]]))
    assert len(events) == 1 and isinstance(events[0], Failed) and events[0].user_msg is None
    assert "notes.txt" in events[0].message and "not an image" in events[0].message
    assert store.messages(conv.id) == before
    missing = run(service.ask(conv.id, "Compare", [tiny["root"] / "gone.png"]))
    assert isinstance(missing[0], Failed) and "no such file" in missing[0].message
    assert run(service.ask(conv.id, "   ", [tiny["img0"]]))[0] == Failed("Type a question about the images first.")
    assert store.messages(conv.id) == before
    # and the conversation goes on
    assert isinstance(run(service.ask(conv.id, "Second question", []))[-1], Finished)


def test_without_a_model_the_question_is_kept_and_regenerate_retries_it(tiny: dict[str, Path]) -> None:
    svc = ChatService(ConversationStore(), ImageStore(), make_settings())
    try:
        conv = svc.store.create()
        events = run(svc.ask(conv.id, "Anyone there?", [tiny["img0"]]))
        assert isinstance(events[0], Started) and events[-1] == Failed(NO_MODEL, events[0].user_msg, None)
        msgs = svc.store.messages(conv.id)
        assert [(m.role, m.text) for m in msgs] == [("user", "Anyone there?")]
        assert run(svc.regenerate(conv.id)) == [Failed(NO_MODEL)]
        svc.load_model(tiny["bundle"])
        retry = run(svc.regenerate(conv.id))
        assert isinstance(retry[-1], Finished) and retry[0].user_msg == msgs[0]
        assert [m.role for m in svc.store.messages(conv.id)] == ["user", "assistant"]
        assert svc.settings.last_model_id == "ckpt-f32"
        svc.unload()
        assert svc.loaded_model_id is None and svc.device_description == ""
    finally:
        svc.close()
        svc.store.close()


def test_a_question_too_long_for_the_context_is_a_clear_failure(service: ChatService) -> None:
    conv = service.store.create()
    events = run(service.ask(conv.id, "owl " * 3000, []))
    assert isinstance(events[-1], Failed) and "too long" in events[-1].message
    assert [m.role for m in service.store.messages(conv.id)] == ["user"]


def test_an_engine_error_mid_answer_keeps_the_partial_answer(
    service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = service.pipeline
    assert pipe is not None
    real_ask = pipe.ask

    class Breaking:
        def __init__(self, stream: object) -> None:
            self.stream = stream
            self.record = stream.record  # type: ignore[attr-defined]

        def __iter__(self) -> Iterator[str]:
            for i, piece in enumerate(self.stream):  # type: ignore[attr-defined]
                if i == 2:
                    raise EngineError("llama_decode failed (code -3)")
                yield piece

        def cancel(self) -> None:
            self.stream.cancel()  # type: ignore[attr-defined]

    monkeypatch.setattr(pipe, "ask", lambda *a, **k: Breaking(real_ask(*a, **k)))
    conv = service.store.create()
    events = run(service.ask(conv.id, "Go", []))
    failed = events[-1]
    assert isinstance(failed, Failed) and "llama_decode failed" in failed.message
    assert failed.partial is not None and failed.partial.text == text_of(events) and failed.partial.stopped
    assert failed.partial.meta["state"] == "failed"
    assert service.store.messages(conv.id)[-1] == failed.partial


# ---------------------------------------------------------------------------------------------------- models


def test_installed_models_lists_complete_bundles_only(tiny: dict[str, Path]) -> None:
    models = paths.ensure(paths.models_dir())
    shutil.copytree(tiny["bundle"], models / "ckpt-f32")
    (models / "half-written").mkdir()
    (models / "half-written" / "vision.safetensors").write_bytes(b"x")
    found = installed_models()
    assert [(m.id, m.quant, m.path) for m in found] == [("ckpt-f32", "F32", models / "ckpt-f32")]
    assert found[0].size == sum(p.stat().st_size for p in (models / "ckpt-f32").iterdir() if p.suffix != ".json")
    svc = ChatService(ConversationStore(), ImageStore(), make_settings())
    try:
        assert svc.installed_models() == found
        assert svc.load_model("ckpt-f32") == "ckpt-f32"  # by id, from the models dir
    finally:
        svc.close()
        svc.store.close()


def test_a_model_load_behind_an_api_request_says_so_and_can_be_cancelled(
    service: ChatService, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load that waits for another program's request names that request when it gives up (not "an answer is being
    written", which the window would not show), keeps the loaded model, and a cancelled load stops waiting at once."""
    from owl_desktop.app import chat_service
    from owl_desktop.app.engine_queue import API_REQUEST
    from owl_desktop.errors import Cancelled
    from owl_desktop.tasks import CancelToken, Task

    monkeypatch.setattr(chat_service, "WAIT_FOR_ENGINE_S", 0.3)
    loaded = service.loaded_model_id
    with service.queue.enter(API_REQUEST):
        with pytest.raises(EngineError) as err:
            service.load_model(tiny["bundle"])
        assert "local API server" in err.value.message and "not changed" in err.value.message
        assert service.loaded_model_id == loaded
        token = CancelToken()
        token.cancel()
        with pytest.raises(Cancelled):
            service.load_model(tiny["bundle"], Task(cancel=token))
    assert service.load_model(tiny["bundle"]) == loaded  # the engine free again: the load goes through

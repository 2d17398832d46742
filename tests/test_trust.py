"""Issue 10, "Trust", through the real components: numbers survive the n-gram ban, Stop stops at every stage, nothing
is lost on regenerate, edit or kill -9, the encode cache is keyed and kept safely, hostile exports are refused.

Models: the tiny random checkpoint (F32), scripted tiny checkpoints whose answers are fixed token by token
(tests/scripted_model.py), and the "slow" preset, big enough that encoding two dozen images or prefilling a long
history takes seconds on a CPU. Stop bounds are generous (STOP_BOUND_S); the measured figures are printed (-s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from hostile import link_folder, link_zip, lying_zip_bomb, traversal_folder, traversal_zip, zip_bomb
from PIL import Image
from scripted_model import Vocab, make_scripted_bundle
from test_app_chat import make_settings, run

from owl_desktop import bundle as bundle_mod
from owl_desktop.app.chat_service import ChatEvent, ChatService, Failed, Finished, Piece, Started
from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import BOS, make_checkpoint
from owl_desktop.engine import encode_cache
from owl_desktop.engine.encode_cache import EncodeCache, encoder_key
from owl_desktop.engine.llm import GenerationStats, LlmSettings, Sampling, Tokens
from owl_desktop.engine.pipeline import ChatPipeline, EngineSettings
from owl_desktop.engine.preprocess import preprocess
from owl_desktop.store.conversations import ConversationStore, StoreError
from owl_desktop.store.exchange import import_conversation
from owl_desktop.store.images import ImageStore, thumbnails_dir
from owl_desktop.tasks import CancelToken

EXACT = EngineSettings(
    llm=LlmSettings(flash_attn="off", kv_type="f32", n_threads=1), vision_device="cpu", vision_dtype="float32"
)
STOP_BOUND_S = 1.5  # "a few hundred milliseconds" asked; generous for a shared, busy test machine

# "1010…" to any prompt; after "▁What", a loop of words: "the large room the large room …"
COUNTING = {"1": "0", "0": "1", "▁What": "▁the", "▁the": "▁large", "▁large": "▁room", "▁room": "▁the"}
# "the." then the template's next turn, "\nHuman: mo", then EOS
TURN_TAKER = {"▁the": ".", ".": "<0x0A>", "<0x0A>": "H", "H": "uman", "uman": ":", ":": "▁mo", "▁mo": "</s>"}


def _png(path: Path, seed: int, size: tuple[int, int] = (96, 80)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@dataclass
class Scripted:
    bundle: Path
    vocab: Vocab


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trust-tiny")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    out = {"root": root, "bundle": convert_checkpoint(ckpt, root / "bundle-f32", quant="F32")}
    for i in range(2):
        out[f"img{i}"] = _png(root / f"img{i}.png", seed=i)
    return out


@pytest.fixture(scope="module")
def tiny_pipe(tiny: dict[str, Path]) -> Iterator[ChatPipeline]:
    with ChatPipeline.open(tiny["bundle"], EXACT) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory) -> Scripted:
    root = tmp_path_factory.mktemp("trust-counting")
    bundle = make_scripted_bundle(root, COUNTING, default="1")
    return Scripted(bundle, Vocab(root / "ckpt" / "tokenizer.model"))


@pytest.fixture(scope="module")
def counting_pipe(counting: Scripted) -> Iterator[ChatPipeline]:
    with ChatPipeline.open(counting.bundle, EXACT) as pipe:
        yield pipe


@pytest.fixture
def service(tiny: dict[str, Path]) -> Iterator[ChatService]:
    svc = ChatService(ConversationStore(), ImageStore(), make_settings())
    svc.load_model(tiny["bundle"])
    yield svc
    svc.close()
    svc.store.close()


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ChatService, list[Path]]]:
    """A service with the "slow" model loaded (vision on the CPU), and two dozen images none of it has seen."""
    root = tmp_path_factory.mktemp("trust-slow")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="slow", seed=0)
    bundle = convert_checkpoint(ckpt, root / "bundle-f32", quant="F32")
    settings = make_settings(max_new_tokens=8)
    settings.engine.vision_device = "cpu"
    svc = ChatService(ConversationStore(root / "chats.sqlite3"), ImageStore(root / "images"), settings)
    svc.load_model(bundle)
    images = [_png(root / f"photo{i}.png", seed=100 + i) for i in range(24)]
    yield svc, images
    svc.close()
    svc.store.close()


class StopLater:
    """Calls `stop` from another thread, `delay` seconds after start(); remembers when it did."""

    def __init__(self, stop: Callable[[], None], delay: float) -> None:
        self.stop = stop
        self.delay = delay
        self.fired_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        time.sleep(self.delay)
        self.fired_at = time.perf_counter()
        self.stop()

    def latency(self) -> float:
        """Seconds from the Stop to now (call it when the work has ended)."""
        now = time.perf_counter()
        self._thread.join()
        assert self.fired_at is not None
        return now - self.fired_at


def _stopped_answer(svc: ChatService, conv_id: str, question: str, images: list[Path], delay: float) -> float:
    """Ask, Stop `delay` s after the question is stored, check the answer ended empty and stopped; the latency."""
    stopper = StopLater(svc.stop, delay)
    events = []
    for ev in svc.ask(conv_id, question, images):
        events.append(ev)
        if isinstance(ev, Started):
            stopper.start()
    latency = stopper.latency()
    assert [type(e) for e in events] == [Started, Finished]
    finished = events[-1]
    assert finished.message.stopped and finished.message.text == "" and finished.message.meta["state"] == "stopped"
    assert finished.record.token_ids == [] and finished.record.stop_reason == "cancelled"
    return latency


# ---------------------------------------------------------------------------------------------------- numbers


def test_default_sampling_writes_repeated_digit_pairs(counting_pipe: ChatPipeline) -> None:
    greedy = counting_pipe.ask([], "Count for me.", sampling=Sampling(greedy=True, max_new_tokens=24))
    assert greedy.read() == "10" * 12  # "1 0" comes back twelve times: a 2-gram ban on digits would break it
    default = counting_pipe.ask([], "Count for me.", sampling=replace(Sampling(), seed=7, max_new_tokens=24))
    assert default.read() == greedy.record.text
    assert default.record.token_ids == greedy.record.token_ids


def test_the_ngram_ban_still_breaks_a_loop_of_words(counting: Scripted, counting_pipe: ChatPipeline) -> None:
    llm = counting_pipe.llm
    prompt = [Tokens([counting.vocab.id(BOS), counting.vocab.id("▁What")])]
    greedy = "".join(llm.generate(prompt, Sampling(greedy=True, max_new_tokens=12)))
    assert greedy == " ".join(["the large room"] * 4)
    stats = GenerationStats()
    sampled = "".join(llm.generate(prompt, replace(Sampling(), seed=7, max_new_tokens=12), stats))
    assert sampled.startswith("the large room the") and not sampled.startswith("the large room the large")

    def has_letter(token: int) -> bool:
        return any(ch.isalpha() for ch in llm.token_bytes(token).decode("utf-8", "ignore"))

    ids = stats.token_ids
    word_pairs = [(a, b) for a, b in zip(ids, ids[1:], strict=False) if has_letter(b)]
    assert len(word_pairs) == len(set(word_pairs))


# ---------------------------------------------------------------------------------------------------- where answers end


def test_stop_texts_end_the_answer_before_them(tiny: dict[str, Path], tiny_pipe: ChatPipeline) -> None:
    _, segments, _ = tiny_pipe.build([tiny["img0"]], "Describe it at length.", max_new_tokens=48)
    greedy = Sampling(greedy=True, max_new_tokens=48)
    plain = GenerationStats()
    full = "".join(tiny_pipe.llm.generate(segments, greedy, plain))
    middle = len(full) // 2
    stop = full[middle : middle + 3]
    cut = full.index(stop)
    assert cut > 0 and full[:cut].strip()

    never = full[-2:] + "\u2603 never written"  # the answer ends with its beginning: held back, then let go
    stats = GenerationStats()
    pieces = list(tiny_pipe.llm.generate(segments, greedy, stats, stop_texts=[never, stop]))
    assert "".join(pieces) == full[:cut].rstrip() and stats.stop_reason == "stop"
    # a stop text that never comes holds nothing back for good
    absent = GenerationStats()
    assert "".join(tiny_pipe.llm.generate(segments, greedy, absent, stop_texts=[never])) == full
    assert absent.stop_reason == plain.stop_reason


def test_the_answer_ends_where_the_model_starts_the_next_human_turn(tmp_path: Path) -> None:
    bundle = make_scripted_bundle(tmp_path, TURN_TAKER, default="▁the")
    with ChatPipeline.open(bundle, EXACT) as pipe:
        for sampling in (Sampling(greedy=True, max_new_tokens=16), replace(Sampling(), seed=3, max_new_tokens=16)):
            answer = pipe.ask([], "Hello?", sampling=sampling)
            pieces = list(answer)
            assert "".join(pieces) == "the." and answer.record.stop_reason == "stop"
            assert pipe.llm.detokenize(answer.record.token_ids) == "the.\nHuman:"  # what the model went on to write


def test_time_to_first_token_counts_the_image_encoding(tiny_pipe: ChatPipeline, tmp_path: Path) -> None:
    answer = tiny_pipe.ask(
        [_png(tmp_path / "new.png", seed=42)], "What is it?", sampling=Sampling(greedy=True, max_new_tokens=2)
    )
    answer.read()
    r = answer.record
    assert not r.images[0].cached and r.encode_ms > 0
    print(
        f"\ntime to first token {r.time_to_first_token_ms:.0f} ms: encode {r.encode_ms:.0f}, prefill {r.prefill_ms:.0f}"
    )
    assert r.time_to_first_token_ms >= r.encode_ms + r.prefill_ms


# ---------------------------------------------------------------------------------------------------- Stop


def test_stop_while_images_are_encoded(slow: tuple[ChatService, list[Path]]) -> None:
    svc, images = slow
    conv = svc.store.create()
    latency = _stopped_answer(svc, conv.id, "What do these have in common?", images, delay=0.5)
    print(f"\nStop while encoding {len(images)} images: the answer ended {latency * 1000:.0f} ms after Stop")
    assert not list(encode_cache.root().glob("*/*.npy"))  # stopped before the encode ended: no image was cached
    assert latency < STOP_BOUND_S
    after = run(svc.ask(svc.store.create().id, "And this one alone?", images[:1]))
    assert isinstance(after[-1], Finished) and not after[-1].message.stopped and after[-1].message.text


def test_stop_while_a_long_history_is_prefilled(slow: tuple[ChatService, list[Path]]) -> None:
    svc, _ = slow
    conv = svc.store.create()
    for i in range(3):
        svc.store.add_message(
            conv.id, "user", f"Part {i}: tell me everything about owls. " + "Owls hunt at night. " * 80
        )
        svc.store.add_message(conv.id, "assistant", "They do, and they fly without a sound. " * 50)
    assert svc.pipeline is not None
    svc.pipeline.llm.reset()  # none of it is in the KV cache: the whole history must be prefilled
    latency = _stopped_answer(svc, conv.id, "So what do owls eat?", [], delay=0.5)
    print(f"\nStop while prefilling a long history: the answer ended {latency * 1000:.0f} ms after Stop")
    assert latency < STOP_BOUND_S

    # the engine answers right after, and what the aborted prefill left in the KV cache is sound: the same
    # question gives the same answer as from an empty cache
    first = run(svc.ask(svc.store.create().id, "Short question?", []))
    assert isinstance(first[-1], Finished) and not first[-1].message.stopped
    svc.pipeline.llm.reset()
    again = run(svc.ask(svc.store.create().id, "Short question?", []))
    assert first[-1].record.token_ids == again[-1].record.token_ids


def test_stop_while_generating(slow: tuple[ChatService, list[Path]]) -> None:
    svc, _ = slow
    pipe = svc.pipeline
    assert pipe is not None
    answer = pipe.ask([], "Talk at length.", sampling=Sampling(greedy=True, max_new_tokens=400))
    stopper = StopLater(pipe.cancel, 0.0)
    for n, _piece in enumerate(answer, 1):
        if n == 3:
            stopper.start()
    latency = stopper.latency()
    print(f"\nStop while generating: the answer ended {latency * 1000:.0f} ms after Stop")
    assert answer.record.stop_reason == "cancelled" and len(answer.record.token_ids) < 400
    assert latency < STOP_BOUND_S
    again = pipe.ask([], "Still there?", sampling=Sampling(greedy=True, max_new_tokens=4))
    again.read()
    assert again.record.stop_reason in ("length", "eos") and again.record.token_ids


def test_a_stop_before_generation_begins_is_not_lost(tiny_pipe: ChatPipeline) -> None:
    greedy = Sampling(greedy=True, max_new_tokens=8)
    token = CancelToken()
    answer = tiny_pipe.ask([], "Hello?", sampling=greedy, cancel=token)  # the prompt is ready, no token asked for yet
    token.cancel()
    assert list(answer) == [] and answer.record.stop_reason == "cancelled" and answer.record.token_ids == []

    answer = tiny_pipe.ask([], "Hello?", sampling=greedy)
    tiny_pipe.cancel()  # the pipeline's own Stop reaches the request it has begun
    assert list(answer) == [] and answer.record.stop_reason == "cancelled"

    answer = tiny_pipe.ask([], "Hello?", sampling=greedy)  # a new request is not stopped by an old Stop
    assert answer.read() and answer.record.stop_reason in ("length", "eos")


def test_a_stop_before_the_use_case_runs_is_not_lost(service: ChatService) -> None:
    conv = service.store.create()
    events = service.ask(conv.id, "Hello?")  # asked for (e.g. queued to the engine thread), not running yet
    service.stop()
    finished = [e for e in events if isinstance(e, Finished)]
    assert finished and finished[0].message.stopped and finished[0].record.token_ids == []
    again = [e for e in service.ask(conv.id, "Hello again?") if isinstance(e, Finished)]
    assert again and not again[0].message.stopped  # an old Stop does not reach a later question


# ---------------------------------------------------------------------------------------------------- nothing lost


def _messages_while(events: Iterator[ChatEvent], store: ConversationStore, conv_id: str) -> dict[str, object]:
    """Run a use case; the store's messages at its Started and at its first Piece, and its last event."""
    seen: dict[str, object] = {}
    for ev in events:
        if isinstance(ev, Started):
            seen["started"] = store.messages(conv_id)
        elif isinstance(ev, Piece) and "piece" not in seen:
            seen["piece"] = store.messages(conv_id)
        seen["last"] = ev
    return seen


def _stop_at_started(svc: ChatService, events: Iterator[ChatEvent]) -> list[ChatEvent]:
    out = []
    for ev in events:
        out.append(ev)
        if isinstance(ev, Started):
            svc.stop()
    return out


def test_regenerate_keeps_the_old_answer_until_the_new_one_begins(service: ChatService, tiny: dict[str, Path]) -> None:
    store = service.store
    conv = store.create()
    run(service.ask(conv.id, "What is this?", [tiny["img0"]]))
    before = store.messages(conv.id)
    question, old = before

    # Stop before the new answer's first token: the old answer stays, as it was
    events = _stop_at_started(service, service.regenerate(conv.id))
    assert [type(e) for e in events] == [Started, Finished] and events[-1].message == old
    assert store.messages(conv.id) == before

    # a failure before the first token (the chat's system prompt no longer fits): the old answer stays
    store.set_system_prompt(conv.id, "Answer briefly. " * 1000)
    failed = run(service.regenerate(conv.id))
    assert isinstance(failed[-1], Failed) and "too long" in failed[-1].message
    assert store.messages(conv.id) == before
    store.set_system_prompt(conv.id, None)

    # the new answer's first token replaces it
    seen = _messages_while(service.regenerate(conv.id), store, conv.id)
    assert seen["started"][:2] == before  # the new answer is only an empty placeholder after it
    assert [m.id for m in seen["piece"]][:1] == [question.id] and old.id not in [m.id for m in seen["piece"]]
    finished = seen["last"]
    assert isinstance(finished, Finished) and store.messages(conv.id) == [question, finished.message]


def test_edit_changes_the_question_only_once_the_new_answer_begins(service: ChatService, tiny: dict[str, Path]) -> None:
    store = service.store
    conv = store.create()
    run(service.ask(conv.id, "What colour is it?", [tiny["img0"]]))
    run(service.ask(conv.id, "Why?", []))
    before = store.messages(conv.id)
    question = before[0]

    events = _stop_at_started(service, service.edit_and_resend(conv.id, question.id, "What shape is it?"))
    assert [type(e) for e in events] == [Started, Finished]
    assert events[0].user_msg.text == "What shape is it?"  # what the window shows meanwhile
    assert store.messages(conv.id) == before

    failed = run(service.edit_and_resend(conv.id, question.id, "owl " * 3000))
    assert isinstance(failed[-1], Failed) and "too long" in failed[-1].message
    assert store.messages(conv.id) == before

    seen = _messages_while(service.edit_and_resend(conv.id, question.id, "What shape is it?"), store, conv.id)
    assert seen["started"][: len(before)] == before
    at_first_piece = seen["piece"]
    assert [m.role for m in at_first_piece] == ["user", "assistant"]
    assert at_first_piece[0].id == question.id and at_first_piece[0].text == "What shape is it?"
    assert store.message(question.id).meta["original_text"] == "What colour is it?"
    assert isinstance(seen["last"], Finished)


_KILLED_APP = r"""
import sys
import time

from owl_desktop.app.chat_service import ChatService, Piece, Started
from owl_desktop.app.settings import Settings
from owl_desktop.store.conversations import ConversationStore
from owl_desktop.store.images import ImageStore

settings = Settings()
settings.engine.threads = 1
settings.engine.flash_attn = "off"
settings.engine.kv_type = "f32"
settings.sampling.seed = 5
settings.sampling.max_new_tokens = 1500
service = ChatService(ConversationStore(), ImageStore(), settings)
service.load_model(sys.argv[1])
conversation = service.store.create()
for event in service.ask(conversation.id, "Count for me, slowly.", []):
    if isinstance(event, Started):
        print(event.assistant_msg.id, flush=True)
    elif isinstance(event, Piece):
        time.sleep(0.02)  # a window drawing each piece: the answer takes half a minute
"""


def test_an_answer_cut_by_kill_9_is_kept_and_marked_interrupted(counting: Scripted, tmp_path: Path) -> None:
    errors = tmp_path / "app-stderr.txt"
    with errors.open("wb") as err:
        app = subprocess.Popen(
            [sys.executable, "-c", _KILLED_APP, str(counting.bundle)], stdout=subprocess.PIPE, stderr=err
        )
    watchdog = threading.Timer(180, app.kill)  # a hung child must not hang the test run
    watchdog.start()
    store = ConversationStore()
    try:
        assert app.stdout is not None
        line = app.stdout.readline()
        assert line, errors.read_text(errors="replace")
        answer_id = int(line)
        while not store.message(answer_id).text:  # the first periodic save of the partial answer
            assert app.poll() is None, errors.read_text(errors="replace")
            time.sleep(0.05)
        os.kill(app.pid, signal.SIGKILL)
        assert app.wait(timeout=30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if app.poll() is None:
            app.kill()
        app.wait()
        assert app.stdout is not None
        app.stdout.close()
    left = store.message(answer_id)
    assert left.meta["state"] == "streaming" and not left.stopped  # as the dead process left it
    store.close()

    restarted = ChatService(ConversationStore(), ImageStore(), make_settings())
    try:
        kept = restarted.store.message(answer_id)
        assert kept.text == left.text and kept.text == ("10" * 1000)[: len(kept.text)]
        assert kept.stopped and kept.meta["state"] == "interrupted"
        assert [m.role for m in restarted.store.messages(kept.conversation_id)] == ["user", "assistant"]
    finally:
        restarted.store.close()


# ---------------------------------------------------------------------------------------------------- encode cache


def test_encode_cache_rows_never_outlive_their_vision_weights_or_dtype(tiny: dict[str, Path], tmp_path: Path) -> None:
    # the same checkpoint folder name, converted again with other vision weights: the same bundle id
    other = convert_checkpoint(
        make_checkpoint(tmp_path / "ckpt", "bin", preset="tiny", seed=1), tmp_path / "bundle-f32", quant="F32"
    )
    a, b = bundle_mod.load(tiny["bundle"]), bundle_mod.load(other)
    vision = bundle_mod.VISION_FILE
    assert a.id == b.id and a.files[vision].sha256 != b.files[vision].sha256
    image = preprocess(tiny["img1"])

    def encode(bundle: Path, dtype: str) -> tuple[bool, np.ndarray]:
        with ChatPipeline.open(bundle, replace(EXACT, vision_dtype=dtype)) as pipe:
            timing = pipe.encode_images([image])[0]
            return timing.cached, pipe.image_rows(image)

    cached, rows = encode(tiny["bundle"], "float32")
    assert not cached
    cached, other_rows = encode(other, "float32")
    assert not cached and not np.allclose(other_rows, rows)
    cached, again = encode(tiny["bundle"], "float32")
    assert cached and np.array_equal(again, rows)  # from the disk, across pipelines
    cached, _ = encode(tiny["bundle"], "bfloat16")
    assert not cached


def test_a_damaged_cache_entry_is_encoded_again(tiny: dict[str, Path]) -> None:
    image = preprocess(tiny["img0"])
    with ChatPipeline.open(tiny["bundle"], EXACT) as first:
        rows = first.image_rows(image)
    [entry] = encode_cache.root().glob(f"*/{image.sha256}.npy")
    for damage in (b"", b"\x93NUMPY", entry.read_bytes()[:200]):  # empty, cut in the header, cut in the rows
        entry.write_bytes(damage)
        with ChatPipeline.open(tiny["bundle"], EXACT) as fresh:  # an empty memory cache: the disk is read
            timing = fresh.encode_images([image])[0]
            assert not timing.cached and np.array_equal(fresh.image_rows(image), rows)
        assert np.array_equal(np.load(entry), rows)  # and the entry is whole again


_CACHE_WRITER = r"""
import sys

import numpy as np

from owl_desktop.engine.encode_cache import EncodeCache

key, sha, value, times = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
cache = EncodeCache(key, capacity=1, on_disk=True)
rows = np.full((65, 4096), value, dtype=np.float32)  # 1 MiB, the size of a 7B image encode
for _ in range(times):
    cache.put(sha, rows)
"""


def test_two_processes_writing_one_cache_entry_never_leave_it_torn() -> None:
    key, sha = encoder_key("ab" * 32, "float32"), "cd" * 32
    writers = [
        subprocess.Popen([sys.executable, "-c", _CACHE_WRITER, key, sha, str(value), "40"], stderr=subprocess.PIPE)
        for value in (1.0, 2.0)
    ]
    reads, misses_after_first = 0, 0
    while any(w.poll() is None for w in writers):
        rows = EncodeCache(key, capacity=1, on_disk=True).get(sha)  # a fresh reader: always from the disk
        if rows is None:
            misses_after_first += reads > 0
            continue
        reads += 1
        assert rows.shape == (65, 4096) and np.unique(rows).tolist() in ([1.0], [2.0])
    for w in writers:
        assert w.wait() == 0, w.communicate()[1].decode()
    print(f"\n{reads} whole reads while two processes rewrote the entry 40 times each")
    assert reads > 0 and misses_after_first == 0  # once written, the entry is always whole
    assert [p.name for p in (encode_cache.root() / key).iterdir()] == [f"{sha}.npy"]  # no temporary file left


def test_prune_keeps_the_most_recently_used_entries_within_the_limit() -> None:
    keys = [encoder_key("ab" * 32, "float32"), encoder_key("ef" * 32, "bfloat16")]
    shas = [f"{i:064x}" for i in range(6)]
    rows = np.zeros((65, 256), dtype=np.float32)
    for i, sha in enumerate(shas):  # two encoder keys: the limit is for the whole cache folder
        EncodeCache(keys[i % 2], capacity=1, on_disk=True).put(sha, rows)
    files = {f.stem: f for f in encode_cache.root().glob("*/*.npy")}
    assert set(files) == set(shas)
    now = time.time()
    for i, sha in enumerate(shas):
        os.utime(files[sha], (now - 100 + i, now - 100 + i))  # written one second apart, the first oldest
    assert EncodeCache(keys[0], capacity=1, on_disk=True).get(shas[0]) is not None  # reading makes it recent
    size = files[shas[0]].stat().st_size
    assert encode_cache.prune(3 * size) == 3
    assert {f.stem for f in encode_cache.root().glob("*/*.npy")} == {shas[0], shas[4], shas[5]}


def test_deleting_a_conversation_removes_what_nothing_else_uses(service: ChatService, tiny: dict[str, Path]) -> None:
    store, images = service.store, service.images
    own, sharing = store.create(), store.create()
    run(service.ask(own.id, "How do these differ?", [tiny["img0"], tiny["img1"]]))
    run(service.ask(sharing.id, "And this one?", [tiny["img0"]]))
    shared, own_only = (r.sha256 for r in store.messages(own.id)[0].images)

    def files_of(sha: str) -> list[Path]:
        stored = [images.path(sha)] if images.has(sha) else []
        thumbs = list(thumbnails_dir().glob(f"{sha}-*.png"))
        return stored + thumbs + list(encode_cache.root().glob(f"*/{sha}.npy"))

    for sha in (shared, own_only):
        images.thumbnail(sha)
        images.thumbnail(sha, 64)
        assert len(files_of(sha)) == 4  # the image, two thumbnails, its encode

    assert service.delete_conversation(own.id) == 1
    assert files_of(own_only) == [] and len(files_of(shared)) == 4
    follow = run(service.ask(sharing.id, "Still there?", []))
    assert isinstance(follow[-1], Finished)
    assert service.delete_conversation(sharing.id) == 1 and files_of(shared) == []


# ---------------------------------------------------------------------------------------------------- hostile exports

HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "1 GiB zip bomb": (lambda d: zip_bomb(d / "bomb.owlchat.zip"), "unpacks to 1073741824 bytes; refused as unsafe"),
    "zip bomb with lying sizes": (lambda d: lying_zip_bomb(d / "liar.owlchat.zip"), "images/bomb.png is damaged"),
    "../ member": (lambda d: traversal_zip(d / "climb.owlchat.zip"), "unsafe path '../escape.png'"),
    "absolute member": (
        lambda d: traversal_zip(d / "absolute.owlchat.zip", str(d / "escape.png")),
        "images must be inside the export",
    ),
    "link member": (lambda d: link_zip(d / "link.owlchat.zip"), "holds a link (images/link.png)"),
    "../ in a folder": (lambda d: traversal_folder(d), "unsafe path '../secret.png'"),
    "link out of a folder": (lambda d: link_folder(d, _png(d / "elsewhere.png", 7)), "links outside the export"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_exports_are_refused_by_import(case: str, tmp_path: Path) -> None:
    build, reason = HOSTILE[case]
    path = build(tmp_path)
    store, images = ConversationStore(), ImageStore()
    try:
        with pytest.raises(StoreError) as refused:
            import_conversation(store, images, path)
        assert path.name in str(refused.value) and reason in str(refused.value)
        assert store.list() == [] and images.all() == []  # nothing stored
        assert not (tmp_path / "escape.png").exists()
    finally:
        store.close()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_exports_are_refused_by_ask(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build, reason = HOSTILE[case]
    args = ["ask", "--model", str(tmp_path / "never-loaded"), "--conversation", str(build(tmp_path)), "Hello?"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("owl-desktop: error: cannot use the conversation: ") and reason in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "escape.png").exists()

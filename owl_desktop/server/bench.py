"""`owl-desktop bench serve`: the API's cost over the engine, and what prefix reuse saves, in one run.

The server runs in this process on a free loopback port; requests go through a real socket as plain HTTP. Each
figure is measured against its baseline in the same run, alternating between the two to share any drift:

- time to first token and decode tokens/s of a streamed greedy answer through the API, against the same question
  through the engine directly (goals: TTFT <= 1.05x, decode >= 0.97x);
- a follow-up request's TTFT (the conversation so far repeated, as clients send it) against the same request with
  the KV cache emptied first (goal <= 0.25x);
- the same follow-up when another conversation (another client, or the window) ran in between;
- how long after a client disconnects mid-answer the engine is free again.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from owl_desktop.app.engine_queue import EngineQueue
from owl_desktop.engine.options import Sampling
from owl_desktop.engine.pipeline import EngineSettings
from owl_desktop.server.config import ServerConfig
from owl_desktop.server.host import StandaloneModel
from owl_desktop.server.runner import ApiServer

QUESTION = "Describe this picture in detail."
FOLLOW_UP = "Why?"


@dataclass
class ServeBench:
    api_ttft_ms: float
    engine_ttft_ms: float
    api_decode_tokens_per_s: float
    engine_decode_tokens_per_s: float
    follow_up_ttft_ms: float
    scratch_ttft_ms: float
    follow_up_cached_positions: int
    follow_up_prefilled_positions: int
    interleaved_ttft_ms: float
    interleaved_cached_positions: int
    disconnect_to_free_ms: float

    @property
    def ttft_ratio(self) -> float:
        return self.api_ttft_ms / self.engine_ttft_ms

    @property
    def decode_ratio(self) -> float:
        return self.api_decode_tokens_per_s / self.engine_decode_tokens_per_s

    @property
    def follow_up_ratio(self) -> float:
        return self.follow_up_ttft_ms / self.scratch_ttft_ms

    def report(self) -> str:
        return "\n".join(
            [
                f"time to first token, API:    {self.api_ttft_ms:9.1f} ms (1 image + question, KV empty)",
                f"time to first token, engine: {self.engine_ttft_ms:9.1f} ms",
                f"  ratio API / engine:        {self.ttft_ratio:9.3f}   (goal <= 1.05)",
                f"decode, API:                 {self.api_decode_tokens_per_s:9.1f} tokens/s",
                f"decode, engine:              {self.engine_decode_tokens_per_s:9.1f} tokens/s",
                f"  ratio API / engine:        {self.decode_ratio:9.3f}   (goal >= 0.97)",
                f"follow-up first token, API:  {self.follow_up_ttft_ms:9.1f} ms "
                f"({self.follow_up_cached_positions} positions reused, {self.follow_up_prefilled_positions} prefilled)",
                f"same request, KV emptied:    {self.scratch_ttft_ms:9.1f} ms",
                f"  ratio follow-up / scratch: {self.follow_up_ratio:9.3f}   (goal <= 0.25)",
                f"follow-up after another conversation ran: {self.interleaved_ttft_ms:.1f} ms "
                f"({self.interleaved_cached_positions} positions reused; "
                f"{self.interleaved_ttft_ms / self.scratch_ttft_ms:.3f}x scratch)",
                f"disconnect -> engine free:   {self.disconnect_to_free_ms:9.1f} ms (client left mid-answer)",
            ]
        )


def as_dict(b: ServeBench) -> dict[str, Any]:
    return {
        **asdict(b),
        "ttft_ratio": b.ttft_ratio,
        "decode_ratio": b.decode_ratio,
        "follow_up_ratio": b.follow_up_ratio,
    }


@dataclass
class _Streamed:
    text: str
    ttft_ms: float
    decode_tokens_per_s: float
    usage: dict[str, Any]
    timings: dict[str, Any]


def _events(r: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, as they arrive."""
    buf = b""
    while chunk := r.read1(65536):
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event.decode().removeprefix("data: ")
            if data != "[DONE]":
                yield json.loads(data)


def _post_stream(port: int, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    conn.request("POST", "/v1/chat/completions", body=payload, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"the API answered {r.status}: {r.read()[:300]!r}")
    return conn, r


def _stream(port: int, body: dict[str, Any]) -> _Streamed:
    """A streamed chat completion; times the first content piece and the rest (tokens from the usage chunk)."""
    t0 = time.perf_counter()
    conn, r = _post_stream(port, body)
    first = last = 0.0
    parts: list[str] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for obj in _events(r):
        for choice in obj.get("choices", []):
            piece = choice["delta"].get("content")
            if piece:
                last = time.perf_counter()
                first = first or last
                parts.append(piece)
        usage = obj.get("usage") or usage
        timings = obj.get("timings") or timings
    conn.close()
    tokens = int(usage.get("completion_tokens", 0))
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return _Streamed("".join(parts), (first - t0) * 1000, rate, usage, timings)


def _mirrored(image: Path) -> str:
    """Base64 PNG of the image mirrored: another picture of the same size."""
    from PIL import Image, ImageOps

    buf = io.BytesIO()
    with Image.open(image) as img:
        ImageOps.mirror(img.convert("RGB")).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _message(image_b64: str, text: str) -> dict[str, Any]:
    url = f"data:image/png;base64,{image_b64}"
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def run(
    bundle_ref: str | Path, settings: EngineSettings, image: Path, *, decode_tokens: int = 64, repeats: int = 3
) -> ServeBench:
    host = StandaloneModel(bundle_ref, settings, Sampling(), EngineQueue())
    host.load()
    try:
        with ApiServer(host, ServerConfig(port=0)) as server:
            return _measure(host, server.port, image, decode_tokens, repeats)
    finally:
        host.close()


def _reset(host: StandaloneModel) -> None:
    """Empty the KV cache (from-scratch prefills) while no request runs."""
    with host.queue.enter("bench", bounded=False):
        assert host.pipeline is not None
        host.pipeline.llm.reset()


def _engine_direct(host: StandaloneModel, image: Path, sampling: Sampling) -> tuple[float, float]:
    """(TTFT ms, decode tokens/s) of the same question through ChatPipeline.ask, timed like the API's stream.

    It runs on a fresh thread, as each API request does (and the app's engine worker): with llama.cpp's OpenMP
    threads, the main thread of a process that has run torch decodes several times slower on a small machine.
    """
    pipe = host.pipeline
    assert pipe is not None
    out: list[tuple[float, float]] = []

    def run() -> None:
        with host.queue.enter("bench", bounded=False):
            t0 = time.perf_counter()
            answer = pipe.ask([image], QUESTION, sampling=sampling)
            first = last = 0.0
            for piece in answer:
                if piece:
                    last = time.perf_counter()
                    first = first or last
        tokens = len(answer.record.token_ids)
        out.append(((first - t0) * 1000, (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0))

    worker = threading.Thread(target=run, name="owl-bench-engine")
    worker.start()
    worker.join()
    return out[0]


def _disconnect_to_free_ms(host: StandaloneModel, port: int, body: dict[str, Any]) -> float:
    """Start a long streamed answer, leave after two pieces, and time until the engine's queue is idle."""
    conn, r = _post_stream(port, {**body, "max_tokens": 100_000})
    pieces = 0
    for obj in _events(r):
        choice = obj["choices"][0]
        if choice["finish_reason"] is not None:
            raise RuntimeError("the answer ended before the client could leave; use a model that talks longer")
        pieces += bool(choice["delta"].get("content"))
        if pieces == 2:
            break
    t0 = time.perf_counter()
    conn.close()
    if not host.queue.wait_idle(timeout=600):
        raise RuntimeError("the engine did not become free after the client left")
    return (time.perf_counter() - t0) * 1000


def _measure(host: StandaloneModel, port: int, image: Path, n: int, repeats: int) -> ServeBench:
    image_b64 = base64.b64encode(image.read_bytes()).decode()
    first_message = _message(image_b64, QUESTION)
    first_turn = {"messages": [first_message], "temperature": 0, "max_tokens": n}
    greedy = Sampling(greedy=True, max_new_tokens=n)
    _stream(port, {**first_turn, "max_tokens": 1})  # encodes the image once: both paths use the cache after

    api_ttft, api_rate, eng_ttft, eng_rate = [], [], [], []
    for _ in range(repeats):
        _reset(host)
        s = _stream(port, first_turn)
        api_ttft.append(s.ttft_ms)
        api_rate.append(s.decode_tokens_per_s)
        _reset(host)
        ttft, rate = _engine_direct(host, image, greedy)
        eng_ttft.append(ttft)
        eng_rate.append(rate)

    answer = _stream(port, first_turn).text
    follow_turn = {
        **first_turn,
        "messages": [first_message, {"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}],
    }
    follow, scratch, cached, prefilled = [], [], [], []
    for _ in range(repeats):
        _reset(host)
        _stream(port, first_turn)  # the client's first turn: the KV cache now holds it
        f = _stream(port, follow_turn)
        follow.append(f.ttft_ms)
        cached.append(int(f.timings.get("cache_n", 0)))
        prefilled.append(int(f.timings.get("prompt_n", 0)))
        _reset(host)
        scratch.append(_stream(port, follow_turn).ttft_ms)

    other_turn = {**first_turn, "messages": [_message(_mirrored(image), "What is different here?")]}
    interleaved, interleaved_cached = [], []
    for _ in range(repeats):
        _reset(host)
        _stream(port, first_turn)
        _stream(port, other_turn)  # another client's conversation overwrites the live cache
        f = _stream(port, follow_turn)
        interleaved.append(f.ttft_ms)
        interleaved_cached.append(int(f.timings.get("cache_n", 0)))

    freed = [_disconnect_to_free_ms(host, port, first_turn) for _ in range(repeats)]
    return ServeBench(
        api_ttft_ms=statistics.median(api_ttft),
        engine_ttft_ms=statistics.median(eng_ttft),
        api_decode_tokens_per_s=statistics.median(api_rate),
        engine_decode_tokens_per_s=statistics.median(eng_rate),
        follow_up_ttft_ms=statistics.median(follow),
        scratch_ttft_ms=statistics.median(scratch),
        follow_up_cached_positions=min(cached),
        follow_up_prefilled_positions=max(prefilled),
        interleaved_ttft_ms=statistics.median(interleaved),
        interleaved_cached_positions=min(interleaved_cached),
        disconnect_to_free_ms=statistics.median(freed),
    )

"""The local API server for real: uvicorn on 127.0.0.1 (a free port), the tiny model, real `openai` and `ollama`
clients and plain HTTP (http.client), answers compared with `owl-desktop ask --greedy`."""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import io
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ollama
import openai
import pytest
from PIL import Image

from owl_desktop import paths
from owl_desktop.app.engine_queue import EngineQueue
from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.engine.options import LlmSettings, Sampling
from owl_desktop.engine.pipeline import EngineSettings
from owl_desktop.errors import ServerError
from owl_desktop.server.config import ServerConfig
from owl_desktop.server.host import StandaloneModel
from owl_desktop.server.runner import ApiServer

# exact arithmetic, so the server and a separate `ask` process give the same tokens
EXACT = EngineSettings(llm=LlmSettings(flash_attn="off", kv_type="f32", n_threads=1), vision_dtype="float32")
EXACT_FLAGS = ["--flash-attn", "off", "--kv-type", "f32", "--threads", "1", "--vision-dtype", "float32"]
BODY_CAP = 1024 * 1024
KEY = "s3cret-key"
ORIGIN = "http://localhost:3000"


def png(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("server")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    return convert_checkpoint(ckpt, root / "bundle-f32", quant="F32")


@pytest.fixture(scope="module")
def model(bundle: Path) -> Iterator[StandaloneModel]:
    m = StandaloneModel(bundle, EXACT, Sampling(), EngineQueue(max_waiting=1))
    m.load()
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model: StandaloneModel) -> Iterator[ApiServer]:
    with ApiServer(model, ServerConfig(port=0, max_body_bytes=BODY_CAP)) as s:
        yield s


@pytest.fixture(scope="module")
def secured(model: StandaloneModel) -> Iterator[ApiServer]:
    """A second server on the same engine: API key, one CORS origin, remote images allowed."""
    config = ServerConfig(port=0, api_key=KEY, cors_origins=(ORIGIN,), allow_remote_images=True)
    with ApiServer(model, config) as s:
        yield s


@pytest.fixture
def client(server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def model_id(server: ApiServer) -> str:
    pipe = server.host.pipeline
    assert pipe is not None
    return pipe.bundle.id


def request(
    server: ApiServer, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Plain HTTP: (status, headers, body). `body` may be raw bytes or JSON-able."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=hdrs)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def ask_cli(
    bundle: Path,
    tmp_path: Path,
    question: str,
    image: bytes,
    history: list[dict[str, Any]] | None = None,
    max_new: int = 12,
    capsys: pytest.CaptureFixture[str] | None = None,
) -> dict[str, Any]:
    """`owl-desktop ask --greedy --json` on the same bundle and engine settings."""
    img = tmp_path / f"{hashlib.sha256(image).hexdigest()[:12]}.png"
    img.write_bytes(image)
    args = ["ask", "--model", str(bundle), "--greedy", "--max-new-tokens", str(max_new), *EXACT_FLAGS, "--json"]
    if history is not None:
        conv = tmp_path / "conversation.json"
        conv.write_text(json.dumps(history))
        args += ["--conversation", str(conv)]
    else:
        args += ["--image", str(img)]
    assert capsys is not None
    capsys.readouterr()
    assert cli_main([*args, question]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------- listing


def test_models_are_listed_in_both_dialects(server: ApiServer, client: openai.OpenAI, bundle: Path) -> None:
    # a second installed bundle: listed after the loaded one
    other = paths.ensure(paths.models_dir()) / "other-bundle"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "bundle.json").read_text())
    (other / "bundle.json").write_text(json.dumps({**manifest, "id": "other-bundle"}))

    ids = [m.id for m in client.models.list()]
    assert ids == [model_id(server), "other-bundle"]
    assert client.models.retrieve(model_id(server)).id == model_id(server)

    o = ollama.Client(host=server.base_url)
    tags = o.list()
    assert [m.model for m in tags.models] == ids
    assert tags.models[0].details is not None and tags.models[0].details.quantization_level == "F32"
    shown = o.show(model_id(server))
    assert shown.capabilities is not None and "vision" in shown.capabilities
    status, _, body = request(server, "GET", "/api/version")
    assert status == 200 and "version" in json.loads(body)

    # installed but not loaded, or unknown: clear errors
    with pytest.raises(openai.BadRequestError, match="installed but not loaded"):
        client.chat.completions.create(model="other-bundle", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(ollama.ResponseError, match="not found"):
        o.show("nope")


# ---------------------------------------------------------------------------------------------------- answers


def test_openai_answer_whole_and_streamed_is_the_same_text(server: ApiServer, client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(png(1))]}]
    whole = client.chat.completions.create(model=model_id(server), messages=messages, temperature=0, max_tokens=12)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    timings = (whole.model_extra or {})["timings"]
    assert {"cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_per_second", "image_encode_ms"} <= set(
        timings
    )

    stream = client.chat.completions.create(
        model=model_id(server),
        messages=messages,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really streamed
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_ends_with_usage_chunk_then_done(server: ApiServer) -> None:
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe."}, image_part(png(2))]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 4,
    }
    status, headers, raw = request(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk = json.loads(events[-2]), json.loads(events[-3])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert "timings" in usage_chunk
    assert finish_chunk["choices"][0]["finish_reason"] == "length" and finish_chunk["choices"][0]["delta"] == {}


def test_temperature_zero_gives_the_tokens_of_ask_greedy(
    server: ApiServer, client: openai.OpenAI, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = png(3)
    expected = ask_cli(bundle, tmp_path, "What do you see?", image, capsys=capsys)
    got = client.chat.completions.create(
        model=model_id(server),
        messages=[{"role": "user", "content": [image_part(image), {"type": "text", "text": "What do you see?"}]}],
        temperature=0,
        max_tokens=12,
    )
    assert got.choices[0].message.content == expected["answer"]
    assert got.usage is not None and got.usage.completion_tokens == len(expected["token_ids"])

    # two turns, the image in the first: the same again (bare base64 instead of a data URI, for once)
    (tmp_path / "first.png").write_bytes(image)
    history = [{"images": ["first.png"], "question": "What do you see?", "answer": expected["answer"]}]
    expected2 = ask_cli(bundle, tmp_path, "And the colours?", image, history=history, capsys=capsys)
    got2 = client.chat.completions.create(
        model=model_id(server),
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": base64.b64encode(image).decode()},
                    {"type": "text", "text": "What do you see?"},
                ],
            },
            {"role": "assistant", "content": expected["answer"]},
            {"role": "user", "content": "And the colours?"},
        ],
        temperature=0,
        max_tokens=12,
    )
    assert got2.choices[0].message.content == expected2["answer"]
    assert got2.usage is not None and got2.usage.completion_tokens == len(expected2["token_ids"])


def test_follow_up_prefills_only_what_is_new_and_never_re_encodes(server: ApiServer, client: openai.OpenAI) -> None:
    image = png(4)
    first_messages: Any = [{"role": "user", "content": [image_part(image), {"type": "text", "text": "What is it?"}]}]
    first = client.chat.completions.create(model=model_id(server), messages=first_messages, temperature=0, max_tokens=8)
    t1 = (first.model_extra or {})["timings"]
    assert t1["images_encoded_n"] == 1 and t1["image_encode_ms"] > 0

    follow_messages = [
        *first_messages,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Why?"},
    ]
    follow = client.chat.completions.create(
        model=model_id(server), messages=follow_messages, temperature=0, max_tokens=8
    )
    t2 = (follow.model_extra or {})["timings"]
    assert t2["images_encoded_n"] == 0 and t2["image_encode_ms"] == 0
    assert first.usage is not None and follow.usage is not None
    # the first exchange is reused (up to where its answer's text tokenizes differently); the new turn is prefilled
    assert t2["cache_n"] >= first.usage.prompt_tokens - 2
    assert t2["prompt_n"] < t2["cache_n"] // 2
    assert follow.usage.prompt_tokens_details is not None
    assert follow.usage.prompt_tokens_details.cached_tokens == t2["cache_n"]


def test_stop_strings_cut_the_answer(server: ApiServer, client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": [image_part(png(5)), {"type": "text", "text": "Go on."}]}]
    full = client.chat.completions.create(model=model_id(server), messages=messages, temperature=0, max_tokens=16)
    text = full.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    cut = client.chat.completions.create(
        model=model_id(server), messages=messages, temperature=0, max_tokens=16, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"


def test_ollama_chat_and_generate_streamed_and_not(server: ApiServer) -> None:
    o = ollama.Client(host=server.base_url)
    image = png(6)
    options = {"temperature": 0, "num_predict": 10}
    messages = [{"role": "user", "content": "What is in it?", "images": [image]}]
    whole = o.chat(model=model_id(server), messages=messages, options=options)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.content
    assert whole.eval_count and whole.total_duration and whole.prompt_eval_duration is not None
    parts = list(o.chat(model=model_id(server), messages=messages, options=options, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content

    gen = o.generate(
        model=model_id(server), prompt="What is in it?", images=[image], system="Be brief.", options=options
    )
    assert gen.done and gen.response and gen.eval_count
    gen_parts = list(
        o.generate(
            model=model_id(server),
            prompt="What is in it?",
            images=[image],
            system="Be brief.",
            options=options,
            stream=True,
        )
    )
    assert "".join(p.response or "" for p in gen_parts) == gen.response
    assert gen_parts[-1].done_reason == gen.done_reason

    # raw NDJSON, and the "load the model" form of generate
    status, headers, raw = request(server, "POST", "/api/generate", {"prompt": "Hi", "options": {"num_predict": 2}})
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert status == 200 and headers["content-type"].startswith("application/x-ndjson")
    assert lines[-1]["done"] is True and {"total_duration", "eval_count", "prompt_eval_count"} <= set(lines[-1])
    status, _, raw = request(server, "POST", "/api/generate", {"model": model_id(server)})
    assert status == 200 and json.loads(raw)["done_reason"] == "load"


# ---------------------------------------------------------------------------------------------------- one engine


def test_disconnect_mid_answer_frees_the_engine(
    server: ApiServer, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="owl_desktop")
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": [image_part(png(7)), {"type": "text", "text": "Talk."}]}],
            "stream": True,
            "temperature": 0,
            "max_tokens": 1500,
        }
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    seen = b""
    while seen.count(b"\n\n") < 4:  # the role chunk and a few pieces
        seen += r.read1(4096)
    r.close()
    conn.close()
    assert server.host.queue.wait_idle(timeout=30)
    ended = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("job ")]
    assert "cancelled" in ended[-1]
    tokens = int(ended[-1].split(" tokens")[0].rsplit(" ", 1)[-1])
    assert tokens < 1500
    # the next request runs at once
    again = client.chat.completions.create(
        model=model_id(server), messages=[{"role": "user", "content": "Still there?"}], max_tokens=3
    )
    assert again.choices[0].finish_reason in ("stop", "length")


def test_full_queue_answers_503_and_the_waiting_request_runs_later(server: ApiServer) -> None:
    queue = server.host.queue
    turn = queue.enter("the window", bounded=False)  # the window is answering
    assert turn.wait(5)
    body = {"messages": [{"role": "user", "content": "Queued?"}], "max_tokens": 2}
    waiting: list[int] = []
    t = threading.Thread(target=lambda: waiting.append(request(server, "POST", "/v1/chat/completions", body)[0]))
    try:
        t.start()
        for _ in range(500):
            if queue.state.waiting == 1:
                break
            threading.Event().wait(0.01)
        assert queue.state.waiting == 1  # max_waiting is 1 in this module
        status, headers, raw = request(server, "POST", "/v1/chat/completions", body)
        assert status == 503 and int(headers["retry-after"]) > 0
        assert json.loads(raw)["error"]["type"] == "unavailable_error"
        status, _, raw = request(server, "POST", "/api/chat", {**body, "stream": False})
        assert status == 503 and "busy" in json.loads(raw)["error"]
    finally:
        turn.leave()
        t.join(30)
    assert waiting == [200]


# ---------------------------------------------------------------------------------------------------- safety


def test_api_key_is_required_when_set(secured: ApiServer) -> None:
    url = secured.base_url + "/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    status, headers, raw = request(secured, "GET", "/v1/models")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(raw)["error"]["type"] == "authentication_error"
    status, _, raw = request(secured, "GET", "/api/tags", headers={"Authorization": "Bearer nope"})
    assert status == 401 and "wrong API key" in json.loads(raw)["error"]
    good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()][0] == model_id(secured)
    answer = ollama.Client(host=secured.base_url, headers={"Authorization": f"Bearer {KEY}"}).chat(
        model=model_id(secured), messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}
    )
    assert answer.done


def test_non_loopback_bind_without_key_refuses_to_start(
    model: StandaloneModel, bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ServerError, match="without an API key"):
        ApiServer(model, ServerConfig(host="0.0.0.0", port=0))
    assert cli_main(["serve", "--model", str(bundle), "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "without an API key" in err and len(err.strip().splitlines()) == 1


def test_port_in_use_is_a_one_line_error(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert cli_main(["serve", "--model", str(bundle), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"port {port}" in err and "already in use" in err and len(err.splitlines()) == 1


def test_cors_preflight_only_for_listed_origins(server: ApiServer, secured: ApiServer) -> None:
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = request(secured, "OPTIONS", "/v1/chat/completions", headers={"Origin": ORIGIN, **pre})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = request(
        secured, "OPTIONS", "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre}
    )
    assert status >= 400 and "access-control-allow-origin" not in headers
    status, headers, _ = request(
        secured, "GET", "/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
    )
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    # without listed origins: no CORS at all, and browser requests are refused
    status, headers, _ = request(server, "OPTIONS", "/v1/chat/completions", headers={"Origin": ORIGIN, **pre})
    assert status == 403 and "access-control-allow-origin" not in headers
    status, _, _ = request(server, "GET", "/v1/models", headers={"Origin": ORIGIN})
    assert status == 403
    # a page whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own Host
    status, _, _ = request(server, "GET", "/v1/models", headers={"Host": "evil.example"})
    assert status == 403


@contextmanager
def image_site(data: bytes) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}/picture.png"
    finally:
        site.shutdown()
        site.server_close()


def test_image_urls_only_when_allowed(server: ApiServer, secured: ApiServer) -> None:
    with image_site(png(8)) as url:
        part = {"type": "image_url", "image_url": {"url": url}}
        body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}], "max_tokens": 2}
        status, _, raw = request(server, "POST", "/v1/chat/completions", body)
        assert status == 400 and "does not fetch image URLs" in json.loads(raw)["error"]["message"]
        status, _, raw = request(secured, "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
        assert status == 200, raw
        assert json.loads(raw)["timings"]["images_n"] == 1


def test_bad_requests_get_the_right_status_and_the_server_stays_up(
    server: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="owl_desktop")
    chat = "/v1/chat/completions"

    def user(*parts: Any) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": list(parts)}]}

    text = {"type": "text", "text": "What is this?"}
    broken = {"type": "image_url", "image_url": {"url": data_uri(b"this is not an image at all")}}
    cases: list[tuple[str, Any, int, str]] = [
        ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
        ("broken image", user(text, broken), 400, "messages[0].content[1]"),
        ("unknown model", {**user(text), "model": "llava:7b"}, 404, "not found"),
        ("n: 2", {**user(text), "n": 2}, 400, "'n' must be 1"),
        ("file URL", user(text, {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}), 400, "file://"),
        (
            "bad base64",
            user(text, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}),
            400,
            "base64",
        ),
        ("no user", {"messages": [{"role": "assistant", "content": "Hi"}]}, 400, "must follow a user"),
        ("empty", {"messages": []}, 400, "empty"),
        ("oversized body", b'{"pad": "' + b"x" * (BODY_CAP + 10) + b'"}', 413, "larger than"),
    ]
    long_history = []
    for i in range(40):  # 40 images of 65 positions each: more than the 2048 positions of the context
        long_history += [
            {"role": "user", "content": [image_part(png(100 + i, (8, 8))), {"type": "text", "text": f"Q{i}"}]},
            {"role": "assistant", "content": f"A{i}"},
        ]
    long_history.append({"role": "user", "content": "And now?"})
    cases.append(("over-long conversation", {"messages": long_history}, 400, "positions"))
    for name, body, status, words in cases:
        got, headers, raw = request(server, "POST", chat, body)
        assert got == status, (name, raw)
        error = json.loads(raw)["error"]
        assert words in error["message"], (name, error)
        assert set(error) == {"message", "type", "param", "code"}, name
        assert "Traceback" not in raw.decode() and str(Path.home()) not in raw.decode(), name
    over = json.loads(request(server, "POST", chat, {"messages": long_history})[2])["error"]
    assert over["type"] == "exceed_context_size_error" and "2048" in over["message"]

    # Ollama's shape, and the server still answers
    status, _, raw = request(
        server, "POST", "/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["@@"]}]}
    )
    assert status == 400 and "messages[0].images[0]" in json.loads(raw)["error"]
    status, _, raw = request(server, "GET", "/nope")
    assert status == 404 and "error" in json.loads(raw)
    status, _, _ = request(server, "POST", chat, user(text))
    assert status == 200

    # every request was logged with its method, path, status and sizes, never its content
    lines = [r.getMessage() for r in caplog.records if r.name == "owl_desktop.server.access"]
    assert any(line.startswith("POST /v1/chat/completions 413 ") and " in=" in line for line in lines)
    assert not any("What is this?" in r.getMessage() for r in caplog.records)


def test_requests_while_the_model_loads_get_503_then_answers(bundle: Path) -> None:
    queue = EngineQueue()
    loading = StandaloneModel(bundle, EXACT, Sampling(), queue)
    hold = queue.enter("a window answering", bounded=False)  # the load waits behind it: a long load, on cue
    assert hold.wait(5)
    done = threading.Event()
    loading.load_in_background(lambda _id, _err: done.set())
    try:
        with ApiServer(loading, ServerConfig(port=0)) as s:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            status, headers, raw = request(s, "POST", "/v1/chat/completions", body)
            assert status == 503 and int(headers["retry-after"]) > 0
            assert "still loading" in json.loads(raw)["error"]["message"]
            hold.leave()
            assert done.wait(60) and loading.error is None
            assert request(s, "POST", "/v1/chat/completions", body)[0] == 200
    finally:
        hold.leave()
        loading.close()


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C is a POSIX signal here")
def test_serve_prints_its_address_and_stops_cleanly_on_ctrl_c(bundle: Path) -> None:
    args = [sys.executable, "-m", "owl_desktop", "serve", "--model", str(bundle), "--port", "0", *EXACT_FLAGS]
    # As from a terminal: a runner that starts jobs in the background (CI) hands them SIGINT ignored, and Python
    # then installs no Ctrl+C handler at all.
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        url = lines[0].split(" on ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert f"OpenAI: {url}/v1" in lines[1]
        while not (line := proc.stdout.readline()).startswith("Model "):
            assert line, "serve ended before the model was ready"
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/v1/models")
        models = json.loads(conn.getresponse().read())
        conn.close()
        assert models["data"], (lines, models)
        assert lines[1].rstrip().endswith(f"model: {models['data'][0]['id']}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

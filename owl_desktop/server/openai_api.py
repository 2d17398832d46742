"""The OpenAI dialect (/v1): chat completion requests in, completions, chunks, model lists and errors out.

Shapes follow what the `openai` package, Open WebUI and Continue read; `timings` is llama-server's object, with our
image-encode time added. Unknown request fields are ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from owl_desktop.engine.options import Sampling
from owl_desktop.server.errors import ApiError
from owl_desktop.server.jobs import JobResult
from owl_desktop.server.requests import (
    ApiImage,
    ChatRequest,
    RoleMessage,
    SamplingFields,
    boolean,
    fold_messages,
    integer,
    number,
    sampling_from,
    seed,
    stops,
    text,
)

ImageReader = Callable[[str, str], ApiImage]  # (url, label) -> image


def parse_chat(body: Any, read_image: ImageReader, base: Sampling) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    n = integer(body, "n", 1, 128)
    if n is not None and n != 1:
        raise ApiError(400, "'n' must be 1: this server writes one answer per request", param="n")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise ApiError(400, "'messages' must be a list of messages", param="messages")
    messages = [_message(m, i, read_image) for i, m in enumerate(raw_messages)]
    system, turns = fold_messages(messages)
    max_tokens = integer(body, "max_completion_tokens", -1, 1 << 30)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", -1, 1 << 30)
    fields = SamplingFields(
        temperature=number(body, "temperature", 0.0, 100.0),
        top_p=number(body, "top_p", 0.0, 1.0),
        top_k=integer(body, "top_k", 0, 1 << 20),  # not OpenAI's, but llama-server and many clients send it
        min_p=number(body, "min_p", 0.0, 1.0),
        seed=seed(body, "seed"),
        max_tokens=max_tokens,
        repeat_penalty=number(body, "repeat_penalty", 0.0, 10.0),
        frequency_penalty=number(body, "frequency_penalty", -2.0, 2.0),
        presence_penalty=number(body, "presence_penalty", -2.0, 2.0),
    )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ChatRequest(
        model=text(body, "model"),
        turns=turns,
        system=system,
        sampling=sampling_from(fields, base),
        stop=stops(body, "stop"),
        stream=boolean(body, "stream", False),
        include_usage=include_usage,
    )


def _message(raw: Any, i: int, read_image: ImageReader) -> RoleMessage:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
    role = raw.get("role")
    if not isinstance(role, str):
        raise ApiError(400, f"{where}.role must be a string", param=f"{where}.role")
    content = raw.get("content")
    if content is None or isinstance(content, str):
        return RoleMessage(role, content or "", [], where)
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts: list[str] = []
    images: list[ApiImage] = []
    for j, part in enumerate(content):
        label = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise ApiError(400, f"{label} must be an object with a 'type'", param=label)
        kind = part.get("type")
        if kind == "text":
            t = part.get("text")
            if not isinstance(t, str):
                raise ApiError(400, f"{label}.text must be a string", param=label)
            texts.append(t)
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ApiError(400, f'{label}.image_url must be a URL string or {{"url": ...}}', param=label)
            images.append(read_image(url, label))
        else:
            raise ApiError(400, f"{label}: content of type '{kind}' is not supported (text, image_url)", param=label)
    return RoleMessage(role, "\n".join(texts), images, where)


# ---------------------------------------------------------------------------------------------------- responses


def error_body(err: ApiError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(result: JobResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def timings(result: JobResult) -> dict[str, Any]:
    """llama-server's timings, plus our image encode and queue wait."""
    r = result.record
    prompt_n = result.prompt_tokens - result.cached_tokens
    predicted_n = result.completion_tokens
    decode_ms = result.decode_ms
    return {
        "cache_n": result.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": round(r.prefill_ms, 3),
        "prompt_per_token_ms": round(r.prefill_ms / prompt_n, 3) if prompt_n else 0.0,
        "prompt_per_second": round(prompt_n / r.prefill_ms * 1000, 3) if r.prefill_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": round(decode_ms, 3),
        "predicted_per_token_ms": round(decode_ms / predicted_n, 3) if predicted_n else 0.0,
        "predicted_per_second": round(r.decode_tokens_per_s, 3),
        "images_n": len(r.images),
        "images_encoded_n": sum(1 for t in r.images if not t.cached),
        "image_encode_ms": round(r.encode_ms, 3),
        "queue_ms": round(result.queued_ms, 3),
    }


def completion(cid: str, created: int, result: JobResult) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "timings": timings(result),
    }


def chunk(cid: str, created: int, model: str, delta: Mapping[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish, "logprobs": None}],
    }


def model_entry(m: Mapping[str, Any]) -> dict[str, Any]:
    """`m`: one of server.models.available()."""
    return {"id": m["id"], "object": "model", "created": m["created"], "owned_by": "owl-desktop"}


def model_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(m) for m in models]}


def now() -> int:
    return int(time.time())

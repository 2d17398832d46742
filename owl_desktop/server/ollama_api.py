"""Ollama's dialect (/api): chat and generate requests in, newline-delimited JSON out, model tags and details.

Images come as raw base64 strings; streaming is on unless `"stream": false`; durations are in nanoseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from owl_desktop import __version__
from owl_desktop.engine.options import Sampling
from owl_desktop.server.errors import ApiError
from owl_desktop.server.images import from_base64
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

VERSION = __version__


def _options(body: Mapping[str, Any]) -> tuple[SamplingFields, tuple[str, ...]]:
    raw = body.get("options")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ApiError(400, "'options' must be an object", param="options")
    w = "options."
    fields = SamplingFields(
        temperature=number(raw, "temperature", 0.0, 100.0, w),
        top_p=number(raw, "top_p", 0.0, 1.0, w),
        top_k=integer(raw, "top_k", 0, 1 << 20, w),
        min_p=number(raw, "min_p", 0.0, 1.0, w),
        seed=seed(raw, "seed", w),
        max_tokens=integer(raw, "num_predict", -2, 1 << 30, w),
        repeat_penalty=number(raw, "repeat_penalty", 0.0, 10.0, w),
        frequency_penalty=number(raw, "frequency_penalty", -2.0, 2.0, w),
        presence_penalty=number(raw, "presence_penalty", -2.0, 2.0, w),
    )
    return fields, stops(raw, "stop", w)  # num_ctx and the rest: the loaded context is what it is


def _images(raw: Any, where: str) -> list[ApiImage]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, f"'{where}' must be a list of base64 strings", param=where)
    out = []
    for i, item in enumerate(raw):
        label = f"{where}[{i}]"
        if not isinstance(item, str):
            raise ApiError(400, f"{label} must be a base64 string", param=label)
        out.append(from_base64(item, label))
    return out


def parse_chat(body: Any, base: Sampling) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise ApiError(400, "'messages' must be a list of messages", param="messages")
    messages = []
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a 'role'", param=where)
        content = text(m, "content", where + ".") or ""
        messages.append(RoleMessage(m["role"], content, _images(m.get("images"), where + ".images"), where))
    system, turns = fold_messages(messages)
    fields, stop = _options(body)
    return ChatRequest(
        model=text(body, "model"),
        turns=turns,
        system=system,
        sampling=sampling_from(fields, base),
        stop=stop,
        stream=boolean(body, "stream", True),
    )


def parse_generate(body: Any, base: Sampling) -> ChatRequest:
    """The request; without turns for an empty prompt (Ollama's way to ask for the model to be loaded)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    prompt = text(body, "prompt") or ""
    images = _images(body.get("images"), "images")
    if not prompt.strip() and not images:
        return ChatRequest(model=text(body, "model"), turns=(), system=None, sampling=base)
    messages = []
    system = text(body, "system")
    if system is not None:
        messages.append(RoleMessage("system", system, [], "system"))
    messages.append(RoleMessage("user", prompt, images, "prompt"))
    system_text, turns = fold_messages(messages)
    fields, stop = _options(body)
    return ChatRequest(
        model=text(body, "model"),
        turns=turns,
        system=system_text,
        sampling=sampling_from(fields, base),
        stop=stop,
        stream=boolean(body, "stream", True),
    )


# ---------------------------------------------------------------------------------------------------- responses


def error_body(err: ApiError) -> dict[str, Any]:
    return {"error": err.message}


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(ms: float) -> int:
    return int(ms * 1_000_000)


def final_fields(result: JobResult, total_ms: float) -> dict[str, Any]:
    r = result.record
    return {
        "done": True,
        "done_reason": result.finish_reason,
        "total_duration": _ns(total_ms),
        "load_duration": 0,  # the model stays loaded
        "prompt_eval_count": result.prompt_tokens - result.cached_tokens,
        "prompt_eval_duration": _ns(r.prefill_ms),
        "eval_count": result.completion_tokens,
        "eval_duration": _ns(result.decode_ms),
    }


def chat_piece(model: str, piece: str) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": timestamp(),
        "message": {"role": "assistant", "content": piece},
        "done": False,
    }


def chat_final(result: JobResult, total_ms: float, content: str = "") -> dict[str, Any]:
    return {
        "model": result.model,
        "created_at": timestamp(),
        "message": {"role": "assistant", "content": content},
        **final_fields(result, total_ms),
    }


def generate_piece(model: str, piece: str) -> dict[str, Any]:
    return {"model": model, "created_at": timestamp(), "response": piece, "done": False}


def generate_final(result: JobResult, total_ms: float, content: str = "") -> dict[str, Any]:
    return {"model": result.model, "created_at": timestamp(), "response": content, **final_fields(result, total_ms)}


def loaded_reply(model: str) -> dict[str, Any]:
    """The answer to an empty generate: the model is loaded."""
    return {"model": model, "created_at": timestamp(), "response": "", "done": True, "done_reason": "load"}


def details(m: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama", "clip"],
        "parameter_size": m.get("parameter_size", ""),
        "quantization_level": m["quant"],
    }


def tags(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": m["id"],
                "model": m["id"],
                "modified_at": datetime.fromtimestamp(m["created"], timezone.utc).isoformat(),
                "size": m["size"],
                "digest": m["digest"],
                "details": details(m),
            }
            for m in models
        ]
    }


def show(m: Mapping[str, Any], n_ctx: int | None) -> dict[str, Any]:
    info: dict[str, Any] = {"general.architecture": "llama"}
    if n_ctx:
        info["llama.context_length"] = n_ctx
    return {
        "modelfile": f"# mPLUG-Owl bundle {m['id']} served by owl-desktop\n",
        "parameters": "",
        "template": "{{ .System }}\nHuman: {{ .Prompt }}\nAI: ",
        "details": details(m),
        "model_info": info,
        "capabilities": ["completion", "vision"],
        "modified_at": datetime.fromtimestamp(m["created"], timezone.utc).isoformat(),
    }


def ps(m: Mapping[str, Any], n_ctx: int | None) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": m["id"],
                "model": m["id"],
                "size": m["size"],
                "digest": m["digest"],
                "details": details(m),
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": 0,
                "context_length": n_ctx or 0,
            }
        ]
    }

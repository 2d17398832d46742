"""A chat request in neutral form, whichever dialect it came in: turns with images, system prompt, sampling, stops.

Both dialects send a list of role messages; `fold_messages` turns it into mPLUG-Owl's turns (images stay in the turn
where they were sent, in order) and refuses what the model cannot take, naming the message at fault.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from owl_desktop.engine.options import Sampling
from owl_desktop.server.errors import ApiError

UNLIMITED_TOKENS = 1 << 30  # "as many as the context holds": the prompt builder caps it to the room left
MAX_STOPS = 16


@dataclass(frozen=True)
class ApiImage:
    data: bytes  # the encoded file, not yet decoded (decoding waits until the image is known to be new)
    label: str  # where it is in the request, e.g. "messages[2].content[1]": error messages name it
    sha256: str


@dataclass(frozen=True)
class ApiTurn:
    images: tuple[ApiImage, ...]
    question: str
    answer: str | None  # None for the question being asked (the last turn)


@dataclass(frozen=True)
class ChatRequest:
    model: str | None  # None or "": the loaded model
    turns: tuple[ApiTurn, ...]
    system: str | None  # None: the bundle's own system prompt
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # OpenAI: stream_options.include_usage

    @property
    def n_images(self) -> int:
        return sum(len(t.images) for t in self.turns)


@dataclass
class RoleMessage:
    """One message of either dialect, its images already turned into bytes."""

    role: str
    text: str
    images: list[ApiImage] = field(default_factory=list)
    where: str = "messages[0]"


SYSTEM_ROLES = ("system", "developer")


def fold_messages(messages: Sequence[RoleMessage]) -> tuple[str | None, tuple[ApiTurn, ...]]:
    """(system prompt, turns) of a conversation; consecutive messages of one role are joined."""
    if not messages:
        raise ApiError(400, "'messages' is empty: send at least one user message", param="messages")
    system_parts: list[str] = []
    turns: list[ApiTurn] = []
    images: list[ApiImage] = []
    question: list[str] = []
    answer: list[str] | None = None

    def close_turn() -> None:
        nonlocal images, question, answer
        if answer is not None:
            turns.append(ApiTurn(tuple(images), "\n".join(question), "\n".join(answer)))
            images, question, answer = [], [], None

    for m in messages:
        if m.role in SYSTEM_ROLES:
            if m.images:
                raise ApiError(400, f"{m.where}: a system message cannot hold images", param=m.where)
            system_parts.append(m.text)
        elif m.role == "user":
            close_turn()
            images.extend(m.images)
            if m.text.strip():
                question.append(m.text)
        elif m.role == "assistant":
            if m.images:
                raise ApiError(400, f"{m.where}: an assistant message cannot hold images", param=m.where)
            if not question and not images and answer is None:
                raise ApiError(400, f"{m.where}: an assistant message must follow a user message", param=m.where)
            answer = [*(answer or []), m.text]
        else:
            raise ApiError(400, f"{m.where}: role '{m.role}' is not supported (system, user, assistant)", param=m.where)
    if answer is not None:
        raise ApiError(400, "the last message must be the user's: there is nothing to answer", param="messages")
    if not question:
        raise ApiError(400, "the last user message has no text: ask something about the images", param="messages")
    turns.append(ApiTurn(tuple(images), "\n".join(question), None))
    system = "\n".join(system_parts) if system_parts else None
    return system, tuple(turns)


# ---------------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingFields:
    """The sampling values a request gave (None: not given), in either dialect's names mapped to ours."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None  # None or <= 0 (Ollama's -1): as many as the context holds
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


def sampling_from(fields_: SamplingFields, base: Sampling) -> Sampling:
    """The app's defaults with the request's values on top; temperature 0 is pure argmax (no penalty, no ban)."""
    max_new = fields_.max_tokens if fields_.max_tokens is not None and fields_.max_tokens > 0 else UNLIMITED_TOKENS
    s = replace(base, max_new_tokens=max_new, greedy=False)
    if fields_.seed is not None:
        s = replace(s, seed=fields_.seed)
    if fields_.temperature is not None and fields_.temperature == 0:
        return replace(s, greedy=True)
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
        value = getattr(fields_, name)
        if value is not None:
            s = replace(s, **{name: value})
    return s


# ---------------------------------------------------------------------------------------------------- JSON fields


def number(raw: Mapping[str, Any], key: str, lo: float, hi: float, where: str = "") -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    name = where + key
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number", param=name)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo:g} and {hi:g}", param=name)
    return float(value)


def integer(raw: Mapping[str, Any], key: str, lo: int, hi: int, where: str = "") -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    name = where + key
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ApiError(400, f"'{name}' must be an integer", param=name)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}", param=name)
    return int(value)


def boolean(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false", param=key)
    return value


def text(raw: Mapping[str, Any], key: str, where: str = "") -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"'{where + key}' must be a string", param=where + key)
    return value


def stops(raw: Mapping[str, Any], key: str, where: str = "") -> tuple[str, ...]:
    value = raw.get(key)
    name = where + key
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(400, f"'{name}' must be a string or a list of strings", param=name)
    if len(value) > MAX_STOPS:
        raise ApiError(400, f"'{name}' may hold at most {MAX_STOPS} strings", param=name)
    return tuple(s for s in value if s)


def seed(raw: Mapping[str, Any], key: str, where: str = "") -> int | None:
    """Any integer (negative ones too, as clients send -1 for "random"): a negative seed means a random one."""
    value = integer(raw, key, -(1 << 63), (1 << 64) - 1, where)
    return None if value is None or value < 0 else value

"""The models the server offers: the loaded bundle first, then the other installed ones; and the request's choice."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from owl_desktop.bundle import MANIFEST, scan
from owl_desktop.model_config import TextConfig
from owl_desktop.server.errors import ApiError
from owl_desktop.server.host import ModelHost


def loaded_id(host: ModelHost) -> str | None:
    pipe = host.pipeline
    return pipe.bundle.id if pipe is not None else None


def _entry(model_id: str, folder: Path, size: int, quant: str, params: str = "") -> dict[str, Any]:
    manifest = folder / MANIFEST
    try:
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        created = int(manifest.stat().st_mtime)
    except OSError:
        digest, created = "", 0
    return {
        "id": model_id,
        "created": created,
        "size": size,
        "quant": quant,
        "digest": digest,
        "parameter_size": params,
    }


def parameter_size(text: TextConfig) -> str:
    """The language model's parameter count, as Ollama shows it ("6.7B")."""
    h, i, v, layers = text.hidden_size, text.intermediate_size, text.vocab_size, text.num_hidden_layers
    kv = h * text.num_key_value_heads // max(1, text.num_attention_heads)
    n = 2 * v * h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def available(host: ModelHost) -> list[dict[str, Any]]:
    """Dicts with id, created (unix time), size, quant, digest, parameter_size; the loaded model first."""
    out: list[dict[str, Any]] = []
    pipe = host.pipeline
    if pipe is not None:
        b = pipe.bundle
        out.append(_entry(b.id, b.path, b.size, b.quant, parameter_size(b.config.text)))
    for m in scan():
        if m.ok and all(m.id != e["id"] for e in out):
            out.append(_entry(m.id, m.path, m.size, m.quant))
    return out


def find(host: ModelHost, requested: str | None) -> dict[str, Any]:
    """The entry of a requested id (any model for None)."""
    models = available(host)
    name = _plain(requested)
    for m in models:
        if name is None or m["id"] == name:
            return m
    raise ApiError(404, f"model '{requested}' not found; GET /v1/models lists the models", code="model_not_found")


def choose(host: ModelHost, requested: str | None) -> str | None:
    """The loaded model's id when the request names it (or none); an error for any other model."""
    current = loaded_id(host)
    name = _plain(requested)
    if name is None or name == current:
        return current
    if any(m.id == name and m.ok for m in scan()):
        raise ApiError(
            400,
            f"model '{name}' is installed but not loaded; this server has '{current}' loaded",
            code="model_not_loaded",
            param="model",
        )
    raise ApiError(404, f"model '{name}' not found; GET /v1/models lists the models", code="model_not_found")


def _plain(requested: str | None) -> str | None:
    """Ollama clients add ":latest" to names without a tag."""
    if not requested:
        return None
    return requested.removesuffix(":latest")

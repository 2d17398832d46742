"""How to reach the hub, read from the environment at the moment of each call (not at import).

HF_ENDPOINT   the hub or a mirror (default https://huggingface.co)
HF_TOKEN      an access token for gated or private repositories (else the token `hf auth login` stored)
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE   no network at all: pulls are refused with a clear message
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from owl_desktop.errors import DownloadError

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubSettings:
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    offline: bool = False

    @classmethod
    def from_env(cls) -> HubSettings:
        from huggingface_hub import get_token

        offline = offline_now()
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
        return cls(endpoint=endpoint, token=get_token(), offline=offline)

    @property
    def origin(self) -> tuple[str, str, int | None]:
        return origin_of(self.endpoint)

    def require_online(self, what: str) -> None:
        if self.offline:
            raise DownloadError(offline_message(what))


OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_now() -> bool:
    """Whether the environment says no network (checked without importing the hub client)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in OFFLINE_FLAGS)


def offline_message(what: str) -> str:
    return (
        f"cannot {what}: HF_HUB_OFFLINE is set, so owl-desktop does not go online. Unset HF_HUB_OFFLINE to download, "
        "or import a checkpoint you already have with `owl-desktop models import PATH`"
    )


def origin_of(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default

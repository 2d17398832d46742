"""What the API server listens on and lets in, checked before anything is bound."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from owl_desktop.app.settings import ApiServerDefaults
from owl_desktop.errors import ServerError

DEFAULT_PORT = ApiServerDefaults.port  # declared once with the app's settings, where the reason for it is given
DEFAULT_HOST = "127.0.0.1"
EVERY_ADDRESS = "0.0.0.0"
# Base64 grows images by a third: 64 MiB holds a few large photos and their history.
MAX_BODY_BYTES = 64 * 1024 * 1024
REMOTE_IMAGE_MAX_BYTES = 20 * 1024 * 1024
REMOTE_IMAGE_TIMEOUT_S = 10.0
QUEUE_SIZE = 4  # API requests that may wait behind the one running

_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#\s]+$", re.IGNORECASE)


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call; "*" for any
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: a server that fetches URLs forges requests)
    max_body_bytes: int = MAX_BODY_BYTES
    remote_image_max_bytes: int = REMOTE_IMAGE_MAX_BYTES
    remote_image_timeout_s: float = REMOTE_IMAGE_TIMEOUT_S

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @classmethod
    def from_settings(cls, s: ApiServerDefaults) -> ServerConfig:
        """The app's saved choices (Settings → Local API server) as a server configuration (not yet checked)."""
        origins = tuple(o for o in re.split(r"[\s,]+", s.cors_origins) if o)
        return cls(
            host=EVERY_ADDRESS if s.allow_network else DEFAULT_HOST,
            port=s.port,
            api_key=s.api_key.strip() or None,
            cors_origins=origins,
        )

    def check(self) -> ServerConfig:
        """Refuse settings that are broken or would expose the model without a key; returns a normalised copy."""
        if not 0 <= self.port <= 65535:
            raise ServerError(f"port {self.port} is not a TCP port (1-65535)")
        key = self.api_key or None
        if key is not None and (key != key.strip() or not key.isprintable()):
            raise ServerError("the API key must be printable text without surrounding spaces")
        if not self.loopback and key is None:
            raise ServerError(
                f"refusing to listen on {self.host or 'every address'} without an API key: other computers could use "
                "the model. Set one with --api-key or OWL_API_KEY, or listen on 127.0.0.1"
            )
        origins = []
        for origin in self.cors_origins:
            o = origin.strip().rstrip("/")
            if o != "*" and not _ORIGIN.match(o):
                raise ServerError(
                    f"'{origin}' is not a browser origin (scheme://host[:port], e.g. http://localhost:3000)"
                )
            origins.append(o)
        if self.max_body_bytes <= 0:
            raise ServerError("the request body cap must be positive")
        return replace(self, api_key=key, cors_origins=tuple(dict.fromkeys(origins)))


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this computer only (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # another name (or "" for every address) may resolve to anything

"""Image parts of a request to bytes: data URIs and bare base64 always; http(s) URLs only when allowed.

Nothing here decodes pixels: the bytes are hashed, and the engine decodes (with the app's pixel cap) only images it
has not encoded before. `file://` is refused (a client must not make the server read its disk), and so are URLs
unless the server was started with remote images allowed (a server that fetches URLs can be aimed at the network
behind it). A fetch has a size cap, a time cap, and follows redirects only to http(s).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
import urllib.error
import urllib.request

from owl_desktop.server.config import ServerConfig
from owl_desktop.server.errors import ApiError
from owl_desktop.server.requests import ApiImage

DATA_URI = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):", re.IGNORECASE)
IMAGE_TYPES = ("png", "jpeg", "jpg", "webp", "gif", "bmp")
_CHUNK = 64 * 1024


def from_base64(payload: str, label: str) -> ApiImage:
    """Raw base64 (Ollama's `images`, or a bare string in place of a URL)."""
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{label}: not valid base64 image data", code="invalid_image", param=label) from None
    if not data:
        raise ApiError(400, f"{label}: the image is empty", code="invalid_image", param=label)
    return ApiImage(data, label, hashlib.sha256(data).hexdigest())


def from_url(url: str, label: str, config: ServerConfig) -> ApiImage:
    """An OpenAI `image_url`: a data URI, bare base64, or (when allowed) an http(s) URL."""
    url = url.strip()
    m = DATA_URI.match(url)
    if m:
        mime = m.group(1).lower()
        params = [p.strip().lower() for p in m.group(2).split(";") if p.strip()]
        kind = mime.removeprefix("image/")
        if not mime.startswith("image/") or kind not in IMAGE_TYPES:
            raise ApiError(
                400,
                f"{label}: '{mime or 'no type'}' is not an image type this server takes "
                f"({', '.join('image/' + t for t in IMAGE_TYPES)})",
                code="invalid_image",
                param=label,
            )
        if "base64" not in params:
            raise ApiError(400, f"{label}: only base64 data URIs are taken", code="invalid_image", param=label)
        return from_base64(url[m.end() :], label)
    m = SCHEME.match(url)  # base64 has no ":", so anything with a scheme is a URL
    scheme = m.group(1).lower() if m else ""
    if scheme == "file":
        raise ApiError(400, f"{label}: file:// URLs are refused; send the image as a data: URI or base64", param=label)
    if scheme in ("http", "https"):
        if not config.allow_remote_images:
            raise ApiError(
                400,
                f"{label}: this server does not fetch image URLs; send the image as a data: URI or base64 "
                "(or start the server with remote images allowed)",
                param=label,
            )
        return fetch(url, label, config)
    if scheme:
        raise ApiError(400, f"{label}: '{scheme}:' URLs are not taken; send a data: URI", param=label)
    return from_base64(url, label)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if newurl.split(":", 1)[0].lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, label: str, config: ServerConfig) -> ApiImage:
    """Download an image URL within the configured size and time caps (run off the event loop)."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    deadline = time.monotonic() + config.remote_image_timeout_s
    cap = config.remote_image_max_bytes
    request = urllib.request.Request(url, headers={"User-Agent": "owl-desktop", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=config.remote_image_timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise ApiError(400, f"{label}: the image at the URL is larger than {cap} bytes", param=label)
            parts: list[bytes] = []
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise ApiError(400, f"{label}: the image at the URL is larger than {cap} bytes", param=label)
                if time.monotonic() > deadline:
                    raise ApiError(
                        400, f"{label}: fetching the image took over {config.remote_image_timeout_s:g} s", param=label
                    )
                parts.append(chunk)
    except ApiError:
        raise
    except urllib.error.HTTPError as exc:
        raise ApiError(400, f"{label}: fetching the image failed (HTTP {exc.code})", param=label) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ApiError(400, f"{label}: fetching the image failed ({reason})", param=label) from None
    data = b"".join(parts)
    if not data:
        raise ApiError(400, f"{label}: the URL gave an empty image", code="invalid_image", param=label)
    return ApiImage(data, label, hashlib.sha256(data).hexdigest())

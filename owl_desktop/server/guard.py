"""Who may use the server: Host and Origin checks, the API key, and the request body cap.

- Bound to loopback, only requests addressed to a loopback name are served: a web page whose domain was re-pointed
  at 127.0.0.1 (DNS rebinding) sends its own domain as Host and is refused.
- A request carrying an Origin (a browser's, e.g. an extension's) is refused unless that origin is listed; the listed
  ones get CORS headers from starlette's CORSMiddleware, which sits outside this guard and answers their preflights.
- With an API key, every endpoint but `GET /` wants `Authorization: Bearer KEY` (or `X-Api-Key: KEY`), compared in
  constant time.
"""

from __future__ import annotations

import hmac
import json

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from owl_desktop.server.config import ServerConfig, is_loopback
from owl_desktop.server.errors import ApiError


def error_payload(path: str, err: ApiError) -> dict[str, object]:
    """The error body in the dialect of the path: Ollama's {"error": "..."} under /api, OpenAI's shape elsewhere."""
    if path.startswith("/api/"):
        return {"error": err.message}
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


async def send_error(scope: Scope, send: Send, err: ApiError) -> None:
    """An error response sent straight from ASGI (for middleware, before any route runs)."""
    body = json.dumps(error_payload(scope.get("path", ""), err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def host_name(host_header: str) -> str:
    """The name part of a Host header: "[::1]:8695" → "::1", "localhost:8695" → "localhost"."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Guard:
    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self.check(scope)
        if err is not None:
            await send_error(scope, send, err)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.config.loopback:
            name = host_name(headers.get("host", ""))
            if not is_loopback(name):
                return ApiError(403, "this server only answers requests addressed to localhost")
        origin = headers.get("origin")
        if origin is not None and "*" not in self.config.cors_origins and origin not in self.config.cors_origins:
            return ApiError(403, f"origin {origin} is not allowed; list it in the server's CORS origins")
        if self._key is None or (scope.get("method") == "GET" and scope.get("path") == "/"):
            return None
        given = headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not token:
            return ApiError(401, "this server needs an API key: send 'Authorization: Bearer KEY'", headers=_CHALLENGE)
        if not hmac.compare_digest(token.encode(), self._key):
            return ApiError(401, "wrong API key", headers=_CHALLENGE)
        return None


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def read_body(request: Request, cap: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `cap` bytes (the rest is never buffered)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise too_large(cap)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise too_large(cap)
        parts.append(chunk)
    return b"".join(parts)


def too_large(cap: int) -> ApiError:
    return ApiError(
        413, f"the request body is larger than this server takes ({cap // (1024 * 1024)} MiB)", code="request_too_large"
    )


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise ApiError(400, f"the request body is not valid JSON ({where})") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON (not UTF-8 text)") from None

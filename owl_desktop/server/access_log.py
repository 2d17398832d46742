"""One log line per request: method, path, status, time and sizes; never the body, the query or the headers."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("owl_desktop.server.access")
MAX_PATH = 200  # a client may send any path; the log keeps its start


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        bytes_in = 0
        bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            log.info(
                "%s %s %s %.1f ms in=%d out=%d",
                scope.get("method", "?"),
                scope.get("path", "?")[:MAX_PATH],
                status or "-",
                (time.perf_counter() - start) * 1000,
                bytes_in,
                bytes_out,
            )

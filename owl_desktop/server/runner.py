"""Bind the port and run uvicorn on a thread of its own: `owl-desktop serve`, the app's toggle and the tests.

The socket is bound here, before uvicorn starts, so a port in use is one clear ServerError instead of a log line.
`stop()` cancels the answers in flight (each ends within one token) and shuts uvicorn down.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
import time

import uvicorn

from owl_desktop.errors import ServerError
from owl_desktop.server.app import ServerState, create_app
from owl_desktop.server.config import ServerConfig
from owl_desktop.server.host import ModelHost

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; ServerError with the reason when that fails."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on '{host}': {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform == "win32":  # SO_REUSEADDR on Windows would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
        else:  # restartable at once after a stop (TIME_WAIT), still refused while another server listens
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # from here the OS holds the port: a second server fails its bind
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise ServerError(
                f"port {port} on {host} is already in use by another program; choose another one with --port"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ServerError(f"not allowed to listen on {host}:{port}; use a port above 1023") from None
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class ApiServer:
    def __init__(self, host: ModelHost, config: ServerConfig) -> None:
        self.config = config.check()
        self.host = host
        self.state = ServerState()
        self.app = create_app(host, self.config, self.state)
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._sock is None:
            return self.config.port
        return int(self._sock.getsockname()[1])

    @property
    def base_url(self) -> str:
        h = self.config.host or "0.0.0.0"
        return f"http://[{h}]:{self.port}" if ":" in h else f"http://{h}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind (ServerError when that fails) and serve on a background thread; returns once it accepts requests."""
        if self.running:
            return
        self._sock = bind(self.config.host, self.config.port)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # the app's logging stays as it is; requests go through AccessLog
            access_log=False,
            server_header=False,
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        sock = self._sock
        server = self._server
        self._thread = threading.Thread(target=lambda: server.run(sockets=[sock]), name="owl-api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServerError("the API server did not start; see the log")
            time.sleep(0.01)
        log.info("API server listening on %s", self.base_url)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel answers in flight, stop accepting, and wait for the server thread to end."""
        self.state.cancel_all()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._thread = None
        self._server = None
        self._sock = None
        log.info("API server stopped")

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

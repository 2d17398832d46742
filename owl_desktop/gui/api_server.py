"""Settings → Local API server, in the window: the server runs over the window's own ChatService.

One engine, one queue: API requests and the window's answers take turns on the model the window has loaded, and
neither loads a second copy. The status line hears from the engine queue (on whichever thread changed it) whether
the server is on, its address, and when a request from another program is running or waiting.

starlette and uvicorn are imported only when the server is turned on, so the window starts as fast without it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Signal

from owl_desktop.app.engine_queue import API_REQUEST, QueueState
from owl_desktop.errors import OwlError

if TYPE_CHECKING:
    from owl_desktop.app.chat_service import ChatService
    from owl_desktop.app.settings import ApiServerDefaults


class ApiServerToggle(QObject):
    status_changed = Signal(str)  # text for the status line; "" when the server is off

    def __init__(self, chat: ChatService, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.chat = chat
        self._server: Any = None  # server.runner.ApiServer while on
        self._applied: ApiServerDefaults | None = None
        self.url: str | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def apply(self, settings: ApiServerDefaults) -> str | None:
        """Start, restart or stop the server as the settings say; a one-line reason when it cannot start."""
        if settings.enabled and self._server is not None and settings == self._applied:
            return None
        self.shutdown()
        if not settings.enabled:
            return None
        from owl_desktop.server.config import ServerConfig
        from owl_desktop.server.runner import ApiServer

        try:
            server = ApiServer(self.chat, ServerConfig.from_settings(settings))
            server.start()
        except OwlError as exc:
            return exc.message
        self._server = server
        self._applied = replace(settings)  # a snapshot: the settings object is edited in place
        self.url = server.base_url
        self.chat.queue.add_listener(self._on_queue)
        self._on_queue(self.chat.queue.state)
        return None

    def shutdown(self) -> None:
        """Stop the server: requests in flight end within one token."""
        server, self._server = self._server, None
        if server is None:
            return
        self.chat.queue.remove_listener(self._on_queue)
        server.stop()
        self.url = None
        self._applied = None
        self.status_changed.emit("")

    def status_text(self, state: QueueState) -> str:
        if self.url is None:
            return ""
        text = f"API on {self.url.removeprefix('http://')}"
        if state.running == API_REQUEST:
            text += " · answering a request"
        if state.waiting:
            text += f" · {state.waiting} waiting"
        return text

    def _on_queue(self, state: QueueState) -> None:
        self.status_changed.emit(self.status_text(state))  # queued to the GUI thread when emitted from another

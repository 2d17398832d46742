"""An HTTP error with a message fit for the client, and the mapping of the app's own errors to HTTP."""

from __future__ import annotations

from owl_desktop.errors import ContextFull, ImageError, OwlError, PromptError

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    501: "not_supported_error",
    503: "unavailable_error",
}

INTERNAL = "the server failed while answering; the details are in its log"


class ApiError(Exception):
    """An error answer: status, a one-line message (never paths, tracebacks or model internals), OpenAI's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or TYPES.get(status, "invalid_request_error")
        self.code = code
        self.param = param
        self.headers = headers or {}


def from_owl_error(exc: OwlError) -> ApiError:
    """The HTTP form of an error the engine or the image intake raised for one request."""
    if isinstance(exc, ContextFull):
        return ApiError(400, exc.message, type_="exceed_context_size_error", code="context_length_exceeded")
    if isinstance(exc, ImageError):
        return ApiError(400, exc.message, code="invalid_image")
    if isinstance(exc, PromptError):
        return ApiError(400, exc.message)
    return ApiError(500, INTERNAL)  # EngineError and the rest: llama.cpp's words and file names stay in the log

"""Errors a user can meet. Each carries a one-line message fit for the GUI and the CLI."""

from __future__ import annotations


class OwlError(Exception):
    """Base of every error we show to a user instead of a traceback."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Cancelled(OwlError):
    """The user (or the app shutting down) cancelled a long job."""

    exit_code = 130

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


class CheckpointError(OwlError):
    """A source checkpoint is missing, unreadable, unsafe or not an mPLUG-Owl checkpoint."""


class ConversionError(OwlError):
    """Conversion failed for a reason other than the input (disk, permissions, llama.cpp)."""


class BundleError(OwlError):
    """A model bundle is missing, incomplete or corrupted."""


class ImageError(OwlError):
    """An image could not be read or decoded."""


class PromptError(OwlError):
    """A question or conversation cannot be turned into a prompt (empty, too long for the context)."""


class ContextFull(PromptError):
    """The conversation needs more positions than the model's context holds."""

    def __init__(self, message: str, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed  # positions the prompt plus the least room for an answer take
        self.available = available  # the context size


class EngineError(OwlError):
    """The inference engine could not load or run the model."""


class ServerError(OwlError):
    """The local API server cannot start: the port is taken, or the settings would expose it unprotected."""


class DownloadError(OwlError):
    """A model could not be fetched from the hub: network, access, a corrupt file, or offline mode."""


class DownloadPaused(Cancelled):
    """A download was stopped on request; its partial files are kept and the next pull continues them."""

    def __init__(self, message: str = "download paused; pull again to resume") -> None:
        super().__init__(message)


class PreflightError(OwlError):
    """A model will not fit this machine (disk or memory), found before anything was downloaded."""

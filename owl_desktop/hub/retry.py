"""Retries with exponential back-off, and one-line messages for what the network and the hub can do to a request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from owl_desktop.errors import DownloadError
from owl_desktop.hub.settings import HubSettings, offline_message
from owl_desktop.tasks import Task

T = TypeVar("T")

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # failed tries in a row (without new bytes) before giving up
    base_delay: float = 1.0  # seconds before the first retry, doubled each time
    max_delay: float = 30.0
    stall_timeout: float = 30.0  # no bytes for this long: the connection is dropped and the download resumed
    connect_timeout: float = 15.0

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))


@dataclass(frozen=True)
class Problem:
    """A failed request: whether another try may help, and what to tell the user."""

    retriable: bool
    reason: str


def classify(exc: BaseException, settings: HubSettings, repo_id: str, filename: str | None = None) -> Problem:
    # imported here, where a request has failed: the app's window starts without the HTTP stack
    import httpx2
    from huggingface_hub.errors import (
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{filename} of {repo_id}" if filename else repo_id
    if isinstance(exc, OfflineModeIsEnabled):
        return Problem(False, offline_message(f"download {repo_id}"))
    if isinstance(exc, GatedRepoError):
        status = exc.response.status_code if exc.response is not None else None
        return Problem(False, _access_message(repo_id, settings, gated=True, status=status))
    if isinstance(exc, RevisionNotFoundError):
        return Problem(False, f"{repo_id} has no such revision on {settings.endpoint}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return Problem(False, f"{repo_id} has no file {filename or ''} at that revision on {settings.endpoint}".strip())
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403) or (isinstance(exc, RepositoryNotFoundError) and status != 404):
            return Problem(False, _access_message(repo_id, settings, gated=False, status=status))
        if status == 404 and (filename is None or isinstance(exc, RepositoryNotFoundError)):
            return Problem(False, f"no model repository {repo_id} on {settings.endpoint} (404); check the name")
        if status == 404:
            return Problem(False, f"{where} was not found on {settings.endpoint} (404)")
        if status == 429:
            return Problem(True, f"the hub is rate-limiting requests for {where} (429)")
        if status in _RETRY_STATUS:
            return Problem(True, f"the hub answered {status} (server error) for {where}")
        return Problem(False, f"the hub answered {status} for {where}")
    if isinstance(exc, FileMetadataError):
        return Problem(
            False, f"{settings.endpoint} does not answer like a Hugging Face hub for {where}; check HF_ENDPOINT"
        )
    if isinstance(exc, httpx2.TimeoutException) and not isinstance(exc, httpx2.ConnectTimeout):
        return Problem(True, f"the server stopped sending data for {where} (stalled)")
    if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout)):
        return Problem(True, f"cannot reach {settings.endpoint}; check the network, or set HF_ENDPOINT to a mirror")
    if isinstance(exc, (httpx2.NetworkError, httpx2.RemoteProtocolError)):
        return Problem(True, f"the connection dropped while fetching {where}")
    if isinstance(exc, httpx2.HTTPError):
        return Problem(True, f"a network error while fetching {where}: {exc}")
    raise exc


def _access_message(repo_id: str, settings: HubSettings, *, gated: bool, status: int | None = None) -> str:
    code = f" ({status})" if status else ""
    if settings.token is None:
        return (
            f"the hub refused access to {repo_id}{code}: it is gated or private (or does not exist). Accept its terms "
            f"on {settings.endpoint}/{repo_id}, then set HF_TOKEN to an access token of that account"
        )
    what = "is gated and the account of HF_TOKEN has not been granted access" if gated else "refused the HF_TOKEN"
    return f"{repo_id}{code}: the hub {what}; request access on {settings.endpoint}/{repo_id} or check the token"


def sleep_or_cancel(seconds: float, task: Task) -> None:
    """Sleep, waking every 50 ms to honour a cancel."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        task.check()
        time.sleep(min(0.05, left))
    task.check()


def with_retries(
    call: Callable[[], T],
    *,
    settings: HubSettings,
    repo_id: str,
    filename: str | None,
    policy: RetryPolicy,
    task: Task,
    on_wait: Callable[[str], None] | None = None,
) -> T:
    """Run a metadata request, retrying network errors and 5xx/429 with back-off; raise DownloadError at the end."""
    failures = 0
    while True:
        task.check()
        try:
            return call()
        except Exception as exc:  # classify re-raises what it does not know
            if task.cancelled:
                task.check()
            problem = classify(exc, settings, repo_id, filename)
            if not problem.retriable:
                raise DownloadError(problem.reason) from exc
            failures += 1
            if failures >= policy.attempts:
                raise DownloadError(f"{problem.reason}; gave up after {failures} tries, try again later") from exc
            delay = policy.delay(failures)
            if on_wait is not None:
                on_wait(f"{problem.reason}; retrying in {delay:g} s")
            sleep_or_cancel(delay, task)

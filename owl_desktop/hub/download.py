"""One file from the hub into our own partial file, resumed with `Range`, checked before it is accepted.

    <dest>.part        the bytes received so far; every chunk is appended as it arrives, so a crash keeps them
    <dest>.part.json   what they belong to (repo, commit, size, expected hash); a partial file for other content
                       is discarded, one for the same content is continued even across commits

Each attempt asks the hub for the file's metadata (`get_hf_file_metadata`: size, ETag, commit and where the bytes
are, usually a CDN redirect), then GETs the rest with `Range: bytes=<have>-`. A dropped connection, a stall (no byte
for `stall_timeout`), a 5xx or a 429 is retried with exponential back-off, and the count of failures starts again
whenever an attempt brought new bytes. The content is hashed as it is written (sha256 for LFS files, the git blob
sha1 for small files); the file gets its final name only when the hash matches the hub's. A mismatch deletes the
partial file and raises DownloadError. Cancelling closes the connection at once (even mid-read) and keeps the partial
file: that is a pause, and the next call resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from owl_desktop.atomic import write_json_atomic
from owl_desktop.errors import Cancelled, DownloadError
from owl_desktop.hashing import feed_file
from owl_desktop.hub.estimates import gib
from owl_desktop.hub.progress import TransferMeter
from owl_desktop.hub.remote import ContentHash, RemoteFile
from owl_desktop.hub.retry import RetryPolicy, classify, sleep_or_cancel
from owl_desktop.hub.settings import HubSettings, origin_of
from owl_desktop.tasks import Task

if TYPE_CHECKING:
    import httpx2  # imported where a download runs: the app's window starts without the HTTP stack

PART_SUFFIX = ".part"
META_SUFFIX = ".part.json"


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PART_SUFFIX)


def meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + META_SUFFIX)


class _Retry(Exception):
    """An attempt ended early for a reason worth another try."""


class _Partial:
    """The partial file and the running hash of its content."""

    def __init__(self, path: Path, digest: ContentHash) -> None:
        self.path = path
        self.digest = digest
        self.hasher = digest.new()
        self.offset = 0

    def load(self, task: Task, meter: TransferMeter) -> None:
        """Hash the bytes a previous attempt (or process) left, so the download continues after them."""
        if not self.path.is_file():
            return
        size = self.path.stat().st_size
        if size > self.digest.size:
            self.path.unlink()
            return
        meter.note(f"checking the {gib(size)} of {self.path.name.removesuffix(PART_SUFFIX)} already downloaded")
        self.offset = feed_file(self.hasher, self.path, task)
        meter.skip(self.offset)

    def reset(self, meter: TransferMeter) -> None:
        meter.reset_file_bytes(self.offset)
        with open(self.path, "wb"):
            pass
        self.hasher = self.digest.new()
        self.offset = 0

    def append(self, fh: Any, data: bytes) -> None:
        fh.write(data)
        self.hasher.update(data)
        self.offset += len(data)


class _CancelWatch:
    """While a response streams: shut its socket down when the task is cancelled (a blocked read returns at
    once), and let the meter report a quiet connection."""

    def __init__(self, response: httpx2.Response, task: Task, meter: TransferMeter) -> None:
        self._sock = _socket_of(response)
        self._task = task
        self._meter = meter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="owl-download-watch", daemon=True)

    def __enter__(self) -> _CancelWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            if self._task.cancelled:
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                return
            self._meter.tick()


def _socket_of(response: httpx2.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    try:
        sock = stream.get_extra_info("socket") if stream is not None else None
    except Exception:  # a transport without sockets: cancel then waits for the next chunk or the stall timeout
        return None
    return sock if isinstance(sock, socket.socket) else None


def download_file(
    repo_id: str,
    commit: str,
    remote: RemoteFile,
    dest: Path,
    *,
    settings: HubSettings,
    policy: RetryPolicy,
    task: Task,
    meter: TransferMeter,
) -> Path:
    """Fetch `remote` to `dest` (resuming `dest.part`), verify it and give it its final name; returns `dest`."""
    import httpx2

    digest = ContentHash(remote)
    part = _Partial(partial_path(dest), digest)
    _adopt_or_discard(dest, repo_id, commit, remote, digest)
    meter.start_file(remote.name)
    part.load(task, meter)
    failures = 0
    while part.offset < remote.size:
        before = part.offset
        try:
            _attempt(repo_id, commit, remote, part, settings=settings, policy=policy, task=task, meter=meter)
        except Cancelled:
            raise
        except (httpx2.HTTPError, OSError, _Retry) as exc:
            if task.cancelled:
                raise Cancelled() from exc
            if isinstance(exc, OSError) and not isinstance(exc, httpx2.HTTPError) and _is_local_io(exc):
                raise DownloadError(f"cannot write {part.path}: {exc.strerror or exc}") from exc
            reason = str(exc) if isinstance(exc, _Retry) else _reason(exc, settings, repo_id, remote.name)
            failures = 1 if part.offset > before else failures + 1
            if failures >= policy.attempts:
                kept = f"; the {gib(part.offset)} received are kept, pull again to resume" if part.offset else ""
                raise DownloadError(f"{reason}; gave up after {failures} tries in a row{kept}") from exc
            delay = policy.delay(failures)
            meter.note(f"{reason}; retrying in {delay:g} s")
            sleep_or_cancel(delay, task)
    _accept(part, dest, repo_id, remote)
    return dest


def _reason(exc: BaseException, settings: HubSettings, repo_id: str, name: str) -> str:
    problem = classify(exc, settings, repo_id, name)
    if not problem.retriable:
        raise DownloadError(problem.reason) from exc
    return problem.reason


def _is_local_io(exc: OSError) -> bool:
    """An error of our own disk (full, read-only, permissions), as opposed to the network's."""
    import errno

    return exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", -1))


def _adopt_or_discard(dest: Path, repo_id: str, commit: str, remote: RemoteFile, digest: ContentHash) -> None:
    """Keep a partial file only if its sidecar says it holds this very content; then (re)write the sidecar."""
    part, meta = partial_path(dest), meta_path(dest)
    record = {"repo_id": repo_id, "commit": commit, "file": remote.name, "size": remote.size,
              "hash": digest.algorithm, "expected": digest.expected}  # fmt: skip
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
        same = old.get("size") == remote.size and old.get("expected") == digest.expected
    except (OSError, ValueError, AttributeError):
        same = False
    if not same and part.exists():
        part.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, record, indent=1)


def _attempt(
    repo_id: str,
    commit: str,
    remote: RemoteFile,
    part: _Partial,
    *,
    settings: HubSettings,
    policy: RetryPolicy,
    task: Task,
    meter: TransferMeter,
) -> None:
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    task.check()
    token = settings.token or False
    url = hf_hub_url(repo_id, remote.name, revision=commit, endpoint=settings.endpoint)
    meta = get_hf_file_metadata(url, token=token, timeout=policy.connect_timeout, endpoint=settings.endpoint)
    if meta.size is not None and meta.size != remote.size:
        raise DownloadError(
            f"{remote.name} of {repo_id} changed on the hub ({meta.size} bytes now, {remote.size} listed); pull again"
        )
    headers = build_hf_headers(token=token)
    if origin_of(meta.location) != origin_of(url):
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
    headers["Accept-Encoding"] = "identity"
    if part.offset:
        headers["Range"] = f"bytes={part.offset}-"
    timeout = httpx2.Timeout(policy.connect_timeout, read=policy.stall_timeout)
    task.check()
    with get_session().stream("GET", meta.location, headers=headers, timeout=timeout) as response:
        if response.status_code == 416:
            if part.offset == remote.size:
                return
            part.reset(meter)
            raise _Retry(f"the server refused to resume {remote.name}; starting it over")
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if part.offset and response.status_code == 206:
            start = _range_start(response.headers.get("Content-Range"))
            if start != part.offset:
                part.reset(meter)
                raise _Retry(f"the server resumed {remote.name} at the wrong place; starting it over")
        elif part.offset:
            part.reset(meter)  # 200: the server ignored the Range header and sends the whole file
        with _CancelWatch(response, task, meter), open(part.path, "ab", buffering=0) as fh:
            for chunk in _chunks(response):
                if task.cancelled:
                    raise Cancelled()
                room = remote.size - part.offset
                part.append(fh, chunk[:room])
                meter.add(min(len(chunk), room))
                if len(chunk) > room:
                    break  # more bytes than the file has: the hash check decides
    if part.offset < remote.size:
        raise _Retry(f"the connection ended early while fetching {remote.name} of {repo_id}")


def _chunks(response: httpx2.Response) -> Iterator[bytes]:
    """Bytes as they arrive (no re-chunking: a buffer would be lost with the connection)."""
    yield from response.iter_bytes()


def _range_start(content_range: str | None) -> int | None:
    """The first byte of `Content-Range: bytes START-END/SIZE`."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    try:
        return int(content_range[6:].split("-", 1)[0])
    except ValueError:
        return None


def _accept(part: _Partial, dest: Path, repo_id: str, remote: RemoteFile) -> None:
    got = part.hasher.hexdigest()
    if got != part.digest.expected:
        part.path.unlink(missing_ok=True)
        meta_path(dest).unlink(missing_ok=True)
        raise DownloadError(
            f"{remote.name} of {repo_id} arrived corrupted: its {part.digest.algorithm} is {got[:12]}…, the hub says "
            f"{part.digest.expected[:12]}…; the damaged file was deleted, pull again to fetch it afresh"
        )
    os.replace(part.path, dest)
    meta_path(dest).unlink(missing_ok=True)


def verify_file(path: Path, remote: RemoteFile, task: Task) -> bool:
    """Whether a complete file on disk has the hub's content."""
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    digest = ContentHash(remote)
    h = digest.new()
    feed_file(h, path, task)
    return h.hexdigest() == digest.expected

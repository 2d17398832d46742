"""A repository's download folder: the checkpoint as fetched from the hub, file by file, resumable.

    <downloads dir>/<owner>--<name>/
        config.json, tokenizer.model, pytorch_model.bin, ...   files that passed their hash check
        pytorch_model.bin.part (+ .part.json)                   the file in progress (see download.py)
        .owl-download.json                                      repo, commit, the planned files, which are verified
        .owl-download.lock                                      held while a process downloads into the folder

The folder is a checkpoint the converter reads once every file is in. Its state survives restarts and updates: a
pull of the same repository continues where the last one stopped, and `scan` lists what is there.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl_desktop.atomic import write_json_atomic
from owl_desktop.errors import Cancelled, DownloadError, DownloadPaused
from owl_desktop.hub.download import PART_SUFFIX, download_file, partial_path, verify_file
from owl_desktop.hub.estimates import gib
from owl_desktop.hub.progress import TransferMeter
from owl_desktop.hub.remote import ContentHash, RepoPlan
from owl_desktop.hub.retry import RetryPolicy
from owl_desktop.hub.settings import HubSettings
from owl_desktop.tasks import Task

STATE_FILE = ".owl-download.json"
LOCK_FILE = ".owl-download.lock"


@dataclass(frozen=True)
class Download:
    """A repository in the downloads folder: partial (paused, failed or interrupted) or complete."""

    repo_id: str
    path: Path
    commit: str | None
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    complete: bool

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


def folder_name(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def read_state(folder: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "repo_id" in state else None


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    write_json_atomic(folder / STATE_FILE, state, indent=1)


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(state: dict[str, Any], path: Path, expected: str) -> bool:
    record = state.get("verified", {}).get(path.name)
    return bool(record) and path.is_file() and record == {"expected": expected, **_stamp(path)}


def describe(folder: Path) -> Download | None:
    state = read_state(folder)
    if state is None:
        return None
    planned: dict[str, Any] = state.get("files", {})
    done = files_done = 0
    for name, info in planned.items():
        path = folder / name
        if _verified(state, path, str(info.get("expected"))):
            done += int(info["size"])
            files_done += 1
        elif partial_path(path).is_file():
            done += partial_path(path).stat().st_size
    total = sum(int(i["size"]) for i in planned.values())
    return Download(
        repo_id=str(state["repo_id"]),
        path=folder,
        commit=state.get("commit"),
        bytes_done=done,
        bytes_total=total,
        files_done=files_done,
        files_total=len(planned),
        complete=bool(planned) and files_done == len(planned),
    )


def scan(downloads_dir: Path) -> list[Download]:
    if not downloads_dir.is_dir():
        return []
    found = (describe(p) for p in sorted(downloads_dir.iterdir()) if p.is_dir())
    return [d for d in found if d is not None]


def bytes_still_needed(folder: Path, plan: RepoPlan) -> int:
    """What a pull of `plan` into `folder` would still fetch (verified files and partial bytes count as had)."""
    state = read_state(folder) or {}
    needed = 0
    for f in plan.files:
        path = folder / f.name
        if _verified(state, path, ContentHash(f).expected):
            continue
        part = partial_path(path)
        needed += f.size - (min(part.stat().st_size, f.size) if part.is_file() else 0)
    return needed


def bytes_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


def download_snapshot(plan: RepoPlan, folder: Path, *, settings: HubSettings, policy: RetryPolicy, task: Task) -> Path:
    """Fetch every planned file into `folder` (continuing partial files); returns `folder` once all are verified."""
    from filelock import FileLock, Timeout

    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise DownloadError(f"{plan.repo_id} is already being downloaded by another window or process") from exc
    try:
        return _download_locked(plan, folder, settings=settings, policy=policy, task=task)
    finally:
        lock.release()


def _download_locked(plan: RepoPlan, folder: Path, *, settings: HubSettings, policy: RetryPolicy, task: Task) -> Path:
    old = read_state(folder) or {}
    state: dict[str, Any] = {
        "repo_id": plan.repo_id,
        "revision": plan.revision,
        "commit": plan.commit,
        "endpoint": settings.endpoint,
        "files": {f.name: {"size": f.size, "expected": ContentHash(f).expected} for f in plan.files},
        "verified": {k: v for k, v in old.get("verified", {}).items() if k in {f.name for f in plan.files}},
    }
    _write_state(folder, state)
    meter = TransferMeter(task, plan.total_bytes)
    try:
        for f in plan.files:
            dest = folder / f.name
            expected = ContentHash(f).expected
            if _verified(state, dest, expected):
                meter.skip(f.size)
                continue
            if dest.exists():  # a file from elsewhere (or an older state): accepted only if its hash matches
                meter.note(f"checking {f.name}")
                if not verify_file(dest, f, task):
                    dest.unlink()
            if not dest.exists():
                download_file(
                    plan.repo_id, plan.commit, f, dest, settings=settings, policy=policy, task=task, meter=meter
                )
            else:
                meter.skip(f.size)
            state["verified"][f.name] = {"expected": expected, **_stamp(dest)}
            _write_state(folder, state)
    except DownloadPaused:
        raise
    except Cancelled as exc:
        raise DownloadPaused(
            f"download of {plan.repo_id} paused with {gib(meter.done)} of {gib(plan.total_bytes)} kept; "
            "pull again to resume"
        ) from exc
    return folder


def remove_folder(folder: Path) -> int:
    """Delete a download folder; returns the bytes freed."""
    freed = bytes_on_disk(folder)
    shutil.rmtree(folder)
    return freed


def has_partial_files(folder: Path) -> bool:
    return any(p.name.endswith(PART_SUFFIX) for p in folder.iterdir()) if folder.is_dir() else False

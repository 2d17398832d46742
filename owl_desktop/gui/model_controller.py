"""Model downloads, imports, the demo build and removal as background tasks, for the welcome page and the manager."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from owl_desktop.gui.format import RateMeter, progress_line
from owl_desktop.gui.workers import TaskHandle, TaskRunner
from owl_desktop.hub.manager import ModelManager
from owl_desktop.tasks import Progress, Task

DEMO_KEY = "demo"


def entry_key(entry: Any) -> str:
    repo = getattr(entry, "repo_id", None) or getattr(entry, "repo", None) or str(entry)
    quant = getattr(entry, "quant", None) or ""
    return f"{repo}:{quant}" if quant else str(repo)


def result_model_id(result: Any) -> str:
    """The model id from what a job returned: an id, a bundle folder, or an installed-model record."""
    if isinstance(result, Path):
        return result.name
    return str(entry_field(result, "id", "bundle_id", default=result))


def model_id(model: Any) -> str:
    """The id of an installed-model record."""
    return str(entry_field(model, "id", "bundle_id", default=model))


def model_name(model: Any) -> str:
    """The display name of an installed-model record (its id when it has none)."""
    return str(entry_field(model, "name", default=None) or model_id(model))


def entry_field(entry: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)
        if value is not None:
            return value
    return default


class ModelController(QObject):
    """Runs model jobs on the pool and tells every page about their progress and the installed models."""

    installed_changed = Signal()
    job_progress = Signal(str, object, str)  # key, Progress, human line (size, speed, time left)
    job_done = Signal(str, object)  # key, result
    job_failed = Signal(str, str)  # key, message
    job_cancelled = Signal(str)

    def __init__(self, manager: ModelManager, runner: TaskRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.manager = manager
        self.runner = runner
        self._meters: dict[str, RateMeter] = {}

    # ------------------------------------------------------------ queries (quick, on the GUI thread)

    def offline_reason(self) -> str | None:
        """Why downloads are unavailable right now (HF_HUB_OFFLINE set), for the Download buttons; None when online."""
        from owl_desktop.hub.settings import OFFLINE_FLAGS, offline_now

        if not offline_now():
            return None
        flag = next(f for f in OFFLINE_FLAGS if os.environ.get(f))
        return f"Downloads are off: {flag} is set, so Owl does not go online. Import a model you already have instead."

    def catalog(self) -> list[Any]:
        try:
            return list(self.manager.catalog())
        except Exception:  # noqa: BLE001 - an unreadable catalog shows as empty
            return []

    def installed(self) -> list[Any]:
        try:
            return list(self.manager.installed())
        except Exception:  # noqa: BLE001
            return []

    def installed_ids(self) -> list[str]:
        return [model_id(m) for m in self.installed()]

    def display_name(self, ref: str) -> str:
        """The name an installed model shows (the one the user gave it, or its default); `ref` itself otherwise."""
        return next((model_name(m) for m in self.installed() if model_id(m) == ref), ref)

    def running(self, key: str) -> TaskHandle | None:
        return self.runner.find(key)

    def partial_downloads(self) -> list[Any]:
        """Downloads that stopped before the end (paused, failed, or the app was closed): each can be resumed."""
        try:
            return list(self.manager.partial_downloads())
        except Exception:  # noqa: BLE001 - an unreadable downloads folder shows as none
            return []

    def partial_download(self, key: str) -> Any:
        """The partial download behind a pull's key, or None."""
        return next((d for d in self.partial_downloads() if entry_key(d) == key), None)

    # ------------------------------------------------------------ jobs

    def _start(self, key: str, fn: Any, quick: bool = False) -> TaskHandle:
        existing = self.runner.find(key)
        if existing is not None:
            return existing
        meter = RateMeter()
        self._meters[key] = meter
        handle = self.runner.start(key, fn, quick=quick)
        handle.progress.connect(lambda p, k=key: self._on_progress(k, p))
        handle.succeeded.connect(lambda r, k=key: self._on_done(k, r))
        handle.failed.connect(lambda m, k=key: self.job_failed.emit(k, m))
        handle.cancelled.connect(lambda k=key: self.job_cancelled.emit(k))
        return handle

    def _on_progress(self, key: str, p: Progress) -> None:
        meter = self._meters.setdefault(key, RateMeter())
        if p.unit == "B" or p.total:
            meter.add(p.done)  # bytes, tensors, images…: time left at the recent pace (a new stage starts over)
        # a download reports its own speed and time left (measured where the bytes arrive); else the meter's
        line = progress_line(
            p.stage, p.done, p.total, p.unit, meter, speed=getattr(p, "speed", None), eta=getattr(p, "eta", None)
        )
        self.job_progress.emit(key, p, line)

    def _on_done(self, key: str, result: Any) -> None:
        self.job_done.emit(key, result)
        if not key.startswith(("preflight:", "verify:")):
            self.installed_changed.emit()

    def pull(self, entry: Any) -> TaskHandle:
        repo = entry_field(entry, "repo_id", "repo")
        quant = entry_field(entry, "quant")
        extra = {"quant": quant} if quant else {}  # no quant: the manager's default
        return self._start(entry_key(entry), lambda task: self.manager.pull(repo, task=task, **extra))

    def preflight(self, entry: Any) -> TaskHandle:
        """The fit badge's estimate: from the catalog and the disk (online=False), never a network call, so a
        slow or unreachable hub cannot hold it up; the pull itself checks again with the hub's exact sizes."""
        repo = entry_field(entry, "repo_id", "repo")
        quant = entry_field(entry, "quant")
        extra = {"quant": quant} if quant else {}
        return self._start(
            "preflight:" + entry_key(entry),
            lambda _task: self.manager.preflight(repo, online=False, **extra),
            quick=True,
        )

    def build_demo(self) -> TaskHandle:
        def build(task: Task) -> str:
            from owl_desktop.devtools.demo import DEMO_BUNDLE_ID, ensure_demo_bundle

            ensure_demo_bundle(task)
            return DEMO_BUNDLE_ID

        return self._start(DEMO_KEY, build)

    def import_path(self, path: Path) -> TaskHandle:
        return self._start(f"import:{path}", lambda task: self.manager.import_path(path, task=task))

    def verify(self, model_id: str) -> TaskHandle:
        return self._start(f"verify:{model_id}", lambda task: self.manager.verify(model_id, task=task))

    def rename(self, ref: str, name: str) -> str:
        """Store an installed model's new display name (quick: one small file); raises BundleError with a message
        when the name cannot be one. Every page showing it hears installed_changed."""
        stored = str(self.manager.rename(ref, name))
        self.installed_changed.emit()
        return stored

    def remove(self, model_id: str) -> None:
        self.manager.remove(model_id)
        self.installed_changed.emit()

    def discard_download(self, repo_id: str) -> int:
        """Delete a paused download's files; returns the bytes freed (raises with a message when it runs)."""
        freed = int(self.manager.discard_download(repo_id))
        self.installed_changed.emit()
        return freed

    def cancel(self, key: str) -> None:
        handle = self.runner.find(key)
        if handle is not None:
            handle.cancel()

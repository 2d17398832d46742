"""The model manager: the one service the GUI (from worker threads) and `owl-desktop models` use.

    from owl_desktop.hub.manager import ModelManager
    m = ModelManager()                              # models/downloads under the data dir; probes of this machine
    m.catalog()        -> list[CatalogEntry]        # the released mPLUG-Owl checkpoints, with sizes per quantization
    m.installed()      -> list[InstalledModel]      # bundles: id, name, path, quant, size, source, problem
    m.downloads()      -> list[Download]            # download folders, partial or complete (kept sources)
    m.partial_downloads() -> list[Download]         # the unfinished ones (paused, failed, interrupted)
    m.preflight(repo_id, quant="Q4_K_M", n_ctx=2048, online=None) -> Preflight
                       # fits / disk_ok / memory_ok, recommended quant, per-quant options, lines to show;
                       # online=False answers from the catalog and the disk alone
    m.pull(repo_id, quant="Q4_K_M", keep_source=False, task=None) -> Path
                       # preflight, download (resuming), verify, convert into <models>/<name>-<quant>, drop the source
    m.download(repo_id, task=None) -> Path          # only the verified checkpoint folder
    m.import_path(path, quant="Q4_K_M", move=False, task=None) -> Path
                       # a bundle folder (copied/moved in, hashes checked) or a checkpoint folder (converted)
    m.verify(model_id, task=None) -> InstalledModel # hashes every file; BundleError when one does not match
    m.rename(model_id, name) -> str                 # the display name, checked and stored in the bundle's manifest
    m.remove(model_id) -> int                       # a bundle id, or a repo id to discard its download; bytes freed
    m.discard_download(repo_id) -> int

Every long call takes a `Task` (owl_desktop.tasks): progress goes to its callback, download progress as a
`DownloadProgress` with speed and time left; cancelling it stops the call promptly with `Cancelled`. A cancelled
download raises `DownloadPaused` and keeps its partial files: that is the pause, and the next pull resumes. Errors
are OwlError subclasses with one-line messages: DownloadError (network, access, HF_TOKEN, corrupt file, offline),
PreflightError (will not fit, refused before downloading), BundleError, CheckpointError, ConversionError.

The hub is reached as the environment says at each call (settings.py): HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE.
Tests inject `free_space` (a folder -> free bytes), `memory` (-> MemoryInfo), `retry` (RetryPolicy) and `settings`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from owl_desktop import bundle as bundle_mod
from owl_desktop import paths
from owl_desktop.bundle import DEFAULT_QUANT, QUANTS, InstalledModel
from owl_desktop.errors import BundleError, DownloadError, PreflightError
from owl_desktop.hub import preflight as preflight_mod
from owl_desktop.hub import snapshot
from owl_desktop.hub.catalog import CATALOG, DEFAULT_REPO, PINNED_REVISION, CatalogEntry, lookup
from owl_desktop.hub.estimates import ModelFacts, gib
from owl_desktop.hub.preflight import FreeSpaceProbe, MemoryInfo, MemoryProbe, Preflight
from owl_desktop.hub.remote import RepoPlan, check_repo_id, fetch_plan, fetch_small_file
from owl_desktop.hub.retry import RetryPolicy
from owl_desktop.hub.settings import HubSettings, offline_message
from owl_desktop.hub.snapshot import Download
from owl_desktop.model_config import OwlConfig
from owl_desktop.tasks import Task

__all__ = ["ModelManager", "DEFAULT_REPO", "DEFAULT_QUANT"]


class ModelManager:
    def __init__(
        self,
        models_dir: Path | None = None,
        downloads_dir: Path | None = None,
        free_space: FreeSpaceProbe | None = None,
        memory: MemoryProbe | None = None,
        retry: RetryPolicy | None = None,
        settings: HubSettings | None = None,
    ) -> None:
        self.models_dir = Path(models_dir) if models_dir else paths.models_dir()
        self.downloads_dir = Path(downloads_dir) if downloads_dir else paths.downloads_dir()
        self.free_space: FreeSpaceProbe = free_space or preflight_mod.disk_free
        self.memory: MemoryProbe = memory or preflight_mod.system_memory
        self.retry = retry or RetryPolicy()
        self._settings = settings

    # -------------------------------------------------------------------------------------------------------------
    # what there is

    def settings(self) -> HubSettings:
        return self._settings or HubSettings.from_env()

    def catalog(self) -> list[CatalogEntry]:
        return list(CATALOG)

    def installed(self) -> list[InstalledModel]:
        return bundle_mod.scan(self.models_dir)

    def downloads(self) -> list[Download]:
        return snapshot.scan(self.downloads_dir)

    def partial_downloads(self) -> list[Download]:
        return [d for d in self.downloads() if not d.complete]

    # -------------------------------------------------------------------------------------------------------------
    # preflight, download, pull

    def preflight(
        self,
        repo_id: str,
        quant: str = DEFAULT_QUANT,
        n_ctx: int = 2048,
        task: Task | None = None,
        online: bool | None = None,
    ) -> Preflight:
        """Disk and memory for `repo_id` as `quant`.

        Online (the default unless HF_HUB_OFFLINE), the hub gives the exact files and the repository's config.json
        the parameter counts; with `online=False` the catalog and what is already on disk answer (catalog entries
        and started downloads only), e.g. for fit badges drawn before any network call.
        """
        task = task or Task()
        quant = _check_quant(quant)
        repo_id = check_repo_id(repo_id)
        settings = self.settings()
        folder = self._download_folder(repo_id)
        if settings.offline or online is False:
            entry = lookup(repo_id)
            local = snapshot.describe(folder)
            facts = self._local_facts(folder) or (entry.facts if entry else None)
            if local is not None:
                needed: int | None = local.bytes_total - local.bytes_done
            else:
                needed = entry.download_bytes if entry is not None else None
            if facts is None or needed is None:
                unknown = f"{repo_id} is neither in the catalog nor downloaded: its size is unknown without the hub"
                raise DownloadError(offline_message(f"look up {repo_id}") if settings.offline else unknown)
            return self._check(repo_id, quant, n_ctx, facts, needed)
        plan = fetch_plan(repo_id, self._revision(repo_id, None), settings, self.retry, task)
        return self._check(repo_id, quant, n_ctx, self._facts(plan, settings, task), self._still_needed(plan))

    def download(self, repo_id: str, revision: str | None = None, task: Task | None = None) -> Path:
        """Fetch the checkpoint of `repo_id` into the downloads folder (resuming) and return that folder."""
        task = task or Task()
        repo_id = check_repo_id(repo_id)
        settings = self.settings()
        settings.require_online(f"download {repo_id}")
        plan = fetch_plan(repo_id, self._revision(repo_id, revision), settings, self.retry, task)
        needed = self._still_needed(plan)
        where = preflight_mod.existing_ancestor(self.downloads_dir)
        free = self.free_space(where)
        if free < needed:
            raise PreflightError(f"not enough disk space in {where} to download {repo_id}: {_need(needed, free)}")
        return self._fetch(plan, settings, task)

    def pull(
        self,
        repo_id: str = DEFAULT_REPO,
        quant: str = DEFAULT_QUANT,
        keep_source: bool = False,
        task: Task | None = None,
        *,
        n_ctx: int = 2048,
        force: bool = False,
        revision: str | None = None,
        bundle_id: str | None = None,
    ) -> Path:
        """Download, verify and convert `repo_id` into an installed bundle; returns the bundle folder.

        Refused before any download when the disk cannot hold download + conversion, or (unless `force`) when the
        quantization does not fit in memory. Already installed from the same commit: returns it at once. Offline with
        a complete download on disk: converts it without going online.
        """
        from owl_desktop.convert.converter import convert_checkpoint, default_bundle_id

        task = task or Task()
        quant = _check_quant(quant)
        repo_id = check_repo_id(repo_id)
        settings = self.settings()
        folder = self._download_folder(repo_id)
        bundle_id = bundle_mod.sanitize_bundle_id(bundle_id or default_bundle_id({"repo": repo_id}, quant))
        target = self.models_dir / bundle_id
        if settings.offline:
            local = snapshot.describe(folder)
            if local is None or not local.complete:
                raise DownloadError(offline_message(f"download {repo_id}"))
            commit = local.commit
        else:
            plan = fetch_plan(repo_id, self._revision(repo_id, revision), settings, self.retry, task)
            existing = bundle_mod.describe(target)
            if existing and existing.ok and existing.source_repo == repo_id and existing.revision == plan.commit:
                task.report(f"{bundle_id} is already installed", 1, 1)
                return target
            report = self._check(repo_id, quant, n_ctx, self._facts(plan, settings, task), self._still_needed(plan))
            _refuse_unless_fits(report, force)
            self._fetch(plan, settings, task)
            commit = plan.commit
        out = convert_checkpoint(
            folder,
            target,
            quant=quant,
            task=task,
            bundle_id=bundle_id,
            free_space=self.free_space,
            source_info={"repo": repo_id, "revision": commit},
        )
        if not keep_source:
            task.report("removing the downloaded checkpoint", 0, None)
            snapshot.remove_folder(folder)
        return out

    # -------------------------------------------------------------------------------------------------------------
    # manage

    def import_path(
        self, path: str | Path, quant: str = DEFAULT_QUANT, move: bool = False, task: Task | None = None
    ) -> Path:
        """Install a bundle folder (copied, or moved, and verified) or convert a checkpoint folder."""
        from owl_desktop.hub import importing

        task = task or Task()
        src = Path(path).expanduser()
        if importing.kind_of(src) == "bundle":
            return importing.import_bundle(src, self.models_dir, move=move, task=task)
        return importing.import_checkpoint(
            src, self.models_dir, quant=_check_quant(quant), task=task, free_space=self.free_space, bundle_id=None
        )

    def verify(self, model_id: str, task: Task | None = None) -> InstalledModel:
        """Hash every file of an installed bundle against its manifest; raises BundleError on a mismatch."""
        from owl_desktop import bundle as bundle_mod

        folder = self._bundle_folder(model_id, allow_path=True)
        bundle_mod.load(folder, verify=True, task=task or Task())
        model = bundle_mod.describe(folder)
        assert model is not None
        return model

    def rename(self, model_id: str, name: str) -> str:
        """Give an installed bundle a new display name (its id and folder stay); returns the name as stored."""
        return bundle_mod.rename(self._bundle_folder(model_id), name)

    def remove(self, model_id: str) -> int:
        """Delete an installed bundle (by id), or a download (by repo id); returns the bytes freed."""
        if "/" in model_id:
            return self.discard_download(model_id)
        return snapshot.remove_folder(self._bundle_folder(model_id))

    def discard_download(self, repo_id: str) -> int:
        folder = self._download_folder(check_repo_id(repo_id))
        if not folder.is_dir():
            raise DownloadError(f"there is no download of {repo_id} to remove")
        from filelock import FileLock, Timeout

        lock = FileLock(str(folder / snapshot.LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            raise DownloadError(f"{repo_id} is being downloaded right now; pause it first") from exc
        try:
            freed = snapshot.bytes_on_disk(folder)
            for child in folder.iterdir():
                if child.name != snapshot.LOCK_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        finally:
            lock.release()
        shutil.rmtree(folder, ignore_errors=True)
        return freed

    # -------------------------------------------------------------------------------------------------------------
    # helpers

    def _download_folder(self, repo_id: str) -> Path:
        return self.downloads_dir / snapshot.folder_name(repo_id)

    def _bundle_folder(self, model_id: str, allow_path: bool = False) -> Path:
        candidate = Path(model_id).expanduser()
        if allow_path and ("/" in model_id or "\\" in model_id) and bundle_mod.describe(candidate) is not None:
            return candidate  # a bundle folder given by its path
        if not model_id or model_id.startswith(".") or "/" in model_id or "\\" in model_id:
            raise BundleError(f"'{model_id}' is not a model id; `owl-desktop models list` shows the installed ones")
        folder = self.models_dir / model_id
        if bundle_mod.describe(folder) is None:
            raise BundleError(f"no installed model '{model_id}'; `owl-desktop models list` shows the installed ones")
        return folder

    def _revision(self, repo_id: str, revision: str | None) -> str:
        if revision:
            return revision
        entry = lookup(repo_id)
        return entry.revision if entry else PINNED_REVISION

    def _still_needed(self, plan: RepoPlan) -> int:
        return snapshot.bytes_still_needed(self._download_folder(plan.repo_id), plan)

    def _fetch(self, plan: RepoPlan, settings: HubSettings, task: Task) -> Path:
        folder = self._download_folder(plan.repo_id)
        return snapshot.download_snapshot(plan, folder, settings=settings, policy=self.retry, task=task)

    def _facts(self, plan: RepoPlan, settings: HubSettings, task: Task) -> ModelFacts:
        """Parameter counts from the repository's own config.json (fetched into memory, checked by hash)."""
        local = self._local_facts(self._download_folder(plan.repo_id), plan)
        if local is not None:
            return local
        raw = fetch_small_file(plan, "config.json", settings, self.retry, task)
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise DownloadError(f"config.json of {plan.repo_id} is not valid JSON") from exc
        return ModelFacts.from_config(OwlConfig.from_dict(config))

    def _local_facts(self, folder: Path, plan: RepoPlan | None = None) -> ModelFacts | None:
        path = folder / "config.json"
        if not path.is_file():
            return None
        if plan is not None:
            from owl_desktop.hub.download import verify_file

            remote = plan.file("config.json")
            if not verify_file(path, remote, Task()):
                return None
        try:
            return ModelFacts.from_config(OwlConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            return None

    def _check(self, repo_id: str, quant: str, n_ctx: int, facts: ModelFacts, needed: int) -> Preflight:
        memory: MemoryInfo = self.memory()
        return preflight_mod.check(
            repo_id=repo_id,
            quant=quant,
            n_ctx=n_ctx,
            facts=facts,
            download_needed=needed,
            downloads_dir=self.downloads_dir,
            models_dir=self.models_dir,
            free_space=self.free_space,
            memory=memory,
        )


def _check_quant(quant: str) -> str:
    q = quant.upper()
    if q not in QUANTS:
        raise PreflightError(f"unknown quantization {quant}; choose one of {', '.join(QUANTS)}")
    return q


def _need(needed: int, free: int) -> str:
    return f"needs {gib(needed)}, {gib(free)} free"


def _refuse_unless_fits(report: Preflight, force: bool) -> None:
    for disk in report.disks:
        if not disk.ok:
            raise PreflightError(
                f"not enough disk space in {disk.path} for {report.repo_id} as {report.quant} (download + "
                f"conversion): {_need(disk.needed, disk.free)}; nothing was downloaded"
            )
    if report.memory_ok or force:
        return
    need = report.option(report.quant).footprint.ram
    hint = f"choose --quant {report.recommended}" if report.recommended else "no quantization fits this machine"
    raise PreflightError(
        f"{report.repo_id} as {report.quant} needs about {gib(need)} of memory, more than this machine has; "
        f"{hint} (or force it); nothing was downloaded"
    )

"""`owl-desktop models list|pull|preflight|import|verify|rename|rm`: get, check and manage models (hub/manager.py)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from owl_desktop.bundle import DEFAULT_QUANT, NAME_MAX, QUANTS
from owl_desktop.commands.progress import ProgressLine, human_size
from owl_desktop.errors import Cancelled
from owl_desktop.tasks import Progress, Task

T = TypeVar("T")


def register(sub: Any) -> None:
    from owl_desktop.hub.catalog import DEFAULT_REPO

    p = sub.add_parser("models", help="download, import, verify and remove models")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    ls = msub.add_parser("list", help="installed models, downloads in progress, and the catalog")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=run_list)

    pull = msub.add_parser("pull", help="download a model from the Hugging Face hub and convert it")
    pull.add_argument("repo_id", nargs="?", default=DEFAULT_REPO, metavar="REPO_ID", help="default: %(default)s")
    _quant_flags(pull)
    pull.add_argument("--keep-source", action="store_true", help="keep the downloaded checkpoint after converting")
    pull.add_argument("--force", action="store_true", help="download even if the preflight says it will not fit")
    pull.set_defaults(func=run_pull)

    pre = msub.add_parser("preflight", help="will a model fit this machine? (disk, memory, recommended quant)")
    pre.add_argument("repo_id", nargs="?", default=DEFAULT_REPO, metavar="REPO_ID", help="default: %(default)s")
    _quant_flags(pre)
    pre.set_defaults(func=run_preflight)

    imp = msub.add_parser("import", help="install a bundle folder, or convert a checkpoint folder")
    imp.add_argument("path", type=Path, metavar="PATH")
    imp.add_argument("--quant", choices=QUANTS, default=DEFAULT_QUANT, type=str.upper, help="for a checkpoint")
    imp.add_argument("--move", action="store_true", help="move a bundle instead of copying it")
    imp.set_defaults(func=run_import)

    ver = msub.add_parser("verify", help="check every file of an installed bundle against its sha256")
    ver.add_argument("model_id", metavar="ID", help="a bundle id (see `models list`) or a bundle folder")
    ver.set_defaults(func=run_verify)

    ren = msub.add_parser("rename", help="give an installed model a name of your own (its id stays)")
    ren.add_argument("model_id", metavar="ID", help="a bundle id (see `models list`)")
    ren.add_argument("name", metavar="NAME", help=f"the name the app shows (at most {NAME_MAX} characters)")
    ren.set_defaults(func=run_rename)

    rm = msub.add_parser("rm", help="delete an installed bundle, or a download (by repo id)")
    rm.add_argument("model_id", metavar="ID", help="a bundle id, or a repo id to discard its download")
    rm.set_defaults(func=run_rm)


def _quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=QUANTS, default=DEFAULT_QUANT, type=str.upper, help="default: %(default)s")
    p.add_argument("--n-ctx", type=int, default=2048, metavar="N", help="context size for the memory estimate")


def _manager() -> Any:
    from owl_desktop.hub.manager import ModelManager

    return ModelManager()


# ---------------------------------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    m = _manager()
    installed, downloads, catalog = m.installed(), m.downloads(), m.catalog()
    if args.json:
        print(json.dumps(_list_json(installed, downloads, catalog), indent=2))
        return 0
    print("Installed models:" if installed else "No model installed yet.")
    for b in installed:
        src = f"from {b.source_repo}@{(b.revision or '?')[:7]}" if b.source_repo else ""
        state = "" if b.ok else f"  BROKEN: {b.problem}"
        print(f"  {b.id:<32} {b.quant:<7} {human_size(b.size):>10}  {src}{state}")
        print(f"      shown as: {b.name}")
    if downloads:
        print("Downloads:")
    for d in downloads:
        if d.complete:
            state = "downloaded, not converted (`models pull` converts it; `models rm` deletes it)"
        else:
            amount = f"{human_size(d.bytes_done)} of {human_size(d.bytes_total)}"
            state = f"partial {d.fraction * 100:.0f}% ({amount}); `models pull` resumes it"
        print(f"  {d.repo_id:<32} {state}")
    print("Catalog (`owl-desktop models pull REPO_ID`):")
    for e in catalog:
        q4 = next(f for f in e.footprints() if f.quant == DEFAULT_QUANT)
        tag = " (default)" if e.default else ""
        print(f"  {e.repo_id}{tag}: {e.description}")
        print(
            f"      {e.download_bytes / 1e9:.1f} GB download; as {DEFAULT_QUANT}: {human_size(q4.bundle)} on disk, "
            f"about {human_size(q4.ram)} of memory. License: {e.license}"
        )
    return 0


def _list_json(installed: list[Any], downloads: list[Any], catalog: list[Any]) -> dict[str, Any]:
    return {
        "installed": [
            {"id": b.id, "name": b.name, "path": str(b.path), "quant": b.quant, "size": b.size,
             "source_repo": b.source_repo, "revision": b.revision, "ok": b.ok, "problem": b.problem}
            for b in installed
        ],
        "downloads": [
            {"repo_id": d.repo_id, "path": str(d.path), "commit": d.commit, "bytes_done": d.bytes_done,
             "bytes_total": d.bytes_total, "complete": d.complete}
            for d in downloads
        ],
        "catalog": [
            {"repo_id": e.repo_id, "revision": e.revision, "title": e.title, "description": e.description,
             "license": e.license, "files": list(e.files), "download_bytes": e.download_bytes, "chat": e.chat,
             "default": e.default,
             "quantizations": {f.quant: {"disk": f.bundle, "ram": f.ram, "vram": f.vram} for f in e.footprints()}}
            for e in catalog
        ],
    }  # fmt: skip


def run_preflight(args: argparse.Namespace) -> int:
    report = _manager().preflight(args.repo_id, args.quant, n_ctx=args.n_ctx)
    print(report.summary())
    return 0 if report.fits else 1


def run_pull(args: argparse.Namespace) -> int:
    from owl_desktop.hub.catalog import lookup

    m = _manager()
    entry = lookup(args.repo_id)
    if entry is not None and not entry.chat:
        print(f"note: {entry.repo_id} is not a chat model: {entry.description}", file=sys.stderr)
    if not m.settings().offline:
        print(m.preflight(args.repo_id, args.quant, n_ctx=args.n_ctx).summary(), file=sys.stderr)
    out = _with_progress(
        lambda task: m.pull(args.repo_id, args.quant, keep_source=args.keep_source, task=task, force=args.force)
    )
    print(f"installed {out.name} in {out}")
    print(f'try: owl-desktop ask --model {out.name} --image photo.jpg "Describe this picture."')
    return 0


def run_import(args: argparse.Namespace) -> int:
    m = _manager()
    out = _with_progress(lambda task: m.import_path(args.path, args.quant, move=args.move, task=task))
    print(f"installed {out.name} in {out}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    model = _with_progress(lambda task: _manager().verify(args.model_id, task=task))
    print(f"{model.id}: every file matches its sha256 ({human_size(model.size)})")
    return 0


def run_rename(args: argparse.Namespace) -> int:
    name = _manager().rename(args.model_id, args.name)
    print(f"{args.model_id} is now shown as: {name}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    freed = _manager().remove(args.model_id)
    print(f"removed {args.model_id}; {human_size(freed)} freed")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# progress and Ctrl+C


class TransferLine:
    """ProgressLine, plus speed and time left for downloads on a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.line = ProgressLine(self.stream)
        self._tty = self.stream.isatty()

    def __call__(self, p: Progress) -> None:
        from owl_desktop.hub.progress import DownloadProgress

        if not (self._tty and isinstance(p, DownloadProgress) and p.total):
            self.line(p)
            return
        if not p.stage.startswith("downloading "):  # a note (retrying, checking a partial file): keep it visible
            self.stream.write("\r" + p.stage[:110].ljust(110) + "\n")
            self.stream.flush()
            return
        width = 24
        fraction = min(1.0, p.done / p.total)
        bar = "#" * int(width * fraction) + "-" * (width - int(width * fraction))
        speed = f"{human_size(p.speed)}/s" if p.speed else "--"
        left = _duration(p.eta) + " left" if p.eta is not None else ""
        if p.stage.endswith("waiting for data"):
            speed, left = "waiting for data", ""
        text = f"{p.file[:24]:<24} [{bar}] {fraction * 100:5.1f}% {human_size(p.done)}/{human_size(p.total)} "
        self.stream.write("\r" + (text + f"{speed} {left}")[:110].ljust(110))
        self.stream.flush()

    def close(self) -> None:
        self.line.close()


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def _with_progress(job: Callable[[Task], T]) -> T:
    """Run `job` in a worker thread with a terminal progress line; Ctrl+C cancels it (a download pauses)."""
    progress = TransferLine()
    task = Task(progress)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = job(task)
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="owl-models", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        task.cancel_token.cancel()
        worker.join(30)
    finally:
        progress.close()
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise Cancelled("interrupted; the job is still stopping")
    return outcome["value"]

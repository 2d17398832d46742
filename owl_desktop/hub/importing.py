"""Bring a model that is already on this machine into the models folder.

A bundle folder (bundle.json + its files) is copied in, or moved when asked. Its bundle.json is untrusted: names,
id, quantization and sizes are checked (bundle.load) before anything is copied, every file is hashed while it is
copied into a hidden folder, and the bundle becomes visible (renamed into place) only when every hash matched.

A checkpoint folder (config.json + weights + tokenizer.model, e.g. a
Hugging Face download or cache snapshot) is converted into a bundle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from owl_desktop import bundle as bundle_mod
from owl_desktop.bundle import MANIFEST
from owl_desktop.errors import BundleError, CheckpointError
from owl_desktop.hub.preflight import FreeSpaceProbe, existing_ancestor
from owl_desktop.tasks import Task


def kind_of(path: Path) -> str:
    """Say "bundle" or "checkpoint"; anything else is refused with a one-line reason."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; import a folder (a model bundle or a checkpoint)")
    if (path / MANIFEST).is_file():
        return "bundle"
    if (path / "config.json").is_file():
        return "checkpoint"
    raise CheckpointError(
        f"{path} is neither a model bundle (no {MANIFEST}) nor an mPLUG-Owl checkpoint (no config.json)"
    )


def import_bundle(src: Path, models_dir: Path, *, move: bool, task: Task) -> Path:
    src = src.absolute()
    existing = bundle_mod.load(src, verify=False)  # manifest and sizes; hashes come below
    target = models_dir / existing.id
    if target.exists():
        if target.resolve() == src.resolve():
            bundle_mod.load(target, verify=True, task=task)
            return target
        raise BundleError(f"a bundle '{existing.id}' is already installed; remove it with `owl-desktop models rm`")
    models_dir.mkdir(parents=True, exist_ok=True)
    names = [MANIFEST, *existing.files]
    if move and _only_bundle_files(src) and _same_filesystem(src, models_dir):
        bundle_mod.load(src, verify=True, task=task)
        os.rename(src, target)
        bundle_mod.mark_verified(bundle_mod.load(target, verify=False))
        return target
    work = models_dir / f".{existing.id}.importing-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        work.mkdir()
        total = sum(r.size for r in existing.files.values()) + (src / MANIFEST).stat().st_size
        hashes = _copy_files(src, work, names, total, task)
        for name, rec in existing.files.items():
            if hashes[name] != rec.sha256:
                raise BundleError(f"bundle {existing.id}: file {name} is corrupted (sha256 mismatch); not imported")
        os.rename(work, target)
        bundle_mod.mark_verified(bundle_mod.load(target, verify=False))  # hashed while copied: not again on load
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if move:
        for name in names:
            (src / name).unlink(missing_ok=True)
        if src.is_dir() and not any(src.iterdir()):
            src.rmdir()
    return target


def import_checkpoint(
    src: Path, models_dir: Path, *, quant: str, task: Task, free_space: FreeSpaceProbe | None, bundle_id: str | None
) -> Path:
    from owl_desktop.convert.converter import convert_checkpoint, default_bundle_id, describe_source

    source = describe_source(src)
    bundle_id = bundle_mod.sanitize_bundle_id(bundle_id or default_bundle_id(source, quant))
    return convert_checkpoint(
        src,
        models_dir / bundle_id,
        quant=quant,
        task=task,
        bundle_id=bundle_id,
        free_space=free_space,
        source_info={"imported_from": str(src.absolute())},
    )


def _only_bundle_files(folder: Path) -> bool:
    return all(bundle_mod.is_bundle_file(p.name) for p in folder.iterdir())


def _same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(existing_ancestor(a)).st_dev == os.stat(existing_ancestor(b)).st_dev


def _copy_files(src: Path, dst: Path, names: list[str], total: int, task: Task) -> dict[str, str]:
    """Copy `names` and return the sha256 of what was copied (one read of each file)."""
    done = 0
    hashes: dict[str, str] = {}
    for name in names:
        h = hashlib.sha256()
        with open(src / name, "rb") as fin, open(dst / name, "wb") as fout:
            while block := fin.read(8 << 20):
                task.check()
                h.update(block)
                fout.write(block)
                done += len(block)
                task.report("copying the bundle", done, total, "B")
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src / name, dst / name)
        hashes[name] = h.hexdigest()
    return hashes

"""The bundles installed in the models folder, read from their manifests without hashing anything."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from owl_desktop.bundle import MANIFEST


@dataclass(frozen=True)
class InstalledModel:
    id: str
    path: Path
    quant: str
    size: int  # bytes of the bundle's files
    source_repo: str | None  # the hub repository it was converted from, when known
    revision: str | None  # the commit it was converted from
    problem: str | None = None  # None: every file is present with its recorded size

    @property
    def ok(self) -> bool:
        return self.problem is None


def describe(folder: Path) -> InstalledModel | None:
    """The bundle in `folder`, or None when there is none (no bundle.json)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
        files = {str(k): int(v["size"]) for k, v in raw["files"].items()}
        source = raw.get("source") or {}
        bundle_id, quant = str(raw["id"]), str(raw["quantization"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return InstalledModel(folder.name, folder, "?", 0, None, None, f"unreadable {MANIFEST}")
    problem = None
    for name, size in files.items():
        p = folder / name
        if not p.is_file():
            problem = f"{name} is missing"
            break
        if p.stat().st_size != size:
            problem = f"{name} has the wrong size"
            break
    return InstalledModel(
        id=bundle_id,
        path=folder,
        quant=quant,
        size=sum(files.values()),
        source_repo=source.get("repo"),
        revision=source.get("revision"),
        problem=problem,
    )


def scan(models_dir: Path) -> list[InstalledModel]:
    if not models_dir.is_dir():
        return []
    found = (describe(p) for p in sorted(models_dir.iterdir()) if p.is_dir() and not p.name.startswith("."))
    return [m for m in found if m is not None]

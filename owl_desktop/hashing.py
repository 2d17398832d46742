"""Hashing files in blocks: the one loop every sha256 of a bundle, a download or an import goes through."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from owl_desktop.tasks import Task

BLOCK = 4 << 20  # 4 MiB: large enough to be fast, small enough for cancel and progress to stay responsive


def feed_file(
    hasher: Any,
    path: Path,
    task: Task | None = None,
    on_block: Callable[[int], None] | None = None,
) -> int:
    """Feed `path` into `hasher` block by block; returns the bytes read.

    `task.check()` runs between blocks (cancel), and `on_block` gets the running total after each block.
    """
    done = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            if task is not None:
                task.check()
            hasher.update(block)
            done += len(block)
            if on_block is not None:
                on_block(done)
    return done


def sha256_file(path: Path, task: Task | None = None) -> str:
    """sha256 of a file; reports bytes hashed to `task` and honours its cancellation."""
    h = hashlib.sha256()
    total = path.stat().st_size

    def report(done: int) -> None:
        if task is not None:
            task.report(f"hashing {path.name}", done, total, "B")

    feed_file(h, path, task, report)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

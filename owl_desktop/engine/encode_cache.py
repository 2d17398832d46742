"""Image rows from the vision tower, cached in memory (LRU) and on disk, so no image is ever encoded twice.

<cache>/encodes/<encoder key>/<image sha256>.npy   float32 rows, one file per image
<cache>/encodes/<encoder key>/<sha256>-<R>x<C>.npy  a cropping model's rows of one image at one grid (UReader)

The encoder key is a hash of what an encode depends on: the vision weights (their sha256 in bundle.json) and the
compute dtype. A re-converted bundle or another dtype gets another folder, so stale rows are never reused. Files are
written atomically under unique temporary names (the CLI and the window may write the same entry at once), the
folder is pruned to a size limit (least recently used first), and the rows of images that no conversation keeps
any more can be forgotten. Plain numpy: importing this module loads neither torch nor llama.cpp.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from owl_desktop import paths
from owl_desktop.atomic import write_atomic
from owl_desktop.hashing import sha256_bytes

_SHA = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_LIMIT_BYTES = 1 << 30  # 1 GiB: ~1,000 images at the 7B width (65 rows × 4096 × float32 = 1 MiB each)


def root() -> Path:
    return paths.cache_dir() / "encodes"


def encoder_key(vision_sha256: str, dtype: str, plan: str = "") -> str:
    """The folder name for rows made by these vision weights in this dtype (and image plan, for cropping models)."""
    return sha256_bytes(f"{vision_sha256}|{dtype}|{plan}".encode())[:24]


def plan_key(plan: Mapping[str, object]) -> str:
    """A stable text for an image plan (bundle.json's `image_plan`), to go into encoder_key."""
    return json.dumps(plan, sort_keys=True, separators=(",", ":"))


class EncodeCache:
    """Rows by image sha256 (or sha256-RxC) for one encoder key: an LRU in memory, backed by .npy files.

    The memory side holds at most `capacity` entries and `capacity` × `rows_per_entry` rows, so a UReader document's
    rows (up to 21 views × 65, 22 MB at the 7B width) count for what they weigh.
    """

    def __init__(
        self,
        key: str,
        capacity: int,
        on_disk: bool,
        limit_bytes: int = DEFAULT_LIMIT_BYTES,
        rows_per_entry: int = 65,
    ) -> None:
        self.key = key
        self.capacity = capacity
        self.max_rows = capacity * rows_per_entry
        self.on_disk = on_disk
        self.limit_bytes = limit_bytes
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._rows = 0
        self._writes = 0

    def _file(self, sha: str) -> Path:
        return root() / self.key / f"{sha}.npy"

    def get(self, sha: str) -> np.ndarray | None:
        rows = self._mem.get(sha)
        if rows is not None:
            self._mem.move_to_end(sha)
            return rows
        if self.on_disk:
            f = self._file(sha)
            try:
                rows = np.load(f, allow_pickle=False)
                os.utime(f)  # recently used: pruned last
            except (OSError, ValueError, EOFError):  # missing or damaged (np.load of an empty file: EOFError)
                return None
            self._remember(sha, rows)
        return rows

    def put(self, sha: str, rows: np.ndarray) -> None:
        self._remember(sha, rows)
        if not self.on_disk:
            return
        buf = io.BytesIO()
        np.save(buf, rows, allow_pickle=False)
        try:
            write_atomic(self._file(sha), buf.getvalue())
        except OSError:
            return  # a full or read-only cache only costs a re-encode later
        self._writes += 1
        if self._writes % 16 == 1:
            prune(self.limit_bytes)

    def _remember(self, sha: str, rows: np.ndarray) -> None:
        old = self._mem.pop(sha, None)
        self._rows += len(rows) - (0 if old is None else len(old))
        self._mem[sha] = rows
        while len(self._mem) > 1 and (len(self._mem) > self.capacity or self._rows > self.max_rows):
            _, dropped = self._mem.popitem(last=False)
            self._rows -= len(dropped)


def _entries() -> list[tuple[float, int, Path]]:
    out = []
    for f in root().glob("*/*.npy"):
        with contextlib.suppress(OSError):
            st = f.stat()
            out.append((st.st_mtime, st.st_size, f))
    return out


def prune(limit_bytes: int = DEFAULT_LIMIT_BYTES) -> int:
    """Delete the least recently used entries until the cache holds at most `limit_bytes`; returns files deleted."""
    entries = sorted(_entries())
    total = sum(size for _t, size, _f in entries)
    removed = 0
    for _t, size, f in entries:
        if total <= limit_bytes:
            break
        with contextlib.suppress(OSError):
            f.unlink()
            total -= size
            removed += 1
    return removed


def forget(shas: Iterable[str]) -> int:
    """Delete the cached rows of these images under every encoder key; returns files deleted."""
    removed = 0
    for sha in shas:
        if not _SHA.match(sha):
            continue
        for f in [*root().glob(f"*/{sha}.npy"), *root().glob(f"*/{sha}-*x*.npy")]:
            with contextlib.suppress(OSError):
                f.unlink()
                removed += 1
    return removed

"""Files written whole or not at all: a temporary file in the same folder, fsynced, renamed into place, and the
folder fsynced so the rename itself survives a power cut.

Every file that must survive a crash goes through here: bundle manifests, download state and sidecars, verified
stamps, settings, encode-cache entries, exports. Temporary names are unique (mkstemp), so two processes (the CLI
and the window) writing the same target at once never clobber each other's half-written file: the last rename wins
with a complete file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; it replaces `path` only if the block ends without an exception."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_output(path) as f:
        f.write(data)


def write_json_atomic(path: Path, value: Any, *, indent: int | None = 2) -> None:
    """Write `value` as UTF-8 JSON (with a final newline) to `path` whole or not at all."""
    write_atomic(path, (json.dumps(value, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))

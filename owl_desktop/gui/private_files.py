"""Files the window must hand to a reader that wants a path (a pasted image shown in the image viewer): written
only where this user can read them, a folder of this process's own (0700) with files 0600, removed at close."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


class PrivateFiles:
    def __init__(self, prefix: str = "owl-private-") -> None:
        self._prefix = prefix
        self._folder: Path | None = None  # made at the first write

    @property
    def folder(self) -> Path | None:
        return self._folder

    def write(self, data: bytes, suffix: str = "") -> Path:
        """The path of a file holding `data` (the same content gives the same file)."""
        if self._folder is None or not self._folder.is_dir():
            self._folder = Path(tempfile.mkdtemp(prefix=self._prefix))  # mode 0700, whatever the umask
        path = self._folder / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        return path

    def remove_all(self) -> None:
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

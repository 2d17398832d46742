"""The conversation exchange format: the one parser of what the app exports and `ask --conversation` reads.

An export is a folder, the same folder as one `.owlchat.zip`, or just its JSON file:

    conversation.json   [{"images": ["images/<file>", …], "question": "…", "answer": "…"}, …]
                        complete question/answer pairs only; image paths relative to the file
    images/             the images' original bytes
    owlchat.json        optional extras: {"format", "title", "system_prompt", "model_id", "exported_at"}

Everything here is untrusted input: image paths must stay inside the export (no absolute paths, no `..`, no links
out of the folder), archives are capped in members, total size and compression ratio (a zip bomb is refused before
anything is decompressed), and every error is an `ExchangeError` with a one-line reason.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from owl_desktop.errors import OwlError

CONVERSATION_FILE = "conversation.json"
META_FILE = "owlchat.json"
IMAGES_DIR = "images"
ZIP_SUFFIX = ".owlchat.zip"
EXCHANGE_FORMAT = 1

MAX_MEMBERS = 10_000  # files in one archive
MAX_TOTAL_BYTES = 4 * 1024**3  # uncompressed bytes of one archive
MAX_FILE_BYTES = 256 * 1024**2  # one image or JSON file
MAX_RATIO = 200  # uncompressed / compressed of one member; images and JSON never come close


class ExchangeError(OwlError):
    """An export that cannot be read: missing, malformed, unsafe or too large."""


@dataclass(frozen=True)
class ExchangeTurn:
    images: list[str]  # paths relative to the export root, as written in conversation.json
    question: str
    answer: str


@dataclass(frozen=True)
class ExchangeMeta:
    title: str | None = None
    system_prompt: str | None = None
    model_id: str | None = None


@dataclass
class Exchange:
    """A parsed export; `image(rel)` gives the bytes of one of its images (or a checked path inside a folder)."""

    name: str
    turns: list[ExchangeTurn]
    meta: ExchangeMeta = field(default_factory=ExchangeMeta)
    _source: _Source | None = None

    def image_bytes(self, rel: str) -> bytes:
        assert self._source is not None
        return self._source.read(rel)

    def image_source(self, rel: str) -> Path | bytes:
        """A path for a file of a folder export (read by whoever needs it), the bytes for an archive member."""
        assert self._source is not None
        return self._source.locate(rel)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_turns(raw: Any, where: str) -> list[ExchangeTurn]:
    """The turns of a conversation.json document, validated."""
    if not isinstance(raw, list):
        raise ExchangeError(f"{where}: a conversation is a JSON list of turns")
    turns = []
    for i, t in enumerate(raw, 1):
        if not isinstance(t, dict) or not isinstance(t.get("question"), str) or not isinstance(t.get("answer"), str):
            raise ExchangeError(f"{where}: turn {i} needs a 'question' and an 'answer' (strings)")
        imgs = t.get("images", [])
        if not isinstance(imgs, list) or not all(isinstance(x, str) for x in imgs):
            raise ExchangeError(f"{where}: turn {i} 'images' must be a list of file paths")
        for rel in imgs:
            _check_relative(rel, where)
        turns.append(ExchangeTurn(list(imgs), t["question"], t["answer"]))
    return turns


def parse_meta(raw: Any) -> ExchangeMeta:
    """The optional extras; anything malformed is ignored (they are extras)."""
    if not isinstance(raw, dict):
        return ExchangeMeta()

    def text(key: str) -> str | None:
        value = raw.get(key)
        return value if isinstance(value, str) else None

    return ExchangeMeta(text("title"), text("system_prompt"), text("model_id"))


def read_exchange(path: Path) -> Exchange:
    """Open an export (folder, its conversation.json, or .owlchat.zip); close it (or use `with`) when done."""
    path = Path(path).expanduser()
    source = _Source(path)
    try:
        where = path.name
        data = source.read(source.json_name)
        try:
            turns = parse_turns(json.loads(data.decode("utf-8")), where)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ExchangeError(f"{where}: {source.json_name} is not valid JSON ({exc})") from exc
        meta = ExchangeMeta()
        if source.json_name == CONVERSATION_FILE and source.exists(META_FILE):
            try:
                meta = parse_meta(json.loads(source.read(META_FILE).decode("utf-8")))
            except (ValueError, UnicodeDecodeError):
                pass
        return Exchange(where, turns, meta, source)
    except BaseException:
        source.close()
        raise


def _check_relative(rel: str, where: str) -> PurePosixPath:
    p = PurePosixPath(rel.replace("\\", "/"))
    if not rel or p.is_absolute() or ".." in p.parts or ":" in p.parts[0]:
        raise ExchangeError(f"{where}: unsafe path {rel!r} (images must be inside the export)")
    return p


class _Source:
    """Files of an export by relative path, from a folder or a zip, with the path and size rules applied."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._root = path
        self._members: dict[str, zipfile.ZipInfo] = {}
        if path.is_file() and zipfile.is_zipfile(path):
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ExchangeError(f"{path.name}: not a readable zip archive ({exc})") from exc
            self._members = self._checked_members(self._zip)
        elif path.is_file():
            self._root = path.parent  # a conversation.json itself
        elif not path.is_dir():
            raise ExchangeError(f"{path}: no such file or folder")

    def _checked_members(self, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
        infos = zf.infolist()
        name = self.path.name
        if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > MAX_TOTAL_BYTES:
            raise ExchangeError(f"{name}: the archive is too large to be a conversation export")
        members = {}
        for info in infos:
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise ExchangeError(f"{name}: the archive holds a link ({info.filename}); exports hold plain files")
            if info.file_size > MAX_FILE_BYTES or info.file_size > MAX_RATIO * max(info.compress_size, 1) + 4096:
                raise ExchangeError(f"{name}: {info.filename} unpacks to {info.file_size} bytes; refused as unsafe")
            members[str(_check_relative(info.filename, name))] = info
        return members

    @property
    def json_name(self) -> str:
        return self.path.name if self._zip is None and self.path.is_file() else CONVERSATION_FILE

    def exists(self, rel: str) -> bool:
        if self._zip is not None:
            return str(_check_relative(rel, self.path.name)) in self._members
        return (self._root / rel).is_file()

    def locate(self, rel: str) -> Path | bytes:
        if self._zip is not None:
            return self.read(rel)
        target = self._folder_file(rel)
        if not target.is_file():
            raise ExchangeError(f"{self.path.name}: {rel} is missing")
        return target

    def read(self, rel: str) -> bytes:
        if self._zip is not None:
            info = self._members.get(str(_check_relative(rel, self.path.name)))
            if info is None:
                raise ExchangeError(f"{self.path.name}: {rel} is missing from the archive")
            try:
                with self._zip.open(info) as f:
                    # bounded by the declared size (checked at open), whatever the stream really unpacks to
                    data = f.read(min(info.file_size, MAX_FILE_BYTES) + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                # e.g. a member that unpacks to more than its header says: reading stops there, its CRC fails
                raise ExchangeError(f"{self.path.name}: {rel} is damaged in the archive ({exc})") from exc
            if len(data) > MAX_FILE_BYTES:
                raise ExchangeError(f"{self.path.name}: {rel} is larger than an export's file can be")
            return data
        target = self._folder_file(rel)
        try:
            if target.stat().st_size > MAX_FILE_BYTES:
                raise ExchangeError(f"{self.path.name}: {rel} is larger than an export's file can be")
            return target.read_bytes()
        except FileNotFoundError as exc:
            raise ExchangeError(f"{self.path.name}: {rel} is missing") from exc
        except OSError as exc:
            raise ExchangeError(f"cannot read {target}: {exc.strerror or exc}") from exc

    def _folder_file(self, rel: str) -> Path:
        target = self._root / _check_relative(rel, self.path.name)
        root = self._root.resolve()
        if target.exists() and not target.resolve().is_relative_to(root):
            raise ExchangeError(f"{self.path.name}: {rel} links outside the export; refused")
        return target

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

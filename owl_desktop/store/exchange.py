"""Conversations in and out: the CLI's `--conversation` JSON (a folder or one .owlchat.zip) and Markdown.

An exported folder (or the root of the zip):

    conversation.json   [{"images": ["images/<file>", …], "question": "…", "answer": "…"}, …]
                        exactly what `owl-desktop ask --conversation` reads; complete question/answer pairs only
    images/             copies of the images (original bytes)
    owlchat.json        optional extras the CLI ignores: title, system prompt, model id

Import accepts such a folder, its conversation.json, or the zip; every image is validated (ImageStore.add) before
the conversation is written, in one transaction, so a bad file leaves the history as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from owl_desktop.atomic import atomic_output, write_atomic
from owl_desktop.store.conversations import Conversation, ConversationStore, ImageRef, Message, StoreError
from owl_desktop.store.images import ImageStore

CONVERSATION_FILE = "conversation.json"
META_FILE = "owlchat.json"
IMAGES_DIR = "images"
ZIP_SUFFIX = ".owlchat.zip"
EXCHANGE_FORMAT = 1
MAX_ZIP_BYTES = 4 * 1024**3  # uncompressed total accepted from one archive
MAX_ZIP_MEMBERS = 10_000


@dataclass(frozen=True)
class QaPair:
    question: Message
    answer: Message


def qa_pairs(messages: Sequence[Message]) -> list[QaPair]:
    """The complete exchanges of a conversation: each user message directly followed by an answer."""
    out: list[QaPair] = []
    for prev, cur in zip(messages, messages[1:], strict=False):
        if prev.role == "user" and cur.role == "assistant":
            out.append(QaPair(prev, cur))
    return out


def _safe_name(name: str, suffix: str) -> str:
    stem = Path(name).stem if name else ""
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", stem).strip(" ._") or "image"
    return stem[:80] + suffix


def _file_names(refs: Sequence[ImageRef], images: ImageStore) -> dict[str, str]:
    """A distinct, portable file name for each distinct image (sha256 → name)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for ref in refs:
        if ref.sha256 in names:
            continue
        suffix = images.path(ref.sha256).suffix.lower()
        base = _safe_name(ref.name, suffix)
        candidate, n = base, 2
        while candidate.lower() in taken:
            candidate = f"{Path(base).stem}-{n}{suffix}"
            n += 1
        taken.add(candidate.lower())
        names[ref.sha256] = candidate
    return names


def _payload(store: ConversationStore, images: ImageStore, conv_id: str) -> dict[str, bytes]:
    """Every file of an export, by its path relative to the export root."""
    conv = store.get(conv_id)
    pairs = qa_pairs(store.messages(conv_id))
    refs = [r for p in pairs for r in p.question.images]
    names = _file_names(refs, images)
    turns = [
        {
            "images": [f"{IMAGES_DIR}/{names[r.sha256]}" for r in p.question.images],
            "question": p.question.text,
            "answer": p.answer.text,
        }
        for p in pairs
    ]
    meta = {
        "format": EXCHANGE_FORMAT,
        "title": conv.title,
        "system_prompt": conv.system_prompt,
        "model_id": conv.model_id,
        "exported_at": time.time(),
    }
    files = {
        CONVERSATION_FILE: (json.dumps(turns, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
        META_FILE: (json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8"),
    }
    for sha, name in names.items():
        files[f"{IMAGES_DIR}/{name}"] = images.read(sha)
    return files


def export_folder(store: ConversationStore, images: ImageStore, conv_id: str, folder: Path) -> Path:
    """Write the conversation to a new folder (which must not exist, or be empty); returns the folder."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise StoreError(f"{folder} already exists and is not an empty folder")
    files = _payload(store, images, conv_id)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for rel, data in files.items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as exc:
        raise StoreError(f"cannot export to {folder}: {exc.strerror or exc}") from exc
    return folder


def export_zip(store: ConversationStore, images: ImageStore, conv_id: str, zip_path: Path) -> Path:
    """Write the conversation as one archive (name it *.owlchat.zip); replaced atomically if it exists."""
    zip_path = Path(zip_path)
    files = _payload(store, images, conv_id)
    try:
        with (
            atomic_output(zip_path) as raw,
            zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        ):
            for rel, data in files.items():
                stored = rel.startswith(f"{IMAGES_DIR}/")  # images are compressed already
                zf.writestr(rel, data, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    except OSError as exc:
        raise StoreError(f"cannot export to {zip_path}: {exc.strerror or exc}") from exc
    return zip_path


# ---------------------------------------------------------------------------------------------------- import


class _Source:
    """Read files of an export by relative path, from a folder or a zip."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._root = path
        if path.is_file() and zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
            if len(infos) > MAX_ZIP_MEMBERS or sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
                raise StoreError(f"{path.name}: the archive is too large to be a conversation export")
            self._members = {i.filename: i for i in infos if not i.is_dir()}
        elif path.is_file():
            self._root = path.parent  # a conversation.json itself
        elif not path.is_dir():
            raise StoreError(f"{path}: no such file or folder")

    @property
    def json_name(self) -> str:
        return self.path.name if self._zip is None and self.path.is_file() else CONVERSATION_FILE

    def read(self, rel: str, *, optional: bool = False) -> bytes | None:
        if self._zip is not None:
            norm = str(PurePosixPath(rel))
            if rel.startswith("/") or ".." in PurePosixPath(rel).parts:
                raise StoreError(f"{self.path.name}: unsafe path {rel!r} in the archive")
            info = self._members.get(norm)
            if info is None:
                if optional:
                    return None
                raise StoreError(f"{self.path.name}: {rel} is missing from the archive")
            return self._zip.read(info)
        target = self._root / rel
        if optional and not target.is_file():
            return None
        try:
            return target.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {target}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _parse_turns(raw: Any, where: str) -> list[tuple[list[str], str, str]]:
    if not isinstance(raw, list):
        raise StoreError(f"{where}: a conversation is a JSON list of turns")
    turns = []
    for i, t in enumerate(raw, 1):
        if not isinstance(t, dict) or not isinstance(t.get("question"), str) or not isinstance(t.get("answer"), str):
            raise StoreError(f"{where}: turn {i} needs a 'question' and an 'answer' (strings)")
        imgs = t.get("images", [])
        if not isinstance(imgs, list) or not all(isinstance(x, str) for x in imgs):
            raise StoreError(f"{where}: turn {i} 'images' must be a list of file paths")
        turns.append((list(imgs), t["question"], t["answer"]))
    return turns


def import_conversation(store: ConversationStore, images: ImageStore, path: Path) -> Conversation:
    """Add an exported conversation (folder, its conversation.json, or .owlchat.zip) as a new conversation."""
    path = Path(path).expanduser()
    try:
        src = _Source(path)
    except zipfile.BadZipFile as exc:
        raise StoreError(f"{path.name}: not a readable zip archive ({exc})") from exc
    try:
        where = f"{path.name}"
        data = src.read(src.json_name)
        assert data is not None
        try:
            turns = _parse_turns(json.loads(data.decode("utf-8")), where)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"{where}: {src.json_name} is not valid JSON ({exc})") from exc
        meta: dict[str, Any] = {}
        extra = src.read(META_FILE, optional=True) if src.json_name == CONVERSATION_FILE else None
        if extra:
            try:
                loaded = json.loads(extra.decode("utf-8"))
                meta = loaded if isinstance(loaded, dict) else {}
            except (ValueError, UnicodeDecodeError):
                meta = {}
        stored: list[list[ImageRef]] = []
        for rels, _q, _a in turns:  # validate and store every image before touching the database
            refs = []
            for rel in rels:
                blob = src.read(rel)
                assert blob is not None
                img = images.add(blob, PurePosixPath(rel).name)
                refs.append(ImageRef(img.sha256, img.name))
            stored.append(refs)
    finally:
        src.close()
    title = meta.get("title") if isinstance(meta.get("title"), str) else None
    system = meta.get("system_prompt") if isinstance(meta.get("system_prompt"), str) else None
    model = meta.get("model_id") if isinstance(meta.get("model_id"), str) else None
    with store.transaction():
        conv = store.create(title or "New chat", system_prompt=system, model_id=model)
        for (_rels, question, answer), refs in zip(turns, stored, strict=True):
            store.add_message(conv.id, "user", question, refs)
            store.add_message(conv.id, "assistant", answer, meta={"imported_from": path.name})
    return store.get(conv.id)


# ---------------------------------------------------------------------------------------------------- markdown


def markdown_text(conv: Conversation, messages: Sequence[Message], image_link: Callable[[ImageRef], str]) -> str:
    """A readable Markdown transcript; `image_link` gives the relative link of each image."""
    lines = [f"# {conv.title}", ""]
    if conv.system_prompt:
        lines += [f"*System prompt:* {conv.system_prompt}", ""]
    for m in messages:
        who = "You" if m.role == "user" else "Owl"
        model = m.meta.get("model_id") if m.role == "assistant" else None
        lines.append(f"### {who}" + (f" ({model})" if model else ""))
        lines.append("")
        for ref in m.images:
            alt = ref.name.replace("]", ")").replace("[", "(")
            lines.append(f"![{alt}]({image_link(ref)})")
        if m.images:
            lines.append("")
        lines.append(m.text.rstrip() if m.text.strip() else "*(no text)*")
        if m.stopped:
            lines += ["", "*(stopped)*"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def export_markdown(store: ConversationStore, images: ImageStore, conv_id: str, dest: Path) -> Path:
    """Write `dest` (a .md file) and the images beside it in `<stem>_images/`; returns `dest`."""
    dest = Path(dest)
    conv = store.get(conv_id)
    messages = store.messages(conv_id)
    refs = [r for m in messages for r in m.images]
    names = _file_names(refs, images)
    folder = f"{dest.stem}_images"
    text = markdown_text(conv, messages, lambda ref: f"{folder}/{names[ref.sha256]}".replace(" ", "%20"))
    try:
        for sha, name in names.items():
            write_atomic(dest.parent / folder / name, images.read(sha))
        write_atomic(dest, text.encode("utf-8"))
    except OSError as exc:
        raise StoreError(f"cannot export to {dest}: {exc.strerror or exc}") from exc
    return dest

"""Stored conversations in and out: the exchange format (a folder or one .owlchat.zip) and Markdown.

The format itself (layout, parsing, the safety rules for untrusted exports) belongs to owl_desktop.exchange_format;
this module writes exports of stored conversations and imports exports into the store. Import accepts a folder, its
conversation.json, or the zip; every image is validated (ImageStore.add) before the conversation is written, in one
transaction, so a bad file leaves the history as it was.
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
from pathlib import Path, PurePosixPath

from owl_desktop.atomic import atomic_output, write_atomic
from owl_desktop.exchange_format import (
    CONVERSATION_FILE,
    EXCHANGE_FORMAT,
    IMAGES_DIR,
    META_FILE,
    ExchangeError,
    read_exchange,
)
from owl_desktop.store.conversations import Conversation, ConversationStore, ImageRef, Message, StoreError, qa_pairs
from owl_desktop.store.images import ImageStore


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


def import_conversation(store: ConversationStore, images: ImageStore, path: Path) -> Conversation:
    """Add an exported conversation (folder, its conversation.json, or .owlchat.zip) as a new conversation."""
    path = Path(path).expanduser()
    try:
        with read_exchange(path) as exchange:
            stored: list[list[ImageRef]] = []
            for turn in exchange.turns:  # validate and store every image before touching the database
                refs = []
                for rel in turn.images:
                    img = images.add(exchange.image_bytes(rel), PurePosixPath(rel).name)
                    refs.append(ImageRef(img.sha256, img.name))
                stored.append(refs)
    except ExchangeError as exc:
        raise StoreError(str(exc)) from exc
    meta = exchange.meta
    with store.transaction():
        conv = store.create(meta.title or "New chat", system_prompt=meta.system_prompt, model_id=meta.model_id)
        for turn, refs in zip(exchange.turns, stored, strict=True):
            store.add_message(conv.id, "user", turn.question, refs)
            store.add_message(conv.id, "assistant", turn.answer, meta={"imported_from": path.name})
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

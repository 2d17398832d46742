"""Conversation history in SQLite: conversations, their messages, and the images each message carries.

One database file in the data dir, in WAL mode with foreign keys on and synchronous=FULL. Every write runs in one
transaction (nested calls become savepoints), so a crash or an exception mid-write leaves the previous state. The
schema is versioned with PRAGMA user_version; `migrate` brings any older file (or a new, empty one) up to date,
one step per version, each step in its own transaction.

Message text is indexed with FTS5 (trigram tokenizer: case-insensitive substring search) where this SQLite has it;
otherwise, and for queries shorter than three characters, search falls back to a case-folded substring scan.

Safe to share between threads: one connection, every call under one re-entrant lock.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from owl_desktop import paths
from owl_desktop.errors import OwlError

DEFAULT_TITLE = "New chat"
TITLE_CHARS = 40
Role = Literal["user", "assistant"]
ROLES = ("user", "assistant")


class StoreError(OwlError):
    """The conversation database cannot be opened, read or written."""


class NotFound(StoreError):
    """No conversation or message with that id."""


@dataclass(frozen=True)
class ImageRef:
    sha256: str
    name: str


class _HasImageRef(Protocol):
    sha256: str
    name: str


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    created_at: float  # unix seconds
    updated_at: float
    system_prompt: str | None = None  # None: the app's default
    model_id: str | None = None  # the model that answered last


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: str
    seq: int  # 1, 2, … within the conversation
    role: Role
    text: str
    images: list[ImageRef] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    stopped: bool = False  # an answer the user stopped (or that failed) before its end


_ConversationList = list[Conversation]
_MessageList = list[Message]
_ImageRefList = list[ImageRef]


# ---------------------------------------------------------------------------------------------------- schema


def _v1(conn: sqlite3.Connection) -> None:
    script = """
        CREATE TABLE conversations (
            id            TEXT PRIMARY KEY,
            title         TEXT NOT NULL,
            title_auto    INTEGER NOT NULL DEFAULT 1,   -- 1 until the user renames it
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            system_prompt TEXT,
            model_id      TEXT
        );
        CREATE INDEX conversations_updated ON conversations(updated_at);
        CREATE TABLE messages (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the GUI may hold old ids
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            seq             INTEGER NOT NULL,
            role            TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            text            TEXT NOT NULL DEFAULT '',
            created_at      REAL NOT NULL,
            meta            TEXT NOT NULL DEFAULT '{}',
            stopped         INTEGER NOT NULL DEFAULT 0,
            UNIQUE (conversation_id, seq)
        );
        CREATE TABLE message_images (
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            ord        INTEGER NOT NULL,
            sha256     TEXT NOT NULL CHECK (length(sha256) = 64),
            name       TEXT NOT NULL,
            PRIMARY KEY (message_id, ord)
        );
        CREATE INDEX message_images_sha ON message_images(sha256);
    """
    # statement by statement: executescript would commit the migration's transaction first
    for statement in _statements(script):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _v2(conn: sqlite3.Connection) -> None:
    """Full-text index of message text, kept in step by triggers (skipped where SQLite lacks FTS5 trigram)."""
    try:
        conn.execute(
            "CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='id', "
            "tokenize='trigram')"
        )
    except sqlite3.OperationalError:
        return
    conn.execute(
        "CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN "
        "INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text); END"
    )
    conn.execute(
        "CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text); END"
    )
    conn.execute(
        "CREATE TRIGGER messages_fts_au AFTER UPDATE OF text ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text); "
        "INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text); END"
    )
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1, _v2]  # MIGRATIONS[i] takes version i to i + 1
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to schema `target`, one transaction per step; returns the version reached.

    `conn` must be in autocommit mode (isolation_level=None). A file from a newer owl-desktop is refused.
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the conversation database has schema version {current}; this owl-desktop reads up to "
            f"{SCHEMA_VERSION}. Update owl-desktop"
        )
    while current < target:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) == current:  # another process may have migrated meanwhile
                MIGRATIONS[current](conn)
                conn.execute(f"PRAGMA user_version = {current + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = schema_version(conn)
    return current


def default_path() -> Path:
    return paths.data_dir() / "conversations.sqlite3"


def auto_title(text: str, limit: int = TITLE_CHARS) -> str:
    """A title from a question: its first ~`limit` characters, cut at a word where possible."""
    words = " ".join(text.split())
    if len(words) <= limit:
        return words
    cut = words[:limit]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,.;:-") + "…"


def _fold(value: object) -> object:
    return value.casefold() if isinstance(value, str) else value


def _fts_phrase(query: str) -> str:
    return '"' + query.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------------- store


class ConversationStore:
    """The history database. Every method is one transaction; `transaction()` groups several into one."""

    def __init__(self, db_path: Path | None = None) -> None:
        self.path = Path(db_path) if db_path is not None else default_path()
        self._lock = threading.RLock()
        self._depth = 0
        try:
            paths.ensure(self.path.parent)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=15)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the conversation database {self.path}: {exc}") from exc
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.create_function("owl_fold", 1, _fold, deterministic=True)
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            migrate(self._conn)
            self._has_fts = (
                self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone() is not None
            )
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"the conversation database {self.path} is unreadable or damaged: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all. Nested use becomes a savepoint."""
        with self._lock:
            conn = self._conn
            depth = self._depth
            try:
                conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
            except sqlite3.Error as exc:
                raise StoreError(f"the conversation database is busy or read-only: {exc}") from exc
            self._depth = depth + 1
            try:
                yield conn
            except BaseException as exc:
                self._depth = depth
                if conn.in_transaction:  # SQLite may have rolled back on its own (e.g. disk full)
                    if depth == 0:
                        conn.execute("ROLLBACK")
                    else:
                        conn.execute(f"ROLLBACK TO sp{depth}")
                        conn.execute(f"RELEASE sp{depth}")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"could not save to the conversation database: {exc}") from exc
                raise
            self._depth = depth
            try:
                conn.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")
            except sqlite3.Error as exc:
                if depth == 0 and conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(f"could not save to the conversation database: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"could not read the conversation database: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def full_text_search(self) -> bool:
        """Whether search uses the FTS5 index (else a substring scan)."""
        return self._has_fts

    # ------------------------------------------------------------------ conversations

    @staticmethod
    def _conversation(row: sqlite3.Row) -> Conversation:
        return Conversation(
            id=row["id"],
            title=row["title"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            system_prompt=row["system_prompt"],
            model_id=row["model_id"],
        )

    def create(
        self, title: str = DEFAULT_TITLE, *, system_prompt: str | None = None, model_id: str | None = None
    ) -> Conversation:
        """A new, empty conversation. With the default title it is named after its first question."""
        now = time.time()
        title = " ".join(title.split()) or DEFAULT_TITLE
        cid = str(uuid.uuid4())
        with self.transaction() as c:
            c.execute(
                "INSERT INTO conversations (id, title, title_auto, created_at, updated_at, system_prompt, model_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cid, title, int(title == DEFAULT_TITLE), now, now, system_prompt, model_id),
            )
        return Conversation(cid, title, now, now, system_prompt, model_id)

    def list(self, search: str | None = None) -> _ConversationList:
        """Conversations, most recently updated first; `search` matches titles and message text (any case)."""
        order = " ORDER BY c.updated_at DESC, c.rowid DESC"
        query = (search or "").strip()
        with self._read() as c:
            if not query:
                rows = c.execute("SELECT c.* FROM conversations c" + order).fetchall()
                return [self._conversation(r) for r in rows]
            folded = query.casefold()
            if self._has_fts and len(query) >= 3:
                in_messages = (
                    "SELECT m.conversation_id FROM messages m WHERE m.id IN "
                    "(SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)"
                )
                arg: str = _fts_phrase(query)
            else:
                in_messages = "SELECT m.conversation_id FROM messages m WHERE instr(owl_fold(m.text), ?) > 0"
                arg = folded
            rows = c.execute(
                f"SELECT c.* FROM conversations c WHERE instr(owl_fold(c.title), ?) > 0 OR c.id IN ({in_messages})"
                + order,
                (folded, arg),
            ).fetchall()
            return [self._conversation(r) for r in rows]

    def get(self, conv_id: str) -> Conversation:
        with self._read() as c:
            row = c.execute("SELECT * FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        if row is None:
            raise NotFound(f"no conversation {conv_id}")
        return self._conversation(row)

    def rename(self, conv_id: str, title: str) -> Conversation:
        """A user-chosen title (a blank one returns to naming the chat after its first question)."""
        title = " ".join(title.split())
        with self.transaction() as c:
            self._require(c, conv_id)
            if title:
                c.execute("UPDATE conversations SET title = ?, title_auto = 0 WHERE id = ?", (title, conv_id))
            else:
                first = c.execute(
                    "SELECT text FROM messages WHERE conversation_id = ? AND role = 'user' ORDER BY seq LIMIT 1",
                    (conv_id,),
                ).fetchone()
                auto = auto_title(first["text"]) if first is not None and first["text"].strip() else DEFAULT_TITLE
                c.execute("UPDATE conversations SET title = ?, title_auto = 1 WHERE id = ?", (auto, conv_id))
            self._touch(c, conv_id)
        return self.get(conv_id)

    def delete(self, conv_id: str) -> set[str]:
        """Remove a conversation with its messages; returns the sha256 of the images no message refers to any more
        (the caller removes their files: the store keeps no files of its own)."""
        with self.transaction() as c:
            own = {r[0] for r in c.execute(
                "SELECT DISTINCT mi.sha256 FROM message_images mi JOIN messages m ON m.id = mi.message_id "
                "WHERE m.conversation_id = ?", (conv_id,))}  # fmt: skip
            c.execute("DELETE FROM conversations WHERE id = ?", (conv_id,))
            still = {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM message_images")}
        return own - still

    def mark_interrupted(self) -> list[int]:
        """Answers left "streaming" by a process that died mid-answer (a crash, kill -9, power cut) become stopped
        and marked "interrupted", never shown as complete. Call once at start-up; returns their ids."""
        with self.transaction() as c:
            rows = c.execute(
                "SELECT id, meta FROM messages WHERE role = 'assistant' AND json_extract(meta, '$.state') = 'streaming'"
            ).fetchall()
            for row in rows:
                meta = json.dumps({**json.loads(row["meta"]), "state": "interrupted"}, ensure_ascii=False)
                c.execute("UPDATE messages SET meta = ?, stopped = 1 WHERE id = ?", (meta, row["id"]))
        return [int(r["id"]) for r in rows]

    def set_system_prompt(self, conv_id: str, system_prompt: str | None) -> Conversation:
        with self.transaction() as c:
            self._require(c, conv_id)
            c.execute("UPDATE conversations SET system_prompt = ? WHERE id = ?", (system_prompt, conv_id))
            self._touch(c, conv_id)
        return self.get(conv_id)

    def set_model(self, conv_id: str, model_id: str | None) -> Conversation:
        with self.transaction() as c:
            self._require(c, conv_id)
            c.execute("UPDATE conversations SET model_id = ? WHERE id = ?", (model_id, conv_id))
        return self.get(conv_id)

    def image_refs(self) -> set[str]:
        """The sha256 of every image any message refers to (what the image store must keep)."""
        with self._read() as c:
            return {r[0] for r in c.execute("SELECT DISTINCT sha256 FROM message_images")}

    @staticmethod
    def _require(c: sqlite3.Connection, conv_id: str) -> None:
        if c.execute("SELECT 1 FROM conversations WHERE id = ?", (conv_id,)).fetchone() is None:
            raise NotFound(f"no conversation {conv_id}")

    @staticmethod
    def _touch(c: sqlite3.Connection, conv_id: str) -> None:
        c.execute("UPDATE conversations SET updated_at = max(?, updated_at) WHERE id = ?", (time.time(), conv_id))

    # ------------------------------------------------------------------ messages

    def _images_of(self, c: sqlite3.Connection, msg_ids: Sequence[int]) -> dict[int, _ImageRefList]:
        out: dict[int, _ImageRefList] = {i: [] for i in msg_ids}
        if not msg_ids:
            return out
        marks = ",".join("?" * len(msg_ids))
        for r in c.execute(
            f"SELECT message_id, sha256, name FROM message_images WHERE message_id IN ({marks}) "
            "ORDER BY message_id, ord",
            list(msg_ids),
        ):
            out[r["message_id"]].append(ImageRef(r["sha256"], r["name"]))
        return out

    @staticmethod
    def _message(row: sqlite3.Row, images: _ImageRefList) -> Message:
        try:
            meta = json.loads(row["meta"]) if row["meta"] else {}
        except ValueError:
            meta = {}
        return Message(
            id=row["id"],
            conversation_id=row["conversation_id"],
            seq=row["seq"],
            role=row["role"],
            text=row["text"],
            images=images,
            meta=meta if isinstance(meta, dict) else {},
            created_at=row["created_at"],
            stopped=bool(row["stopped"]),
        )

    def messages(self, conv_id: str) -> _MessageList:
        """The messages of a conversation in order (NotFound if the conversation does not exist)."""
        with self._read() as c:
            self._require(c, conv_id)
            rows = c.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq", (conv_id,)).fetchall()
            images = self._images_of(c, [r["id"] for r in rows])
        return [self._message(r, images[r["id"]]) for r in rows]

    def message(self, msg_id: int) -> Message:
        with self._read() as c:
            row = c.execute("SELECT * FROM messages WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                raise NotFound(f"no message {msg_id}")
            return self._message(row, self._images_of(c, [msg_id])[msg_id])

    def add_message(
        self,
        conv_id: str,
        role: Role,
        text: str,
        images: Sequence[_HasImageRef] = (),
        meta: dict[str, Any] | None = None,
        *,
        stopped: bool = False,
    ) -> Message:
        """Append a message (with its images, in order) at the end of a conversation."""
        if role not in ROLES:
            raise StoreError(f"a message role is 'user' or 'assistant', not {role!r}")
        now = time.time()
        refs = [ImageRef(i.sha256, i.name) for i in images]
        meta_json = json.dumps(meta or {}, ensure_ascii=False, default=str)
        with self.transaction() as c:
            conv = c.execute("SELECT title_auto FROM conversations WHERE id = ?", (conv_id,)).fetchone()
            if conv is None:
                raise NotFound(f"no conversation {conv_id}")
            seq = c.execute("SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE conversation_id = ?", (conv_id,))
            seq_no = int(seq.fetchone()[0])
            if role == "user" and conv["title_auto"] and text.strip():
                asked = c.execute(
                    "SELECT 1 FROM messages WHERE conversation_id = ? AND role = 'user' LIMIT 1", (conv_id,)
                ).fetchone()
                if asked is None:
                    c.execute("UPDATE conversations SET title = ? WHERE id = ?", (auto_title(text), conv_id))
            cur = c.execute(
                "INSERT INTO messages (conversation_id, seq, role, text, created_at, meta, stopped) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conv_id, seq_no, role, text, now, meta_json, int(stopped)),
            )
            msg_id = int(cur.lastrowid or 0)
            c.executemany(
                "INSERT INTO message_images (message_id, ord, sha256, name) VALUES (?, ?, ?, ?)",
                [(msg_id, i, r.sha256, r.name) for i, r in enumerate(refs)],
            )
            self._touch(c, conv_id)
        return Message(msg_id, conv_id, seq_no, role, text, refs, dict(meta or {}), now, stopped)

    def update_message(
        self,
        msg_id: int,
        text: str | None = None,
        meta: dict[str, Any] | None = None,
        *,
        stopped: bool | None = None,
    ) -> Message:
        """Change a message's text, meta (replaced whole) and/or stopped flag; the others stay as they are."""
        with self.transaction() as c:
            row = c.execute("SELECT * FROM messages WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                raise NotFound(f"no message {msg_id}")
            if text is not None:
                c.execute("UPDATE messages SET text = ? WHERE id = ?", (text, msg_id))
                if row["role"] == "user":
                    self._retitle_if_first(c, row["conversation_id"], msg_id, text)
            if meta is not None:
                meta_json = json.dumps(meta, ensure_ascii=False, default=str)
                c.execute("UPDATE messages SET meta = ? WHERE id = ?", (meta_json, msg_id))
            if stopped is not None:
                c.execute("UPDATE messages SET stopped = ? WHERE id = ?", (int(stopped), msg_id))
            self._touch(c, row["conversation_id"])
        return self.message(msg_id)

    @staticmethod
    def _retitle_if_first(c: sqlite3.Connection, conv_id: str, msg_id: int, text: str) -> None:
        first = c.execute(
            "SELECT id FROM messages WHERE conversation_id = ? AND role = 'user' ORDER BY seq LIMIT 1", (conv_id,)
        ).fetchone()
        if first is not None and first["id"] == msg_id and text.strip():
            c.execute("UPDATE conversations SET title = ? WHERE id = ? AND title_auto = 1", (auto_title(text), conv_id))

    def truncate_after(self, msg_id: int, inclusive: bool = False) -> int:
        """Delete the messages after `msg_id` in its conversation (and the message itself if `inclusive`)."""
        with self.transaction() as c:
            row = c.execute("SELECT conversation_id, seq FROM messages WHERE id = ?", (msg_id,)).fetchone()
            if row is None:
                raise NotFound(f"no message {msg_id}")
            op = ">=" if inclusive else ">"
            cur = c.execute(
                f"DELETE FROM messages WHERE conversation_id = ? AND seq {op} ?", (row["conversation_id"], row["seq"])
            )
            self._touch(c, row["conversation_id"])
            return int(cur.rowcount)

    def delete_message(self, msg_id: int) -> None:
        """Remove one message (e.g. an empty answer that never started); later messages keep their seq."""
        with self.transaction() as c:
            c.execute("DELETE FROM messages WHERE id = ?", (msg_id,))


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

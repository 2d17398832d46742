"""The history store on real SQLite files and real image files: schema, CRUD, search, crash safety, exchange."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl_desktop import paths
from owl_desktop.commands.engine_args import load_conversation
from owl_desktop.errors import ImageError
from owl_desktop.store import conversations as conv_mod
from owl_desktop.store.conversations import (
    DEFAULT_TITLE,
    SCHEMA_VERSION,
    ConversationStore,
    ImageRef,
    NotFound,
    StoreError,
    auto_title,
    migrate,
)
from owl_desktop.store.exchange import export_folder, export_markdown, export_zip, import_conversation
from owl_desktop.store.images import ImageStore


def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def store() -> ConversationStore:
    with ConversationStore() as s:
        yield s


@pytest.fixture
def images() -> ImageStore:
    return ImageStore()


def sha(i: int) -> str:
    return f"{i:064x}"


# ---------------------------------------------------------------------------------------------------- schema


def test_new_database_is_migrated_with_wal_and_foreign_keys(store: ConversationStore) -> None:
    assert store.path == paths.data_dir() / "conversations.sqlite3"
    raw = sqlite3.connect(store.path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages", "message_images"} <= tables
    raw.close()
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migration_from_an_empty_file_and_from_version_1_with_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite3"
    empty.write_bytes(b"")
    with ConversationStore(empty) as s:
        assert s.list() == []
    # a version-1 database (before the search index) with a conversation in it
    old = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(old, isolation_level=None)
    assert migrate(conn, target=1) == 1
    conn.execute("INSERT INTO conversations VALUES ('c1', 'Old chat', 1, 1.0, 2.0, NULL, NULL)")
    conn.execute(
        "INSERT INTO messages (conversation_id, seq, role, text, created_at) VALUES ('c1', 1, 'user', ?, 1)",
        ("Where is the Lighthouse?",),
    )
    conn.close()
    with ConversationStore(old) as s:
        assert s._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [c.id for c in s.list("lighthouse")] == ["c1"]
        assert s.messages("c1")[0].text == "Where is the Lighthouse?"


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer|Update"):
        ConversationStore(db)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "junk.sqlite3"
    db.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="unreadable or damaged"):
        ConversationStore(db)


# ---------------------------------------------------------------------------------------------------- CRUD


def test_create_get_rename_delete_and_auto_title(store: ConversationStore) -> None:
    c = store.create()
    assert c.title == DEFAULT_TITLE and store.get(c.id) == c
    store.add_message(c.id, "user", "  What   does this   chart show about the revenue in the third quarter?")
    assert store.get(c.id).title == "What does this chart show about the…"
    store.add_message(c.id, "user", "a second question does not rename")
    assert store.get(c.id).title.startswith("What does this chart")
    assert store.rename(c.id, "Revenue").title == "Revenue"
    first = store.messages(c.id)[0]
    store.update_message(first.id, text="edited first question")
    assert store.get(c.id).title == "Revenue"  # a user-chosen title stays
    assert store.rename(c.id, "   ").title == "edited first question"  # blank: back to the automatic title
    store.delete(c.id)
    with pytest.raises(NotFound):
        store.get(c.id)
    with pytest.raises(NotFound):
        store.messages(c.id)
    assert store._conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_auto_title_cuts_at_a_word() -> None:
    assert auto_title("short") == "short"
    assert auto_title("x" * 100) == "x" * 40 + "…"
    assert len(auto_title("word " * 30)) <= 41


def test_messages_keep_order_images_meta_and_stopped_flag(store: ConversationStore) -> None:
    c = store.create("Photos")
    u = store.add_message(c.id, "user", "compare", [ImageRef(sha(2), "b.png"), ImageRef(sha(1), "a.jpg")])
    a = store.add_message(c.id, "assistant", "", meta={"state": "streaming"})
    assert (u.seq, a.seq) == (1, 2)
    store.update_message(a.id, text="partial")
    done = store.update_message(a.id, text="partial answer", meta={"tokens": 3, "seed": 7}, stopped=True)
    assert done.text == "partial answer" and done.meta == {"tokens": 3, "seed": 7} and done.stopped
    msgs = store.messages(c.id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[0].images == [ImageRef(sha(2), "b.png"), ImageRef(sha(1), "a.jpg")]
    assert msgs[1] == done
    assert store.image_refs() == {sha(1), sha(2)}
    with pytest.raises(StoreError):
        store.add_message(c.id, "system", "nope")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        store.add_message("no-such-id", "user", "hello")
    store.set_system_prompt(c.id, "Be brief.")
    store.set_model(c.id, "owl-q4")
    got = store.get(c.id)
    assert (got.system_prompt, got.model_id) == ("Be brief.", "owl-q4")


def test_list_is_most_recently_updated_first(store: ConversationStore) -> None:
    a, b, c = store.create("a"), store.create("b"), store.create("c")
    assert [x.id for x in store.list()] == [c.id, b.id, a.id]
    store.add_message(a.id, "user", "bump")
    assert [x.id for x in store.list()] == [a.id, c.id, b.id]


def test_truncate_after(store: ConversationStore) -> None:
    c = store.create()
    ids = [store.add_message(c.id, "user" if i % 2 == 0 else "assistant", f"m{i}").id for i in range(6)]
    assert store.truncate_after(ids[3]) == 2
    assert [m.text for m in store.messages(c.id)] == ["m0", "m1", "m2", "m3"]
    assert store.truncate_after(ids[2], inclusive=True) == 2
    assert [m.text for m in store.messages(c.id)] == ["m0", "m1"]
    new = store.add_message(c.id, "user", "again")
    assert new.seq == 3 and new.id not in ids  # ids are never reused


# ---------------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("fts", [True, False])
def test_search_titles_and_text_in_any_case(store: ConversationStore, fts: bool) -> None:
    if fts and not store.full_text_search:
        pytest.skip("this SQLite has no FTS5 trigram tokenizer")
    store._has_fts = fts
    cats = store.create("Cats on the sofa")
    cake = store.create()
    store.add_message(cake.id, "user", "Is this a Crème Brûlée?")
    store.add_message(cake.id, "assistant", 'It says "DESSERT" on the menu; 100% sure.')
    other = store.create("Bills")
    store.add_message(other.id, "user", "total of the invoice")
    assert [c.id for c in store.list("CATS")] == [cats.id]
    assert [c.id for c in store.list("crème brûlée")] == [cake.id]
    assert [c.id for c in store.list("CRÈME")] == [cake.id]
    assert [c.id for c in store.list('"dessert"')] == [cake.id]  # quotes are text, not query syntax
    assert [c.id for c in store.list("100%")] == [cake.id]
    assert [c.id for c in store.list("OI")] == [other.id]  # shorter than a trigram
    assert {c.id for c in store.list("S")} == {cats.id, cake.id, other.id}
    assert store.list("platypus") == []
    assert len(store.list("  ")) == 3
    # the index follows edits and deletions
    msg = store.messages(other.id)[0]
    store.update_message(msg.id, text="sum of the receipt")
    assert store.list("invoice") == [] and [c.id for c in store.list("receipt")] == [other.id]
    store.delete(cake.id)
    assert store.list("brûlée") == []


# ---------------------------------------------------------------------------------------------------- crash safety


def test_an_exception_inside_a_transaction_leaves_the_previous_state(store: ConversationStore) -> None:
    c = store.create("kept")
    store.add_message(c.id, "user", "before")
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_message(c.id, "assistant", "half an answer")
            store.rename(c.id, "changed")
            raise RuntimeError("crash mid-write")
    assert store.get(c.id).title == "kept"
    assert [m.text for m in store.messages(c.id)] == ["before"]
    # a failing write rolls back its own earlier statements (the second image violates a constraint)
    with pytest.raises(StoreError):
        store.add_message(c.id, "user", "two images", [ImageRef(sha(1), "ok.png"), ImageRef("short", "bad.png")])
    assert [m.text for m in store.messages(c.id)] == ["before"]
    assert store.image_refs() == set()
    # a nested transaction that fails is undone alone when the outer one handles it
    with store.transaction():
        store.add_message(c.id, "assistant", "answer")
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.add_message(c.id, "user", "undone")
                raise RuntimeError
    assert [m.text for m in store.messages(c.id)] == ["before", "answer"]


def test_a_process_killed_mid_transaction_leaves_the_previous_state(store: ConversationStore) -> None:
    c = store.create("survives")
    store.add_message(c.id, "user", "committed")
    script = textwrap.dedent(
        f"""
        import os
        from owl_desktop.store.conversations import ConversationStore
        s = ConversationStore()
        with s.transaction():
            s.add_message({c.id!r}, "assistant", "never committed")
            s.rename({c.id!r}, "half-written")
            os._exit(3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    with ConversationStore() as fresh:
        assert fresh.get(c.id).title == "survives"
        assert [m.text for m in fresh.messages(c.id)] == ["committed"]
        fresh.add_message(c.id, "assistant", "still writable")
    assert [m.text for m in store.messages(c.id)] == ["committed", "still writable"]


def test_concurrent_writers_from_two_threads(store: ConversationStore) -> None:
    c = store.create()
    errors: list[BaseException] = []

    def write(tag: str) -> None:
        try:
            for i in range(25):
                store.add_message(c.id, "user", f"{tag}{i}")
                store.list()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    msgs = store.messages(c.id)
    assert [m.seq for m in msgs] == list(range(1, 51))


# ---------------------------------------------------------------------------------------------------- images


def test_image_store_is_content_addressed_and_validates_first(images: ImageStore, tmp_path: Path) -> None:
    src = tmp_path / "Holiday photo.jpg"
    src.write_bytes(jpeg_bytes(1))
    a = images.add(src)
    assert a.name == "Holiday photo.jpg" and (a.width, a.height) == (50, 20)
    assert a.path == paths.data_dir() / "images" / a.sha256[:2] / f"{a.sha256}.jpg"
    assert a.path.read_bytes() == src.read_bytes()
    again = images.add(src.read_bytes(), "other name.jpg")  # same bytes: same stored copy
    assert again.path == a.path and again.name == "other name.jpg"
    pasted = images.add(png_bytes(2))
    assert pasted.name == "pasted image" and pasted.path.suffix == ".png"
    assert images.path(a.sha256) == a.path and images.read(pasted.sha256) == png_bytes(2)
    assert sorted(images.all()) == sorted([a.sha256, pasted.sha256])

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.txt"):
        images.add(text)
    with pytest.raises(ImageError):
        images.add(png_bytes(3)[:60], "cut.png")  # truncated
    assert len(images.all()) == 2
    with pytest.raises(ImageError, match="missing"):
        images.path(sha(9))
    with pytest.raises(ImageError):
        images.path("../../etc/passwd")


def test_thumbnails_are_cached_pngs(images: ImageStore) -> None:
    big = images.add(png_bytes(4, (600, 300)), "wide.png")
    thumb = images.thumbnail(big.sha256, size=128)
    assert thumb.parent == paths.cache_dir() / "thumbnails"
    with Image.open(thumb) as t:
        assert t.format == "PNG" and t.size == (128, 64)
    mtime = thumb.stat().st_mtime_ns
    assert images.thumbnail(big.sha256, size=128).stat().st_mtime_ns == mtime
    small = images.add(png_bytes(5), "small.png")
    assert images.remove_unreferenced({small.sha256}) == 1
    assert images.all() == [small.sha256] and not thumb.exists()


# ---------------------------------------------------------------------------------------------------- exchange


def _conversation_with_images(store: ConversationStore, images: ImageStore, tmp_path: Path) -> str:
    shot = tmp_path / "screen shot.png"
    shot.write_bytes(png_bytes(10))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(11))
    other_shot = tmp_path / "sub"
    other_shot.mkdir()
    (other_shot / "screen shot.png").write_bytes(png_bytes(12))  # same name, other bytes
    a, b, c = images.add(shot), images.add(photo), images.add(other_shot / "screen shot.png")
    conv = store.create()
    store.set_system_prompt(conv.id, "Answer in French.")
    store.add_message(conv.id, "user", "Compare these two.", [a, b])
    store.add_message(conv.id, "assistant", "The first is a screenshot;\nthe second a photo. ünïcødé")
    store.add_message(conv.id, "user", "And this one?", [c, a])
    store.add_message(conv.id, "assistant", "Another screenshot.", stopped=True)
    store.add_message(conv.id, "user", "Unanswered question")
    return conv.id


def test_export_folder_is_the_cli_conversation_format_and_imports_back(
    store: ConversationStore, images: ImageStore, tmp_path: Path
) -> None:
    cid = _conversation_with_images(store, images, tmp_path)
    out = export_folder(store, images, cid, tmp_path / "export")
    turns = json.loads((out / "conversation.json").read_text(encoding="utf-8"))
    assert [t["question"] for t in turns] == ["Compare these two.", "And this one?"]  # complete pairs only
    assert set(turns[0]) == {"images", "question", "answer"}
    assert turns[0]["images"] == ["images/screen shot.png", "images/photo.jpg"]
    assert turns[1]["images"] == ["images/screen shot-2.png", "images/screen shot.png"]
    # the CLI's own reader accepts it, and the paths point at the right bytes
    history = load_conversation(out / "conversation.json").turns
    assert [Path(p).read_bytes() for p in history[1].images] == [png_bytes(12), png_bytes(10)]
    with pytest.raises(StoreError, match="not an empty folder"):
        export_folder(store, images, cid, out)

    fresh_images = ImageStore(tmp_path / "other-store")
    imported = import_conversation(store, fresh_images, out)
    assert imported.id != cid and imported.system_prompt == "Answer in French."
    assert imported.title == store.get(cid).title
    _assert_same_exchange(store, cid, imported.id, fresh_images)
    # a JSON file as the CLI takes it imports too (without owlchat.json extras: titled after the question)
    plain = out / "my chat.json"
    plain.write_bytes((out / "conversation.json").read_bytes())
    again = import_conversation(store, images, plain)
    assert again.title == "Compare these two." and again.system_prompt is None
    _assert_same_exchange(store, cid, again.id, images)


def _assert_same_exchange(store: ConversationStore, original: str, imported: str, images: ImageStore) -> None:
    src = [m for m in store.messages(original)][:4]
    dst = store.messages(imported)
    assert [(m.role, m.text) for m in dst] == [(m.role, m.text) for m in src]
    assert [[r.sha256 for r in m.images] for m in dst] == [[r.sha256 for r in m.images] for m in src]
    for m in dst:
        for r in m.images:
            assert images.read(r.sha256)  # the bytes are in the target store


def test_zip_round_trip_and_refusals(store: ConversationStore, images: ImageStore, tmp_path: Path) -> None:
    cid = _conversation_with_images(store, images, tmp_path)
    z = export_zip(store, images, cid, tmp_path / "chat.owlchat.zip")
    with zipfile.ZipFile(z) as zf:
        assert {"conversation.json", "owlchat.json"} <= set(zf.namelist())
        assert zf.read("images/photo.jpg") == jpeg_bytes(11)
    before = len(store.list())
    imported = import_conversation(store, ImageStore(tmp_path / "z-store"), z)
    _assert_same_exchange(store, cid, imported.id, ImageStore(tmp_path / "z-store"))
    assert len(store.list()) == before + 1

    # a path escaping the archive, a missing image and a non-image are refused, and nothing is added
    def bad_zip(name: str, turns: list[dict], members: dict[str, bytes]) -> Path:
        p = tmp_path / name
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("conversation.json", json.dumps(turns))
            for k, v in members.items():
                zf.writestr(k, v)
        return p

    escape = bad_zip("escape.zip", [{"images": ["../x.png"], "question": "q", "answer": "a"}], {})
    with pytest.raises(StoreError, match="unsafe"):
        import_conversation(store, images, escape)
    missing = bad_zip("missing.zip", [{"images": ["images/a.png"], "question": "q", "answer": "a"}], {})
    with pytest.raises(StoreError, match="missing"):
        import_conversation(store, images, missing)
    text = bad_zip(
        "text.zip",
        [
            {"images": ["images/a.png"], "question": "q", "answer": "a"},
            {"images": ["images/b.png"], "question": "q", "answer": "a"},
        ],
        {"images/a.png": png_bytes(20), "images/b.png": b"hello"},
    )
    with pytest.raises(ImageError):
        import_conversation(store, images, text)
    broken = bad_zip("broken.zip", [{"question": "q"}], {})
    with pytest.raises(StoreError, match="answer"):
        import_conversation(store, images, broken)
    assert len(store.list()) == before + 1


def test_markdown_export_with_images_alongside(store: ConversationStore, images: ImageStore, tmp_path: Path) -> None:
    cid = _conversation_with_images(store, images, tmp_path)
    md = export_markdown(store, images, cid, tmp_path / "md" / "chat.md")
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# Compare these two.")
    assert "Answer in French." in text and "ünïcødé" in text and "*(stopped)*" in text
    assert "Unanswered question" in text
    assert text.index("Compare these two.") < text.index("And this one?") < text.index("Unanswered question")
    links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) == 4
    for link in links:
        assert (md.parent / link.replace("%20", " ")).is_file()
    assert (md.parent / "chat_images" / "photo.jpg").read_bytes() == jpeg_bytes(11)


def test_module_exports_its_schema_version() -> None:
    assert conv_mod.SCHEMA_VERSION == len(conv_mod.MIGRATIONS) >= 2

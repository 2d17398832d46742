"""A corpus of hostile conversation exports, built on the fly: zip bombs, path traversal, links out of the export.

Each builder writes one file (or folder) that the app must refuse with a clear message before anything is stored.
The zips are written by hand (local headers, central directory, end record) so that a member can hold any
precompressed stream with any declared sizes, without ever holding the expanded bytes in memory.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

STORED, DEFLATED = 0, 8
_UNIX = 3  # "version made by" host: external attributes hold st_mode in their high 16 bits
_REGULAR, _SYMLINK = 0o100644, 0o120777
GIB = 1 << 30
_ZERO_CHUNK = 1 << 20  # the bomb repeats the deflate stream of one MiB of zeros


@dataclass(frozen=True)
class Member:
    """One archive member: `payload` is what the archive holds (already compressed for DEFLATED)."""

    name: str
    payload: bytes
    method: int = STORED
    crc: int = 0
    size: int = 0  # the declared uncompressed size
    mode: int = _REGULAR

    @classmethod
    def plain(cls, name: str, data: bytes, mode: int = _REGULAR) -> Member:
        return cls(name, data, STORED, zlib.crc32(data), len(data), mode)


def write_zip(path: Path, members: list[Member]) -> Path:
    """A zip archive of `members`, written as declared (sizes and CRCs are not checked against the payloads)."""
    out = bytearray()
    central = bytearray()
    for m in members:
        name = m.name.encode()
        offset = len(out)
        common = struct.pack("<HHHHHIII", 20, 0, m.method, 0, 0x21, m.crc, len(m.payload), m.size)
        out += struct.pack("<I", 0x04034B50) + common + struct.pack("<HH", len(name), 0) + name + m.payload
        central += struct.pack("<IH", 0x02014B50, (_UNIX << 8) | 20) + common
        central += struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, m.mode << 16, offset) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


@lru_cache(maxsize=4)
def _zeros_deflated(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of `size` zero bytes (a multiple of 1 MiB) and its CRC-32, in ~1 kB per MiB."""
    if size % _ZERO_CHUNK:
        raise ValueError("the size must be a multiple of 1 MiB")
    chunk = bytes(_ZERO_CHUNK)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    # a full flush byte-aligns the stream and forgets the history: the same bytes can follow themselves
    segment = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty last block
    crc = 0
    for _ in range(size // _ZERO_CHUNK):
        crc = zlib.crc32(chunk, crc)
    return segment * (size // _ZERO_CHUNK) + final, crc


def _conversation(image: str) -> Member:
    turns = [{"images": [image], "question": "What is this?", "answer": "A picture."}]
    return Member.plain("conversation.json", json.dumps(turns).encode())


def zip_bomb(path: Path, unpacked: int = GIB) -> Path:
    """An honest bomb: one image member whose ~1 MB deflate stream really unpacks to `unpacked` zero bytes, and says
    so in its headers (ratio ~1000:1)."""
    stream, crc = _zeros_deflated(unpacked)
    bomb = Member("images/bomb.png", stream, DEFLATED, crc, unpacked)
    return write_zip(path, [_conversation(bomb.name), bomb])


def lying_zip_bomb(path: Path, unpacked: int = GIB, declared: int = 4096) -> Path:
    """A bomb whose headers lie: they declare `declared` bytes, the stream unpacks to `unpacked`."""
    stream, crc = _zeros_deflated(unpacked)
    bomb = Member("images/bomb.png", stream, DEFLATED, crc, declared)
    return write_zip(path, [_conversation(bomb.name), bomb])


def traversal_zip(path: Path, member: str = "../escape.png", image: bytes = b"\x89PNG\r\n\x1a\n") -> Path:
    """An archive whose image member (and the conversation's reference to it) climbs out of the export."""
    return write_zip(path, [_conversation(member), Member.plain(member, image)])


def link_zip(path: Path, target: str = "/etc/passwd") -> Path:
    """An archive whose image member is a symbolic link to `target`."""
    link = Member.plain("images/link.png", target.encode(), mode=_SYMLINK)
    return write_zip(path, [_conversation(link.name), link])


def traversal_folder(root: Path, image: str = "../secret.png") -> Path:
    """A folder export whose conversation.json points outside the folder (the target exists, next to it)."""
    folder = root / "export"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "conversation.json").write_bytes(_conversation(image).payload)
    return folder


def link_folder(root: Path, target: Path) -> Path:
    """A folder export whose image is a symbolic link to a file outside the folder."""
    folder = root / "linked-export"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "photo.png").symlink_to(target)
    (folder / "conversation.json").write_bytes(_conversation("images/photo.png").payload)
    return folder

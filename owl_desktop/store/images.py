"""Content-addressed copies of the user's images, so history survives deleting or moving the originals.

<root>/<sha[:2]>/<sha256><ext>    the original bytes, untouched (written atomically, never modified)
<cache>/thumbnails/<sha256>-<size>.png    small previews, rebuilt on demand

An image is decoded (image_intake.load_image) before anything is stored: a file that is not a usable image
raises ImageError and leaves the store as it was.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from owl_desktop import paths
from owl_desktop.atomic import write_atomic
from owl_desktop.errors import ImageError
from owl_desktop.hashing import sha256_bytes
from owl_desktop.image_intake import load_image, read_source

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_EXT_BY_FORMAT = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "DIB": ".bmp",
    "TIFF": ".tiff",
    "ICO": ".ico",
    "PPM": ".ppm",
    "TGA": ".tga",
    "JPEG2000": ".jp2",
    "AVIF": ".avif",
    "HEIF": ".heic",
}


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    path: Path  # the stored copy
    name: str  # the name the user knows it by (file name, or "pasted image")
    width: int  # as displayed (after EXIF orientation)
    height: int


def default_root() -> Path:
    return paths.data_dir() / "images"


def thumbnails_dir() -> Path:
    return paths.cache_dir() / "thumbnails"


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA_RE.match(sha256):
        raise ImageError(f"not an image id: {sha256!r}")
    return sha256


def _extension(data: bytes, name: str) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except Exception:  # noqa: BLE001 - load_image already accepted the data; the extension is cosmetic
        fmt = ""
    if fmt in _EXT_BY_FORMAT:
        return _EXT_BY_FORMAT[fmt]
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ".img"


class ImageStore:
    """Images by sha256 of their bytes. Safe to share between threads (files are only ever added whole)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def add(self, source: Path | str | bytes, name: str | None = None) -> StoredImage:
        """Validate and store an image file (or bytes); storing the same bytes again returns the same copy."""
        data, label = read_source(source, name)
        if isinstance(source, (bytes, bytearray, memoryview)) and name is None:
            label = "pasted image"
        img = load_image(data, label)  # raises ImageError before anything is written
        sha = sha256_bytes(data)
        existing = self._find(sha)
        if existing is None:
            existing = self.root / sha[:2] / f"{sha}{_extension(data, label)}"
            try:
                write_atomic(existing, data)
            except OSError as exc:
                raise ImageError(f"{label}: cannot save a copy in {self.root} ({exc.strerror or exc})") from exc
        return StoredImage(sha, existing, label, img.width, img.height)

    def _find(self, sha256: str) -> Path | None:
        folder = self.root / sha256[:2]
        try:
            for p in folder.iterdir():
                if p.stem == sha256 and not p.name.startswith("."):
                    return p
        except OSError:
            return None
        return None

    def has(self, sha256: str) -> bool:
        return self._find(_check_sha(sha256)) is not None

    def path(self, sha256: str) -> Path:
        """The stored copy of an image; ImageError if it is not (or no longer) in the store."""
        found = self._find(_check_sha(sha256))
        if found is None:
            raise ImageError(f"image {sha256[:12]}… is missing from the image store ({self.root})")
        return found

    def read(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except OSError as exc:
            raise ImageError(f"image {sha256[:12]}…: cannot read the stored copy ({exc.strerror or exc})") from exc

    def thumbnail(self, sha256: str, size: int = 256) -> Path:
        """A PNG no larger than size×size (aspect kept), cached in the cache dir."""
        out = thumbnails_dir() / f"{_check_sha(sha256)}-{int(size)}.png"
        if out.is_file():
            return out
        img = load_image(self.path(sha256))
        img.thumbnail((size, size), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        try:
            write_atomic(out, buf.getvalue())
        except OSError as exc:
            raise ImageError(f"cannot write a thumbnail in {out.parent} ({exc.strerror or exc})") from exc
        return out

    def all(self) -> list[str]:
        """The sha256 of every stored image."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("??/*") if _SHA_RE.match(p.stem) and not p.name.startswith("."))

    def remove(self, sha256: str) -> bool:
        """Delete one stored image and its thumbnails; returns whether the image was there."""
        stored = self._find(_check_sha(sha256))
        for p in [*([stored] if stored else []), *thumbnails_dir().glob(f"{sha256}-*.png")]:
            try:
                p.unlink()
            except OSError:
                continue
        return stored is not None

    def remove_unreferenced(self, referenced: set[str]) -> int:
        """Delete stored images whose sha256 is not in `referenced` (and their thumbnails); returns how many."""
        return sum(self.remove(sha) for sha in self.all() if sha not in referenced)

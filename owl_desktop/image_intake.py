"""Image intake: an untrusted image file (or pasted bytes) read and decoded safely to 8-bit RGB.

Shared by the store (which validates an image before keeping it) and the engine (which turns it into pixels), so
neither needs the other. Decoding refuses what could hurt the app: files that are too big, images whose header
announces too many pixels (decompression bombs; refused before any pixel is decoded), and truncated or corrupt files
(Pillow could decode a truncated JPEG partially, grey at the bottom; we force a full load with
ImageFile.LOAD_TRUNCATED_IMAGES left False). EXIF orientation is applied, the first frame of an animation is used,
and every mode becomes 8-bit RGB, transparency composited on white.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, ImageOps

from owl_desktop.errors import ImageError

# 100 megapixels (e.g. 12000×8333) is above any common camera; decoding it costs ~300 MB as RGB. Pillow refuses
# on its own above 2 × Image.MAX_IMAGE_PIXELS (~179 MP by default); we turn that refusal into the same ImageError.
MAX_PIXELS = 100_000_000
MAX_FILE_BYTES = 256 * 1024 * 1024

WHITE = (255, 255, 255)


def read_source(source: Path | str | bytes, name: str | None = None) -> tuple[bytes, str]:
    """The bytes of an image file (or the given bytes) and the name to use in messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "image"
    else:
        path = Path(source)
        label = name or path.name or str(path)
        data = read_user_file(
            path,
            label,
            "an image file",
            MAX_FILE_BYTES,
            lambda size: f"file too large ({_mb(size)}; images up to {_mb(MAX_FILE_BYTES)} are read)",
        )
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{label}: too large ({_mb(len(data))}; images up to {_mb(MAX_FILE_BYTES)} are read)")
    if not data:
        raise ImageError(f"{label}: the file is empty (0 bytes)")
    return data, label


@contextlib.contextmanager
def _opened(data: bytes, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """Pillow's image of `data`, its header checked against `max_pixels`; whatever the block does with it (load,
    thumbnail) fails with the one-line ImageError a user sees, never a Pillow exception."""
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning; Pillow's hard limit (2 × Image.MAX_IMAGE_PIXELS) still
            # raises DecompressionBombError inside open(). catch_warnings is process-global state: a warning from
            # another thread decoding at the same moment may be lost, which is harmless.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{name}: image too large ({width}×{height} = {width * height:,} pixels; "
                    f"the limit is {max_pixels:,} pixels)"
                )
            yield img
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image too large ({_bomb_pixels(exc, max_pixels)})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image, or an unsupported image format") from exc
    except MemoryError as exc:
        raise ImageError(f"{name}: not enough memory to decode the image") from exc
    except Exception as exc:  # Pillow's decoders raise many types on malformed input
        raise ImageError(f"{name}: the image data is corrupt or truncated ({_reason(exc)})") from exc


def read_user_file(path: Path, label: str, kind: str, max_bytes: int, too_large: Callable[[int], str]) -> bytes:
    """The bytes of a file the user named, or a one-line ImageError: missing, a folder (not `kind`), unreadable,
    or larger than `max_bytes` (`too_large(size)` says so)."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise ImageError(f"{label}: is a folder, not {kind}")
        if size > max_bytes:
            raise ImageError(f"{label}: {too_large(size)}")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(f"{label}: no such file ({path})") from exc
    except PermissionError as exc:
        raise ImageError(f"{label}: permission denied ({path})") from exc
    except OSError as exc:
        raise ImageError(f"{label}: cannot read the file ({exc.strerror or exc})") from exc


def decode(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB image: size-checked from the header, fully loaded, EXIF-oriented, frame 0."""
    with _opened(data, name, max_pixels) as img:
        fmt = img.format or "image"
        # open() leaves an animation (GIF, APNG, WebP, MPO, multi-page TIFF) on its first frame: we use that one.
        img.load()  # decode every pixel now: truncated or corrupt data fails here, not later
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block must not lose the image; keep it unrotated
        pass
    try:
        return to_rgb(img)
    except MemoryError as exc:
        raise ImageError(f"{name}: not enough memory to decode the image") from exc
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: unsupported colour mode {img.mode} in this {fmt} ({_reason(exc)})") from exc


def preview(data: bytes, name: str = "image", max_side: int = 320) -> tuple[Image.Image, tuple[int, int]]:
    """A small RGB copy of an image for showing it (at most `max_side` a side) and the image's full size (EXIF
    orientation applied). The same checks and messages as `decode`; JPEG is decoded at a reduced scale (draft),
    other formats are shrunk as they load, so a 10000×8000 image costs no more than decoding it."""
    with _opened(data, name, MAX_PIXELS) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
        img.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale; others: no effect
        img.thumbnail((max_side, max_side), reducing_gap=2.0)  # loads every pixel: corrupt data fails here
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block: shown unrotated
        orientation = 1
    if orientation in (5, 6, 7, 8):  # turned a quarter: the full size turns with it
        width, height = height, width
    try:
        return to_rgb(img), (width, height)
    except (ValueError, OSError, MemoryError) as exc:
        raise ImageError(f"{name}: unsupported colour mode {img.mode} ({_reason(exc)})") from exc


def load_image(source: Path | str | bytes, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read and decode an image file (or bytes) to an RGB Pillow image, raising ImageError for anything unusable."""
    data, label = read_source(source, name)
    return decode(data, label, max_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency composited on white, high-bit-depth grey scaled to 8 bits."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        img = _grey_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """32-bit integer, 16-bit or float grey to 8-bit L, by the range the data evidently uses.

    Pillow's own convert("L") clips these to 0..255, which turns most 16-bit images white. 16-bit modes use
    0..65535. For "I" and "F" the nominal range is guessed: 0..1 (float only), 0..255, 0..65535, else min..max.
    """
    import numpy as np  # here, not at the top: the store imports this module, and the window starts without numpy

    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scale_max = 65535.0
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scale_max = 1.0
        elif lo >= 0.0 and hi <= 255.0:
            scale_max = 255.0
        elif lo >= 0.0 and hi <= 65535.0:
            scale_max = 65535.0
        else:
            a = a - lo
            scale_max = max(hi - lo, 1e-12)
    a = np.nan_to_num(a, nan=0.0, posinf=scale_max, neginf=0.0)
    grey = np.clip(np.rint(a * (255.0 / scale_max)), 0, 255).astype(np.uint8)
    out = Image.fromarray(grey, "L")
    if "transparency" in img.info:
        # a tRNS grey key in the original's range: make those pixels transparent in the 8-bit copy
        key = np.asarray(img, dtype=np.float64) == float(img.info["transparency"])
        out.putalpha(Image.fromarray(np.where(key, 0, 255).astype(np.uint8), "L"))
    return out


def _bomb_pixels(exc: Exception, max_pixels: int) -> str:
    """Pillow refused from the header before we saw the size: report its pixel count and the limit that applies."""
    m = re.search(r"\((\d+) pixels\).*?limit of (\d+)", str(exc))
    if m is None:
        return str(exc)
    return f"{int(m.group(1)):,} pixels; the limit is {min(max_pixels, int(m.group(2))):,} pixels"


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB"

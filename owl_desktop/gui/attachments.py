"""Images waiting to be sent: read and checked on the GUI side only as far as showing them needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QMimeData, QSize, Qt
from PySide6.QtGui import QImage, QImageReader

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
PREVIEW = 160


@dataclass
class PendingImage:
    source: Path | bytes  # what the chat service receives
    name: str
    preview: QImage
    size: tuple[int, int] | None = None  # width, height of the full image (its cost in the context depends on it)


class AttachmentError(Exception):
    """A dropped or pasted thing that cannot be attached; the message is for the user."""


def _read_preview(reader: QImageReader, name: str) -> QImage:
    reader.setAutoTransform(True)
    size = reader.size()
    if not reader.canRead() or not size.isValid():
        raise AttachmentError(f"“{name}” is not an image. Attach PNG, JPEG, WebP, GIF, BMP or TIFF files.")
    reader.setScaledSize(size.scaled(QSize(PREVIEW * 2, PREVIEW * 2), Qt.AspectRatioMode.KeepAspectRatio))
    image = reader.read()
    if image.isNull():
        raise AttachmentError(f"“{name}” looks like an image but cannot be decoded (the file may be damaged).")
    return image


def from_file(path: Path) -> PendingImage:
    if path.is_dir():
        raise AttachmentError(f"“{path.name}” is a folder; attach the image files inside it.")
    if not path.is_file():
        raise AttachmentError(f"“{path.name}” cannot be found.")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise AttachmentError(f"“{path.name}” is not an image. Attach PNG, JPEG, WebP, GIF, BMP or TIFF files.")
    reader = QImageReader(str(path))
    preview = _read_preview(reader, path.name)
    return PendingImage(path, path.name, preview, (reader.size().width(), reader.size().height()))


def from_qimage(image: QImage, name: str) -> PendingImage:
    """A pasted or dropped bitmap, kept as PNG bytes."""
    if image.isNull():
        raise AttachmentError("The clipboard image is empty.")
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    buffer.close()
    preview = image.scaled(PREVIEW * 2, PREVIEW * 2, Qt.AspectRatioMode.KeepAspectRatio)
    return PendingImage(bytes(data.data()), name, preview, (image.width(), image.height()))


def from_mime(mime: QMimeData, paste_index: int = 1) -> tuple[list[PendingImage], list[str]]:
    """Images from a drop or paste (local files, file:// URLs, bitmaps) and the messages for what was refused."""
    images: list[PendingImage] = []
    refused: list[str] = []
    if mime.hasUrls() and mime.urls():
        for url in mime.urls():
            if not url.isLocalFile():
                refused.append(f"“{url.toString()}” is not a file on this computer; save it first, then attach it.")
                continue
            try:
                images.append(from_file(Path(url.toLocalFile())))
            except AttachmentError as exc:
                refused.append(str(exc))
    elif mime.hasImage():
        image = mime.imageData()
        try:
            images.append(from_qimage(QImage(image), f"pasted-{paste_index}.png"))
        except (AttachmentError, TypeError) as exc:
            refused.append(str(exc) or "The clipboard image could not be read.")
    return images, refused


def mime_has_candidates(mime: QMimeData) -> bool:
    return (mime.hasUrls() and bool(mime.urls())) or mime.hasImage()

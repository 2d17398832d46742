"""Images waiting to be sent: checked at once as far as a name tells, read and previewed off the GUI thread.

A dropped file is a PendingImage at once (its path is what gets sent); its preview and size follow from a pool
thread (image_intake.preview: Pillow's reduced decoding, so a 10000×8000 PNG is never refused by Qt's own
allocation limit). A pasted bitmap becomes PNG bytes on a pool thread too, so a 50-megapixel paste does not freeze the
window; until then its `source` is None and the composer holds a send until it is ready. The chat view previews
the images of a conversation's history the same way (`PreviewPool.prepare_stored`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QMimeData, QObject, QRunnable, Qt, QThreadPool, Signal
from PySide6.QtGui import QImage

from owl_desktop.errors import OwlError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
PREVIEW = 160


@dataclass(eq=False)
class PendingImage:
    source: Path | bytes | None  # what the chat service receives (None while a paste is still being encoded)
    name: str
    preview: QImage | None = None  # None until the pool has made it
    size: tuple[int, int] | None = None  # width, height of the full image (its cost in the context depends on it)

    @property
    def ready(self) -> bool:
        return self.source is not None and self.preview is not None


class AttachmentError(Exception):
    """A dropped or pasted thing that cannot be attached; the message is for the user."""


def check_file(path: Path) -> PendingImage:
    """What a name and a stat tell (cheap, on the GUI thread): a PendingImage without its preview yet."""
    if path.is_dir():
        raise AttachmentError(f"“{path.name}” is a folder; attach the image files inside it.")
    if not path.is_file():
        raise AttachmentError(f"“{path.name}” cannot be found.")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise AttachmentError(f"“{path.name}” is not an image. Attach PNG, JPEG, WebP, GIF, BMP or TIFF files.")
    return PendingImage(path, path.name)


def _qimage(img: object) -> QImage:
    """A Pillow RGB image as a QImage that owns its pixels."""
    width, height = img.size  # type: ignore[attr-defined]
    data = img.tobytes()  # type: ignore[attr-defined]
    return QImage(data, width, height, 3 * width, QImage.Format.Format_RGB888).copy()


def prepare_file(image: PendingImage) -> None:
    """Any thread: read the file and fill in `preview` and `size`. Raises AttachmentError with the reason."""
    from owl_desktop.image_intake import preview, read_source

    assert isinstance(image.source, Path)
    try:
        data, label = read_source(image.source, image.name)
        small, size = preview(data, label, PREVIEW * 2)
    except OwlError as exc:
        raise AttachmentError(f"“{image.name}” cannot be attached: {exc.message.removeprefix(label + ': ')}.") from exc
    image.preview, image.size = _qimage(small), size


def prepare_bitmap(image: PendingImage, bitmap: QImage) -> None:
    """Any thread: a pasted bitmap kept as PNG bytes, with its preview and size."""
    if bitmap.isNull():
        raise AttachmentError("The clipboard image is empty.")
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    bitmap.save(buffer, "PNG", 80)  # little compression: a screenshot is written in a fraction of the time
    buffer.close()
    # sampled down to twice the preview first (cheap), then smoothed: QImage.scaled keeps the GIL while it runs,
    # and a smooth scale of 50 MP takes ~0.2 s, which the GUI thread would wait out
    keep = Qt.AspectRatioMode.KeepAspectRatio
    preview = bitmap.scaled(PREVIEW * 4, PREVIEW * 4, keep, Qt.TransformationMode.FastTransformation).scaled(
        PREVIEW * 2, PREVIEW * 2, keep, Qt.TransformationMode.SmoothTransformation
    )
    image.preview, image.size = preview, (bitmap.width(), bitmap.height())
    image.source = bytes(data.data())


def from_file(path: Path) -> PendingImage:
    """A file attached and previewed on the calling thread (tests, and code that must have it at once)."""
    image = check_file(path)
    prepare_file(image)
    return image


def from_mime(mime: QMimeData, paste_index: int = 1) -> tuple[list[tuple[PendingImage, QImage | None]], list[str]]:
    """What a drop or paste carries (local files, file:// URLs, a bitmap): each PendingImage with the bitmap to
    encode for it (None for a file), and the messages for what was refused. Nothing is decoded here."""
    images: list[tuple[PendingImage, QImage | None]] = []
    refused: list[str] = []
    if mime.hasUrls() and mime.urls():
        for url in mime.urls():
            if not url.isLocalFile():
                refused.append(f"“{url.toString()}” is not a file on this computer; save it first, then attach it.")
                continue
            try:
                images.append((check_file(Path(url.toLocalFile())), None))
            except AttachmentError as exc:
                refused.append(str(exc))
    elif mime.hasImage():
        try:
            bitmap = QImage(mime.imageData())  # shares the clipboard's pixels: no copy here
        except TypeError:
            refused.append("The clipboard image could not be read.")
        else:
            images.append((PendingImage(None, f"pasted-{paste_index}.png"), bitmap))
    return images, refused


def mime_has_candidates(mime: QMimeData) -> bool:
    return (mime.hasUrls() and bool(mime.urls())) or mime.hasImage()


class _Relay(QObject):
    done = Signal(object, str)  # the PendingImage, "" or the message for the user


class _Job(QRunnable):
    def __init__(self, image: PendingImage, work: Callable[[], None], relay: _Relay) -> None:
        super().__init__()
        self._image, self._work, self._relay = image, work, relay

    def run(self) -> None:
        try:
            self._work()
        except AttachmentError as exc:
            self._relay.done.emit(self._image, str(exc))
        except Exception as exc:  # noqa: BLE001 - a failure is a message, never a traceback
            self._relay.done.emit(self._image, f"“{self._image.name}” could not be read ({type(exc).__name__}).")
        else:
            self._relay.done.emit(self._image, "")


class PreviewPool(QObject):
    """Prepares PendingImages on two pool threads; `done` arrives on the GUI thread."""

    done = Signal(object, str)  # the PendingImage, "" when ready or the message for the user

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(2)
        self._relay = _Relay()
        self._relay.done.connect(self._finish)
        self._running: set[int] = set()

    def prepare(self, image: PendingImage, bitmap: QImage | None = None) -> None:
        work = (lambda: prepare_bitmap(image, bitmap)) if bitmap is not None else (lambda: prepare_file(image))
        self._start(image, work)

    def prepare_stored(self, image: PendingImage, locate: Callable[[], Path]) -> None:
        """The preview of an image already stored (a chat's history): `locate` runs on the pool thread first and
        gives the file to preview (e.g. a cached thumbnail it may have to write), so nothing of it is read here."""

        def work() -> None:
            image.source = locate()
            prepare_file(image)

        self._start(image, work)

    def _start(self, image: PendingImage, work: Callable[[], None]) -> None:
        self._running.add(id(image))
        self._pool.start(_Job(image, work, self._relay))

    def busy(self) -> bool:
        return bool(self._running)

    def wait(self, timeout_ms: int = 30_000) -> None:
        self._pool.waitForDone(timeout_ms)

    def _finish(self, image: PendingImage, error: str) -> None:
        self._running.discard(id(image))
        self.done.emit(image, error)

"""High-DPI icons from the SVGs in resources/icons, tinted to the theme."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PySide6.QtCore import QByteArray, QRectF, Qt
from PySide6.QtGui import QIcon, QImage, QPainter, QPixmap
from PySide6.QtSvg import QSvgRenderer

_SIZES = (16, 20, 24, 32, 48, 64, 128)


def resources_dir() -> Path:
    """resources/ next to the package (a source checkout), or inside it (an installed build)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "resources", here.parent / "resources", here / "resources"):
        if (candidate / "icons").is_dir():
            return candidate
    return here.parent.parent / "resources"


@lru_cache(maxsize=256)
def _svg(name: str) -> str:
    try:
        return (resources_dir() / "icons" / f"{name}.svg").read_text(encoding="utf-8")
    except OSError:
        return ""


def render(name: str, size: int, color: str = "#000000", dpr: float = 1.0) -> QPixmap:
    """One icon as a pixmap of `size` logical pixels at device pixel ratio `dpr`."""
    data = _svg(name).replace("currentColor", color)
    px = max(1, round(size * dpr))
    image = QImage(px, px, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    if data:
        renderer = QSvgRenderer(QByteArray(data.encode("utf-8")))
        painter = QPainter(image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        renderer.render(painter, QRectF(0, 0, px, px))
        painter.end()
    pixmap = QPixmap.fromImage(image)
    pixmap.setDevicePixelRatio(dpr)
    return pixmap


@lru_cache(maxsize=512)
def icon(name: str, color: str = "#000000") -> QIcon:
    """A QIcon with crisp pixmaps at every common size, at 1x and 2x."""
    result = QIcon()
    for size in _SIZES:
        for dpr in (1.0, 2.0):
            result.addPixmap(render(name, size, color, dpr))
    return result


def icon_file(name: str, color: str, size: int = 12) -> str:
    """A tinted icon as a PNG file (at 2x) for style sheets, which take images by path: in the cache dir."""
    from owl_desktop import paths

    folder = paths.ensure(paths.cache_dir() / "style-icons")
    target = folder / f"{name}-{color.lstrip('#')}-{size}.png"
    if not target.is_file():
        render(name, size * 2, color).toImage().save(str(target))
    return target.as_posix()


def app_icon() -> QIcon:
    return icon("owl", "#000000")

"""Zoom into a region: a rectangle of an image's full-resolution original, attached as an image of its own.

A 224-pixel model cannot read the small print of a whole page; cut out the part that matters and it can. Coordinates
are pixels of the image as the user sees it (decoded by image_intake: EXIF orientation applied), x and y from the
top-left corner. A region must lie inside the image and have a size; anything else is an ImageError.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image

from owl_desktop.errors import ImageError
from owl_desktop.image_intake import decode

_REGION_RE = re.compile(r"^\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Region:
    x: int
    y: int
    w: int
    h: int

    def __str__(self) -> str:
        return f"{self.x},{self.y},{self.w},{self.h}"

    @classmethod
    def parse(cls, text: str) -> Region:
        """A region from "x,y,w,h" in pixels; ValueError with a message for anything else."""
        m = _REGION_RE.match(text)
        if m is None:
            raise ValueError(f"'{text}' is not a region; write it as x,y,w,h in pixels, e.g. 100,40,300,200")
        return cls(*(int(g) for g in m.groups()))

    def check(self, width: int, height: int, name: str) -> None:
        """ImageError unless the region has a size and lies inside an image of width×height."""
        if self.w <= 0 or self.h <= 0:
            raise ImageError(f"{name}: the region {self} has no size (width and height must be at least 1 pixel)")
        if self.x < 0 or self.y < 0 or self.x + self.w > width or self.y + self.h > height:
            raise ImageError(
                f"{name}: the region {self} (x,y,w,h) lies outside the image, which is {width}×{height} pixels"
            )


def crop_name(name: str, region: Region) -> str:
    return f"crop of {name} ({region})"


def crop_image(img: Image.Image, region: Region, name: str = "image") -> Image.Image:
    """The region's pixels, untouched (no resampling)."""
    region.check(img.width, img.height, name)
    return img.crop((region.x, region.y, region.x + region.w, region.y + region.h))


def crop_bytes(data: bytes, name: str, region: Region) -> tuple[bytes, str]:
    """A region of an encoded image as PNG bytes (lossless), with the name "crop of NAME (x,y,w,h)"."""
    img = decode(data, name)
    out = io.BytesIO()
    crop_image(img, region, name).save(out, "PNG")
    return out.getvalue(), crop_name(name, region)

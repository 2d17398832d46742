"""mPLUG-Owl's pixel preprocessing of an image decoded by owl_desktop.image_intake (safe decode to RGB).

Pixels follow the reference processor (mplug-owl-reference.md §3): Pillow `resize((224, 224), BICUBIC)` as a stretch
(no aspect preservation), ×1/255, CLIP mean/std, float32 CHW. One deliberate difference: the reference resizes
*before* converting to RGB, so its palette images are resized with NEAREST and its RGBA images keep their alpha
until CLIPImageProcessor drops it (transparent pixels then show whatever colour they hide, often black). We convert
to RGB first, compositing transparency on white, so a transparent PNG looks to the model as it looks to the user.
For ordinary RGB and L images both orders give identical pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from owl_desktop.hashing import sha256_bytes
from owl_desktop.image_intake import MAX_PIXELS, decode, read_source, to_rgb

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """One image ready for the vision encoder.

    `sha256` is of the original file bytes (it keys the encode cache); `width` and `height` are those of the decoded
    image after EXIF orientation, i.e. as the user sees it.
    """

    pixels: np.ndarray  # [3, size, size] float32, CLIP-normalised
    sha256: str
    width: int
    height: int
    name: str


def to_pixels(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """The reference pixel values of an RGB image: [3, size, size] float32.

    Bicubic stretch by Pillow, then the arithmetic of CLIPImageProcessor: uint8 × (1/255) in float64 cast to float32,
    then (x − mean) / std in float32.
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    return normalize(img.resize((size, size), Image.BICUBIC))


def normalize(img: Image.Image) -> np.ndarray:
    """An RGB image's pixels as the model takes them, at its own size: [3, H, W] float32.

    uint8 × (1/255) in float64 cast to float32, then (x − mean) / std in float32. For all 256 byte values x/255 done
    this way equals torchvision's ToTensor (a float32 division), so it serves UReader's crops as well.
    """
    x = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
    x = (x - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess(
    source: Path | str | bytes, name: str | None = None, size: int = IMAGE_SIZE, max_pixels: int = MAX_PIXELS
) -> PreparedImage:
    """Read, decode and normalise one image for the vision encoder."""
    data, label = read_source(source, name)
    img = decode(data, label, max_pixels)
    return PreparedImage(
        pixels=to_pixels(img, size),
        sha256=sha256_bytes(data),
        width=img.width,
        height=img.height,
        name=label,
    )

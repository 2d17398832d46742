"""Image intake: every mode becomes sensible RGB, pixels match the reference maths, bad files are clear errors."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from owl_desktop import image_intake
from owl_desktop.engine import preprocess as pp
from owl_desktop.errors import ImageError

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def reference_pixels(rgb: Image.Image) -> np.ndarray:
    """Written independently of the module: Pillow bicubic stretch, /255, CLIP normalisation, CHW."""
    arr = np.array(rgb.resize((224, 224), resample=Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def gradient_rgb(w: int = 64, h: int = 48) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def rgb_of(path: Path) -> np.ndarray:
    img = image_intake.load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# ---------------------------------------------------------------------------------------------- modes → RGB


def test_rgb_png_pixels_match_reference(tmp_path: Path) -> None:
    src = gradient_rgb()
    path = save(src, tmp_path / "grad.png")
    prepared = pp.preprocess(path)
    assert prepared.pixels.shape == (3, 224, 224)
    assert prepared.pixels.dtype == np.float32
    assert prepared.pixels.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(prepared.pixels, reference_pixels(src), atol=1e-6, rtol=0)
    assert prepared.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (prepared.width, prepared.height, prepared.name) == (64, 48, "grad.png")


def test_bytes_source_and_name(tmp_path: Path) -> None:
    data = save(gradient_rgb(), tmp_path / "g.jpg", quality=90).read_bytes()
    prepared = pp.preprocess(data, name="clipboard")
    assert prepared.name == "clipboard"
    assert prepared.sha256 == hashlib.sha256(data).hexdigest()
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_allclose(prepared.pixels, reference_pixels(decoded), atol=1e-6, rtol=0)


def test_to_pixels_is_a_non_aspect_preserving_stretch() -> None:
    wide = Image.new("RGB", (400, 100), (10, 200, 30))
    wide.paste((250, 0, 0), (0, 0, 200, 100))  # left half red
    px = pp.to_pixels(wide)
    np.testing.assert_allclose(px, reference_pixels(wide), atol=1e-6, rtol=0)
    # the left half of the output is red over the whole height: stretched, not letterboxed or cropped
    red = (250 / 255 - MEAN[0]) / STD[0]
    np.testing.assert_allclose(px[0, :, :100], red, atol=1e-5)


def test_rgba_fully_transparent_becomes_white(tmp_path: Path) -> None:
    path = save(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), tmp_path / "clear.png")
    assert (rgb_of(path) == 255).all()
    white = (1.0 - MEAN) / STD
    np.testing.assert_allclose(pp.preprocess(path).pixels, np.broadcast_to(white[:, None, None], (3, 224, 224)), 1e-5)


def test_rgba_half_transparent_is_composited_on_white(tmp_path: Path) -> None:
    path = save(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), tmp_path / "pink.png")
    r, g, b = rgb_of(path)[0, 0]
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (8, 8), (0, 255))
    la.putpixel((0, 0), (0, 0))  # one transparent black pixel
    arr = rgb_of(save(la, tmp_path / "la.png"))
    assert (arr[0, 0] == 255).all() and (arr[1, 1] == 0).all()


def test_palette_image(tmp_path: Path) -> None:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, 5, 10))
    img.paste(2, (5, 0, 10, 10))
    arr = rgb_of(save(img, tmp_path / "pal.png"))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 9]) == (0, 0, 255)


def test_palette_with_transparency_becomes_white(tmp_path: Path) -> None:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 5, 10))
    for suffix in ("png", "gif"):
        path = save(img, tmp_path / f"pal-t.{suffix}", transparency=0)
        arr = rgb_of(path)
        assert tuple(arr[0, 0]) == (0, 200, 0), suffix
        assert tuple(arr[0, 9]) == (255, 255, 255), suffix


def test_grayscale_l(tmp_path: Path) -> None:
    arr = rgb_of(save(Image.new("L", (6, 6), 77), tmp_path / "grey.jpg", quality=100))
    assert (abs(arr - 77) <= 1).all()


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    a = np.zeros((4, 3), dtype=np.uint16)
    a[:, 1] = 32896  # 128 × 257
    a[:, 2] = 65535
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    path = save(img, tmp_path / "deep.png")
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # a genuinely 16-bit file
    arr = rgb_of(path)
    assert tuple(arr[0, 0]) == (0, 0, 0)
    assert tuple(arr[0, 1]) == (128, 128, 128)
    assert tuple(arr[0, 2]) == (255, 255, 255)


def test_32_bit_int_and_float_grey(tmp_path: Path) -> None:
    i32 = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32), "I")
    assert tuple(np.asarray(image_intake.to_rgb(i32))[0, :, 0]) == (0, 4, 255)
    f_unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    path = save(f_unit, tmp_path / "float.tiff")
    assert tuple(rgb_of(path)[0, :, 0]) == (0, 128, 255)
    f_8bit = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32), "F")
    assert tuple(np.asarray(image_intake.to_rgb(f_8bit))[0, :, 0]) == (0, 100, 255)


def test_bilevel_image(tmp_path: Path) -> None:
    img = Image.new("1", (8, 8), 0)
    img.paste(1, (0, 0, 4, 8))
    arr = rgb_of(save(img, tmp_path / "bw.png"))
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[0, 7]) == (0, 0, 0)


def test_cmyk(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    img.paste((255, 0, 0, 0), (0, 0, 8, 16))  # full cyan
    for path in (save(img, tmp_path / "ink.tiff"), save(img, tmp_path / "ink.jpg", quality=100)):
        arr = rgb_of(path)
        assert (abs(arr[8, 2] - (0, 255, 255)) <= 3).all(), path.name
        assert (abs(arr[8, 13] - (255, 255, 255)) <= 3).all(), path.name


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    arr = rgb_of(path)
    assert (arr == (255, 0, 0)).all()


def test_animated_png_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGBA", (12, 12), c) for c in ((0, 0, 255, 255), (255, 0, 0, 255))]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert (rgb_of(path) == (0, 0, 255)).all()


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = save(img, tmp_path / "phone.jpg", exif=exif, quality=95)
    out = image_intake.load_image(path)
    assert out.size == (20, 40)
    arr = np.asarray(out).astype(int)
    assert arr[5, 10, 0] > 200 and arr[5, 10, 2] < 60  # the left half is now on top
    assert arr[35, 10, 2] > 200 and arr[35, 10, 0] < 60
    prepared = pp.preprocess(path)
    assert (prepared.width, prepared.height) == (20, 40)
    np.testing.assert_allclose(prepared.pixels, reference_pixels(out), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- refusals


def test_truncated_images_are_not_accepted_by_default() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg.*empty"):
        pp.preprocess(path)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n", encoding="utf-8")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        image_intake.load_image(path)


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "RGB")
    data = save(noise, tmp_path / "full.jpg", quality=90).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: .*(truncated|corrupt)") as err:
        pp.preprocess(path)
    assert "cut.jpg" in str(err.value)


def test_truncated_png(tmp_path: Path) -> None:
    data = save(gradient_rgb(), tmp_path / "full.png").read_bytes()
    with pytest.raises(ImageError, match=r"half\.png: "):
        pp.preprocess(data[: len(data) // 2], name="half.png")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"gone\.png: no such file"):
        pp.preprocess(tmp_path / "gone.png")
    folder = tmp_path / "album.jpg"
    folder.mkdir()
    with pytest.raises(ImageError, match=r"album\.jpg: is a folder"):
        pp.preprocess(folder)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _huge_bilevel_png(side: int) -> bytes:
    """A valid side×side 1-bit PNG of zeros, built row by row with zlib: ~100 kB on disk, no pixel buffer."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    comp = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_huge_bilevel_png(30000))
    assert path.stat().st_size < 1_000_000
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb\.png: image too large") as err:
        pp.preprocess(path)
    assert time.perf_counter() - start < 1.0  # header only: decoding 900 MP would take far longer
    assert "900,000,000 pixels" in str(err.value)


def test_own_pixel_limit_names_the_dimensions(tmp_path: Path) -> None:
    path = save(Image.new("RGB", (100, 60), "white"), tmp_path / "wide.png")
    with pytest.raises(ImageError, match=r"wide\.png: image too large \(100×60 = 6,000 pixels; the limit is 5,000"):
        pp.preprocess(path, max_pixels=5000)
    assert pp.preprocess(path, max_pixels=6000).width == 100

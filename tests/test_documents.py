"""PDF pages and region zoom, without a window: pdf_intake, image_region, image_spec and `owl-desktop ask`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from pdf_files import password_pdf, pdf_with_pages
from PIL import Image

from owl_desktop import image_spec, pdf_intake
from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.errors import ImageError
from owl_desktop.hashing import sha256_bytes
from owl_desktop.image_region import Region, crop_bytes
from owl_desktop.model_family import single_view_plan, ureader_plan

ENGINE_FLAGS = ["--greedy", "--max-new-tokens", "4", "--flash-attn", "off", "--kv-type", "f32", "--threads", "2"]


def dark_squares(png: bytes) -> int:
    """How many marks a rendered test page carries (page i has i black 20×20-point squares)."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    cols = (grey < 128).any(axis=0)
    return int(np.count_nonzero(cols[1:] & ~cols[:-1]) + cols[0])


# ------------------------------------------------------------------------------------------------ PDF pages


def test_a_three_page_pdf_gives_three_pages_in_order() -> None:
    pages = pdf_intake.render_pages(pdf_with_pages([(200, 100)] * 3), "doc.pdf")
    assert [p.name for p in pages] == ["doc.pdf, page 1", "doc.pdf, page 2", "doc.pdf, page 3"]
    assert [dark_squares(p.png) for p in pages] == [1, 2, 3]
    # 150 dpi: 200×100 points → 417×208 pixels (PDFium rounds the width up and the height to nearest)
    assert all(abs(p.width - 200 * 150 / 72) <= 1 and abs(p.height - 100 * 150 / 72) <= 1 for p in pages)
    assert Image.open(io.BytesIO(pages[0].png)).format == "PNG"


def test_the_render_size_follows_the_model() -> None:
    assert pdf_intake.render_side(ureader_plan()) == 11 * 224  # the largest grid side of the release
    assert pdf_intake.render_side(single_view_plan()) == 8 * 224


def test_a_huge_page_renders_at_the_models_size_not_its_own() -> None:
    """20,000×20,000 points at 150 dpi would be 41,667² pixels (6.9 GB as RGBA); it renders at 2,464²."""
    data = pdf_with_pages([(20_000, 20_000), (20_000, 10)], marks=False)
    pages = pdf_intake.render_pages(data, "poster.pdf", max_side=pdf_intake.render_side(ureader_plan()))
    assert (pages[0].width, pages[0].height) == (2464, 2464)
    assert pages[1].width == 2464 and 1 <= pages[1].height <= 2
    small = pdf_intake.render_pages(data, "poster.pdf", [1], max_side=pdf_intake.render_side(single_view_plan()))
    assert (small[0].width, small[0].height) == (1792, 1792)


def test_a_long_pdf_needs_a_page_choice() -> None:
    data = pdf_with_pages([(100, 100)] * 2000, marks=False)
    with pytest.raises(ImageError, match=r"long.pdf has 2,000 pages; choose at most 10 .*long.pdf#page=2"):
        pdf_intake.render_pages(data, "long.pdf")
    pages = pdf_intake.render_pages(data, "long.pdf", [2, 1999])
    assert [p.name for p in pages] == ["long.pdf, page 2", "long.pdf, page 1999"]
    with pytest.raises(ImageError, match="there is no page 2001"):
        pdf_intake.render_pages(data, "long.pdf", [2001])
    with pytest.raises(ImageError, match="11 pages chosen; at most 10"):
        pdf_intake.render_pages(data, "long.pdf", list(range(1, 12)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (password_pdf(), "protected by a password"),
        (pdf_with_pages([(200, 100)] * 3)[:-300], "damaged or truncated"),
        (b"%PDF-1.4\n" + b"\0" * 64, "damaged or truncated"),
        (b"just some text", "not a PDF"),
    ],
    ids=["password", "truncated", "garbage", "text"],
)
def test_unusable_pdfs_get_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        pdf_intake.render_pages(data, "bad.pdf")


def test_page_choices() -> None:
    assert pdf_intake.parse_pages("2") == [2]
    assert pdf_intake.parse_pages("1-3") == [1, 2, 3]
    assert pdf_intake.parse_pages("4, 1-2, 2") == [4, 1, 2]
    for bad in ("0", "3-1", "a", "1-", "", "1-100000000"):
        with pytest.raises(ValueError):
            pdf_intake.parse_pages(bad)


# ------------------------------------------------------------------------------------------------ regions


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    path = tmp_path / "receipt.png"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    return path


def test_a_region_is_the_originals_pixels(photo: Path) -> None:
    png, name = crop_bytes(photo.read_bytes(), "receipt.png", Region(120, 40, 200, 150))
    assert name == "crop of receipt.png (120,40,200,150)"
    original = np.asarray(Image.open(photo))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), original[40:190, 120:320])
    whole, _ = crop_bytes(photo.read_bytes(), "receipt.png", Region(0, 0, 400, 300))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(whole))), original)


@pytest.mark.parametrize(
    ("region", "message"),
    [
        (Region(10, 10, 0, 50), "has no size"),
        (Region(10, 10, 50, 0), "has no size"),
        (Region(350, 10, 100, 50), "outside the image, which is 400×300"),
        (Region(-1, 0, 10, 10), "outside the image"),
        (Region(500, 400, 10, 10), "outside the image"),
    ],
)
def test_regions_outside_the_image_or_without_size_are_refused(photo: Path, region: Region, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        crop_bytes(photo.read_bytes(), "receipt.png", region)


def test_image_specs(tmp_path: Path) -> None:
    assert image_spec.parse("a.png") == image_spec.ImageSpec(Path("a.png"))
    assert image_spec.parse("a.png#1,2,3,4").region == Region(1, 2, 3, 4)
    spec = image_spec.parse("doc.pdf#pages=1-3#0,0,10,10")
    assert (spec.path, spec.pages, spec.region) == (Path("doc.pdf"), (1, 2, 3), Region(0, 0, 10, 10))
    assert image_spec.parse("doc.pdf#page=2").pages == (2,)
    odd = tmp_path / "odd#1,2,3,4.png"  # a file that exists is taken as written
    odd.write_bytes(b"x")
    assert image_spec.parse(str(odd)).path == odd
    with pytest.raises(ImageError, match="not a region"):
        image_spec.parse("a.png#1,2,x,4")
    with pytest.raises(ImageError, match="for PDF files only"):
        image_spec.parse("a.png#page=2")
    with pytest.raises(ImageError, match="not a page choice"):
        image_spec.parse("doc.pdf#pages=two")


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("documents")
    return convert_checkpoint(make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0), root / "b", quant="F32")


def ask_json(bundle: Path, images: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    args = ["ask", "--model", str(bundle), *(a for img in images for a in ("--image", img)), *ENGINE_FLAGS]
    assert cli_main([*args, "--json", "What does it say?"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_asks_about_every_page_of_a_pdf(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_with_pages([(200, 100)] * 3))
    expected = pdf_intake.render_file(pdf, max_side=pdf_intake.render_side(single_view_plan()))
    out = ask_json(bundle, [str(pdf)], capsys)
    assert [(t["name"], t["sha256"]) for t in out["timings"]["images"]] == [
        (p.name, sha256_bytes(p.png)) for p in expected
    ]
    out = ask_json(bundle, [f"{pdf}#page=2", f"{pdf}#pages=1-3#0,100,300,100"], capsys)
    names = [t["name"] for t in out["timings"]["images"]]
    assert names == ["doc.pdf, page 2", *(f"crop of doc.pdf, page {i} (0,100,300,100)" for i in (1, 2, 3))]


def test_cli_asks_about_a_region(bundle: Path, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ask_json(bundle, [f"{photo}#120,40,200,150"], capsys)
    png, name = crop_bytes(photo.read_bytes(), "receipt.png", Region(120, 40, 200, 150))
    assert [(t["name"], t["sha256"]) for t in out["timings"]["images"]] == [(name, sha256_bytes(png))]


@pytest.mark.parametrize(
    ("make", "suffix", "message"),
    [
        (password_pdf, "", "protected by a password"),
        (lambda: pdf_with_pages([(200, 100)] * 3)[:-300], "", "damaged or truncated"),
        (lambda: pdf_with_pages([(100, 100)] * 2000, marks=False), "", "has 2,000 pages; choose at most 10"),
        (lambda: pdf_with_pages([(100, 100)] * 2), "#page=3", "there is no page 3"),
        (lambda: pdf_with_pages([(100, 100)]), "#0,0,0,10", "has no size"),
        (lambda: pdf_with_pages([(100, 100)]), "#0,0,9999,10", "outside the image"),
    ],
    ids=["password", "truncated", "2000-pages", "no-such-page", "zero-region", "outside-region"],
)
def test_cli_refuses_bad_pdfs_and_regions_with_a_message(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], make, suffix: str, message: str
) -> None:
    pdf = tmp_path / "bad.pdf"
    pdf.write_bytes(make())
    args = ["ask", "--model", str(bundle), "--image", f"{pdf}{suffix}", *ENGINE_FLAGS, "What is it?"]
    assert cli_main(args) == 1
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


def test_chat_attaches_pdf_pages_and_regions(bundle: Path, photo: Path, tmp_path: Path) -> None:
    """The interactive chat takes the same PATH#page= / #x,y,w,h forms, and says what it refuses."""
    import os
    import subprocess
    import sys

    pdf, locked = tmp_path / "doc.pdf", tmp_path / "locked.pdf"
    pdf.write_bytes(pdf_with_pages([(200, 100)] * 3))
    locked.write_bytes(password_pdf())
    script = f"/image {pdf}#pages=1-2\n/image {photo}#0,0,10,10\n/image {locked}\n/image {photo}#0,0,999,10\n"
    script += "What is it?\n/quit\n"
    env = {**os.environ, "OWL_DATA_DIR": str(tmp_path / "data"), "OWL_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "owl_desktop", "chat", "--model", str(bundle), "--max-new-tokens", "4"]
    done = subprocess.run(args, input=script, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "doc.pdf attached; 2 image(s)" in out and "receipt.png attached; 3 image(s)" in out
    assert "locked.pdf: the PDF is protected by a password" in out
    assert "outside the image, which is 400×300 pixels" in out
    assert out.count("owl> ") == 1

"""What `--image` names on the command line: a file, maybe a PDF's pages, maybe a region to zoom into.

    photo.jpg                     the image as it is
    receipt.png#120,40,300,200    the region x,y,w,h (pixels of the original) as an image of its own
    report.pdf                    every page of a PDF of at most pdf_intake.MAX_PAGES pages
    report.pdf#page=2             one page; report.pdf#pages=1-3 (or 1,4-5) several
    report.pdf#page=2#0,0,600,400 a region of a rendered page (pixels of the page as rendered)

A path that exists as written is taken as it is, '#' and all. Fragments are read from the end; an unknown one
leaves the rest of the text as the path (so "no such file" names what was typed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from owl_desktop import pdf_intake
from owl_desktop.errors import ImageError
from owl_desktop.image_intake import read_source
from owl_desktop.image_region import Region, crop_bytes

NamedImage = tuple[bytes, str]


@dataclass(frozen=True)
class ImageSpec:
    path: Path
    pages: tuple[int, ...] | None = None  # PDF pages, 1-based; None: all of a short PDF
    region: Region | None = None

    @property
    def plain(self) -> bool:
        return self.pages is None and self.region is None and not pdf_intake.is_pdf(self.path)


def parse(text: str | Path) -> ImageSpec:
    """Split "PATH#page=2#x,y,w,h" into its parts; ImageError for a fragment that is malformed."""
    text = str(text)
    if "#" not in text or Path(text).exists():
        return ImageSpec(Path(text))
    rest, pages, region = text, None, None
    while "#" in rest:
        head, frag = rest.rsplit("#", 1)
        key, eq, value = frag.partition("=")
        try:
            if eq and key.strip().lower() in ("page", "pages") and pages is None:
                pages = tuple(pdf_intake.parse_pages(value))
            elif not eq and "," in frag and region is None:
                region = Region.parse(frag)
            else:
                break
        except ValueError as exc:
            raise ImageError(f"{text}: {exc}") from exc
        rest = head
    spec = ImageSpec(Path(rest), pages, region)
    if pages is not None and not pdf_intake.is_pdf(spec.path):
        raise ImageError(f"{text}: a page choice (#page= or #pages=) is for PDF files only")
    return spec


def resolve(spec: ImageSpec, max_side: int) -> list[Path | NamedImage]:
    """The images a spec stands for: the file itself when plain, else PNG bytes with their names.

    A PDF's pages are rendered with `max_side` (pdf_intake.render_side of the model's plan). Everything is checked
    and rendered before anything is returned.
    """
    if spec.plain:
        return [spec.path]
    if pdf_intake.is_pdf(spec.path):
        rendered = pdf_intake.render_file(spec.path, spec.pages, max_side)
        images: list[NamedImage] = [(p.png, p.name) for p in rendered]
    else:
        images = [read_source(spec.path)]
    if spec.region is not None:
        images = [crop_bytes(data, name, spec.region) for data, name in images]
    return list(images)


def resolve_all(texts: list[str | Path], max_side: int) -> list[Path | NamedImage]:
    """Every `--image` of a command, parsed first (a typo fails before any PDF is rendered), then resolved."""
    specs = [parse(t) for t in texts]
    return [img for spec in specs for img in resolve(spec, max_side)]

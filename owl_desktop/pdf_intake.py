"""PDF intake: the pages of an untrusted PDF rendered (pypdfium2) to PNG images, each one an image like any other.

A PDF is read once into memory (size-checked), opened by PDFium, and only the pages asked for are rendered, at a
resolution that suits the model rather than the page's stated size:

- pages are rendered at RENDER_DPI, but never with a longer side than `max_side` pixels (`render_side(plan)`): the
  crop grid's largest side for UReader (11 crops × 224 = 2,464 pixels; a page bigger than that is resized to its grid
  anyway), and 8 × 224 = 1,792 for mPLUG-Owl (the model sees 224×224, but zooming into a region of a page needs
  pixels the stretch throws away). A 20,000×20,000-point page therefore renders at 2,464×2,464, never gigabytes.
- an encrypted PDF that needs a password, a truncated or corrupt file, a page that fails to load: ImageError with a
  one-line message, and nothing rendered or stored.
- a long PDF needs a page choice: without one, at most MAX_PAGES pages are taken, and a PDF with more pages is refused
  with a message that says how to choose (a range of at most MAX_PAGES pages).

PDFium is not thread-safe; every call into it holds one module lock.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from owl_desktop.errors import ImageError
from owl_desktop.image_intake import read_user_file
from owl_desktop.model_family import ImagePlan

PDF_SUFFIX = ".pdf"
MAX_PDF_BYTES = 512 * 1024 * 1024
MAX_PAGES = 10  # pages of one PDF in one question (every page costs context: 65 to 1,365 positions)
RENDER_DPI = 150  # text of ordinary size is crisp at this density; smaller pages are not blown up beyond it
POINTS_PER_INCH = 72
SINGLE_VIEW_ZOOM = 8  # mPLUG-Owl: render up to 8 × its input size, so region zoom has detail to work with

_PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class PdfPage:
    """One rendered page: PNG bytes and the name it is known by ("report.pdf, page 2")."""

    number: int  # 1-based
    png: bytes
    name: str
    width: int  # pixels
    height: int


def is_pdf(path: Path | str) -> bool:
    return Path(path).suffix.lower() == PDF_SUFFIX


def render_side(plan: ImagePlan | None) -> int:
    """The longest side, in pixels, a page is rendered at for a model with this image plan (None: the largest)."""
    if plan is None:
        return 224 * 11
    if plan.crops:
        return plan.crop_size * plan.anchor_max
    return plan.crop_size * SINGLE_VIEW_ZOOM


def read_pdf(path: Path | str) -> tuple[bytes, str]:
    """The bytes of a PDF file and its name, size-checked; ImageError for anything unreadable."""
    path = Path(path)
    name = path.name or str(path)
    data = read_user_file(
        path,
        name,
        "a PDF",
        MAX_PDF_BYTES,
        lambda size: f"file too large ({size >> 20} MB; PDFs up to {MAX_PDF_BYTES >> 20} MB are read)",
    )
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    return data, name


def page_count(data: bytes, name: str) -> int:
    """How many pages the PDF has (opening it checks it is readable and not locked by a password)."""
    with _PDFIUM_LOCK:
        doc = _open(data, name)
        try:
            return len(doc)
        finally:
            doc.close()


def parse_pages(text: str, count: int | None = None) -> list[int]:
    """Page numbers from "2", "1-3" or "1,3,5-6" (1-based, in the order given); ValueError with a message."""
    pages: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"'{text}' is not a page choice; write it like 2, 1-3 or 1,4-5")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first < 1 or last < first:
            raise ValueError(f"'{part}' is not a page range (pages count from 1, low to high)")
        if count is not None and last > count:
            raise ValueError(f"page {last} does not exist (the document has {count} page{'s' * (count != 1)})")
        if last - first >= MAX_PAGES * 4:  # a huge range never becomes a huge list
            raise ValueError(f"'{part}' is too many pages; choose at most {MAX_PAGES}")
        pages.extend(p for p in range(first, last + 1) if p not in pages)
    if not pages:
        raise ValueError("no pages were chosen")
    return pages


def choose_pages(count: int, name: str, pages: Sequence[int] | None = None) -> list[int]:
    """The pages to render: all of a short PDF, or the chosen ones (checked against the page count and the cap)."""
    if pages is None:
        if count > MAX_PAGES:
            raise ImageError(
                f"{name} has {count:,} pages; choose at most {MAX_PAGES} of them "
                f"(on the command line: {name}#page=2 or {name}#pages=1-{MAX_PAGES})"
            )
        return list(range(1, count + 1))
    chosen = list(dict.fromkeys(pages))
    if not chosen:
        raise ImageError(f"{name}: no pages were chosen")
    bad = [p for p in chosen if not 1 <= p <= count]
    if bad:
        raise ImageError(f"{name}: there is no page {bad[0]} (the document has {count:,} page{'s' * (count != 1)})")
    if len(chosen) > MAX_PAGES:
        raise ImageError(f"{name}: {len(chosen)} pages chosen; at most {MAX_PAGES} pages of a PDF go in one question")
    return chosen


def render_pages(data: bytes, name: str, pages: Sequence[int] | None = None, max_side: int = 224 * 11) -> list[PdfPage]:
    """Render the chosen pages (1-based; None: every page of a PDF of at most MAX_PAGES) to PNG images.

    Everything is rendered before anything is returned: a page that fails fails the whole call.
    """
    with _PDFIUM_LOCK:
        doc = _open(data, name)
        try:
            chosen = choose_pages(len(doc), name, pages)
            return [_render(doc, name, number, max_side) for number in chosen]
        finally:
            doc.close()


def render_file(path: Path | str, pages: Sequence[int] | None = None, max_side: int = 224 * 11) -> list[PdfPage]:
    data, name = read_pdf(path)
    return render_pages(data, name, pages, max_side)


def page_scale(width_pt: float, height_pt: float, max_side: int) -> float:
    """Pixels per point: RENDER_DPI, lowered so that the longer side stays within max_side pixels."""
    longest = max(width_pt, height_pt, 1e-6)
    return min(RENDER_DPI / POINTS_PER_INCH, max_side / longest)


def _open(data: bytes, name: str):  # -> pypdfium2.PdfDocument (imported here: the window starts without it)
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        code = getattr(exc, "err_code", None)
        if code == pdfium_c.FPDF_ERR_PASSWORD:
            raise ImageError(f"{name}: the PDF is protected by a password; save an unprotected copy first") from exc
        if code == pdfium_c.FPDF_ERR_SECURITY:
            raise ImageError(f"{name}: the PDF uses an encryption that cannot be opened") from exc
        if code == pdfium_c.FPDF_ERR_FORMAT:
            raise ImageError(f"{name}: not a PDF, or the PDF is damaged or truncated") from exc
        raise ImageError(f"{name}: the PDF cannot be opened ({exc})") from exc
    except MemoryError as exc:
        raise ImageError(f"{name}: not enough memory to open the PDF") from exc


def _render(doc, name: str, number: int, max_side: int) -> PdfPage:
    import pypdfium2 as pdfium

    label = f"{name}, page {number}"
    try:
        page = doc[number - 1]
    except (pdfium.PdfiumError, IndexError) as exc:
        raise ImageError(f"{label}: the page cannot be read (the PDF may be damaged)") from exc
    try:
        width_pt, height_pt = page.get_size()
        if not (width_pt > 0 and height_pt > 0):
            raise ImageError(f"{label}: the page has no size ({width_pt:g}×{height_pt:g} points)")
        scale = page_scale(width_pt, height_pt, max_side)
        # may_draw_forms: form fields are part of what the reader sees; the bitmap is at most max_side² × 4 bytes
        bitmap = page.render(scale=scale, may_draw_forms=True)
        try:
            img = bitmap.to_pil().convert("RGB")
        finally:
            bitmap.close()
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(f"{label}: not enough memory to render the page") from exc
    except pdfium.PdfiumError as exc:
        raise ImageError(f"{label}: the page cannot be rendered (the PDF may be damaged: {exc})") from exc
    finally:
        page.close()
    out = io.BytesIO()
    img.save(out, "PNG")
    return PdfPage(number, out.getvalue(), label, img.width, img.height)

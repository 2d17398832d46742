"""PDF files for the tests, made here: pages of given sizes (pypdfium2 writes them) and hand-written hostile ones."""

from __future__ import annotations

import io
from collections.abc import Sequence


def pdf_with_pages(sizes: Sequence[tuple[float, float]], marks: bool = True) -> bytes:
    """A PDF with one page per (width, height) in points; with `marks`, page i carries i black squares."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    doc = pdfium.PdfDocument.new()
    for i, (w, h) in enumerate(sizes, 1):
        page = doc.new_page(w, h)
        if marks:
            for k in range(i):
                path = pdfium_c.FPDFPageObj_CreateNewPath(10 + 30 * k, 10)
                pdfium_c.FPDFPath_LineTo(path, 30 + 30 * k, 10)
                pdfium_c.FPDFPath_LineTo(path, 30 + 30 * k, 30)
                pdfium_c.FPDFPath_LineTo(path, 10 + 30 * k, 30)
                pdfium_c.FPDFPath_Close(path)
                pdfium_c.FPDFPageObj_SetFillColor(path, 0, 0, 0, 255)
                pdfium_c.FPDFPath_SetDrawMode(path, pdfium_c.FPDF_FILLMODE_WINDING, False)
                pdfium_c.FPDFPage_InsertObject(page.raw, path)
            page.gen_content()
        page.close()
    out = io.BytesIO()
    doc.save(out)
    doc.close()
    return out.getvalue()


def password_pdf() -> bytes:
    """A one-page PDF under the standard security handler whose user password is not empty: it cannot be opened.

    Written by hand (pypdfium2 cannot encrypt): the /Encrypt dictionary's O and U entries match no password we give.
    """
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
        b"<< /Filter /Standard /V 1 /R 2 /Length 40 /P -4 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    ident = b"<" + b"ab" * 16 + b">"
    out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R /ID [%s %s] >>\n" % (len(objs) + 1, ident, ident)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)

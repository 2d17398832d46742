"""Markdown to the rich text a QLabel shows: code blocks on a tinted background, tables with borders.

The text comes from a model (or a title it wrote), so it is untrusted: raw HTML is shown as text, images become
their alt text (a QLabel would read an <img> source from disk, e.g. /dev/zero, and hang), and headings are capped so
an answer cannot fill a bubble with giant type."""

from __future__ import annotations

import re

from PySide6.QtGui import (
    QBrush,
    QColor,
    QFont,
    QFontDatabase,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextFormat,
    QTextFrameFormat,
    QTextTable,
)

from owl_desktop.gui.theme import Colors

_BODY_STYLE = re.compile(r"<body[^>]*>")
_FEATURES = QTextDocument.MarkdownFeature(
    QTextDocument.MarkdownFeature.MarkdownDialectGitHub.value | QTextDocument.MarkdownFeature.MarkdownNoHTML.value
)
HEADING_SIZE = {1: 1, 2: 1}  # heading level → QTextCharFormat font size adjustment (0 = body size); others 0


def _drop_images(doc: QTextDocument) -> None:
    """Every image (Markdown ![alt](src)) becomes the text "[image: alt]"; nothing is ever loaded."""
    found: list[tuple[int, int, str]] = []
    block = doc.begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            frag = it.fragment()
            if frag.isValid() and frag.charFormat().isImageFormat():
                alt = frag.charFormat().property(QTextFormat.Property.ImageAltText) or ""
                found.append((frag.position(), frag.length(), str(alt)))
            it += 1
        block = block.next()
    for pos, length, alt in reversed(found):
        cursor = QTextCursor(doc)
        cursor.setPosition(pos)
        cursor.setPosition(pos + length, QTextCursor.MoveMode.KeepAnchor)
        cursor.insertText(f"[image: {alt}]" if alt else "[image]", QTextCharFormat())


def _cap_headings(doc: QTextDocument) -> None:
    """Headings become bold paragraphs at most a step larger than the text."""
    block = doc.begin()
    while block.isValid():
        level = block.blockFormat().headingLevel()
        if level:
            cursor = QTextCursor(block)
            fmt = block.blockFormat()
            fmt.setHeadingLevel(0)
            cursor.setBlockFormat(fmt)
            cursor.select(QTextCursor.SelectionType.BlockUnderCursor)
            char = QTextCharFormat()
            char.setProperty(QTextFormat.Property.FontSizeAdjustment, HEADING_SIZE.get(level, 0))
            char.setFontWeight(QFont.Weight.Bold)
            cursor.mergeCharFormat(char)
        block = block.next()


def render(text: str, c: Colors) -> str:
    doc = QTextDocument()
    doc.setMarkdown(text, _FEATURES)
    _drop_images(doc)
    _cap_headings(doc)
    mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
    block = doc.begin()
    while block.isValid():
        fmt = block.blockFormat()
        if fmt.hasProperty(QTextFormat.Property.BlockCodeFence) or fmt.nonBreakableLines():
            fmt.setBackground(QBrush(QColor(c.code_bg)))
            fmt.setLeftMargin(4)
            fmt.setRightMargin(4)
            cursor = QTextCursor(block)
            cursor.setBlockFormat(fmt)
            cursor.select(QTextCursor.SelectionType.BlockUnderCursor)
            char = cursor.charFormat()
            char.setFontFamilies([mono.family(), "monospace"])
            char.setFontStyleHint(QFont.StyleHint.Monospace)
            cursor.mergeCharFormat(char)
        block = block.next()
    for frame in doc.rootFrame().childFrames():
        if isinstance(frame, QTextTable):
            tfmt = frame.format()
            tfmt.setBorder(1)
            tfmt.setBorderBrush(QBrush(QColor(c.border)))
            tfmt.setBorderStyle(QTextFrameFormat.BorderStyle.BorderStyle_Solid)
            tfmt.setCellPadding(6)
            tfmt.setCellSpacing(0)
            frame.setFormat(tfmt)
    # the label's own font and colour apply: drop the document's fixed body font
    return _BODY_STYLE.sub("<body>", doc.toHtml(), count=1)


_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def settled_length(text: str) -> int:
    """Where the part of a growing Markdown text that can no longer change its rendering ends: after its last blank
    line outside a code fence (later text starts a new block). Streaming renders that part once, the rest each time."""
    settled, pos, fenced = 0, 0, False
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and not line.strip() and line.endswith("\n") and pos < len(text):
            settled = pos
    return settled

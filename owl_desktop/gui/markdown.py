"""Markdown to the rich text a QLabel shows: code blocks on a tinted background, tables with borders."""

from __future__ import annotations

import re

from PySide6.QtGui import (
    QBrush,
    QColor,
    QFont,
    QFontDatabase,
    QTextCursor,
    QTextDocument,
    QTextFormat,
    QTextFrameFormat,
    QTextTable,
)

from owl_desktop.gui.theme import Colors

_BODY_STYLE = re.compile(r"<body[^>]*>")


def render(text: str, c: Colors) -> str:
    doc = QTextDocument()
    doc.setMarkdown(text, QTextDocument.MarkdownFeature.MarkdownDialectGitHub)
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

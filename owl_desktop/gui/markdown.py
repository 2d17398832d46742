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

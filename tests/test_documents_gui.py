"""PDF pages, region zoom and "what the model sees" through the real window, offscreen, with the demo model."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pdf_files import password_pdf, pdf_with_pages
from PIL import Image

pytest.importorskip("pytestqt")

from PySide6.QtCore import QPoint, Qt  # noqa: E402
from PySide6.QtGui import QImage  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402
from test_gui import ANSWER_MS, ask, demo_bundle, make_window, pictures, urls_mime  # noqa: E402, F401

from owl_desktop import pdf_intake  # noqa: E402
from owl_desktop.engine.doc_crops import plan_views, view_pixels  # noqa: E402
from owl_desktop.engine.preprocess import normalize, preprocess  # noqa: E402
from owl_desktop.gui.dnd import simulate_drop  # noqa: E402
from owl_desktop.gui.image_viewer import ImageViewer  # noqa: E402
from owl_desktop.gui.model_view_preview import ModelViewPreview  # noqa: E402
from owl_desktop.image_intake import load_image  # noqa: E402
from owl_desktop.model_family import ureader_plan  # noqa: E402


def qimage_rgb(image: QImage) -> np.ndarray:
    """[H, W, 3] uint8 of a QImage."""
    rgb = image.convertToFormat(QImage.Format.Format_RGB888)
    w, h, stride = rgb.width(), rgb.height(), rgb.bytesPerLine()
    return np.frombuffer(rgb.constBits(), dtype=np.uint8).reshape(h, stride)[:, : 3 * w].reshape(h, w, 3).copy()


def png_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def shown_pixels(preview: ModelViewPreview) -> np.ndarray:
    """What the preview shows, normalised the way the engine normalises its input: [V, 3, 224, 224] float32."""
    views = [qimage_rgb(label.pixmap().toImage()) for label in preview.view_labels]
    return np.stack([normalize(Image.fromarray(v)) for v in views])


# ------------------------------------------------------------------------------------------------ PDF pages


def test_a_dropped_three_page_pdf_becomes_three_images_and_is_asked_about(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001, F811
    window = make_window()
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(pdf_with_pages([(200, 100)] * 3))
    assert simulate_drop(window.composer, urls_mime([pdf]))
    qtbot.waitUntil(lambda: len(window.composer.images()) == 3, timeout=ANSWER_MS)
    images = window.composer.images()
    assert [i.name for i in images] == [f"report.pdf, page {n}" for n in (1, 2, 3)]
    side = pdf_intake.render_side(window.services.chat.pipeline.bundle.image_plan)  # the demo is mPLUG-Owl
    expected = pdf_intake.render_file(pdf, max_side=side)
    assert [i.source for i in images] == [p.png for p in expected]
    ask(qtbot, window, "What is on these pages?")
    stored = window.services.store.messages(window.current_id)[0].images
    assert [r.name for r in stored] == [p.name for p in expected]
    assert [window.services.images.path(r.sha256).read_bytes() for r in stored] == [p.png for p in expected]


@pytest.mark.parametrize(
    ("data", "message"),
    [(password_pdf(), "protected by a password"), (pdf_with_pages([(200, 100)] * 3)[:-300], "damaged or truncated")],
    ids=["password", "truncated"],
)
def test_a_bad_pdf_is_a_message_and_attaches_nothing(qtbot, make_window, tmp_path, pictures, data, message) -> None:  # noqa: ANN001, F811
    window = make_window()
    pdf = tmp_path / "bad.pdf"
    pdf.write_bytes(data)
    simulate_drop(window.composer, urls_mime([pdf, pictures[0]]))
    qtbot.waitUntil(lambda: window.banner.isVisible() and message in window.banner.text.text(), timeout=ANSWER_MS)
    assert "bad.pdf" in window.banner.text.text()
    assert [i.name for i in window.composer.images()] == ["screen-1.png"]  # the image beside it still came in
    ask(qtbot, window, "Still working?")  # the app keeps working
    assert window.chat.bubbles()[-1].text.strip()


def test_a_huge_page_is_rendered_at_the_models_size(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001, F811
    window = make_window()
    pdf = tmp_path / "poster.pdf"
    pdf.write_bytes(pdf_with_pages([(20_000, 20_000)], marks=False))
    window.composer.add_files([pdf])
    qtbot.waitUntil(lambda: len(window.composer.images()) == 1, timeout=ANSWER_MS)
    assert png_rgb(window.composer.images()[0].source).shape == (1792, 1792, 3)  # 8 × 224 for mPLUG-Owl


def test_a_long_pdf_asks_which_pages(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001, F811
    window = make_window()
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(pdf_with_pages([(100, 100)] * 2000, marks=False))
    window.composer.add_files([pdf])
    qtbot.waitUntil(lambda: window.composer.pdfs.picker is not None, timeout=ANSWER_MS)
    picker = window.composer.pdfs.picker
    assert "2,000 pages" in picker.findChildren(type(picker.hint))[0].text()
    picker.field.setText("1-20")
    assert "choose at most 10" in picker.hint.text() and picker.pages() == []
    picker.field.setText("2, 1999")
    picker.accept()
    qtbot.waitUntil(lambda: len(window.composer.images()) == 2, timeout=ANSWER_MS)
    assert [i.name for i in window.composer.images()] == ["manual.pdf, page 2", "manual.pdf, page 1999"]

    window.composer.add_files([pdf])  # cancelling the picker attaches nothing
    qtbot.waitUntil(lambda: window.composer.pdfs.picker is not None, timeout=ANSWER_MS)
    window.composer.pdfs.picker.reject()
    qtbot.waitUntil(lambda: not window.composer.pdfs.busy(), timeout=ANSWER_MS)
    assert len(window.composer.images()) == 2


# ------------------------------------------------------------------------------------------------ region zoom


def open_viewer(qtbot, window, index: int = 0) -> ImageViewer:  # noqa: ANN001
    window.composer.strip._chips[index].open_clicked.emit(window.composer.strip._chips[index])
    viewer = window.findChild(ImageViewer)
    assert viewer is not None
    qtbot.waitExposed(viewer)
    return viewer


def test_drag_a_rectangle_attaches_the_region_at_full_resolution(qtbot, make_window, tmp_path) -> None:  # noqa: ANN001, F811
    window = make_window()
    rng = np.random.default_rng(3)
    original = rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)  # larger than the viewer: shown scaled down
    path = tmp_path / "page.png"
    Image.fromarray(original).save(path)
    window.composer.add_files([path])
    viewer = open_viewer(qtbot, window)
    label = viewer._label
    shown = label.image_rect()
    assert shown.width() < 2000
    start = shown.topLeft() + QPoint(shown.width() // 4, shown.height() // 5)
    end = shown.topLeft() + QPoint(shown.width() // 2, shown.height() // 2)
    qtbot.mousePress(label, Qt.MouseButton.LeftButton, pos=start)
    qtbot.mouseMove(label, pos=(start + end) / 2)
    qtbot.mouseMove(label, pos=end)
    qtbot.mouseRelease(label, Qt.MouseButton.LeftButton, pos=end)
    images = window.composer.images()
    assert len(images) == 2
    name = images[1].name
    assert name.startswith("crop of page.png (") and name.endswith(")")
    x, y, w, h = (int(v) for v in name[len("crop of page.png (") : -1].split(","))
    scale = 2000 / shown.width()
    assert abs(x - 500) <= scale + 1 and abs(y - 300) <= scale + 1  # where the drag began, in original pixels
    assert abs(w - 500) <= 2 * scale + 1 and abs(h - 450) <= 2 * scale + 1
    assert np.array_equal(png_rgb(images[1].source), original[y : y + h, x : x + w])
    assert "Attached crop of page.png" in viewer.hint.text()
    viewer.close()


def test_a_region_outside_the_image_is_refused_in_the_viewer(qtbot, make_window, pictures) -> None:  # noqa: ANN001, F811
    from owl_desktop.image_region import Region

    window = make_window()
    window.composer.add_files([pictures[0]])
    viewer = open_viewer(qtbot, window)
    assert viewer.attach_region(Region(300, 0, 50, 50)) is None
    assert "outside the image, which is 320×200" in viewer.hint.text()
    assert viewer.attach_region(Region(0, 0, 0, 50)) is None
    assert "has no size" in viewer.hint.text()
    assert len(window.composer.images()) == 1
    viewer.close()


# ------------------------------------------------------------------------------------------------ what the model sees


def test_the_preview_shows_the_pixels_the_engine_gets(qtbot, make_window, pictures) -> None:  # noqa: ANN001, F811
    window = make_window()
    window.composer.add_files([pictures[0]])
    viewer = open_viewer(qtbot, window)
    qtbot.mouseClick(viewer.model_view_button, Qt.MouseButton.LeftButton)
    preview = viewer.preview
    assert isinstance(preview, ModelViewPreview) and preview.isVisible()
    engine_input = preprocess(pictures[0]).pixels  # [3, 224, 224]: what the mPLUG-Owl pipeline encodes
    assert np.array_equal(shown_pixels(preview), engine_input[None])
    n_ctx = window.services.chat.pipeline.llm.n_ctx
    assert preview.cost.text() == f"One 224×224 view of the whole image · 65 of the {n_ctx:,} context positions"
    viewer.close()


@pytest.mark.parametrize("size", [(300, 1400), (2480, 3508), (64, 64)], ids=["receipt", "a4", "icon"])
def test_the_ureader_preview_is_the_global_view_and_the_crops_the_engine_encodes(qtbot, tmp_path, size) -> None:  # noqa: ANN001
    rng = np.random.default_rng(5)
    path = tmp_path / "doc.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    img = load_image(path)
    preview = ModelViewPreview(img, ureader_plan(), context=2048)
    qtbot.addWidget(preview)
    layout = plan_views(img.width, img.height, ureader_plan())
    assert np.array_equal(shown_pixels(preview), view_pixels(img, layout))  # [V, 3, 224, 224]
    assert len(preview.view_labels) == layout.n_views
    assert f"{layout.rows(65):,} of the 2,048 context positions" in preview.cost.text()
    assert str(layout.grid) in preview.cost.text()


def test_screenshot_of_the_crop_preview(qtbot) -> None:  # noqa: ANN001
    """The README's picture (resources/screenshots/model-view-preview.png is a copy): a web page screenshot under
    UReader's plan, its global view and its grid of crops, as the viewer's "What the model sees" shows them."""
    from PIL import ImageDraw

    page = Image.new("RGB", (1280, 560), "white")
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, 1279, 70), fill=(40, 70, 140))
    draw.text((30, 28), "owl-desktop  |  Documents  Models  Settings", fill="white")
    for i in range(14):
        draw.text((30, 100 + 32 * i), f"Invoice {1040 + i}   due {1 + i % 28:02d}.12.2026", fill=0)
        draw.text(
            (700, 100 + 32 * i),
            f"{(i * 37) % 900 + 12}.{(i * 13) % 100:02d} EUR   paid: {'yes' if i % 3 else 'no'}",
            fill=0,
        )
    preview = ModelViewPreview(page, ureader_plan(), context=2048)
    qtbot.addWidget(preview)
    layout = preview.layout_
    preview.resize(260 + layout.grid.cols * 228 + 80, layout.grid.rows * 228 + 150)
    preview.show()
    qtbot.waitExposed(preview)
    for _ in range(3):
        QApplication.processEvents()  # pending layouts first, so the picture shows the settled widget
    out = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    assert preview.grab().save(str(out / "model-view-preview.png"))

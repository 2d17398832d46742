"""The settings dialog offers only engine settings that can run together (issue 10: honest settings)."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtGui import QColor  # noqa: E402

from owl_desktop.app.settings import Settings  # noqa: E402
from owl_desktop.engine.options import KV_TYPES_NEEDING_FLASH_ATTN, kv_type_problem  # noqa: E402
from owl_desktop.gui.settings_dialog import SettingsDialog  # noqa: E402
from owl_desktop.gui.theme import apply_theme  # noqa: E402


def _offered(box) -> dict[str, bool]:  # noqa: ANN001
    return {box.itemData(i): box.model().item(i).isEnabled() for i in range(box.count())}


def test_a_cache_type_that_needs_flash_attention_is_not_offered_with_it_off(qtbot) -> None:  # noqa: ANN001
    dialog = SettingsDialog(Settings())
    qtbot.addWidget(dialog)
    assert KV_TYPES_NEEDING_FLASH_ATTN and all(_offered(dialog.kv_type).values())  # flash attention: Automatic
    dialog.flash_attn.setCurrentIndex(dialog.flash_attn.findData("off"))
    offered = _offered(dialog.kv_type)
    assert {k for k, on in offered.items() if not on} == set(KV_TYPES_NEEDING_FLASH_ATTN)
    needy = sorted(KV_TYPES_NEEDING_FLASH_ATTN)[0]
    tip = dialog.kv_type.model().item(dialog.kv_type.findData(needy)).toolTip()
    assert "flash attention" in tip
    # and the other way round: with such a cache type chosen, Off is not offered
    dialog.flash_attn.setCurrentIndex(dialog.flash_attn.findData("auto"))
    dialog.kv_type.setCurrentIndex(dialog.kv_type.findData(needy))
    assert _offered(dialog.flash_attn) == {"auto": True, "on": True, "off": False}
    assert "flash attention" in dialog.flash_attn.model().item(dialog.flash_attn.findData("off")).toolTip()
    assert dialog.values().engine.kv_type == needy


def test_the_dialog_never_saves_a_cache_type_with_flash_attention_off(qtbot) -> None:  # noqa: ANN001
    needy = sorted(KV_TYPES_NEEDING_FLASH_ATTN)[0]
    settings = Settings()
    settings.engine.flash_attn, settings.engine.kv_type = "off", needy  # e.g. a settings file edited by hand
    dialog = SettingsDialog(settings)
    qtbot.addWidget(dialog)
    assert dialog.kv_type.currentData() == "f16"
    # set in code past the disabled items: what the dialog hands back still runs
    dialog.kv_type.setCurrentIndex(dialog.kv_type.findData(needy))
    dialog.flash_attn.setCurrentIndex(dialog.flash_attn.findData("off"))
    engine = dialog.values().engine
    assert engine.flash_attn == "off" and kv_type_problem(engine.kv_type, engine.flash_attn) is None


def _text_left(widget) -> int:  # noqa: ANN001
    """The first column, inside the border, where the widget's text is drawn (differs from the field's fill)."""
    image = widget.grab().toImage()
    h = image.height()
    fill = QColor(image.pixel(4, h // 2)).lightness()
    for x in range(4, image.width()):
        if any(abs(QColor(image.pixel(x, y)).lightness() - fill) > 60 for y in range(h // 3, 2 * h // 3)):
            return x
    raise AssertionError("no text drawn")


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_spin_box_text_is_inset_like_a_drop_down(qtbot, theme: str) -> None:  # noqa: ANN001
    apply_theme(theme)
    try:
        dialog = SettingsDialog(Settings())
        qtbot.addWidget(dialog)
        dialog.tabs.setCurrentIndex(dialog.tabs.indexOf(dialog.gpu_layers.parentWidget()))
        dialog.show()
        qtbot.waitExposed(dialog)
        dialog.setFocus()  # no text cursor in the field
        spin, combo = _text_left(dialog.gpu_layers), _text_left(dialog.device)
        assert spin >= 7 and abs(spin - combo) <= 2, (spin, combo)
        assert dialog.gpu_layers.height() == dialog.device.height()
    finally:
        apply_theme("light")

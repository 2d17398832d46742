"""Settings: appearance, how answers are sampled, how the engine runs, the local API server. Edits a copy; OK hands
it back."""

from __future__ import annotations

import copy
import secrets
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from owl_desktop.engine import options

THEMES = [("system", "Follow the system"), ("light", "Light"), ("dark", "Dark")]
DEVICES = list(options.VISION_DEVICES.items())
FLASH = list(options.FLASH_ATTN_LABELS.items())
KV_TYPES = list(options.KV_TYPE_LABELS.items())
CONTEXTS = list(options.CONTEXT_SIZES)


def _combo(choices: list[tuple[str, str]], value: str, name: str) -> QComboBox:
    box = QComboBox()
    box.setAccessibleName(name)
    for key, label in choices:
        box.addItem(label, key)
    index = box.findData(value)
    box.setCurrentIndex(max(0, index))
    return box


def _spin(lo: int, hi: int, value: int, name: str, special: str | None = None) -> QSpinBox:
    box = QSpinBox()
    box.setRange(lo, hi)
    box.setValue(value)
    box.setAccessibleName(name)
    if special:
        box.setSpecialValueText(special)
    return box


def _dspin(lo: float, hi: float, step: float, value: float, name: str, decimals: int = 2) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(lo, hi)
    box.setSingleStep(step)
    box.setDecimals(decimals)
    box.setValue(value)
    box.setAccessibleName(name)
    return box


def _form(tabs: QTabWidget, title: str) -> QFormLayout:
    page = QWidget()
    outer = QVBoxLayout(page)
    outer.setContentsMargins(18, 16, 18, 16)
    form = QFormLayout()
    form.setLabelAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)  # level with the field text
    outer.addLayout(form)
    outer.addStretch(1)
    form.setHorizontalSpacing(18)
    form.setVerticalSpacing(10)
    tabs.addTab(page, title)
    return form


class SettingsDialog(QDialog):
    def __init__(self, settings: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.setObjectName("SettingsDialog")
        self.resize(580, 560)
        self._original = settings
        s = settings
        layout = QVBoxLayout(self)
        layout.setContentsMargins(18, 18, 18, 14)
        self.tabs = QTabWidget()
        layout.addWidget(self.tabs, 1)

        general = _form(self.tabs, "General")
        self.theme = _combo(THEMES, s.theme, "Theme")
        general.addRow("Theme", self.theme)
        self.send_on_enter = QCheckBox("Enter sends; Shift+Enter starts a new line")
        self.send_on_enter.setChecked(bool(s.send_on_enter))
        self.send_on_enter.setAccessibleName("Enter sends the question")
        general.addRow("Keyboard", self.send_on_enter)
        self.system_prompt = QPlainTextEdit(s.system_prompt or "")
        self.system_prompt.setPlaceholderText("Leave empty to use the model's own system prompt")
        self.system_prompt.setAccessibleName("System prompt")
        self.system_prompt.setFixedHeight(110)
        general.addRow("System prompt", self.system_prompt)
        data_row = QHBoxLayout()
        data_row.setSpacing(8)
        self.data_dir = QLineEdit(s.data_dir or "")
        self.data_dir.setPlaceholderText("Default location")
        self.data_dir.setAccessibleName("Data folder")
        browse = QPushButton("Choose…")
        browse.setAccessibleName("Choose the data folder")
        browse.clicked.connect(self._choose_data_dir)
        data_row.addWidget(self.data_dir, 1)
        data_row.addWidget(browse)
        general.addRow("Data folder", data_row)
        note = QLabel("Models and conversations live here. A new folder is used after a restart.")
        note.setObjectName("Muted")
        note.setWordWrap(True)
        general.addRow("", note)

        sp = s.sampling
        answers = _form(self.tabs, "Answers")
        self.temperature = _dspin(0.0, 2.0, 0.05, sp.temperature, "Temperature")
        self.top_k = _spin(0, 500, sp.top_k, "Top-k", "off")
        self.top_p = _dspin(0.0, 1.0, 0.05, sp.top_p, "Top-p")
        self.min_p = _dspin(0.0, 1.0, 0.01, sp.min_p, "Min-p")
        self.repeat_penalty = _dspin(1.0, 2.0, 0.05, sp.repeat_penalty, "Repeat penalty")
        self.no_repeat_ngram = _spin(0, 10, sp.no_repeat_ngram, "No-repeat n-gram size", "off")
        self.max_new_tokens = _spin(16, 8192, sp.max_new_tokens, "Longest answer in tokens")
        self.seed = _spin(-1, 2**31 - 1, -1 if sp.seed is None else sp.seed, "Seed", "random")
        for label, widget in (
            ("Temperature", self.temperature),
            ("Top-k", self.top_k),
            ("Top-p", self.top_p),
            ("Min-p", self.min_p),
            ("Repeat penalty", self.repeat_penalty),
            ("No-repeat n-gram", self.no_repeat_ngram),
            ("Longest answer (tokens)", self.max_new_tokens),
            ("Seed", self.seed),
        ):
            answers.addRow(label, widget)

        e = s.engine
        engine = _form(self.tabs, "Engine")
        self.device = _combo(DEVICES, e.vision_device, "Device for the vision encoder")
        self.gpu_layers = _spin(-1, 200, e.gpu_layers, "GPU layers", "all")
        self.threads = _spin(0, 256, e.threads or 0, "CPU threads", "automatic")
        self.n_ctx = QComboBox()
        self.n_ctx.setAccessibleName("Context size")
        for n in CONTEXTS:
            self.n_ctx.addItem(f"{n} tokens", n)
        if self.n_ctx.findData(e.n_ctx) < 0:
            self.n_ctx.addItem(f"{e.n_ctx} tokens", e.n_ctx)
        self.n_ctx.setCurrentIndex(self.n_ctx.findData(e.n_ctx))
        self.flash_attn = _combo(FLASH, e.flash_attn, "Flash attention")
        self.kv_type = _combo(KV_TYPES, e.kv_type, "Context cache type")
        if options.kv_type_problem(e.kv_type, e.flash_attn):  # e.g. a settings file edited by hand
            self.kv_type.setCurrentIndex(self.kv_type.findData(options.KV_TYPE_WITHOUT_FLASH_ATTN))
        self.flash_attn.currentIndexChanged.connect(self._offer_cache_choices)
        self.kv_type.currentIndexChanged.connect(self._offer_cache_choices)
        self._offer_cache_choices()
        for label, widget in (
            ("Device", self.device),
            ("GPU layers", self.gpu_layers),
            ("CPU threads", self.threads),
            ("Context size", self.n_ctx),
            ("Flash attention", self.flash_attn),
            ("Context cache", self.kv_type),
        ):
            engine.addRow(label, widget)
        hint = QLabel("Engine changes reload the model. Each image takes 65 positions of the context.")
        hint.setObjectName("Muted")
        hint.setWordWrap(True)
        engine.addRow("", hint)

        self._build_api_tab(s.api_server)

        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        restore = buttons.addButton("Restore defaults", QDialogButtonBox.ButtonRole.ResetRole)
        restore.clicked.connect(self._restore_defaults)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def _offer_cache_choices(self) -> None:
        """A context cache type that needs flash attention is not offered with it off, nor Off with such a type."""
        flash, kv = self.flash_attn.currentData(), self.kv_type.currentData()
        for box, problem in (
            (self.kv_type, lambda key: options.kv_type_problem(key, flash)),
            (self.flash_attn, lambda key: options.kv_type_problem(kv, key)),
        ):
            for i in range(box.count()):
                why = problem(box.itemData(i))
                item = box.model().item(i)
                item.setEnabled(why is None)
                item.setToolTip(f"Not available: {why}." if why else "")

    def _build_api_tab(self, a: Any) -> None:
        api = _form(self.tabs, "Local API server")
        self.api_enabled = QCheckBox("Let other programs use the loaded model (OpenAI- and Ollama-compatible API)")
        self.api_enabled.setChecked(bool(a.enabled))
        self.api_enabled.setAccessibleName("Local API server")
        api.addRow("Server", self.api_enabled)
        self.api_port = _spin(1024, 65535, a.port if 1024 <= a.port <= 65535 else 8695, "API server port")
        api.addRow("Port", self.api_port)
        self.api_network = QCheckBox("Allow other computers on the network (needs an API key)")
        self.api_network.setChecked(bool(a.allow_network))
        self.api_network.setAccessibleName("Allow other computers on the network")
        api.addRow("Network", self.api_network)
        key_row = QHBoxLayout()
        key_row.setSpacing(8)
        self.api_key = QLineEdit(a.api_key)
        self.api_key.setPlaceholderText("none")
        self.api_key.setAccessibleName("API key")
        generate = QPushButton("Generate")
        generate.setAccessibleName("Generate an API key")
        generate.clicked.connect(lambda: self.api_key.setText(secrets.token_urlsafe(24)))
        key_row.addWidget(self.api_key, 1)
        key_row.addWidget(generate)
        api.addRow("API key", key_row)
        self.api_origins = QLineEdit(a.cors_origins)
        self.api_origins.setPlaceholderText("none; e.g. http://localhost:3000")
        self.api_origins.setAccessibleName("Allowed browser origins")
        api.addRow("Browser origins", self.api_origins)
        self.api_hint = QLabel()
        self.api_hint.setObjectName("Muted")
        self.api_hint.setWordWrap(True)
        self.api_hint.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)  # under the fields
        self.api_hint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        api.addRow("", self.api_hint)
        self.api_port.valueChanged.connect(self._update_api_hint)
        self.api_network.toggled.connect(self._update_api_hint)
        self._update_api_hint()

    def _update_api_hint(self) -> None:
        host = "this computer's address" if self.api_network.isChecked() else "127.0.0.1"
        url = f"http://{host}:{self.api_port.value()}"
        self.api_hint.setText(
            f"OpenAI clients (Open WebUI, the openai package): {url}/v1 · Ollama clients: {url}. Requests and the "
            "window's chat take turns on the loaded model. Browser pages and extensions are refused unless their "
            "origin is listed."
        )

    def _choose_data_dir(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Data folder", self.data_dir.text() or str(Path.home()))
        if folder:
            self.data_dir.setText(folder)

    def _restore_defaults(self) -> None:
        defaults = type(self._original)()
        fresh = SettingsDialog(defaults)
        for name in ("theme", "device", "flash_attn", "kv_type", "n_ctx"):
            getattr(self, name).setCurrentIndex(getattr(fresh, name).currentIndex())
        for name in (
            "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "no_repeat_ngram", "max_new_tokens", "seed",
            "gpu_layers", "threads",
        ):  # fmt: skip
            getattr(self, name).setValue(getattr(fresh, name).value())
        self.send_on_enter.setChecked(fresh.send_on_enter.isChecked())
        self.system_prompt.setPlainText("")
        self.api_enabled.setChecked(fresh.api_enabled.isChecked())
        self.api_port.setValue(fresh.api_port.value())
        self.api_network.setChecked(fresh.api_network.isChecked())
        self.api_key.setText("")
        self.api_origins.setText("")
        fresh.deleteLater()

    def values(self) -> Any:
        """A new settings object with what the dialog shows."""
        s = copy.deepcopy(self._original)
        s.theme = self.theme.currentData()
        s.send_on_enter = self.send_on_enter.isChecked()
        s.system_prompt = self.system_prompt.toPlainText().strip() or None
        s.data_dir = self.data_dir.text().strip() or None
        sp = s.sampling
        sp.temperature = self.temperature.value()
        sp.top_k = self.top_k.value()
        sp.top_p = self.top_p.value()
        sp.min_p = self.min_p.value()
        sp.repeat_penalty = self.repeat_penalty.value()
        sp.no_repeat_ngram = self.no_repeat_ngram.value()
        sp.max_new_tokens = self.max_new_tokens.value()
        sp.seed = None if self.seed.value() < 0 else self.seed.value()
        e = s.engine
        e.vision_device = self.device.currentData()
        e.gpu_layers = self.gpu_layers.value()
        e.threads = self.threads.value() or None
        e.n_ctx = int(self.n_ctx.currentData())
        e.flash_attn = self.flash_attn.currentData()
        e.kv_type = self.kv_type.currentData()
        if options.kv_type_problem(e.kv_type, e.flash_attn):  # never saved: the model would not load
            e.kv_type = options.KV_TYPE_WITHOUT_FLASH_ATTN
        a = s.api_server
        a.enabled = self.api_enabled.isChecked()
        a.port = self.api_port.value()
        a.allow_network = self.api_network.isChecked()
        a.api_key = self.api_key.text().strip()
        a.cors_origins = self.api_origins.text().strip()
        return s

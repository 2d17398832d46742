"""The line at the bottom: model, device, speed, time to first token, how full the context is, the local API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QResizeEvent
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QProgressBar

from owl_desktop.gui.format import answer_speed, figure

if TYPE_CHECKING:
    from owl_desktop.engine.pipeline import AnswerRecord


class StatusLine(QFrame):
    def __init__(self) -> None:
        super().__init__()
        self.setObjectName("StatusLine")
        h = QHBoxLayout(self)
        h.setContentsMargins(14, 4, 14, 4)
        h.setSpacing(14)
        self.model = QLabel("No model loaded")
        self.model.setTextFormat(Qt.TextFormat.PlainText)  # a name the user typed
        self.model.setAccessibleName("Model")
        self.device = QLabel()
        self.device.setAccessibleName("Device")
        self.activity = QLabel()
        self.activity.setAccessibleName("Activity")
        self.activity.setTextFormat(Qt.TextFormat.PlainText)
        self.busy = QProgressBar()
        self.busy.setFixedWidth(120)
        self.busy.setFixedHeight(8)
        self.busy.setVisible(False)
        self.speed = QLabel()
        self.speed.setAccessibleName("Speed of the last answer")
        self.context = QProgressBar()
        self.context.setFixedWidth(90)
        self.context.setFixedHeight(8)
        self.context.setAccessibleName("Context used")
        self.context.setVisible(False)
        self.context_label = QLabel()
        self.api = QLabel()
        self.api.setAccessibleName("Local API server")
        which = QHBoxLayout()  # the model and its device read as one item: "Model: X · cpu, bf16"
        which.setSpacing(5)
        which.addWidget(self.model)
        which.addWidget(self.device)
        h.addLayout(which)
        for w in (self.activity, self.busy):
            h.addWidget(w)
        h.addStretch(1)
        for w in (self.speed, self.context, self.context_label, self.api):
            h.addWidget(w)

    def set_model(self, name: str | None, device: str = "") -> None:
        """The model's display name (None: no model) and the device it runs on."""
        self.set_model_name(name)
        short = device.split(" · ")[0].replace("vision: ", "") if device else ""
        self.device.setText(f"· {short}" if short else "")
        self.device.setToolTip(device)

    def set_model_name(self, name: str | None) -> None:
        """Only the name (e.g. the model was renamed); the device stays."""
        self.model.setText(f"Model: {name}" if name else "No model loaded")

    def set_activity(self, text: str, fraction: float | None = None, show_bar: bool = False) -> None:
        self.activity.setText(text)
        self.busy.setVisible(show_bar)
        if show_bar:
            if fraction is None:
                self.busy.setRange(0, 0)
            else:
                self.busy.setRange(0, 1000)
                self.busy.setValue(int(fraction * 1000))

    def set_api(self, text: str) -> None:
        """The local API server: its address and what it is doing ("" when it is off)."""
        self.api.setText(f"· {text}" if text else "")

    NARROW = 900  # below this width the speed (also under each answer) and the context bar make room

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._fit()

    def _fit(self) -> None:
        narrow = self.width() < self.NARROW
        self.speed.setVisible(not narrow and bool(self.speed.text()))
        self.context.setVisible(not narrow and bool(self.context_label.text()))

    def clear_record(self) -> None:
        """No figures: a new chat, or an answer being written (its figures come when it ends)."""
        self.speed.setText("")
        self.context_label.setText("")
        self._fit()

    def clear_speed(self) -> None:
        self.speed.setText("")
        self._fit()

    def set_record(self, record: AnswerRecord | Mapping[str, Any] | None) -> None:
        """The figures of the chat's last answer: its AnswerRecord, or the meta its stored message keeps."""
        if record is None:
            self.clear_record()
            return
        self.speed.setText(answer_speed(record))
        used = int(figure(record, "context_used") or 0)
        size = int(figure(record, "context_size") or 0)
        self.context_label.setText("")
        if size:
            self.context.setRange(0, size)
            self.context.setValue(min(used, size))
            pct = round(100 * used / size)
            self.context_label.setText(f"context {pct}% ({used} / {size})")
            self.context.setToolTip(f"{used} of {size} context positions used")
        self._fit()

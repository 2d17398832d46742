"""Numeric checks shared by the exporters."""

from __future__ import annotations

import torch

from owl_desktop.errors import ConversionError


def check_fits_float16(name: str, source: torch.Tensor, converted: torch.Tensor) -> None:
    """Refuse a float16 cast that turned finite source values into infinities (|x| > 65504)."""
    if converted.dtype != torch.float16 or bool(torch.isfinite(converted).all()):
        return
    if bool(torch.isfinite(source).all()):
        raise ConversionError(f"weight {name} exceeds the float16 range; convert with --quant F32 instead")

"""vision.safetensors: the checkpoint's vision_model.*, abstractor.* and query_tokens, streamed one tensor at a time.

safetensors' own `save_file` wants every tensor in memory at once; the format is simple enough to stream: an
8-byte little-endian header length, a JSON header (dtype, shape and byte range of each tensor, padded with
spaces to 8 bytes), then the raw little-endian tensor bytes in header order.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from owl_desktop.convert.checkpoint import Checkpoint
from owl_desktop.convert.numerics import check_fits_float16
from owl_desktop.tasks import Task

_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class SafetensorsStreamWriter:
    """Writes a safetensors file whose tensors are declared up front and then written in that order."""

    def __init__(self, f: BinaryIO, entries: list[_Entry], metadata: dict[str, str] | None = None) -> None:
        self._f = f
        self._pending = list(entries)
        header: dict[str, object] = {"__metadata__": dict(metadata or {})}
        offset = 0
        for e in entries:
            header[e.name] = {
                "dtype": _DTYPE_NAMES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._pending.pop(0)
        if expected.name != name or tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise ValueError(f"tensor {name} written out of order or with another dtype/shape")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # [nbytes], little-endian on all our targets
        self._f.write(memoryview(data))

    def finish(self) -> None:
        if self._pending:
            raise ValueError(f"{len(self._pending)} declared tensors were never written")


def export_vision(ckpt: Checkpoint, out: Path, *, dtype: torch.dtype, task: Task) -> int:
    """Write every vision tensor of `ckpt` to `out` in `dtype` (HF names kept); returns the bytes written."""
    names = list(ckpt.layout.vision)
    entries = [_Entry(n, dtype, ckpt.tensors[n].shape) for n in names]
    total = sum(e.nbytes for e in entries)
    done = 0
    with open(out, "wb") as f:
        writer = SafetensorsStreamWriter(f, entries, {"format": "pt"})
        for entry in entries:
            task.check()
            source = ckpt.load(entry.name)
            converted = source.to(dtype)
            check_fits_float16(entry.name, source, converted)
            writer.write(entry.name, converted)
            ckpt.release(entry.name, source)
            done += entry.nbytes
            task.report("writing vision weights", done, total, "B")
        writer.finish()
    return total

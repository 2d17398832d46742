"""`owl-desktop bench vision --family ureader`: what reading a document as crops costs the vision tower.

Full-size towers (ViT-L/14 + abstractor, 4096-wide output) with random weights of the real shapes, on one device and
dtype, each figure against a baseline timed in the same run, round-robin so that load from other processes hits
every case alike:

- document: a 500×400 page as the engine reads it, the global view and the 20 crops of its 4×5 grid, one batch of
  21 views through the UReader tower (crop position vectors included);
- 20 separate images: the same 20 crops encoded one at a time, as 20 images sent one by one would be;
- one mPLUG-Owl image: one view through the plain tower.

The goal: batching makes a crop cheaper than an image encoded alone (document ms per view < separate ms per image).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from owl_desktop.engine import vision
from owl_desktop.engine.doc_crops import plan_views, view_pixels
from owl_desktop.model_config import OwlConfig
from owl_desktop.model_family import CUT_EMBEDDING_ROWS, ureader_plan

PAGE_SIZE = (500, 400)  # width, height: the 5:4 shape that takes the release's largest grid, 4×5


@dataclass
class CropBench:
    device: str
    dtype: str
    threads: int
    grid: str
    views: int  # of the document: 1 + crops
    document_ms: float  # all views, one batch
    separate_ms: float  # the crops, one encode each
    single_ms: float  # one mPLUG-Owl image
    repeats: int

    @property
    def crops(self) -> int:
        return self.views - 1

    @property
    def document_ms_per_view(self) -> float:
        return self.document_ms / self.views

    @property
    def separate_ms_per_image(self) -> float:
        return self.separate_ms / self.crops

    @property
    def batching_gain(self) -> float:
        """How many times cheaper a view is inside the document's batch than an image encoded alone."""
        return self.separate_ms_per_image / self.document_ms_per_view

    def report(self) -> str:
        return "\n".join(
            [
                f"vision: {self.device} {self.dtype}; torch threads: {self.threads}; median of {self.repeats} runs",
                f"document, {self.grid} grid + global view ({self.views} views, one batch):"
                f" {self.document_ms:9.1f} ms  ({self.document_ms_per_view:.1f} ms per view)",
                f"{self.crops} separate images, one encode each:"
                f"            {self.separate_ms:9.1f} ms  ({self.separate_ms_per_image:.1f} ms per image)",
                f"one mPLUG-Owl image:                                {self.single_ms:9.1f} ms",
                f"  per view, document / separate:   {1 / self.batching_gain:6.3f}   (goal < 1: batching is cheaper)",
                f"  document / one mPLUG-Owl image:  {self.document_ms / self.single_ms:6.2f}x",
            ]
        )


def _towers(cfg: OwlConfig, device: str, dtype: str, seed: int) -> tuple[vision.VisionEncoder, vision.VisionEncoder]:
    """A UReader tower and the plain mPLUG-Owl tower with the same random weights."""
    with torch.device("meta"):
        model = vision.OwlVision(cfg, CUT_EMBEDDING_ROWS)
    model.to_empty(device="cpu")
    vision.init_random_(model, seed=seed)
    state = model.state_dict()
    del model
    ureader = vision.VisionEncoder.from_state_dict(state, cfg, device, dtype, crop_positions=CUT_EMBEDDING_ROWS)
    plain_state = {k: v for k, v in state.items() if ".cut_patch_embedding_" not in k}
    return ureader, vision.VisionEncoder.from_state_dict(plain_state, cfg, device, dtype)


def _ms(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) * 1000


def run(
    device: str = "auto", dtype: str = "auto", repeats: int = 3, seed: int = 0, config: OwlConfig | None = None
) -> CropBench:
    """Time the three cases; `config` replaces the full-size tower (a tiny one runs the same code in tests)."""
    ureader, plain = _towers(config or OwlConfig(), device, dtype, seed)
    page = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*PAGE_SIZE[::-1], 3), dtype=np.uint8))
    layout = plan_views(*PAGE_SIZE, ureader_plan())
    pixels = view_pixels(page, layout)  # [21, 3, 224, 224]
    positions = np.asarray(layout.positions)  # [21, 2]
    n = len(pixels)

    def document() -> None:
        ureader.encode(pixels, batch_size=n, positions=positions)

    def separate() -> None:
        for i in range(1, n):
            ureader.encode(pixels[i : i + 1], batch_size=1, positions=positions[i : i + 1])

    def single() -> None:
        plain.encode(pixels[:1], batch_size=1)

    cases = {"document": document, "separate": separate, "single": single}
    for fn in cases.values():
        fn()  # warm-up: kernels, allocator, caches
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(max(1, repeats)):
        for name, fn in cases.items():
            times[name].append(_ms(fn))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return CropBench(
        device=ureader.device.type if ureader.device.type != "cuda" else torch.cuda.get_device_name(ureader.device),
        dtype=vision.dtype_name(ureader.dtype),
        threads=torch.get_num_threads(),
        grid=str(layout.grid),
        views=n,
        document_ms=med["document"],
        separate_ms=med["separate"],
        single_ms=med["single"],
        repeats=max(1, repeats),
    )

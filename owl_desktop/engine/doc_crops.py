"""What the vision tower sees of one image: the views of an image plan (model_family.ImagePlan).

The engine encodes these views and the preview shows them: both call `plan_views` and `view_images`, so what a user
sees is what the model gets.

Single view (mPLUG-Owl): the whole image stretched to 224×224.

Shape-adaptive crops (UReader, mplug-owl-family.md; read in UReader/pipeline/data_utils/processors/doc_processor.py,
DocNewMultiScaleSFTProcessor and its `anchor_rank`):

1. Grid choice. Every anchor (rows, cols) is a box [0, 0, cols·S, rows·S] in int64 (S = crop size). Two IoUs are taken
   against it, each as int64 intersection / (int64 union cast to float32 + 1e-5) in float32:
   - resolution IoU: against the image box [0, 0, w, h];
   - shape IoU: against [0, 0, cols·S, trunc(f32(h/w) · f32(cols·S))], the anchor's width at the image's aspect
     ratio; the height is computed in float32 and truncated when it is stored back into the int64 box.
   The score is f32(100 · shape IoU + resolution IoU); the first anchor with the highest score wins. Shape dominates:
   a 500×400 icon is blown up to a 4×5 grid. The float32 arithmetic and the truncation are kept on purpose: a
   float64 restatement picks another grid for some sizes (an A4 page scanned at 300 dpi among them).
2. The image is resized (Pillow bicubic) to exactly (cols·S, rows·S) and cut into S×S crops row by row, left to right.
3. A global view (the whole image, Pillow bicubic to S×S) comes first.
4. Positions: the crop in row r, column c is at (r, c); the global view at (anchor_max, anchor_max), anchor_max being
   the largest side among the plan's anchors (11 for the release), whatever grid was chosen.

Pixels are normalised like the reference's ToTensor + Normalize (x/255 in float32, CLIP mean and std); those values
are bit-identical to preprocess.to_pixels, which both views use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from owl_desktop.engine.preprocess import normalize
from owl_desktop.image_intake import to_rgb
from owl_desktop.model_family import ImagePlan

_EPS = np.float32(1e-5)
_SHAPE_WEIGHT = np.float32(100)


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: int

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}×{self.cols}"


@dataclass(frozen=True)
class ViewLayout:
    """The views of one image: a global view and the crops of `grid`, or (grid None) the single stretched view."""

    grid: Grid | None
    crop_size: int
    anchor_max: int = 0

    @property
    def n_views(self) -> int:
        return 1 if self.grid is None else 1 + self.grid.cells

    @property
    def positions(self) -> list[tuple[int, int]]:
        """(row, col) of each view in view order: the global view first at (anchor_max, anchor_max), then the crops.

        Empty for a single view (no position vectors are added).
        """
        if self.grid is None:
            return []
        crops = [(r, c) for r in range(self.grid.rows) for c in range(self.grid.cols)]
        return [(self.anchor_max, self.anchor_max), *crops]

    def rows(self, rows_per_view: int) -> int:
        """LLM positions the image takes: each view brings `rows_per_view` (65) rows."""
        return rows_per_view * self.n_views


def _iou_f32(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """int64 intersection / (int64 union + 1e-5), the way torch computes it: all in float32."""
    return inter.astype(np.float32) / (union.astype(np.float32) + _EPS)


def anchor_scores(width: int, height: int, anchors: tuple[tuple[int, int], ...], crop_size: int) -> np.ndarray:
    """The reference ranking score of every anchor for an image of width×height: [N] float32."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, not {width}×{height}")
    a = np.asarray(anchors, dtype=np.int64).reshape(-1, 2)  # [N, 2] (rows, cols)
    aw = a[:, 1] * crop_size  # [N] anchor box width
    ah = a[:, 0] * crop_size  # [N] anchor box height
    area = aw * ah  # [N] int64
    # resolution IoU: anchor box against the image box, both anchored at the origin
    inter = np.minimum(aw, width) * np.minimum(ah, height)
    iou = _iou_f32(inter, area + width * height - inter)
    # shape IoU: against the anchor's width at the image's aspect ratio (height in float32, truncated into int64)
    shaped_h = (np.float32(height / width) * aw.astype(np.float32)).astype(np.int64)
    shape_inter = aw * np.minimum(ah, shaped_h)
    shape_iou = _iou_f32(shape_inter, area + aw * shaped_h - shape_inter)
    return shape_iou * _SHAPE_WEIGHT + iou  # [N] float32


def choose_grid(
    width: int, height: int, anchors: tuple[tuple[int, int], ...], crop_size: int = 224, max_cells: int | None = None
) -> Grid:
    """The grid the reference picks for an image of width×height; with `max_cells`, among the anchors that small."""
    pool = anchors if max_cells is None else tuple(a for a in anchors if a[0] * a[1] <= max_cells)
    if not pool:
        raise ValueError(f"no anchor grid has at most {max_cells} cells")
    best = int(np.argmax(anchor_scores(width, height, pool, crop_size)))  # argmax: the first of equal scores
    return Grid(*pool[best])


def detail_levels(plan: ImagePlan) -> tuple[int | None, ...]:
    """The most crops an image may take at each level of detail: None (the full plan) first, then every smaller
    crop count among the plan's anchors, largest first. A single-view plan has the one level."""
    if not plan.crops:
        return (None,)
    smaller = sorted({r * c for r, c in plan.anchors if r * c < plan.max_cells}, reverse=True)
    return (None, *smaller)


def plan_views(width: int, height: int, plan: ImagePlan, max_cells: int | None = None) -> ViewLayout:
    """The views an image of width×height gets under `plan` (at most `max_cells` crops when given)."""
    if not plan.crops:
        return ViewLayout(None, plan.crop_size)
    grid = choose_grid(width, height, plan.anchors, plan.crop_size, max_cells)
    return ViewLayout(grid, plan.crop_size, plan.anchor_max)


def view_images(img: Image.Image, layout: ViewLayout) -> list[Image.Image]:
    """The views as RGB images of crop_size×crop_size, in the order the model reads them."""
    if img.mode != "RGB":
        img = to_rgb(img)
    s = layout.crop_size
    views = [img.resize((s, s), Image.BICUBIC)]
    if layout.grid is not None:
        g = layout.grid
        resized = img.resize((g.cols * s, g.rows * s), Image.BICUBIC)
        views += [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(g.rows) for c in range(g.cols)]
    return views


def view_pixels(img: Image.Image, layout: ViewLayout) -> np.ndarray:
    """The vision tower's input for one image: [n_views, 3, S, S] float32, CLIP-normalised."""
    return np.stack([normalize(v) for v in view_images(img, layout)])

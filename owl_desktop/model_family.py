"""Model families and their image plans: how an image becomes views for the vision tower.

Two families share the mPLUG-Owl v1 architecture (mplug-owl-family.md):

- "mplug-owl": every image is one 224×224 view (a stretch of the whole image): 65 LLM rows per image.
- "ureader": every image is a global 224×224 view followed by the crops of a grid of 224×224 cells chosen among
  `anchors` (rows, cols) to fit the image's shape; each view brings its own 65 rows, so an image costs
  65·(1 + rows·cols) positions. The abstractor output of each view gets a learned position vector before visual_fc
  (`abstractor.cut_patch_embedding_h/w`, two Embedding(15, D) tables); the global view sits at (anchor_max,
  anchor_max), anchor_max being the largest side of any anchor.

The plan travels in bundle.json (`family`, `image_plan`), so the engine and the preview follow what the converter
found in the checkpoint rather than guessing from names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MPLUG_OWL = "mplug-owl"
UREADER = "ureader"
FAMILIES = (MPLUG_OWL, UREADER)

SINGLE_VIEW = "single-view"
SHAPE_ADAPTIVE_CROPS = "shape-adaptive-crops"
POST = "post"  # crop position vectors added to the abstractor output, before visual_fc (the release's setting)

# Names of the UReader-only tensors (nn.Embedding weights of the abstractor), and their row count: the reference
# hard-codes 15 (UReader/mplug_owl/modeling_mplug_owl.py, `self.cut_num = 15`).
CUT_EMBEDDING_H = "abstractor.cut_patch_embedding_h.weight"
CUT_EMBEDDING_W = "abstractor.cut_patch_embedding_w.weight"
CUT_EMBEDDING_ROWS = 15

# The release's grids, (rows, cols), in file order: UReader/configs/sft/release.yaml, valid_processors.sft.anchors.
# Order matters: on a score tie the first anchor wins. At most 20 cells; the largest side is 11.
UREADER_ANCHORS: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1), (1, 5), (5, 1), (1, 6), (2, 3), (3, 2), (6, 1),
    (1, 7), (7, 1), (1, 8), (2, 4), (4, 2), (8, 1), (1, 9), (3, 3), (9, 1), (1, 10), (2, 5), (5, 2), (10, 1),
    (1, 11), (11, 1), (2, 6), (3, 4), (4, 3), (6, 2), (2, 7), (7, 2), (3, 5), (5, 3), (2, 8), (4, 4), (8, 2),
    (2, 9), (3, 6), (6, 3), (9, 2), (2, 10), (4, 5), (5, 4), (10, 2),
)  # fmt: skip


@dataclass(frozen=True)
class ImagePlan:
    """How one image becomes views: one stretched view, or a global view plus the crops of an anchor grid."""

    kind: str = SINGLE_VIEW
    crop_size: int = 224
    anchors: tuple[tuple[int, int], ...] = ()  # (rows, cols), in ranking order; empty for a single view

    def __post_init__(self) -> None:
        if self.kind not in (SINGLE_VIEW, SHAPE_ADAPTIVE_CROPS):
            raise ValueError(f"unknown image plan '{self.kind}'")
        if self.crop_size <= 0:
            raise ValueError(f"crop size must be positive, not {self.crop_size}")
        anchors = tuple((int(r), int(c)) for r, c in self.anchors)
        if self.kind == SHAPE_ADAPTIVE_CROPS:
            if not 0 < len(anchors) <= CUT_EMBEDDING_ROWS**2:
                raise ValueError(f"a crop plan needs 1 to {CUT_EMBEDDING_ROWS**2} anchor grids, not {len(anchors)}")
            if any(r <= 0 or c <= 0 for r, c in anchors):
                raise ValueError("anchor grids must have at least one row and one column")
            if max(max(a) for a in anchors) >= CUT_EMBEDDING_ROWS:
                raise ValueError(f"anchor sides must be below {CUT_EMBEDDING_ROWS} (the crop position tables' size)")
        object.__setattr__(self, "anchors", anchors)

    @property
    def crops(self) -> bool:
        return self.kind == SHAPE_ADAPTIVE_CROPS

    @property
    def anchor_max(self) -> int:
        """The position index of the global view (the largest anchor side); 0 for a single view."""
        return max(max(a) for a in self.anchors) if self.anchors else 0

    @property
    def max_cells(self) -> int:
        """The most crops one image can take (1 for a single view: the image itself)."""
        return max(r * c for r, c in self.anchors) if self.anchors else 1

    @property
    def max_views(self) -> int:
        return 1 + self.max_cells if self.crops else 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "crop_size": self.crop_size}
        if self.crops:
            out["anchors"] = [list(a) for a in self.anchors]
            out["position_embedding"] = POST
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> ImagePlan:
        if not isinstance(raw, dict):
            raise ValueError("image_plan is not an object")
        anchors = raw.get("anchors") or ()
        if not isinstance(anchors, (list, tuple)) or not all(
            isinstance(a, (list, tuple)) and len(a) == 2 for a in anchors
        ):
            raise ValueError("image_plan.anchors must be a list of [rows, cols] pairs")
        if raw.get("position_embedding", POST) != POST:
            raise ValueError(f"image_plan.position_embedding {raw['position_embedding']!r} is not supported")
        return cls(
            kind=str(raw.get("kind", SINGLE_VIEW)),
            crop_size=int(raw.get("crop_size", 224)),
            anchors=tuple((int(r), int(c)) for r, c in anchors),
        )


def single_view_plan(image_size: int = 224) -> ImagePlan:
    return ImagePlan(SINGLE_VIEW, image_size)


def ureader_plan(crop_size: int = 224) -> ImagePlan:
    return ImagePlan(SHAPE_ADAPTIVE_CROPS, crop_size, UREADER_ANCHORS)


def default_plan(family: str, image_size: int = 224) -> ImagePlan:
    """The image plan of a family's release (the crop size is the ViT's input size)."""
    if family == UREADER:
        return ureader_plan(image_size)
    if family == MPLUG_OWL:
        return single_view_plan(image_size)
    raise ValueError(f"unknown model family '{family}'; known: {', '.join(FAMILIES)}")

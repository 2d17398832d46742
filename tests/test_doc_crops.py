"""UReader's views of an image: the grid choice against the reference's ranking, the crops, their order and positions.

The expected grids below were worked out by hand from UReader/pipeline/data_utils/processors/doc_processor.py
(`anchor_rank`, `DocNewMultiScaleSFTProcessor`) with the release's anchors (configs/sft/release.yaml): the score of an
anchor (rows, cols) is 100 · shape IoU + resolution IoU, in float32, first anchor on a tie, where
- resolution IoU compares the box [0, 0, cols·224, rows·224] with the image box [0, 0, w, h];
- shape IoU compares it with [0, 0, cols·224, trunc(f32(h / w) · cols·224)]: the anchor's width at the image's aspect.
A second check restates that ranking in torch (int64 boxes, the float32 arithmetic torch applies to them) and
compares over thousands of sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from owl_desktop.engine.doc_crops import (
    Grid,
    ViewLayout,
    anchor_scores,
    choose_grid,
    detail_levels,
    plan_views,
    view_images,
    view_pixels,
)
from owl_desktop.engine.preprocess import CLIP_MEAN, CLIP_STD, to_pixels
from owl_desktop.model_family import UREADER_ANCHORS, ImagePlan, single_view_plan, ureader_plan

PLAN = ureader_plan()

# (width, height) → (rows, cols), with the reasoning.
EXPECTED = {
    # A tall receipt, aspect h/w exactly 4. Two anchors have that shape, 4×1 and 8×2: shaped height 4·224 = 896 and
    # 4·448 = 1792 are exact, so both shape IoUs are 1 (the best possible). Resolution IoU decides: 8×2 is a
    # 448×1792 box, 802,816 px of the image's 1,440,000 (0.56); 4×1 covers 200,704 (0.14).
    "tall receipt 600×2400": ((600, 2400), (8, 2)),
    # A wide banner, aspect 1:4: 1×4 and 2×8 have the shape; 2×8 (1792×448) covers 802,816 of 921,600 px (0.87)
    # against 1×4's 200,704 (0.22).
    "wide banner 1920×480": ((1920, 480), (2, 8)),
    # A tiny square icon: every square anchor (1×1, 2×2, 3×3, 4×4) has shape IoU 1; the icon's 256 px over the union
    # (the anchor box) is largest for the smallest box, 256 / 50,176. Shape first: it is not left uncut, it gets 1×1.
    "tiny icon 16×16": ((16, 16), (1, 1)),
    # A square photo larger than every square anchor: all square anchors have shape IoU 1; 4×4 (896×896) covers
    # 802,816 of 1,048,576 px (0.77), more than 3×3 (0.43).
    "square photo 1024×1024": ((1024, 1024), (4, 4)),
    # A4 at 300 dpi, aspect 3508/2480 = 1.41452. Closest shapes: 3×2 (1.5) and 4×3 (1.333).
    #   4×3: width 672, shaped height f32(1.4145161)·672 = 950.55 → 950; box 672×896 inside 672×950:
    #        shape IoU = 602,112 / 638,400 = 0.94316
    #   3×2: width 448, shaped height 633.70 → 633; box 448×672 contains 448×633: shape IoU = 283,584 / 301,056
    #        = 0.94196
    # 4×3 scores 94.316 + 0.069 against 94.196 + 0.035: 4×3. Without the truncation (633.70 and 950.55 kept) the
    # shape IoUs are 0.94301 (3×2) and 0.94261 (4×3), and 3×2 would win: the int64 box matters.
    "A4 page 300 dpi 2480×3508": ((2480, 3508), (4, 3)),
    # The family doc's screenshot: aspect 3.70; 7×2 (shape 3.5) beats 4×1 and 8×2 (4.0): 975 positions.
    "phone screenshot 1080×4000": ((1080, 4000), (7, 2)),
    # Shape dominates size: a small 5:4 image is blown up to the 4×5 grid (1120×896), the only exact 5:4 anchor.
    "small 5:4 picture 500×400": ((500, 400), (4, 5)),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_grid_choice_matches_the_reference_ranking_worked_by_hand(case: str) -> None:
    (w, h), (rows, cols) = EXPECTED[case]
    assert choose_grid(w, h, UREADER_ANCHORS) == Grid(rows, cols)


def test_a4_page_needs_the_float32_truncating_arithmetic() -> None:
    scores = anchor_scores(2480, 3508, UREADER_ANCHORS, 224)
    i43, i32 = UREADER_ANCHORS.index((4, 3)), UREADER_ANCHORS.index((3, 2))
    assert scores.dtype == np.float32
    assert scores[i43] == pytest.approx(100 * 602112 / 638400 + 602112 / (2480 * 3508), abs=1e-4)
    assert scores[i32] == pytest.approx(100 * 283584 / 301056 + 301056 / (2480 * 3508), abs=1e-4)
    assert scores[i43] > scores[i32]


def torch_restated_choice(width: int, height: int, anchors: tuple[tuple[int, int], ...], size: int = 224) -> int:
    """The reference ranking written out in torch: int64 boxes, and torch's own float32 promotion rules."""
    boxes = torch.tensor([[0, 0, c * size, r * size] for r, c in anchors])  # int64 [N, 4], xyxy
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # int64

    def iou(a: torch.Tensor, a_area: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b_area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        lo = torch.maximum(a[:, :2], b[:, :2])
        hi = torch.minimum(a[:, 2:], b[:, 2:])
        wh = (hi - lo).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        return inter / (a_area + b_area - inter + 1e-5)  # int64 / float32 tensor: float32

    image = torch.tensor([[0, 0, width, height]]).expand(len(anchors), 4)
    shaped = boxes.clone()
    shaped[:, 3] = height / width * boxes[:, 2]  # float32 product stored into int64: truncated
    score = iou(boxes, areas, shaped) * 100 + iou(boxes, areas, image)
    assert score.dtype == torch.float32
    return int(torch.argmax(score))


def test_grid_choice_equals_a_torch_restatement_over_many_sizes() -> None:
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 5000, size=(3000, 2))]
    sizes += [(w, h) for w in (1, 7, 224, 225, 448, 1000) for h in (1, 3, 224, 672, 999, 20000)]
    sizes += [(2480, 3508), (3508, 2480), (1240, 1754), (2550, 3300), (4032, 3024), (20000, 20000)]
    for w, h in sizes:
        want = UREADER_ANCHORS[torch_restated_choice(w, h, UREADER_ANCHORS)]
        assert choose_grid(w, h, UREADER_ANCHORS) == Grid(*want), (w, h)


def test_a_cap_on_cells_ranks_only_the_smaller_anchors() -> None:
    small = tuple(a for a in UREADER_ANCHORS if a[0] * a[1] <= 6)
    for w, h in [(1080, 4000), (1024, 1024), (500, 400), (2480, 3508)]:
        want = small[torch_restated_choice(w, h, small)]
        got = choose_grid(w, h, UREADER_ANCHORS, max_cells=6)
        assert got == Grid(*want) and got.cells <= 6
    assert detail_levels(PLAN) == (None, 18, 16, 15, 14, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1)
    assert detail_levels(single_view_plan()) == (None,)
    with pytest.raises(ValueError, match="no anchor"):
        choose_grid(10, 10, ((2, 2),), max_cells=3)


def test_positions_per_image() -> None:
    rows = {case: plan_views(*size, PLAN).rows(65) for case, (size, _) in EXPECTED.items()}
    assert rows["tall receipt 600×2400"] == 65 * 17  # 8×2: 16 crops + the global view
    assert rows["tiny icon 16×16"] == 130  # the least an image costs: one crop + the global view
    assert rows["small 5:4 picture 500×400"] == 1365  # the most: 20 crops + the global view
    assert rows["phone screenshot 1080×4000"] == 975
    assert plan_views(5000, 100, single_view_plan()).rows(65) == 65


def test_positions_of_the_views() -> None:
    layout = plan_views(700, 450, PLAN)  # aspect 0.643: 2×3 (0.667)
    assert layout.grid == Grid(2, 3) and layout.n_views == 7
    assert layout.positions == [(11, 11), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert PLAN.anchor_max == 11  # the global view's position, whatever the grid
    assert ViewLayout(None, 224).positions == []


def _blocks_image(rows: int, cols: int, size: int = 224) -> Image.Image:
    """An image of exactly the grid's size whose every cell is different noise (no resampling happens)."""
    rng = np.random.default_rng(rows * 10 + cols)
    return Image.fromarray(rng.integers(0, 256, (rows * size, cols * size, 3), dtype=np.uint8))


def test_crop_pixels_and_order_on_an_exact_grid() -> None:
    img = _blocks_image(2, 3)
    layout = ViewLayout(Grid(2, 3), 224, 11)
    px = view_pixels(img, layout)
    assert px.shape == (7, 3, 224, 224) and px.dtype == np.float32
    src = np.asarray(img)
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    for i, (r, c) in enumerate(layout.positions[1:], start=1):
        block = src[r * 224 : (r + 1) * 224, c * 224 : (c + 1) * 224].astype(np.float32) / np.float32(255)
        want = ((block - mean) / std).transpose(2, 0, 1)
        np.testing.assert_array_equal(px[i], want)  # crop i is cell (r, c), row by row
    np.testing.assert_array_equal(px[0], to_pixels(img))  # the global view: the whole image stretched to 224


def test_crop_pixels_of_a_resized_image_follow_the_reference_steps() -> None:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (900, 300, 3), dtype=np.uint8))  # 300×900: aspect 3 → 3×1
    layout = plan_views(300, 900, PLAN)
    assert layout.grid == Grid(3, 1)
    px = view_pixels(img, layout)
    # the reference: Pillow bicubic to (cols·224, rows·224), ToTensor (x / 255 in float32), Normalize, then
    # 'C (nh h) (nw w) -> (nh nw) C h w'
    big = np.asarray(img.resize((224, 3 * 224), Image.BICUBIC)).astype(np.float32) / np.float32(255)
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    chw = ((big - mean) / std).transpose(2, 0, 1)  # [3, 672, 224]
    crops = chw.reshape(3, 3, 224, 1, 224).transpose(1, 3, 0, 2, 4).reshape(3, 3, 224, 224)
    np.testing.assert_array_equal(px[1:], crops)
    glob = np.asarray(img.resize((224, 224), Image.BICUBIC)).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(px[0], ((glob - mean) / std).transpose(2, 0, 1))


def test_preview_images_are_the_engine_input() -> None:
    img = Image.fromarray(np.random.default_rng(4).integers(0, 256, (500, 640, 3), dtype=np.uint8)).convert("RGBA")
    layout = plan_views(640, 500, PLAN)
    views = view_images(img, layout)
    assert len(views) == layout.n_views and all(v.size == (224, 224) and v.mode == "RGB" for v in views)
    px = view_pixels(img, layout)
    for v, p in zip(views, px, strict=True):
        np.testing.assert_array_equal(to_pixels(v), p)


def test_image_plan_round_trips_and_refuses_nonsense() -> None:
    assert ImagePlan.from_dict(PLAN.to_dict()) == PLAN
    assert ImagePlan.from_dict(single_view_plan().to_dict()) == single_view_plan()
    assert PLAN.max_cells == 20 and PLAN.max_views == 21 and len(PLAN.anchors) == 48
    with pytest.raises(ValueError, match="position_embedding"):
        ImagePlan.from_dict({**PLAN.to_dict(), "position_embedding": "pre"})
    with pytest.raises(ValueError, match="below 15"):
        ImagePlan.from_dict({**PLAN.to_dict(), "anchors": [[1, 15]]})
    with pytest.raises(ValueError, match="unknown image plan"):
        ImagePlan.from_dict({"kind": "tiles"})


def test_crop_bench_runs_the_engine_path_on_a_tiny_tower() -> None:
    from owl_desktop.devtools.tiny_checkpoint import preset_config
    from owl_desktop.engine import crop_bench

    result = crop_bench.run("cpu", "fp32", repeats=1, config=preset_config("tiny"))
    assert (result.grid, result.views, result.crops) == ("4×5", 21, 20)
    assert min(result.document_ms, result.separate_ms, result.single_ms) > 0
    assert "per view, document / separate" in result.report()

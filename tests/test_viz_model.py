"""Tests for notebook 07's drawings (``mrcnn_edu.viz``: FPN levels, the feature pyramid,
parameters per part, the forward pass stage by stage) and its explorer
(``mrcnn_edu.widgets.fpn_levels``).

The levels drawn are checked against torchvision's ``LevelMapper`` (an independent
implementation of Eqn. (1) of the FPN paper) and against hand-computed values; the pictures are
checked by reading back what was drawn (patch coordinates, image arrays, bar widths).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torchvision.ops.poolers import LevelMapper

from mrcnn_edu.anchors import AnchorGenerator, generate_cell_anchors
from mrcnn_edu.config import get_preset
from mrcnn_edu.model import build_model
from mrcnn_edu.viz import (
    LEVEL_COLORS,
    box_levels,
    box_wh,
    centre_anchors,
    draw_feature_pyramid,
    draw_forward_stages,
    draw_fpn_levels,
    draw_level_rule,
    draw_parameter_counts,
    draw_rois_by_level,
)
from mrcnn_edu.widgets.fpn_levels import fpn_level_explorer


def tv_levels(boxes: torch.Tensor, k_min: int = 2, k_max: int = 5) -> np.ndarray:
    """torchvision's level of each box (``LevelMapper`` returns ``k - k_min``)."""
    return (LevelMapper(k_min, k_max)([boxes.float()]) + k_min).to(torch.int64).numpy()


def random_boxes(n: int, seed: int = 0, max_side: float = 900.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    wh = torch.exp(torch.empty(n, 2).uniform_(math.log(2.0), math.log(max_side), generator=g))
    return torch.cat([xy, xy + wh], dim=1)


def patches_with_gid(ax, gid: str) -> list:
    return [p for p in ax.patches if p.get_gid() == gid]


# ------------------------------------------------------------------------------ level rule
def test_box_levels_hand_computed_and_equal_to_torchvision():
    # k = floor(4 + log2(sqrt(wh) / 224)) clamped to 2..5: 224 -> P4, just below -> P3,
    # 112 -> P3, 448 -> P5, tiny and huge boxes clamped; sqrt(wh) counts, not the longer side:
    # 100 x 400 -> 200 (P3), 400 x 500 -> 447.2 (P4), 450 x 460 -> 455 (P5)
    sides = [
        (224, 224),
        (223, 223),
        (112, 112),
        (111, 111),
        (448, 448),
        (447, 447),
        (5, 5),
        (3000, 3000),
        (100, 400),
        (400, 500),
        (450, 460),
    ]
    boxes = torch.tensor([[10.0, 20.0, 10.0 + w, 20.0 + h] for w, h in sides])
    assert box_levels(boxes).tolist() == [4, 3, 3, 2, 5, 4, 2, 5, 3, 4, 5]
    boxes = random_boxes(500)
    assert np.array_equal(box_levels(boxes), tv_levels(boxes))
    assert np.array_equal(box_levels(boxes, 3, 4), tv_levels(boxes, 3, 4))
    assert set(box_levels(boxes).tolist()) == {2, 3, 4, 5}  # the sample reaches every level
    with pytest.raises(ValueError, match=r"box_levels: boxes must have shape \[N, 4\]"):
        box_levels(torch.zeros(3, 5))


def test_box_wh_keeps_the_area_and_sets_the_aspect():
    for size, aspect in [(150.0, 1.0), (64.0, 0.25), (300.0, 3.0)]:
        w, h = box_wh(size, aspect)
        assert math.isclose(math.sqrt(w * h), size) and math.isclose(h / w, aspect)
    with pytest.raises(ValueError, match="box_wh: size and aspect must be positive"):
        box_wh(-1.0, 1.0)


def test_level_rule_staircase_and_rois():
    fig = Figure()
    ax = fig.subplots()
    boxes = random_boxes(300, seed=1)
    draw_level_rule(ax, boxes, size_range=(8.0, 2048.0))
    (rule,) = [line for line in ax.lines if line.get_gid() == "rule"]
    s, k = rule.get_xdata(), rule.get_ydata()
    # the staircase is Eqn. (1) evaluated by hand (float64 here: sizes on a level boundary
    # are not sampled, so no rounding question arises)
    expected = np.clip(np.floor(4 + np.log2(s / 224) + 1e-6), 2, 5)
    assert np.array_equal(k, expected)
    # each RoI is scattered at sqrt(w h) and at torchvision's level for it
    levels = tv_levels(boxes)
    size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt().numpy()
    for lev in range(2, 6):
        pts = [c for c in ax.collections if c.get_gid() == f"roi_P{lev}"]
        assert len(pts) == (1 if (levels == lev).any() else 0)
        if pts:
            xy = pts[0].get_offsets()
            assert np.allclose(np.sort(xy[:, 0]), np.sort(size[levels == lev]), rtol=1e-5)
            assert np.all(np.abs(xy[:, 1] - lev) < 0.2)  # the spread keeps points on their step
            assert f"P{lev}: {int((levels == lev).sum())} RoIs" in [
                t.get_text() for t in ax.get_legend().get_texts()
            ]
    with pytest.raises(ValueError, match="draw_level_rule: size_range"):
        draw_level_rule(ax, size_range=(10.0, 5.0))


@pytest.mark.parametrize(
    "w, h, level",
    [(150.0, 100.0, 3), (30.0, 10.0, 2), (224.0, 224.0, 4), (600.0, 500.0, 5), (80.0, 320.0, 3)],
)
def test_fpn_levels_figure_marks_the_pooled_level(w, h, level):
    fig = draw_fpn_levels((w, h), image_size=(800, 800), output_size=7)
    assert fig.fpn_level == level == int(tv_levels(torch.tensor([[0.0, 0.0, w, h]]))[0])
    pyramid, *closeups = fig.axes
    assert len(closeups) == 4  # P2..P5
    (plane,) = patches_with_gid(pyramid, "assigned_level")
    assert np.allclose(plane.get_facecolor()[:3], matplotlib.colors.to_rgb(LEVEL_COLORS[level]))
    assert len(patches_with_gid(pyramid, "level_P6")) == 1  # P6 drawn, never chosen
    for j, ax in zip(range(2, 6), closeups):
        # the box at the image centre, in pixels, and its 7 x 7 bins (6 inner edges per axis)
        (box,) = patches_with_gid(ax, "box")
        assert np.allclose(
            [box.get_x(), box.get_y(), box.get_width(), box.get_height()],
            [400 - w / 2, 400 - h / 2, w, h],
        )
        assert len([ln for ln in ax.lines if ln.get_gid() == "bins"]) == 2 * 6
        # the checkerboard has one entry per cell of stride 2**j: neighbours alternate
        (cells,) = [im for im in ax.images if im.get_gid() == f"cells_P{j}"]
        board = np.asarray(cells.get_array())
        x0, x1, y1, y0 = cells.get_extent()
        assert (x1 - x0) / board.shape[1] == 2**j == (y1 - y0) / board.shape[0]
        assert np.all(board[:, 1:] != board[:, :-1]) and np.all(board[1:] != board[:-1])
        assert ("[pooled]" in ax.get_title()) == (j == level)
        assert f"box {w / 2**j:.1f}x{h / 2**j:.1f} cells" in ax.get_title()
    if 2 < level < 5:  # unclamped: on its level the box is 14..28 cells (sqrt(wh) / stride)
        assert 14 <= math.sqrt(w * h) / 2**level < 28
    with pytest.raises(ValueError, match="draw_fpn_levels: box_size"):
        draw_fpn_levels((0.0, 10.0))


# --------------------------------------------------------------------------- other drawings
def test_feature_pyramid_shows_the_mean_absolute_activation():
    g = torch.Generator().manual_seed(0)
    feats = {
        "0": torch.randn(2, 8, 16, 20, generator=g),
        "1": torch.randn(2, 8, 8, 10, generator=g),
    }
    fig = draw_feature_pyramid(feats, index=1, labels=["P2", "P3"], image_size=(64, 80))
    for i, (ax, x) in enumerate(zip(fig.axes, feats.values())):
        (im,) = ax.images
        assert im.get_gid() == f"feature_{i}"
        assert np.allclose(im.get_array(), x[1].abs().mean(0).numpy())
        assert im.get_extent() == pytest.approx((0, 80, 64, 0))  # both maps over the same pixels
        assert ax.get_title() == f"P{2 + i}: {list(x.shape)}"
    with pytest.raises(ValueError, match=r"draw_feature_pyramid: index 2 out of range"):
        draw_feature_pyramid(feats, index=2)


def test_parameter_bars_have_the_counts_as_widths():
    counts = {
        "big": {"backbone body": 2_000_000, "FPN": 500_000, "box head": 1_500_000},
        "small": {"backbone body": 300_000, "FPN": 0, "box head": 200_000},
    }
    fig = Figure()
    ax = fig.subplots()
    draw_parameter_counts(ax, counts)
    for model, parts in counts.items():
        left = 0.0
        for part, n in parts.items():
            bars = patches_with_gid(ax, f"{model}:{part}")
            if n == 0:
                assert bars == []
                continue
            (bar,) = bars
            assert bar.get_x() == pytest.approx(left) and bar.get_width() == pytest.approx(n / 1e6)
            left += n / 1e6
        assert f"  {left:.2f} M" in [t.get_text() for t in ax.texts]
    with pytest.raises(ValueError, match=r"draw_parameter_counts: counts\['a'\]\['b'\]"):
        draw_parameter_counts(ax, {"a": {"b": -3}})


def test_rois_by_level_colours_and_counts():
    boxes = random_boxes(60, seed=3, max_side=600.0)
    levels = tv_levels(boxes)
    fig = Figure()
    ax = fig.subplots()
    draw_rois_by_level(ax, torch.rand(3, 400, 500), boxes, max_boxes=25)
    drawn = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(drawn) == 25
    for lev in range(2, 6):
        rects = patches_with_gid(ax, f"roi_P{lev}")
        assert len(rects) == int((levels[:25] == lev).sum())  # the first 25 (best first)
        for r in rects:
            assert np.allclose(r.get_edgecolor()[:3], matplotlib.colors.to_rgb(LEVEL_COLORS[lev]))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"P{lev}: {int((levels == lev).sum())}" for lev in range(2, 6)]  # all 60


def test_centre_anchors_hand_computed():
    gen = AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    got = centre_anchors(gen, (64, 96), [(16, 24), (8, 12)])
    # level 0: stride 4, centre cell (8, 12) -> shift (x 48, y 32); level 1: stride 8, (4, 6)
    for a, sizes, (sx, sy) in zip(got, ((32,), (64,)), ((48.0, 32.0), (48.0, 32.0))):
        cell = generate_cell_anchors(sizes, (0.5, 1.0, 2.0))
        assert torch.equal(a, cell + torch.tensor([sx, sy, sx, sy]))


# ------------------------------------------------------------------------ the forward pass
@pytest.fixture(scope="module")
def tiny_model():
    """The "shapes" preset shrunk to a size that runs in a blink (same code path)."""
    cfg = get_preset("shapes")
    cfg.backbone.fpn_channels = 16
    cfg.roi_heads.representation_size = 32
    cfg.roi_heads.mask_layers = (16,)
    cfg.roi_heads.mask_dim_reduced = 16
    cfg.transform.min_size, cfg.transform.max_size = (64,), 96
    torch.manual_seed(0)
    return build_model(cfg)


def test_forward_stages_draw_every_stage(tiny_model):
    model = tiny_model.eval()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 60, 90, generator=g)
    with torch.no_grad():
        stages = model.run_stages([image])
    fig = draw_forward_stages(
        image,
        stages,
        anchor_generator=model.rpn.anchor_generator,
        num_proposals=12,
        num_detections=5,
        image_mean=model.transform.image_mean,
        image_std=model.transform.image_std,
    )
    ax_in, ax_anchor, ax_prop, ax_levels, ax_det, ax_mask = fig.axes
    # 1: the padded batch with the normalization undone
    batch = stages["images"][0]
    mean = torch.tensor(model.transform.image_mean)[:, None, None]
    std = torch.tensor(model.transform.image_std)[:, None, None]
    shown = (batch * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.allclose(ax_in.images[0].get_array(), shown, atol=1e-6)
    h, w = stages["image_sizes"][0]
    (rect,) = patches_with_gid(ax_in, "image_size")
    assert (rect.get_width(), rect.get_height()) == (w, h)
    # 2: the 3 anchors of the centre cell on each of the 5 levels
    for k in range(2, 7):
        assert len(patches_with_gid(ax_anchor, f"anchor_P{k}")) == 3
    # 3: the best 12 proposals, each in its level's colour (levels by torchvision)
    proposals = stages["proposals"][0]
    levels = tv_levels(proposals)
    for k in range(2, 6):
        assert len(patches_with_gid(ax_prop, f"roi_P{k}")) == int((levels[:12] == k).sum())
    # 4: bars count all proposals per level
    for k in range(2, 6):
        (bar,) = patches_with_gid(ax_levels, f"level_count_P{k}")
        assert bar.get_height() == int((levels == k).sum())
    # 5-6: five detections drawn as boxes; masks pasted at the original image's size
    n = min(5, len(stages["detections"][0]["boxes"]))
    assert n > 0
    assert len([p for p in ax_det.patches if isinstance(p, Rectangle)]) == n
    assert ax_mask.images[0].get_array().shape[:2] == (60, 90)


def test_forward_stages_in_train_mode_count_the_sampled_rois(tiny_model):
    model = tiny_model.train()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    target = {
        "boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]]),
        "labels": torch.tensor([2]),
        "masks": masks,
    }
    stages = model.run_stages(
        [image], [target], return_detections=True, generator=torch.Generator().manual_seed(0)
    )
    model.eval()
    fig = draw_forward_stages(image, stages, anchor_generator=model.rpn.anchor_generator)
    rois = stages["sampled_rois"][0].proposal_boxes
    levels = tv_levels(rois)
    heights = {
        k: patches_with_gid(fig.axes[3], f"level_count_P{k}")[0].get_height() for k in range(2, 6)
    }
    assert heights == {k: int((levels == k).sum()) for k in range(2, 6)}
    assert "sampled RoIs" in fig.axes[3].get_title()
    with pytest.raises(KeyError, match="draw_forward_stages: stages lacks"):
        draw_forward_stages(image, {"images": stages["images"]})


# ----------------------------------------------------------------------------- the explorer
def test_fpn_level_explorer_follows_the_sliders():
    ex = fpn_level_explorer(size=150.0, aspect=1.0)
    assert ex.level == 3
    (out,) = ex.output.outputs
    assert out["data"]["image/png"]  # a picture was drawn
    ex.controls["size"].value = 300.0  # 224 <= 300 < 448
    assert ex.level == 4
    ex.controls["aspect"].value = 4.0  # same area, other shape: same level (sqrt(wh) counts)
    assert ex.level == 4
    ex.controls["size"].value = 20.0
    assert ex.level == 2  # clamped: Eqn. (1) gives floor(0.5) = 0
    assert ex.output.outputs[0]["data"]["image/png"] != out["data"]["image/png"]
    with pytest.raises(ValueError, match="fpn_level_explorer: size 5000"):
        fpn_level_explorer(size=5000.0)

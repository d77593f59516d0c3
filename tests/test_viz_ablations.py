"""viz's drawings for notebook 08b: masks of several models on the same images against the
ground truth (best mask IoUs against pycocotools' IoU, the error layers pixel by pixel)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mrcnn_edu.viz import (
    EXTRA_COLOR,
    MISSED_COLOR,
    best_mask_ious,
    class_color,
    draw_mask_comparison,
    pick_overlapping_pair,
)


def _square(H: int, W: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def test_best_mask_ious_against_pycocotools():
    rng = np.random.default_rng(0)
    gt = (rng.random((5, 24, 20)) < 0.3).astype(np.uint8)
    pred = (rng.random((7, 24, 20)) < 0.3).astype(np.uint8)
    gl = np.array([1, 2, 3, 1, 2])
    pl = np.array([1, 1, 2, 2, 3, 1, 2])

    def rles(m: np.ndarray) -> list:  # (N, H, W) -> (H, W, N) in Fortran order, as pycocotools
        return mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))

    iou = mask_utils.iou(rles(pred), rles(gt), [0] * len(gt))  # [N, G] (pred, gt)
    want = [
        max((iou[n, g] for n in range(len(pl)) if pl[n] == gl[g]), default=0.0)
        for g in range(len(gl))
    ]
    np.testing.assert_allclose(best_mask_ious(gt, gl, pred, pl), want, rtol=1e-12)
    # [N, 1, H, W] probabilities, thresholded at 0.5; no prediction of an object's class -> 0
    probs = torch.from_numpy(pred[:, None].astype(np.float32)) * 0.6
    np.testing.assert_allclose(best_mask_ious(gt, gl, probs, pl), want, rtol=1e-12)
    np.testing.assert_array_equal(best_mask_ious(gt, gl, pred[:0], pl[:0]), np.zeros(5))
    with pytest.raises(ValueError, match="predicted masks are \\(24, 21\\)"):
        best_mask_ious(gt, gl, np.zeros((1, 24, 21)), [1])
    with pytest.raises(ValueError, match="5 gt masks but 4 gt labels"):
        best_mask_ious(gt, gl[:4], pred, pl)


def test_pick_overlapping_pair_by_hand():
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [2.0, 0.0, 12.0, 10.0], [50, 50, 60, 60]]
    )
    # IoUs: (0,1) 50/150 = 1/3, (0,2) 80/120 = 2/3 (same class: skipped), (1,2) 70/130 = 0.54
    assert pick_overlapping_pair(boxes, [1, 2, 1, 3]) == (1, 2)
    assert pick_overlapping_pair(boxes, [1, 1, 1, 2]) is None  # the only other class is apart
    assert pick_overlapping_pair(boxes[:0], []) is None
    with pytest.raises(ValueError, match="4 boxes but 3 labels"):
        pick_overlapping_pair(boxes, [1, 2, 3])


def test_mask_comparison_layers_and_titles():
    H, W = 40, 48
    gt = np.stack([_square(H, W, 10, 10, 20, 20), _square(H, W, 30, 5, 40, 15)])  # 100 px each
    target = {"masks": torch.from_numpy(gt), "labels": torch.tensor([1, 2])}
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    shifted = {  # object 1 found 3 px to the right; object 2 claimed by class 1 (wrong class)
        "masks": torch.from_numpy(np.stack([_square(H, W, 13, 10, 23, 20), gt[1]])),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.9, 0.8]),
    }
    exact = {  # both right, plus a low-scoring mask that the threshold drops
        "masks": torch.from_numpy(np.stack([gt[0], gt[1], _square(H, W, 0, 30, 48, 40)])[:, None]),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.9, 0.9, 0.2]),
    }
    fig = draw_mask_comparison(
        [image],
        [target],
        {"RoIPool": [shifted], "RoIAlign": [exact]},
        score_threshold=0.5,
        class_names=("bg", "a", "b", "c"),
    )
    axes = fig.axes
    assert len(axes) == 3
    layers = {im.get_gid(): im.get_array() for ax in axes for im in ax.images if im.get_gid()}
    err = np.asarray(layers["errors:0:RoIPool"])
    extra = np.all(np.isclose(err[..., :3], EXTRA_COLOR), -1) & (err[..., 3] > 0)
    missed = np.all(np.isclose(err[..., :3], MISSED_COLOR), -1) & (err[..., 3] > 0)
    # class 1: the mask adds columns 20..22 and object 2's pixels (not class 1): 30 + 100;
    # it misses columns 10..12 of object 1 (30 px) and class 2 is never predicted (100 px)
    want_extra = np.zeros((H, W), bool)
    want_extra[10:20, 20:23] = True
    want_extra |= gt[1].astype(bool)
    want_missed = np.zeros((H, W), bool)
    want_missed[10:20, 10:13] = True
    want_missed |= gt[1].astype(bool)
    # a pixel both added (class 1) and missed (class 2) is drawn in the later class's colour
    np.testing.assert_array_equal(extra | missed, want_extra | want_missed)
    np.testing.assert_array_equal(extra, want_extra & ~gt[1].astype(bool))
    assert np.asarray(layers["errors:0:RoIAlign"])[..., 3].max() == 0  # no error pixel at all
    # titles: object 1 IoU 70 / 130, object 2 has no class-2 mask: 0
    assert f"mean best mask IoU {(70 / 130 + 0) / 2:.2f}" in axes[1].get_title()
    assert "mean best mask IoU 1.00" in axes[2].get_title()
    # the shared pixels are filled in the class colour
    fills = [im.get_array() for im in axes[1].images if im.get_zorder() == 2]
    np.testing.assert_allclose(np.asarray(fills[0])[15, 15, :3], class_color(1), rtol=1e-6)
    plt.close(fig)

    fig = draw_mask_comparison(
        [image], [target], {"m": [exact]}, zooms=[(10, 10, 20, 20)], row_titles=["img 7"]
    )
    assert fig.axes[0].get_title().startswith("img 7: ground truth (2 objects)")
    assert fig.axes[1].get_xlim() == pytest.approx((6.0, 24.0))  # 35 % of 10 px < 4 px minimum
    plt.close(fig)


def test_mask_comparison_errors():
    H, W = 8, 8
    target = {"masks": torch.zeros(1, H, W, dtype=torch.uint8), "labels": torch.tensor([1])}
    det = {"masks": torch.zeros(1, H, W), "labels": torch.tensor([1]), "scores": torch.ones(1)}
    image = torch.zeros(3, H, W)
    with pytest.raises(ValueError, match="non-empty mapping"):
        draw_mask_comparison([image], [target], {})
    with pytest.raises(ValueError, match="detections\\['m'\\] has 2 entries for 1 images"):
        draw_mask_comparison([image], [target], {"m": [det, det]})
    with pytest.raises(ValueError, match="predicted masks are \\(8, 9\\)"):
        bad = {**det, "masks": torch.zeros(1, H, W + 1)}
        draw_mask_comparison([image], [target], {"m": [bad]})
    with pytest.raises(ValueError, match="1 masks, 2 scores"):
        draw_mask_comparison([image], [target], {"m": [{**det, "scores": torch.ones(2)}]})
    plt.close("all")

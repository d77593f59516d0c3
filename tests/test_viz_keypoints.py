"""Tests for the keypoint drawings of notebook 10 (``mrcnn_edu.viz``) and the keypoint heatmap
explorer (``mrcnn_edu.widgets.keypoints``).

What is drawn is checked against independent references: the one-hot target cells against
torchvision's ``keypoints_to_heatmap``, the predicted keypoint against torchvision's
``heatmaps_to_keypoints``, OKS against pycocotools' ``COCOeval.computeOks``, the softmax and
sigmoid maps and the tolerance radii against hand computations.
"""

from __future__ import annotations

import contextlib
import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import roi_heads as tv_roi_heads

from mrcnn_edu.data.shapes import KEYPOINT_NAMES, KEYPOINT_SIGMAS, SKELETON
from mrcnn_edu.viz import (
    draw_keypoint_heatmap,
    draw_keypoint_heatmaps,
    draw_keypoint_predictions_vs_truth,
    draw_keypoint_targets,
    draw_oks_circles,
    draw_softmax_vs_sigmoid,
    keypoint_color,
    keypoint_oks,
    oks_radius,
)
from mrcnn_edu.widgets.keypoints import keypoint_heatmap_explorer


def _image(gid: str, fig: Figure):
    found = [im for ax in fig.axes for im in ax.get_images() if im.get_gid() == gid]
    assert len(found) == 1, (gid, len(found))
    return found[0]


def _patches(fig_or_ax, gid: str) -> list:
    axes = fig_or_ax.axes if isinstance(fig_or_ax, Figure) else [fig_or_ax]
    return [p for ax in axes for p in ax.patches if p.get_gid() == gid]


def _lines(fig_or_ax, gid: str) -> list:
    axes = fig_or_ax.axes if isinstance(fig_or_ax, Figure) else [fig_or_ax]
    return [ln for ax in axes for ln in ax.get_lines() if ln.get_gid() == gid]


IMAGE = torch.rand(3, 80, 100, generator=torch.Generator().manual_seed(0))
ROI = torch.tensor([10.3, 12.7, 70.9, 60.2])
#: inside (v=2 and v=1), exactly on the right border, outside the RoI, not labelled (v=0)
KPS = torch.tensor(
    [[20.0, 20.0, 2.0], [45.5, 33.3, 1.0], [70.9, 40.0, 2.0], [90.0, 40.0, 2.0], [30.0, 30.0, 0.0]]
)
NAMES = ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------------------ targets on the RoI
def test_keypoint_targets_are_drawn_where_torchvision_puts_them() -> None:
    m = 14
    fig = draw_keypoint_targets(IMAGE, ROI, KPS, m=m, keypoint_names=NAMES, skeleton=[(1, 2)])
    index, valid = tv_roi_heads.keypoints_to_heatmap(KPS[None], ROI[None], m)
    cells = {k: divmod(int(index[0, k]), m) for k in range(len(KPS)) if valid[0, k]}
    assert sorted(cells) == [0, 1, 2]  # border kept, outside and unlabelled dropped

    picture = np.asarray(_image("keypoint_targets", fig).get_array())
    assert picture.shape == (m, m, 3)
    lit = {tuple(rc) for rc in np.argwhere(picture.any(axis=2))}
    assert lit == set(cells.values())
    for k, (row, col) in cells.items():
        np.testing.assert_allclose(picture[row, col], keypoint_color(k), rtol=1e-6)

    x1, y1, x2, y2 = ROI.tolist()
    rects = _patches(fig, "target_cell")
    assert len(rects) == len(cells)
    want = sorted(
        (x1 + col * (x2 - x1) / m, y1 + row * (y2 - y1) / m) for row, col in cells.values()
    )
    got = sorted(r.get_xy() for r in rects)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert all(r.get_width() == pytest.approx((x2 - x1) / m) for r in rects)
    (roi_box,) = _patches(fig, "roi_box")
    assert roi_box.get_xy() == pytest.approx((x1, y1))
    assert "no target: d, e" in fig._suptitle.get_text()


def test_keypoint_targets_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"draw_keypoint_targets: roi .* is empty"):
        draw_keypoint_targets(IMAGE, [10.0, 10.0, 10.0, 20.0], KPS)
    with pytest.raises(ValueError, match=r"keypoints must be \[K, 3\]"):
        draw_keypoint_targets(IMAGE, ROI, KPS[:, :2])
    with pytest.raises(ValueError, match="keypoint_names has 2 names for 5 keypoints"):
        draw_keypoint_targets(IMAGE, ROI, KPS, keypoint_names=["a", "b"])
    with pytest.raises(ValueError, match=r"skeleton pair \(1, 9\) is out of range"):
        draw_keypoint_targets(IMAGE, ROI, KPS, skeleton=[(1, 9)])


# ----------------------------------------------------------------- softmax vs per-pixel sigmoid
def test_softmax_and_sigmoid_maps_are_the_hand_computed_probabilities() -> None:
    z = torch.randn(7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fig = draw_softmax_vs_sigmoid(z, target=10)
    zn = z.numpy()
    soft = np.exp(zn - zn.max()) / np.exp(zn - zn.max()).sum()
    sig = 1.0 / (1.0 + np.exp(-zn))
    np.testing.assert_allclose(_image("softmax_map", fig).get_array(), soft, rtol=1e-12)
    np.testing.assert_allclose(_image("sigmoid_map", fig).get_array(), sig, rtol=1e-12)
    assert float(np.sum(_image("softmax_map", fig).get_array())) == pytest.approx(1.0)
    row, col = divmod(10, 7)
    rings = _patches(fig, "target_pixel")
    assert len(rings) == 2 and all(r.center == pytest.approx((col + 0.5, row + 0.5)) for r in rings)
    assert f"at the target {soft[row, col]:.3g}" in _image("softmax_map", fig).axes.get_title()
    assert f"sum {sig.sum():.3g}" in _image("sigmoid_map", fig).axes.get_title()
    same = draw_softmax_vs_sigmoid(z, target=(row, col))  # (row, col) means the same pixel
    assert _patches(same, "target_pixel")[0].center == rings[0].center
    with pytest.raises(ValueError, match=r"one square \[m, m\] heatmap"):
        draw_softmax_vs_sigmoid(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"target \(7, 0\) is outside the 7 x 7 heatmap"):
        draw_softmax_vs_sigmoid(z, target=49)


def test_all_heatmaps_of_a_roi_as_softmax_pictures() -> None:
    maps = torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(2))
    fig = draw_keypoint_heatmaps(maps, keypoint_names=NAMES, targets=[0, 7, -1, 35, 3], ncols=3)
    for k in range(5):
        p = np.asarray(_image(f"heatmap_{k}", fig).get_array())
        want = torch.softmax(maps[k].double().reshape(-1), 0).reshape(6, 6).numpy()
        np.testing.assert_allclose(p, want, rtol=1e-12)
        ax = fig.axes[k]
        (plus,) = ax.get_lines()
        row, col = divmod(int(maps[k].argmax()), 6)
        assert (plus.get_xdata()[0], plus.get_ydata()[0]) == (col + 0.5, row + 0.5)
        assert len([p for p in ax.patches if isinstance(p, Circle)]) == (0 if k == 2 else 1)
        assert ax.get_title().startswith(NAMES[k])
    assert not fig.axes[5].axison  # 5 panels on a 2 x 3 grid: the last one is empty
    with pytest.raises(ValueError, match="targets has 2 entries for 5 heatmaps"):
        draw_keypoint_heatmaps(maps, targets=[0, 1])


# -------------------------------------------------------------------- a heatmap over its box
def test_heatmap_overlay_and_keypoint_match_torchvision_postprocessing() -> None:
    K, m = 4, 12
    maps = torch.randn(K, m, m, generator=torch.Generator().manual_seed(3))
    box = torch.tensor([15.2, 8.9, 61.7, 70.3])
    gt = torch.tensor([30.0, 40.0, 2.0])
    tv_kps, tv_scores = tv_roi_heads.heatmaps_to_keypoints(maps[None], box[None])
    for k in range(K):
        fig = draw_keypoint_heatmap(
            IMAGE, box, maps, k, keypoint_names=NAMES[:K], gt_keypoint=gt, skeleton=[(1, 2), (2, 3)]
        )
        (pred,) = _lines(fig, "pred_keypoint")
        xy = (pred.get_xdata()[0], pred.get_ydata()[0])
        assert xy == pytest.approx(tuple(tv_kps[0, k, :2].tolist()), abs=1e-5)
        over = _image("heatmap_overlay", fig)
        assert over.get_extent() == pytest.approx([15.2, 61.7, 70.3, 8.9])
        alpha = np.asarray(over.get_array())[..., 3]
        p = torch.softmax(maps[k].double().reshape(-1), 0).reshape(m, m).numpy()
        np.testing.assert_allclose(alpha, 0.25 + 0.65 * np.sqrt(p / p.max()), rtol=1e-6)
        np.testing.assert_array_equal(_image("heatmap_logits", fig).get_array(), maps[k].numpy())
        (ring,) = _lines(fig, "gt_keypoint")
        assert (ring.get_xdata()[0], ring.get_ydata()[0]) == (30.0, 40.0)
        assert (
            f"score {float(tv_scores[0, k]):.2f}" in _image("heatmap_logits", fig).axes.get_title()
        )
    unlabelled = draw_keypoint_heatmap(IMAGE, box, maps, 0, gt_keypoint=[30.0, 40.0, 0.0])
    assert not _lines(unlabelled, "gt_keypoint")
    with pytest.raises(ValueError, match=r"k must lie in \[0, 4\), got 4"):
        draw_keypoint_heatmap(IMAGE, box, maps, 4)
    with pytest.raises(ValueError, match=r"heatmaps must be \[K, m, m\]"):
        draw_keypoint_heatmap(IMAGE, box, maps[0], 0)
    # the stick-figures preset's decoding: the sub-pixel keypoint, by the same function
    from mrcnn_edu.heads import heatmaps_to_keypoints_subpixel

    sub_kps, _ = heatmaps_to_keypoints_subpixel(maps[None], box[None])
    fig = draw_keypoint_heatmap(IMAGE, box, maps, 1, decoding="subpixel")
    (pred,) = _lines(fig, "pred_keypoint")
    xy = (pred.get_xdata()[0], pred.get_ydata()[0])
    assert xy == pytest.approx(tuple(sub_kps[0, 1, :2].tolist()), abs=1e-5)
    assert xy != pytest.approx(tuple(tv_kps[0, 1, :2].tolist()), abs=1e-3)
    with pytest.raises(
        ValueError, match="decoding must be one of torchvision, subpixel, got 'dark'"
    ):
        draw_keypoint_heatmap(IMAGE, box, maps, 0, decoding="dark")


# ------------------------------------------------------------------------------------- OKS
def _cocoeval_oks(gt_kps: np.ndarray, area: float, dts: list[np.ndarray], sigmas) -> np.ndarray:
    """COCOeval.computeOks for one gt object and several detections (score order kept)."""
    x, y = gt_kps[gt_kps[:, 2] > 0, 0], gt_kps[gt_kps[:, 2] > 0, 1]
    bbox = [float(x.min()), float(y.min()), float(x.max() - x.min()), float(y.max() - y.min())]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "categories": [{"id": 1, "name": "person", "keypoints": NAMES}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": area,
                "bbox": bbox,
                "num_keypoints": int((gt_kps[:, 2] > 0).sum()),
                "keypoints": gt_kps.reshape(-1).tolist(),
            }
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(
            [
                {
                    "image_id": 1,
                    "category_id": 1,
                    "score": 1.0 - 0.1 * i,
                    "keypoints": d.reshape(-1).tolist(),
                }
                for i, d in enumerate(dts)
            ]
        )
    E = COCOeval(gt, dt, iouType="keypoints")
    E.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
    E.params.imgIds = [1]
    E._prepare()
    return np.asarray(E.computeOks(1, 1))[:, 0]  # [D, G=1] -> [D]


def test_oks_equals_cocoeval() -> None:
    g = torch.Generator().manual_seed(4)
    K = len(KEYPOINT_NAMES)
    gt = np.concatenate(
        [40 + 100 * torch.rand(K, 2, generator=g).numpy(), np.full((K, 1), 2.0)], axis=1
    )
    gt[3, 2], gt[7] = 1.0, 0.0  # one occluded (counts), one not labelled (does not)
    area = 2345.6
    dts = []
    for scale in (0.5, 3.0, 8.0):
        d = gt.copy()
        d[:, :2] += scale * torch.randn(K, 2, generator=g).numpy()
        d[:, 2] = 1.0
        dts.append(d)
    want = _cocoeval_oks(gt, area, dts, KEYPOINT_SIGMAS)
    got = [keypoint_oks(d, gt, area, KEYPOINT_SIGMAS)[0] for d in dts]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] > got[1] > got[2]
    _, sim = keypoint_oks(dts[0][:, :2], gt, area, KEYPOINT_SIGMAS)  # [K, 2] works too
    assert math.isnan(sim[7]) and np.all(sim[np.arange(K) != 7] <= 1.0)

    # on the radius of threshold t every keypoint's similarity is t (by hand: the formula)
    for t in (0.5, 0.75, 0.95):
        moved = gt.copy()
        radii = [oks_radius(s, area, t) for s in KEYPOINT_SIGMAS]
        assert radii[0] == pytest.approx(2 * 0.026 * math.sqrt(2 * area * math.log(1 / t)))
        moved[:, 0] += radii
        oks, sim = keypoint_oks(moved, gt, area, KEYPOINT_SIGMAS)
        np.testing.assert_allclose(sim[gt[:, 2] > 0], t, rtol=1e-9)
        assert oks == pytest.approx(t, rel=1e-9)
    with pytest.raises(ValueError, match="no labelled keypoint"):
        keypoint_oks(gt, np.zeros((K, 3)), area, KEYPOINT_SIGMAS)
    with pytest.raises(ValueError, match="sigmas must be 11 positive numbers"):
        keypoint_oks(gt, gt, area, KEYPOINT_SIGMAS[:3])
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\)"):
        oks_radius(0.05, area, 1.0)


def test_oks_circles_have_the_tolerance_radii() -> None:
    K = len(KEYPOINT_NAMES)
    gt = np.concatenate(
        [np.linspace(20, 60, K)[:, None], np.linspace(10, 70, K)[:, None], np.full((K, 1), 2.0)],
        axis=1,
    )
    gt[5, 2] = 0.0
    area = 900.0
    pred = gt[:, :2] + 1.5
    fig, ax = plt.subplots()
    try:
        draw_oks_circles(
            ax,
            IMAGE,
            gt,
            area,
            KEYPOINT_SIGMAS,
            pred_keypoints=pred,
            thresholds=(0.75, 0.5),
            keypoint_names=KEYPOINT_NAMES,
            skeleton=SKELETON,
        )
        for t in (0.5, 0.75):
            circles = [p for p in ax.patches if p.get_gid().startswith(f"oks_{t:.2f}_")]
            assert sorted(int(c.get_gid().rsplit("_", 1)[1]) for c in circles) == [
                k for k in range(K) if k != 5
            ]
            for c in circles:
                k = int(c.get_gid().rsplit("_", 1)[1])
                assert c.center == pytest.approx((gt[k, 0], gt[k, 1]))
                assert c.radius == pytest.approx(
                    2 * KEYPOINT_SIGMAS[k] * math.sqrt(2 * area * math.log(1 / t))
                )
        (marks,) = _lines(ax, "pred_keypoint")
        assert len(marks.get_xdata()) == K - 1  # only where the gt keypoint is labelled
        oks, _ = keypoint_oks(pred, gt, area, KEYPOINT_SIGMAS)
        assert f"OKS {oks:.3f}" in ax.get_title()
    finally:
        plt.close(fig)


# ----------------------------------------------------------------- skeletons on predictions
def test_predictions_vs_truth_draw_skeletons_above_the_threshold() -> None:
    K = 3
    skeleton = [(1, 2), (2, 3)]
    gt_kps = torch.tensor(
        [
            [[10.0, 10.0, 2.0], [20.0, 20.0, 1.0], [0.0, 0.0, 0.0]],
            [[40.0, 40.0, 2.0], [50.0, 45.0, 2.0], [60.0, 60.0, 2.0]],
        ]
    )
    target = {
        "boxes": torch.tensor([[5.0, 5.0, 25.0, 25.0], [35.0, 35.0, 65.0, 65.0]]),
        "labels": torch.tensor([1, 1]),
        "keypoints": gt_kps,
    }
    det = {
        "boxes": torch.tensor(
            [[5.0, 5.0, 25.0, 25.0], [35.0, 35.0, 65.0, 65.0], [1.0, 1.0, 9.0, 9.0]]
        ),
        "labels": torch.tensor([1, 1, 1]),
        "scores": torch.tensor([0.9, 0.6, 0.2]),
        "keypoints": torch.cat([gt_kps[:, :, :2] + 1, torch.ones(2, K, 1)], dim=2)[[0, 1, 1]],
    }
    fig = draw_keypoint_predictions_vs_truth(
        [IMAGE], [det], [target], skeleton=skeleton, class_names=["bg", "person"]
    )
    try:
        left, right = fig.axes
        # gt: person 0 has one limb with both ends labelled, person 1 both limbs
        assert len(left.get_lines()) == 1 + 2
        # predictions: scores 0.9 and 0.6 drawn (2 boxes, every keypoint found: 2 limbs each)
        assert len([p for p in right.patches if isinstance(p, Rectangle)]) == 2
        assert len(right.get_lines()) == 2 * 2
        with pytest.raises(ValueError, match=r"detections\[0\] has no 'keypoints'"):
            draw_keypoint_predictions_vs_truth(
                [IMAGE], [{k: v for k, v in det.items() if k != "keypoints"}], [target]
            )
    finally:
        plt.close("all")


# --------------------------------------------------------------------------------- explorer
def test_heatmap_explorer_redraws_on_each_choice() -> None:
    D, K, m = 2, 3, 8
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [40.0, 20.0, 90.0, 70.0]])
    maps = torch.randn(D, K, m, m, generator=torch.Generator().manual_seed(5))
    gt = torch.zeros(D, K, 3)
    gt[0, :, :2], gt[0, :, 2] = 30.0, 2.0
    explorer = keypoint_heatmap_explorer(
        IMAGE,
        boxes,
        maps,
        scores=torch.tensor([0.9, 0.4]),
        keypoint_names=NAMES[:K],
        gt_keypoints=gt,
        skeleton=[(1, 2)],
    )
    person, keypoint = explorer.controls["person"], explorer.controls["keypoint"]
    assert [label for label, _ in person.options] == [
        "person 0 (score 0.90)",
        "person 1 (score 0.40)",
    ]
    assert [label for label, _ in keypoint.options] == NAMES[:K]
    pictures = []
    for i, k in ((0, 0), (0, 2), (1, 2)):
        person.value, keypoint.value = i, k
        (out,) = explorer.output.outputs
        assert out["output_type"] == "display_data" and out["data"]["image/png"]
        pictures.append(out["data"]["image/png"])
    assert len(set(pictures)) == 3  # every choice drew a different figure
    with pytest.raises(ValueError, match=r"heatmaps must be \[D, K, m, m\] with D = 2"):
        keypoint_heatmap_explorer(IMAGE, boxes, maps[:1])
    with pytest.raises(ValueError, match=r"gt_keypoints must be \[2, 3, 3\]"):
        keypoint_heatmap_explorer(IMAGE, boxes, maps, gt_keypoints=gt[:, :2])
    with pytest.raises(ValueError, match="boxes must be"):
        keypoint_heatmap_explorer(IMAGE, torch.zeros(0, 4), maps)

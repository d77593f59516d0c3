"""Tests for notebook 08's drawings (``mrcnn_edu.viz``: one detection judged at AP50 / AP75, the
gallery of matches and failures) and its live loss plot (``mrcnn_edu.widgets.training``).

The IoU written on a picture is read back and compared with torchvision's ``box_iou`` and
pycocotools' ``mask.iou``; the gallery's matching is compared with the matches ``COCOeval``
itself records (``evalImgs[...]["dtMatches"]``); the live plot with the rows ``engine.train``
logs.
"""

from __future__ import annotations

import contextlib
import io
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torchvision.ops import box_iou as tv_box_iou

from mrcnn_edu.viz import (
    GalleryEntry,
    box_pair_iou,
    collect_gallery,
    draw_ap_thresholds,
    draw_gallery,
    draw_iou_match,
    mask_pair_iou,
)
from mrcnn_edu.widgets.training import LiveLossPlot

H = W = 64


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def box_mask(box, h: int = H, w: int = W) -> np.ndarray:
    """[h, w] uint8: 1 on the pixels whose centres lie inside ``box`` (integer boxes: exact)."""
    x1, y1, x2, y2 = box
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return ((xs > x1) & (xs < x2) & (ys > y1) & (ys < y2)).astype(np.uint8)


def disc(cx: float, cy: float, r: float, h: int = H, w: int = W) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    return ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r).astype(np.uint8)


def coco_mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    rle = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in (a, b)]
    return float(mask_utils.iou([rle[0]], [rle[1]], [0])[0, 0])


def written_iou(ax) -> float:
    texts = [t for t in ax.texts if t.get_gid() == "iou_text"]
    assert len(texts) == 1, [t.get_text() for t in ax.texts]
    match = re.fullmatch(r"IoU (\d\.\d{3})", texts[0].get_text())
    assert match, texts[0].get_text()
    return float(match.group(1))


def image():
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ IoU
def test_pair_ious_equal_torchvision_and_pycocotools():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(200, 2, generator=g) * 40
    a = torch.cat([xy, xy + 1 + torch.rand(200, 2, generator=g) * 30], 1)
    b = a + (torch.rand(200, 4, generator=g) - 0.5) * 20
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 0.5)
    tv = tv_box_iou(a.double(), b.double()).diagonal()
    ours = torch.tensor([box_pair_iou(p, q) for p, q in zip(a, b)], dtype=torch.float64)
    torch.testing.assert_close(ours, tv, rtol=0, atol=1e-6)
    assert box_pair_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_pair_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)  # 50 / 150

    for seed in range(5):
        r = np.random.default_rng(seed)
        m1 = disc(*r.uniform(15, 45, 2), r.uniform(5, 15))
        m2 = disc(*r.uniform(15, 45, 2), r.uniform(5, 15))
        assert mask_pair_iou(m1, m2) == pytest.approx(coco_mask_iou(m1, m2), abs=1e-12)
    probs = torch.from_numpy(disc(30, 30, 10)).float()[None] * 0.7  # [1, H, W] probabilities
    assert mask_pair_iou(probs, disc(30, 30, 10)) == 1.0
    assert mask_pair_iou(probs, disc(30, 30, 10), threshold=0.8) == 0.0  # nothing reaches 0.8
    assert mask_pair_iou(np.zeros((H, W)), np.zeros((H, W))) == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        mask_pair_iou(np.zeros((4, 4)), np.zeros((4, 5)))


# ------------------------------------------------------------------------------ one match
@pytest.mark.parametrize(
    "shift,threshold,passes",
    [(4.0, 0.5, True), (4.0, 0.75, False), (1.0, 0.75, True), (12.0, 0.5, False)],
)
def test_draw_iou_match_box_writes_torchvision_iou_and_judges_it(shift, threshold, passes):
    gt = torch.tensor([[10.0, 12.0, 40.0, 44.0]])
    pred = gt + torch.tensor([[shift, shift / 2, shift, shift / 2]])
    _, ax = plt.subplots()
    draw_iou_match(ax, image(), pred[0], gt[0], threshold=threshold, zoom=None)
    expected = float(tv_box_iou(pred, gt)[0, 0])
    assert written_iou(ax) == pytest.approx(expected, abs=5e-4)
    assert (expected >= threshold) == passes
    assert ("true positive" in ax.get_title()) == passes
    pred_patch = [p for p in ax.patches if p.get_gid() == "pred_box"]
    gt_patch = [p for p in ax.patches if p.get_gid() == "gt_box"]
    assert len(pred_patch) == len(gt_patch) == 1
    assert pred_patch[0].get_xy() == pytest.approx(tuple(pred[0, :2].tolist()))
    # the yellow intersection has the area of the IoU's numerator
    inter = [p for p in ax.patches if p.get_gid() == "intersection"]
    area = inter[0].get_width() * inter[0].get_height()
    gw, gh = 30.0, 32.0
    pw, ph = pred[0, 2] - pred[0, 0], pred[0, 3] - pred[0, 1]
    assert area / (gw * gh + float(pw * ph) - area) == pytest.approx(expected, abs=1e-6)


def test_draw_iou_match_mask_writes_pycocotools_iou():
    gt_mask, pred_mask = disc(30, 30, 12), disc(35, 33, 11)
    expected = coco_mask_iou(pred_mask, gt_mask)
    assert 0.5 < expected < 0.75  # passes AP50's threshold, fails AP75's
    pred_box = [24, 22, 46, 44]
    gt_box = [18, 18, 42, 42]
    fig = draw_ap_thresholds(
        image(), pred_box, gt_box, pred_mask=pred_mask[None], gt_mask=torch.from_numpy(gt_mask)
    )
    axes = [a for a in fig.axes if a.texts]
    assert len(axes) == 4  # rows bbox, segm; columns 0.5, 0.75
    box_expected = float(
        tv_box_iou(torch.tensor([pred_box]).float(), torch.tensor([gt_box]).float())[0, 0]
    )
    assert written_iou(axes[0]) == written_iou(axes[1]) == pytest.approx(box_expected, abs=5e-4)
    assert written_iou(axes[2]) == written_iou(axes[3]) == pytest.approx(expected, abs=5e-4)
    assert "true positive" in axes[2].get_title() and "0.5" in axes[2].get_title()
    assert "false positive" in axes[3].get_title() and "0.75" in axes[3].get_title()


def test_draw_iou_match_bad_input():
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="kind"):
        draw_iou_match(ax, image(), [0, 0, 5, 5], [0, 0, 5, 5], kind="keypoints")
    with pytest.raises(ValueError, match="pred_mask and gt_mask"):
        draw_iou_match(ax, image(), [0, 0, 5, 5], [0, 0, 5, 5], kind="segm")
    with pytest.raises(ValueError, match="like the image"):
        draw_iou_match(
            ax,
            image(),
            [0, 0, 5, 5],
            [0, 0, 5, 5],
            kind="segm",
            pred_mask=np.zeros((8, 8)),
            gt_mask=np.zeros((8, 8)),
        )
    with pytest.raises(ValueError, match="threshold"):
        draw_iou_match(ax, image(), [0, 0, 5, 5], [0, 0, 5, 5], threshold=1.5)


# -------------------------------------------------------------------------------- gallery
def detection(boxes, labels, scores, masks):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "masks": torch.from_numpy(np.stack(masks)).float()[:, None] * 0.9,
    }  # [N, 1, H, W]


def target(boxes, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack([box_mask(b) for b in boxes])),
    }


def hand_case():
    """Image 0: gt 0 found exactly (and found again, lower score: a duplicate), gt 1 found by a
    shifted box with a poor mask, gt 2 missed, one detection of a class that is not there, one
    below the score threshold. Image 1: its only object found with a fair mask."""
    gts = [
        target([[4, 4, 20, 20], [30, 6, 50, 26], [8, 40, 24, 58]], [1, 2, 3]),
        target([[10, 10, 40, 40]], [2]),
    ]
    dets = [
        detection(
            [[4, 4, 20, 20], [34, 8, 54, 28], [5, 4, 20, 21], [40, 40, 60, 60], [8, 40, 24, 58]],
            [1, 2, 1, 2, 3],
            [0.95, 0.9, 0.8, 0.7, 0.3],
            [
                box_mask([4, 4, 20, 20]),
                box_mask([34, 8, 44, 28]),
                box_mask([5, 4, 20, 21]),
                box_mask([40, 40, 60, 60]),
                box_mask([8, 40, 24, 58]),
            ],
        ),
        detection([[12, 10, 42, 40]], [2], [0.99], [box_mask([16, 10, 42, 36])]),
    ]
    return dets, gts


def test_collect_gallery_hand_case():
    dets, gts = hand_case()
    entries = collect_gallery(dets, gts, score_threshold=0.5)
    got = {(e.image_index, e.kind, e.det_index, e.gt_index) for e in entries}
    assert got == {
        (0, "match", 0, 0),
        (0, "match", 1, 1),
        (0, "false positive", 2, None),
        (0, "false positive", 3, None),
        (0, "missed", None, 2),
        (1, "match", 0, 0),
    }
    by = {(e.image_index, e.det_index, e.gt_index): e for e in entries}
    assert by[(0, 0, 0)].mask_iou == 1.0 and by[(0, 0, 0)].verdict == "good mask"
    poor = by[(0, 1, 1)]
    assert poor.box_iou == pytest.approx(
        float(tv_box_iou(dets[0]["boxes"][1:2], gts[0]["boxes"][1:2])[0, 0])
    )
    assert poor.box_iou >= 0.5 and poor.verdict == "poor mask"
    assert poor.mask_iou == pytest.approx(
        coco_mask_iou(box_mask([34, 8, 44, 28]), box_mask([30, 6, 50, 26]))
    )
    fair = by[(1, 0, 0)]
    assert fair.mask_iou == pytest.approx(
        coco_mask_iou(box_mask([16, 10, 42, 36]), box_mask([10, 10, 40, 40]))
    )
    assert fair.verdict == "fair mask"
    duplicate = by[(0, 2, None)]
    assert duplicate.best_iou > 0.8 and duplicate.mask_iou == 0.0  # overlaps a claimed object
    assert by[(0, None, 2)].best_iou == 0.0  # the class-3 detection scored below 0.5
    # sorted by mask IoU, worst first; ties: false positives, then missed
    ious = [e.mask_iou for e in entries]
    assert ious == sorted(ious)
    assert [e.kind for e in entries[:3]] == ["false positive", "false positive", "missed"]
    assert entries[-1].mask_iou == 1.0
    # a lower threshold lets the class-3 detection find gt 2
    low = collect_gallery(dets, gts, score_threshold=0.2)
    assert not [e for e in low if e.kind == "missed"]


def test_collect_gallery_matches_as_cocoeval():
    """Random detections on random objects: the matches are the ones COCOeval records."""
    rng = np.random.default_rng(0)
    images, dets, gts = [], [], []
    for _ in range(6):
        G = int(rng.integers(1, 5))
        xy = rng.uniform(0, 40, (G, 2)).round()
        gb = np.concatenate([xy, xy + rng.uniform(8, 22, (G, 2)).round()], 1).clip(0, W)
        gl = rng.integers(1, 3, G)
        D = int(rng.integers(0, 7))
        src = rng.integers(0, G, D)
        db = gb[src] + rng.normal(0, 3, (D, 4))
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 2)
        dl = np.where(rng.random(D) < 0.8, gl[src], 3 - gl[src])
        ds = rng.uniform(0.5, 1.0, D)
        gts.append(target(gb.tolist(), gl.tolist()))
        dets.append(
            detection(
                db.tolist() if D else np.zeros((0, 4)),
                dl.tolist(),
                ds.tolist(),
                [box_mask(b) for b in db] or [np.zeros((H, W))],
            )
        )
        if not D:
            dets[-1]["masks"] = dets[-1]["masks"][:0]
        images.append(image())
    # COCO ground truth and results, one category per label; ann id = 1000 * image + gt index
    anns, results = [], []
    for i, (t, d) in enumerate(zip(gts, dets)):
        for g, (b, lab) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist())):
            x1, y1, x2, y2 = b
            anns.append(
                {
                    "id": 1000 * i + g + 1,
                    "image_id": i + 1,
                    "category_id": lab,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for j, (b, lab, s) in enumerate(
            zip(d["boxes"].tolist(), d["labels"].tolist(), d["scores"].tolist())
        ):
            x1, y1, x2, y2 = b
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": lab,
                    "score": s,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "det": (i, j),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i + 1, "height": H, "width": W} for i in range(len(gts))],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": anns,
        }
        gt.createIndex()
        dt = gt.loadRes([{k: v for k, v in r.items() if k != "det"} for r in results])
        ev = COCOeval(gt, dt, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.evaluate()
    # COCOeval numbers results 1..R in the order given
    det_of_result = {k + 1: r["det"] for k, r in enumerate(results)}
    coco_matches = set()
    for e in ev.evalImgs:
        if e is None or e["aRng"] != [0, 1e10]:
            continue
        for dt_id, gt_id in zip(e["dtIds"], e["dtMatches"][0]):
            i, j = det_of_result[dt_id]
            coco_matches.add((i, j, int(gt_id) - 1000 * i - 1 if gt_id else None))
    ours = {
        (e.image_index, e.det_index, e.gt_index)
        for e in collect_gallery(dets, gts, score_threshold=0.0)
        if e.kind != "missed"
    }
    assert ours == coco_matches
    assert any(g is not None for *_, g in ours) and any(g is None for *_, g in ours)


def test_draw_gallery_titles_follow_the_sorted_entries():
    dets, gts = hand_case()
    images = [image(), image()]
    entries = collect_gallery(dets, gts)
    fig = draw_gallery(
        images, entries, dets, gts, class_names=["bg", "square", "circle", "tri"], ncols=4
    )
    panels = [ax for ax in fig.axes if (ax.get_gid() or "").startswith("gallery_")]
    assert [ax.get_gid() for ax in panels] == [f"gallery_{k}" for k in range(len(entries))]
    written = [float(re.search(r"mask IoU (\d\.\d{3})", ax.get_title()).group(1)) for ax in panels]
    assert written == sorted(written)
    assert written == pytest.approx([e.mask_iou for e in entries], abs=5e-4)
    for ax, e in zip(panels, entries):
        assert ax.get_title().startswith(f"{panels.index(ax) + 1}. {e.verdict}")
        # a missed object shows no predicted box; every other entry shows its detection's
        boxes = [p for p in ax.patches if p.get_gid() == "pred_box"]
        assert len(boxes) == (0 if e.kind == "missed" else 1)
    with pytest.raises(ValueError, match="no entries"):
        draw_gallery(images, [], dets, gts)
    bad = GalleryEntry(5, "missed", 1, None, 0, None, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="image 5"):
        draw_gallery(images, [bad], dets, gts)


def test_collect_gallery_bad_input():
    dets, gts = hand_case()
    with pytest.raises(ValueError, match="one of each"):
        collect_gallery(dets, gts[:1])
    with pytest.raises(ValueError, match="lacks"):
        collect_gallery([{k: v for k, v in dets[0].items() if k != "masks"}], gts[:1])


# ------------------------------------------------------------------------------ live plot
class TwoLosses(nn.Module):
    """One weight, two named losses: (w - 1)^2 and 0.1 (w + 1)^2."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0))

    def forward(self, images, targets=None):
        return [], {"loss_a": (self.w - 1) ** 2, "loss_b": 0.1 * (self.w + 1) ** 2}


def test_live_loss_plot_draws_the_rows_train_logs():
    from mrcnn_edu.engine.train import train

    shown = []
    live = LiveLossPlot(title="toy", min_interval_s=0.0, display=shown.append)
    model = TwoLosses()
    batches = [([torch.zeros(3, 4, 4)], [{"boxes": torch.zeros(0, 4)}])]
    result = train(
        model,
        batches,
        torch.optim.SGD(model.parameters(), lr=0.05),
        steps=7,
        log_every=2,
        progress=False,
        callbacks=[live],
    )
    assert [r["step"] for r in live.rows] == [2, 4, 6, 7] == [r["step"] for r in result.history]
    assert live.redraws == len(shown) == 4 and shown[-1] == live.png
    assert live.png.startswith(b"\x89PNG")
    ax = live.figure.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"loss_a", "loss_b", "total"}
    for name, key in (("loss_a", "loss_a"), ("loss_b", "loss_b"), ("total", "loss")):
        np.testing.assert_allclose(lines[name].get_ydata(), [r[key] for r in result.history])
        np.testing.assert_allclose(lines[name].get_xdata(), [2, 4, 6, 7])
    assert "step 7" in ax.get_title()


def test_live_loss_plot_throttles_and_finish_draws_everything():
    shown = []
    live = LiveLossPlot(min_interval_s=1e6, display=shown.append)
    live.show()  # the empty plot
    for s in range(1, 6):
        live.on_log(s, {"step": s, "loss": 1.0 / s, "loss_x": 0.5 / s})
    assert live.redraws == 1  # the throttle held back every row
    live.finish()
    assert live.redraws == 2 and len(shown) == 2
    total = [line for line in live.figure.axes[0].get_lines() if line.get_label() == "total"]
    np.testing.assert_allclose(total[0].get_xdata(), [1, 2, 3, 4, 5])
    with pytest.raises(KeyError, match="no 'step'"):
        live.on_log(6, {"loss": 1.0})
    with pytest.raises(ValueError, match="min_interval_s"):
        LiveLossPlot(min_interval_s=-1)

"""Tests for the RoI-head drawings of notebooks 05 and 06 (``mrcnn_edu.viz``) and the mask target
explorer (``mrcnn_edu.widgets.mask_targets``).

What is drawn is checked against independent references: the sampled RoIs against the boxes and
labels they were given, NMS survivors against ``torchvision.ops.batched_nms``, mask targets and
RoI crops against torchvision's ``project_masks_on_boxes`` and ``roi_align``, pasted masks against
torchvision's ``paste_masks_in_image``, and IoUs against hand computations.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision
from matplotlib.figure import Figure
from torchvision.models.detection import roi_heads as tv_roi_heads

from mrcnn_edu import viz
from mrcnn_edu.viz import (
    class_color,
    draw_mask_probs,
    draw_mask_target,
    draw_nms_result,
    draw_paste_steps,
    draw_sampled_rois,
)
from mrcnn_edu.widgets.mask_targets import mask_target_explorer


def _rects(ax, gid):
    return [p for p in ax.patches if p.get_gid() == gid]


def _xyxy(rect):
    x, y = rect.get_xy()
    return [x, y, x + rect.get_width(), y + rect.get_height()]


def _images(fig, gid):
    return [im for ax in fig.get_axes() for im in ax.get_images() if im.get_gid() == gid]


def _scene(seed=0, size=64):
    """An image with two overlapping objects of different classes: masks, boxes, labels."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    circle = (xx - 38) ** 2 + (yy - 36) ** 2 < 13**2
    square = (xx > 8) & (xx < 36) & (yy > 10) & (yy < 40) & ~circle
    masks = torch.stack([square, circle]).to(torch.uint8)  # [2, H, W]
    boxes = []
    for m in masks:
        ys, xs = torch.where(m.bool())
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return image, masks, torch.tensor(boxes, dtype=torch.float32), torch.tensor([1, 2])


def test_new_drawings_are_exported():
    for name in (
        "draw_sampled_rois",
        "draw_nms_result",
        "draw_mask_target",
        "draw_mask_probs",
        "draw_paste_steps",
    ):
        assert name in viz.__all__ and callable(getattr(viz, name))


# ------------------------------------------------------------------------ notebook 05 drawings
def test_sampled_rois_drawn_where_and_as_sampled():
    from mrcnn_edu.heads import sample_proposals
    from mrcnn_edu.matching import BalancedSampler

    image, _, gt_boxes, gt_labels = _scene()
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=g) * 40
    proposals = torch.cat([xy, xy + 8 + torch.rand(60, 2, generator=g) * 20], dim=1)
    proposals = torch.cat([proposals, gt_boxes + 1.0, gt_boxes - 0.5])  # some positives
    rois, _, labels, _ = (
        x[0]
        for x in sample_proposals(
            [proposals], [gt_boxes], [gt_labels], sampler=BalancedSampler(32, 0.25), generator=g
        )
    )
    from_gt = (rois[:, None] == gt_boxes[None]).all(-1).any(-1)
    assert from_gt.any() and (labels > 0).any() and (labels == 0).sum() > 5

    ax = Figure().add_subplot()
    draw_sampled_rois(
        ax, image, rois, labels, gt_boxes=gt_boxes, class_names=("bg", "a", "b"), max_negatives=5
    )
    # appended gt boxes: white dashed at exactly the gt coordinates
    gt_drawn = sorted(_xyxy(r) for r in _rects(ax, "gt_roi"))
    assert gt_drawn == sorted(rois[from_gt].tolist())
    # other positives: at their coordinates, in their class colour
    want = [(b, class_color(c)) for b, c in zip(rois.tolist(), labels.tolist())]
    want = sorted((b, col) for (b, col), gt, c in zip(want, from_gt, labels) if c > 0 and not gt)
    got = sorted((_xyxy(r), tuple(r.get_edgecolor()[:3])) for r in _rects(ax, "positive_roi"))
    assert len(got) == len(want) > 0
    np.testing.assert_allclose([b for b, _ in got], [b for b, _ in want], atol=1e-4)
    np.testing.assert_allclose([c for _, c in got], [c for _, c in want])
    # negatives: at most max_negatives drawn, every one a negative RoI; all counted in the legend
    negs = [_xyxy(r) for r in _rects(ax, "negative_roi")]
    assert len(negs) == 5
    neg_boxes = rois[labels == 0].tolist()
    assert all(any(np.allclose(n, b) for b in neg_boxes) for n in negs)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"negative ({int((labels == 0).sum())}, 5 drawn)" in legend
    assert f"gt box appended, sampled ({int(from_gt.sum())})" in legend
    n_pos = int((labels > 0).sum())
    assert ax.get_title() == f"{n_pos} positive : {int((labels == 0).sum())} negative RoIs"


def test_sampled_rois_bad_input_is_named():
    image, _, gt_boxes, _ = _scene()
    ax = Figure().add_subplot()
    with pytest.raises(ValueError, match="draw_sampled_rois: labels has 1 entries for 2 boxes"):
        draw_sampled_rois(ax, image, gt_boxes, torch.tensor([1]))
    with pytest.raises(ValueError, match="draw_sampled_rois: labels must be >= 0"):
        draw_sampled_rois(ax, image, gt_boxes, torch.tensor([1, -1]))
    with pytest.raises(TypeError, match="draw_sampled_rois: labels must be integers"):
        draw_sampled_rois(ax, image, gt_boxes, torch.tensor([1.0, 0.0]))


def test_nms_result_matches_torchvision_batched_nms():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 80, 80, generator=g)
    xy = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=g) * 20], dim=1)
    scores = torch.rand(40, generator=g)
    labels = torch.randint(1, 4, (40,), generator=g)
    keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)
    ax = Figure().add_subplot()
    draw_nms_result(ax, image, boxes, scores, labels, keep, class_names=("bg", "a", "b", "c"))
    kept = _rects(ax, "kept_box")
    np.testing.assert_allclose(
        sorted(_xyxy(r) for r in kept), sorted(boxes[keep].tolist()), atol=1e-4
    )
    assert len(_rects(ax, "suppressed_box")) == 40 - len(keep)
    # every kept box carries its class name and score
    texts = {t.get_text() for t in ax.texts}
    for i in keep.tolist():
        assert f"{'abc'[int(labels[i]) - 1]} {scores[i]:.2f}" in texts
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for c, name in zip((1, 2, 3), "abc"):
        n, k = int((labels == c).sum()), int((labels[keep] == c).sum())
        assert f"{name}: {n} -> {k} kept" in legend
    with pytest.raises(ValueError, match="draw_nms_result: keep holds indices outside"):
        draw_nms_result(ax, image, boxes, scores, labels, torch.tensor([40]))


# ------------------------------------------------------------------------ notebook 06 drawings
@pytest.mark.parametrize("M", [28, 14])
def test_mask_target_drawing_shows_torchvision_target_and_crop(M):
    from mrcnn_edu.ops import box_iou

    image, masks, gt_boxes, _ = _scene()
    box = torch.tensor([6.3, 9.1, 41.7, 44.2])  # on the square, with part of the circle inside
    fig = draw_mask_target(
        image,
        masks,
        box,
        0,
        M=M,
        gt_boxes=gt_boxes,
        label=1,
        class_names=("bg", "square", "circle"),
    )
    (target_im,) = _images(fig, "mask_target")
    ref = tv_roi_heads.project_masks_on_boxes(masks, box[None], torch.tensor([0]), M)[0]
    np.testing.assert_allclose(target_im.get_array(), ref.numpy(), rtol=0, atol=1e-6)
    # the circle's pixels inside the RoI are not part of the square's target
    assert float(ref.min()) == 0.0 and 0.3 < float(ref.mean()) < 0.9
    # the middle panel is the image inside the RoI, resampled the same way at 4M
    crop = fig.get_axes()[1].get_images()[0].get_array()
    rois = torch.cat([torch.zeros(1, 1), box[None]], dim=1)
    ref_crop = torchvision.ops.roi_align(image[None], rois, (4 * M, 4 * M), 1.0, -1, False)[0]
    np.testing.assert_allclose(crop, ref_crop.permute(1, 2, 0).numpy(), atol=1e-5)
    # the RoI is drawn where it is, and the title gives its IoU with its gt box
    (roi_rect,) = _rects(fig.get_axes()[0], "roi_box")
    assert _xyxy(roi_rect) == pytest.approx(box.tolist())
    iou = float(box_iou(box[None], gt_boxes[:1])[0, 0])
    assert f"(IoU {iou:.2f})" in fig._suptitle.get_text()
    assert "square" in fig._suptitle.get_text()


def test_mask_target_bad_input_is_named():
    image, masks, gt_boxes, _ = _scene()
    with pytest.raises(ValueError, match=r"draw_mask_target: matched_idx must lie in \[0, 2\)"):
        draw_mask_target(image, masks, gt_boxes[0], 2)
    with pytest.raises(ValueError, match="draw_mask_target: gt_masks must be"):
        draw_mask_target(image, masks[:, :10], gt_boxes[0], 0)
    with pytest.raises(ValueError, match="draw_mask_target: box must be one"):
        draw_mask_target(image, masks, gt_boxes, 0)


def test_mask_probs_grid_shows_the_probabilities_and_their_iou():
    g = torch.Generator().manual_seed(0)
    targets = (torch.rand(3, 8, 8, generator=g) > 0.5).float()
    probs = torch.rand(2, 3, 8, 8, generator=g)
    probs[0, 1] = targets[1]  # a perfect mask: IoU 1
    fig = draw_mask_probs(probs, targets, row_names=["one", "two"], col_names=["a", "b", "c"])
    shown = _images(fig, "mask_prob")
    assert len(shown) == 6
    for k, im in enumerate(shown):  # row-major: row r, column c
        np.testing.assert_allclose(im.get_array(), probs[k // 3, k % 3].numpy())
    axes = [ax for ax in fig.get_axes() if ax.get_images()]
    for k, ax in enumerate(axes):
        p, t = probs[k // 3, k % 3] >= 0.5, targets[k % 3] >= 0.5
        iou = float((p & t).sum()) / max(float((p | t).sum()), 1.0)
        assert re.search(
            rf"IoU {iou:.2f}, max p {float(probs[k // 3, k % 3].max()):.2f}", ax.get_title()
        )
    assert "IoU 1.00" in axes[1].get_title() and axes[1].get_title().startswith("b\n")
    assert axes[3].get_ylabel() == "two"
    with pytest.raises(ValueError, match=r"draw_mask_probs: targets must be \[P, M, M\]"):
        draw_mask_probs(probs, targets[:2])
    with pytest.raises(ValueError, match="draw_mask_probs: col_names has 2 entries for 3"):
        draw_mask_probs(probs, col_names=["a", "b"])


@pytest.mark.parametrize("padding", [1, 2])
def test_paste_steps_equal_torchvision_paste(padding):
    image, masks, gt_boxes, _ = _scene()
    H, W = image.shape[-2:]
    mask = tv_roi_heads.project_masks_on_boxes(masks, gt_boxes[1:], torch.tensor([1]), 28)[0]
    fig = draw_paste_steps(mask, gt_boxes[1], (H, W), gt_mask=masks[1], padding=padding)
    ref = tv_roi_heads.paste_masks_in_image(mask[None, None], gt_boxes[1:], (H, W), padding)[0, 0]
    (pasted,) = _images(fig, "pasted")
    (binary,) = _images(fig, "binary")
    np.testing.assert_array_equal(pasted.get_array(), ref.numpy())
    np.testing.assert_array_equal(binary.get_array(), (ref >= 0.5).numpy().astype(np.float32))
    # the pasted pixels: the box grown by (M + 2p) / M about its centre, truncated to ints
    x1, y1, x2, y2 = gt_boxes[1].tolist()
    s = (28 + 2 * padding) / 28
    cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * s, (y2 - y1) / 2 * s
    ix1, iy1, ix2, iy2 = (int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh))
    (pix,) = _rects(fig.get_axes()[1], "paste_pixels")
    assert _xyxy(pix) == pytest.approx([ix1, iy1, ix2 + 1, iy2 + 1])
    gt = masks[1].bool()
    b = ref >= 0.5
    iou = float((b & gt).sum()) / float((b | gt).sum())
    assert iou > 0.9
    assert f"IoU {iou:.3f} with gt" in fig.get_axes()[3].get_title()


# ---------------------------------------------------------------------------------- explorer
def test_mask_target_explorer_redraws_on_every_change():
    import ipywidgets

    image, masks, gt_boxes, _ = _scene()
    rois = torch.stack([gt_boxes[0], gt_boxes[1], gt_boxes[0] + torch.tensor([2.0, 1, 2, 1])])
    explorer = mask_target_explorer(
        image,
        masks,
        rois,
        torch.tensor([0, 1, 0]),
        labels=torch.tensor([1, 2, 1]),
        gt_boxes=gt_boxes,
        class_names=("bg", "square", "circle"),
    )
    assert isinstance(explorer, ipywidgets.VBox) and explorer.output in explorer.children
    slider, size = explorer.controls["roi"], explorer.controls["M"]
    assert isinstance(slider, ipywidgets.IntSlider) and slider.continuous_update is False
    assert (slider.min, slider.max) == (0, 2) and size.value == 28 and 14 in size.options
    seen = [explorer.output.outputs]
    slider.value = 1  # the observer fires
    seen.append(explorer.output.outputs)
    size.value = 14
    seen.append(explorer.output.outputs)
    explorer.redraw({"name": "value", "old": 14, "new": 14})  # called directly
    seen.append(explorer.output.outputs)
    assert all(len(o) == 1 and "image/png" in o[0]["data"] for o in seen)  # replaced, not added
    pngs = [o[0]["data"]["image/png"] for o in seen]
    assert len(set(pngs[:3])) == 3  # another RoI, another resolution: another picture
    assert pngs[3] == pngs[2]  # same state, same picture


def test_mask_target_explorer_shows_the_chosen_rois_target(monkeypatch):
    import mrcnn_edu.widgets.mask_targets as module

    image, masks, gt_boxes, _ = _scene()
    rois = torch.stack([gt_boxes[0], gt_boxes[1]])
    calls = []
    real = module.draw_mask_target

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "draw_mask_target", spy)
    explorer = mask_target_explorer(image, masks, rois, torch.tensor([0, 1]))
    explorer.controls["roi"].value = 1
    explorer.controls["M"].value = 56
    (_, _, box, idx), kw = calls[-1]
    assert torch.equal(box, gt_boxes[1]) and idx == 1 and kw["M"] == 56
    fig = kw["fig"]
    (target_im,) = _images(fig, "mask_target")
    ref = tv_roi_heads.project_masks_on_boxes(masks, gt_boxes[1:], torch.tensor([1]), 56)[0]
    np.testing.assert_allclose(target_im.get_array(), ref.numpy(), atol=1e-6)


def test_mask_target_explorer_bad_input_is_named():
    image, masks, gt_boxes, _ = _scene()
    with pytest.raises(ValueError, match="mask_target_explorer: matched_idxs has 1 entries"):
        mask_target_explorer(image, masks, gt_boxes, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"mask_target_explorer: rois must be \[P, 4\]"):
        mask_target_explorer(image, masks, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_target_explorer: labels has 3 entries"):
        mask_target_explorer(
            image, masks, gt_boxes, torch.tensor([0, 1]), labels=torch.tensor([1, 2, 1])
        )

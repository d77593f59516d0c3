"""Matplotlib drawings for the notebooks: instances, and the pictures behind each concept.

Mask R-CNN (He et al. 2017) outputs, per image, boxes with class labels and scores (the Faster
R-CNN part, section 3), one mask per box (section 3, "Mask Representation") and, in the keypoint
variant (section 5), K keypoints per person. The paper's figures draw them as coloured boxes,
translucent masks and stick figures; :func:`draw_instances` draws exactly that, for targets and
predictions alike, so every notebook (starting with ``00_tour.ipynb``) shows data the same way.
Colours are a fixed palette indexed by class (:func:`class_color`), so "circle" has the same
colour in every figure of the series.

The other drawings, by notebook (each is plain matplotlib on an ``Axes``, testable without
widgets; the explorers in ``mrcnn_edu.widgets`` only wire controls to them):

* 00: :func:`draw_pipeline`, :func:`show_batch`, :func:`draw_keypoints_closeup` (visible vs
  occluded keypoints);
* 01: :func:`draw_rle_runs` (how run-length encoding reads a mask), :func:`draw_sample` (one
  sample of a data set, crowd regions included: the dataset browser's figure);
* 02: :func:`draw_roi_sampling`, :func:`draw_roi_comparison` (where RoIPool / RoIAlign read the
  feature map; the geometry comes from ``mrcnn_edu.ops.roi_reference``, the functions the
  reference operators use, never re-derived here);
* 03: :func:`draw_thread_mapping`, :func:`draw_data_race`, :func:`draw_memory_layout`;
* 04: :func:`draw_anchors`, :func:`plot_anchors_at`, :func:`draw_box_deltas` (deltas as arrows),
  :func:`draw_best_proposals` (each object's best proposal, its rank and IoU);
* 05/06: :func:`draw_sampled_rois`, :func:`draw_nms_result`, :func:`draw_mask_target`,
  :func:`draw_mask_probs`, :func:`draw_paste_steps`;
* 07: :func:`draw_level_rule`, :func:`draw_fpn_levels`, :func:`draw_feature_pyramid`,
  :func:`draw_parameter_counts`, :func:`draw_rois_by_level`, :func:`draw_forward_stages`;
* 08 and ``make demo``: :func:`plot_loss_curves`, :func:`draw_predictions_vs_truth`,
  :func:`draw_iou_match`, :func:`draw_ap_thresholds`, :func:`draw_gallery`,
  :func:`save_figure` (PNG written atomically);
* 08b (ablations): :func:`draw_ablation_bars`, :func:`plot_ablation_study`,
  :func:`draw_mask_comparison`, :func:`best_mask_ious`, :func:`pick_overlapping_pair`;
* 09: :func:`plot_lr_schedule`, :func:`draw_ddp_step`;
* 10: :func:`draw_keypoint_targets`, :func:`draw_softmax_vs_sigmoid`,
  :func:`draw_keypoint_heatmaps`, :func:`draw_oks_circles`.

This is the only module besides ``widgets`` and ``cli`` that imports matplotlib
(``docs/ARCHITECTURE.md``).
Modules that pull in Numba (``mrcnn_edu.ops``) are imported inside the functions that need them,
so ``import mrcnn_edu.viz`` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyBboxPatch, Rectangle

__all__ = [
    "CROWD_COLOR",
    "KEYPOINT_STYLES",
    "LABEL_COLORS",
    "LABEL_NAMES",
    "PALETTE",
    "anchors_at",
    "best_proposals",
    "bilinear_neighbours",
    "class_color",
    "draw_anchors",
    "draw_best_proposals",
    "draw_box_deltas",
    "draw_boxes",
    "draw_data_race",
    "draw_instances",
    "draw_keypoints_closeup",
    "draw_memory_layout",
    "draw_pipeline",
    "draw_rle_runs",
    "draw_roi_comparison",
    "draw_roi_sampling",
    "draw_sample",
    "draw_thread_mapping",
    "image_for_display",
    "image_to_numpy",
    "memory_offsets",
    "plot_anchors_at",
    "pool_bins",
    "rle_runs",
    "roi_align_points",
    "sampling_points",
    "show_batch",
    "show_samples",
    "simulate_increments",
]

#: Fixed RGB palette (0..1). Entry 0 is for the background class; classes 1, 2, ... cycle
#: through the rest (the colour-blind-friendly "Okabe-Ito" colours, then a few extra).
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.60, 0.60, 0.60),  # 0 background: grey
    (0.90, 0.62, 0.00),  # orange
    (0.34, 0.71, 0.91),  # sky blue
    (0.00, 0.62, 0.45),  # bluish green
    (0.94, 0.89, 0.26),  # yellow
    (0.00, 0.45, 0.70),  # blue
    (0.84, 0.37, 0.00),  # vermillion
    (0.80, 0.47, 0.65),  # reddish purple
    (0.55, 0.34, 0.29),  # brown
    (0.74, 0.74, 0.13),  # olive
    (0.09, 0.75, 0.81),  # cyan
)


def class_color(label: int) -> tuple[float, float, float]:
    """RGB colour (floats in 0..1) of class ``label``: the same class always gets the same colour.

    ``0`` (background) is grey; labels ``1, 2, ...`` cycle through ``PALETTE[1:]``.
    """
    label = int(label)
    if label < 0:
        raise ValueError(f"class_color: label must be >= 0, got {label}")
    if label == 0:
        return PALETTE[0]
    return PALETTE[1 + (label - 1) % (len(PALETTE) - 1)]


# --------------------------------------------------------------------------------------------
# input conversion and checks
# --------------------------------------------------------------------------------------------


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(
        f"draw_instances: {name} must be a tensor or numpy array, got {type(x).__name__}"
    )


def image_to_numpy(image) -> np.ndarray:
    """Any supported image -> ``[H, W, 3]`` float32 numpy array in 0..1 for ``imshow``.

    Accepts a torch tensor ``[3, H, W]`` (float 0..1 or uint8 0..255) or a numpy array
    ``[H, W, 3]`` (uint8 0..255 or float 0..1). A float image far outside 0..1 is rejected: it is
    probably normalized, and ``mrcnn_edu.transforms.Normalize().inverse(image)`` undoes that.
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                "draw_instances: a tensor image must have shape [3, H, W], "
                f"got {tuple(image.shape)}"
            )
        arr = image.detach().cpu().permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"draw_instances: a numpy image must have shape [H, W, 3] (HWC), got {image.shape}"
            )
        arr = image
    else:
        raise TypeError(
            f"draw_instances: image must be a [3, H, W] tensor or an [H, W, 3] numpy array, "
            f"got {type(image).__name__}"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"draw_instances: image must be uint8 or float, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if arr.size and (arr.min() < -0.01 or arr.max() > 1.01):
        raise ValueError(
            "draw_instances: float image values must be in 0..1, "
            f"got {arr.min():.3g}..{arr.max():.3g}"
            " (a normalized image? use mrcnn_edu.transforms.Normalize().inverse(image))"
        )
    return np.clip(arr, 0.0, 1.0)


def _check_len(name: str, x: np.ndarray, n: int | None) -> int:
    if n is not None and x.shape[0] != n:
        raise ValueError(
            f"draw_instances: {name} has {x.shape[0]} entries but boxes/earlier fields have {n}; "
            "every per-instance field must have the same length N"
        )
    return x.shape[0]


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------


def draw_boxes(
    ax: Axes,
    boxes,
    colors: Sequence | None = None,
    linewidth: float = 1.5,
    linestyle: str = "-",
) -> None:
    """Draw ``boxes [N, 4]`` (x1, y1, x2, y2) in pixels as rectangles on ``ax`` (anchors,
    proposals).

    ``colors``: one colour per box or ``None`` (all orange). A pixel-edge box ``[0, 0, W, H]``
    covers the whole image: ``imshow`` puts pixel centres at integers, hence the ``-0.5`` shift.
    """
    b = _to_numpy(boxes, "boxes").astype(np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"draw_boxes: boxes must have shape [N, 4], got {tuple(b.shape)}")
    for i, (x1, y1, x2, y2) in enumerate(b):
        color = PALETTE[1] if colors is None else colors[i]
        ax.add_patch(
            Rectangle(
                (x1 - 0.5, y1 - 0.5),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=color,
                linewidth=linewidth,
                linestyle=linestyle,
            )
        )


def draw_instances(
    image,
    boxes=None,
    labels=None,
    scores=None,
    masks=None,
    keypoints=None,
    class_names: Sequence[str] | None = None,
    skeleton: Sequence[tuple[int, int]] | None = None,
    score_threshold: float = 0.0,
    ax: Axes | None = None,
    title: str | None = None,
    mask_alpha: float = 0.5,
    mask_threshold: float = 0.5,
) -> Axes:
    """Draw an image with its instances (ground truth or predictions) and return the ``Axes``.

    Args:
        image: ``[3, H, W]`` tensor (float 0..1 or uint8) or ``[H, W, 3]`` numpy array (uint8 or
            float 0..1).
        boxes: ``[N, 4]`` float (x1, y1, x2, y2) in pixels, drawn as rectangles.
        labels: ``[N]`` int, classes 1..C; they pick the colours (:func:`class_color`) and names.
        scores: ``[N]`` float; written after the class name, and instances with
            ``score < score_threshold`` are not drawn.
        masks: ``[N, H, W]`` (uint8 0/1 targets) or ``[N, 1, H, W]`` (float probabilities, as the
            model returns them), thresholded at ``mask_threshold``; drawn as a translucent fill
            (``mask_alpha``) in the class colour with a contour.
        keypoints: ``[N, K, 3]`` (x, y, visibility) or ``[N, K, 2]`` (all visible): visible (v=2)
            points as filled dots, occluded (v=1) as hollow circles, v=0 not drawn.
        class_names: ``class_names[label]`` is written on each box (index 0 = background).
        skeleton: pairs ``(i, j)`` of **1-based** keypoint numbers joined by a line, as in COCO's
            ``skeleton`` field (e.g. ``mrcnn_edu.data.shapes.SKELETON``); only drawn when both
            ends are labelled (v > 0).
        ax: draw into this ``Axes``; by default a new figure sized to the image.
        title: the axes title.

    Raises ``ValueError``/``TypeError`` naming the field for shapes that do not fit together.
    """
    img = image_to_numpy(image)  # [H, W, 3] float 0..1
    H, W = img.shape[:2]
    n = None
    if boxes is not None:
        boxes = _to_numpy(boxes, "boxes").astype(np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"draw_instances: boxes must have shape [N, 4], got {tuple(boxes.shape)}"
            )
        n = boxes.shape[0]
    if labels is not None:
        labels = _to_numpy(labels, "labels").astype(np.int64).reshape(-1)
        n = _check_len("labels", labels, n)
    if scores is not None:
        scores = _to_numpy(scores, "scores").astype(np.float64).reshape(-1)
        n = _check_len("scores", scores, n)
    if masks is not None:
        masks = _to_numpy(masks, "masks")
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]  # [N, 1, H, W] -> [N, H, W]
        if masks.ndim != 3:
            raise ValueError(
                "draw_instances: masks must have shape [N, H, W] or [N, 1, H, W], "
                f"got {masks.shape}"
            )
        if masks.shape[1:] != (H, W):
            raise ValueError(
                f"draw_instances: masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
                f"{H}x{W}; masks must be at the image's size (paste them first)"
            )
        masks = masks.astype(np.float32) >= mask_threshold  # [N, H, W] bool
        n = _check_len("masks", masks, n)
    if keypoints is not None:
        keypoints = _to_numpy(keypoints, "keypoints").astype(np.float64)
        if keypoints.ndim != 3 or keypoints.shape[2] not in (2, 3):
            raise ValueError(
                f"draw_instances: keypoints must have shape [N, K, 3] or [N, K, 2], "
                f"got {keypoints.shape}"
            )
        if keypoints.shape[2] == 2:  # no visibility given: all visible
            keypoints = np.concatenate([keypoints, np.full(keypoints.shape[:2] + (1,), 2.0)], 2)
        n = _check_len("keypoints", keypoints, n)
    n = 0 if n is None else n

    keep = np.ones(n, dtype=bool) if scores is None else scores >= score_threshold
    if labels is not None:
        colors = [class_color(lab) for lab in labels]
    else:  # no classes: one colour per instance so neighbours stay apart
        colors = [PALETTE[1 + i % (len(PALETTE) - 1)] for i in range(n)]

    if masks is not None:  # blend masks into the pixels: out = (1 - a) * img + a * colour
        img = img.copy()
        for i in np.flatnonzero(keep):
            m = masks[i]
            img[m] = (1.0 - mask_alpha) * img[m] + mask_alpha * np.asarray(colors[i], np.float32)

    if ax is None:
        scale = 5.0 / max(H, W)
        _, ax = plt.subplots(figsize=(max(W * scale, 2.0), max(H * scale, 2.0)))
    ax.imshow(img, interpolation="nearest")

    for i in np.flatnonzero(keep):
        color = colors[i]
        if masks is not None and masks[i].any():
            ax.contour(masks[i].astype(np.float32), levels=[0.5], colors=[color], linewidths=1.0)
        if boxes is not None:
            draw_boxes(ax, boxes[i : i + 1], colors=[color])
            caption = []
            if labels is not None:
                lab = int(labels[i])
                names_ok = class_names is not None and 0 <= lab < len(class_names)
                caption.append(class_names[lab] if names_ok else str(lab))
            if scores is not None:
                caption.append(f"{scores[i]:.2f}")
            if caption:
                x1, y1 = boxes[i, 0], boxes[i, 1]
                ax.text(
                    x1 - 0.5,
                    y1 - 0.5,
                    " ".join(caption),
                    fontsize=7,
                    color="black",
                    va="bottom",
                    ha="left",
                    clip_on=True,
                    bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"},
                )
        if keypoints is not None:
            _draw_keypoints(ax, keypoints[i], skeleton, color)

    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def _draw_keypoints(ax: Axes, kps: np.ndarray, skeleton, color) -> None:
    """One instance's ``kps [K, 3]``: skeleton lines, filled dots (v=2), hollow circles (v=1)."""
    K = kps.shape[0]
    # keypoint coordinates are continuous (pixel i spans [i, i+1)); imshow centres pixel i at i
    x, y, v = kps[:, 0] - 0.5, kps[:, 1] - 0.5, kps[:, 2]
    for a, b in skeleton or ():
        i, j = int(a) - 1, int(b) - 1  # COCO skeletons are 1-based
        if not (0 <= i < K and 0 <= j < K):
            raise ValueError(
                f"draw_instances: skeleton pair ({a}, {b}) is out of range for {K} keypoints "
                "(skeleton pairs are 1-based, as in COCO)"
            )
        if v[i] > 0 and v[j] > 0:
            ax.plot([x[i], x[j]], [y[i], y[j]], color=color, linewidth=1.5)
    vis, occ = v >= 2, (v > 0) & (v < 2)
    # filled dots vs larger hollow rings: told apart at a glance even in a grid of small images
    ax.scatter(x[vis], y[vis], s=16, c=[color], edgecolors="black", linewidths=0.6, zorder=3)
    ax.scatter(
        x[occ], y[occ], s=30, facecolors="none", edgecolors=[color], linewidths=1.5, zorder=3
    )


def _target_kwargs(target: dict) -> dict:
    keys = ("boxes", "labels", "scores", "masks", "keypoints")
    return {k: target[k] for k in keys if k in target}


def show_samples(
    dataset, indices: Sequence[int], ncols: int = 4, size: float = 3.0, **kw
) -> Figure:
    """A grid of ``dataset[i]`` for ``i`` in ``indices``, each drawn with :func:`draw_instances`.

    ``dataset[i]`` must return ``(image, target)`` with the target keys of docs/ARCHITECTURE.md.
    ``class_names`` and ``skeleton`` default to the dataset's attributes of that name when it has
    them; other keyword arguments go to :func:`draw_instances`. Returns the ``Figure``.
    """
    indices = list(indices)
    if not indices:
        raise ValueError("show_samples: indices is empty")
    if ncols < 1:
        raise ValueError(f"show_samples: ncols must be >= 1, got {ncols}")
    kw.setdefault("class_names", getattr(dataset, "class_names", None))
    kw.setdefault("skeleton", getattr(dataset, "skeleton", None))
    ncols = min(ncols, len(indices))
    nrows = math.ceil(len(indices) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax, idx in zip(axes.flat, indices):
        sample = dataset[idx]
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise ValueError(f"show_samples: dataset[{idx}] must be an (image, target) pair")
        image, target = sample
        draw_instances(image, **_target_kwargs(target), ax=ax, title=f"[{idx}]", **kw)
    for ax in axes.flat[len(indices) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


#: crowd regions (iscrowd=1) in :func:`draw_sample`: grey, dashed
CROWD_COLOR = (0.6, 0.6, 0.6)


def draw_sample(
    dataset,
    index: int,
    *,
    show_masks: bool = True,
    show_boxes: bool = True,
    show_keypoints: bool = True,
    show_crowd: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Draw ``dataset[index]``: masks, boxes with class names, keypoints, crowd boxes (dashed).

    ``class_names`` and ``skeleton`` come from the dataset's attributes when it has them.
    Returns the matplotlib ``Axes``.
    """
    n = len(dataset)
    if not 0 <= index < n:
        raise IndexError(f"draw_sample: index {index} out of range for a dataset of {n} images")
    image, target = dataset[index]
    n_inst = len(target["boxes"])
    image_id = int(target["image_id"]) if "image_id" in target else index
    ax = draw_instances(
        image,
        boxes=target["boxes"] if show_boxes else None,
        labels=target["labels"],
        masks=target.get("masks") if show_masks else None,
        keypoints=target.get("keypoints") if show_keypoints else None,
        class_names=getattr(dataset, "class_names", None),
        skeleton=getattr(dataset, "skeleton", None),
        ax=ax,
        title=f"[{index}] image id {image_id}: {n_inst} instance(s)",
    )
    crowd = target.get("crowd_boxes")
    if show_crowd and crowd is not None and len(crowd):
        draw_boxes(ax, crowd, colors=[CROWD_COLOR] * len(crowd), linestyle="--")
        for x1, y1, _, _ in crowd.tolist():
            ax.text(
                x1,
                y1,
                "crowd",
                fontsize=7,
                color="black",
                va="bottom",
                clip_on=True,
                bbox={"facecolor": CROWD_COLOR, "alpha": 0.8, "pad": 1, "edgecolor": "none"},
            )
    return ax


def show_batch(
    images: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    targets: Sequence[dict] | None = None,
    size: float = 3.0,
    **kw,
) -> Figure:
    """Draw a padded batch ``images [B, 3, H', W']`` (0..1) with each image's valid region dashed.

    ``image_sizes[i] = (h_i, w_i)`` is the part of the padded canvas that holds image ``i``
    (``mrcnn_edu.transforms.batch_images``); the rest is zero padding. ``targets`` (optional,
    masks ``[N, h_i, w_i]`` at the unpadded size) are drawn on top with :func:`draw_instances`
    (``**kw`` go there too).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"show_batch: images must be a [B, 3, H, W] tensor, got {shape}")
    B = images.shape[0]
    if len(image_sizes) != B or (targets is not None and len(targets) != B):
        raise ValueError(
            f"show_batch: {B} images but {len(image_sizes)} image_sizes"
            + ("" if targets is None else f" and {len(targets)} targets")
        )
    fig, axes = plt.subplots(1, B, figsize=(size * B, size), squeeze=False)
    for i, ax in enumerate(axes[0]):
        tgt = {} if targets is None else _target_kwargs(targets[i])
        h, w = image_sizes[i]
        if "masks" in tgt:  # masks are at the image's size: pad them like the image, [N, H', W']
            m = torch.as_tensor(tgt["masks"])
            if m.dim() != 3 or tuple(m.shape[1:]) != (h, w):
                raise ValueError(
                    f"show_batch: targets[{i}]['masks'] must be [N, {h}, {w}] (image_sizes[{i}]), "
                    f"got {tuple(m.shape)}"
                )
            pad = (0, images.shape[-1] - w, 0, images.shape[-2] - h)  # (left, right, top, bottom)
            tgt["masks"] = torch.nn.functional.pad(m, pad)
        draw_instances(
            images[i],
            **tgt,
            ax=ax,
            title=f"image {i}: {h}x{w} in {images.shape[-2]}x{images.shape[-1]}",
            **kw,
        )
        ax.add_patch(
            Rectangle(
                (-0.5, -0.5), w, h, fill=False, edgecolor="white", linestyle="--", linewidth=1.2
            )
        )
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# the pipeline in one picture (notebook 00)
# --------------------------------------------------------------------------------------------

#: (title, what it does, notebook) for each stage of Mask R-CNN, in order.
PIPELINE_STAGES: tuple[tuple[str, str, str], ...] = (
    ("transform", "resize, flip,\nnormalize, pad\ninto a batch", "00"),
    ("backbone + FPN", "ResNet C2..C5\n-> P2..P6\n(strides 4..64)", "07"),
    ("RPN", "anchors, objectness,\ndeltas -> proposals\n(top-k + NMS)", "04"),
    ("RoIAlign", "7x7 for boxes,\n14x14 for masks,\nlevel by box size", "02, 03"),
    ("box + mask heads", "class scores, box\nrefinement; one\nmask per class", "05, 06"),
    ("post-process", "score threshold,\nper-class NMS, paste\nmasks, resize back", "05, 06"),
)


def draw_pipeline(ax: Axes | None = None) -> Axes:
    """Block diagram of Mask R-CNN: transform -> backbone+FPN -> RPN -> RoIAlign -> heads -> post.

    Each block names the notebook that builds it. Returns the ``Axes``.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(13, 2.8))
    n = len(PIPELINE_STAGES)
    width, gap = 1.9, 0.4
    for i, (name, what, nb) in enumerate(PIPELINE_STAGES):
        x = i * (width + gap)
        color = PALETTE[1 + i % (len(PALETTE) - 1)]
        ax.add_patch(
            FancyBboxPatch(
                (x, 0.0),
                width,
                1.6,
                boxstyle="round,pad=0.04",
                facecolor=(*color, 0.35),
                edgecolor=color,
                linewidth=1.5,
            )
        )
        ax.text(x + width / 2, 1.38, name, ha="center", va="center", fontsize=9.5, weight="bold")
        ax.text(x + width / 2, 0.72, what, ha="center", va="center", fontsize=8)
        ax.text(
            x + width / 2,
            0.12,
            f"notebook {nb}",
            ha="center",
            va="center",
            fontsize=7,
            style="italic",
        )
        if i < n - 1:
            ax.annotate(
                "",
                xy=(x + width + gap - 0.04, 0.8),
                xytext=(x + width + 0.06, 0.8),
                arrowprops={"arrowstyle": "->", "linewidth": 1.5},
            )
    total = n * width + (n - 1) * gap
    ax.text(-0.1, 1.95, "images + targets (boxes, labels, masks, keypoints)", fontsize=9, ha="left")
    ax.text(
        total + 0.1,
        1.95,
        "per image: boxes, labels, scores, masks [N,1,H,W], keypoints",
        fontsize=9,
        ha="right",
    )
    ax.text(
        total / 2,
        -0.35,
        "training: the RPN and the heads return losses instead of "
        "detections (sampled anchors / RoIs against the targets)",
        fontsize=8,
        ha="center",
        color="dimgray",
    )
    ax.set_xlim(-0.2, total + 0.2)
    ax.set_ylim(-0.55, 2.2)
    ax.set_axis_off()
    return ax


# --------------------------------------------------------------------------------------------
# keypoints up close (notebook 00): visible and occluded points told apart
# --------------------------------------------------------------------------------------------

#: how the keypoint close-up draws each visibility (COCO: 2 visible, 1 labelled but occluded)
KEYPOINT_STYLES = {
    2: {"label": "visible (v=2)", "marker": "o", "filled": True},
    1: {"label": "occluded (v=1)", "marker": "o", "filled": False},
}


def draw_keypoints_closeup(
    ax: Axes,
    image,
    keypoints,
    *,
    names: Sequence[str] | None = None,
    skeleton: Sequence[tuple[int, int]] | None = None,
    color=None,
    margin: float = 10.0,
    title: str | None = None,
) -> Axes:
    """One person's keypoints, zoomed in, with visible and occluded points drawn differently.

    Visible points (v=2) are filled dots; occluded ones (v=1: labelled, but hidden behind another
    object) are hollow rings, and a limb that ends in one is dashed; unlabelled points (v=0) are
    not drawn but counted in the legend. Each point is named when ``names`` is given.

    Args:
        ax: matplotlib axes.
        image: ``[3, H, W]`` tensor or ``[H, W, 3]`` array (as :func:`draw_instances`).
        keypoints: ``[K, 3]`` float ``(x, y, v)`` of one instance, continuous pixel coordinates
            (pixel column ``i`` spans ``[i, i + 1)``).
        names: ``K`` keypoint names; skeleton: 1-based pairs (COCO's convention).
        color: line colour (default: the palette's first class colour).
        margin: pixels of context around the labelled points.

    Returns ``ax``. The points are the scatters with ``gid`` ``"keypoints_visible"`` and
    ``"keypoints_occluded"`` (offsets are the ``(x, y)`` of the keypoints).
    """
    img = image_to_numpy(image)
    H, W = img.shape[:2]
    kps = _to_numpy(keypoints, "keypoints").astype(np.float64)
    if kps.ndim != 2 or kps.shape[1] != 3:
        raise ValueError(
            f"draw_keypoints_closeup: keypoints must be [K, 3] (x, y, v) of one "
            f"instance, got {kps.shape}"
        )
    K = kps.shape[0]
    if names is not None and len(names) != K:
        raise ValueError(f"draw_keypoints_closeup: {len(names)} names for {K} keypoints")
    color = PALETTE[1] if color is None else color
    x, y, v = kps[:, 0], kps[:, 1], kps[:, 2]
    ax.imshow(img, extent=(0, W, H, 0), interpolation="nearest")
    for a, b in skeleton or ():
        i, j = int(a) - 1, int(b) - 1
        if not (0 <= i < K and 0 <= j < K):
            raise ValueError(
                f"draw_keypoints_closeup: skeleton pair ({a}, {b}) is out of range "
                f"for {K} keypoints (pairs are 1-based, as in COCO)"
            )
        if v[i] > 0 and v[j] > 0:
            dashed = v[i] < 2 or v[j] < 2
            ax.plot(
                [x[i], x[j]],
                [y[i], y[j]],
                color=color,
                lw=2.0,
                ls="--" if dashed else "-",
                zorder=2,
            )
    for vis, style in KEYPOINT_STYLES.items():
        sel = v == vis
        n = int(sel.sum())
        face = [color] if style["filled"] else "none"
        ax.scatter(
            x[sel],
            y[sel],
            s=90,
            marker=style["marker"],
            facecolors=face,
            edgecolors="black" if style["filled"] else [color],
            linewidths=1.0 if style["filled"] else 2.2,
            zorder=3,
            label=f"{style['label']}: {n}",
            gid=f"keypoints_{'visible' if vis == 2 else 'occluded'}",
        )
    n0 = int((v == 0).sum())
    ax.plot([], [], " ", label=f"not labelled (v=0): {n0}, not drawn")
    if names is not None:
        for k in np.flatnonzero(v > 0):
            # "left_*" names to the left of their point, others to the right: pairs stay readable
            left = str(names[k]).startswith("left")
            ax.annotate(
                names[k],
                (x[k], y[k]),
                textcoords="offset points",
                xytext=(-6 if left else 6, 3),
                ha="right" if left else "left",
                fontsize=7,
                color="black",
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 0.5, "edgecolor": "none"},
            )
    lab = v > 0
    if lab.any():
        x0, x1 = max(x[lab].min() - margin, 0), min(x[lab].max() + margin, W)
        y0, y1 = max(y[lab].min() - margin, 0), min(y[lab].max() + margin, H)
    else:
        x0, x1, y0, y1 = 0, W, 0, H
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


# --------------------------------------------------------------------------------------------
# run-length encoding (notebook 01)
# --------------------------------------------------------------------------------------------


def rle_runs(mask) -> list[tuple[int, int, int]]:
    """COCO's runs of a 0/1 mask ``[H, W]``: ``(value, start, length)`` in column-major order.

    The first run is of zeros (length 0 when the first pixel is 1), as in COCO's ``counts``;
    ``[length for _, _, length in rle_runs(m)]`` is the uncompressed ``counts`` list.
    """
    m = _to_numpy(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"rle_runs: mask must be [H, W], got shape {m.shape}")
    flat = (np.asarray(m).reshape(-1, order="F") > 0).astype(np.int64)  # (H, W) -> (H*W,)
    runs, start, current = [], 0, 0
    for i, val in enumerate(flat):
        if val != current:
            runs.append((current, start, i - start))
            start, current = i, int(val)
    runs.append((current, start, len(flat) - start))
    return runs


def draw_rle_runs(ax: Axes, mask, *, title: str | None = None) -> Axes:
    """Draw how RLE reads a small mask: column by column, runs of 0s and 1s, their lengths.

    Each cell shows its reading position (0, 1, ... down the first column, then the next);
    each run is one colour (1-runs in the palette's colours, 0-runs in alternating greys), and
    the run's length is written large on its first cell (texts with ``gid="rle_run"``, in
    reading order: they are COCO's uncompressed ``counts``). A thin line follows the reading
    order. Returns ``ax``.
    """
    m = np.asarray(_to_numpy(mask, "mask"))
    if m.ndim != 2:
        raise ValueError(f"draw_rle_runs: mask must be [H, W], got shape {m.shape}")
    H, W = m.shape
    runs = rle_runs(m)
    for r, (val, start, length) in enumerate(runs):
        face = (
            PALETTE[1 + (r // 2) % (len(PALETTE) - 1)]
            if val
            else ((0.93,) * 3 if r % 4 == 0 else (0.80,) * 3)
        )
        for i in range(start, start + length):
            col, row = divmod(i, H)  # column-major: position i is (row i % H, column i // H)
            ax.add_patch(Rectangle((col, row), 1, 1, facecolor=face, edgecolor="white", lw=1.5))
            ax.text(col + 0.12, row + 0.2, str(i), fontsize=6, color="0.3", va="top")
        if length:
            col, row = divmod(start, H)
            ax.text(
                col + 0.5,
                row + 0.6,
                str(length),
                fontsize=12,
                weight="bold",
                ha="center",
                va="center",
                gid="rle_run",
                color="black",
            )
        else:
            ax.text(
                -0.1,
                -0.15,
                "0 zeros first",
                fontsize=7,
                ha="left",
                va="bottom",
                gid="rle_run_empty",
                color="0.3",
            )
    order = np.arange(H * W)
    ax.plot(order // H + 0.5, order % H + 0.5, color="0.2", lw=0.7, alpha=0.6, zorder=0.5)
    ax.set_xlim(-0.1, W + 0.1)
    ax.set_ylim(H + 0.1, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(W) + 0.5, [f"col {j}" for j in range(W)], fontsize=7)
    ax.set_yticks(np.arange(H) + 0.5, [f"row {i}" for i in range(H)], fontsize=7)
    ax.tick_params(length=0)
    counts = [length for _, _, length in runs]
    ax.set_title(title if title is not None else f"counts = {counts}", fontsize=9)
    return ax


# --------------------------------------------------------------------------------------------
# kernels (notebook 03): thread-to-output mapping, a data race, NCHW vs NHWC
# --------------------------------------------------------------------------------------------


def draw_thread_mapping(ax: Axes, shape=(2, 2, 3, 3), threads_per_block: int = 8) -> Axes:
    """One CUDA thread per output element of a ``[K, C, oh, ow]`` tensor, coloured by block.

    Thread ``i = blockIdx.x * blockDim.x + threadIdx.x`` handles element ``(k, c, ph, pw)`` with
    ``pw = i % ow``, ``ph = (i // ow) % oh``, ``c = (i // (ow*oh)) % C``, ``k = i // (ow*oh*C)``.
    The ``oh x ow`` tile of ``(k, c)`` is drawn at column ``k``, row ``c``; each cell shows its
    thread index (texts with ``gid="thread_index"``) and is coloured by its block. A strip below
    shows the launch: ``ceil(total / threads_per_block)`` blocks, the idle threads of the last
    block hatched. Returns ``ax``.
    """
    if len(shape) != 4 or min(int(s) for s in shape) < 1:
        raise ValueError(
            f"draw_thread_mapping: shape must be 4 positive ints (K, C, oh, ow), got {tuple(shape)}"
        )
    if threads_per_block < 1:
        raise ValueError(
            f"draw_thread_mapping: threads_per_block must be >= 1, got {threads_per_block}"
        )
    K, C, oh, ow = (int(s) for s in shape)
    total = K * C * oh * ow
    blocks = -(-total // threads_per_block)  # ceil
    cmap = plt.get_cmap("tab20")

    def block_color(i):
        return cmap((i // threads_per_block) % 20)

    for i in range(total):
        pw, ph = i % ow, (i // ow) % oh
        c, k = (i // (ow * oh)) % C, i // (ow * oh * C)
        x, y = k * (ow + 1) + pw, c * (oh + 1) + ph
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=block_color(i), edgecolor="white", lw=1))
        ax.text(x + 0.5, y + 0.5, str(i), ha="center", va="center", fontsize=7, gid="thread_index")
    for k in range(K):
        for c in range(C):
            ax.text(
                k * (ow + 1) + ow / 2,
                c * (oh + 1) - 0.15,
                f"k={k}, c={c}",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    # the launch: all threads on one line, block after block, half a cell per thread
    y0 = C * (oh + 1) + 0.8
    cell = 0.5
    width = max(K * (ow + 1) - 1, blocks * threads_per_block * cell)
    for t in range(blocks * threads_per_block):
        idle = t >= total
        ax.add_patch(
            Rectangle(
                (t * cell, y0),
                cell,
                0.8,
                facecolor="white" if idle else block_color(t),
                edgecolor="0.5",
                lw=0.3,
                hatch="///" if idle else None,
            )
        )
    for b in range(blocks):
        ax.text(
            (b + 0.5) * threads_per_block * cell,
            y0 + 1.0,
            f"block {b}",
            ha="center",
            va="top",
            fontsize=7,
        )
    ax.text(
        0,
        y0 + 1.8,
        f"{total} outputs, {threads_per_block} threads per block -> {blocks} "
        f"blocks; hatched: threads with i >= {total} return at once",
        fontsize=7,
        va="top",
    )
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(y0 + 2.4, -0.8)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title("thread i -> output element (k, c, ph, pw), pw fastest", fontsize=9)
    return ax


def simulate_increments(schedule: Sequence[int], start: int = 0) -> list[tuple[int, str, int]]:
    """Two threads each run ``r = x; r = r + 1; x = r`` on a shared ``x``, in ``schedule`` order.

    ``schedule`` lists which thread takes its next step, e.g. ``[0, 1, 0, 1, 0, 1]``; each
    thread must appear exactly 3 times. Returns one ``(thread, what it did, x after the step)``
    per step; the last ``x`` is the result (``start + 2`` unless an update was lost).
    """
    schedule = [int(t) for t in schedule]
    if sorted(schedule) != [0, 0, 0, 1, 1, 1]:
        raise ValueError(
            f"simulate_increments: schedule must name thread 0 and thread 1 three "
            f"times each (read, add, write), got {schedule}"
        )
    x, reg, step_of = start, [None, None], [0, 0]
    out = []
    for t in schedule:
        s = step_of[t]
        if s == 0:
            reg[t] = x
            what = f"r{t} = x  (reads {x})"
        elif s == 1:
            reg[t] += 1
            what = f"r{t} = r{t} + 1  ({reg[t]})"
        else:
            x = reg[t]
            what = f"x = r{t}  (writes {x})"
        step_of[t] += 1
        out.append((t, what, x))
    return out


def draw_data_race(ax: Axes, schedule: Sequence[int] = (0, 1, 0, 1, 0, 1), start: int = 0) -> Axes:
    """A time line of two threads incrementing the same ``x`` (:func:`simulate_increments`).

    One row per step: what thread 0 and thread 1 do, and ``x`` after the step (texts with
    ``gid="memory"``). The title says how many of the 2 updates survived. Returns ``ax``.
    """
    steps = simulate_increments(schedule, start)
    n = len(steps)
    cols = {0: 0.0, 1: 4.2, "x": 8.4}
    for label, xpos in (("thread 0", cols[0]), ("thread 1", cols[1]), ("x in memory", cols["x"])):
        ax.text(xpos + 0.1, -0.7, label, fontsize=9, weight="bold", va="center")
    for r, (t, what, x) in enumerate(steps):
        ax.add_patch(
            Rectangle(
                (cols[t], r - 0.4),
                4.0,
                0.8,
                facecolor=PALETTE[1 + t * 4],
                alpha=0.35,
                edgecolor="none",
            )
        )
        ax.text(cols[t] + 0.1, r, what, fontsize=8, va="center", family="monospace")
        ax.text(
            cols["x"] + 0.1,
            r,
            f"x = {x}",
            fontsize=8,
            va="center",
            family="monospace",
            gid="memory",
        )
        ax.text(-0.3, r, f"t{r}", fontsize=7, ha="right", va="center", color="0.4")
    final = steps[-1][2]
    lost = start + 2 - final
    ax.set_title(
        f"two increments of x = {start}: result {final} "
        + (f"({lost} update lost)" if lost else "(both updates kept)"),
        fontsize=9,
    )
    ax.set_xlim(-1.0, 10.5)
    ax.set_ylim(n - 0.4, -1.1)
    ax.set_axis_off()
    return ax


def memory_offsets(shape, layout: str) -> np.ndarray:
    """Element offsets of a ``[C, H, W]`` image in memory: ``[C, H, W]`` int array.

    ``layout="NCHW"``: torch's default (contiguous, a channel plane after the other);
    ``"NHWC"``: channels last, the ``C`` values of one pixel side by side.
    """
    C, H, W = (int(s) for s in shape)
    if layout == "NCHW":
        strides = (H * W, W, 1)
    elif layout == "NHWC":
        strides = (1, W * C, C)
    else:
        raise ValueError(f"memory_offsets: layout must be 'NCHW' or 'NHWC', got {layout!r}")
    c, y, x = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
    return c * strides[0] + y * strides[1] + x * strides[2]


def draw_memory_layout(ax: Axes, shape=(3, 2, 3), pixel=(0, 1)) -> Axes:
    """The same ``[C, H, W]`` feature map in memory, NCHW above and NHWC (channels last) below.

    Each row is memory, address 0 on the left; a cell is coloured by its channel and labelled
    ``c,y,x``. The ``C`` values of ``pixel = (y, x)`` (what a kernel's channel loop reads) are
    framed: far apart in NCHW (``H*W`` elements between channels), side by side in NHWC. The
    frames are the rectangles with ``gid`` ``"pixel_NCHW"`` / ``"pixel_NHWC"``, their x the
    addresses. Returns ``ax``.
    """
    C, H, W = (int(s) for s in shape)
    py, px = pixel
    if not (0 <= py < H and 0 <= px < W):
        raise ValueError(f"draw_memory_layout: pixel {pixel} is outside the {H}x{W} map")
    n = C * H * W
    for row, layout in enumerate(("NCHW", "NHWC")):
        off = memory_offsets((C, H, W), layout)
        y0 = row * 2.2
        for c in range(C):
            for yy in range(H):
                for xx in range(W):
                    a = int(off[c, yy, xx])
                    ax.add_patch(
                        Rectangle(
                            (a, y0), 1, 1, facecolor=PALETTE[1 + c % 10], edgecolor="white", lw=1
                        )
                    )
                    ax.text(
                        a + 0.5, y0 + 0.5, f"{c},{yy},{xx}", ha="center", va="center", fontsize=6
                    )
                    if (yy, xx) == (py, px):
                        ax.add_patch(
                            Rectangle(
                                (a, y0),
                                1,
                                1,
                                fill=False,
                                edgecolor="black",
                                lw=2.5,
                                gid=f"pixel_{layout}",
                            )
                        )
        addrs = sorted(int(off[c, py, px]) for c in range(C))
        gap = addrs[1] - addrs[0] if C > 1 else 0
        what = (
            "the pixel's channels are contiguous"
            if gap == 1
            else f"the pixel's channels are {gap} elements apart"
        )
        ax.text(-0.2, y0 + 0.5, f"{layout}  ", ha="right", va="center", fontsize=9, weight="bold")
        ax.text(0, y0 + 1.45, f"{layout}: {what}", fontsize=8, va="center")
    ax.text(
        0,
        -0.5,
        f"address 0 ->  (cells labelled c,y,x; colour = channel; framed: pixel (y={py}, x={px}))",
        fontsize=8,
        va="center",
    )
    ax.set_xlim(-2.2, n + 0.2)
    ax.set_ylim(2 * 2.2 - 0.2, -0.9)
    ax.set_aspect("equal")
    ax.set_axis_off()
    return ax


# --------------------------------------------------------------------------------------------
# anchors, box deltas and proposals (notebook 04)
# --------------------------------------------------------------------------------------------

#: colours of the match labels (``Matcher``/sampler convention: 1 fg, 0 bg, -1 ignored)
LABEL_COLORS = {1: "tab:green", -1: "0.65", 0: "tab:red"}
LABEL_NAMES = {1: "positive", -1: "ignored", 0: "negative"}


def image_for_display(image, fn: str = "image_for_display") -> np.ndarray:
    """``[3, H, W]`` tensor / ``[H, W, 3]`` array (any range) -> ``[H, W, 3]`` float in [0, 1].

    Unlike :func:`image_to_numpy`, values outside [0, 1] (uint8 or a normalized image) are
    stretched for display, and one-channel images are accepted.
    """
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dim() != 3 or arr.shape[0] not in (1, 3):
            raise ValueError(
                f"{fn}: image tensor must be [3, H, W] or [1, H, W], got {tuple(arr.shape)}"
            )
        arr = arr.permute(1, 2, 0).float().numpy()  # [C, H, W] -> [H, W, C]
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise ValueError(f"{fn}: image array must be [H, W, 3], got {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:  # uint8 range or a normalized image: stretch to [0, 1] for display
        arr = (arr - lo) / max(hi - lo, 1e-6)
    return arr


def _as_boxes(boxes, name: str, fn: str = "draw_anchors") -> np.ndarray:
    arr = (
        boxes.detach().cpu().float().numpy()
        if isinstance(boxes, torch.Tensor)
        else np.asarray(boxes, dtype=np.float32)
    )
    arr = arr.reshape(-1, 4) if arr.size == 0 else arr
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{fn}: {name} must have shape [N, 4] (x1, y1, x2, y2), got {arr.shape}")
    return arr


def _gt_dashed(ax: Axes, gt_boxes, linewidth: float, fn: str) -> None:
    for x1, y1, x2, y2 in _as_boxes(gt_boxes, "gt_boxes", fn):
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor="white",
                linewidth=linewidth,
                linestyle="--",
                gid="gt_box",
            )
        )


def draw_anchors(
    ax: Axes,
    image,
    anchors,
    *,
    labels=None,
    gt_boxes=None,
    centers: bool = True,
    linewidth: float = 1.5,
    title: str | None = None,
    legend: bool = True,
) -> Axes:
    """Draw ``anchors`` over ``image`` on the matplotlib axes ``ax``; return ``ax``.

    The image is drawn in continuous pixel coordinates (pixel column ``i`` spans ``[i, i+1)``),
    so a box is drawn exactly at its coordinates.

    Args:
        ax: matplotlib axes.
        image: ``[3, H, W]`` tensor or ``[H, W, 3]`` array; values outside [0, 1] are stretched.
        anchors: ``[N, 4]`` float (x1, y1, x2, y2) in image pixels (may extend past the image).
        labels: optional ``[N]`` ints, 1 positive / 0 negative / -1 ignored (the RPN's anchor
            labels); colours the anchors green / red / grey and counts them in the legend.
            Without labels anchors are coloured by aspect ratio ``h / w``.
        gt_boxes: optional ``[G, 4]`` ground-truth boxes, drawn as thick white dashed boxes.
        centers: mark each anchor's centre with a dot.
        title: axes title.
        legend: add a legend (ratios or label counts).
    """
    img = image_for_display(image, "draw_anchors")
    H, W = img.shape[:2]
    boxes = _as_boxes(anchors, "anchors")
    ax.imshow(img, extent=(0, W, H, 0))
    if labels is not None:
        lab = (
            labels.detach().cpu().numpy()
            if isinstance(labels, torch.Tensor)
            else np.asarray(labels)
        )
        lab = lab.reshape(-1).astype(np.int64)
        if lab.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"draw_anchors: labels has {lab.shape[0]} entries for {boxes.shape[0]} anchors"
            )
        groups = [(LABEL_NAMES[v], LABEL_COLORS[v], lab == v) for v in (-1, 0, 1)]  # fg on top
    else:
        ratio = (boxes[:, 3] - boxes[:, 1]) / np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
        # anchors are rounded to whole pixels, so snap h / w to the nearest power of sqrt(2)
        ratio = 2.0 ** (np.round(2 * np.log2(np.maximum(ratio, 1e-6))) / 2)
        cmap = plt.get_cmap("tab10")
        groups = [
            (f"h/w ~ {r:.2g}", cmap(i % 10), ratio == r) for i, r in enumerate(np.unique(ratio))
        ]
    for name, color, mask in groups:
        sel = boxes[mask]
        for x1, y1, x2, y2 in sel:
            ax.add_patch(
                Rectangle(
                    (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth
                )
            )
        if centers and len(sel):
            ax.plot(
                (sel[:, 0] + sel[:, 2]) / 2,
                (sel[:, 1] + sel[:, 3]) / 2,
                ".",
                color=color,
                markersize=3,
            )
        if mask.any():
            ax.plot([], [], "s", color=color, label=f"{name} ({int(mask.sum())})")
    if gt_boxes is not None:
        _gt_dashed(ax, gt_boxes, 2.0 * linewidth, "draw_anchors")
    # show anchors that stick out of the image too, within reason
    if len(boxes):
        ax.set_xlim(
            max(min(0.0, boxes[:, 0].min()), -0.5 * W), min(max(W, boxes[:, 2].max()), 1.5 * W)
        )
        ax.set_ylim(
            min(max(H, boxes[:, 3].max()), 1.5 * H), max(min(0.0, boxes[:, 1].min()), -0.5 * H)
        )
    else:
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
    if legend and len(boxes):
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    if title:
        ax.set_title(title)
    return ax


def anchors_at(
    image_shape: tuple[int, int],
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    stride: int,
    cell_x: int,
    cell_y: int,
) -> torch.Tensor:
    """The ``len(sizes) * len(aspect_ratios)`` anchors of feature-map cell ``(cell_y, cell_x)``.

    Uses ``AnchorGenerator(sizes=(sizes,), aspect_ratios=(aspect_ratios,)).grid_anchors`` on one
    feature map of shape ``(ceil(H / stride), ceil(W / stride))``; returns ``[A, 4]`` float32
    xyxy pixels (``A = len(sizes) * len(aspect_ratios)``, ratio-major).
    """
    from mrcnn_edu.anchors import AnchorGenerator

    H, W = image_shape
    h, w = -(-H // stride), -(-W // stride)  # ceil division: feature map size
    if not (0 <= cell_x < w and 0 <= cell_y < h):
        raise ValueError(
            f"anchors_at: cell (x={cell_x}, y={cell_y}) is outside the {h}x{w} "
            f"feature map of stride {stride}"
        )
    gen = AnchorGenerator(
        sizes=(tuple(float(s) for s in sizes),),
        aspect_ratios=(tuple(float(r) for r in aspect_ratios),),
    )
    anchors = gen.grid_anchors([(h, w)], [(stride, stride)])[0]  # [h*w*A, 4]
    A = gen.num_anchors_per_location()[0]
    return anchors.reshape(h, w, A, 4)[cell_y, cell_x]  # [h*w*A, 4] -> [h, w, A, 4] -> [A, 4]


def plot_anchors_at(
    image,
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    stride: int,
    cell_x: int,
    cell_y: int,
    *,
    show_grid: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """The anchor explorer's figure: the anchors of one location and the grid of anchor centres.

    Returns the ``Figure``.
    """
    img = image_for_display(image, "plot_anchors_at")
    H, W = img.shape[:2]
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
    else:
        fig = ax.figure
    if not sizes or not aspect_ratios:
        ax.imshow(img)
        ax.set_title("pick at least one size and one aspect ratio")
        return fig
    anchors = anchors_at((H, W), sizes, aspect_ratios, stride, cell_x, cell_y)
    draw_anchors(
        ax,
        img,
        anchors,
        title=f"stride {stride}, cell (x={cell_x}, y={cell_y}): {anchors.shape[0]} anchors",
    )
    if show_grid:
        h, w = -(-H // stride), -(-W // stride)
        cx = (anchors[:, 0] + anchors[:, 2]).mean().item() / 2 - cell_x * stride  # centre offset
        cy = (anchors[:, 1] + anchors[:, 3]).mean().item() / 2 - cell_y * stride
        gx, gy = np.meshgrid(np.arange(w) * stride + cx, np.arange(h) * stride + cy)
        ax.plot(gx.ravel(), gy.ravel(), "+", color="yellow", markersize=3, alpha=0.6)
    return fig


def draw_box_deltas(
    ax: Axes,
    image,
    anchors,
    deltas,
    *,
    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    gt_boxes=None,
    title: str | None = None,
) -> Axes:
    """Box coding as arrows: each anchor, the box its deltas decode to, and an arrow between them.

    ``(t_x, t_y)`` move the anchor's centre by ``t_x`` anchor widths and ``t_y`` heights (the
    arrow, from the anchor's centre to the decoded box's centre); ``(t_w, t_h)`` scale its width
    and height by ``exp(t_w)``, ``exp(t_h)`` (dashed anchor -> solid box). Each arrow is labelled
    with its four deltas.

    Args:
        ax: matplotlib axes; image: as :func:`draw_anchors`.
        anchors: ``[N, 4]`` (x1, y1, x2, y2) reference boxes.
        deltas: ``[N, 4]`` ``(t_x, t_y, t_w, t_h)``, as ``BoxCoder(weights).encode`` returns them.
        weights: the coder's weights (``(1, 1, 1, 1)`` for the RPN).
        gt_boxes: optional ``[G, 4]`` ground truth, white dashed.

    Returns ``ax``. The arrows are the annotations with ``gid="delta_arrow"`` (``xyann``: the
    anchor's centre, ``xy``: the decoded box's centre); the decoded boxes are the rectangles
    with ``gid="decoded_box"``.
    """
    from mrcnn_edu.boxes import BoxCoder

    img = image_for_display(image, "draw_box_deltas")
    H, W = img.shape[:2]
    a = torch.as_tensor(_as_boxes(anchors, "anchors", "draw_box_deltas"), dtype=torch.float32)
    d = torch.as_tensor(_as_boxes(deltas, "deltas", "draw_box_deltas"), dtype=torch.float32)
    if a.shape[0] != d.shape[0]:
        raise ValueError(f"draw_box_deltas: {a.shape[0]} anchors but {d.shape[0]} deltas")
    decoded = BoxCoder(weights).decode(d, a).reshape(-1, 4) if len(a) else a  # [N, 4]
    ax.imshow(img, extent=(0, W, H, 0))
    if gt_boxes is not None:
        _gt_dashed(ax, gt_boxes, 2.0, "draw_box_deltas")
    cmap = plt.get_cmap("tab10")
    for i, ((ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2), t) in enumerate(
        zip(a.tolist(), decoded.tolist(), d.tolist())
    ):
        color = cmap(i % 10)
        ax.add_patch(
            Rectangle(
                (ax1, ay1),
                ax2 - ax1,
                ay2 - ay1,
                fill=False,
                edgecolor=color,
                linewidth=1.2,
                linestyle=(0, (3, 2)),
                gid="anchor_box",
            )
        )
        ax.add_patch(
            Rectangle(
                (bx1, by1),
                bx2 - bx1,
                by2 - by1,
                fill=False,
                edgecolor=color,
                linewidth=2.0,
                gid="decoded_box",
            )
        )
        start = ((ax1 + ax2) / 2, (ay1 + ay2) / 2)
        end = ((bx1 + bx2) / 2, (by1 + by2) / 2)
        arrow = ax.annotate(
            "",
            xy=end,
            xytext=start,
            arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.8, "shrinkA": 0, "shrinkB": 0},
        )
        arrow.set_gid("delta_arrow")
        ax.plot(*start, "o", color=color, markersize=3)
        ax.text(
            bx2,
            by1,
            f"t=({t[0]:.2f}, {t[1]:.2f}, {t[2]:.2f}, {t[3]:.2f})",
            fontsize=7,
            color="black",
            ha="right",
            va="bottom",
            clip_on=True,
            bbox={"facecolor": color, "alpha": 0.6, "pad": 1, "edgecolor": "none"},
        )
    ax.plot([], [], ls=(0, (3, 2)), color="0.3", label="anchor (dashed)")
    ax.plot([], [], color="0.3", lw=2, label="anchor + deltas (solid)")
    ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def best_proposals(proposals, gt_boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """For each gt box, the proposal that overlaps it most: ``(rank [G] int64, iou [G] float)``.

    ``proposals`` ``[P, 4]`` sorted by decreasing score, so the index is the rank (0 = best
    score); ties in IoU go to the better-ranked proposal. With no proposals, ranks are -1 and
    IoUs 0.
    """
    from mrcnn_edu.ops import box_iou

    p = torch.as_tensor(_as_boxes(proposals, "proposals", "best_proposals"))
    g = torch.as_tensor(_as_boxes(gt_boxes, "gt_boxes", "best_proposals"))
    if len(p) == 0 or len(g) == 0:
        return torch.full((len(g),), -1, dtype=torch.int64), torch.zeros(len(g))
    iou = box_iou(g, p)  # [G, P]
    best, rank = iou.max(dim=1)  # the first maximum: the best-ranked among ties
    return rank, best


def draw_best_proposals(
    ax: Axes, image, proposals, gt_boxes, *, iou_threshold: float = 0.5, title: str | None = None
) -> Axes:
    """Each gt box (white, dashed) with the proposal that covers it best, labelled by rank and IoU.

    This is the picture behind recall (notebook 04, section 7): an object is found when *some*
    proposal overlaps it, wherever that proposal ranks. Proposals with ``IoU >= iou_threshold``
    are green, others red; the label ``#r IoU u`` has ``gid="best_proposal"``. Ranks count from
    0 (the highest objectness). Returns ``ax``.
    """
    img = image_for_display(image, "draw_best_proposals")
    H, W = img.shape[:2]
    props = _as_boxes(proposals, "proposals", "draw_best_proposals")
    rank, iou = best_proposals(props, gt_boxes)
    ax.imshow(img, extent=(0, W, H, 0))
    _gt_dashed(ax, gt_boxes, 2.0, "draw_best_proposals")
    for r, u in zip(rank.tolist(), iou.tolist()):
        if r < 0:
            continue
        x1, y1, x2, y2 = (float(v) for v in props[r])
        color = "tab:green" if u >= iou_threshold else "tab:red"
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, lw=1.8))
        ax.text(
            x1,
            y2,
            f"#{r} IoU {u:.2f}",
            fontsize=7,
            color="black",
            va="top",
            ha="left",
            clip_on=True,
            gid="best_proposal",
            bbox={"facecolor": color, "alpha": 0.75, "pad": 1, "edgecolor": "none"},
        )
    ax.plot([], [], color="tab:green", lw=2, label=f"best proposal, IoU >= {iou_threshold}")
    ax.plot([], [], color="tab:red", lw=2, label=f"best proposal, IoU < {iou_threshold}")
    ax.plot([], [], color="white", ls="--", lw=2, label="ground truth")
    leg = ax.legend(loc="lower right", fontsize=7, framealpha=0.8)
    leg.get_frame().set_facecolor("0.85")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


# --------------------------------------------------------------------------------------------
# where RoIPool and RoIAlign read the feature map (notebook 02)
# --------------------------------------------------------------------------------------------
# Everything here is drawn in the *index frame* of the feature map: the value ``f[i, j]`` lives at
# the point ``(x=j, y=i)``, and cell ``(i, j)`` is the unit square centred there. The geometry is
# not re-derived: it comes from ``mrcnn_edu.ops.roi_reference`` (``roi_align_sampling_points``,
# ``bilinear_axis``, ``roi_pool_bins``), the functions the reference operators themselves use.


def _pair(output_size, fn: str) -> tuple[int, int]:
    """``7`` -> ``(7, 7)``; ``(oh, ow)`` stays. Raises ``ValueError`` for non-positive sizes."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    oh, ow = (int(v) for v in output_size)
    if oh < 1 or ow < 1:
        raise ValueError(f"{fn}: output_size must be positive, got {tuple(output_size)}")
    return oh, ow


def _box4(box, fn: str) -> tuple[float, float, float, float]:
    """A box ``(x1, y1, x2, y2)`` as 4 Python floats (a tuple, list or 4-element tensor)."""
    if isinstance(box, torch.Tensor):
        box = box.detach().reshape(-1).tolist()
    box = [float(v) for v in box]
    if len(box) != 4:
        raise ValueError(f"{fn}: box must have 4 numbers (x1, y1, x2, y2), got {len(box)}")
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{fn}: box must be finite, got {box}")
    return box[0], box[1], box[2], box[3]


def _one_roi(box, fn: str, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([[0.0, *_box4(box, fn)]], dtype=dtype)  # [1, 5]


def roi_align_points(
    box, output_size, sampling_ratio: int = -1, aligned: bool = False, spatial_scale: float = 1.0
) -> tuple[dict, torch.Tensor]:
    """RoIAlign's geometry and sample points for one box, from the reference operator.

    Calls ``mrcnn_edu.ops.roi_reference.roi_align_sampling_points`` on the single RoI (in
    float64). Returns ``(geometry, points)``: ``geometry`` holds Python floats ``start_x,
    start_y, roi_w, roi_h, bin_w, bin_h`` and ints ``grid_w, grid_h`` (0 for an inverted box
    with ``aligned=True``, which is sampled nowhere); ``points`` is ``[oh, ow, gh, gw, 2]``
    float64 ``(x, y)``: sample ``(iy, ix)`` of bin ``(ph, pw)``.
    """
    from mrcnn_edu.ops.roi_reference import roi_align_sampling_points

    oh, ow = _pair(output_size, "sampling_points")
    rois = _one_roi(box, "sampling_points")
    g = roi_align_sampling_points(rois, (oh, ow), spatial_scale, sampling_ratio, aligned)
    gh, gw = max(int(g["grid_h"][0]), 0), max(int(g["grid_w"][0]), 0)
    x = g["x"][0, :, :gw]  # (ow, gw): bin column pw, sample ix (padding dropped)
    y = g["y"][0, :, :gh]  # (oh, gh)
    # broadcast to (oh, ow, gh, gw): x varies with (pw, ix), y with (ph, iy)
    xx = x[None, :, None, :].expand(oh, ow, gh, gw)
    yy = y[:, None, :, None].expand(oh, ow, gh, gw)
    geometry = {
        "start_x": float(g["start_w"][0]),
        "start_y": float(g["start_h"][0]),
        "roi_w": float(g["roi_w"][0]),
        "roi_h": float(g["roi_h"][0]),
        "bin_w": float(g["bin_w"][0]),
        "bin_h": float(g["bin_h"][0]),
        "grid_w": gw,
        "grid_h": gh,
    }
    return geometry, torch.stack([xx, yy], dim=-1)  # (oh, ow, gh, gw, 2)


def sampling_points(
    box, output_size, sampling_ratio: int = -1, aligned: bool = False, spatial_scale: float = 1.0
) -> torch.Tensor:
    """RoIAlign's sample points for one box, in the feature map's index frame.

    Args:
        box: ``(x1, y1, x2, y2)`` in image coordinates (4 floats or a ``[4]`` tensor).
        output_size: ``int`` or ``(oh, ow)``, the number of bins.
        sampling_ratio: points per bin side; ``<= 0`` means adaptive ``ceil(roi_size / bins)``.
        aligned: ``True`` subtracts half a cell (the half-pixel shift Detectron2 introduced after
            the paper; docs/ARCHITECTURE.md).
        spatial_scale: feature-map cells per image pixel (``1 / stride``).

    Returns:
        ``[oh, ow, gh, gw, 2]`` float64 tensor of ``(x, y)``: point ``(iy, ix)`` of bin
        ``(ph, pw)`` sits at ``start + p * bin + (i + 0.5) * bin / g`` along each axis (the
        points of ``roi_reference.roi_align_sampling_points``). A feature map ``f`` is read at
        ``(x, y)`` as ``f[y, x]`` (bilinear).

    >>> sampling_points((0, 0, 4, 4), 2, sampling_ratio=1)[..., 0, 0, :].tolist()
    [[[1.0, 1.0], [3.0, 1.0]], [[1.0, 3.0], [3.0, 3.0]]]
    """
    return roi_align_points(box, output_size, sampling_ratio, aligned, spatial_scale)[1]


def bilinear_neighbours(x: float, y: float, feature_hw) -> list[tuple[int, int, float]]:
    """The (up to) 4 cells bilinear interpolation reads at ``(x, y)``, with their weights.

    ``roi_reference.bilinear_axis`` along each axis (torchvision's border rules): a point more
    than one cell outside the map reads 0 (empty list); otherwise coordinates are clamped into
    ``[0, H-1] x [0, W-1]``.

    Returns:
        ``[(row, col, weight), ...]`` with weights ``hy*hx, hy*lx, ly*hx, ly*lx`` for the
        neighbours ``(y0, x0), (y0, x1), (y1, x0), (y1, x1)``; the weights sum to 1.
    """
    from mrcnn_edu.ops.roi_reference import bilinear_axis

    H, W = (int(v) for v in feature_hw)
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return []
    keep = torch.ones((), dtype=torch.bool)
    y0, y1, hy, ly = (
        v.item() for v in bilinear_axis(torch.tensor(float(y), dtype=torch.float64), H, keep)
    )
    x0, x1, hx, lx = (
        v.item() for v in bilinear_axis(torch.tensor(float(x), dtype=torch.float64), W, keep)
    )
    return [(y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)]


def pool_bins(
    box,
    output_size,
    spatial_scale: float = 1.0,
    feature_hw=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The cells RoIPool takes the maximum over, per bin (``roi_reference.roi_pool_bins``).

    Quantization 1: the scaled box is rounded to whole cells (C's ``round``, halves away from
    zero) and spans ``end - start + 1`` cells. Quantization 2: bin ``p`` covers cells
    ``floor(p * bin) .. ceil((p + 1) * bin)`` (half-open) after the box start. The products and
    the bin size are computed in ``dtype`` (the feature map's float type), as torchvision's
    kernel does: in float32, ``7 * (29 / 7)`` is exactly 29 while in float64 it is
    ``29.000000000000004``, whose ceil would add a cell to the last bin.

    Returns:
        ``[oh, ow, 4]`` int64 tensor of ``(y0, y1, x0, x1)``, half-open cell ranges; clipped to
        the map when ``feature_hw = (H, W)`` is given (a bin may then be empty: ``y1 <= y0``).
    """
    from mrcnn_edu.ops.roi_reference import roi_pool_bins

    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"pool_bins: dtype must be torch.float32 or torch.float64, got {dtype}")
    oh, ow = _pair(output_size, "pool_bins")
    rois = _one_roi(box, "pool_bins", dtype)
    H, W = (int(v) for v in feature_hw) if feature_hw is not None else (None, None)
    hs, he, ws, we = (t[0] for t in roi_pool_bins(rois, (oh, ow), spatial_scale, H, W))
    # (oh,) and (ow,) edges -> (oh, ow, 4) rows (y0, y1, x0, x1)
    return torch.stack(
        [
            hs[:, None].expand(oh, ow),
            he[:, None].expand(oh, ow),
            ws[None, :].expand(oh, ow),
            we[None, :].expand(oh, ow),
        ],
        dim=-1,
    )


_BIN_COLOURS = (
    "tab:orange",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)


def _draw_grid(ax: Axes, H: int, W: int, values=None) -> None:
    """Cells as unit squares centred on the integer points where the feature values live."""
    if values is not None:
        v = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else values
        ax.imshow(
            v,
            cmap="Greys",
            extent=(-0.5, W - 0.5, H - 0.5, -0.5),
            alpha=0.5,
            interpolation="nearest",
        )
    for i in range(H + 1):
        ax.axhline(i - 0.5, color="0.75", lw=0.8, zorder=1)
    for j in range(W + 1):
        ax.axvline(j - 0.5, color="0.75", lw=0.8, zorder=1)
    jj, ii = np.meshgrid(np.arange(W), np.arange(H), indexing="xy")
    ax.scatter(jj.reshape(-1), ii.reshape(-1), s=6, color="0.6", zorder=2, gid="cell_centres")
    ax.set_xlim(-1.0, W)
    ax.set_ylim(H, -1.0)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x (feature cells)")
    ax.set_ylabel("y (feature cells)")


def draw_roi_sampling(
    ax: Axes,
    feature_hw=(8, 8),
    box=(1.3, 1.2, 5.7, 6.4),
    output_size=2,
    sampling_ratio: int = 2,
    aligned: bool = False,
    method: str = "align",
    spatial_scale: float = 1.0,
    highlight=(0, 0, 0, 0),
    values=None,
) -> Axes:
    """Draw where RoIAlign (``method="align"``) or RoIPool (``"pool"``) reads a feature map.

    Args:
        ax: a matplotlib ``Axes``.
        feature_hw: ``(H, W)`` of the feature map.
        box: ``(x1, y1, x2, y2)`` in image coordinates; ``spatial_scale`` maps it to cells.
        output_size, sampling_ratio, aligned, spatial_scale: as in ``roi_align`` / ``roi_pool``.
        highlight: ``(ph, pw, iy, ix)`` of one sampling point whose 4 bilinear neighbours are
            drawn with their weights (``None`` for none; only for ``"align"``).
        values: optional ``[H, W]`` feature map shown under the grid.

    Returns:
        ``ax``. The box as given (scaled) is the dashed rectangle with ``gid="given_box"``; the
        box the operator reads is ``gid="roi_box"`` (RoIAlign with ``aligned=True`` reads it half
        a cell up and left, and an arrow shows the shift). The sampling points are the scatter
        with ``gid="sampling_points"`` (offsets are the ``(x, y)`` of :func:`sampling_points`,
        flattened in ``(ph, pw, iy, ix)`` order); RoIPool's bins are the rectangles with
        ``gid="pool_bin"``.
    """
    if method not in ("align", "pool"):
        raise ValueError(f"draw_roi_sampling: method must be 'align' or 'pool', got {method!r}")
    H, W = (int(v) for v in feature_hw)
    oh, ow = _pair(output_size, "draw_roi_sampling")
    x1, y1, x2, y2 = _box4(box, "draw_roi_sampling")
    _draw_grid(ax, H, W, values)
    s = spatial_scale
    given = Rectangle(
        (x1 * s, y1 * s),
        (x2 - x1) * s,
        (y2 - y1) * s,
        fill=False,
        lw=1.5,
        ls="--",
        ec="tab:blue",
        zorder=4,
        gid="given_box",
    )
    if method == "align":
        g, pts = roi_align_points(box, (oh, ow), sampling_ratio, aligned, s)
        xs, ys, rw, rh = g["start_x"], g["start_y"], g["roi_w"], g["roi_h"]
        bw, bh = g["bin_w"], g["bin_h"]
        if aligned:  # the given box, dashed grey, and the half-cell shift to the box read
            given.set_edgecolor("0.35")
            ax.add_patch(given)
            # the shift drawn at the bottom-right corner, away from the highlighted point
            ax.annotate(
                "",
                xy=(xs + rw, ys + rh),
                xytext=(x2 * s, y2 * s),
                zorder=8,
                arrowprops={
                    "arrowstyle": "->",
                    "color": "black",
                    "lw": 1.2,
                    "shrinkA": 0,
                    "shrinkB": 0,
                },
            )
            ax.text(
                x2 * s + 0.1, y2 * s + 0.1, "-0.5, -0.5", fontsize=7, ha="left", va="top", zorder=8
            )
        ax.add_patch(
            Rectangle((xs, ys), rw, rh, fill=False, lw=2, ec="tab:blue", zorder=4, gid="roi_box")
        )
        for p in range(1, ow):  # bin edges
            ax.plot([xs + p * bw] * 2, [ys, ys + rh], color="tab:blue", lw=1, ls="--", zorder=4)
        for p in range(1, oh):
            ax.plot([xs, xs + rw], [ys + p * bh] * 2, color="tab:blue", lw=1, ls="--", zorder=4)
        flat = pts.reshape(-1, 2)  # (oh*ow*gh*gw, 2) in (ph, pw, iy, ix) order
        ax.scatter(
            flat[:, 0].numpy(),
            flat[:, 1].numpy(),
            s=22,
            color="tab:red",
            zorder=6,
            gid="sampling_points",
        )
        gh, gw = pts.shape[2], pts.shape[3]
        if highlight is not None and gh > 0 and gw > 0:
            ph, pw, iy, ix = highlight
            ph, pw, iy, ix = min(ph, oh - 1), min(pw, ow - 1), min(iy, gh - 1), min(ix, gw - 1)
            x, y = (float(v) for v in pts[ph, pw, iy, ix])
            ax.scatter([x], [y], s=90, facecolor="none", edgecolor="black", lw=1.5, zorder=7)
            for row, col, w in bilinear_neighbours(x, y, (H, W)):
                ax.plot([x, col], [y, row], color="black", lw=0.8, zorder=5)
                ax.scatter(
                    [col],
                    [row],
                    s=40 + 200 * w,
                    marker="s",
                    color="gold",
                    edgecolor="black",
                    zorder=5,
                    gid="neighbours",
                )
                ax.annotate(
                    f"{w:.2f}",
                    (col, row),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    zorder=8,
                )
        shift = "box read 0.5 cell up-left (half-pixel shift)" if aligned else "box as given"
        ax.set_title(
            f"RoIAlign {oh}x{ow}, {gh}x{gw} points/bin\naligned={aligned}: {shift}", fontsize=10
        )
    else:
        # the exact box (dashed), then the cells RoIPool really uses (quantized twice)
        ax.add_patch(given)
        bins = pool_bins(box, (oh, ow), s, (H, W))
        for ph in range(oh):
            for pw in range(ow):
                a, b, c, d = (int(v) for v in bins[ph, pw])
                colour = _BIN_COLOURS[(ph * ow + pw) % len(_BIN_COLOURS)]
                ax.add_patch(
                    Rectangle(
                        (c - 0.5, a - 0.5),
                        max(d - c, 0),
                        max(b - a, 0),
                        fill=True,
                        alpha=0.3,
                        fc=colour,
                        ec=colour,
                        lw=2,
                        zorder=3,
                        gid="pool_bin",
                    )
                )
        ax.set_title(f"RoIPool {oh}x{ow}\nbox and bins rounded to whole cells", fontsize=10)
    return ax


def draw_roi_comparison(
    feature_hw=(8, 8),
    box=(1.3, 1.2, 5.7, 6.4),
    output_size=2,
    sampling_ratio: int = 2,
    aligned: bool = False,
    highlight=(0, 0, 0, 0),
) -> Figure:
    """RoIPool (left) and RoIAlign (right) on the same box and feature map (notebook 02's figure).

    Both panels draw the box exactly where it is given (dashed blue). RoIPool then snaps it and
    its bins to whole cells (coloured blocks); RoIAlign keeps it and places sample points.
    With the default ``aligned=False`` (the paper's RoIAlign) both operators start from the
    same box; ``aligned=True`` adds the later half-pixel shift, drawn as an arrow. Returns the
    ``Figure``; the suptitle names the box.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    draw_roi_sampling(axes[0], feature_hw, box, output_size, method="pool")
    draw_roi_sampling(
        axes[1], feature_hw, box, output_size, sampling_ratio, aligned, "align", highlight=highlight
    )
    x1, y1, x2, y2 = _box4(box, "draw_roi_comparison")
    fig.suptitle(
        f"the same box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) in feature cells, dashed in both panels",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# the RoI heads: sampled RoIs, per-class NMS, mask targets, mask probabilities, pasting
# (notebooks 05 and 06)
# --------------------------------------------------------------------------------------------

__all__ += [
    "draw_mask_probs",
    "draw_mask_target",
    "draw_nms_result",
    "draw_paste_steps",
    "draw_sampled_rois",
]


def _as_labels(labels, n: int, name: str, fn: str) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    lab = lab.reshape(-1)
    if lab.shape[0] != n:
        raise ValueError(f"{fn}: {name} has {lab.shape[0]} entries for {n} boxes")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"{fn}: {name} must be integers, got dtype {lab.dtype}")
    return lab.astype(np.int64)


def _class_name(label: int, class_names) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return f"class {label}"


def draw_sampled_rois(
    ax: Axes,
    image,
    rois,
    labels,
    *,
    gt_boxes=None,
    class_names=None,
    max_negatives: int | None = None,
    title: str | None = None,
) -> Axes:
    """The RoIs the box head trains on for one image (Fast R-CNN sec. 2.3, Mask R-CNN sec. 3.1).

    Args:
        ax: matplotlib axes; image: ``[3, H, W]`` tensor or ``[H, W, 3]`` array.
        rois: ``[S, 4]`` sampled RoIs (x1, y1, x2, y2), as ``heads.sample_proposals`` returns.
        labels: ``[S]`` int, ``0`` negative (background), ``c >= 1`` positive of class ``c``.
        gt_boxes: optional ``[G, 4]`` ground truth. A sampled RoI *equal* to a gt box is one
            that ``matching.add_gt_proposals`` appended; it is drawn white and dashed.
        class_names: ``class_names[c]`` for the legend (index 0 = background).
        max_negatives: draw at most this many negatives (evenly spaced in the list); all are
            counted in the legend.

    Positives are drawn in their class colour (``gid="positive_roi"``), appended gt boxes
    white dashed on top (``gid="gt_roi"``), negatives thin red (``gid="negative_roi"``).
    Returns ``ax``.
    """
    fn = "draw_sampled_rois"
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    boxes = _as_boxes(rois, "rois", fn)
    lab = _as_labels(labels, len(boxes), "labels", fn)
    if (lab < 0).any():
        raise ValueError(f"{fn}: labels must be >= 0 (ignored RoIs, -1, are never sampled)")
    from_gt = np.zeros(len(boxes), dtype=bool)
    if gt_boxes is not None:
        gt = _as_boxes(gt_boxes, "gt_boxes", fn)
        if len(gt):
            from_gt = (boxes[:, None, :] == gt[None, :, :]).all(-1).any(-1)  # [S, G] -> [S]
    neg = np.flatnonzero(lab == 0)
    shown = neg
    if max_negatives is not None and len(neg) > max_negatives:
        pick = np.unique(np.linspace(0, len(neg) - 1, max(int(max_negatives), 0)).round())
        shown = neg[pick.astype(np.int64)] if max_negatives > 0 else neg[:0]
    ax.imshow(img, extent=(0, W, H, 0))
    for x1, y1, x2, y2 in boxes[shown]:
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor="tab:red",
                linewidth=0.7,
                alpha=0.6,
                gid="negative_roi",
            )
        )
    pos = np.flatnonzero(lab > 0)
    for i in pos:
        x1, y1, x2, y2 = boxes[i]
        if from_gt[i]:
            continue
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=class_color(lab[i]),
                linewidth=1.3,
                gid="positive_roi",
            )
        )
    for i in np.flatnonzero(from_gt):
        x1, y1, x2, y2 = boxes[i]
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor="white",
                linewidth=2.2,
                linestyle="--",
                gid="gt_roi",
            )
        )
    for c in np.unique(lab[pos]):
        n_c = int((lab[pos] == c).sum())
        ax.plot(
            [],
            [],
            color=class_color(c),
            lw=2,
            label=f"positive: {_class_name(int(c), class_names)} ({n_c})",
        )
    ax.plot(
        [],
        [],
        color="white",
        lw=2,
        ls="--",
        label=f"gt box appended, sampled ({int(from_gt.sum())})",
    )
    drawn = f", {len(shown)} drawn" if len(shown) < len(neg) else ""
    ax.plot([], [], color="tab:red", lw=1, label=f"negative ({len(neg)}{drawn})")
    leg = ax.legend(loc="lower right", fontsize=7, framealpha=0.85)
    leg.get_frame().set_facecolor("0.85")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title(
        title if title is not None else f"{len(pos)} positive : {len(neg)} negative RoIs",
        fontsize=9,
    )
    return ax


def draw_nms_result(
    ax: Axes,
    image,
    boxes,
    scores,
    labels,
    keep,
    *,
    class_names=None,
    title: str | None = None,
    legend: bool = True,
) -> Axes:
    """Candidate detections before and after NMS in one picture.

    Args:
        ax: matplotlib axes; image: as :func:`draw_sampled_rois`.
        boxes: ``[N, 4]`` candidates (x1, y1, x2, y2); scores: ``[N]``; labels: ``[N]`` int
            classes (colours).
        keep: indices into the candidates that survive (what ``ops.nms`` / ``batched_nms``
            return).
        class_names: for the legend, which counts candidates -> kept per class.

    Kept boxes are solid and thick with their score (``gid="kept_box"``); suppressed ones thin
    and dashed (``gid="suppressed_box"``). Returns ``ax``.
    """
    fn = "draw_nms_result"
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    b = _as_boxes(boxes, "boxes", fn)
    s = (
        scores.detach().cpu().float().numpy()
        if isinstance(scores, torch.Tensor)
        else np.asarray(scores, dtype=np.float32)
    ).reshape(-1)
    if s.shape[0] != len(b):
        raise ValueError(f"{fn}: scores has {s.shape[0]} entries for {len(b)} boxes")
    lab = _as_labels(labels, len(b), "labels", fn)
    k = _as_labels(keep, len(keep), "keep", fn) if len(keep) else np.zeros(0, np.int64)
    if len(k) and (k.min() < 0 or k.max() >= len(b)):
        raise ValueError(f"{fn}: keep holds indices outside [0, {len(b)})")
    kept = np.zeros(len(b), dtype=bool)
    kept[k] = True
    ax.imshow(img, extent=(0, W, H, 0))
    for i in np.flatnonzero(~kept):
        x1, y1, x2, y2 = b[i]
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=class_color(lab[i]),
                linewidth=0.8,
                linestyle="--",
                alpha=0.7,
                gid="suppressed_box",
            )
        )
    for i in np.flatnonzero(kept):
        x1, y1, x2, y2 = b[i]
        color = class_color(lab[i])
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=color,
                linewidth=2.2,
                gid="kept_box",
            )
        )
        ax.text(
            x1,
            y1,
            f"{_class_name(int(lab[i]), class_names)} {s[i]:.2f}",
            fontsize=6.5,
            va="bottom",
            ha="left",
            clip_on=True,
            bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"},
        )
    if legend and len(b):
        for c in np.unique(lab):
            ax.plot(
                [],
                [],
                color=class_color(c),
                lw=2,
                label=f"{_class_name(int(c), class_names)}: {int((lab == c).sum())} -> "
                f"{int((kept & (lab == c)).sum())} kept",
            )
        ax.plot([], [], color="0.3", lw=0.8, ls="--", label="suppressed (dashed)")
        leg = ax.legend(loc="lower right", fontsize=7, framealpha=0.85)
        leg.get_frame().set_facecolor("0.85")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def _one_box(box, fn: str) -> torch.Tensor:
    arr = box.detach().cpu() if isinstance(box, torch.Tensor) else torch.as_tensor(box)
    b = torch.as_tensor(
        _as_boxes(arr.reshape(-1, 4) if arr.numel() == 4 else arr, "box", fn), dtype=torch.float32
    )
    if b.shape[0] != 1:
        raise ValueError(f"{fn}: box must be one (x1, y1, x2, y2), got {b.shape[0]} boxes")
    return b  # [1, 4]


def _zoom(ax: Axes, box, H: int, W: int, margin: float = 0.35) -> None:
    """Show the box with ``margin`` of its size around it (within the image)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = max((x2 - x1) * margin, 4.0), max((y2 - y1) * margin, 4.0)
    ax.set_xlim(max(x1 - mx, 0.0), min(x2 + mx, W))
    ax.set_ylim(min(y2 + my, H), max(y1 - my, 0.0))


def draw_mask_target(
    image,
    gt_masks,
    box,
    matched_idx: int,
    *,
    M: int = 28,
    gt_boxes=None,
    label: int | None = None,
    class_names=None,
    fig: Figure | None = None,
    title: str | None = None,
) -> Figure:
    """One RoI's mask target beside the image crop it is cut from (Mask R-CNN sec. 3).

    The target is ``heads.mask_targets(gt_masks, box, matched_idx, M)``: the matched object's
    gt mask, RoIAligned onto the RoI (``aligned=False``, adaptive sampling, as torchvision).

    Three panels: (1) the image around the RoI (yellow) with the matched gt mask filled in its
    class colour and the other objects' outlines; (2) the image inside the RoI, resampled the
    same way at ``4 M`` pixels a side, with the target's 0.5 contour; (3) the ``M x M`` target
    (``gid="mask_target"``; its array is the target) with the 0.5 contour.

    Args:
        image: ``[3, H, W]`` tensor; gt_masks: ``[G, H, W]`` binary masks.
        box: the RoI ``(x1, y1, x2, y2)``; matched_idx: its gt index in ``[0, G)``.
        M: target resolution (28 in the paper).
        gt_boxes: optional ``[G, 4]``: the title then gives the RoI's IoU with its gt box.
        label: the RoI's class (colour and name), default the colour of class 1.
        fig: draw into this figure (cleared); by default a new ``Figure`` (not pyplot's).

    Returns the ``Figure``.
    """
    from mrcnn_edu.heads.mask_head import mask_targets
    from mrcnn_edu.ops import box_iou, roi_align

    fn = "draw_mask_target"
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    masks = torch.as_tensor(gt_masks)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (H, W):
        raise ValueError(
            f"{fn}: gt_masks must be [G, {H}, {W}] (the image's size), got {tuple(masks.shape)}"
        )
    b = _one_box(box, fn)
    G = masks.shape[0]
    g = int(matched_idx)
    if not 0 <= g < G:
        raise ValueError(f"{fn}: matched_idx must lie in [0, {G}), got {g}")
    target = mask_targets(masks, b, torch.tensor([g]), int(M))[0]  # [M, M]
    pixels = torch.as_tensor(img).permute(2, 0, 1)[None].float()  # [H, W, 3] -> [1, 3, H, W]
    rois = torch.cat([torch.zeros(1, 1), b], dim=1)  # [1, 5], batch index 0
    crop = roi_align(pixels, rois, (4 * int(M), 4 * int(M)), 1.0, -1, False)[0]  # [3, 4M, 4M]
    crop = crop.permute(1, 2, 0).clamp(0, 1).numpy()  # [4M, 4M, 3]
    color = class_color(label if label is not None else 1)

    if fig is None:
        fig = Figure(figsize=(11, 3.8))
    fig.clear()
    ax0, ax1, ax2 = fig.subplots(1, 3)
    m = masks[g].cpu().numpy().astype(bool)
    shown = img.copy()
    shown[m] = 0.5 * shown[m] + 0.5 * np.asarray(color, np.float32)
    ax0.imshow(shown, extent=(0, W, H, 0))
    for j in range(G):
        if j != g and masks[j].any():
            ax0.contour(
                np.arange(W) + 0.5,
                np.arange(H) + 0.5,
                masks[j].cpu().numpy().astype(np.float32),
                levels=[0.5],
                colors=["white"],
                linewidths=0.8,
            )
    x1, y1, x2, y2 = b[0].tolist()
    ax0.add_patch(
        Rectangle(
            (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=2.0, gid="roi_box"
        )
    )
    _zoom(ax0, (x1, y1, x2, y2), H, W, margin=0.6)
    ax0.set_title(f"RoI (yellow) and gt mask {g}", fontsize=9)

    t = target.numpy()
    grid = (np.arange(M) + 0.5) * 4  # target pixel centres in the 4M crop
    ax1.imshow(crop, extent=(0, 4 * M, 4 * M, 0))
    if t.max() >= 0.5 and t.min() < 0.5:
        ax1.contour(grid, grid, t, levels=[0.5], colors=["yellow"], linewidths=1.5)
    ax1.set_title(f"the image inside the RoI ({x2 - x1:.0f} x {y2 - y1:.0f} px)", fontsize=9)
    ax1.set_xticks([])
    ax1.set_yticks([])

    im = ax2.imshow(
        t, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, M, M, 0), interpolation="nearest"
    )
    im.set_gid("mask_target")
    if t.max() >= 0.5 and t.min() < 0.5:
        ax2.contour(
            np.arange(M) + 0.5,
            np.arange(M) + 0.5,
            t,
            levels=[0.5],
            colors=["yellow"],
            linewidths=1.0,
        )
    ax2.set_title(f"{M} x {M} target (yellow: 0.5)", fontsize=9)
    fig.colorbar(im, ax=ax2, shrink=0.8)
    if title is None:
        name = _class_name(int(label), class_names) if label is not None else f"gt {g}"
        title = f"RoI ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}) matched to {name}"
        if gt_boxes is not None:
            gb = torch.as_tensor(_as_boxes(gt_boxes, "gt_boxes", fn), dtype=torch.float32)
            if gb.shape[0] != G:
                raise ValueError(f"{fn}: gt_boxes has {gb.shape[0]} boxes for {G} masks")
            title += f" (IoU {float(box_iou(b, gb[g : g + 1])[0, 0]):.2f})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def draw_mask_probs(
    probs,
    targets=None,
    *,
    row_names=None,
    col_names=None,
    threshold: float = 0.5,
    fig: Figure | None = None,
) -> Figure:
    """A grid of ``M x M`` mask probabilities: one row per setting, one column per RoI.

    Args:
        probs: ``[R, P, M, M]`` probabilities in ``[0, 1]`` (e.g. ``heads.mask_inference`` for
            R losses and P RoIs).
        targets: optional ``[P, M, M]`` targets: their 0.5 contour is drawn white and dashed,
            and each panel's title gives the IoU of ``probs >= threshold`` with
            ``targets >= 0.5``.
        row_names, col_names: labels of the rows (left) and columns (top).
        threshold: the red contour and the IoU use ``probs >= threshold``.
        fig: draw into this figure (cleared); by default a new ``Figure``.

    Each panel's image has ``gid="mask_prob"``. Returns the ``Figure``.
    """
    fn = "draw_mask_probs"
    p = torch.as_tensor(probs).detach().cpu().float()
    if p.dim() != 4 or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"{fn}: probs must be [R, P, M, M], got {tuple(p.shape)}")
    R, P, M, _ = p.shape
    t = None
    if targets is not None:
        t = torch.as_tensor(targets).detach().cpu().float()
        if tuple(t.shape) != (P, M, M):
            raise ValueError(
                f"{fn}: targets must be [P, M, M] = [{P}, {M}, {M}], got {tuple(t.shape)}"
            )
    for name, names, n in (("row_names", row_names, R), ("col_names", col_names, P)):
        if names is not None and len(names) != n:
            raise ValueError(f"{fn}: {name} has {len(names)} entries for {n}")
    if fig is None:
        fig = Figure(figsize=(2.3 * P + 1.0, 2.3 * R + 0.4))
    fig.clear()
    axes = np.asarray(fig.subplots(R, P, squeeze=False))
    centres = np.arange(M) + 0.5
    im = None
    for r in range(R):
        for c in range(P):
            ax = axes[r, c]
            pr = p[r, c].numpy()
            im = ax.imshow(
                pr, cmap="viridis", vmin=0.0, vmax=1.0, extent=(0, M, M, 0), interpolation="nearest"
            )
            im.set_gid("mask_prob")
            if pr.max() >= threshold > pr.min():
                ax.contour(centres, centres, pr, levels=[threshold], colors=["red"], linewidths=1.2)
            text = f"max p {pr.max():.2f}"
            if t is not None:
                tc = t[c].numpy()
                if tc.max() >= 0.5 > tc.min():
                    ax.contour(
                        centres,
                        centres,
                        tc,
                        levels=[0.5],
                        colors=["white"],
                        linewidths=1.0,
                        linestyles="--",
                    )
                fg, gt = pr >= threshold, tc >= 0.5
                iou = (fg & gt).sum() / max((fg | gt).sum(), 1)
                text = f"IoU {iou:.2f}, " + text
            ax.set_title(text, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and row_names is not None:
                ax.set_ylabel(str(row_names[r]), fontsize=9)
            if r == 0 and col_names is not None:
                ax.set_title(f"{col_names[c]}\n{text}", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="mask probability")
    return fig


def draw_paste_steps(
    mask,
    box,
    image_size,
    *,
    gt_mask=None,
    padding: int = 1,
    threshold: float = 0.5,
    fig: Figure | None = None,
) -> Figure:
    """How an ``M x M`` mask goes back into the image (``heads.paste_masks_in_image``).

    Four panels: (1) the mask padded with ``padding`` zero pixels (``heads.expand_masks``);
    (2) the detection box (dashed), the box grown by ``(M + 2 padding) / M``
    (``heads.expand_boxes``) and the whole pixels it covers after truncation (filled); (3)
    the pasted probabilities (``gid="pasted"``; the array is ``paste_masks_in_image``'s);
    (4) the binary mask ``>= threshold`` (``gid="binary"``) with ``gt_mask``'s outline (white,
    dashed) and their IoU when ``gt_mask`` is given.

    Args:
        mask: ``[M, M]`` (or ``[1, M, M]``) probabilities; box: ``(x1, y1, x2, y2)`` pixels.
        image_size: ``(h, w)``; gt_mask: optional ``[h, w]`` binary mask.
        fig: draw into this figure (cleared); by default a new ``Figure``.

    Returns the ``Figure``.
    """
    from mrcnn_edu.heads.mask_head import expand_boxes, expand_masks, paste_masks_in_image

    fn = "draw_paste_steps"
    m = torch.as_tensor(mask).detach().cpu().float()
    m = m[0] if m.dim() == 3 and m.shape[0] == 1 else m
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{fn}: mask must be [M, M] (or [1, M, M]), got {tuple(m.shape)}")
    M = m.shape[0]
    b = _one_box(box, fn)
    h, w = (int(v) for v in image_size)
    padded, scale = expand_masks(m[None, None], int(padding))  # [1, 1, M + 2p, M + 2p]
    grown = expand_boxes(b, scale)  # [1, 4] float
    ib = grown.to(torch.int64)[0].tolist()  # truncation toward zero, as the paste does
    pasted = paste_masks_in_image(m[None, None], b, (h, w), int(padding))[0, 0]  # [h, w]
    binary = pasted >= threshold
    gt = None
    if gt_mask is not None:
        gt = torch.as_tensor(gt_mask).detach().cpu()
        if tuple(gt.shape) != (h, w):
            raise ValueError(f"{fn}: gt_mask must be [{h}, {w}], got {tuple(gt.shape)}")
        gt = gt.bool()

    if fig is None:
        fig = Figure(figsize=(13, 3.6))
    fig.clear()
    axes = fig.subplots(1, 4)
    Mp = padded.shape[-1]
    axes[0].imshow(
        padded[0, 0].numpy(),
        cmap="viridis",
        vmin=0,
        vmax=1,
        extent=(0, Mp, Mp, 0),
        interpolation="nearest",
    )
    axes[0].add_patch(
        Rectangle(
            (padding, padding), M, M, fill=False, edgecolor="white", linewidth=1.0, linestyle="--"
        )
    )
    axes[0].set_title(f"1. {M}x{M} mask padded to {Mp}x{Mp}", fontsize=9)

    x1, y1, x2, y2 = b[0].tolist()
    gx1, gy1, gx2, gy2 = grown[0].tolist()
    axes[1].imshow(np.zeros((h, w)), cmap="Greys", vmin=0, vmax=1, extent=(0, w, h, 0))
    # the integer box covers pixels ib[0] .. ib[2] and ib[1] .. ib[3] inclusive
    axes[1].add_patch(
        Rectangle(
            (ib[0], ib[1]),
            ib[2] - ib[0] + 1,
            ib[3] - ib[1] + 1,
            facecolor="tab:orange",
            alpha=0.35,
            edgecolor="tab:orange",
            gid="paste_pixels",
        )
    )
    axes[1].add_patch(
        Rectangle(
            (x1, y1),
            x2 - x1,
            y2 - y1,
            fill=False,
            edgecolor="tab:blue",
            linewidth=1.5,
            linestyle="--",
            gid="box",
        )
    )
    axes[1].add_patch(
        Rectangle(
            (gx1, gy1),
            gx2 - gx1,
            gy2 - gy1,
            fill=False,
            edgecolor="tab:red",
            linewidth=1.2,
            gid="grown_box",
        )
    )
    axes[1].plot([], [], color="tab:blue", ls="--", label="detection box")
    axes[1].plot([], [], color="tab:red", label=f"grown x {scale:.3f}")
    axes[1].plot([], [], color="tab:orange", lw=6, alpha=0.5, label="whole pixels pasted")
    axes[1].legend(loc="lower right", fontsize=7)
    axes[1].set_title("2. box grown, cut to whole pixels", fontsize=9)

    im = axes[2].imshow(
        pasted.numpy(), cmap="viridis", vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="nearest"
    )
    im.set_gid("pasted")
    axes[2].set_title("3. resized (bilinear) and pasted", fontsize=9)
    bi = axes[3].imshow(
        binary.numpy().astype(np.float32),
        cmap="gray",
        vmin=0,
        vmax=1,
        extent=(0, w, h, 0),
        interpolation="nearest",
    )
    bi.set_gid("binary")
    title = f"4. probability >= {threshold}"
    if gt is not None:
        if gt.any():
            axes[3].contour(
                np.arange(w) + 0.5,
                np.arange(h) + 0.5,
                gt.numpy().astype(np.float32),
                levels=[0.5],
                colors=["tab:red"],
                linewidths=1.0,
                linestyles="--",
            )
        iou = float((binary & gt).sum()) / max(float((binary | gt).sum()), 1.0)
        title += f": IoU {iou:.3f} with gt (red)"
    axes[3].set_title(title, fontsize=9)
    for ax in axes[1:]:
        _zoom(ax, (gx1, gy1, gx2, gy2), h, w, margin=0.25)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# 07: FPN levels, the feature pyramid, parameters per part, the forward pass stage by stage
# (notebook 07_fpn_full_model.ipynb; the explorer is mrcnn_edu.widgets.fpn_levels)
# --------------------------------------------------------------------------------------------

#: Colour of each pyramid level P2..P6 in every drawing of notebook 07.
LEVEL_COLORS: dict[int, str] = {
    2: "tab:blue",
    3: "tab:green",
    4: "tab:orange",
    5: "tab:red",
    6: "tab:purple",
}


def _level_color(k: int) -> str:
    return LEVEL_COLORS.get(int(k), "0.4")


def box_levels(boxes, k_min: int = 2, k_max: int = 5) -> np.ndarray:
    """Pyramid level ``k`` (not an index) of every box, by the pooler's own rule.

    ``boxes [K, 4]`` (x1, y1, x2, y2) pixels -> ``[K]`` int64 levels in ``k_min..k_max``:
    :func:`mrcnn_edu.poolers.assign_levels` (Eqn. (1) of the FPN paper) plus ``k_min``. The
    boxes are taken as float32, the dtype the model's boxes have.
    """
    from mrcnn_edu.poolers import assign_levels

    b = torch.as_tensor(_as_boxes(boxes, "boxes", "box_levels"), dtype=torch.float32)
    return (assign_levels(b, k_min, k_max) + int(k_min)).numpy()


def box_wh(size: float, aspect: float) -> tuple[float, float]:
    """``(w, h)`` of a box with ``sqrt(w h) = size`` and ``h / w = aspect`` (the anchors' rule:
    ``w = size / sqrt(aspect)``, ``h = size * sqrt(aspect)``)."""
    size, aspect = float(size), float(aspect)
    if not (size > 0 and aspect > 0 and math.isfinite(size) and math.isfinite(aspect)):
        raise ValueError(
            f"box_wh: size and aspect must be positive and finite, got {size}, {aspect}"
        )
    return size / math.sqrt(aspect), size * math.sqrt(aspect)


def draw_level_rule(
    ax: Axes,
    boxes=None,
    *,
    k_min: int = 2,
    k_max: int = 5,
    size_range: tuple[float, float] = (8.0, 2048.0),
    title: str | None = None,
) -> Axes:
    """FPN's level rule as a staircase: level ``k`` against the RoI size ``sqrt(w h)``.

    The solid staircase is :func:`mrcnn_edu.poolers.assign_levels` evaluated on square boxes of
    every size in ``size_range`` (``gid="rule"``); the dotted line is Eqn. (1) before the floor
    and the clamp, ``4 + log2(sqrt(w h) / 224)``; dashed verticals mark the sizes where the
    level changes (``224 * 2**(k - 4)``: 112, 224, 448 for P2..P5). ``boxes`` (``[K, 4]``,
    optional) are scattered on the staircase at their own level (``gid="roi_P<k>"`` per level),
    with their count per level in the legend. Returns ``ax``.
    """
    from mrcnn_edu.poolers import CANONICAL_LEVEL, CANONICAL_SCALE

    lo, hi = (float(v) for v in size_range)
    if not 0 < lo < hi:
        raise ValueError(f"draw_level_rule: size_range must be 0 < low < high, got {size_range}")
    s = np.geomspace(lo, hi, 1200)
    squares = np.stack([np.zeros_like(s), np.zeros_like(s), s, s], axis=1)
    k = box_levels(squares, k_min, k_max)
    ax.plot(
        s,
        k,
        color="0.15",
        lw=2,
        drawstyle="steps-post",
        gid="rule",
        label="assign_levels (floor, clamped)",
    )
    ax.plot(
        s,
        CANONICAL_LEVEL + np.log2(s / CANONICAL_SCALE),
        ":",
        color="0.45",
        label=f"{CANONICAL_LEVEL} + log2(sqrt(wh) / {CANONICAL_SCALE})",
    )
    for j in range(k_min + 1, k_max + 1):
        edge = CANONICAL_SCALE * 2.0 ** (j - CANONICAL_LEVEL)
        if lo < edge < hi:
            ax.axvline(edge, color=_level_color(j), ls="--", lw=1)
            ax.text(
                edge,
                k_min - 0.35,
                f"{edge:g}",
                color=_level_color(j),
                ha="center",
                va="top",
                fontsize=8,
            )
    if boxes is not None:
        b = _as_boxes(boxes, "boxes", "draw_level_rule")
        levels = box_levels(b, k_min, k_max)
        size = np.sqrt(np.clip((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 0, None))
        # a small deterministic vertical spread so that the points do not hide each other
        spread = (np.arange(len(b)) % 7 - 3) * 0.04
        for lev in range(k_min, k_max + 1):
            m = levels == lev
            if m.any():
                ax.scatter(
                    size[m],
                    lev + spread[m],
                    s=10,
                    color=_level_color(lev),
                    alpha=0.7,
                    gid=f"roi_P{lev}",
                    label=f"P{lev}: {int(m.sum())} RoIs",
                    zorder=3,
                )
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(k_min - 0.8, k_max + 0.6)
    ax.set_yticks(range(k_min, k_max + 1), [f"P{j}" for j in range(k_min, k_max + 1)])
    ax.set_xlabel("RoI size sqrt(w h) [input pixels]")
    ax.set_ylabel("pyramid level k")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(
        title
        if title is not None
        else f"k = floor(4 + log2(sqrt(wh) / 224)), clamped to {k_min}..{k_max}",
        fontsize=9,
    )
    return ax


def draw_fpn_levels(
    box_size: tuple[float, float],
    *,
    image_size: tuple[int, int] = (800, 800),
    k_min: int = 2,
    k_max: int = 5,
    rpn_levels: int = 1,
    output_size: int = 7,
    fig: Figure | None = None,
) -> Figure:
    """Which pyramid level pools an RoI of ``box_size = (w, h)`` pixels, drawn on the pyramid.

    Left: the pyramid ``P2 .. P5`` of an ``image_size`` input (and ``rpn_levels`` extra levels
    such as P6, hatched: only the RPN uses them), finest at the bottom, drawn as planes seen at a
    slant in the style of the FPN paper's figures (not to scale: each plane is 0.8 times as
    wide as the one below; the text gives the real map size and the box's size in cells), with
    the box covering the same fraction of every plane; the level chosen by
    :func:`mrcnn_edu.poolers.assign_levels` is filled (``gid="assigned_level"``). Right: one
    close-up per level over the same image window: the level's cells as a checkerboard
    (stride ``2**k`` pixels), the box and its ``output_size x output_size`` pooling bins. On
    the chosen level a bin spans about 2-4 cells (the box is 14-28 cells wide when unclamped).

    Returns the ``Figure``; ``fig.fpn_level`` is the chosen ``k``.
    """
    from matplotlib.patches import Polygon

    from mrcnn_edu.poolers import CANONICAL_LEVEL, CANONICAL_SCALE

    fn = "draw_fpn_levels"
    w, h = (float(v) for v in box_size)
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise ValueError(f"{fn}: box_size must be two positive numbers (w, h), got {box_size}")
    H, W = (int(v) for v in image_size)
    if H <= 0 or W <= 0:
        raise ValueError(f"{fn}: image_size must be positive (H, W), got {image_size}")
    if int(k_min) != k_min or int(k_max) != k_max or not 0 <= k_min <= k_max:
        raise ValueError(f"{fn}: need integer levels 0 <= k_min <= k_max, got {k_min}, {k_max}")
    k_min, k_max, n_bins = int(k_min), int(k_max), int(output_size)
    if n_bins < 1:
        raise ValueError(f"{fn}: output_size must be >= 1, got {output_size}")
    k = int(box_levels([[0.0, 0.0, w, h]], k_min, k_max)[0])
    size = math.sqrt(w * h)
    raw = CANONICAL_LEVEL + math.log2(size / CANONICAL_SCALE)
    levels = list(range(k_min, k_max + 1))
    all_levels = levels + list(range(k_max + 1, k_max + 1 + int(rpn_levels)))

    if fig is None:
        fig = Figure(figsize=(3.2 * (len(levels) + 1.3), 3.7))
    fig.clear()
    gs = fig.add_gridspec(1, len(levels) + 1, width_ratios=[1.5] + [1] * len(levels))
    # ---- the pyramid, FPN-paper style: each level a plane seen at a slant, finest at the bottom
    # (widths shrink by 0.8 per level so that P6 stays visible: not to scale; the text gives the
    # real sizes). The box covers the same fraction of every plane: w / W by h / H.
    ax = fig.add_subplot(gs[0, 0])
    y = 0.0
    fw, fh = min(w / W, 1.0), min(h / H, 1.0)
    for j in all_levels:
        s = 2**j
        cells_w, cells_h = math.ceil(W / s), math.ceil(H / s)  # map size (rounded up)
        rw = 0.8 ** (j - k_min)
        depth, x0 = 0.32 * rw, -rw / 2
        skew = 0.5 * depth

        def at(u: float, v: float, x0=x0, rw=rw, y=y, depth=depth, skew=skew):
            return (x0 + u * rw + v * skew, y + v * depth)  # (u, v) in 0..1 on the plane

        chosen = j == k
        plane = Polygon(
            [at(0, 0), at(1, 0), at(1, 1), at(0, 1)],
            closed=True,
            facecolor=_level_color(j) if chosen else "0.93",
            alpha=0.9 if chosen else 1.0,
            edgecolor=_level_color(j),
            lw=2.5 if chosen else 1.0,
            hatch="//" if j > k_max else None,
            gid="assigned_level" if chosen else f"level_P{j}",
        )
        ax.add_patch(plane)
        u0, u1, v0, v1 = 0.5 - fw / 2, 0.5 + fw / 2, 0.5 - fh / 2, 0.5 + fh / 2
        ax.add_patch(
            Polygon(
                [at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)],
                closed=True,
                fill=False,
                edgecolor="black" if chosen else "0.35",
                lw=1.2,
                gid=f"pyramid_box_P{j}",
            )
        )
        note = " (RPN only)" if j > k_max else ("  <- pooled" if chosen else "")
        ax.text(
            at(1, 0.5)[0] + 0.06,
            y + depth / 2,
            f"P{j}, stride {s}: {cells_h}x{cells_w}\nbox {w / s:.1f}x{h / s:.1f} cells{note}",
            va="center",
            ha="left",
            fontsize=7,
            color="black" if chosen else "0.35",
            fontweight="bold" if chosen else "normal",
        )
        y += depth + 0.1
    ax.set_xlim(-0.55, 1.45)
    ax.set_ylim(-0.05, y)
    ax.axis("off")
    ax.set_title(f"pyramid of a {H}x{W} input (not to scale)", fontsize=9)

    # ---- close-ups: the same window of the image at every level
    margin = 0.3 * max(w, h)
    cx, cy = W / 2.0, H / 2.0
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    wx1, wy1, wx2, wy2 = x1 - margin, y1 - margin, x2 + margin, y2 + margin
    side = max(wx2 - wx1, wy2 - wy1)  # a square window, so every panel has the same scale
    wx1, wx2 = cx - side / 2, cx + side / 2
    wy1, wy2 = cy - side / 2, cy + side / 2
    for col, j in enumerate(levels, start=1):
        a = fig.add_subplot(gs[0, col])
        s = 2**j
        j0, j1 = math.floor(wx1 / s), math.ceil(wx2 / s)  # cell columns in the window
        i0, i1 = math.floor(wy1 / s), math.ceil(wy2 / s)
        jj, ii = np.meshgrid(np.arange(j0, j1), np.arange(i0, i1))
        board = ((ii + jj) % 2).astype(np.float32)  # [rows, cols] checkerboard of the cells
        im = a.imshow(
            board,
            cmap="Greys",
            vmin=-1.5,
            vmax=4.0,
            interpolation="nearest",
            extent=(j0 * s, j1 * s, i1 * s, i0 * s),
        )
        im.set_gid(f"cells_P{j}")
        color = _level_color(j)
        a.add_patch(Rectangle((x1, y1), w, h, fill=False, edgecolor=color, lw=2, gid="box"))
        for t in range(1, n_bins):  # bin edges of the output_size x output_size pooling grid
            a.plot([x1 + t * w / n_bins] * 2, [y1, y2], color=color, lw=0.6, gid="bins")
            a.plot([x1, x2], [y1 + t * h / n_bins] * 2, color=color, lw=0.6, gid="bins")
        a.set_xlim(wx1, wx2)
        a.set_ylim(wy2, wy1)
        a.set_xticks([])
        a.set_yticks([])
        chosen = j == k
        for spine in a.spines.values():
            spine.set_edgecolor(color if chosen else "0.7")
            spine.set_linewidth(3.5 if chosen else 0.8)
        bin_w, bin_h = w / s / n_bins, h / s / n_bins
        a.set_title(
            f"P{j}, stride {s}: box {w / s:.1f}x{h / s:.1f} cells\n"
            f"bin {bin_w:.2f}x{bin_h:.2f} cells" + ("  [pooled]" if chosen else ""),
            fontsize=8,
            fontweight="bold" if chosen else "normal",
            color=color if chosen else "black",
        )
    clamp = "" if k_min <= math.floor(raw + 1e-6) <= k_max else f", clamped to {k}"
    fig.suptitle(
        f"box {w:.0f}x{h:.0f} px, sqrt(wh) = {size:.1f}:  k = floor(4 + log2({size:.1f}"
        f" / 224)) = floor({raw:.2f}) = {math.floor(raw + 1e-6)}{clamp}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.fpn_level = k
    return fig


def _level_label(name: str, index: int, names: Sequence[str]) -> str:
    return str(names[index]) if index < len(names) else str(name)


def draw_feature_pyramid(
    features,
    *,
    index: int = 0,
    labels: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    fig: Figure | None = None,
) -> Figure:
    """One panel per feature map: the mean absolute activation over channels of image ``index``.

    Args:
        features: mapping (e.g. the backbone's ``OrderedDict``) or sequence of ``[B, C, h, w]``.
        labels: a name per map for the titles (default: the mapping's keys, or ``P2, P3, ...``).
        image_size: ``(H, W)`` of the padded input; when given every map is drawn over the
            same pixel extent ``(0, W) x (0, H)`` (cells of ``H / h`` pixels), so the levels line
            up and get blockier; otherwise in its own cells.

    Each panel's image (``gid="feature_<i>"``) is exactly ``x[index].abs().mean(0)``; its title
    gives the tensor's shape. Returns the ``Figure``.
    """
    fn = "draw_feature_pyramid"
    items = (
        list(features.items())
        if hasattr(features, "items")
        else [(f"P{2 + i}", f) for i, f in enumerate(features)]
    )
    if not items:
        raise ValueError(f"{fn}: features is empty")
    for name, x in items:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{fn}: feature {name!r} must be [B, C, h, w], got {got}")
        if not 0 <= index < x.shape[0]:
            raise ValueError(
                f"{fn}: index {index} out of range for feature {name!r} with "
                f"batch size {x.shape[0]}"
            )
    names = list(labels) if labels is not None else [str(n) for n, _ in items]
    if fig is None:
        fig = Figure(figsize=(2.6 * len(items), 3.0))
    fig.clear()
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for i, (ax, (name, x)) in enumerate(zip(axes, items)):
        act = x[index].detach().float().abs().mean(dim=0).cpu().numpy()  # [C, h, w] -> [h, w]
        h, w = act.shape
        extent = (0, w, h, 0)  # in the map's own cells
        if image_size is not None:  # cells of H / h pixels: every map spans the input
            s = image_size[0] / h
            extent = (0, w * s, h * s, 0)
        im = ax.imshow(act, cmap="viridis", interpolation="nearest", extent=extent)
        im.set_gid(f"feature_{i}")
        if image_size is not None:
            ax.set_xlim(0, image_size[1])
            ax.set_ylim(image_size[0], 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{_level_label(name, i, names)}: {list(x.shape)}", fontsize=8)
    fig.tight_layout()
    return fig


#: Fixed colours of the model's parts in :func:`draw_parameter_counts`.
PART_COLORS: dict[str, str] = {
    "backbone body": "tab:blue",
    "FPN": "tab:cyan",
    "RPN": "tab:green",
    "box head": "tab:orange",
    "mask head": "tab:red",
}


def draw_parameter_counts(ax: Axes, counts, *, title: str | None = None) -> Axes:
    """Stacked horizontal bars: parameters per part (millions) for each model.

    Args:
        counts: ``{model name: {part: number of parameters}}``; parts are drawn in the order
            given, coloured by :data:`PART_COLORS` (other parts grey). A part with 0 parameters
            takes no space (e.g. a C4 model has no FPN).

    Each segment is a bar patch with ``gid="<model>:<part>"`` whose width is the count in
    millions; the total is written at the end of each bar. Returns ``ax``.
    """
    fn = "draw_parameter_counts"
    if not hasattr(counts, "items") or not counts:
        raise ValueError(f"{fn}: counts must be a non-empty mapping {{model: {{part: n}}}}")
    models = list(counts)
    seen: list[str] = []
    for m in models:
        parts = counts[m]
        if not hasattr(parts, "items"):
            raise TypeError(
                f"{fn}: counts[{m!r}] must be a mapping {{part: n}}, got {type(parts).__name__}"
            )
        for p, n in parts.items():
            if int(n) != n or n < 0:
                raise ValueError(f"{fn}: counts[{m!r}][{p!r}] must be a count >= 0, got {n!r}")
            if p not in seen:
                seen.append(p)
    for row, m in enumerate(models):
        left = 0.0
        for p in seen:
            n = int(counts[m].get(p, 0))
            if n == 0:
                continue
            bars = ax.barh(
                row,
                n / 1e6,
                left=left,
                color=PART_COLORS.get(p, "0.6"),
                edgecolor="white",
                height=0.6,
            )
            bars.patches[0].set_gid(f"{m}:{p}")
            if n / 1e6 > 0.06 * max(sum(c.values()) for c in counts.values()) / 1e6:
                ax.text(
                    left + n / 2e6,
                    row,
                    f"{n / 1e6:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
            left += n / 1e6
        ax.text(left, row, f"  {left:.2f} M", va="center", fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=PART_COLORS.get(p, "0.6"), label=p) for p in seen]
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.set_xlabel("parameters [millions]")
    ax.set_xlim(0, 1.18 * max(sum(c.values()) for c in counts.values()) / 1e6)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ax.set_title(title if title is not None else "parameters per part", fontsize=9)
    return ax


def draw_rois_by_level(
    ax: Axes,
    image,
    boxes,
    *,
    k_min: int = 2,
    k_max: int = 5,
    max_boxes: int | None = None,
    title: str | None = None,
    legend: bool = True,
) -> Axes:
    """RoIs over ``image``, each in the colour of the pyramid level it is pooled from.

    ``boxes [K, 4]`` (x1, y1, x2, y2) pixels of ``image``; levels by
    :func:`mrcnn_edu.poolers.assign_levels`. Only the first ``max_boxes`` are drawn (proposals
    come best first), but the legend counts all ``K`` per level. Each box is a rectangle with
    ``gid="roi_P<k>"``. Returns ``ax``.
    """
    fn = "draw_rois_by_level"
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    b = _as_boxes(boxes, "boxes", fn)
    levels = box_levels(b, k_min, k_max) if len(b) else np.zeros(0, np.int64)
    n = len(b) if max_boxes is None else min(len(b), max(int(max_boxes), 0))
    ax.imshow(img, extent=(0, W, H, 0))
    for i in range(n - 1, -1, -1):  # best last, so it is drawn on top
        x1, y1, x2, y2 = b[i]
        ax.add_patch(
            Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=_level_color(levels[i]),
                lw=1.0,
                alpha=0.85,
                gid=f"roi_P{levels[i]}",
            )
        )
    if legend:
        for lev in range(k_min, k_max + 1):
            ax.plot(
                [], [], color=_level_color(lev), lw=2, label=f"P{lev}: {int((levels == lev).sum())}"
            )
        leg = ax.legend(
            loc="lower right",
            fontsize=7,
            framealpha=0.85,
            title=f"all {len(b)} by level",
            title_fontsize=7,
        )
        leg.get_frame().set_facecolor("0.9")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title(
        title if title is not None else f"{n} of {len(b)} RoIs, coloured by pyramid level",
        fontsize=9,
    )
    return ax


def centre_anchors(anchor_generator, image_shape, feature_shapes) -> list[torch.Tensor]:
    """Per level, the ``A`` anchors of the feature cell nearest the image centre.

    Calls the generator exactly as the RPN does (``anchor_generator(image_shape,
    feature_shapes)``, all anchors of the padded batch, level by level, location-major) and
    cuts out, for each level, the anchors of cell ``(h_l // 2, w_l // 2)``.
    Returns a list per level of ``[A_l, 4]`` anchors.
    """
    shapes = [tuple(int(v) for v in s[-2:]) for s in feature_shapes]
    anchors = anchor_generator(tuple(int(v) for v in image_shape), shapes)  # [sum h w A, 4]
    counts = anchor_generator.num_anchors_per_location()
    out, start = [], 0
    for (h, w), A in zip(shapes, counts):
        cell = (h // 2) * w + (w // 2)  # location-major: cell (i, j) -> i * w + j
        out.append(anchors[start + cell * A : start + (cell + 1) * A])
        start += h * w * A
    if start != anchors.shape[0]:
        raise ValueError(
            f"centre_anchors: the generator returned {anchors.shape[0]} anchors, "
            f"the feature shapes account for {start}"
        )
    return out


def draw_forward_stages(
    image,
    stages,
    *,
    anchor_generator=None,
    index: int = 0,
    num_proposals: int = 40,
    num_detections: int = 8,
    class_names=None,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    fig: Figure | None = None,
) -> Figure:
    """One Mask R-CNN forward pass, stage by stage, from :meth:`mrcnn_edu.model.MaskRCNN.
    run_stages` (eval mode, or train mode with ``return_detections=True``).

    Six panels for image ``index``: (1) the network's input (resized, normalized, padded:
    the padding right and below the dashed image rectangle); (2) the anchors of the cell
    nearest the centre on every level (``centre_anchors``; needs ``anchor_generator``, the
    model's ``rpn.anchor_generator``), coloured by level; (3) the best ``num_proposals``
    proposals, coloured by the level the RoI pooler takes them from; (4) how many RoIs each
    level pools (``stages["sampled_rois"]`` in train mode, else all proposals; bars with
    ``gid="level_count_P<k>"``); (5) the ``num_detections`` best detections with label and
    score; (6) their masks, pasted into ``image``. Panels 1-4 are in the resized image's
    pixels, 5-6 in ``image``'s (``stages["detections"]``). The pooler's levels are P2..P5.

    Args:
        image: the original ``[3, H, W]`` image given to the model (values 0..1).
        stages: the dict ``run_stages`` returns.
        class_names: ``class_names[label]`` for panel 5 (index 0 = background).
        image_mean, image_std: the model's normalization (``model.transform.image_mean`` /
            ``image_std``), undone for panels 1-3; the zero padding then shows as the mean
            colour.

    Returns the ``Figure``.
    """
    fn = "draw_forward_stages"
    need = ("images", "image_sizes", "features", "proposals", "detections")
    missing = [key for key in need if key not in stages]
    if missing:
        raise KeyError(f"{fn}: stages lacks {missing}; pass the dict MaskRCNN.run_stages returns")
    if not 0 <= index < len(stages["proposals"]):
        raise ValueError(f"{fn}: index {index} out of range for {len(stages['proposals'])} images")
    if not stages["detections"]:
        raise ValueError(
            f"{fn}: stages has no detections; run the model in eval mode or with "
            "return_detections=True"
        )
    h, w = stages["image_sizes"][index]
    batch = stages["images"][index].detach().cpu().float()  # [3, Hp, Wp] normalized, padded
    if len(image_mean) != batch.shape[0] or len(image_std) != batch.shape[0]:
        raise ValueError(
            f"{fn}: image_mean and image_std need {batch.shape[0]} values, got "
            f"{len(image_mean)} and {len(image_std)}"
        )
    mean = torch.tensor([float(m) for m in image_mean])[:, None, None]  # [3, 1, 1]
    std = torch.tensor([float(s) for s in image_std])[:, None, None]
    batch = (batch * std + mean).clamp(0.0, 1.0)  # undo (x - mean) / std
    Hp, Wp = batch.shape[-2:]
    if fig is None:
        fig = Figure(figsize=(13, 8.4))
    fig.clear()
    axes = fig.subplots(2, 3).ravel()

    # 1. the input as the network sees it
    ax = axes[0]
    ax.imshow(image_for_display(batch, fn), extent=(0, Wp, Hp, 0))
    ax.add_patch(
        Rectangle((0, 0), w, h, fill=False, edgecolor="white", lw=1.5, ls="--", gid="image_size")
    )
    ax.set_title(f"1. input: resized to {h}x{w}, padded to {Hp}x{Wp}", fontsize=9)

    # 2. anchors of the centre cell, every level
    ax = axes[1]
    ax.imshow(image_for_display(batch, fn), extent=(0, Wp, Hp, 0))
    feats = list(stages["features"].values())
    if anchor_generator is not None:
        per_level = centre_anchors(anchor_generator, (Hp, Wp), [f.shape for f in feats])
        total = sum(
            f.shape[-2] * f.shape[-1] * a
            for f, a in zip(feats, anchor_generator.num_anchors_per_location())
        )
        for lev, a in enumerate(per_level):
            k = 2 + lev
            for x1, y1, x2, y2 in a.tolist():
                ax.add_patch(
                    Rectangle(
                        (x1, y1),
                        x2 - x1,
                        y2 - y1,
                        fill=False,
                        edgecolor=_level_color(k),
                        lw=1.2,
                        gid=f"anchor_P{k}",
                    )
                )
            ax.plot(
                [],
                [],
                color=_level_color(k),
                lw=2,
                label=f"P{k}: {feats[lev].shape[-2]}x{feats[lev].shape[-1]} cells",
            )
        ax.legend(loc="lower right", fontsize=6.5, framealpha=0.85)
        ax.set_title(f"2. anchors of the centre cell per level ({total} in all)", fontsize=9)
    else:
        ax.set_title("2. anchors (pass anchor_generator to draw them)", fontsize=9)
    ax.set_xlim(0, Wp)
    ax.set_ylim(Hp, 0)

    # 3. proposals by level
    proposals = stages["proposals"][index]
    draw_rois_by_level(
        axes[2],
        batch,
        proposals,
        max_boxes=num_proposals,
        title=f"3. best {min(num_proposals, len(proposals))} of {len(proposals)} "
        "proposals, by pooling level",
    )
    axes[2].set_xlim(0, Wp)
    axes[2].set_ylim(Hp, 0)

    # 4. RoIs per level
    ax = axes[3]
    sampled = stages.get("sampled_rois")
    if sampled:
        rois, what = sampled[index].proposal_boxes, "sampled RoIs (training)"
    else:
        rois, what = proposals, "RoIs = proposals (inference)"
    levels = box_levels(rois) if len(rois) else np.zeros(0, np.int64)
    for k in range(2, 6):
        n = int((levels == k).sum())
        bar = ax.bar(f"P{k}", n, color=_level_color(k))
        bar.patches[0].set_gid(f"level_count_P{k}")
        ax.text(k - 2, n, str(n), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("RoIs pooled from the level")
    ax.set_title(f"4. {len(rois)} {what} per level", fontsize=9)

    # 5. detections, 6. masks (original image pixels)
    det = stages["detections"][index]
    n = min(int(num_detections), len(det["boxes"]))
    top = {key: v[:n] for key, v in det.items()}
    draw_instances(
        image,
        boxes=top["boxes"],
        labels=top["labels"],
        scores=top["scores"],
        class_names=class_names,
        ax=axes[4],
        title=f"5. best {n} of {len(det['boxes'])} detections",
    )
    if "masks" in top:
        draw_instances(
            image,
            masks=top["masks"],
            labels=top["labels"],
            ax=axes[5],
            title="6. their masks, pasted into the image (p >= 0.5)",
        )
    else:
        axes[5].set_title("6. no mask branch", fontsize=9)
        axes[5].axis("off")
    fig.tight_layout()
    return fig


__all__ += [
    "LEVEL_COLORS",
    "PART_COLORS",
    "box_levels",
    "box_wh",
    "centre_anchors",
    "draw_feature_pyramid",
    "draw_forward_stages",
    "draw_fpn_levels",
    "draw_level_rule",
    "draw_parameter_counts",
    "draw_rois_by_level",
]


# --------------------------------------------------------------------------------------------
# training and evaluation (notebook 08, make demo)
# --------------------------------------------------------------------------------------------
def plot_loss_curves(
    rows: Sequence[dict], ax: Axes | None = None, title: str | None = None, log_y: bool = True
) -> Axes:
    """Plot the losses logged by ``mrcnn_edu.engine.train`` against the step.

    Args:
        rows: metrics rows (``engine.read_metrics_csv(run / "metrics.csv")`` or
            ``TrainResult.history``): dicts with ``step``, ``loss`` (the sum) and one
            ``loss_*`` entry per named loss.
        log_y: a log scale shows the small losses beside the large ones.

    The total is drawn thick and black, every named loss thin in its own colour.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    if not rows:
        ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center", transform=ax.transAxes)
        return ax
    steps = [float(r["step"]) for r in rows]
    names = [k for k in rows[0] if k.startswith("loss_")]
    for i, name in enumerate(names):
        ax.plot(
            steps, [float(r[name]) for r in rows], lw=1.2, label=name, color=plt.cm.tab10(i % 10)
        )
    if "loss" in rows[0]:
        ax.plot(steps, [float(r["loss"]) for r in rows], lw=2.4, color="black", label="total")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean since the previous row)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    return ax


def draw_predictions_vs_truth(
    images: Sequence,
    detections: Sequence[dict],
    targets: Sequence[dict],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    titles: Sequence[str] | None = None,
) -> Figure:
    """One row per image: the ground truth on the left, the model's detections on the right.

    Args:
        images: ``[3, H, W]`` float images.
        detections: the model's outputs (``boxes``, ``labels``, ``scores``, optional ``masks``
            ``[N, 1, H, W]`` probabilities), one per image.
        targets: the data set's targets (``boxes``, ``labels``, ``masks [N, H, W]``).
        score_threshold: detections below it are not drawn.
        titles: optional extra text per image (e.g. its image id).
    """
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(7, 3.4 * n), squeeze=False)
    for i, (img, det, tgt) in enumerate(zip(images, detections, targets)):
        extra = f" ({titles[i]})" if titles else ""
        draw_instances(
            img,
            tgt.get("boxes"),
            tgt.get("labels"),
            masks=tgt.get("masks"),
            class_names=class_names,
            ax=axes[i, 0],
            title=f"ground truth{extra}",
        )
        keep = det["scores"] >= score_threshold
        draw_instances(
            img,
            det["boxes"][keep],
            det["labels"][keep],
            det["scores"][keep],
            masks=det["masks"][keep] if "masks" in det else None,
            class_names=class_names,
            ax=axes[i, 1],
            title=f"prediction (score >= {score_threshold}){extra}",
        )
    fig.tight_layout()
    return fig


def save_prediction_figure(
    image,
    detection: dict,
    path,
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.5,
) -> None:
    """Draw one image's detections and write the picture to ``path`` (PNG, written
    atomically)."""
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[-2] / max(1, image.shape[-1])))
    keep = detection["scores"] >= score_thresh
    draw_instances(
        image,
        detection["boxes"][keep],
        detection["labels"][keep],
        detection["scores"][keep],
        masks=detection["masks"][keep] if "masks" in detection else None,
        keypoints=detection["keypoints"][keep] if "keypoints" in detection else None,
        class_names=class_names,
        ax=ax,
    )
    save_figure(fig, path)


def save_figure(fig: Figure, path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` atomically (the PNG is never half-written) and close it."""
    import io
    from pathlib import Path

    from mrcnn_edu.utils import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


__all__ += [
    "draw_predictions_vs_truth",
    "plot_loss_curves",
    "save_figure",
    "save_prediction_figure",
]


# --------------------------------------------------------------------------------------------
# COCO AP explained: one detection against its ground truth at two IoU thresholds, and a
# gallery of matches, false positives and missed objects sorted by mask IoU (notebook 08)
# --------------------------------------------------------------------------------------------

__all__ += [
    "GalleryEntry",
    "box_pair_iou",
    "collect_gallery",
    "draw_ap_thresholds",
    "draw_gallery",
    "draw_iou_match",
    "mask_pair_iou",
]

#: colours of a verdict: passes the threshold / fails it
_PASS, _FAIL = (0.0, 0.62, 0.45), (0.84, 0.15, 0.10)


def _box1(box, name: str, fn: str) -> np.ndarray:
    """One box ``(x1, y1, x2, y2)`` (a list, a ``[4]`` or ``[1, 4]`` tensor/array) -> ``[1, 4]``
    float64."""
    arr = _to_numpy(box, name).astype(np.float64)
    if arr.size != 4:
        raise ValueError(f"{fn}: {name} must be one box (x1, y1, x2, y2), got shape {arr.shape}")
    return arr.reshape(1, 4)


def box_pair_iou(box_a, box_b) -> float:
    """IoU of two boxes ``(x1, y1, x2, y2)`` as COCO measures it (continuous coordinates: a box's
    width is ``x2 - x1``; torchvision's ``box_iou`` and ``COCOeval`` agree). 0 when both are
    empty."""
    fn = "box_pair_iou"
    ax1, ay1, ax2, ay2 = (float(v) for v in _box1(box_a, "box_a", fn)[0])
    bx1, by1, bx2, by2 = (float(v) for v in _box1(box_b, "box_b", fn)[0])
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _binary(mask, name: str, fn: str, threshold: float = 0.5) -> np.ndarray:
    """``[H, W]`` / ``[1, H, W]`` mask (0/1 or probabilities) -> ``[H, W]`` bool
    (``>= threshold``)."""
    m = _to_numpy(mask, name)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]  # (1, H, W) -> (H, W)
    if m.ndim != 2:
        raise ValueError(f"{fn}: {name} must be [H, W] or [1, H, W], got {m.shape}")
    return m.astype(np.float32) >= threshold


def mask_pair_iou(mask_a, mask_b, threshold: float = 0.5) -> float:
    """IoU of two masks ``[H, W]`` (or ``[1, H, W]``), each binarized at ``>= threshold`` (the
    0.5 COCO results use): pixels in both / pixels in either; 0 when both are empty."""
    fn = "mask_pair_iou"
    a, b = _binary(mask_a, "mask_a", fn, threshold), _binary(mask_b, "mask_b", fn, threshold)
    if a.shape != b.shape:
        raise ValueError(f"{fn}: masks of different sizes {a.shape} and {b.shape}")
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def _mask_overlay(ax: Axes, pred: np.ndarray, gt: np.ndarray, pred_color, W: int, H: int) -> None:
    """Prediction only, ground truth only and both, as one translucent RGBA layer."""
    rgba = np.zeros(pred.shape + (4,), np.float32)  # [H, W, 4]
    rgba[pred & ~gt] = (*pred_color, 0.45)
    rgba[gt & ~pred] = (1.0, 1.0, 1.0, 0.55)
    rgba[pred & gt] = (0.95, 0.85, 0.1, 0.6)
    ax.imshow(rgba, extent=(0, W, H, 0), interpolation="nearest", zorder=2)


def _contour(ax: Axes, mask: np.ndarray, **kw) -> None:
    if mask.any() and not mask.all():
        H, W = mask.shape
        # pixel (i, j) spans [j, j+1) x [i, i+1): its centre is at (j + 0.5, i + 0.5)
        ax.contour(
            np.arange(W) + 0.5, np.arange(H) + 0.5, mask.astype(np.float32), levels=[0.5], **kw
        )


def draw_iou_match(
    ax: Axes,
    image,
    pred_box,
    gt_box,
    *,
    threshold: float = 0.5,
    kind: str = "bbox",
    pred_mask=None,
    gt_mask=None,
    zoom: float | None = 0.6,
    title: str | None = None,
) -> Axes:
    """One prediction against its ground truth at one IoU threshold, as ``COCOeval`` judges it.

    ``kind="bbox"``: the gt box (white, dashed, ``gid="gt_box"``), the predicted box
    (``gid="pred_box"``) and their intersection (yellow hatching, ``gid="intersection"``).
    ``kind="segm"``: the masks instead (``pred_mask``, ``gt_mask`` ``[H, W]`` or ``[1, H, W]``,
    binarized at 0.5): yellow where both are, white where only the gt is, coloured where only
    the prediction is, the gt's outline dashed. The prediction is green when its IoU reaches
    ``threshold`` (a true positive at that threshold) and red when it does not (then COCO counts
    a false positive *and* a missed object). The IoU (:func:`box_pair_iou` /
    :func:`mask_pair_iou`) is written in the corner as ``"IoU 0.623"`` (``gid="iou_text"``).

    Args:
        ax: matplotlib axes; image: ``[3, H, W]`` tensor or ``[H, W, 3]`` array.
        pred_box, gt_box: ``(x1, y1, x2, y2)`` in image pixels (also used to zoom for "segm").
        threshold: the IoU threshold, e.g. 0.5 (AP50) or 0.75 (AP75).
        zoom: show the two boxes with this fraction of their size around them (None: the whole
            image).

    Returns ``ax``.
    """
    fn = "draw_iou_match"
    if kind not in ("bbox", "segm"):
        raise ValueError(f"{fn}: kind must be 'bbox' or 'segm', got {kind!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{fn}: threshold must lie in [0, 1], got {threshold}")
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    pb, gb = _box1(pred_box, "pred_box", fn), _box1(gt_box, "gt_box", fn)  # [1, 4] each
    ax.imshow(img, extent=(0, W, H, 0))
    if kind == "bbox":
        iou = box_pair_iou(pb, gb)
        color = _PASS if iou >= threshold else _FAIL
        x1, y1 = max(pb[0, 0], gb[0, 0]), max(pb[0, 1], gb[0, 1])
        x2, y2 = min(pb[0, 2], gb[0, 2]), min(pb[0, 3], gb[0, 3])
        if x2 > x1 and y2 > y1:
            ax.add_patch(
                Rectangle(
                    (x1, y1),
                    x2 - x1,
                    y2 - y1,
                    fill=False,
                    hatch="///",
                    ec=(0.95, 0.85, 0.1),
                    lw=0.0,
                    zorder=2,
                    gid="intersection",
                )
            )
        gx1, gy1, gx2, gy2 = gb[0]
        ax.add_patch(
            Rectangle(
                (gx1, gy1),
                gx2 - gx1,
                gy2 - gy1,
                fill=False,
                ec="white",
                lw=2.2,
                ls="--",
                zorder=3,
                gid="gt_box",
            )
        )
        px1, py1, px2, py2 = pb[0]
        ax.add_patch(
            Rectangle(
                (px1, py1),
                px2 - px1,
                py2 - py1,
                fill=False,
                ec=color,
                lw=2.2,
                zorder=4,
                gid="pred_box",
            )
        )
    else:
        if pred_mask is None or gt_mask is None:
            raise ValueError(f"{fn}: kind='segm' needs pred_mask and gt_mask")
        pm, gm = _binary(pred_mask, "pred_mask", fn), _binary(gt_mask, "gt_mask", fn)
        if pm.shape != (H, W) or gm.shape != (H, W):
            raise ValueError(
                f"{fn}: masks must be {H}x{W} like the image, got {pm.shape} and {gm.shape}"
            )
        iou = mask_pair_iou(pm, gm)
        color = _PASS if iou >= threshold else _FAIL
        _mask_overlay(ax, pm, gm, color, W, H)
        _contour(ax, gm, colors=["white"], linewidths=1.5, linestyles="--", zorder=3)
        _contour(ax, pm, colors=[color], linewidths=1.8, zorder=4)
    passed = iou >= threshold
    ax.text(
        0.02,
        0.98,
        f"IoU {iou:.3f}",
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=10,
        color="black",
        gid="iou_text",
        zorder=6,
        bbox={"facecolor": "white", "alpha": 0.85, "pad": 2, "edgecolor": color},
    )
    if zoom is not None:
        union = np.array(
            [
                min(pb[0, 0], gb[0, 0]),
                min(pb[0, 1], gb[0, 1]),
                max(pb[0, 2], gb[0, 2]),
                max(pb[0, 3], gb[0, 3]),
            ]
        )
        _zoom(ax, union, H, W, margin=zoom)
    else:
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    verdict = "true positive" if passed else "false positive + missed gt"
    sign = ">=" if passed else "<"
    ax.set_title(
        title
        if title is not None
        else f"{'box' if kind == 'bbox' else 'mask'} IoU {iou:.3f} {sign} {threshold:g}: {verdict}",
        fontsize=9,
        color=color,
    )
    return ax


def draw_ap_thresholds(
    image,
    pred_box,
    gt_box,
    *,
    pred_mask=None,
    gt_mask=None,
    thresholds: Sequence[float] = (0.5, 0.75),
    zoom: float | None = 0.6,
    fig: Figure | None = None,
) -> Figure:
    """The same prediction judged at each IoU threshold (columns), by its box (first row) and,
    when both masks are given, by its mask (second row): the picture behind AP50 and AP75.
    Every panel is :func:`draw_iou_match`. Returns the ``Figure``."""
    kinds = ["bbox"] + (["segm"] if pred_mask is not None and gt_mask is not None else [])
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise ValueError("draw_ap_thresholds: thresholds is empty")
    if fig is None:
        fig = plt.figure(figsize=(3.4 * len(thresholds), 3.4 * len(kinds)))
    axes = np.asarray(fig.subplots(len(kinds), len(thresholds), squeeze=False))
    for r, kind in enumerate(kinds):
        for c, t in enumerate(thresholds):
            draw_iou_match(
                axes[r, c],
                image,
                pred_box,
                gt_box,
                threshold=t,
                kind=kind,
                pred_mask=pred_mask,
                gt_mask=gt_mask,
                zoom=zoom,
            )
    fig.tight_layout()
    return fig


@dataclass
class GalleryEntry:
    """One row of :func:`collect_gallery`: a detection matched to a gt object, an unmatched
    detection or an unmatched gt object, in one image.

    Attributes:
        image_index: position of the image in the lists given to :func:`collect_gallery`.
        kind: ``"match"``, ``"false positive"`` (a detection that matched no gt object) or
            ``"missed"`` (a gt object no detection matched).
        label: the class (the detection's, or the gt's when missed).
        det_index: index into the image's detections (``None`` when missed).
        gt_index: index into the image's gt objects (``None`` for a false positive).
        score: the detection's score (``None`` when missed).
        box_iou: box IoU of the matched pair (0 when unmatched).
        mask_iou: mask IoU of the matched pair (0 when unmatched): the sort key.
        best_iou: for unmatched entries, the best box IoU with any object (false positive) or
            detection (missed) of the same class, whatever was matched already (a duplicate
            detection has a high one); equals ``box_iou`` for a match.
    """

    image_index: int
    kind: str
    label: int
    det_index: int | None
    gt_index: int | None
    score: float | None
    box_iou: float
    mask_iou: float
    best_iou: float

    @property
    def verdict(self) -> str:
        """``"good mask"`` (mask IoU >= 0.75), ``"fair mask"`` (0.5..0.75, fails AP75),
        ``"poor mask"`` (< 0.5: its box was found, its mask would not count at AP50), or the
        kind of an unmatched entry."""
        if self.kind != "match":
            return self.kind
        if self.mask_iou >= 0.75:
            return "good mask"
        return "fair mask" if self.mask_iou >= 0.5 else "poor mask"


_KIND_ORDER = {"false positive": 0, "missed": 1, "match": 2}


def collect_gallery(
    detections: Sequence[dict],
    targets: Sequence[dict],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> list[GalleryEntry]:
    """Match detections to ground truth as ``COCOeval`` does, and list every outcome, sorted by
    mask IoU (worst first).

    Per image, detections with ``score >= score_threshold`` are taken in order of decreasing
    score; each is matched to the not yet matched gt object **of its class** with the highest
    **box** IoU, if that IoU is ``>= iou_threshold`` (COCOeval's greedy rule for box AP at one
    threshold). A matched pair then gets its **mask** IoU, so a detection that found the object
    but drew a poor mask is told apart from one that found nothing.

    Args:
        detections: per image the model's output: ``boxes`` [N, 4] (x1, y1, x2, y2), ``labels``
            [N], ``scores`` [N], ``masks`` [N, 1, H, W] probabilities (pasted into the image).
        targets: per image ``boxes`` [G, 4], ``labels`` [G], ``masks`` [G, H, W] 0/1.
        score_threshold: detections below it are left out (COCO's AP uses them all; a gallery
            shows what a user would keep).
        iou_threshold: box IoU needed for a match.
        mask_threshold: mask probability at or above which a pixel is in the predicted mask.

    Returns:
        :class:`GalleryEntry` list sorted by ``(mask_iou, kind, image_index, index)``: false
        positives and missed objects (mask IoU 0) first, then matches from the poorest mask to
        the best.
    """
    fn = "collect_gallery"
    from mrcnn_edu.ops import box_iou

    if len(detections) != len(targets):
        raise ValueError(
            f"{fn}: got {len(detections)} detection dicts and {len(targets)} "
            "targets; need one of each per image"
        )
    entries: list[GalleryEntry] = []
    for i, (det, tgt) in enumerate(zip(detections, targets)):
        for key, d in (("detections", det), ("targets", tgt)):
            missing = [k for k in ("boxes", "labels", "masks") if k not in d]
            if missing:
                raise ValueError(f"{fn}: {key}[{i}] lacks {missing}; has {sorted(d)}")
        keep = torch.as_tensor(det["scores"]).detach().cpu() >= score_threshold  # [N]
        d_idx = torch.nonzero(keep).flatten()
        d_idx = d_idx[
            torch.as_tensor(det["scores"])
            .detach()
            .cpu()[d_idx]
            .argsort(descending=True, stable=True)
        ]  # by decreasing score
        d_boxes = det["boxes"].detach().cpu().float()[d_idx]  # [D, 4]
        d_labels = det["labels"].detach().cpu()[d_idx]  # [D]
        d_masks = det["masks"].detach().cpu()
        if d_masks.dim() == 4:
            d_masks = d_masks[:, 0]  # (N, 1, H, W) -> (N, H, W)
        d_masks = d_masks[d_idx] >= mask_threshold  # [D, H, W] bool
        g_boxes = tgt["boxes"].detach().cpu().float()  # [G, 4]
        g_labels = tgt["labels"].detach().cpu()
        g_masks = tgt["masks"].detach().cpu() >= 0.5  # [G, H, W]
        if d_masks.shape[1:] != g_masks.shape[1:] and len(d_masks) and len(g_masks):
            raise ValueError(
                f"{fn}: image {i}: detection masks are {tuple(d_masks.shape[1:])} "
                f"but gt masks {tuple(g_masks.shape[1:])}"
            )
        G, D = len(g_boxes), len(d_boxes)
        iou = box_iou(d_boxes, g_boxes) if D and G else torch.zeros(D, G)  # [D, G]
        same = d_labels[:, None] == g_labels[None, :]  # [D, G]
        iou = torch.where(same, iou, torch.zeros(()))
        gt_taken = [False] * G
        det_match: list[int | None] = [None] * D
        for d in range(D):
            best, best_g = iou_threshold, None
            for g in range(G):
                if not gt_taken[g] and float(iou[d, g]) >= best:
                    best, best_g = float(iou[d, g]), g
            if best_g is not None:
                gt_taken[best_g], det_match[d] = True, best_g
        for d in range(D):
            g = det_match[d]
            score = float(det["scores"][d_idx[d]])
            if g is None:
                best = float(iou[d].max()) if G else 0.0
                entries.append(
                    GalleryEntry(
                        i,
                        "false positive",
                        int(d_labels[d]),
                        int(d_idx[d]),
                        None,
                        score,
                        0.0,
                        0.0,
                        best,
                    )
                )
            else:
                m = mask_pair_iou(d_masks[d], g_masks[g])
                entries.append(
                    GalleryEntry(
                        i,
                        "match",
                        int(d_labels[d]),
                        int(d_idx[d]),
                        g,
                        score,
                        float(iou[d, g]),
                        m,
                        float(iou[d, g]),
                    )
                )
        for g in range(G):
            if not gt_taken[g]:
                best = float(iou[:, g].max()) if D else 0.0
                entries.append(
                    GalleryEntry(i, "missed", int(g_labels[g]), None, g, None, 0.0, 0.0, best)
                )
    entries.sort(
        key=lambda e: (
            e.mask_iou,
            _KIND_ORDER[e.kind],
            e.image_index,
            e.det_index if e.det_index is not None else e.gt_index,
        )
    )
    return entries


def draw_gallery(
    images: Sequence,
    entries: Sequence[GalleryEntry],
    detections: Sequence[dict],
    targets: Sequence[dict],
    *,
    class_names: Sequence[str] | None = None,
    ncols: int = 4,
    size: float = 2.6,
    margin: float = 0.5,
    fig: Figure | None = None,
    title: str | None = None,
) -> Figure:
    """One panel per :class:`GalleryEntry` (in the order given), zoomed on the object: the gt
    mask's outline white and dashed, the predicted mask filled (yellow where it agrees with the
    gt, as in :func:`draw_iou_match`), the predicted box thin. The panel title names the
    outcome, the class, the score and the mask IoU (``"mask IoU 0.812"``), coloured green (mask
    IoU >= 0.75), orange (0.5..0.75) or red (poor mask, false positive, missed). Each panel's
    ``gid`` is ``"gallery_<k>"``. Returns the ``Figure``.

    ``images``, ``detections``, ``targets``: the lists given to :func:`collect_gallery`.
    """
    fn = "draw_gallery"
    entries = list(entries)
    if not entries:
        raise ValueError(f"{fn}: no entries to draw")
    if ncols < 1:
        raise ValueError(f"{fn}: ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(entries))
    nrows = math.ceil(len(entries) / ncols)
    if fig is None:
        fig = plt.figure(figsize=(size * ncols, (size + 0.35) * nrows))
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for k, (ax, e) in enumerate(zip(axes, entries)):
        if not 0 <= e.image_index < len(images):
            raise ValueError(f"{fn}: entry {k} names image {e.image_index} of {len(images)}")
        img = image_for_display(images[e.image_index], fn)
        H, W = img.shape[:2]
        det, tgt = detections[e.image_index], targets[e.image_index]
        empty = np.zeros((H, W), bool)
        pm = _binary(det["masks"][e.det_index], "mask", fn) if e.det_index is not None else empty
        gm = _binary(tgt["masks"][e.gt_index], "mask", fn) if e.gt_index is not None else empty
        if e.kind == "match":
            color = (
                _PASS if e.mask_iou >= 0.75 else (0.9, 0.55, 0.0) if e.mask_iou >= 0.5 else _FAIL
            )
        else:
            color = _FAIL
        ax.imshow(img, extent=(0, W, H, 0))
        _mask_overlay(ax, pm, gm, class_color(e.label), W, H)
        _contour(ax, gm, colors=["white"], linewidths=1.2, linestyles="--", zorder=3)
        boxes = []
        if e.gt_index is not None:
            boxes.append(_as_boxes(tgt["boxes"][e.gt_index].reshape(1, 4), "box", fn)[0])
        if e.det_index is not None:
            b = _as_boxes(det["boxes"][e.det_index].reshape(1, 4), "box", fn)[0]
            boxes.append(b)
            ax.add_patch(
                Rectangle(
                    (b[0], b[1]),
                    b[2] - b[0],
                    b[3] - b[1],
                    fill=False,
                    ec=class_color(e.label),
                    lw=1.0,
                    zorder=4,
                    gid="pred_box",
                )
            )
        bb = np.stack(boxes)
        _zoom(
            ax,
            (bb[:, 0].min(), bb[:, 1].min(), bb[:, 2].max(), bb[:, 3].max()),
            H,
            W,
            margin=margin,
        )
        name = _class_name(e.label, class_names)
        score = f" {e.score:.2f}" if e.score is not None else ""
        what = e.verdict if e.kind == "match" else e.kind
        ax.set_title(
            f"{k + 1}. {what}: {name}{score}\nmask IoU {e.mask_iou:.3f}", fontsize=8, color=color
        )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_gid(f"gallery_{k}")
        for side in ax.spines.values():
            side.set_edgecolor(color)
            side.set_linewidth(2.0)
    for ax in axes[len(entries) :]:
        ax.set_axis_off()
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# keypoints (notebook 10, make demo-keypoints): one-hot targets on an RoI, the m^2-way softmax
# against a per-pixel sigmoid, predicted heatmaps over their RoI, skeletons on predictions, and
# COCO's object keypoint similarity (OKS) with its tolerance circles
# --------------------------------------------------------------------------------------------

__all__ += [
    "draw_keypoint_heatmap",
    "draw_keypoint_heatmaps",
    "draw_keypoint_predictions_vs_truth",
    "draw_keypoint_targets",
    "draw_oks_circles",
    "draw_softmax_vs_sigmoid",
    "keypoint_color",
    "keypoint_oks",
    "oks_radius",
]


def keypoint_color(k: int) -> tuple[float, float, float]:
    """RGB colour (0..1) of keypoint type ``k``: matplotlib's ``tab20``, so every figure of
    notebook 10 gives "left_hand" the same colour."""
    k = int(k)
    if k < 0:
        raise ValueError(f"keypoint_color: k must be >= 0, got {k}")
    return tuple(float(c) for c in plt.get_cmap("tab20")(k % 20)[:3])


def _kp_array(kps, fn: str, name: str, K: int | None = None, cols=(3,)) -> np.ndarray:
    """``kps`` as float64 ``[K, c]`` with ``c`` in ``cols``; ``K`` checked when given."""
    arr = (
        kps.detach().cpu().double().numpy()
        if isinstance(kps, torch.Tensor)
        else np.asarray(kps, dtype=np.float64)
    )
    if arr.ndim != 2 or arr.shape[1] not in cols or (K is not None and arr.shape[0] != K):
        want = " or ".join(f"[{'K' if K is None else K}, {c}]" for c in cols)
        raise ValueError(
            f"{fn}: {name} must be {want} (x, y{', v' if 3 in cols else ''} per "
            f"keypoint), got {arr.shape}"
        )
    return arr


def _kp_names(names, K: int, fn: str) -> list[str]:
    if names is None:
        return [f"keypoint {k}" for k in range(K)]
    names = [str(n) for n in names]
    if len(names) != K:
        raise ValueError(f"{fn}: keypoint_names has {len(names)} names for {K} keypoints")
    return names


def _kp_skeleton(ax: Axes, kps: np.ndarray, skeleton, color, fn: str, **kw) -> None:
    """Lines between labelled keypoints (``kps [K, 3]`` in continuous pixel coordinates, on axes
    whose image has ``extent=(0, W, H, 0)``); ``skeleton`` pairs are 1-based, as COCO's."""
    K = kps.shape[0]
    for a, b in skeleton or ():
        i, j = int(a) - 1, int(b) - 1
        if not (0 <= i < K and 0 <= j < K):
            raise ValueError(
                f"{fn}: skeleton pair ({a}, {b}) is out of range for {K} keypoints "
                "(pairs are 1-based, as in COCO)"
            )
        if kps[i, 2] > 0 and kps[j, 2] > 0:
            ax.plot([kps[i, 0], kps[j, 0]], [kps[i, 1], kps[j, 1]], color=color, **kw)


def draw_keypoint_targets(
    image,
    roi,
    keypoints,
    *,
    m: int = 56,
    keypoint_names=None,
    skeleton=None,
    fig: Figure | None = None,
    title: str | None = None,
) -> Figure:
    """One RoI's keypoint targets (Mask R-CNN sec. 5): each visible keypoint is a one-hot
    ``m x m`` mask, "where only a single pixel is labeled as foreground".

    The targets are ``heads.keypoint_targets(keypoints[None], roi[None], m)``, the function the
    keypoint loss uses: the RoI is cut into an ``m x m`` grid and each labelled keypoint (v > 0)
    inside it marks the one cell it falls in.

    Two panels: (1) the image around the RoI (yellow, ``gid="roi_box"``) with the gt keypoints
    and skeleton, and the grid cell of each keypoint with a target outlined in the keypoint's
    colour (one ``Rectangle`` with ``gid="target_cell"`` each, in image pixels); (2) the ``m x m``
    targets of all ``K`` keypoints in one picture (``gid="keypoint_targets"``; its array is
    ``[m, m, 3]``, black with each target's single pixel in its keypoint's colour), each target
    ringed and named. Keypoints without a target (not labelled, or outside the RoI) are listed
    in the title.

    Args:
        image: ``[3, H, W]`` tensor; roi: ``(x1, y1, x2, y2)`` in pixels.
        keypoints: ``[K, 3]`` (x, y, v) gt keypoints of the object the RoI is matched to.
        m: the heatmap size (56 in the paper); keypoint_names: ``K`` names; skeleton: 1-based
            pairs (COCO's ``skeleton``).
        fig: draw into this figure (cleared); by default a new ``Figure``.
    """
    from mrcnn_edu.heads.keypoint_head import keypoint_targets

    fn = "draw_keypoint_targets"
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    kps = _kp_array(keypoints, fn, "keypoints")
    K = kps.shape[0]
    names = _kp_names(keypoint_names, K, fn)
    m = int(m)
    if m < 1:
        raise ValueError(f"{fn}: m must be >= 1, got {m}")
    b = _one_box(roi, fn)  # [1, 4]
    x1, y1, x2, y2 = b[0].tolist()
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{fn}: roi {b[0].tolist()} is empty (needs x2 > x1 and y2 > y1)")
    index, valid = keypoint_targets(torch.as_tensor(kps, dtype=torch.float32)[None], b, m)
    index, valid = index[0].tolist(), valid[0].tolist()  # [K] each
    cw, ch = (x2 - x1) / m, (y2 - y1) / m  # one grid cell in image pixels

    if fig is None:
        fig = Figure(figsize=(10, 4.6))
    fig.clear()
    ax0, ax1 = fig.subplots(1, 2)
    ax0.imshow(img, extent=(0, W, H, 0))
    _kp_skeleton(ax0, kps, skeleton, "white", fn, linewidth=1.0, alpha=0.8)
    ax0.add_patch(
        Rectangle(
            (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=1.5, gid="roi_box"
        )
    )
    picture = np.zeros((m, m, 3), dtype=np.float32)
    for k in range(K):
        color = keypoint_color(k)
        if kps[k, 2] > 0:
            ax0.scatter(
                [kps[k, 0]],
                [kps[k, 1]],
                s=14,
                c=[color],
                edgecolors="black",
                linewidths=0.5,
                zorder=4,
            )
        if not valid[k]:
            continue
        row, col = divmod(index[k], m)
        picture[row, col] = color
        ax0.add_patch(
            Rectangle(
                (x1 + col * cw, y1 + row * ch),
                cw,
                ch,
                fill=False,
                edgecolor=color,
                linewidth=1.2,
                zorder=5,
                gid="target_cell",
            )
        )
        ax1.add_patch(
            Circle((col + 0.5, row + 0.5), 1.6, fill=False, edgecolor=color, linewidth=1.0)
        )
        ax1.text(col + 2.3, row + 0.5, names[k], color=color, fontsize=7, va="center")
    _zoom(ax0, (x1, y1, x2, y2), H, W, margin=0.25)
    ax0.set_title(f"RoI (yellow), the {m} x {m} grid cell of each keypoint", fontsize=9)
    im = ax1.imshow(picture, extent=(0, m, m, 0), interpolation="nearest")
    im.set_gid("keypoint_targets")
    ax1.set_xlim(0, m)
    ax1.set_ylim(m, 0)
    ax1.set_title(
        f"{sum(valid)} one-hot {m} x {m} targets (one pixel each), drawn together", fontsize=9
    )
    missing = [names[k] for k in range(K) if not valid[k]]
    if title is None:
        title = f"keypoint targets of RoI ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f})" + (
            f"; no target: {', '.join(missing)}" if missing else ""
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # room for the title
    return fig


def _flat_target(target, m: int, fn: str) -> tuple[int, int] | None:
    """``None``, a flat index ``row * m + col`` or a ``(row, col)`` pair -> ``(row, col)``."""
    if target is None:
        return None
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).reshape(-1)
    if t.size == 1:
        row, col = divmod(int(t[0]), m)
    elif t.size == 2:
        row, col = int(t[0]), int(t[1])
    else:
        raise ValueError(f"{fn}: target must be a flat index or (row, col), got {t.tolist()}")
    if not (0 <= row < m and 0 <= col < m):
        raise ValueError(f"{fn}: target ({row}, {col}) is outside the {m} x {m} heatmap")
    return row, col


def draw_softmax_vs_sigmoid(
    logits, target=None, *, fig: Figure | None = None, title: str | None = None
) -> Figure:
    """One ``m x m`` heatmap of logits read two ways: the paper's ``m^2``-way softmax and a
    per-pixel sigmoid (the mask head's loss).

    Left (``gid="softmax_map"``): ``softmax`` over all ``m^2`` positions, a distribution that
    sums to 1: the positions compete, so raising one lowers all others ("encourages a single
    point to be detected", sec. 5). Right (``gid="sigmoid_map"``): ``sigmoid`` of each pixel on
    its own, ``m^2`` independent yes/no answers whose sum is unconstrained. The titles give each
    map's sum, maximum and its value at ``target`` (a flat index ``row * m + col`` or a
    ``(row, col)`` pair, ringed, ``gid="target_pixel"``). The arrays of the two images are the
    probabilities, drawn on one logarithmic colour scale (so a background of many small values
    shows beside the peak).
    """
    fn = "draw_softmax_vs_sigmoid"
    z = (
        logits.detach().cpu().double()
        if isinstance(logits, torch.Tensor)
        else torch.as_tensor(np.asarray(logits, dtype=np.float64))
    )
    if z.dim() != 2 or z.shape[0] != z.shape[1] or z.numel() == 0:
        raise ValueError(f"{fn}: logits must be one square [m, m] heatmap, got {tuple(z.shape)}")
    m = z.shape[0]
    rc = _flat_target(target, m, fn)
    soft = torch.softmax(z.reshape(-1), dim=0).reshape(m, m).numpy()  # [m*m] -> [m, m]
    sig = torch.sigmoid(z).numpy()
    if fig is None:
        fig = Figure(figsize=(10, 4.4))
    fig.clear()
    axes = fig.subplots(1, 2)
    # one log colour scale for both maps: the background's share is visible beside the peak
    norm = LogNorm(vmin=max(float(min(soft.min(), sig.min())), 1e-12), vmax=1.0)
    for ax, p, gid, what in (
        (axes[0], soft, "softmax_map", f"softmax over the {m * m} positions"),
        (axes[1], sig, "sigmoid_map", "per-pixel sigmoid"),
    ):
        im = ax.imshow(p, extent=(0, m, m, 0), cmap="viridis", norm=norm, interpolation="nearest")
        im.set_gid(gid)
        fig.colorbar(im, ax=ax, shrink=0.8)
        text = f"{what}\nsum {p.sum():.3g}, max {p.max():.3g}"
        if rc is not None:
            row, col = rc
            ax.add_patch(
                Circle(
                    (col + 0.5, row + 0.5),
                    max(1.0, m / 28),
                    fill=False,
                    edgecolor="red",
                    linewidth=1.5,
                    gid="target_pixel",
                )
            )
            text += f", at the target {p[row, col]:.3g}"
        ax.set_title(text, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if title is not None else 1))
    return fig


def draw_keypoint_heatmaps(
    heatmaps,
    *,
    keypoint_names=None,
    targets=None,
    ncols: int = 6,
    size: float = 1.9,
    fig: Figure | None = None,
    title: str | None = None,
) -> Figure:
    """All ``K`` heatmaps of one RoI as pictures: panel ``k`` (``gid="heatmap_<k>"``, its array
    the ``m^2``-way softmax of heatmap ``k``) with its maximum marked ``+``, and the one-hot
    target ringed in red when ``targets`` (``[K]`` flat indices, -1 for none) are given.

    Args:
        heatmaps: ``[K, m, m]`` logits (one RoI's keypoint head output).
    """
    fn = "draw_keypoint_heatmaps"
    maps = (
        heatmaps.detach().cpu().double()
        if isinstance(heatmaps, torch.Tensor)
        else torch.as_tensor(np.asarray(heatmaps, dtype=np.float64))
    )
    if maps.dim() != 3 or maps.shape[1] != maps.shape[2] or maps.shape[0] == 0:
        raise ValueError(f"{fn}: heatmaps must be [K, m, m] with K >= 1, got {tuple(maps.shape)}")
    K, m = maps.shape[0], maps.shape[1]
    names = _kp_names(keypoint_names, K, fn)
    if targets is not None:
        targets = [
            int(t)
            for t in np.asarray(
                targets.cpu() if isinstance(targets, torch.Tensor) else targets
            ).reshape(-1)
        ]
        if len(targets) != K:
            raise ValueError(f"{fn}: targets has {len(targets)} entries for {K} heatmaps")
    if ncols < 1:
        raise ValueError(f"{fn}: ncols must be >= 1, got {ncols}")
    ncols = min(ncols, K)
    nrows = math.ceil(K / ncols)
    probs = torch.softmax(maps.reshape(K, m * m), dim=1).reshape(K, m, m).numpy()
    if fig is None:
        fig = Figure(figsize=(size * ncols, (size + 0.3) * nrows))
    fig.clear()
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for k in range(K):
        ax = axes[k]
        im = ax.imshow(probs[k], extent=(0, m, m, 0), cmap="magma", interpolation="nearest")
        im.set_gid(f"heatmap_{k}")
        row, col = divmod(int(probs[k].argmax()), m)
        ax.plot([col + 0.5], [row + 0.5], "+", color="cyan", markersize=8, mew=1.5)
        if targets is not None and targets[k] >= 0:
            t_row, t_col = divmod(targets[k], m)
            ax.add_patch(
                Circle(
                    (t_col + 0.5, t_row + 0.5),
                    max(1.0, m / 20),
                    fill=False,
                    edgecolor="red",
                    linewidth=1.2,
                )
            )
        ax.set_title(f"{names[k]}\nmax p {probs[k].max():.2f}", fontsize=7, color=keypoint_color(k))
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[K:]:
        ax.set_axis_off()
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if title is not None else 1))
    return fig


def draw_keypoint_heatmap(
    image,
    box,
    heatmaps,
    k: int,
    *,
    keypoint_names=None,
    gt_keypoint=None,
    skeleton=None,
    fig: Figure | None = None,
    title: str | None = None,
    decoding: str = "torchvision",
) -> Figure:
    """One detection's heatmap of keypoint ``k``, laid over the image inside its box.

    The keypoints are the model's post-processing of ``heatmaps[None]`` in ``box[None]``, by
    ``decoding`` (its ``roi_heads.keypoint_decoding``): ``"torchvision"``,
    ``heads.heatmaps_to_keypoints`` (each heatmap resized, bicubic, to the box's size in pixels,
    its maximum taken), or ``"subpixel"``, ``heads.heatmaps_to_keypoints_subpixel`` (the
    ``m x m`` maximum refined by a Newton step).

    Three panels: (1) the image around the box (yellow, ``gid="roi_box"``) with all ``K``
    predicted keypoints and the skeleton; (2) the box's pixels with the ``m^2``-way softmax of
    heatmap ``k`` laid over them (``gid="heatmap_overlay"``: an RGBA image whose extent is the
    box, so grid cell ``(r, c)`` covers ``x1 + c w/m .. x1 + (c+1) w/m``), the predicted keypoint
    (``+``, ``gid="pred_keypoint"``) and, when given and labelled, the gt keypoint (ring,
    ``gid="gt_keypoint"``); (3) the raw ``m x m`` logits (``gid="heatmap_logits"``, its array
    the logits) with their maximum marked.

    Args:
        image: ``[3, H, W]`` tensor; box: ``(x1, y1, x2, y2)`` the detection's box (the RoI
            its heatmaps were pooled from), in the image's pixels.
        heatmaps: ``[K, m, m]`` logits of that detection; k: the keypoint to show.
        gt_keypoint: optional ``(x, y, v)`` of the matched gt object's keypoint ``k``.
    """
    from mrcnn_edu.heads.keypoint_head import keypoint_decoder

    fn = "draw_keypoint_heatmap"
    decode = keypoint_decoder(decoding, fn)
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    maps = (
        heatmaps.detach().cpu().float()
        if isinstance(heatmaps, torch.Tensor)
        else torch.as_tensor(np.asarray(heatmaps, dtype=np.float32))
    )
    if maps.dim() != 3 or maps.shape[1] != maps.shape[2] or maps.shape[0] == 0:
        raise ValueError(f"{fn}: heatmaps must be [K, m, m] with K >= 1, got {tuple(maps.shape)}")
    K, m = maps.shape[0], maps.shape[1]
    k = int(k)
    if not 0 <= k < K:
        raise ValueError(f"{fn}: k must lie in [0, {K}), got {k}")
    names = _kp_names(keypoint_names, K, fn)
    b = _one_box(box, fn)
    x1, y1, x2, y2 = b[0].tolist()
    kps, scores = decode(maps[None], b)  # [1, K, 3], [1, K]
    kps, scores = kps[0].double().numpy(), scores[0].numpy()
    probs = torch.softmax(maps[k].reshape(-1).double(), dim=0).reshape(m, m).numpy()
    gt = None
    if gt_keypoint is not None:
        gt = np.asarray(
            gt_keypoint.cpu() if isinstance(gt_keypoint, torch.Tensor) else gt_keypoint,
            dtype=np.float64,
        ).reshape(-1)
        if gt.size != 3:
            raise ValueError(f"{fn}: gt_keypoint must be (x, y, v), got {gt.tolist()}")

    if fig is None:
        fig = Figure(figsize=(12, 4.2))
    fig.clear()
    ax0, ax1, ax2 = fig.subplots(1, 3)
    ax0.imshow(img, extent=(0, W, H, 0))
    ax0.add_patch(
        Rectangle(
            (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=1.5, gid="roi_box"
        )
    )
    _kp_skeleton(ax0, kps, skeleton, "white", fn, linewidth=1.2)
    ax0.scatter(
        kps[:, 0],
        kps[:, 1],
        s=14,
        c=[keypoint_color(j) for j in range(K)],
        edgecolors="black",
        linewidths=0.5,
        zorder=4,
    )
    _zoom(ax0, (x1, y1, x2, y2), H, W, margin=0.5)
    ax0.set_title("the detection and its predicted keypoints", fontsize=9)

    ax1.imshow(img, extent=(0, W, H, 0))
    # colour and opacity grow with sqrt(p / max p): the peak, and the mass around it, show
    rel = np.sqrt(probs / max(float(probs.max()), 1e-300))  # [m, m] in 0..1
    rgba = plt.get_cmap("magma")(rel)  # [m, m, 4]
    rgba[..., 3] = 0.25 + 0.65 * rel
    over = ax1.imshow(rgba, extent=(x1, x2, y2, y1), interpolation="nearest")
    over.set_gid("heatmap_overlay")
    ax1.plot(
        [kps[k, 0]],
        [kps[k, 1]],
        "+",
        color="cyan",
        markersize=9,
        mew=1.0,
        gid="pred_keypoint",
        label="predicted",
    )
    if gt is not None and gt[2] > 0:
        ax1.plot(
            [gt[0]],
            [gt[1]],
            "o",
            mfc="none",
            mec="lime",
            markersize=10,
            mew=1.5,
            gid="gt_keypoint",
            label="ground truth",
        )
    ax1.legend(fontsize=7, loc="lower right")
    _zoom(ax1, (x1, y1, x2, y2), H, W, margin=0.05)
    ax1.set_title(f"{names[k]}: softmax over {m}x{m},\nmax p {probs.max():.2f}", fontsize=9)

    logits = maps[k].numpy()
    im = ax2.imshow(logits, extent=(0, m, m, 0), cmap="viridis", interpolation="nearest")
    im.set_gid("heatmap_logits")
    row, col = divmod(int(logits.argmax()), m)
    ax2.plot([col + 0.5], [row + 0.5], "+", color="red", markersize=10, mew=1.5)
    fig.colorbar(im, ax=ax2, shrink=0.8)
    ax2.set_title(f"logits ({m}x{m});\nscore {scores[k]:.2f} (the resized map's max)", fontsize=9)
    if title is None:
        title = (
            f"{names[k]} of the detection at ({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}): "
            f"({kps[k, 0]:.1f}, {kps[k, 1]:.1f})"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # room for the title
    return fig


def draw_keypoint_predictions_vs_truth(
    images: Sequence,
    detections: Sequence[dict],
    targets: Sequence[dict],
    *,
    skeleton=None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    titles: Sequence[str] | None = None,
) -> Figure:
    """:func:`draw_predictions_vs_truth` with keypoints: one row per image, the ground truth
    (boxes, keypoints, skeleton) on the left and the detections with ``score >=
    score_threshold`` and their predicted keypoints on the right (all drawn as found: the
    model's visibility is always 1).

    Args:
        detections: per image ``boxes``, ``labels``, ``scores`` and ``keypoints [N, K, 3]``.
        targets: per image ``boxes``, ``labels`` and ``keypoints [G, K, 3]``.
        skeleton: 1-based keypoint pairs (the data set's ``skeleton``).
    """
    fn = "draw_keypoint_predictions_vs_truth"
    if not (len(images) == len(detections) == len(targets)) or not images:
        raise ValueError(
            f"{fn}: need as many detections and targets as images (>= 1), got "
            f"{len(images)}, {len(detections)}, {len(targets)}"
        )
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(7, 3.4 * n), squeeze=False)
    for i, (img, det, tgt) in enumerate(zip(images, detections, targets)):
        if "keypoints" not in det:
            raise ValueError(
                f"{fn}: detections[{i}] has no 'keypoints' (a keypoint model's "
                f"output); keys {sorted(det)}"
            )
        extra = f" ({titles[i]})" if titles else ""
        draw_instances(
            img,
            tgt.get("boxes"),
            tgt.get("labels"),
            keypoints=tgt.get("keypoints"),
            class_names=class_names,
            skeleton=skeleton,
            ax=axes[i, 0],
            title=f"ground truth{extra}",
        )
        keep = det["scores"] >= score_threshold
        draw_instances(
            img,
            det["boxes"][keep],
            det["labels"][keep],
            det["scores"][keep],
            keypoints=det["keypoints"][keep][..., :2],
            class_names=class_names,
            skeleton=skeleton,
            ax=axes[i, 1],
            title=f"prediction (score >= {score_threshold}){extra}",
        )
    fig.tight_layout()
    return fig


def keypoint_oks(pred, gt, area: float, sigmas) -> tuple[float, np.ndarray]:
    """COCO's object keypoint similarity of one predicted pose with one gt object.

    For each gt keypoint that is labelled (``v > 0``), with ``d`` its distance to the
    prediction, ``s^2 = area`` the object's segment area and ``kappa = 2 sigma`` (``sigma``
    the keypoint type's constant)::

        similarity_k = exp(-d^2 / (2 s^2 kappa^2))          OKS = mean over labelled k

    so ``OKS`` plays the role of IoU for keypoints (1: perfect; COCO's AP thresholds it at
    0.50 .. 0.95). Computed as ``COCOeval.computeOks`` does (``area + eps``, float64), so the
    values are COCOeval's.

    Args:
        pred: ``[K, 2]`` or ``[K, 3]`` predicted (x, y[, v]); the visibility is not used.
        gt: ``[K, 3]`` gt (x, y, v); area: the gt's area (``> 0``); sigmas: ``[K]`` constants.

    Returns:
        ``(oks, similarity)``: a float and ``[K]`` per-keypoint similarities (``nan`` where the
        gt keypoint is not labelled).
    """
    fn = "keypoint_oks"
    g = _kp_array(gt, fn, "gt")
    K = g.shape[0]
    p = _kp_array(pred, fn, "pred", K, cols=(2, 3))
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if s.shape != (K,) or not np.all(s > 0):
        raise ValueError(f"{fn}: sigmas must be {K} positive numbers, got {s.tolist()}")
    if not float(area) > 0:
        raise ValueError(f"{fn}: area must be > 0, got {area}")
    labelled = g[:, 2] > 0
    if not labelled.any():
        raise ValueError(
            f"{fn}: the gt has no labelled keypoint (all v = 0): OKS is undefined "
            "(COCOeval then measures the distance to the box instead)"
        )
    variances = (2 * s) ** 2  # kappa^2
    d2 = (p[:, 0] - g[:, 0]) ** 2 + (p[:, 1] - g[:, 1]) ** 2
    e = d2 / variances / (float(area) + np.spacing(1)) / 2
    sim = np.where(labelled, np.exp(-e), np.nan)
    return float(np.exp(-e[labelled]).sum() / labelled.sum()), sim


def oks_radius(sigma: float, area: float, threshold: float) -> float:
    """The distance ``d`` at which a keypoint's OKS similarity falls to ``threshold``:
    ``exp(-d^2 / (2 area (2 sigma)^2)) = t``  =>  ``d = 2 sigma sqrt(2 area ln(1/t))``."""
    if not 0 < threshold < 1:
        raise ValueError(f"oks_radius: threshold must lie in (0, 1), got {threshold}")
    if not (sigma > 0 and area > 0):
        raise ValueError(f"oks_radius: sigma and area must be > 0, got {sigma}, {area}")
    return 2.0 * float(sigma) * math.sqrt(2.0 * float(area) * math.log(1.0 / threshold))


#: line styles of the tolerance circles, by threshold order (loosest first)
_OKS_STYLES = ("-", "--", ":", "-.")


def draw_oks_circles(
    ax: Axes,
    image,
    gt_keypoints,
    area: float,
    sigmas,
    *,
    pred_keypoints=None,
    thresholds: Sequence[float] = (0.5, 0.75, 0.95),
    keypoint_names=None,
    skeleton=None,
    box=None,
    title: str | None = None,
) -> Axes:
    """COCO's keypoint tolerance drawn on a gt pose: around each labelled keypoint ``k`` one
    circle per threshold ``t``, of radius :func:`oks_radius` ``(sigma_k, area, t)``: a
    prediction inside the circle has similarity ``>= t`` for that keypoint. The circles grow
    with the object (``sqrt(area)``) and with the keypoint type's ``sigma`` (a hip is harder to
    place than an eye, so it is given more room). Each circle is a ``Circle`` patch with
    ``gid="oks_<t:.2f>_<k>"``.

    With ``pred_keypoints`` (``[K, 2|3]``) each predicted keypoint is drawn (``x``, one
    ``gid="pred_keypoint"`` line of markers) and joined to its gt keypoint, and the title gives
    the OKS (:func:`keypoint_oks`). ``box`` (x1, y1, x2, y2): zoom on it (default: on the
    labelled keypoints).
    """
    fn = "draw_oks_circles"
    img = image_for_display(image, fn)
    H, W = img.shape[:2]
    g = _kp_array(gt_keypoints, fn, "gt_keypoints")
    K = g.shape[0]
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if s.shape != (K,):
        raise ValueError(f"{fn}: sigmas must have one value per keypoint ({K}), got {s.shape}")
    names = _kp_names(keypoint_names, K, fn)
    ts = sorted(float(t) for t in thresholds)
    if not ts or len(ts) > len(_OKS_STYLES):
        raise ValueError(f"{fn}: give 1..{len(_OKS_STYLES)} thresholds, got {list(thresholds)}")
    labelled = g[:, 2] > 0
    ax.imshow(img, extent=(0, W, H, 0))
    _kp_skeleton(ax, g, skeleton, "white", fn, linewidth=1.0, alpha=0.7)
    for k in np.flatnonzero(labelled):
        color = keypoint_color(k)
        for t, style in zip(ts, _OKS_STYLES):
            ax.add_patch(
                Circle(
                    (g[k, 0], g[k, 1]),
                    oks_radius(s[k], area, t),
                    fill=False,
                    edgecolor=color,
                    linestyle=style,
                    linewidth=1.2,
                    gid=f"oks_{t:.2f}_{k}",
                )
            )
        ax.plot([g[k, 0]], [g[k, 1]], "o", color=color, markersize=3)
    text = f"OKS tolerance circles: similarity {' / '.join(f'{t:g}' for t in ts)}"
    if pred_keypoints is not None:
        p = _kp_array(pred_keypoints, fn, "pred_keypoints", K, cols=(2, 3))
        oks, sim = keypoint_oks(p, g, area, s)
        for k in np.flatnonzero(labelled):
            ax.plot([g[k, 0], p[k, 0]], [g[k, 1], p[k, 1]], color=keypoint_color(k), linewidth=0.8)
        ax.plot(
            p[labelled, 0],
            p[labelled, 1],
            "x",
            color="red",
            markersize=6,
            mew=1.5,
            linestyle="none",
            gid="pred_keypoint",
        )
        worst = int(np.nanargmin(sim))
        text += f"\nOKS {oks:.3f} (worst: {names[worst]}, {sim[worst]:.2f})"
    for t, style in zip(ts, _OKS_STYLES):  # legend entries for the line styles
        ax.plot([], [], color="black", linestyle=style, label=f"similarity {t:g}")
    ax.legend(fontsize=7, loc="lower right")
    if box is not None:
        _zoom(ax, _one_box(box, fn)[0].tolist(), H, W, margin=0.15)
    else:
        pts = g[labelled, :2]
        _zoom(ax, (*pts.min(0), *pts.max(0)), H, W, margin=0.25)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else text, fontsize=9)
    return ax


# =============================================================================================
# 08b: the paper's ablations (Table 2) rerun with seeds (engine.ablate)
# =============================================================================================
def draw_ablation_bars(
    ax: Axes, values, *, paper=None, ylabel: str = "mask AP", title: str | None = None
) -> Axes:
    """One bar per variant at the mean over seeds, a +-1 sample-std error bar, every seed a dot.

    Args:
        values: ``{variant label: [one value per seed]}`` (e.g. AP in percent), in drawing order.
        paper: ``{variant label: value}``, the paper's number, written above its bar (the
            paper measured COCO, so it is text, not a bar on the same axis).

    Bars carry ``gid="bar:<label>"`` (height = mean), the seed dots ``gid="seeds:<label>"``
    (one offset per seed, y = the values), error bars only where there are two seeds or more.
    Returns ``ax``.
    """
    fn = "draw_ablation_bars"
    if not hasattr(values, "items") or not values:
        raise ValueError(f"{fn}: values must be a non-empty mapping {{label: [values]}}")
    labels = list(values)
    top = 0.0
    for i, label in enumerate(labels):
        v = np.asarray(values[label], dtype=float).reshape(-1)
        if v.size == 0 or not np.isfinite(v).all():
            raise ValueError(
                f"{fn}: values[{label!r}] must be finite numbers, one per seed, "
                f"got {values[label]!r}"
            )
        color = PALETTE[i % len(PALETTE)]
        mean = float(v.mean())
        bar = ax.bar(i, mean, width=0.6, color=color, alpha=0.55, edgecolor="black")
        bar.patches[0].set_gid(f"bar:{label}")
        if v.size > 1:
            ax.errorbar(i, mean, yerr=float(v.std(ddof=1)), color="black", capsize=4, linewidth=1)
        offsets = np.linspace(-0.15, 0.15, v.size) if v.size > 1 else np.zeros(1)
        dots = ax.scatter(i + offsets, v, s=18, color="black", zorder=3)
        dots.set_gid(f"seeds:{label}")
        top = max(top, float(v.max()))
        if paper and label in paper:
            ax.annotate(
                f"paper {paper[label]:.1f}",
                (i, 0),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color="0.25",
            )
    wrapped = [lb.replace(" (", "\n(").replace(", ", ",\n") for lb in labels]  # 2 lines
    ax.set_xticks(range(len(labels)), wrapped, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, top) * 1.15)
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax


def plot_ablation_study(panels, *, paper=None, title: str | None = None) -> Figure:
    """A grid of :func:`draw_ablation_bars`: one row per group of variants, one column per
    metric.

    Args:
        panels: ``{row title: {metric: {variant label: [values per seed]}}}`` (what
            ``mrcnn_edu.engine.ablate.chart_data`` returns).
        paper: the paper's values in the same layout (``{row: {metric: {label: value}}}``).
    """
    if not hasattr(panels, "items") or not panels:
        raise ValueError(
            "plot_ablation_study: panels must be a non-empty mapping "
            "{row: {metric: {label: [values]}}}"
        )
    rows = list(panels)
    ncols = max(len(panels[r]) for r in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(3.6 * ncols, 3.0 * len(rows)), squeeze=False
    )
    for i, row in enumerate(rows):
        for j, metric in enumerate(panels[row]):
            draw_ablation_bars(
                axes[i][j],
                panels[row][metric],
                ylabel=metric,
                paper=((paper or {}).get(row) or {}).get(metric),
                title=row,
            )
        for j in range(len(panels[row]), ncols):
            axes[i][j].set_axis_off()
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


__all__ += ["draw_ablation_bars", "plot_ablation_study"]


# =============================================================================================
# 08b: the same images through the variants of an ablation (masks from the runs' predictions)
# =============================================================================================
#: Pixels a model's masks claim for a class that the ground truth does not (magenta), and
#: pixels of a ground-truth object that no mask of its class covers (white).
EXTRA_COLOR = (0.85, 0.0, 0.85)
MISSED_COLOR = (1.0, 1.0, 1.0)


def _label_masks(masks, labels, name: str, fn: str, hw: tuple[int, int] | None = None):
    """``[N, H, W]`` bool masks (``[N, 1, H, W]`` probabilities thresholded at 0.5) and ``[N]``
    int labels as numpy, with the shapes checked."""
    m = _to_numpy(masks, f"{name} masks")
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]  # (N, 1, H, W) -> (N, H, W)
    if m.ndim != 3:
        raise ValueError(f"{fn}: {name} masks must be [N, H, W] or [N, 1, H, W], got {m.shape}")
    if hw is not None and tuple(m.shape[1:]) != tuple(hw):
        raise ValueError(f"{fn}: {name} masks are {m.shape[1:]} (H, W), the image is {hw}")
    lab = _to_numpy(labels, f"{name} labels").reshape(-1).astype(np.int64)
    if len(lab) != len(m):
        raise ValueError(f"{fn}: {len(m)} {name} masks but {len(lab)} {name} labels")
    return m >= 0.5, lab


def best_mask_ious(gt_masks, gt_labels, masks, labels) -> np.ndarray:
    """For each ground-truth object, the best mask IoU of a predicted mask of its class.

    Args:
        gt_masks: ``[G, H, W]`` 0/1; gt_labels: ``[G]`` int.
        masks: ``[N, H, W]`` 0/1 (or ``[N, 1, H, W]`` probabilities, thresholded at 0.5);
            labels: ``[N]`` int.

    Returns:
        ``[G]`` float64: ``max`` over the predictions of the same class of |m & g| / |m | g|,
        0 where no prediction has that class (a missed object).
    """
    fn = "best_mask_ious"
    g, gl = _label_masks(gt_masks, gt_labels, "gt", fn)
    p, pl = _label_masks(masks, labels, "predicted", fn, hw=g.shape[1:])
    H, W = g.shape[1:]
    gf = g.reshape(len(g), H * W).astype(np.float64)  # (G, H, W) -> (G, H*W)
    pf = p.reshape(len(p), H * W).astype(np.float64)  # (N, H, W) -> (N, H*W)
    inter = gf @ pf.T  # [G, N]
    union = gf.sum(1)[:, None] + pf.sum(1)[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    iou = np.where(gl[:, None] == pl[None, :], iou, 0.0)  # only the object's own class counts
    return iou.max(axis=1) if len(p) else np.zeros(len(g))  # [G]


def pick_overlapping_pair(boxes, labels) -> tuple[int, int] | None:
    """The two objects of *different* classes whose boxes overlap most (box IoU), as
    ``(i, j)`` with ``i < j``; ``None`` when no two such boxes overlap. ``boxes`` ``[G, 4]``
    (x1, y1, x2, y2), ``labels`` ``[G]``. Where a softmax over classes must split the pixels
    of one RoI between two classes (Table 2b)."""
    b = _as_boxes(boxes, "boxes", fn="pick_overlapping_pair")
    lab = _to_numpy(labels, "labels").reshape(-1)
    if len(lab) != len(b):
        raise ValueError(f"pick_overlapping_pair: {len(b)} boxes but {len(lab)} labels")
    best, pair = 0.0, None
    for i in range(len(b)):
        for j in range(i + 1, len(b)):
            if lab[i] != lab[j]:
                iou = box_pair_iou(b[i], b[j])
                if iou > best:
                    best, pair = iou, (i, j)
    return pair


def _class_layers(gt, gl, pred, pl) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per class c: ``both[c]`` = pred_c & gt_c; and one RGBA error layer: pred_c & ~gt_c
    (EXTRA_COLOR) and gt_c & ~pred_c (MISSED_COLOR), pred_c / gt_c the unions of class c."""
    H, W = gt.shape[1:]
    rgba = np.zeros((H, W, 4), np.float32)
    both = {}
    for c in sorted(set(gl.tolist()) | set(pl.tolist())):
        g = gt[gl == c].any(axis=0) if (gl == c).any() else np.zeros((H, W), bool)
        p = pred[pl == c].any(axis=0) if (pl == c).any() else np.zeros((H, W), bool)
        rgba[g & ~p] = (*MISSED_COLOR, 0.7)
        rgba[p & ~g] = (*EXTRA_COLOR, 0.65)
        both[c] = p & g
    return rgba, both


def draw_mask_comparison(
    images: Sequence,
    targets: Sequence[dict],
    detections,
    *,
    score_threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
    zooms: Sequence | None = None,
    row_titles: Sequence[str] | None = None,
    panel_size: float = 3.2,
) -> Figure:
    """The same images through several models, one row per image: the ground truth, then each
    model's masks against it, so that masks placed off the object's edges show.

    In a model's panel, per class: pixels its masks and the object share are filled in the
    class colour, pixels its masks add are magenta (:data:`EXTRA_COLOR`), pixels of the object
    they miss are white (:data:`MISSED_COLOR`); the ground truth's outline is dashed black and
    each mask's outline solid in its class colour. The title gives the mean over the objects
    of :func:`best_mask_ious` (each object's best mask IoU with a mask of its class, 0 when
    none), the mask-AP-like number of that panel.

    Args:
        images: ``[3, H, W]`` (or ``[H, W, 3]``) images, one per row.
        targets: per image ``masks`` ``[G, H, W]`` 0/1 and ``labels`` ``[G]``.
        detections: ``{model title: [per image a dict with masks [N, H, W] 0/1 or [N, 1, H,
            W] probabilities, labels [N], scores [N]]}``, in column order.
        score_threshold: detections scoring less are not drawn (nor counted in the IoU).
        class_names: ``class_names[label]`` for the legend of the ground-truth panel.
        zooms: per row ``None`` (the whole image) or a box ``(x1, y1, x2, y2)`` to show.
        row_titles: text per row, prefixed to the ground truth's title.

    Each error layer carries ``gid="errors:<row>:<model title>"`` (an RGBA image of the
    image's size); the titles hold the mean IoUs. Returns the figure.
    """
    fn = "draw_mask_comparison"
    if not hasattr(detections, "items") or not detections:
        raise ValueError(f"{fn}: detections must be a non-empty mapping {{title: [dicts]}}")
    n = len(images)
    if n == 0 or len(targets) != n:
        raise ValueError(f"{fn}: need one target per image, got {n} images, {len(targets)} targets")
    for title, dets in detections.items():
        if len(dets) != n:
            raise ValueError(f"{fn}: detections[{title!r}] has {len(dets)} entries for {n} images")
    for name, seq in (("zooms", zooms), ("row_titles", row_titles)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{fn}: {name} must have one entry per image ({n}), got {len(seq)}")
    models = list(detections)
    ncols = 1 + len(models)
    fig, axes = plt.subplots(
        n, ncols, figsize=(panel_size * ncols, panel_size * n + 0.3), squeeze=False
    )
    for r in range(n):
        img = image_to_numpy(images[r])
        H, W = img.shape[:2]
        gt, gl = _label_masks(targets[r]["masks"], targets[r]["labels"], "gt", fn, hw=(H, W))
        head = f"{row_titles[r]}: " if row_titles is not None else ""
        ax = axes[r][0]
        draw_instances(
            img,
            targets[r].get("boxes"),
            gl,
            masks=gt.astype(np.uint8),
            class_names=class_names,
            ax=ax,
            title=f"{head}ground truth ({len(gl)} objects)",
        )
        for k, title in enumerate(models):
            det = detections[title][r]
            scores = _to_numpy(det["scores"], "scores").reshape(-1)
            pred, pl = _label_masks(det["masks"], det["labels"], "predicted", fn, hw=(H, W))
            if len(scores) != len(pred):
                raise ValueError(
                    f"{fn}: detections[{title!r}][{r}] has {len(pred)} masks, {len(scores)} scores"
                )
            keep = scores >= score_threshold
            pred, pl = pred[keep], pl[keep]
            ax = axes[r][1 + k]
            ax.imshow(img, extent=(0, W, H, 0), interpolation="nearest")
            ax.imshow(np.ones((H, W, 4)) * (1, 1, 1, 0.35), extent=(0, W, H, 0), zorder=1)
            errors, both = _class_layers(gt, gl, pred, pl)
            fill = np.zeros((H, W, 4), np.float32)
            for c, m in both.items():
                fill[m] = (*class_color(c), 0.6)
            ax.imshow(fill, extent=(0, W, H, 0), interpolation="nearest", zorder=2)
            layer = ax.imshow(errors, extent=(0, W, H, 0), interpolation="nearest", zorder=3)
            layer.set_gid(f"errors:{r}:{title}")
            for m, c in zip(pred, pl):
                _contour(ax, m, colors=[class_color(c)], linewidths=1.2, zorder=4)
            for m in gt:
                _contour(ax, m, colors=["black"], linewidths=1.0, linestyles="--", zorder=5)
            ious = best_mask_ious(gt, gl, pred, pl)
            mean = f"{ious.mean():.2f}" if len(ious) else "n/a"
            ax.set_title(f"{title}\nmean best mask IoU {mean}", fontsize=9)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            ax.set_xticks([])
            ax.set_yticks([])
        zoom = zooms[r] if zooms is not None else None
        if zoom is not None:
            for ax in axes[r]:
                _zoom(ax, zoom, H, W)
    fig.tight_layout()
    return fig


__all__ += [
    "EXTRA_COLOR",
    "MISSED_COLOR",
    "best_mask_ious",
    "draw_mask_comparison",
    "pick_overlapping_pair",
]


# =============================================================================================
# 09: the 1x COCO schedule, and one step of DistributedDataParallel (engine.distributed)
# =============================================================================================
def plot_lr_schedule(
    steps,
    lrs,
    *,
    milestones: Sequence[int] = (),
    warmup_steps: int = 0,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """The learning rate of every step of a schedule, on a log scale, its decays marked.

    Args:
        steps: ``[S]`` increasing step numbers (0-based, as the scheduler counts them).
        lrs: ``[S]`` the learning rate of each of those steps (positive), e.g.
            ``base_lr * scheduler.lr_lambdas[0](s)`` for the scheduler ``build_optimization``
            builds.
        milestones: steps at which the rate is decayed; each gets a dashed line
            (``gid="milestone:<step>"``) and its decay factor, read from ``lrs`` (the rate just
            after the milestone over the rate just before it), written beside it.
        warmup_steps: > 0 adds an inset (``gid="warmup"``) with the first ``2 x warmup_steps``
            steps on a linear scale, where the linear warm-up shows.

    The schedule is the line ``gid="lr"``. Returns ``ax``.
    """
    fn = "plot_lr_schedule"
    x = np.asarray(steps, dtype=float).reshape(-1)
    y = np.asarray(lrs, dtype=float).reshape(-1)
    if x.size == 0 or x.size != y.size:
        raise ValueError(
            f"{fn}: steps and lrs must be non-empty and of one length, got {x.size} and {y.size}"
        )
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or (y <= 0).any():
        raise ValueError(f"{fn}: steps must be finite and lrs finite and positive (log scale)")
    if (np.diff(x) <= 0).any():
        raise ValueError(f"{fn}: steps must be increasing")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.6))
    (line,) = ax.plot(x, y, color=PALETTE[5], lw=2)
    line.set_gid("lr")
    ax.set_yscale("log")
    for m in milestones:
        before, after = y[x < m], y[x >= m]
        if before.size == 0 or after.size == 0:
            raise ValueError(f"{fn}: milestone {m} lies outside the steps {x[0]:g}..{x[-1]:g}")
        ax.axvline(m, color="0.3", ls="--", lw=1).set_gid(f"milestone:{m}")
        ax.annotate(
            f"step {m:,}: x{after[0] / before[-1]:.3g}",
            (m, after[0]),
            xytext=(4, 6),
            textcoords="offset points",
            fontsize=8,
            color="0.2",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3, which="both")
    if warmup_steps > 0:
        inset = ax.inset_axes((0.24, 0.1, 0.34, 0.45))
        inset.set_gid("warmup")
        near = x <= 2 * warmup_steps
        inset.plot(x[near], y[near], color=PALETTE[5], lw=1.5)
        inset.axvline(warmup_steps, color="0.3", ls=":", lw=1)
        inset.set_title(f"warm-up: the first {warmup_steps:,} steps", fontsize=7)
        inset.tick_params(labelsize=6)
        inset.set_ylim(0, float(y[near].max()) * 1.1)
    if title is not None:
        ax.set_title(title)
    return ax


def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, color, gid: str) -> None:
    patch = FancyBboxPatch(
        (x - w / 2, y - h / 2),
        w,
        h,
        boxstyle="round,pad=0.02,rounding_size=0.08",
        facecolor=color,
        edgecolor="0.2",
        alpha=0.9,
    )
    patch.set_gid(gid)
    ax.add_patch(patch)
    ax.text(x, y, text, ha="center", va="center", fontsize=8)


def _arrow(ax: Axes, a: tuple[float, float], b: tuple[float, float]) -> None:
    ax.annotate("", b, xytext=a, arrowprops={"arrowstyle": "->", "lw": 1.2, "color": "0.25"})


def draw_ddp_step(
    shards: Sequence[Sequence[int]],
    *,
    rank_seeds: Sequence[int] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """One training step of ``DistributedDataParallel`` over ``W = len(shards)`` ranks.

    Each row is a rank (one process, one GPU): its own images (``shards[r]``, indices into the
    data set: this rank's batch, drawn from its shard of the epoch), its own replica of the
    model running forward and backward on them, its gradient ``g_r``; the all-reduce in the
    middle averages the gradients, ``g = (g_0 + ... + g_{W-1}) / W``, and every rank applies
    the same update to the same parameters, so the replicas stay identical.

    Args:
        shards: ``[W][B_r]`` the data set indices of each rank's batch.
        rank_seeds: optional ``[W]`` per-rank seeds (``engine.distributed.rank_seed``) of the
            random choices that must differ between ranks (flips, RoI sampling), written under
            each replica.

    Patches carry gids ``image:<r>:<i>``, ``replica:<r>``, ``grad:<r>``, ``allreduce`` and
    ``update:<r>``. Returns ``ax``.
    """
    fn = "draw_ddp_step"
    if isinstance(shards, (str, bytes)) or not isinstance(shards, Sequence) or not shards:
        raise ValueError(f"{fn}: shards must be a non-empty list of index lists, one per rank")
    rows = []
    for r, shard in enumerate(shards):
        try:
            idx = [int(i) for i in shard]
        except (TypeError, ValueError):
            raise ValueError(f"{fn}: shards[{r}] must be a list of image indices") from None
        if not idx:
            raise ValueError(f"{fn}: shards[{r}] is empty: every rank needs images")
        rows.append(idx)
    W = len(rows)
    if rank_seeds is not None and len(rank_seeds) != W:
        raise ValueError(f"{fn}: {len(rank_seeds)} rank_seeds for {W} ranks")
    B = max(len(r) for r in rows)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 1.3 + 1.25 * W))
    img_w = 0.55
    x_rep = B * (img_w + 0.1) + 1.1
    x_grad, x_red, x_upd = x_rep + 2.0, x_rep + 3.6, x_rep + 5.6
    ys = [W - 1 - r for r in range(W)]  # rank 0 on top
    for r, (idx, y) in enumerate(zip(rows, ys)):
        ax.text(-0.15, y, f"rank {r}", ha="right", va="center", fontsize=9, weight="bold")
        for i, k in enumerate(idx):
            _box(
                ax,
                0.3 + i * (img_w + 0.1),
                y,
                img_w,
                0.55,
                f"#{k}",
                class_color(r + 1),
                f"image:{r}:{i}",
            )
        _arrow(ax, (0.3 + (len(idx) - 0.5) * (img_w + 0.1), y), (x_rep - 0.95, y))
        seed = f"\nseed {int(rank_seeds[r])}" if rank_seeds is not None else ""
        _box(
            ax,
            x_rep,
            y,
            1.8,
            0.75,
            f"replica {r}\nforward + backward{seed}",
            "0.92",
            f"replica:{r}",
        )
        _arrow(ax, (x_rep + 0.9, y), (x_grad - 0.35, y))
        _box(ax, x_grad, y, 0.6, 0.5, f"$g_{{{r}}}$", class_color(r + 1), f"grad:{r}")
        _arrow(ax, (x_grad + 0.3, y), (x_red - 0.55, y))
        _arrow(ax, (x_red + 0.55, y), (x_upd - 0.8, y))
        _box(
            ax,
            x_upd,
            y,
            1.6,
            0.55,
            r"$\theta \leftarrow \theta - \eta\,\bar g$",
            "white",
            f"update:{r}",
        )
    _box(
        ax,
        x_red,
        (W - 1) / 2,
        1.1,
        max(0.9, W - 0.3),
        "all-reduce\n" + r"$\bar g = \frac{1}{W}\sum_r g_r$" + f"\n(W = {W})",
        (0.98, 0.93, 0.75),
        "allreduce",
    )
    ax.set_xlim(-1.0, x_upd + 1.0)
    ax.set_ylim(-0.7, W - 0.3 + 0.2)
    ax.set_aspect("auto")
    ax.axis("off")
    ax.set_title(
        title
        if title is not None
        else f"one DDP step: {W} ranks, {sum(len(r) for r in rows)} images in all",
        fontsize=10,
    )
    return ax


__all__ += ["draw_ddp_step", "plot_lr_schedule"]

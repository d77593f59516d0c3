"""Matplotlib drawings of images with instances: boxes, class names and scores, masks, keypoints.

Mask R-CNN (He et al. 2017) outputs, per image, boxes with class labels and scores (the Faster
R-CNN part, section 3), one mask per box (section 3, "Mask Representation") and, in the keypoint
variant (section 5), K keypoints per person. The paper's figures draw them as coloured boxes,
translucent masks and stick figures; :func:`draw_instances` draws exactly that, for targets and
predictions alike, so every notebook (starting with ``00_tour.ipynb``) shows data the same way.
Colours are a fixed palette indexed by class (:func:`class_color`), so "circle" has the same
colour in every figure of the series.

This is the only module besides ``widgets`` and ``cli`` that imports matplotlib (DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

__all__ = [
    "PALETTE",
    "class_color",
    "draw_boxes",
    "draw_instances",
    "draw_pipeline",
    "image_to_numpy",
    "show_batch",
    "show_samples",
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
    raise TypeError(f"draw_instances: {name} must be a tensor or numpy array, got {type(x).__name__}")


def image_to_numpy(image) -> np.ndarray:
    """Any supported image -> ``[H, W, 3]`` float32 numpy array in 0..1 for ``imshow``.

    Accepts a torch tensor ``[3, H, W]`` (float 0..1 or uint8 0..255) or a numpy array
    ``[H, W, 3]`` (uint8 0..255 or float 0..1). A float image far outside 0..1 is rejected: it is
    probably normalized, and ``mrcnn_edu.transforms.Normalize().inverse(image)`` undoes that.
    """
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"draw_instances: a tensor image must have shape [3, H, W], got {tuple(image.shape)}"
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
            f"draw_instances: float image values must be in 0..1, got {arr.min():.3g}..{arr.max():.3g}"
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
    """Draw ``boxes [N, 4]`` (x1, y1, x2, y2) in pixels as rectangles on ``ax`` (anchors, proposals).

    ``colors``: one colour per box or ``None`` (all orange). A pixel-edge box ``[0, 0, W, H]``
    covers the whole image: ``imshow`` puts pixel centres at integers, hence the ``-0.5`` shift.
    """
    b = _to_numpy(boxes, "boxes").astype(np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"draw_boxes: boxes must have shape [N, 4], got {tuple(b.shape)}")
    for i, (x1, y1, x2, y2) in enumerate(b):
        color = PALETTE[1] if colors is None else colors[i]
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                               edgecolor=color, linewidth=linewidth, linestyle=linestyle))


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
            raise ValueError(f"draw_instances: boxes must have shape [N, 4], got {tuple(boxes.shape)}")
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
                f"draw_instances: masks must have shape [N, H, W] or [N, 1, H, W], got {masks.shape}"
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
            draw_boxes(ax, boxes[i:i + 1], colors=[color])
            caption = []
            if labels is not None:
                lab = int(labels[i])
                names_ok = class_names is not None and 0 <= lab < len(class_names)
                caption.append(class_names[lab] if names_ok else str(lab))
            if scores is not None:
                caption.append(f"{scores[i]:.2f}")
            if caption:
                x1, y1 = boxes[i, 0], boxes[i, 1]
                ax.text(x1 - 0.5, y1 - 0.5, " ".join(caption), fontsize=7, color="black",
                        va="bottom", ha="left", clip_on=True,
                        bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
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
    ax.scatter(x[vis], y[vis], s=14, c=[color], edgecolors="black", linewidths=0.5, zorder=3)
    ax.scatter(x[occ], y[occ], s=14, facecolors="none", edgecolors=[color], linewidths=1.2,
               zorder=3)


def _target_kwargs(target: dict) -> dict:
    keys = ("boxes", "labels", "scores", "masks", "keypoints")
    return {k: target[k] for k in keys if k in target}


def show_samples(dataset, indices: Sequence[int], ncols: int = 4, size: float = 3.0, **kw) -> Figure:
    """A grid of ``dataset[i]`` for ``i`` in ``indices``, each drawn with :func:`draw_instances`.

    ``dataset[i]`` must return ``(image, target)`` with the target keys of DESIGN.md.
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
    for ax in axes.flat[len(indices):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


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
        draw_instances(images[i], **tgt, ax=ax, title=f"image {i}: {h}x{w} in "
                       f"{images.shape[-2]}x{images.shape[-1]}", **kw)
        ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor="white",
                               linestyle="--", linewidth=1.2))
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
        ax.add_patch(FancyBboxPatch((x, 0.0), width, 1.6, boxstyle="round,pad=0.04",
                                    facecolor=(*color, 0.35), edgecolor=color, linewidth=1.5))
        ax.text(x + width / 2, 1.38, name, ha="center", va="center", fontsize=9.5, weight="bold")
        ax.text(x + width / 2, 0.72, what, ha="center", va="center", fontsize=8)
        ax.text(x + width / 2, 0.12, f"notebook {nb}", ha="center", va="center", fontsize=7,
                style="italic")
        if i < n - 1:
            ax.annotate("", xy=(x + width + gap - 0.04, 0.8), xytext=(x + width + 0.06, 0.8),
                        arrowprops={"arrowstyle": "->", "linewidth": 1.5})
    total = n * width + (n - 1) * gap
    ax.text(-0.1, 1.95, "images + targets (boxes, labels, masks, keypoints)", fontsize=9,
            ha="left")
    ax.text(total + 0.1, 1.95, "per image: boxes, labels, scores, masks [N,1,H,W], keypoints",
            fontsize=9, ha="right")
    ax.text(total / 2, -0.35, "training: the RPN and the heads return losses instead of "
            "detections (sampled anchors / RoIs against the targets)",
            fontsize=8, ha="center", color="dimgray")
    ax.set_xlim(-0.2, total + 0.2)
    ax.set_ylim(-0.55, 2.2)
    ax.set_axis_off()
    return ax

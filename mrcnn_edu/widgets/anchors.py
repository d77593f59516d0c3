"""Anchor explorer: which reference boxes does the RPN score at each feature-map location?

Faster R-CNN (Ren et al. 2015, section 3.1.1, "Anchors") places ``k`` anchors, one per
(scale, aspect ratio) pair, at every position of a stride-``s`` feature map; the RPN predicts
an objectness score and 4 box deltas for each. Notebook ``04_anchors_and_rpn.ipynb`` uses this
module to draw them.

* :func:`draw_anchors` draws any ``[N, 4]`` set of anchors over an image, coloured by aspect
  ratio, or by match label (positive / ignored / negative) when ``labels`` is given. Plain
  matplotlib, testable without widgets.
* :func:`plot_anchors_at` generates the anchors of one location with
  :class:`mrcnn_edu.anchors.AnchorGenerator` and draws them (the explorer's figure).
* :func:`anchor_explorer` wraps :func:`plot_anchors_at` in ipywidgets controls (sizes, aspect
  ratios, stride, location); every change redraws the figure in an ``Output``.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from mrcnn_edu.anchors import AnchorGenerator

#: colours of the match labels (``Matcher``/sampler convention: 1 fg, 0 bg, -1 ignored)
LABEL_COLORS = {1: "tab:green", -1: "0.65", 0: "tab:red"}
LABEL_NAMES = {1: "positive", -1: "ignored", 0: "negative"}


def _image_hwc(image) -> np.ndarray:
    """``[3, H, W]`` tensor / ``[H, W, 3]`` array (float or uint8) -> ``[H, W, 3]`` float in [0, 1]."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu()
        if arr.dim() != 3 or arr.shape[0] not in (1, 3):
            raise ValueError(f"draw_anchors: image tensor must be [3, H, W] or [1, H, W], got "
                             f"{tuple(arr.shape)}")
        arr = arr.permute(1, 2, 0).float().numpy()  # [C, H, W] -> [H, W, C]
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise ValueError(f"draw_anchors: image array must be [H, W, 3], got {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:  # uint8 range or a normalized image: stretch to [0, 1] for display
        arr = (arr - lo) / max(hi - lo, 1e-6)
    return arr


def _as_boxes(boxes, name: str) -> np.ndarray:
    arr = boxes.detach().cpu().float().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(
        boxes, dtype=np.float32)
    arr = arr.reshape(-1, 4) if arr.size == 0 else arr
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"draw_anchors: {name} must have shape [N, 4] (x1, y1, x2, y2), got "
                         f"{arr.shape}")
    return arr


def draw_anchors(
    ax,
    image,
    anchors,
    *,
    labels=None,
    gt_boxes=None,
    centers: bool = True,
    linewidth: float = 1.5,
    title: str | None = None,
    legend: bool = True,
):
    """Draw ``anchors`` over ``image`` on the matplotlib axes ``ax``; return ``ax``.

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
    img = _image_hwc(image)
    H, W = img.shape[:2]
    boxes = _as_boxes(anchors, "anchors")
    ax.imshow(img, extent=(0, W, H, 0))
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        lab = lab.reshape(-1).astype(np.int64)
        if lab.shape[0] != boxes.shape[0]:
            raise ValueError(f"draw_anchors: labels has {lab.shape[0]} entries for "
                             f"{boxes.shape[0]} anchors")
        groups = [(LABEL_NAMES[v], LABEL_COLORS[v], lab == v) for v in (-1, 0, 1)]  # fg on top
    else:
        ratio = (boxes[:, 3] - boxes[:, 1]) / np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
        # anchors are rounded to whole pixels, so snap h / w to the nearest power of sqrt(2)
        ratio = 2.0 ** (np.round(2 * np.log2(np.maximum(ratio, 1e-6))) / 2)
        cmap = plt.get_cmap("tab10")
        groups = [(f"h/w ~ {r:.2g}", cmap(i % 10), ratio == r) for i, r in enumerate(np.unique(ratio))]
    for name, color, mask in groups:
        sel = boxes[mask]
        for x1, y1, x2, y2 in sel:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color,
                                   linewidth=linewidth))
        if centers and len(sel):
            ax.plot((sel[:, 0] + sel[:, 2]) / 2, (sel[:, 1] + sel[:, 3]) / 2, ".", color=color,
                    markersize=3)
        if mask.any():
            ax.plot([], [], "s", color=color, label=f"{name} ({int(mask.sum())})")
    if gt_boxes is not None:
        for x1, y1, x2, y2 in _as_boxes(gt_boxes, "gt_boxes"):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white",
                                   linewidth=2.0 * linewidth, linestyle="--"))
    # show anchors that stick out of the image too, within reason
    if len(boxes):
        ax.set_xlim(max(min(0.0, boxes[:, 0].min()), -0.5 * W), min(max(W, boxes[:, 2].max()), 1.5 * W))
        ax.set_ylim(min(max(H, boxes[:, 3].max()), 1.5 * H), max(min(0.0, boxes[:, 1].min()), -0.5 * H))
    else:
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
    if legend and len(boxes):
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    if title:
        ax.set_title(title)
    return ax


def anchors_at(image_shape: tuple[int, int], sizes: Sequence[float], aspect_ratios: Sequence[float],
               stride: int, cell_x: int, cell_y: int) -> torch.Tensor:
    """The ``len(sizes) * len(aspect_ratios)`` anchors of feature-map cell ``(cell_y, cell_x)``.

    Uses ``AnchorGenerator(sizes=(sizes,), aspect_ratios=(aspect_ratios,)).grid_anchors`` on one
    feature map of shape ``(ceil(H / stride), ceil(W / stride))``; returns ``[A, 4]`` float32
    xyxy pixels (``A = len(sizes) * len(aspect_ratios)``, ratio-major).
    """
    H, W = image_shape
    h, w = -(-H // stride), -(-W // stride)  # ceil division: feature map size
    if not (0 <= cell_x < w and 0 <= cell_y < h):
        raise ValueError(f"anchors_at: cell (x={cell_x}, y={cell_y}) is outside the {h}x{w} "
                         f"feature map of stride {stride}")
    gen = AnchorGenerator(sizes=(tuple(float(s) for s in sizes),),
                          aspect_ratios=(tuple(float(r) for r in aspect_ratios),))
    anchors = gen.grid_anchors([(h, w)], [(stride, stride)])[0]  # [h*w*A, 4]
    A = gen.num_anchors_per_location()[0]
    return anchors.reshape(h, w, A, 4)[cell_y, cell_x]  # [h*w*A, 4] -> [h, w, A, 4] -> [A, 4]


def plot_anchors_at(image, sizes: Sequence[float], aspect_ratios: Sequence[float], stride: int,
                    cell_x: int, cell_y: int, *, show_grid: bool = True, ax=None):
    """The explorer's figure: anchors of one location, the grid of anchor centres; returns ``fig``."""
    img = _image_hwc(image)
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
    draw_anchors(ax, img, anchors, title=f"stride {stride}, cell (x={cell_x}, y={cell_y}): "
                                         f"{anchors.shape[0]} anchors")
    if show_grid:
        h, w = -(-H // stride), -(-W // stride)
        cx = (anchors[:, 0] + anchors[:, 2]).mean().item() / 2 - cell_x * stride  # centre offset
        cy = (anchors[:, 1] + anchors[:, 3]).mean().item() / 2 - cell_y * stride
        gx, gy = np.meshgrid(np.arange(w) * stride + cx, np.arange(h) * stride + cy)
        ax.plot(gx.ravel(), gy.ravel(), "+", color="yellow", markersize=3, alpha=0.6)
    return fig


def anchor_explorer(image, sizes: Sequence[int] = (16, 32, 64, 128, 256),
                    aspect_ratios: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
                    strides: Sequence[int] = (4, 8, 16, 32, 64)) -> widgets.VBox:
    """Interactive anchors: pick sizes, aspect ratios, the stride and a feature-map location.

    Args:
        image: ``[3, H, W]`` tensor or ``[H, W, 3]`` array to draw over.
        sizes / aspect_ratios / strides: the choices offered (defaults: the FPN paper's sizes
            32..512 halved for 256-pixel images, ratios around the paper's 0.5 / 1 / 2).

    Returns:
        ``VBox`` of the controls and an ``Output`` that is redrawn on every change; show it with
        ``display(explorer)``.
    """
    img = _image_hwc(image)
    H, W = img.shape[:2]
    size_w = widgets.SelectMultiple(options=list(sizes), value=tuple(s for s in sizes[1:4]),
                                    description="sizes", rows=len(sizes))
    ratio_w = widgets.SelectMultiple(options=list(aspect_ratios),
                                     value=tuple(r for r in aspect_ratios if r in (0.5, 1.0, 2.0)),
                                     description="h / w", rows=len(aspect_ratios))
    default_stride = 16 if 16 in strides else strides[len(strides) // 2]
    stride_w = widgets.Dropdown(options=list(strides), value=default_stride, description="stride")
    x_w = widgets.IntSlider(description="cell x", continuous_update=False)
    y_w = widgets.IntSlider(description="cell y", continuous_update=False)
    grid_w = widgets.Checkbox(value=True, description="show anchor centres")
    out = widgets.Output()

    def set_ranges(old_stride: int | None) -> None:
        """Fit the sliders to the feature map of the new stride, keeping the pixel location."""
        s = stride_w.value
        h, w = -(-H // s), -(-W // s)
        for slider, n in ((x_w, w), (y_w, h)):
            pixel = slider.value * old_stride if old_stride else (n // 2) * s
            slider.max = n - 1
            slider.value = min(pixel // s, n - 1)

    def redraw(*_) -> None:
        with out:
            out.clear_output(wait=True)
            fig = plot_anchors_at(img, sorted(size_w.value), sorted(ratio_w.value), stride_w.value,
                                  x_w.value, y_w.value, show_grid=grid_w.value)
            plt.show()
            plt.close(fig)

    def on_stride(change) -> None:
        # move the sliders without a redraw per slider, then draw once
        x_w.unobserve(redraw, names="value")
        y_w.unobserve(redraw, names="value")
        set_ranges(change["old"])
        x_w.observe(redraw, names="value")
        y_w.observe(redraw, names="value")
        redraw()

    set_ranges(None)
    stride_w.observe(on_stride, names="value")
    for w_ in (size_w, ratio_w, x_w, y_w, grid_w):
        w_.observe(redraw, names="value")
    redraw()
    controls = widgets.HBox([widgets.VBox([size_w, ratio_w]),
                             widgets.VBox([stride_w, x_w, y_w, grid_w])])
    return widgets.VBox([controls, out])


__all__ = ["anchor_explorer", "anchors_at", "draw_anchors", "plot_anchors_at"]

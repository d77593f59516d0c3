"""Anchor explorer: which reference boxes does the RPN score at each feature-map location?

Faster R-CNN (Ren et al. 2015, section 3.1.1, "Anchors") places ``k`` anchors, one per
(scale, aspect ratio) pair, at every position of a stride-``s`` feature map; the RPN predicts
an objectness score and 4 box deltas for each. Notebook ``04_anchors_and_rpn.ipynb`` shows them.

This module only wires controls (sizes, aspect ratios, stride, location) to the drawing
:func:`mrcnn_edu.viz.plot_anchors_at`; every change redraws the figure in an ``Output``.
``draw_anchors``, ``anchors_at``, ``plot_anchors_at`` and ``LABEL_COLORS`` live in
:mod:`mrcnn_edu.viz` and are re-exported here for code that imported them from this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt

from mrcnn_edu.viz import (  # noqa: F401  (re-exported)
    LABEL_COLORS,
    LABEL_NAMES,
    anchors_at,
    draw_anchors,
    image_for_display,
    plot_anchors_at,
)


def anchor_explorer(
    image,
    sizes: Sequence[int] = (16, 32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    strides: Sequence[int] = (4, 8, 16, 32, 64),
) -> widgets.VBox:
    """Interactive anchors: pick sizes, aspect ratios, the stride and a feature-map location.

    Args:
        image: ``[3, H, W]`` tensor or ``[H, W, 3]`` array to draw over.
        sizes / aspect_ratios / strides: the choices offered (defaults: the FPN paper's sizes
            32..512 halved for 256-pixel images, ratios around the paper's 0.5 / 1 / 2).

    Returns:
        ``VBox`` of the controls and an ``Output`` that is redrawn on every change; show it with
        ``display(explorer)``.
    """
    img = image_for_display(image, "anchor_explorer")
    H, W = img.shape[:2]
    size_w = widgets.SelectMultiple(
        options=list(sizes),
        value=tuple(s for s in sizes[1:4]),
        description="sizes",
        rows=len(sizes),
    )
    ratio_w = widgets.SelectMultiple(
        options=list(aspect_ratios),
        value=tuple(r for r in aspect_ratios if r in (0.5, 1.0, 2.0)),
        description="h / w",
        rows=len(aspect_ratios),
    )
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
            fig = plot_anchors_at(
                img,
                sorted(size_w.value),
                sorted(ratio_w.value),
                stride_w.value,
                x_w.value,
                y_w.value,
                show_grid=grid_w.value,
            )
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
    controls = widgets.HBox(
        [widgets.VBox([size_w, ratio_w]), widgets.VBox([stride_w, x_w, y_w, grid_w])]
    )
    return widgets.VBox([controls, out])


__all__ = ["LABEL_COLORS", "anchor_explorer", "anchors_at", "draw_anchors", "plot_anchors_at"]

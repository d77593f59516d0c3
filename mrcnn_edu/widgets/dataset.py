"""Dataset browser: step through a COCO-format data set and toggle what is drawn.

Notebook ``01_data_coco_format.ipynb`` uses it on the synthetic shapes set; it works on any
dataset returning ``(image [3, H, W], target)`` with the keys of ``mrcnn_edu.data.CocoDetection``
(boxes, labels, masks, keypoints, crowd_boxes). The ground truth is what Mask R-CNN
(He et al. 2017, Sec. 3) learns to output: a class and a box per object, a mask per box, and for
persons a set of keypoints.

This module only wires controls to a drawing: :func:`dataset_browser` puts an index slider and
toggles over :func:`mrcnn_edu.viz.draw_sample` (plain matplotlib, testable without widgets;
re-exported here); every change clears the ``Output`` and draws a new figure into it.
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display

from mrcnn_edu.viz import CROWD_COLOR, draw_sample

__all__ = ["CROWD_COLOR", "dataset_browser", "draw_sample"]  # draw_sample: re-exported


def dataset_browser(dataset, index: int = 0, size: float = 5.0) -> widgets.VBox:
    """An index slider and masks / boxes / keypoints / crowd toggles over ``dataset``.

    Returns a ``VBox`` (controls, then an ``Output``); it also carries ``.controls`` (name ->
    widget), ``.output`` and ``.redraw``. Show it with ``display(dataset_browser(ds))``.
    """
    if len(dataset) == 0:
        raise ValueError("dataset_browser: the dataset is empty")
    controls = {
        "index": widgets.IntSlider(
            value=min(max(index, 0), len(dataset) - 1),
            min=0,
            max=len(dataset) - 1,
            description="index",
            continuous_update=False,
        ),
        "masks": widgets.Checkbox(value=True, description="masks"),
        "boxes": widgets.Checkbox(value=True, description="boxes"),
        "keypoints": widgets.Checkbox(value=True, description="keypoints"),
        "crowd": widgets.Checkbox(value=True, description="crowd"),
    }
    out = widgets.Output()

    def redraw(change=None) -> None:
        c = {k: w.value for k, w in controls.items()}
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(size, size))
            draw_sample(
                dataset,
                c["index"],
                show_masks=c["masks"],
                show_boxes=c["boxes"],
                show_keypoints=c["keypoints"],
                show_crowd=c["crowd"],
                ax=ax,
            )
            display(fig)
            plt.close(fig)

    for w in controls.values():
        w.observe(redraw, names="value")
    toggles = widgets.HBox([controls[k] for k in ("masks", "boxes", "keypoints", "crowd")])
    browser = widgets.VBox([controls["index"], toggles, out])
    browser.controls, browser.output, browser.redraw = controls, out, redraw
    redraw()
    return browser

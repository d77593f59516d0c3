"""Dataset browser: step through a COCO-format data set and toggle what is drawn.

Notebook ``01_data_coco_format.ipynb`` uses it on the synthetic shapes set; it works on any
dataset returning ``(image [3, H, W], target)`` with the keys of ``mrcnn_edu.data.CocoDetection``
(boxes, labels, masks, keypoints, crowd_boxes). The ground truth is what Mask R-CNN
(He et al. 2017, Sec. 3) learns to output: a class and a box per object, a mask per box, and for
persons a set of keypoints.

* :func:`draw_sample` draws ``dataset[index]`` with :func:`mrcnn_edu.viz.draw_instances` (plain
  matplotlib, testable without widgets).
* :func:`dataset_browser` wraps it in an index slider and toggles; every change clears the
  ``Output`` and draws a new figure into it.
"""

from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.axes import Axes

from mrcnn_edu.viz import draw_boxes, draw_instances

CROWD_COLOR = (0.6, 0.6, 0.6)  # crowd regions (iscrowd=1): grey, dashed


def draw_sample(dataset, index: int, *, show_masks: bool = True, show_boxes: bool = True,
                show_keypoints: bool = True, show_crowd: bool = True,
                ax: Axes | None = None) -> Axes:
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
            ax.text(x1, y1, "crowd", fontsize=7, color="black", va="bottom", clip_on=True,
                    bbox={"facecolor": CROWD_COLOR, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    return ax


def dataset_browser(dataset, index: int = 0, size: float = 5.0) -> widgets.VBox:
    """An index slider and masks / boxes / keypoints / crowd toggles over ``dataset``.

    Returns a ``VBox`` (controls, then an ``Output``); it also carries ``.controls`` (name ->
    widget), ``.output`` and ``.redraw``. Show it with ``display(dataset_browser(ds))``.
    """
    if len(dataset) == 0:
        raise ValueError("dataset_browser: the dataset is empty")
    controls = {
        "index": widgets.IntSlider(value=min(max(index, 0), len(dataset) - 1), min=0,
                                   max=len(dataset) - 1, description="index",
                                   continuous_update=False),
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
            draw_sample(dataset, c["index"], show_masks=c["masks"], show_boxes=c["boxes"],
                        show_keypoints=c["keypoints"], show_crowd=c["crowd"], ax=ax)
            display(fig)
            plt.close(fig)

    for w in controls.values():
        w.observe(redraw, names="value")
    toggles = widgets.HBox([controls[k] for k in ("masks", "boxes", "keypoints", "crowd")])
    browser = widgets.VBox([controls["index"], toggles, out])
    browser.controls, browser.output, browser.redraw = controls, out, redraw
    redraw()
    return browser

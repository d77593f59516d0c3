"""Mask target explorer: pick a positive RoI and see the ``M x M`` target cut for it.

Mask R-CNN (He et al. 2017), section 3, "Training": "The mask target is the intersection between
an RoI and its associated ground-truth mask", resampled to ``m x m`` (28 with FPN). Explained in
notebook ``06_mask_head.ipynb``.

This module only wires controls to a drawing: the figure is
:func:`mrcnn_edu.viz.draw_mask_target`, and the target it shows is computed there by
:func:`mrcnn_edu.heads.mask_targets`, the function the mask loss uses.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from mrcnn_edu.viz import draw_mask_target

__all__ = ["mask_target_explorer"]


def _figure_png(fig: Figure) -> dict:
    """A Jupyter ``display_data`` output holding ``fig`` as a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return {
        "output_type": "display_data",
        "metadata": {},
        "data": {"image/png": png, "text/plain": "<mask target figure>"},
    }


def mask_target_explorer(
    image,
    gt_masks,
    rois,
    matched_idxs,
    *,
    labels=None,
    gt_boxes=None,
    class_names: Sequence[str] | None = None,
    M: int = 28,
    resolutions: Sequence[int] = (14, 28, 56),
) -> widgets.VBox:
    """A slider over the RoIs and a choice of ``M``; each change redraws the target figure.

    Args:
        image: ``[3, H, W]`` tensor of the image the RoIs belong to.
        gt_masks: ``[G, H, W]`` binary gt masks of that image.
        rois: ``[P, 4]`` (x1, y1, x2, y2) positive RoIs (e.g. ``sample_proposals``' RoIs with
            label > 0); matched_idxs: ``[P]`` their gt indices.
        labels: optional ``[P]`` classes (colour and name); gt_boxes: optional ``[G, 4]`` (the
            title gives each RoI's IoU with its gt box); class_names: index 0 = background.
        M: the starting resolution; resolutions: the choices offered.

    Returns:
        a ``VBox`` of the controls and an ``Output`` holding one PNG, replaced on every change
        (``Output.outputs`` is set in one step, so it also works outside a kernel). It carries
        ``.controls`` (``"roi"``: IntSlider, ``"M"``: Dropdown), ``.output`` and ``.redraw``.
    """
    fn = "mask_target_explorer"
    rois = torch.as_tensor(rois, dtype=torch.float32)
    if rois.dim() != 2 or rois.shape[1] != 4 or rois.shape[0] == 0:
        raise ValueError(f"{fn}: rois must be [P, 4] with P >= 1, got {tuple(rois.shape)}")
    P = rois.shape[0]
    matched_idxs = torch.as_tensor(matched_idxs).reshape(-1)
    if matched_idxs.shape[0] != P:
        raise ValueError(f"{fn}: matched_idxs has {matched_idxs.shape[0]} entries for {P} rois")
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != P:
            raise ValueError(f"{fn}: labels has {labels.shape[0]} entries for {P} rois")
    choices = sorted({int(r) for r in resolutions} | {int(M)})
    controls = {
        "roi": widgets.IntSlider(
            value=0, min=0, max=P - 1, description="RoI", continuous_update=False
        ),
        "M": widgets.Dropdown(options=choices, value=int(M), description="M"),
    }
    out = widgets.Output()

    def redraw(change=None) -> None:
        k = controls["roi"].value
        fig = Figure(figsize=(11, 3.8))
        draw_mask_target(
            image,
            gt_masks,
            rois[k],
            int(matched_idxs[k]),
            M=controls["M"].value,
            gt_boxes=gt_boxes,
            label=None if labels is None else int(labels[k]),
            class_names=class_names,
            fig=fig,
        )
        out.outputs = (_figure_png(fig),)  # clear and show in one state update

    for w in controls.values():
        w.observe(redraw, names="value")
    explorer = widgets.VBox([widgets.HBox([controls["roi"], controls["M"]]), out])
    explorer.controls, explorer.output, explorer.redraw = controls, out, redraw
    redraw()
    return explorer

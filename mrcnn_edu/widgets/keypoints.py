"""Keypoint heatmap explorer: pick a detected person and a keypoint, see its heatmap over the box.

Mask R-CNN (He et al. 2017), section 5: the keypoint head predicts, for every detection, ``K``
heatmaps of ``m x m`` logits (``m = 56``), one per keypoint type; each is an ``m^2``-way softmax
over the positions in the detection's box, and its maximum is the keypoint. Explained in notebook
``10_keypoints.ipynb``.

This module only wires controls to a drawing: the figure is
:func:`mrcnn_edu.viz.draw_keypoint_heatmap`, which places the keypoint with the model's own
post-processing (``decoding``: :func:`mrcnn_edu.heads.heatmaps_to_keypoints`, torchvision's, or
the sub-pixel :func:`mrcnn_edu.heads.heatmaps_to_keypoints_subpixel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure

from mrcnn_edu.viz import draw_keypoint_heatmap

from .mask_targets import _figure_png

__all__ = ["keypoint_heatmap_explorer"]


def keypoint_heatmap_explorer(
    image,
    boxes,
    heatmaps,
    *,
    scores=None,
    keypoint_names: Sequence[str] | None = None,
    gt_keypoints=None,
    skeleton=None,
    person: int = 0,
    keypoint: int = 0,
    decoding: str = "torchvision",
) -> widgets.VBox:
    """A choice of detection ("person") and of keypoint; each change redraws the heatmap figure.

    Args:
        image: ``[3, H, W]`` tensor the detections belong to.
        boxes: ``[D, 4]`` (x1, y1, x2, y2) detected boxes, in the image's pixels.
        heatmaps: ``[D, K, m, m]`` keypoint logits of those detections (the keypoint head's
            output for these boxes, e.g. ``run_stages(...)["keypoint_logits"]``).
        scores: optional ``[D]`` detection scores (shown in the person menu).
        keypoint_names: ``K`` names for the keypoint menu.
        gt_keypoints: optional ``[D, K, 3]`` the keypoints of the gt object each detection
            matches (rows with ``v = 0`` where there is none), drawn as rings.
        skeleton: 1-based keypoint pairs (COCO's ``skeleton``).
        person, keypoint: the starting choice.
        decoding: how the model turns heatmaps into keypoints (its
            ``roi_heads.keypoint_decoding``: ``"torchvision"`` or ``"subpixel"``).

    Returns:
        a ``VBox`` of the controls and an ``Output`` holding one PNG, replaced on every change
        (``Output.outputs`` is set in one step, so it also works outside a kernel). It carries
        ``.controls`` (``"person"``, ``"keypoint"``: Dropdowns), ``.output`` and ``.redraw``.
    """
    fn = "keypoint_heatmap_explorer"
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] == 0:
        raise ValueError(
            f"{fn}: boxes must be [D, 4] with D >= 1 detections, got {tuple(boxes.shape)}"
        )
    D = boxes.shape[0]
    heatmaps = torch.as_tensor(heatmaps)
    if heatmaps.dim() != 4 or heatmaps.shape[0] != D or heatmaps.shape[2] != heatmaps.shape[3]:
        raise ValueError(
            f"{fn}: heatmaps must be [D, K, m, m] with D = {D} (one per box), got "
            f"{tuple(heatmaps.shape)}"
        )
    K = heatmaps.shape[1]
    names = (
        list(keypoint_names) if keypoint_names is not None else [f"keypoint {k}" for k in range(K)]
    )
    if len(names) != K:
        raise ValueError(f"{fn}: keypoint_names has {len(names)} names for {K} heatmaps")
    if scores is not None:
        scores = torch.as_tensor(scores).reshape(-1)
        if scores.shape[0] != D:
            raise ValueError(f"{fn}: scores has {scores.shape[0]} entries for {D} boxes")
    if gt_keypoints is not None:
        gt_keypoints = torch.as_tensor(gt_keypoints, dtype=torch.float32)
        if tuple(gt_keypoints.shape) != (D, K, 3):
            raise ValueError(
                f"{fn}: gt_keypoints must be [{D}, {K}, 3] (one gt pose per "
                f"detection), got {tuple(gt_keypoints.shape)}"
            )
    if not (0 <= int(person) < D and 0 <= int(keypoint) < K):
        raise ValueError(
            f"{fn}: person must lie in [0, {D}) and keypoint in [0, {K}), got {person}, {keypoint}"
        )
    people = [
        (f"person {i}" + (f" (score {float(scores[i]):.2f})" if scores is not None else ""), i)
        for i in range(D)
    ]
    controls = {
        "person": widgets.Dropdown(options=people, value=int(person), description="person"),
        "keypoint": widgets.Dropdown(
            options=[(n, k) for k, n in enumerate(names)],
            value=int(keypoint),
            description="keypoint",
        ),
    }
    out = widgets.Output()

    def redraw(change=None) -> None:
        i, k = controls["person"].value, controls["keypoint"].value
        fig = Figure(figsize=(12, 4.2))
        draw_keypoint_heatmap(
            image,
            boxes[i],
            heatmaps[i],
            k,
            keypoint_names=names,
            gt_keypoint=None if gt_keypoints is None else gt_keypoints[i, k],
            skeleton=skeleton,
            fig=fig,
            decoding=decoding,
        )
        out.outputs = (_figure_png(fig),)  # clear and show in one state update

    for w in controls.values():
        w.observe(redraw, names="value")
    # the keypoint first: it always has several options (a quick-mode image may hold one person)
    explorer = widgets.VBox([widgets.HBox([controls["keypoint"], controls["person"]]), out])
    explorer.controls, explorer.output, explorer.redraw = controls, out, redraw
    redraw()
    return explorer

"""RoI sampling explorer: sliders that redraw where RoIPool and RoIAlign read a feature map.

Mask R-CNN (He et al. 2017), section 3, "RoIAlign", and figure 3. Explained in notebook
``02_roipool_vs_roialign.ipynb``.

This module only wires controls to a drawing: the figure is
:func:`mrcnn_edu.viz.draw_roi_sampling`, and the geometry it draws comes from the reference
operators (``mrcnn_edu.ops.roi_reference.roi_align_sampling_points`` and ``roi_pool_bins``).
"""

from __future__ import annotations

import base64
import io

import ipywidgets as widgets
from matplotlib.figure import Figure

from mrcnn_edu.viz import draw_roi_sampling

__all__ = ["roi_explorer"]


def _box4(box) -> tuple[float, float, float, float]:
    box = [float(v) for v in (box.tolist() if hasattr(box, "tolist") else box)]
    if len(box) != 4:
        raise ValueError(f"roi_explorer: box must have 4 numbers (x1, y1, x2, y2), got {len(box)}")
    return box[0], box[1], box[2], box[3]


# ----------------------------------------------------------------------------------------------
# Explorer (the widget pattern shared by all explorers: controls + Output, redraw on change)
# ----------------------------------------------------------------------------------------------


def _figure_png(fig: Figure) -> dict:
    """A Jupyter ``display_data`` output holding ``fig`` as a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return {
        "output_type": "display_data",
        "metadata": {},
        "data": {"image/png": png, "text/plain": "<RoI sampling figure>"},
    }


def roi_explorer(
    feature_hw=(8, 8),
    box=(1.3, 1.2, 5.7, 6.4),
    output_size: int = 2,
    sampling_ratio: int = 2,
    aligned: bool = False,
    method: str = "align",
    values=None,
) -> widgets.VBox:
    """Sliders for the box ``x1, y1, w, h``, output size, sampling ratio, aligned and method.

    Every change replaces the figure in the ``Output`` (clear + a new PNG, in one step by
    setting ``Output.outputs``, so the page shows exactly one fresh image and it also works
    outside a kernel). The returned ``VBox`` carries ``.controls`` (dict name -> widget),
    ``.output`` and ``.redraw`` (the observer, callable with or without a change dict).
    Box coordinates are in feature cells (``spatial_scale=1``).
    """
    H, W = (int(v) for v in feature_hw)
    x1, y1, x2, y2 = _box4(box)
    fs = {"min": -1.0, "step": 0.1, "continuous_update": False, "readout_format": ".1f"}
    controls = {
        "x1": widgets.FloatSlider(value=x1, max=float(W), description="x1", **fs),
        "y1": widgets.FloatSlider(value=y1, max=float(H), description="y1", **fs),
        "w": widgets.FloatSlider(
            value=x2 - x1,
            min=0.0,
            max=float(W),
            step=0.1,
            description="w",
            continuous_update=False,
            readout_format=".1f",
        ),
        "h": widgets.FloatSlider(
            value=y2 - y1,
            min=0.0,
            max=float(H),
            step=0.1,
            description="h",
            continuous_update=False,
            readout_format=".1f",
        ),
        "output_size": widgets.IntSlider(
            value=int(output_size), min=1, max=7, description="output", continuous_update=False
        ),
        "sampling_ratio": widgets.IntSlider(
            value=max(int(sampling_ratio), 0),
            min=0,
            max=4,
            description="samples",
            continuous_update=False,
            tooltip="0 = adaptive ceil(roi / bins)",
        ),
        "aligned": widgets.Checkbox(value=bool(aligned), description="aligned"),
        "method": widgets.ToggleButtons(
            options=["align", "pool"], value=method, description="method"
        ),
    }
    out = widgets.Output()

    def redraw(change=None) -> None:
        c = {k: w.value for k, w in controls.items()}
        fig = Figure(figsize=(5, 5))
        ax = fig.add_subplot()
        bx = (c["x1"], c["y1"], c["x1"] + c["w"], c["y1"] + c["h"])
        draw_roi_sampling(
            ax,
            (H, W),
            bx,
            c["output_size"],
            c["sampling_ratio"] or -1,
            c["aligned"],
            c["method"],
            values=values,
        )
        # clear and show the new image in one state update (no flicker, testable without kernel)
        out.outputs = (_figure_png(fig),)

    for w in controls.values():
        w.observe(redraw, names="value")
    rows = [
        widgets.HBox([controls["x1"], controls["y1"]]),
        widgets.HBox([controls["w"], controls["h"]]),
        widgets.HBox([controls["output_size"], controls["sampling_ratio"]]),
        widgets.HBox([controls["aligned"], controls["method"]]),
    ]
    explorer = widgets.VBox([*rows, out])
    explorer.controls, explorer.output, explorer.redraw = controls, out, redraw
    redraw()
    return explorer

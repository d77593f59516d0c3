"""FPN level explorer: which pyramid level pools an RoI of a given size and shape?

Mask R-CNN (He et al. 2017), section 3, "Network Architecture", pools each RoI from one level
of the Feature Pyramid Network (Lin et al. 2017, section 4.2, Eqn. (1))::

    k = floor(4 + log2(sqrt(w h) / 224)),  clamped to 2..5

so that every RoI covers about the same number of feature cells on its level. Explained in
notebook ``07_fpn_full_model.ipynb``.

This module only wires controls (box size ``sqrt(w h)``, aspect ratio ``h / w``) to the drawing
:func:`mrcnn_edu.viz.draw_fpn_levels`, whose level comes from
:func:`mrcnn_edu.poolers.assign_levels`, the function the RoI pooler itself uses.
"""

from __future__ import annotations

import base64
import io
import math

import ipywidgets as widgets
from matplotlib.figure import Figure

from mrcnn_edu.viz import box_wh, draw_fpn_levels

__all__ = ["fpn_level_explorer"]


def _figure_png(fig: Figure) -> dict:
    """A Jupyter ``display_data`` output holding ``fig`` as a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return {
        "output_type": "display_data",
        "metadata": {},
        "data": {"image/png": png, "text/plain": "<FPN level figure>"},
    }


def fpn_level_explorer(
    size: float = 150.0,
    aspect: float = 1.0,
    *,
    image_size: tuple[int, int] = (800, 800),
    k_min: int = 2,
    k_max: int = 5,
    size_range: tuple[float, float] = (8.0, 800.0),
    aspect_range: tuple[float, float] = (0.25, 4.0),
    output_size: int = 7,
) -> widgets.VBox:
    """Sliders for an RoI's size and aspect ratio; each change redraws its pyramid level.

    Args:
        size: starting ``sqrt(w h)`` of the box in input pixels.
        aspect: starting ``h / w``.
        image_size: ``(H, W)`` of the input the pyramid is drawn for.
        k_min, k_max: the levels the pooler uses (P2..P5).
        size_range, aspect_range: the sliders' ranges (log scale).
        output_size: the pooled size whose bins are drawn (7 for the box head).

    Returns:
        a ``VBox`` of the controls and an ``Output`` holding one PNG, replaced on every change
        (``Output.outputs`` is set in one step, so it also works outside a kernel). It carries
        ``.controls`` (``"size"``, ``"aspect"``: ``FloatLogSlider``), ``.output``, ``.redraw``
        and ``.level``, the level ``k`` of the box drawn last.
    """
    fn = "fpn_level_explorer"
    lo, hi = (float(v) for v in size_range)
    alo, ahi = (float(v) for v in aspect_range)
    if not 0 < lo < hi or not 0 < alo < ahi:
        raise ValueError(
            f"{fn}: size_range and aspect_range must be 0 < low < high, got "
            f"{size_range}, {aspect_range}"
        )
    if not (lo <= size <= hi and alo <= aspect <= ahi):
        raise ValueError(
            f"{fn}: size {size} and aspect {aspect} must lie in {size_range} and {aspect_range}"
        )
    controls = {
        "size": widgets.FloatLogSlider(
            value=float(size),
            base=2,
            min=math.log2(lo),
            max=math.log2(hi),
            step=0.05,
            description="sqrt(w h)",
            readout_format=".0f",
            continuous_update=False,
        ),
        "aspect": widgets.FloatLogSlider(
            value=float(aspect),
            base=2,
            min=math.log2(alo),
            max=math.log2(ahi),
            step=0.25,
            description="h / w",
            readout_format=".2f",
            continuous_update=False,
        ),
    }
    out = widgets.Output()
    explorer = widgets.VBox([widgets.HBox([controls["size"], controls["aspect"]]), out])

    def redraw(change=None) -> None:
        w, h = box_wh(controls["size"].value, controls["aspect"].value)
        fig = Figure(figsize=(13.5, 3.6))
        draw_fpn_levels(
            (w, h),
            image_size=image_size,
            k_min=k_min,
            k_max=k_max,
            output_size=output_size,
            fig=fig,
        )
        explorer.level = fig.fpn_level
        out.outputs = (_figure_png(fig),)  # clear and show in one state update

    for w_ in controls.values():
        w_.observe(redraw, names="value")
    explorer.controls, explorer.output, explorer.redraw = controls, out, redraw
    redraw()
    return explorer

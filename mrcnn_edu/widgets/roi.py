"""Where RoIPool and RoIAlign read the feature map: drawings and an ipywidgets explorer.

Mask R-CNN (He et al. 2017), section 3, "RoIAlign", and figure 3. Explained in notebook
``02_roipool_vs_roialign.ipynb``.

Everything here is drawn in the *index frame* of the feature map: the value ``f[i, j]`` lives
at the point ``(x=j, y=i)``, and cell ``(i, j)`` is drawn as the unit square centred there. In
this frame the formulas of ``torchvision.ops.roi_align`` / ``roi_pool`` are read off directly:

* RoIAlign maps a box ``(x1, y1, x2, y2)`` to ``x1 * spatial_scale - offset`` with
  ``offset = 0.5`` when ``aligned=True`` (the half-pixel shift, DESIGN.md) and ``0`` otherwise,
  splits it into ``oh x ow`` bins, puts a ``gh x gw`` grid of sampling points in each bin and
  reads every point by bilinear interpolation of its 4 neighbouring cells.
* RoIPool rounds the scaled box to whole cells, splits it into bins whose edges are rounded
  again (floor / ceil) and takes the maximum over the cells of each bin.

The plain functions (:func:`sampling_points`, :func:`bilinear_neighbours`, :func:`pool_bins`,
:func:`draw_roi_sampling`) need no widgets, so tests and notebooks can call them directly;
:func:`roi_explorer` wraps the drawing in sliders.
"""

from __future__ import annotations

import base64
import io
import math

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "align_geometry",
    "bilinear_neighbours",
    "draw_roi_sampling",
    "pool_bins",
    "roi_explorer",
    "sampling_points",
]


# ----------------------------------------------------------------------------------------------
# Geometry (the formulas of torchvision's roi_align / roi_pool kernels, written out)
# ----------------------------------------------------------------------------------------------

def _pair(output_size, name: str = "output_size") -> tuple[int, int]:
    """``7`` -> ``(7, 7)``; ``(oh, ow)`` stays. Raises ``ValueError`` for non-positive sizes."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    oh, ow = (int(v) for v in output_size)
    if oh < 1 or ow < 1:
        raise ValueError(f"{name} must be positive, got {tuple(output_size)}")
    return oh, ow


def _box4(box, name: str = "box") -> tuple[float, float, float, float]:
    """A box ``(x1, y1, x2, y2)`` as 4 Python floats (accepts a tuple, list or 4-element tensor)."""
    if isinstance(box, torch.Tensor):
        box = box.detach().reshape(-1).tolist()
    box = [float(v) for v in box]
    if len(box) != 4:
        raise ValueError(f"{name} must have 4 numbers (x1, y1, x2, y2), got {len(box)}")
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{name} must be finite, got {box}")
    return box[0], box[1], box[2], box[3]


def align_geometry(box, output_size, sampling_ratio: int = -1, aligned: bool = False,
                   spatial_scale: float = 1.0) -> dict:
    """The numbers RoIAlign derives from one box before it samples anything.

    Returns a dict with ``start`` ``(x, y)`` (top-left corner in the index frame), ``size``
    ``(roi_w, roi_h)`` (clamped to at least 1 cell when ``aligned=False``, as torchvision does),
    ``bin`` ``(bin_w, bin_h)`` and ``grid`` ``(gw, gh)`` (sampling points per bin; adaptive
    ``ceil(roi_h / oh)`` when ``sampling_ratio <= 0``, and 0 for an inverted box with
    ``aligned=True``, which torchvision samples nowhere).
    """
    x1, y1, x2, y2 = _box4(box)
    oh, ow = _pair(output_size)
    offset = 0.5 if aligned else 0.0
    xs, ys = x1 * spatial_scale - offset, y1 * spatial_scale - offset
    xe, ye = x2 * spatial_scale - offset, y2 * spatial_scale - offset
    roi_w, roi_h = xe - xs, ye - ys
    if not aligned:  # the original (Detectron / torchvision) behaviour: malformed boxes -> 1x1
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / ow, roi_h / oh
    if sampling_ratio > 0:
        gw = gh = int(sampling_ratio)
    else:  # adaptive: about one sample per cell; an inverted box (aligned=True) gets none
        gw, gh = max(math.ceil(roi_w / ow), 0), max(math.ceil(roi_h / oh), 0)
    return {"start": (xs, ys), "size": (roi_w, roi_h), "bin": (bin_w, bin_h), "grid": (gw, gh),
            "output_size": (oh, ow)}


def sampling_points(box, output_size, sampling_ratio: int = -1, aligned: bool = False,
                    spatial_scale: float = 1.0) -> torch.Tensor:
    """Sampling points of RoIAlign for one box, in the feature map's index frame.

    Args:
        box: ``(x1, y1, x2, y2)`` in image coordinates (4 floats or a ``[4]`` tensor).
        output_size: ``int`` or ``(oh, ow)``, the number of bins.
        sampling_ratio: points per bin side; ``<= 0`` means adaptive ``ceil(roi_size / bins)``.
        aligned: ``True`` subtracts half a cell (pixel centres at +0.5, the paper's figure 3).
        spatial_scale: feature-map cells per image pixel (``1 / stride``).

    Returns:
        ``[oh, ow, gh, gw, 2]`` float64 tensor of ``(x, y)``: point ``(iy, ix)`` of bin
        ``(ph, pw)`` sits at ``start + p * bin + (i + 0.5) * bin / g`` along each axis.
        A feature map ``f`` is read at ``(x, y)`` as ``f[y, x]`` (bilinear).

    >>> sampling_points((0, 0, 4, 4), 2, sampling_ratio=1)[..., 0, 0, :].tolist()
    [[[1.0, 1.0], [3.0, 1.0]], [[1.0, 3.0], [3.0, 3.0]]]
    """
    g = align_geometry(box, output_size, sampling_ratio, aligned, spatial_scale)
    oh, ow = g["output_size"]
    (xs, ys), (bin_w, bin_h), (gw, gh) = g["start"], g["bin"], g["grid"]
    # 1-D positions along each axis: (o, g) = bin index, sample index within the bin
    px = torch.arange(ow, dtype=torch.float64)[:, None] * bin_w
    py = torch.arange(oh, dtype=torch.float64)[:, None] * bin_h
    x = xs + px + (torch.arange(gw, dtype=torch.float64)[None, :] + 0.5) * bin_w / gw  # (ow, gw)
    y = ys + py + (torch.arange(gh, dtype=torch.float64)[None, :] + 0.5) * bin_h / gh  # (oh, gh)
    # broadcast to (oh, ow, gh, gw): x varies with (pw, ix), y with (ph, iy)
    xx = x[None, :, None, :].expand(oh, ow, gh, gw)
    yy = y[:, None, :, None].expand(oh, ow, gh, gw)
    return torch.stack([xx, yy], dim=-1)  # (oh, ow, gh, gw, 2)


def bilinear_neighbours(x: float, y: float, feature_hw) -> list[tuple[int, int, float]]:
    """The (up to) 4 cells bilinear interpolation reads at ``(x, y)``, with their weights.

    Follows torchvision's border rules: a point more than one cell outside the map reads 0
    (empty list); otherwise coordinates are clamped into ``[0, H-1] x [0, W-1]``.

    Returns:
        ``[(row, col, weight), ...]`` with weights ``hy*hx, hy*lx, ly*hx, ly*lx`` for the
        neighbours ``(y0, x0), (y0, x1), (y1, x0), (y1, x1)``; the weights sum to 1.
    """
    H, W = (int(v) for v in feature_hw)
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return []
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= H - 1:
        y0 = y1 = H - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= W - 1:
        x0 = x1 = W - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0  # distance to the low neighbour
    hy, hx = 1.0 - ly, 1.0 - lx
    return [(y0, x0, hy * hx), (y0, x1, hy * lx), (y1, x0, ly * hx), (y1, x1, ly * lx)]


def _round_half_away(v: float) -> int:
    """C's ``round`` (half away from zero), which torchvision's roi_pool uses; Python rounds to even."""
    return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def pool_bins(box, output_size, spatial_scale: float = 1.0, feature_hw=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The cells RoIPool takes the maximum over, per bin (the two quantizations of section 3).

    Quantization 1: the scaled box is rounded to whole cells ``round(x * spatial_scale)``, and
    spans ``end - start + 1`` cells. Quantization 2: bin ``p`` covers cells
    ``floor(p * bin) .. ceil((p + 1) * bin)`` (half-open) after the box start.

    The products and the bin size are computed in ``dtype`` (the feature map's float type), as
    torchvision's kernel does: in float32, ``7 * (29 / 7)`` is exactly 29 while in float64 it is
    ``29.000000000000004``, whose ceil would add a cell to the last bin.

    Returns:
        ``[oh, ow, 4]`` int64 tensor of ``(y0, y1, x0, x1)``, half-open cell ranges; clipped to
        the map when ``feature_hw = (H, W)`` is given (a bin may then be empty: ``y1 <= y0``).
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"pool_bins: dtype must be torch.float32 or torch.float64, got {dtype}")
    x1, y1, x2, y2 = _box4(box)
    oh, ow = _pair(output_size)

    def scaled(v: float) -> int:  # round(v * spatial_scale), the product in dtype
        return _round_half_away(float(torch.tensor(v, dtype=dtype)
                                      * torch.tensor(spatial_scale, dtype=dtype)))

    xs, ys, xe, ye = scaled(x1), scaled(y1), scaled(x2), scaled(y2)
    roi_w, roi_h = max(xe - xs + 1, 1), max(ye - ys + 1, 1)  # forced to at least 1 cell
    bin_w = torch.tensor(roi_w, dtype=dtype) / ow  # 0-d tensors: the arithmetic stays in dtype
    bin_h = torch.tensor(roi_h, dtype=dtype) / oh
    H, W = (int(v) for v in feature_hw) if feature_hw is not None else (None, None)
    out = torch.empty(oh, ow, 4, dtype=torch.int64)
    for ph in range(oh):
        a = math.floor(float(ph * bin_h)) + ys
        b = math.ceil(float((ph + 1) * bin_h)) + ys
        if H is not None:
            a, b = min(max(a, 0), H), min(max(b, 0), H)
        for pw in range(ow):
            c = math.floor(float(pw * bin_w)) + xs
            d = math.ceil(float((pw + 1) * bin_w)) + xs
            if W is not None:
                c, d = min(max(c, 0), W), min(max(d, 0), W)
            out[ph, pw] = torch.tensor([a, b, c, d])
    return out


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

_BIN_COLOURS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                "tab:cyan")


def _draw_grid(ax, H: int, W: int, values=None) -> None:
    """Cells as unit squares centred on the integer points where the feature values live."""
    if values is not None:
        v = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else values
        ax.imshow(v, cmap="Greys", extent=(-0.5, W - 0.5, H - 0.5, -0.5), alpha=0.5,
                  interpolation="nearest")
    for i in range(H + 1):
        ax.axhline(i - 0.5, color="0.75", lw=0.8, zorder=1)
    for j in range(W + 1):
        ax.axvline(j - 0.5, color="0.75", lw=0.8, zorder=1)
    jj, ii = torch.meshgrid(torch.arange(W), torch.arange(H), indexing="xy")
    ax.scatter(jj.reshape(-1).numpy(), ii.reshape(-1).numpy(), s=6, color="0.6", zorder=2,
               gid="cell_centres")
    ax.set_xlim(-1.0, W)
    ax.set_ylim(H, -1.0)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x (feature cells)")
    ax.set_ylabel("y (feature cells)")


def draw_roi_sampling(ax, feature_hw=(8, 8), box=(1.3, 1.2, 5.7, 6.4), output_size=2,
                      sampling_ratio: int = 2, aligned: bool = False, method: str = "align",
                      spatial_scale: float = 1.0, highlight=(0, 0, 0, 0), values=None):
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
        ``ax``. The sampling points are the scatter with ``gid="sampling_points"`` (their
        offsets are the ``(x, y)`` of :func:`sampling_points`, flattened in ``(ph, pw, iy, ix)``
        order); RoIPool's bins are the rectangles with ``gid="pool_bin"``.
    """
    if method not in ("align", "pool"):
        raise ValueError(f"draw_roi_sampling: method must be 'align' or 'pool', got {method!r}")
    H, W = (int(v) for v in feature_hw)
    oh, ow = _pair(output_size)
    x1, y1, x2, y2 = _box4(box)
    _draw_grid(ax, H, W, values)
    s = spatial_scale
    if method == "align":
        g = align_geometry(box, (oh, ow), sampling_ratio, aligned, s)
        (xs, ys), (rw, rh), (bw, bh) = g["start"], g["size"], g["bin"]
        ax.add_patch(Rectangle((xs, ys), rw, rh, fill=False, lw=2, ec="tab:blue", zorder=4,
                               gid="roi_box"))
        for p in range(1, ow):  # bin edges
            ax.plot([xs + p * bw] * 2, [ys, ys + rh], color="tab:blue", lw=1, ls="--", zorder=4)
        for p in range(1, oh):
            ax.plot([xs, xs + rw], [ys + p * bh] * 2, color="tab:blue", lw=1, ls="--", zorder=4)
        pts = sampling_points(box, (oh, ow), sampling_ratio, aligned, s)  # (oh, ow, gh, gw, 2)
        flat = pts.reshape(-1, 2)  # (oh*ow*gh*gw, 2) in (ph, pw, iy, ix) order
        ax.scatter(flat[:, 0].numpy(), flat[:, 1].numpy(), s=22, color="tab:red", zorder=6,
                   gid="sampling_points")
        gh, gw = pts.shape[2], pts.shape[3]
        if highlight is not None and gh > 0 and gw > 0:
            ph, pw, iy, ix = highlight
            ph, pw, iy, ix = min(ph, oh - 1), min(pw, ow - 1), min(iy, gh - 1), min(ix, gw - 1)
            x, y = (float(v) for v in pts[ph, pw, iy, ix])
            ax.scatter([x], [y], s=90, facecolor="none", edgecolor="black", lw=1.5, zorder=7)
            for row, col, w in bilinear_neighbours(x, y, (H, W)):
                ax.plot([x, col], [y, row], color="black", lw=0.8, zorder=5)
                ax.scatter([col], [row], s=40 + 200 * w, marker="s", color="gold",
                           edgecolor="black", zorder=5, gid="neighbours")
                ax.annotate(f"{w:.2f}", (col, row), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, zorder=8)
        ax.set_title(f"RoIAlign {oh}x{ow}, {gh}x{gw} points/bin\naligned={aligned}", fontsize=10)
    else:
        # the exact box (dashed), then the cells RoIPool really uses (quantized twice)
        ax.add_patch(Rectangle((x1 * s, y1 * s), (x2 - x1) * s, (y2 - y1) * s, fill=False,
                               lw=1.5, ls="--", ec="tab:blue", zorder=4, gid="roi_box"))
        bins = pool_bins(box, (oh, ow), s, (H, W))
        for ph in range(oh):
            for pw in range(ow):
                a, b, c, d = (int(v) for v in bins[ph, pw])
                colour = _BIN_COLOURS[(ph * ow + pw) % len(_BIN_COLOURS)]
                ax.add_patch(Rectangle((c - 0.5, a - 0.5), max(d - c, 0), max(b - a, 0),
                                       fill=True, alpha=0.3, fc=colour, ec=colour, lw=2,
                                       zorder=3, gid="pool_bin"))
        ax.set_title(f"RoIPool {oh}x{ow}\nbox and bins rounded to whole cells", fontsize=10)
    return ax


# ----------------------------------------------------------------------------------------------
# Explorer (the widget pattern shared by all explorers: controls + Output, redraw on change)
# ----------------------------------------------------------------------------------------------

def _figure_png(fig: Figure) -> dict:
    """A Jupyter ``display_data`` output holding ``fig`` as a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": png, "text/plain": "<RoI sampling figure>"}}


def roi_explorer(feature_hw=(8, 8), box=(1.3, 1.2, 5.7, 6.4), output_size: int = 2,
                 sampling_ratio: int = 2, aligned: bool = False, method: str = "align",
                 values=None) -> widgets.VBox:
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
        "w": widgets.FloatSlider(value=x2 - x1, min=0.0, max=float(W), step=0.1,
                                 description="w", continuous_update=False, readout_format=".1f"),
        "h": widgets.FloatSlider(value=y2 - y1, min=0.0, max=float(H), step=0.1,
                                 description="h", continuous_update=False, readout_format=".1f"),
        "output_size": widgets.IntSlider(value=int(output_size), min=1, max=7,
                                         description="output", continuous_update=False),
        "sampling_ratio": widgets.IntSlider(value=max(int(sampling_ratio), 0), min=0, max=4,
                                            description="samples", continuous_update=False,
                                            tooltip="0 = adaptive ceil(roi / bins)"),
        "aligned": widgets.Checkbox(value=bool(aligned), description="aligned"),
        "method": widgets.ToggleButtons(options=["align", "pool"], value=method,
                                        description="method"),
    }
    out = widgets.Output()

    def redraw(change=None) -> None:
        c = {k: w.value for k, w in controls.items()}
        fig = Figure(figsize=(5, 5))
        ax = fig.add_subplot()
        bx = (c["x1"], c["y1"], c["x1"] + c["w"], c["y1"] + c["h"])
        draw_roi_sampling(ax, (H, W), bx, c["output_size"], c["sampling_ratio"] or -1,
                          c["aligned"], c["method"], values=values)
        # clear and show the new image in one state update (no flicker, testable without kernel)
        out.outputs = (_figure_png(fig),)

    for w in controls.values():
        w.observe(redraw, names="value")
    rows = [widgets.HBox([controls["x1"], controls["y1"]]),
            widgets.HBox([controls["w"], controls["h"]]),
            widgets.HBox([controls["output_size"], controls["sampling_ratio"]]),
            widgets.HBox([controls["aligned"], controls["method"]])]
    explorer = widgets.VBox([*rows, out])
    explorer.controls, explorer.output, explorer.redraw = controls, out, redraw
    redraw()
    return explorer

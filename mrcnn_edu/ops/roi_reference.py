"""RoIAlign and RoIPool in readable, vectorized PyTorch (the ``"reference"`` backend).

Mask R-CNN (He et al. 2017), section 3 "RoIAlign" and figure 3: instead of rounding a RoI to the
feature grid (RoIPool, Fast R-CNN section 2.1), RoIAlign cuts the RoI into ``oh x ow`` bins,
places a regular grid of sample points in each bin, reads the feature map at each point by
bilinear interpolation, and averages the samples of a bin. Notebook
``02_roipool_vs_roialign.ipynb`` derives this file step by step:

    sample-point grid  ->  bilinear weights  ->  mean over the samples of each bin

Autograd gives the backward (the bilinear weights route each output gradient back to the four
pixels around every sample point). The box coordinates are treated as constants, as in the paper
and in torchvision: no gradient flows into ``rois``.

The arithmetic follows torchvision's kernels exactly (same order of operations in the input's
dtype), so the results agree to rounding:

* ``roi_start = x1 * spatial_scale - offset`` with ``offset = 0.5`` when ``aligned`` (the
  half-pixel shift) and ``0`` otherwise; when not aligned, RoI width and height are clamped to
  at least one pixel;
* bins of ``roi_size / output_size``; ``sampling_ratio <= 0`` means ``ceil(roi_size / output_size)``
  samples per bin and axis, chosen per RoI;
* a sample with ``y < -1`` or ``y > H`` (likewise ``x``) is "empty" and counts as zero; otherwise
  ``y <= 0`` is clamped to ``0`` and a sample past the last row reads the last row;
* each bin is divided by ``count = max(grid_h * grid_w, 1)``.

Shapes: ``input`` ``[N, C, H, W]``, ``rois`` ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in
the same float dtype as ``input``; outputs ``[K, C, oh, ow]``. The public entry points with input
checks and backend choice are :func:`mrcnn_edu.ops.roi_align` and :func:`mrcnn_edu.ops.roi_pool`.

The geometry is public, so that drawings and notebooks show exactly what the operators read
instead of re-deriving it: :func:`roi_align_sampling_points` (every RoI's bins and sample
points, which :func:`roi_align_reference` then reads), :func:`bilinear_axis` (the neighbours
and weights of a coordinate) and :func:`roi_pool_bins` (RoIPool's quantized bins, which
:func:`roi_pool_reference` max-pools). ``mrcnn_edu.viz.draw_roi_sampling`` draws them and
notebook ``02_roipool_vs_roialign.ipynb`` checks its own derivation against them.
"""

from __future__ import annotations

import torch

# Largest number of gathered feature values held at once (per bilinear corner); RoIs are processed
# in chunks below this so the reference stays usable on full-size feature maps.
_MAX_GATHER = 1 << 22

FLT_MAX = 3.4028234663852886e38  # torchvision starts every RoIPool bin at -FLT_MAX


# ---------------------------------------------------------------------------------------------
# RoIAlign
# ---------------------------------------------------------------------------------------------
def roi_align_geometry(
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> dict[str, torch.Tensor]:
    """Where each RoI starts, how big its bins are and how many samples each bin gets.

    Args:
        rois: ``[K, 5]`` float, rows ``(batch_index, x1, y1, x2, y2)`` in image pixels.
    Returns:
        dict of ``[K]`` tensors: ``start_h``, ``start_w`` (top-left corner), ``roi_h``, ``roi_w``
        (RoI size, at least 1 when not ``aligned``), ``bin_h``, ``bin_w`` (dtype of ``rois``, in
        feature-map pixels), ``grid_h``, ``grid_w`` (int64 samples per bin and axis, may be
        ``<= 0`` for degenerate aligned RoIs: such bins are empty) and ``count`` (dtype of
        ``rois``, ``max(grid_h * grid_w, 1)``).
    """
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    end_w = rois[:, 3] * spatial_scale - offset
    end_h = rois[:, 4] * spatial_scale - offset
    roi_w = end_w - start_w
    roi_h = end_h - start_h
    if not aligned:  # legacy behaviour: force malformed RoIs to be at least 1x1
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_h = roi_h / oh
    bin_w = roi_w / ow
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
    else:  # adaptive: about one sample per feature-map pixel
        grid_h = torch.ceil(roi_h / oh).to(torch.int64)
        grid_w = torch.ceil(roi_w / ow).to(torch.int64)
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)
    return {
        "start_h": start_h,
        "start_w": start_w,
        "roi_h": roi_h,
        "roi_w": roi_w,
        "bin_h": bin_h,
        "bin_w": bin_w,
        "grid_h": grid_h,
        "grid_w": grid_w,
        "count": count,
    }


def sample_coordinates(
    start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, num_bins: int, max_grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-point coordinates along one axis, for every RoI, bin and sample.

    The ``i``-th sample of bin ``p`` sits at ``start + p * bin + (i + 0.5) * bin / grid``: the
    centres of ``grid`` equal sub-cells of the bin.

    Args:
        start, bin_size: ``[K]`` float; grid: ``[K]`` int64 samples per bin.
        num_bins: bins along this axis (``oh`` or ``ow``).
        max_grid: the grid size every RoI is padded to.
    Returns:
        coords ``[K, num_bins, max_grid]`` float and ``in_grid`` ``[K, 1, max_grid]`` bool
        (False for the padding samples ``i >= grid`` of RoIs with a smaller grid).
    """
    dtype = start.dtype
    p = torch.arange(num_bins, dtype=dtype, device=start.device)  # bin index   (num_bins,)
    i = torch.arange(max_grid, dtype=dtype, device=start.device)  # sample index (max_grid,)
    g = grid.clamp(min=1).to(dtype)  # no 0-division in padding samples
    coords = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (i + 0.5)[None, None, :] * bin_size[:, None, None] / g[:, None, None]
    )
    in_grid = torch.arange(max_grid, device=start.device)[None, None, :] < grid[:, None, None]
    return coords, in_grid


def bilinear_axis(coords: torch.Tensor, size: int, keep: torch.Tensor):
    """The 1-D half of bilinear interpolation, with torchvision's border rules.

    Bilinear interpolation is separable: the weight of pixel ``(y_i, x_j)`` for sample ``(y, x)``
    is ``wy_i * wx_j``. This returns, for each coordinate, the two neighbouring pixel indices and
    their weights ``(1 - l, l)`` with ``l = coord - low``.

    Args:
        coords: float coordinates, any shape; size: ``H`` or ``W``; keep: bool, broadcastable to
            ``coords``, False where the sample must count as zero (padding samples).
    Returns:
        low, high (int64, in ``[0, size - 1]``), w_low, w_high (dtype of ``coords``; zero for
        "empty" samples ``coord < -1`` or ``coord > size`` and where ``keep`` is False).
    """
    empty = (coords < -1.0) | (coords > size) | ~keep
    c = torch.where(empty, torch.zeros_like(coords), coords).clamp(min=0.0)  # y <= 0 -> 0
    low = c.to(torch.int64)  # floor, since c >= 0
    at_edge = low >= size - 1  # past the last row/column:
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)  # read the last one
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    w_high = c - low.to(c.dtype)  # l
    w_low = 1.0 - w_high  # h = 1 - l
    zero = torch.zeros_like(w_low)
    return low, high, torch.where(empty, zero, w_low), torch.where(empty, zero, w_high)


def roi_align_sampling_points(
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> dict[str, torch.Tensor]:
    """Where RoIAlign reads the feature map: every RoI's sample points, in the map's index frame.

    The index frame puts the value ``f[i, j]`` at the point ``(x=j, y=i)``. The grid is
    separable: the ``x`` of a sample depends only on its bin column ``pw`` and sample ``ix``,
    its ``y`` only on ``(ph, iy)``; sample ``(iy, ix)`` of bin ``(ph, pw)`` of RoI ``k`` is the
    point ``(x[k, pw, ix], y[k, ph, iy])``. :func:`roi_align_reference` reads exactly these.

    Args:
        rois: ``[K, 5]`` float, rows ``(batch_index, x1, y1, x2, y2)`` in image pixels.
        output_size: ``(oh, ow)`` bins.
        spatial_scale, sampling_ratio, aligned: as in :func:`roi_align_reference`.
    Returns:
        the dict of :func:`roi_align_geometry` (``[K]`` tensors) plus ``y`` ``[K, oh, Gh]`` and
        ``x`` ``[K, ow, Gw]`` (dtype of ``rois``), and ``y_valid`` ``[K, 1, Gh]``, ``x_valid``
        ``[K, 1, Gw]`` (bool). ``Gh, Gw`` are the largest grid over the RoIs (at least 1); the
        samples ``iy >= grid_h[k]`` (``ix >= grid_w[k]``) of a RoI with a smaller grid are
        padding, marked False in ``*_valid``.
    """
    oh, ow = output_size
    K = rois.shape[0]
    geo = roi_align_geometry(rois, output_size, spatial_scale, sampling_ratio, aligned)
    gh = max(int(geo["grid_h"].max()), 1) if K else 1  # pad grids to the largest
    gw = max(int(geo["grid_w"].max()), 1) if K else 1
    y, y_valid = sample_coordinates(geo["start_h"], geo["bin_h"], geo["grid_h"], oh, gh)
    x, x_valid = sample_coordinates(geo["start_w"], geo["bin_w"], geo["grid_w"], ow, gw)
    return {**geo, "y": y, "x": x, "y_valid": y_valid, "x_valid": x_valid}


def _roi_align_chunk(
    feat: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign of a chunk of RoIs. feat ``[N, H, W, C]`` (channels last), rois ``[K, 5]``.

    Returns ``[K, oh, ow, C]``.
    """
    H, W = feat.shape[1:3]

    # 1. sample-point grid: y (K, oh, gh) and x (K, ow, gw)
    geo = roi_align_sampling_points(rois, output_size, spatial_scale, sampling_ratio, aligned)
    y, y_in, x, x_in = geo["y"], geo["y_valid"], geo["x"], geo["x_valid"]

    # 2. bilinear weights, one axis at a time
    y_lo, y_hi, wy_lo, wy_hi = bilinear_axis(y, H, y_in)  # each (K, oh, gh)
    x_lo, x_hi, wx_lo, wx_hi = bilinear_axis(x, W, x_in)  # each (K, ow, gw)

    # Broadcast to (K, oh, gh, ow, gw): y varies along dims 1-2, x along dims 3-4.
    n = rois[:, 0].to(torch.int64)[:, None, None, None, None]

    def Y(t):  # (K, oh, gh) -> (K, oh, gh, 1, 1)
        return t[:, :, :, None, None]

    def X(t):  # (K, ow, gw) -> (K, 1, 1, ow, gw)
        return t[:, None, None, :, :]

    def corner(yi, xi, weight):  # -> (K, oh, gh, ow, gw, C)
        return weight[..., None] * feat[n, yi, xi]  # feat[n, y, x] is a C-vector

    samples = (
        corner(Y(y_lo), X(x_lo), Y(wy_lo) * X(wx_lo))  # w1 = hy * hx
        + corner(Y(y_lo), X(x_hi), Y(wy_lo) * X(wx_hi))  # w2 = hy * lx
        + corner(Y(y_hi), X(x_lo), Y(wy_hi) * X(wx_lo))  # w3 = ly * hx
        + corner(Y(y_hi), X(x_hi), Y(wy_hi) * X(wx_hi))
    )  # w4 = ly * lx

    # 3. mean over the samples of each bin: (K, oh, gh, ow, gw, C) -> (K, oh, ow, C)
    return samples.sum(dim=(2, 4)) / geo["count"][:, None, None, None]


def roi_align_reference(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign in plain PyTorch (Mask R-CNN section 3); autograd provides the backward.

    Args:
        input: ``[N, C, H, W]`` float feature map.
        rois: ``[K, 5]`` same dtype/device, rows ``(batch_index, x1, y1, x2, y2)`` in image pixels.
        output_size: ``(oh, ow)`` bins.
        spatial_scale: feature-map pixels per image pixel (``1 / stride``).
        sampling_ratio: samples per bin and axis; ``<= 0`` picks ``ceil(roi_size / output_size)``.
        aligned: apply the half-pixel shift (pixel centres at ``+0.5``).
    Returns:
        ``[K, C, oh, ow]`` tensor of ``input``'s dtype. ``rois`` gets no gradient.
    """
    C = input.shape[1]
    oh, ow = output_size
    rois = rois.detach()
    # (N, C, H, W) -> (N, H, W, C), contiguous: feat[n, y, x] is then one contiguous C-vector
    feat = input.permute(0, 2, 3, 1).contiguous()
    geo = roi_align_geometry(rois, output_size, spatial_scale, sampling_ratio, aligned)
    per_roi = (
        C * oh * ow * max(int(geo["grid_h"].max()), 1) * max(int(geo["grid_w"].max()), 1)
        if rois.shape[0]
        else 1
    )
    chunk = max(1, _MAX_GATHER // per_roi)
    parts = [
        _roi_align_chunk(feat, r, output_size, spatial_scale, sampling_ratio, aligned)
        for r in (rois.split(chunk) if rois.shape[0] else [rois])
    ]
    out = torch.cat(parts) if len(parts) > 1 else parts[0]  # (K, oh, ow, C)
    return out.permute(0, 3, 1, 2).contiguous()  # -> (K, C, oh, ow)


# ---------------------------------------------------------------------------------------------
# RoIPool
# ---------------------------------------------------------------------------------------------
def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` rounds them to even)."""
    a = x.abs()
    r = a.floor()
    r = torch.where(a - r >= 0.5, r + 1, r)
    return torch.where(x < 0, -r, r)


def roi_pool_bins(
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    height: int | None,
    width: int | None,
):
    """Integer bin edges of RoIPool (Fast R-CNN section 2.1): quantize the RoI, then each bin.

    Quantization 1: the scaled RoI is rounded to whole cells (C's ``round``) and spans
    ``end - start + 1`` cells; quantization 2: bin ``p`` covers cells ``floor(p * bin)`` to
    ``ceil((p + 1) * bin)`` (half-open) after the RoI's start, the products in ``rois``' dtype.

    Returns ``hstart, hend`` ``[K, oh]`` and ``wstart, wend`` ``[K, ow]`` (int64, clipped to the
    map ``[0, height] x [0, width]``; a bin with ``end <= start`` is empty). ``height`` /
    ``width`` ``None``: not clipped (for drawing a RoI that runs off the map).
    """
    oh, ow = output_size
    dtype = rois.dtype
    x1, y1, x2, y2 = (
        round_half_away(rois[:, i] * spatial_scale).to(torch.int64) for i in range(1, 5)
    )
    roi_w = (x2 - x1 + 1).clamp(min=1)  # malformed RoIs -> 1x1
    roi_h = (y2 - y1 + 1).clamp(min=1)
    bin_h = roi_h.to(dtype) / oh  # (K,)
    bin_w = roi_w.to(dtype) / ow

    def edges(start, bin_size, num_bins, size):
        p = torch.arange(num_bins, dtype=dtype, device=rois.device)[None, :]
        lo = torch.floor(p * bin_size[:, None]).to(torch.int64) + start[:, None]
        hi = torch.ceil((p + 1) * bin_size[:, None]).to(torch.int64) + start[:, None]
        if size is None:
            return lo, hi
        return lo.clamp(0, size), hi.clamp(0, size)  # (K, num_bins) each

    hstart, hend = edges(y1, bin_h, oh, height)
    wstart, wend = edges(x1, bin_w, ow, width)
    return hstart, hend, wstart, wend


def roi_pool_reference(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
) -> torch.Tensor:
    """RoIPool in plain PyTorch: max over quantized bins; empty bins give 0.

    Args as :func:`roi_align_reference`. Returns ``[K, C, oh, ow]``; the gradient goes to the
    first maximal pixel of each bin (row-major order), as in torchvision.
    """
    C, H, W = input.shape[1:]
    oh, ow = output_size
    rois = rois.detach()
    K = rois.shape[0]
    feat = input.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    hstart, hend, wstart, wend = roi_pool_bins(rois, output_size, spatial_scale, H, W)
    # Pad every bin to the largest bin, and mask the padding.
    lh = max(int((hend - hstart).max()), 1) if K else 1
    lw = max(int((wend - wstart).max()), 1) if K else 1
    hs = hstart[:, :, None] + torch.arange(lh, device=rois.device)  # (K, oh, lh)
    ws = wstart[:, :, None] + torch.arange(lw, device=rois.device)  # (K, ow, lw)
    inside = (hs < hend[:, :, None])[:, :, :, None, None] & (ws < wend[:, :, None])[:, None, None]
    n = rois[:, 0].to(torch.int64)[:, None, None, None, None]
    vals = feat[
        n, hs.clamp(max=H - 1)[:, :, :, None, None], ws.clamp(max=W - 1)[:, None, None, :, :]
    ]  # (K, oh, lh, ow, lw, C)
    vals = vals.masked_fill(~inside[..., None], float("-inf"))
    # (K, oh, lh, ow, lw, C) -> (K, oh, ow, lh * lw, C): the window of each bin, row-major
    vals = vals.permute(0, 1, 3, 2, 4, 5).reshape(K, oh, ow, lh * lw, C)
    best = vals.max(dim=3).values  # (K, oh, ow, C)
    empty = ((hend <= hstart)[:, :, None] | (wend <= wstart)[:, None, :])[..., None]
    out = torch.where(empty, torch.zeros_like(best), best)
    return out.permute(0, 3, 1, 2).contiguous()  # -> (K, C, oh, ow)

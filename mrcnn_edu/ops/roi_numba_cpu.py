"""RoIAlign and RoIPool as Numba CPU kernels, forward and backward (the ``"numba"`` backend).

Mask R-CNN (He et al. 2017) section 3 (RoIAlign) and Fast R-CNN section 2.1 (RoIPool); notebook
``03_kernels_numba_cuda.ipynb`` walks through these kernels and times them. The arithmetic is
the one of ``roi_reference.py`` (torchvision's, done in the input's dtype: float32 or float64);
what changes is the loop structure, chosen for speed on a few CPU cores:

* Forward: the feature map is read **channels last**, ``[N, H, W, C]``: the ``C`` values of one
  pixel are contiguous, so the innermost loop over channels streams through memory and
  vectorises (SIMD), while the sample geometry (coordinates, bilinear weights) is computed once
  per sample and shared by all channels. ``prange`` runs over RoIs (each RoI writes only its own
  output: no races). torchvision's CPU kernel instead walks one ``H x W`` plane per channel, on
  one core.
* Backward: several RoIs may scatter into the same pixel, so ``prange`` runs over **channels**
  instead: each thread owns whole ``H x W`` planes of the gradient and walks every RoI, so no two
  threads ever write the same element, and the plane being written stays in cache. The sample
  geometry is computed once per RoI into small tables (``roi_align_tables``) that all channels
  share.

Index names: ``k`` RoI, ``n`` image, ``c`` channel, ``ph, pw`` output bin, ``iy, ix`` sample
within the bin, ``h, w`` feature-map pixel. Kernels never allocate: the Python wrappers at the end
make the channels-last copy, the outputs, the scratch buffers and the tables, and hand numpy
views of torch tensors to Numba.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from ._common import keep_torch_threads

FLT_MAX = np.float32(3.4028234663852886e38)  # torchvision starts RoIPool bins at -FLT_MAX


# ---------------------------------------------------------------------------------------------
# static_cast<T>: keep the arithmetic in the input's float type
# ---------------------------------------------------------------------------------------------
def cast_like(value, like):
    """``value`` converted to the float type of ``like`` (C++'s ``static_cast<T>(value)``).

    Numba promotes ``float32 * int64`` to float64; casting the integer indices first keeps every
    step in float32 for float32 inputs, as in torchvision's kernels, so sample positions agree
    bit for bit.
    """
    return type(like)(value)


@overload(cast_like)
def _cast_like_impl(value, like):
    if isinstance(like, types.Float) and like.bitwidth == 32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


# ---------------------------------------------------------------------------------------------
# Geometry shared by the RoIAlign kernels
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _align_geometry(rois, k, spatial_scale, oh, ow, sampling_ratio, aligned):
    """Start, bin size and sample grid of RoI ``k`` (see ``roi_reference.roi_align_geometry``).

    ``spatial_scale`` has the dtype of ``rois``. Returns
    ``(n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count)``.
    """
    one = cast_like(1.0, spatial_scale)
    offset = cast_like(0.5 if aligned else 0.0, spatial_scale)
    n = int(rois[k, 0])
    start_w = rois[k, 1] * spatial_scale - offset
    start_h = rois[k, 2] * spatial_scale - offset
    roi_w = (rois[k, 3] * spatial_scale - offset) - start_w
    roi_h = (rois[k, 4] * spatial_scale - offset) - start_h
    if not aligned:  # force malformed RoIs to be 1x1
        roi_w = max(roi_w, one)
        roi_h = max(roi_h, one)
    bin_h = roi_h / cast_like(oh, one)
    bin_w = roi_w / cast_like(ow, one)
    if sampling_ratio > 0:
        grid_h = sampling_ratio
        grid_w = sampling_ratio
    else:  # adaptive: ceil(roi_size / output_size) samples per bin and axis
        grid_h = math.ceil(roi_h / cast_like(oh, one))
        grid_w = math.ceil(roi_w / cast_like(ow, one))
    count = cast_like(max(grid_h * grid_w, 1), one)
    return n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count


@njit(cache=True)
def _sample_coordinate(start, p, i, bin_size, grid):
    """Coordinate of sample ``i`` of bin ``p``: ``start + p * bin + (i + 0.5) * bin / grid``."""
    return (
        start
        + cast_like(p, start) * bin_size
        + cast_like(i + 0.5, start) * bin_size / cast_like(grid, start)
    )


@njit(cache=True)
def _bilinear_axis(coord, size):
    """1-D bilinear neighbours of ``coord`` on an axis of ``size`` pixels (torchvision's rules).

    Returns ``(valid, low, high, w_low, w_high)``; ``valid`` is False for an "empty" sample
    (``coord < -1`` or ``coord > size``), which contributes nothing.
    """
    zero = cast_like(0.0, coord)
    if coord < -1.0 or coord > size:
        return False, 0, 0, zero, zero
    if coord <= 0:
        coord = zero
    low = int(coord)
    if low >= size - 1:  # past the last pixel: read the last one
        low = size - 1
        high = size - 1
        coord = cast_like(low, coord)
    else:
        high = low + 1
    frac = coord - cast_like(low, coord)  # distance past ``low``: the weight of ``high``
    return True, low, high, cast_like(1.0 - frac, coord), frac


# ---------------------------------------------------------------------------------------------
# RoIAlign kernels
# ---------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def roi_align_forward_kernel(feat, rois, spatial_scale, oh, ow, sampling_ratio, aligned, acc, out):
    """out[k, :, ph, pw] = mean over the bin's samples of bilinear(feat[n], y, x).

    feat ``[N, H, W, C]`` (channels last, contiguous), rois ``[K, 5]``, out ``[K, C, oh, ow]``
    (overwritten), all of one float dtype. ``acc`` ``[K, C]`` is scratch space allocated by the
    caller: ``acc[k]`` sums the samples of RoI ``k``'s current bin over contiguous channels.
    """
    H, W, C = feat.shape[1:]
    K = rois.shape[0]
    for k in prange(K):
        n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _align_geometry(
            rois, k, spatial_scale, oh, ow, sampling_ratio, aligned
        )
        for ph in range(oh):
            for pw in range(ow):
                for c in range(C):
                    acc[k, c] = 0
                for iy in range(grid_h):
                    y = _sample_coordinate(start_h, ph, iy, bin_h, grid_h)
                    vy, y_lo, y_hi, hy, ly = _bilinear_axis(y, H)
                    if not vy:
                        continue
                    for ix in range(grid_w):
                        x = _sample_coordinate(start_w, pw, ix, bin_w, grid_w)
                        vx, x_lo, x_hi, hx, lx = _bilinear_axis(x, W)
                        if not vx:
                            continue
                        w1 = hy * hx
                        w2 = hy * lx
                        w3 = ly * hx
                        w4 = ly * lx
                        for c in range(C):  # contiguous in memory: vectorised
                            acc[k, c] += (
                                w1 * feat[n, y_lo, x_lo, c]
                                + w2 * feat[n, y_lo, x_hi, c]
                                + w3 * feat[n, y_hi, x_lo, c]
                                + w4 * feat[n, y_hi, x_hi, c]
                            )
                for c in range(C):
                    out[k, c, ph, pw] = acc[k, c] / count


@njit(parallel=True, cache=True)
def roi_align_tables(
    rois,
    spatial_scale,
    oh,
    ow,
    sampling_ratio,
    aligned,
    H,
    W,
    y_index,
    y_weight,
    x_index,
    x_weight,
    grids,
    counts,
):
    """Sample geometry of every RoI, computed once and shared by all channels in the backward.

    Writes ``y_index`` / ``y_weight`` ``[K, oh, Gh, 2]`` (low and high row of sample ``iy`` of
    bin ``ph`` and their weights ``(1 - ly, ly)``; zero weights for "empty" samples), likewise
    ``x_*`` ``[K, ow, Gw, 2]``, ``grids`` ``[K, 2]`` = ``(grid_h, grid_w)`` (``Gh``, ``Gw`` are
    at least the largest grids) and ``counts`` ``[K]``.
    """
    K = rois.shape[0]
    for k in prange(K):
        _n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _align_geometry(
            rois, k, spatial_scale, oh, ow, sampling_ratio, aligned
        )
        grids[k, 0] = max(grid_h, 0)
        grids[k, 1] = max(grid_w, 0)
        counts[k] = count
        for ph in range(oh):
            for iy in range(grid_h):
                _valid, lo, hi, w_lo, w_hi = _bilinear_axis(
                    _sample_coordinate(start_h, ph, iy, bin_h, grid_h), H
                )
                y_index[k, ph, iy, 0] = lo
                y_index[k, ph, iy, 1] = hi
                y_weight[k, ph, iy, 0] = w_lo  # zero when not valid
                y_weight[k, ph, iy, 1] = w_hi
        for pw in range(ow):
            for ix in range(grid_w):
                _valid, lo, hi, w_lo, w_hi = _bilinear_axis(
                    _sample_coordinate(start_w, pw, ix, bin_w, grid_w), W
                )
                x_index[k, pw, ix, 0] = lo
                x_index[k, pw, ix, 1] = hi
                x_weight[k, pw, ix, 0] = w_lo
                x_weight[k, pw, ix, 1] = w_hi


@njit(cache=True)
def max_grids(rois, spatial_scale, oh, ow, sampling_ratio, aligned):
    """Largest ``(grid_h, grid_w)`` over the RoIs (sizes of the backward's tables)."""
    gh, gw = 1, 1
    for k in range(rois.shape[0]):
        geo = _align_geometry(rois, k, spatial_scale, oh, ow, sampling_ratio, aligned)
        gh = max(gh, geo[5])
        gw = max(gw, geo[6])
    return gh, gw


@njit(parallel=True, cache=True)
def roi_align_backward_kernel(
    grad_out, rois, y_index, y_weight, x_index, x_weight, grids, counts, grad_in
):
    """grad_in[n, c, h, w] += grad_out[k, c, ph, pw] * w / count over all samples (NCHW).

    grad_out ``[K, C, oh, ow]``, grad_in ``[N, C, H, W]`` (zeroed by the caller), tables from
    :func:`roi_align_tables`. Several RoIs may hit the same pixel, so threads split the
    **channels**: each owns whole ``H x W`` planes of ``grad_in`` (no write races, and a plane
    stays in cache while all RoIs scatter into it).
    """
    K, C, oh, ow = grad_out.shape
    for c in prange(C):
        for k in range(K):
            n = int(rois[k, 0])
            grid_h = grids[k, 0]
            grid_w = grids[k, 1]
            for ph in range(oh):
                for pw in range(ow):
                    g = grad_out[k, c, ph, pw] / counts[k]
                    for iy in range(grid_h):
                        y_lo = y_index[k, ph, iy, 0]
                        y_hi = y_index[k, ph, iy, 1]
                        gy_lo = g * y_weight[k, ph, iy, 0]
                        gy_hi = g * y_weight[k, ph, iy, 1]
                        for ix in range(grid_w):
                            x_lo = x_index[k, pw, ix, 0]
                            x_hi = x_index[k, pw, ix, 1]
                            hx = x_weight[k, pw, ix, 0]
                            lx = x_weight[k, pw, ix, 1]
                            grad_in[n, c, y_lo, x_lo] += gy_lo * hx
                            grad_in[n, c, y_lo, x_hi] += gy_lo * lx
                            grad_in[n, c, y_hi, x_lo] += gy_hi * hx
                            grad_in[n, c, y_hi, x_hi] += gy_hi * lx


# ---------------------------------------------------------------------------------------------
# RoIPool kernels
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def round_half_away(x):
    """C's ``round`` (halves away from zero), exact for any float."""
    a = abs(x)
    r = math.floor(a)
    if a - r >= 0.5:
        r += 1
    return -r if x < 0 else r


@njit(parallel=True, cache=True)
def roi_pool_forward_kernel(feat, rois, spatial_scale, oh, ow, out, argmax):
    """out[k, ph, pw, c] = max of feat[n, h, w, c] over the quantized bin; argmax = h * W + w.

    feat ``[N, H, W, C]``, out ``[K, oh, ow, C]`` float and argmax ``[K, oh, ow, C]`` int32 (both
    overwritten). Empty bins give 0 and argmax -1.
    """
    H, W, C = feat.shape[1:]
    K = rois.shape[0]
    for k in prange(K):
        n = int(rois[k, 0])
        start_w = int(round_half_away(rois[k, 1] * spatial_scale))
        start_h = int(round_half_away(rois[k, 2] * spatial_scale))
        end_w = int(round_half_away(rois[k, 3] * spatial_scale))
        end_h = int(round_half_away(rois[k, 4] * spatial_scale))
        roi_w = max(end_w - start_w + 1, 1)  # malformed RoIs -> 1x1
        roi_h = max(end_h - start_h + 1, 1)
        bin_h = cast_like(roi_h, spatial_scale) / cast_like(oh, spatial_scale)
        bin_w = cast_like(roi_w, spatial_scale) / cast_like(ow, spatial_scale)
        for ph in range(oh):
            h0 = math.floor(cast_like(ph, bin_h) * bin_h) + start_h
            h1 = math.ceil(cast_like(ph + 1, bin_h) * bin_h) + start_h
            h0 = min(max(h0, 0), H)
            h1 = min(max(h1, 0), H)
            for pw in range(ow):
                w0 = math.floor(cast_like(pw, bin_w) * bin_w) + start_w
                w1 = math.ceil(cast_like(pw + 1, bin_w) * bin_w) + start_w
                w0 = min(max(w0, 0), W)
                w1 = min(max(w1, 0), W)
                empty = h1 <= h0 or w1 <= w0
                start_val = cast_like(0.0, bin_h) if empty else cast_like(-FLT_MAX, bin_h)
                for c in range(C):
                    out[k, ph, pw, c] = start_val
                    argmax[k, ph, pw, c] = -1
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        for c in range(C):
                            v = feat[n, h, w, c]
                            if v > out[k, ph, pw, c]:  # strict: the first maximum wins
                                out[k, ph, pw, c] = v
                                argmax[k, ph, pw, c] = h * W + w


@njit(parallel=True, cache=True)
def roi_pool_backward_kernel(grad_out, rois, argmax, grad_in):
    """grad_in[n, c, h, w] += grad_out[k, c, ph, pw] at each bin's argmax ``h * W + w``.

    grad_out ``[K, C, oh, ow]``, argmax ``[K, oh, ow, C]`` (channels last, from the forward),
    grad_in ``[N, C, H, W]`` zeroed. Threads split the channels, so writes never collide.
    """
    K, C, oh, ow = grad_out.shape
    W = grad_in.shape[3]
    for c in prange(C):
        for k in range(K):
            n = int(rois[k, 0])
            for ph in range(oh):
                for pw in range(ow):
                    a = argmax[k, ph, pw, c]
                    if a >= 0:
                        grad_in[n, c, a // W, a % W] += grad_out[k, c, ph, pw]


# ---------------------------------------------------------------------------------------------
# torch wrappers (called by the autograd Functions in roi.py)
# ---------------------------------------------------------------------------------------------
def _scale(spatial_scale: float, dtype: torch.dtype):
    return np.float32(spatial_scale) if dtype == torch.float32 else np.float64(spatial_scale)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t`` (a contiguous copy only when ``t`` is not contiguous)."""
    return t.detach().contiguous().numpy()


def _channels_last(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W, C) contiguous numpy array (free when x is channels_last)."""
    return _np(x.permute(0, 2, 3, 1))


@keep_torch_threads
def roi_align_forward(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign forward: input ``[N, C, H, W]`` float32/64 on the CPU, rois ``[K, 5]``.

    Returns ``[K, C, oh, ow]`` (contiguous).
    """
    C = input.shape[1]
    oh, ow = output_size
    K = rois.shape[0]
    out = torch.empty((K, C, oh, ow), dtype=input.dtype)
    if K and C:
        acc = np.empty((K, C), dtype=out.numpy().dtype)
        roi_align_forward_kernel(
            _channels_last(input),
            _np(rois),
            _scale(spatial_scale, input.dtype),
            oh,
            ow,
            int(sampling_ratio),
            bool(aligned),
            acc,
            out.numpy(),
        )
    else:
        out.zero_()
    return out


@keep_torch_threads
def roi_align_backward(
    grad_output: torch.Tensor,
    rois: torch.Tensor,
    input_shape,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """RoIAlign backward: grad_output ``[K, C, oh, ow]`` -> grad_input ``[N, C, H, W]``."""
    C, H, W = input_shape[1:]
    K, _, oh, ow = grad_output.shape
    dtype = grad_output.dtype
    grad_input = torch.zeros(input_shape, dtype=dtype)
    if K == 0 or C == 0:
        return grad_input
    r = _np(rois)
    args = (_scale(spatial_scale, dtype), oh, ow, int(sampling_ratio), bool(aligned))
    gh, gw = max_grids(r, *args)
    y_index = np.zeros((K, oh, gh, 2), dtype=np.int32)
    y_weight = np.zeros((K, oh, gh, 2), dtype=r.dtype)
    x_index = np.zeros((K, ow, gw, 2), dtype=np.int32)
    x_weight = np.zeros((K, ow, gw, 2), dtype=r.dtype)
    grids = np.zeros((K, 2), dtype=np.int64)
    counts = np.zeros(K, dtype=r.dtype)
    roi_align_tables(r, *args, H, W, y_index, y_weight, x_index, x_weight, grids, counts)
    roi_align_backward_kernel(
        _np(grad_output), r, y_index, y_weight, x_index, x_weight, grids, counts, grad_input.numpy()
    )
    return grad_input


@keep_torch_threads
def roi_pool_forward(
    input: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoIPool forward -> (output ``[K, C, oh, ow]``, argmax ``[K, oh, ow, C]`` int32).

    ``argmax`` stays channels last (it only feeds :func:`roi_pool_backward`).
    """
    C = input.shape[1]
    oh, ow = output_size
    K = rois.shape[0]
    out = torch.zeros((K, oh, ow, C), dtype=input.dtype)
    argmax = torch.full((K, oh, ow, C), -1, dtype=torch.int32)
    if K and C:
        roi_pool_forward_kernel(
            _channels_last(input),
            _np(rois),
            _scale(spatial_scale, input.dtype),
            oh,
            ow,
            out.numpy(),
            argmax.numpy(),
        )
    return out.permute(0, 3, 1, 2).contiguous(), argmax  # (K, oh, ow, C) -> (K, C, oh, ow)


@keep_torch_threads
def roi_pool_backward(
    grad_output: torch.Tensor, rois: torch.Tensor, argmax: torch.Tensor, input_shape
) -> torch.Tensor:
    """RoIPool backward: grad_output ``[K, C, oh, ow]`` -> grad_input ``[N, C, H, W]``."""
    grad_input = torch.zeros(input_shape, dtype=grad_output.dtype)
    if grad_output.numel():
        roi_pool_backward_kernel(_np(grad_output), _np(rois), argmax.numpy(), grad_input.numpy())
    return grad_input

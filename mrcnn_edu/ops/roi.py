"""RoIAlign and RoIPool: the public operators, their input checks and backend dispatch.

Mask R-CNN (He et al. 2017) section 3, "RoIAlign", replaces the quantizing RoIPool of Fast R-CNN
(Girshick 2015, section 2.1) with bilinear sampling; notebook ``02_roipool_vs_roialign.ipynb``
explains both and notebook ``03_kernels_numba_cuda.ipynb`` the fast kernels. The signatures are
torchvision's (``torchvision.ops.roi_align`` / ``roi_pool``) plus a ``backend`` argument:

* ``"reference"``   ``roi_reference.py``: readable PyTorch, autograd does the backward;
* ``"numba"``       ``roi_numba_cpu.py``: parallel CPU kernels, forward and backward;
* ``"cuda"``        ``roi_numba_cuda.py``: ``numba.cuda`` kernels (GPU, or Numba's simulator);
* ``"torchvision"`` ``torchvision.ops``, for comparison;
* ``"auto"``        ``"cuda"`` for CUDA tensors, ``"numba"`` on the CPU.

All backends give the same numbers (to float rounding) and the same input gradient; none gives a
gradient to ``rois``. float16 and bfloat16 input is computed in float32 by every backend and
returned in its own dtype (what torchvision's autocast path does). The checks here are the one
validation layer for all backends.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torchvision
from torch.autograd.function import once_differentiable

from . import roi_numba_cpu, roi_reference
from ._common import check_finite, check_tensor, resolve_backend

__all__ = ["MAX_SAMPLES_PER_ROI", "boxes_to_rois", "roi_align", "roi_pool"]

#: Input dtypes computed in float32 and returned in their own dtype (as torchvision's autocast).
_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: Most RoIAlign sample points one RoI may ask for: a 2048 x 2048 grid, i.e. about a
#: 2048-pixel-wide RoI in feature-map pixels with adaptive sampling (a 1333 x 800 image at stride
#: 1 needs about 1e6). Beyond it, the reference would allocate (and the kernels loop over)
#: billions of samples: such a grid comes from a wrong spatial_scale, not from a real RoI.
MAX_SAMPLES_PER_ROI = 1 << 22


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------
def boxes_to_rois(boxes_list) -> torch.Tensor:
    """Per-image boxes -> one rois tensor with the image index in front.

    Args:
        boxes_list: list/tuple of ``[K_i, 4]`` float tensors ``(x1, y1, x2, y2)``, one per image,
            all of one dtype and device.
    Returns:
        ``[sum K_i, 5]`` tensor, rows ``(i, x1, y1, x2, y2)`` (empty float32 ``[0, 5]`` for an
        empty list).

    >>> boxes_to_rois([torch.tensor([[0., 0., 4., 4.]]), torch.tensor([[1., 1., 2., 3.]])])
    tensor([[0., 0., 0., 4., 4.],
            [1., 1., 1., 2., 3.]])
    """
    if not isinstance(boxes_list, (list, tuple)):
        raise TypeError(
            f"boxes_to_rois: expected a list of [K_i, 4] tensors, got {type(boxes_list).__name__}"
        )
    if len(boxes_list) == 0:
        return torch.zeros((0, 5))
    first = None
    for i, b in enumerate(boxes_list):
        check_tensor(b, f"boxes[{i}]", "boxes_to_rois", ndim=2, floating=True)
        if b.shape[1] != 4:
            raise ValueError(
                f"boxes_to_rois: boxes[{i}] must have shape [K, 4], got {tuple(b.shape)}"
            )
        if first is None:
            first = b
        elif b.dtype != first.dtype or b.device != first.device:
            raise TypeError(
                f"boxes_to_rois: boxes[{i}] is {b.dtype} on {b.device} but boxes[0] "
                f"is {first.dtype} on {first.device}"
            )
    index = torch.cat(
        [
            torch.full((b.shape[0], 1), i, dtype=b.dtype, device=b.device)
            for i, b in enumerate(boxes_list)
        ]
    )  # (K, 1)
    # (K, 1) + (K, 4) -> (K, 5)
    return torch.cat([index, torch.cat(list(boxes_list))], dim=1)


def _pair(output_size, op: str) -> tuple[int, int]:
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, (tuple, list))
        and len(output_size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in output_size)
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(
            f"{op}: output_size must be an int or a pair of ints (h, w), got {output_size!r}"
        )
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{op}: output_size must be positive, got {size}")
    return size


def _check_inputs(op: str, input, rois, output_size, spatial_scale):
    """Validate and normalise the arguments; returns ``(rois [K, 5], (oh, ow))``."""
    check_tensor(input, "input", op, floating=True)
    if input.dim() != 4:
        raise ValueError(
            f"{op}: input must be [N, C, H, W] (4 dimensions), got shape {tuple(input.shape)}"
        )
    N = input.shape[0]
    if isinstance(rois, (list, tuple)):
        rois = boxes_to_rois(rois) if len(rois) else input.new_zeros((0, 5))
    check_tensor(rois, "rois", op, floating=True)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"{op}: rois must be [K, 5] (batch_index, x1, y1, x2, y2) or a list of "
            f"[K_i, 4] boxes, got shape {tuple(rois.shape)}"
        )
    if rois.dtype != input.dtype and input.dtype not in _LOW_PRECISION:
        raise TypeError(f"{op}: rois dtype {rois.dtype} differs from input dtype {input.dtype}")
    if rois.device != input.device:
        raise ValueError(f"{op}: rois are on {rois.device} but input is on {input.device}")
    check_finite(rois, "rois", op)
    if rois.shape[0]:
        idx = rois[:, 0]
        bad = (idx < 0) | (idx >= N) | (idx != idx.floor())
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"{op}: rois[{row}, 0] = {float(idx[row])} is not a batch index in "
                f"[0, {N}) (input has N={N} images)"
            )
    if (
        not isinstance(spatial_scale, numbers.Real)
        or not spatial_scale > 0
        or spatial_scale == float("inf")
    ):
        raise ValueError(
            f"{op}: spatial_scale must be a positive finite number, got {spatial_scale!r}"
        )
    if rois.shape[0]:
        # the kernels compute x * spatial_scale in the compute dtype: it must stay finite
        limit = torch.finfo(_compute_dtype(input.dtype)).max
        biggest = float(rois[:, 1:].detach().abs().max()) * float(spatial_scale)
        if not biggest <= limit:
            row = int(rois[:, 1:].detach().abs().amax(dim=1).argmax())
            raise ValueError(
                f"{op}: rois[{row}] = {rois[row].tolist()} times spatial_scale="
                f"{spatial_scale!r} overflows {_compute_dtype(input.dtype)}; "
                "check spatial_scale (feature-map pixels per image pixel, e.g. "
                "1/4) and the boxes"
            )
    return rois, _pair(output_size, op)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 are computed in float32 (torchvision's autocast path does the same)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _check_aligned(op: str, aligned) -> bool:
    # a string such as "no" would otherwise be truthy and silently mean True
    if not isinstance(aligned, (bool, np.bool_)):
        raise TypeError(
            f"{op}: aligned must be a bool (True: half-pixel shift), got "
            f"{aligned!r} of type {type(aligned).__name__}"
        )
    return bool(aligned)


def _check_sampling_grid(
    op: str,
    rois: torch.Tensor,
    size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> None:
    """Refuse a sampling grid of more than :data:`MAX_SAMPLES_PER_ROI` points for one RoI.

    With ``sampling_ratio <= 0`` a bin gets ``ceil(roi_size / output_size)`` samples per axis,
    about one per feature-map pixel, so a huge ``spatial_scale`` (or box) asks for a grid that
    no backend can hold (the reference materialises it) or finish (the kernels loop over it).
    Computed in float64 from the same formula as the kernels (``roi_reference``).
    """
    if rois.shape[0] == 0:
        return
    oh, ow = size
    r = rois.detach().to(torch.float64)
    roi_w = (r[:, 3] - r[:, 1]) * spatial_scale  # (K,)
    roi_h = (r[:, 4] - r[:, 2]) * spatial_scale
    if not aligned:  # the kernels clamp legacy RoIs to at least 1 x 1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(roi_w, float(sampling_ratio))
    else:
        grid_h = torch.ceil(roi_h / oh).clamp(min=1.0)
        grid_w = torch.ceil(roi_w / ow).clamp(min=1.0)
    points = (oh * grid_h) * (ow * grid_w)  # (K,) samples per RoI
    row = int(points.argmax())
    if float(points[row]) > MAX_SAMPLES_PER_ROI:
        how = (
            f"sampling_ratio={sampling_ratio}"
            if sampling_ratio > 0
            else f"sampling_ratio={sampling_ratio} (adaptive: ceil(roi_size / output_size))"
        )
        raise ValueError(
            f"{op}: rois[{row}] = {rois[row].tolist()} at spatial_scale={spatial_scale!r} spans "
            f"{float(roi_h[row]):.4g} x {float(roi_w[row]):.4g} (height x width) feature-map "
            f"pixels, so {how} asks for {float(grid_h[row]):.4g} x {float(grid_w[row]):.4g} "
            f"samples per bin, {float(points[row]):.4g} per RoI; at most {MAX_SAMPLES_PER_ROI} "
            "are allowed. "
            "Check spatial_scale (feature-map pixels per image pixel, e.g. 1/4) and the boxes, "
            "or pass a small positive sampling_ratio"
        )


def _kernel_dtype_check(op: str, backend: str, input: torch.Tensor) -> None:
    if input.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{op}: backend={backend!r} supports float32 and float64 input, got {input.dtype}"
        )


def _cuda_kernels():
    from . import roi_numba_cuda  # imported lazily: numba.cuda is slow to import

    return roi_numba_cuda


# ---------------------------------------------------------------------------------------------
# autograd Functions around the Numba kernels (CPU and CUDA share them: `kernels` is the module)
# ---------------------------------------------------------------------------------------------
class _RoIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned, kernels):
        ctx.save_for_backward(rois)
        ctx.conf = (tuple(input.shape), spatial_scale, sampling_ratio, aligned, kernels)
        return kernels.roi_align_forward(
            input, rois, output_size, spatial_scale, sampling_ratio, aligned
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        input_shape, spatial_scale, sampling_ratio, aligned, kernels = ctx.conf
        grad_input = kernels.roi_align_backward(
            grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned
        )
        return grad_input, None, None, None, None, None, None


class _RoIPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, kernels):
        output, argmax = kernels.roi_pool_forward(input, rois, output_size, spatial_scale)
        ctx.save_for_backward(rois, argmax)
        ctx.conf = (tuple(input.shape), kernels)
        ctx.mark_non_differentiable(argmax)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, argmax = ctx.saved_tensors
        input_shape, kernels = ctx.conf
        grad_input = kernels.roi_pool_backward(grad_output, rois, argmax, input_shape)
        return grad_input, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Public operators
# ---------------------------------------------------------------------------------------------
def roi_align(
    input: torch.Tensor,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """RoIAlign (Mask R-CNN section 3): average of bilinear samples in each of ``oh x ow`` bins.

    Args:
        input: ``[N, C, H, W]`` float feature map: float32 or float64, or float16 / bfloat16,
            which every backend computes in float32 and returns in the input's dtype (as
            torchvision's autocast path does, so mixed precision training works).
        rois: ``[K, 5]`` tensor, rows ``(batch_index, x1, y1, x2, y2)`` in image pixels, same dtype
            and device as ``input`` (any float dtype for float16 / bfloat16 input); or a list of
            ``N`` tensors ``[K_i, 4]`` (see :func:`boxes_to_rois`).
        output_size: ``int`` or ``(oh, ow)``.
        spatial_scale: feature-map pixels per image pixel, e.g. ``1/4`` for a stride-4 map.
        sampling_ratio: samples per bin and axis; ``<= 0``: ``ceil(roi_size / output_size)``.
            A RoI may ask for at most :data:`MAX_SAMPLES_PER_ROI` sample points in all.
        aligned: ``True`` shifts by half a pixel (pixel centres at ``+0.5``, the paper's
            figure 3 / detectron2); ``False`` is the original Detectron/torchvision behaviour.
            Must be a bool (a string such as ``"no"`` is a TypeError, not True).
        backend: ``"auto"`` | ``"reference"`` | ``"numba"`` | ``"cuda"`` | ``"torchvision"``.
    Returns:
        ``[K, C, oh, ow]`` tensor of ``input``'s dtype, differentiable w.r.t. ``input``.
    Raises:
        TypeError / ValueError naming the bad argument (shape, dtype, device, batch index, NaN,
        a sampling grid above :data:`MAX_SAMPLES_PER_ROI`, coordinates that overflow once scaled).
    """
    op = "roi_align"
    rois, size = _check_inputs(op, input, rois, output_size, spatial_scale)
    if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
        raise TypeError(f"{op}: sampling_ratio must be an int, got {sampling_ratio!r}")
    aligned = _check_aligned(op, aligned)
    backend = resolve_backend(backend, input.device, op)
    spatial_scale, sampling_ratio = float(spatial_scale), int(sampling_ratio)
    _check_sampling_grid(op, rois, size, spatial_scale, sampling_ratio, aligned)
    if input.dtype in _LOW_PRECISION:  # float32 inside, the input's dtype out (autocast's way)
        return roi_align(
            input.float(), rois.float(), size, spatial_scale, sampling_ratio, aligned, backend
        ).to(input.dtype)
    if backend == "torchvision":
        return torchvision.ops.roi_align(input, rois, size, spatial_scale, sampling_ratio, aligned)
    if backend == "reference":
        return roi_reference.roi_align_reference(
            input, rois, size, spatial_scale, sampling_ratio, aligned
        )
    _kernel_dtype_check(op, backend, input)
    kernels = roi_numba_cpu if backend == "numba" else _cuda_kernels()
    return _RoIAlignFunction.apply(
        input, rois.detach(), size, spatial_scale, sampling_ratio, aligned, kernels
    )


def roi_pool(
    input: torch.Tensor, rois, output_size, spatial_scale: float = 1.0, backend: str = "auto"
) -> torch.Tensor:
    """RoIPool (Fast R-CNN section 2.1): max over quantized bins of the rounded RoI.

    Box coordinates are scaled and rounded (halves away from zero); bin ``p`` covers rows
    ``floor(p * bin_h) .. ceil((p + 1) * bin_h)`` of the RoI, clipped to the map; empty bins give 0.
    The backward sends each bin's gradient to its (first) maximal pixel.

    Args / Returns: as :func:`roi_align` (no ``sampling_ratio`` / ``aligned``); output
    ``[K, C, oh, ow]``.
    """
    op = "roi_pool"
    rois, size = _check_inputs(op, input, rois, output_size, spatial_scale)
    backend = resolve_backend(backend, input.device, op)
    spatial_scale = float(spatial_scale)
    if input.dtype in _LOW_PRECISION:  # float32 inside, the input's dtype out (autocast's way)
        return roi_pool(input.float(), rois.float(), size, spatial_scale, backend).to(input.dtype)
    if backend == "torchvision":
        return torchvision.ops.roi_pool(input, rois, size, spatial_scale)
    if backend == "reference":
        return roi_reference.roi_pool_reference(input, rois, size, spatial_scale)
    _kernel_dtype_check(op, backend, input)
    kernels = roi_numba_cpu if backend == "numba" else _cuda_kernels()
    return _RoIPoolFunction.apply(input, rois.detach(), size, spatial_scale, kernels)

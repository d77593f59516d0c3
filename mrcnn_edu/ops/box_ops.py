"""Box IoU, NMS and per-class (batched) NMS: input checks and backend dispatch.

Greedy non-maximum suppression prunes the RPN's proposals (Faster R-CNN section 3.1.2, IoU 0.7)
and the final detections of each class (Mask R-CNN section 3.1, "Inference"). Notebook
``04_anchors_and_rpn.ipynb`` builds NMS step by step; ``03_kernels_numba_cuda.ipynb`` shows the
kernels. Backends (see ``_common.BACKENDS``):

* ``"reference"``   ``box_reference.py``, readable PyTorch (the greedy loop);
* ``"numba"``       ``box_numba_cpu.py``, ``@njit`` kernels (CPU tensors);
* ``"cuda"``        ``box_numba_cuda.py``, numba.cuda bitmask NMS (CUDA tensors, or CPU tensors
                    on Numba's CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1``);
* ``"torchvision"`` ``torchvision.ops``;
* ``"auto"``        ``"cuda"`` for CUDA tensors, ``"numba"`` otherwise.

The backend modules are imported on first use: importing ``mrcnn_edu.ops`` stays cheap, and
``numba.cuda`` is not loaded before ``NUMBA_ENABLE_CUDASIM`` has been decided.

Every backend returns the same result as ``torchvision.ops``: same kept boxes in the same order
(decreasing score, equal scores by increasing index), IoU computed in the boxes' dtype and
compared as ``iou > iou_threshold`` in float64.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ._common import check_finite, check_tensor, resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------- input checks


def _check_boxes(boxes, name: str, op: str, index_shape=None) -> None:
    """``boxes`` must be a finite float32/float64 ``[N, 4]`` tensor with x1 <= x2 and y1 <= y2.

    ``index_shape``: the ``(..., N)`` shape ``boxes`` was flattened from, so a bad row of a
    batched input is named by its index tuple.
    """
    check_tensor(boxes, name, op, ndim=2)
    if boxes.shape[1] != 4:
        raise ValueError(
            f"{op}: {name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    if boxes.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {boxes.dtype}")
    if boxes.shape[0] == 0:
        return
    if boxes.device.type == "cpu":  # one compiled pass (the torch ops below cost ~50 us)
        from .box_numba_cpu import first_invalid_box

        row, kind = first_invalid_box(boxes.detach().numpy())
    else:
        bad = ~torch.isfinite(boxes).all(dim=1)  # [N] bool
        kind = 1 if bool(bad.any()) else 2
        if kind == 2:
            bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])  # [N] bool
        row = int(bad.nonzero()[0]) if bool(bad.any()) else -1
    where = row
    if row >= 0 and index_shape is not None and len(index_shape) > 1:
        where = tuple(int(i) for i in np.unravel_index(row, index_shape))
    if kind == 1 and row >= 0:
        raise ValueError(f"{op}: {name} contains NaN or infinite values (first at row {where})")
    if row >= 0:
        raise ValueError(
            f"{op}: {name} row {where} is not a valid (x1, y1, x2, y2) box, "
            f"x2 < x1 or y2 < y1: {boxes[row].tolist()}"
        )


def _check_scores(scores, boxes: torch.Tensor, op: str) -> None:
    """``scores`` must be a finite ``[N]`` tensor of the boxes' dtype and device."""
    check_tensor(scores, "scores", op, ndim=1, floating=True)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"{op}: scores has {scores.shape[0]} entries but boxes has {boxes.shape[0]} rows"
        )
    if scores.device != boxes.device:
        raise ValueError(f"{op}: scores is on {scores.device} but boxes is on {boxes.device}")
    if scores.dtype != boxes.dtype:
        raise TypeError(f"{op}: scores dtype {scores.dtype} differs from boxes dtype {boxes.dtype}")
    if scores.device.type == "cpu" and scores.shape[0]:
        from .box_numba_cpu import first_non_finite

        row = first_non_finite(scores.detach().numpy())
        if row >= 0:
            raise ValueError(f"{op}: scores contains NaN or infinite values (first at row {row})")
    else:
        check_finite(scores, "scores", op)


def _check_threshold(iou_threshold, op: str) -> float:
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise TypeError(
            f"{op}: iou_threshold must be a real number, got {type(iou_threshold).__name__}"
        )
    iou_threshold = float(iou_threshold)
    if not math.isfinite(iou_threshold):
        raise ValueError(f"{op}: iou_threshold must be finite, got {iou_threshold}")
    return iou_threshold


# ----------------------------------------------------------------------------- public ops


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Pairwise intersection over union, for the inputs ``torchvision.ops.box_iou`` takes.

    Args:
        boxes1: ``[N, 4]`` (x1, y1, x2, y2) in pixels, or batched ``[..., N, 4]``.
        boxes2: ``[M, 4]`` or ``[..., M, 4]``, same dtype and device as ``boxes1``; the leading
            (batch) dimensions of the two broadcast against each other, as in torchvision.
        backend: one of ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"``, ``"torchvision"``.

    Returns:
        ``[N, M]`` (or ``[..., N, M]``) IoU on the boxes' device (``nan`` for two zero-area
        boxes, as torchvision). dtype and arithmetic, as torchvision's:

        * float32 / float64 boxes: computed in their dtype, bit for bit torchvision's numbers;
        * float16 / bfloat16 boxes: computed in float32, float32 result;
        * integer boxes: exact integer areas (computed in float64), result in torch's default
          float dtype (float32), the dtype torchvision's integer division gives.

        Boxes so large that their areas would overflow the compute dtype (e.g. coordinates of
        1e20 in float32, where torchvision returns ``nan`` for two equal boxes) are first scaled
        by a power of two: exact, IoU is scale-invariant, so equal boxes give 1.
    """
    op = "box_iou"
    _check_iou_input(boxes1, "boxes1", op)
    _check_iou_input(boxes2, "boxes2", op)
    if boxes2.device != boxes1.device:
        raise ValueError(f"{op}: boxes2 is on {boxes2.device} but boxes1 is on {boxes1.device}")
    if boxes2.dtype != boxes1.dtype:
        raise TypeError(
            f"{op}: boxes2 dtype {boxes2.dtype} differs from boxes1 dtype {boxes1.dtype}"
        )
    try:
        batch = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{op}: the batch dimensions of boxes1 {tuple(boxes1.shape)} and boxes2 "
            f"{tuple(boxes2.shape)} do not broadcast"
        ) from None
    backend = resolve_backend(backend, boxes1.device, op)
    # compute dtype and result dtype (torchvision: _upcast, then inter / union)
    if boxes1.dtype in _FLOAT_DTYPES:
        compute, result = boxes1.dtype, boxes1.dtype
    elif boxes1.is_floating_point():  # float16, bfloat16
        compute, result = torch.float32, torch.float32
    else:  # integers: exact in float64 up to 2^26 pixels
        compute, result = torch.float64, torch.get_default_dtype()
    b1, b2 = boxes1.detach().to(compute), boxes2.detach().to(compute)
    N, M = b1.shape[-2], b2.shape[-2]
    # (..., N, 4) -> (B, N, 4) after broadcasting the batch dimensions
    B = math.prod(batch)
    b1 = b1.expand(*batch, N, 4).reshape(B, N, 4)
    b2 = b2.expand(*batch, M, 4).reshape(B, M, 4)
    _check_boxes(b1.reshape(-1, 4), "boxes1", op, index_shape=(*batch, N))
    _check_boxes(b2.reshape(-1, 4), "boxes2", op, index_shape=(*batch, M))
    scale = _overflow_safe_scale(b1, b2)
    if scale != 1.0:  # a power of two: exact, and IoU does not change under scaling
        b1, b2 = b1 * scale, b2 * scale
    iou_fn = _box_iou_backend(backend)
    if B == 1:
        out = iou_fn(b1[0], b2[0])[None]  # (1, N, M)
    elif B == 0:
        out = b1.new_zeros((0, N, M))
    else:
        out = torch.stack([iou_fn(x, y) for x, y in zip(b1, b2)])  # (B, N, M)
    return out.reshape(*batch, N, M).to(result)  # (..., N, M)


def _check_iou_input(boxes, name: str, op: str) -> None:
    """A tensor of at least 2 dimensions ``[..., N, 4]``, of a real dtype (not bool/complex)."""
    check_tensor(boxes, name, op)
    if boxes.dim() < 2 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{op}: {name} must have shape [N, 4] or [..., N, 4] "
            f"(x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{op}: {name} must hold real numbers, got dtype {boxes.dtype}")


def _overflow_safe_scale(b1: torch.Tensor, b2: torch.Tensor) -> float:
    """1, or the power of two that brings every coordinate below ``sqrt(max / 16)``.

    With ``|coordinate| <= T``, a side is at most ``2T``, an area ``4T^2`` and ``area1 + area2``
    ``8T^2 <= max / 2``: nothing overflows. Multiplying by a power of two is exact (short of
    underflow far below any pixel), so ordinary boxes are never scaled and keep torchvision's
    exact numbers.
    """
    biggest = max((float(b.abs().max()) for b in (b1, b2) if b.numel()), default=0.0)
    limit = math.sqrt(torch.finfo(b1.dtype).max / 16)
    if biggest <= limit:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(biggest / limit))


def _box_iou_backend(backend: str):
    """The ``[N, 4] x [M, 4] -> [N, M]`` function of a resolved backend (checked inputs)."""
    if backend == "reference":
        from .box_reference import box_iou_reference

        return box_iou_reference
    if backend == "numba":
        from .box_numba_cpu import box_iou_numba

        return box_iou_numba
    if backend == "cuda":
        from .box_numba_cuda import box_iou_cuda

        return box_iou_cuda
    import torchvision

    return torchvision.ops.box_iou


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, backend: str = "auto"
) -> torch.Tensor:
    """Greedy non-maximum suppression.

    Visits the boxes by decreasing score (equal scores: lower index first), keeps a box unless
    an already kept box overlaps it with ``IoU > iou_threshold``.

    Args:
        boxes: ``[N, 4]`` float32/float64 (x1, y1, x2, y2) in pixels.
        scores: ``[N]``, same dtype and device as ``boxes``.
        iou_threshold: boxes overlapping a kept box by more than this are dropped.
        backend: one of ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"``, ``"torchvision"``.

    Returns:
        int64 ``[K]`` indices into ``boxes`` of the kept boxes, by decreasing score, on the
        boxes' device.
    """
    op = "nms"
    _check_boxes(boxes, "boxes", op)
    _check_scores(scores, boxes, op)
    iou_threshold = _check_threshold(iou_threshold, op)
    return _nms_dispatch(boxes, scores, iou_threshold, resolve_backend(backend, boxes.device, op))


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float,
    backend: str = "auto",
) -> torch.Tensor:
    """NMS done independently per category: boxes of different ``idxs`` never suppress each other.

    Does what ``torchvision.ops.batched_nms`` does, so the result is the same, bit for bit.
    Small inputs (at most 4000 coordinates on the CPU, 20000 on a GPU) use the coordinate-offset
    trick: every box is shifted by ``idxs * (boxes.max() + 1)``, which moves each category
    into its own region where it cannot overlap another, and one NMS runs over all boxes.
    Larger ones run one NMS per category, which costs the sum of the categories' squared sizes
    instead of the square of the total.
    (Like torchvision, this assumes ``boxes.max() + 1 > 0``, i.e. not all coordinates below -1.)

    Args:
        boxes: ``[N, 4]`` float32/float64 (x1, y1, x2, y2).
        scores: ``[N]``, same dtype and device.
        idxs: ``[N]`` integer category (or image) index of each box, same device.
        iou_threshold: as in :func:`nms`.
        backend: as in :func:`nms`.

    Returns:
        int64 ``[K]`` indices of the kept boxes, by decreasing score.
    """
    op = "batched_nms"
    _check_boxes(boxes, "boxes", op)
    _check_scores(scores, boxes, op)
    check_tensor(idxs, "idxs", op, ndim=1)
    if idxs.dtype not in _INT_DTYPES:
        raise TypeError(f"{op}: idxs must be an integer tensor, got dtype {idxs.dtype}")
    if idxs.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"{op}: idxs has {idxs.shape[0]} entries but boxes has {boxes.shape[0]} rows"
        )
    if idxs.device != boxes.device:
        raise ValueError(f"{op}: idxs is on {idxs.device} but boxes is on {boxes.device}")
    iou_threshold = _check_threshold(iou_threshold, op)
    backend = resolve_backend(backend, boxes.device, op)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if boxes.numel() > (4000 if boxes.device.type == "cpu" else 20000):
        # Above this size torchvision runs NMS per category (_batched_nms_vanilla), on the
        # boxes as they are, then sorts the kept indices, taken in index order, by score; so
        # do we, with the same calls, so that even boxes of equal score come out in the same
        # order. Cost: the sum of n_c^2 over the categories instead of N^2 for one NMS over
        # all the shifted boxes (a box head's 1000 RoIs x 90 COCO classes at a low score
        # threshold: 3.5 s -> 0.09 s per image on a 2-core CPU, ``benchmarks/RESULTS.md``).
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for category in torch.unique(idxs):
            where = torch.where(idxs == category)[0]
            kept = _nms_dispatch(boxes[where], scores[where], iou_threshold, backend)
            keep_mask[where[kept]] = True
        keep = torch.where(keep_mask)[0]
        return keep[scores[keep].sort(descending=True)[1]]
    # Same arithmetic as torchvision's _batched_nms_coordinate_trick, so the shifted boxes
    # (and hence the IoUs) are bit for bit the ones torchvision's NMS sees.
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))  # [N]
    boxes_for_nms = boxes + offsets[:, None]  # [N, 4]
    return _nms_dispatch(boxes_for_nms, scores, iou_threshold, backend)


def _nms_dispatch(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, backend: str
) -> torch.Tensor:
    """Run NMS on checked inputs with a resolved backend."""
    if backend == "reference":
        from .box_reference import nms_reference

        return nms_reference(boxes, scores, iou_threshold)
    if backend == "numba":
        from .box_numba_cpu import nms_numba

        return nms_numba(boxes, scores, iou_threshold)
    if backend == "cuda":
        from .box_numba_cuda import nms_cuda

        return nms_cuda(boxes, scores, iou_threshold)
    import torchvision

    return torchvision.ops.nms(boxes, scores, iou_threshold)

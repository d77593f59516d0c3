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

import torch

from ._common import check_finite, check_tensor, resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ----------------------------------------------------------------------------- input checks


def _check_boxes(boxes, name: str, op: str) -> None:
    """``boxes`` must be a finite float32/float64 ``[N, 4]`` tensor with x1 <= x2 and y1 <= y2."""
    check_tensor(boxes, name, op, ndim=2)
    if boxes.shape[1] != 4:
        raise ValueError(f"{op}: {name} must have shape [N, 4] (x1, y1, x2, y2), "
                         f"got {tuple(boxes.shape)}")
    if boxes.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {boxes.dtype}")
    if boxes.shape[0] == 0:
        return
    if boxes.device.type == "cpu":  # one compiled pass (the torch ops below cost ~50 us)
        from .box_numba_cpu import first_invalid_box
        row, kind = first_invalid_box(boxes.detach().numpy())
        if kind == 1:
            raise ValueError(f"{op}: {name} contains NaN or infinite values (first at row {row})")
    else:
        check_finite(boxes, name, op)
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])  # [N] bool
        row = int(bad.nonzero()[0]) if bool(bad.any()) else -1
    if row >= 0:
        raise ValueError(f"{op}: {name} row {row} is not a valid (x1, y1, x2, y2) box, "
                         f"x2 < x1 or y2 < y1: {boxes[row].tolist()}")


def _check_scores(scores, boxes: torch.Tensor, op: str) -> None:
    """``scores`` must be a finite ``[N]`` tensor of the boxes' dtype and device."""
    check_tensor(scores, "scores", op, ndim=1, floating=True)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{op}: scores has {scores.shape[0]} entries but boxes has "
                         f"{boxes.shape[0]} rows")
    if scores.device != boxes.device:
        raise ValueError(f"{op}: scores is on {scores.device} but boxes is on {boxes.device}")
    if scores.dtype != boxes.dtype:
        raise TypeError(f"{op}: scores dtype {scores.dtype} differs from boxes dtype "
                        f"{boxes.dtype}")
    if scores.device.type == "cpu" and scores.shape[0]:
        from .box_numba_cpu import first_non_finite
        row = first_non_finite(scores.detach().numpy())
        if row >= 0:
            raise ValueError(f"{op}: scores contains NaN or infinite values (first at row {row})")
    else:
        check_finite(scores, "scores", op)


def _check_threshold(iou_threshold, op: str) -> float:
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise TypeError(f"{op}: iou_threshold must be a real number, got "
                        f"{type(iou_threshold).__name__}")
    iou_threshold = float(iou_threshold)
    if not math.isfinite(iou_threshold):
        raise ValueError(f"{op}: iou_threshold must be finite, got {iou_threshold}")
    return iou_threshold


# ----------------------------------------------------------------------------- public ops


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Pairwise intersection over union.

    Args:
        boxes1: ``[N, 4]`` float32/float64 (x1, y1, x2, y2) in pixels.
        boxes2: ``[M, 4]``, same dtype and device as ``boxes1``.
        backend: one of ``"auto"``, ``"reference"``, ``"numba"``, ``"cuda"``, ``"torchvision"``.

    Returns:
        ``[N, M]`` IoU in the boxes' dtype and device (``nan`` for two zero-area boxes).
    """
    op = "box_iou"
    _check_boxes(boxes1, "boxes1", op)
    _check_boxes(boxes2, "boxes2", op)
    if boxes2.device != boxes1.device:
        raise ValueError(f"{op}: boxes2 is on {boxes2.device} but boxes1 is on {boxes1.device}")
    if boxes2.dtype != boxes1.dtype:
        raise TypeError(f"{op}: boxes2 dtype {boxes2.dtype} differs from boxes1 dtype "
                        f"{boxes1.dtype}")
    backend = resolve_backend(backend, boxes1.device, op)
    if backend == "reference":
        from .box_reference import box_iou_reference
        return box_iou_reference(boxes1, boxes2)
    if backend == "numba":
        from .box_numba_cpu import box_iou_numba
        return box_iou_numba(boxes1, boxes2)
    if backend == "cuda":
        from .box_numba_cuda import box_iou_cuda
        return box_iou_cuda(boxes1, boxes2)
    import torchvision
    return torchvision.ops.box_iou(boxes1, boxes2)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        backend: str = "auto") -> torch.Tensor:
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


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float, backend: str = "auto") -> torch.Tensor:
    """NMS done independently per category: boxes of different ``idxs`` never suppress each other.

    Uses the coordinate-offset trick, exactly as ``torchvision.ops.batched_nms`` for small
    inputs: every box is shifted by ``idxs * (boxes.max() + 1)``, which moves each category
    into its own region where it cannot overlap another, and one NMS runs over all boxes.
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
        raise ValueError(f"{op}: idxs has {idxs.shape[0]} entries but boxes has "
                         f"{boxes.shape[0]} rows")
    if idxs.device != boxes.device:
        raise ValueError(f"{op}: idxs is on {idxs.device} but boxes is on {boxes.device}")
    iou_threshold = _check_threshold(iou_threshold, op)
    backend = resolve_backend(backend, boxes.device, op)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # Same arithmetic as torchvision's _batched_nms_coordinate_trick, so the shifted boxes
    # (and hence the IoUs) are bit for bit the ones torchvision's NMS sees.
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))  # [N]
    boxes_for_nms = boxes + offsets[:, None]  # [N, 4]
    return _nms_dispatch(boxes_for_nms, scores, iou_threshold, backend)


def _nms_dispatch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                  backend: str) -> torch.Tensor:
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

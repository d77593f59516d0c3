"""Numba CPU kernels for box IoU and greedy NMS (Faster R-CNN section 3.1.2, Mask R-CNN 3.1).

Notebook ``04_anchors_and_rpn.ipynb`` explains NMS with the readable reference in
``box_reference.py``; notebook ``03_kernels_numba_cuda.ipynb`` shows how kernels like these are
written and timed. Both kernels give the same bits as ``torchvision.ops`` (same float
arithmetic, same ``>`` comparison against a float64 threshold, same stable score order).

* ``box_iou``: one output row per ``prange`` iteration; every row is independent, so the
  rows are spread over the CPU threads.
* ``nms``: greedy NMS is sequential by nature (whether box ``j`` survives depends on every
  better box), so the loop stays on one thread and is made cheap instead:

  1. the scores are sorted once (``torch.sort(stable=True)``, as torchvision) and the four
     coordinates copied in that order into contiguous columns, so the loop reads memory in order;
  2. after each kept box, the boxes that survive it are *compacted* to the front of the
     columns. The next pass then only visits live boxes: the work is the sum, over kept boxes,
     of the number of boxes still alive, instead of ``N`` per kept box, and there is no
     "already suppressed?" branch and no ``order[j]`` gather as in torchvision's loop.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ._common import keep_torch_threads

# error_model="numpy": 0 / 0 gives nan (two zero-area boxes), as in torch, instead of raising.


@njit(cache=True, parallel=True, error_model="numpy")
def _box_iou_kernel(boxes1, boxes2, out):
    """IoU of ``boxes1`` ``[N, 4]`` vs ``boxes2`` ``[M, 4]`` into ``out`` ``[N, M]``, same dtype."""
    n = boxes1.shape[0]
    m = boxes2.shape[0]
    zero = out.dtype.type(0)
    for i in prange(n):  # i: row = box of boxes1
        ax1, ay1, ax2, ay2 = boxes1[i, 0], boxes1[i, 1], boxes1[i, 2], boxes1[i, 3]
        area_a = (ax2 - ax1) * (ay2 - ay1)
        for j in range(m):  # j: column = box of boxes2
            bx1, by1, bx2, by2 = boxes2[j, 0], boxes2[j, 1], boxes2[j, 2], boxes2[j, 3]
            area_b = (bx2 - bx1) * (by2 - by1)
            w = max(min(ax2, bx2) - max(ax1, bx1), zero)
            h = max(min(ay2, by2) - max(ay1, by1), zero)
            inter = w * h
            out[i, j] = inter / (area_a + area_b - inter)  # (area_a + area_b) - inter


@njit(cache=True, error_model="numpy")
def _nms_kernel(boxes, order, iou_threshold):
    """Greedy NMS of ``boxes`` ``[N, 4]`` visited in ``order`` ``[N]`` (decreasing score).

    Returns int64 ``[K]`` indices into ``boxes`` of the kept boxes, in visiting order.
    """
    n = boxes.shape[0]
    zero = boxes.dtype.type(0)
    # Gather the boxes in score order into contiguous columns; slot j of the columns holds
    # the box boxes[idx[j]]. Slots [0, alive) hold the boxes still in play, best first.
    x1 = np.empty(n, boxes.dtype)
    y1 = np.empty(n, boxes.dtype)
    x2 = np.empty(n, boxes.dtype)
    y2 = np.empty(n, boxes.dtype)
    idx = np.empty(n, np.int64)
    for j in range(n):
        b = order[j]
        x1[j], y1[j], x2[j], y2[j], idx[j] = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3], b
    areas = (x2 - x1) * (y2 - y1)  # [N], computed once
    keep = np.empty(n, np.int64)
    num_keep = 0
    alive = n
    while alive > 0:
        # Slot 0 holds the best box still in play: keep it.
        keep[num_keep] = idx[0]
        num_keep += 1
        bx1, by1, bx2, by2, barea = x1[0], y1[0], x2[0], y2[0], areas[0]
        write = 0  # next free slot for a survivor
        for j in range(1, alive):
            jx1, jy1, jx2, jy2, jarea = x1[j], y1[j], x2[j], y2[j], areas[j]
            w = max(min(bx2, jx2) - max(bx1, jx1), zero)
            h = max(min(by2, jy2) - max(by1, jy1), zero)
            inter = w * h
            iou = inter / (barea + jarea - inter)  # in the boxes' dtype, like torchvision
            # Copy unconditionally, advance only for a survivor (no unpredictable branch).
            x1[write], y1[write], x2[write], y2[write] = jx1, jy1, jx2, jy2
            areas[write], idx[write] = jarea, idx[j]
            write += not (np.float64(iou) > iou_threshold)  # compared in float64; nan survives
        alive = write
    return keep[:num_keep]


# ----------------------------------------------------------------------------- input checks
# One pass in compiled code instead of five small torch ops (isfinite, any, compares, nonzero):
# on a 100-box NMS the checks would otherwise cost more than the NMS itself.


@njit(cache=True)
def first_invalid_box(boxes):
    """``(row, kind)`` of the first problem in ``boxes`` ``[N, 4]``: ``kind`` 1 = NaN/inf (any
    row), else 2 = ``x2 < x1`` or ``y2 < y1``; ``(-1, 0)`` when every box is valid."""
    reversed_row = -1
    for i in range(boxes.shape[0]):
        x1, y1, x2, y2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        if not (np.isfinite(x1) and np.isfinite(y1) and np.isfinite(x2) and np.isfinite(y2)):
            return i, 1
        if reversed_row < 0 and (x2 < x1 or y2 < y1):
            reversed_row = i
    return (reversed_row, 2) if reversed_row >= 0 else (-1, 0)


@njit(cache=True)
def first_non_finite(values):
    """Index of the first NaN or infinite entry of the 1-D ``values``, or -1."""
    for i in range(values.shape[0]):
        if not np.isfinite(values[i]):
            return i
    return -1


# ----------------------------------------------------------------------------- wrappers


@keep_torch_threads
def box_iou_numba(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` x ``[M, 4]`` CPU float32/float64 boxes -> IoU ``[N, M]`` (validated inputs)."""
    b1 = boxes1.detach().contiguous().numpy()
    b2 = boxes2.detach().contiguous().numpy()
    out = np.empty((b1.shape[0], b2.shape[0]), dtype=b1.dtype)
    if out.size:
        _box_iou_kernel(b1, b2, out)
    return torch.from_numpy(out)


@keep_torch_threads
def nms_numba(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on CPU ``boxes`` ``[N, 4]``, ``scores`` ``[N]`` -> kept indices int64 ``[K]``."""
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices  # [N] int64
    # The gather by `order` happens inside the kernel: torch's multi-threaded indexing is slow
    # for these sizes when the CPU cores are busy.
    keep = _nms_kernel(boxes.detach().contiguous().numpy(), order.numpy(), float(iou_threshold))
    return torch.from_numpy(keep)

"""Readable PyTorch references for box IoU and greedy non-maximum suppression (NMS).

Mask R-CNN (He et al. 2017, section 3.1 "Inference") keeps the top proposals of the RPN and the
final detections of every class with NMS; the RPN itself comes from Faster R-CNN (Ren et al.
2015, section 3.1.2), which introduced NMS at IoU 0.7 on proposals. Notebook
``04_anchors_and_rpn.ipynb`` derives both functions step by step.

These are the *specification* the fast kernels (``box_numba_cpu.py``, ``box_numba_cuda.py``)
are tested against, and they reproduce ``torchvision.ops.nms`` / ``box_iou`` bit for bit:

* IoU is computed in the boxes' own dtype in exactly torchvision's order of operations::

      inter = max(0, min(x2a, x2b) - max(x1a, x1b)) * max(0, min(y2a, y2b) - max(y1a, y1b))
      iou   = inter / ((area_a + area_b) - inter)

* a box is suppressed when ``iou > iou_threshold`` (strictly greater), with the comparison done
  in float64 (torchvision's C++ compares the float IoU with a ``double`` threshold; comparing
  in float32 would round the threshold first and differ on IoUs equal to that rounded value);
* boxes are visited in order of decreasing score, ties broken by the lower index first (a
  *stable* descending sort, as ``torchvision``'s CPU kernel does).
"""

from __future__ import annotations

import torch


def box_area_reference(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``boxes`` ``[N, 4]`` (x1, y1, x2, y2) -> ``[N]`` in the same float dtype."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou_reference(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``boxes1`` ``[N, 4]`` and ``boxes2`` ``[M, 4]`` (xyxy, float) -> ``[N, M]``.

    The output has the boxes' dtype and device. Two zero-area boxes give ``0 / 0 = nan``, as in
    torchvision.
    """
    area1 = box_area_reference(boxes1)  # [N]
    area2 = box_area_reference(boxes2)  # [M]
    # Broadcast corners: [N, 1, 2] against [M, 2] -> [N, M, 2].
    top_left = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (bottom_right - top_left).clamp(min=0)  # [N, M, 2] overlap width, height
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    union = area1[:, None] + area2 - inter  # [N, M], evaluated as (area1 + area2) - inter
    return inter / union


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices (int64 ``[K]``) of the kept boxes, by decreasing score.

    ``boxes`` ``[N, 4]`` xyxy float, ``scores`` ``[N]``. The loop runs once per *kept* box:

    1. take the highest-scoring box still in play and keep it;
    2. drop every remaining box whose IoU with it is ``> iou_threshold``;
    3. repeat until no box is left.
    """
    # Stable descending sort: equal scores keep their original (ascending index) order.
    order = torch.sort(scores, descending=True, stable=True).indices  # [N] int64
    sorted_boxes = boxes[order]  # [N, 4], best box first
    areas = box_area_reference(sorted_boxes)  # [N]
    remaining = torch.arange(boxes.shape[0], device=boxes.device)  # positions into sorted_boxes
    keep = []
    while remaining.numel() > 0:
        best, rest = remaining[0], remaining[1:]
        keep.append(best)
        b, others = sorted_boxes[best], sorted_boxes[rest]  # [4], [R, 4]
        w = (torch.min(b[2], others[:, 2]) - torch.max(b[0], others[:, 0])).clamp(min=0)
        h = (torch.min(b[3], others[:, 3]) - torch.max(b[1], others[:, 1])).clamp(min=0)
        inter = w * h  # [R]
        iou = inter / (areas[best] + areas[rest] - inter)  # [R], in the boxes' dtype
        # Compare in float64 like torchvision's C++ (float IoU > double threshold).
        remaining = rest[~(iou.double() > iou_threshold)]
    if not keep:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    return order[torch.stack(keep)]

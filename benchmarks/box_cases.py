"""Benchmark cases for NMS and box IoU: every backend of ``mrcnn_edu.ops`` against torchvision.

``benchmarks/bench_ops.py`` imports :func:`cases` and times each callable; the ratios it prints
are measured in the same run. The boxes are *clustered* like RPN proposals (several jittered
boxes around each object), so NMS at IoU 0.7 suppresses a fair share of them (about 40%)
instead of keeping almost every box of a uniform random set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision

from mrcnn_edu.ops import batched_nms, box_iou, nms

NMS_THRESHOLD = 0.7  # the RPN's NMS threshold (Faster R-CNN section 3.1.2)
IMAGE_SIZE = 1000.0  # boxes lie in a 1000 x 1000 image


def clustered_boxes(
    num_boxes: int, seed: int = 0, boxes_per_object: int = 8, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random proposals: ``boxes`` ``[N, 4]`` xyxy and ``scores`` ``[N]`` uniform in [0, 1).

    ``N / boxes_per_object`` objects of 20 to 200 pixels; each box jitters an object's
    centre by 10% and its size by 15% of the object size.
    """
    g = torch.Generator().manual_seed(seed)
    num_objects = max(1, num_boxes // boxes_per_object)
    centres = torch.rand(num_objects, 2, generator=g) * IMAGE_SIZE  # [O, 2]
    sizes = 20 + torch.rand(num_objects, 2, generator=g) * 180  # [O, 2] (w, h)
    obj = torch.randint(0, num_objects, (num_boxes,), generator=g)  # [N] object of each box
    ctr = centres[obj] + 0.1 * sizes[obj] * torch.randn(num_boxes, 2, generator=g)  # [N, 2]
    wh = sizes[obj] * (1 + 0.15 * torch.randn(num_boxes, 2, generator=g)).clamp(min=0.3)
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)  # [N, 4] (x1, y1, x2, y2)
    scores = torch.rand(num_boxes, generator=g)
    return boxes.to(dtype), scores.to(dtype)


def _nms_case(num_boxes: int, with_reference: bool) -> dict[str, Callable[[], object]]:
    boxes, scores = clustered_boxes(num_boxes)
    fns: dict[str, Callable[[], object]] = {
        "torchvision": lambda: torchvision.ops.nms(boxes, scores, NMS_THRESHOLD),
        "numba": lambda: nms(boxes, scores, NMS_THRESHOLD, backend="numba"),
    }
    if with_reference:
        fns["reference"] = lambda: nms(boxes, scores, NMS_THRESHOLD, backend="reference")
    return fns


def _batched_nms_case(num_rois: int, num_classes: int) -> dict[str, Callable[[], object]]:
    """The box head's post-processing at a score threshold that keeps everything (an early or
    fresh model, or ``score_thresh=0``): each RoI gives one box per class, NMS 0.5 per class."""
    rois, _ = clustered_boxes(num_rois, seed=3)
    g = torch.Generator().manual_seed(4)
    jitter = 5 * torch.randn(num_rois, num_classes, 4, generator=g)
    boxes = (rois[:, None, :] + jitter).flatten(0, 1)  # [R * C, 4]
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)
    scores = torch.rand(num_rois * num_classes, generator=g)
    labels = torch.arange(num_classes).repeat(num_rois)
    return {
        "torchvision": lambda: torchvision.ops.batched_nms(boxes, scores, labels, 0.5),
        "numba": lambda: batched_nms(boxes, scores, labels, 0.5, backend="numba"),
    }


def _box_iou_case(n: int, m: int) -> dict[str, Callable[[], object]]:
    boxes1, _ = clustered_boxes(n, seed=1)
    boxes2, _ = clustered_boxes(m, seed=2)
    return {
        "torchvision": lambda: torchvision.ops.box_iou(boxes1, boxes2),
        "numba": lambda: box_iou(boxes1, boxes2, backend="numba"),
        "reference": lambda: box_iou(boxes1, boxes2, backend="reference"),
    }


def _synced(fn: Callable[[], object]) -> Callable[[], object]:
    """Wrap ``fn`` so its time includes the asynchronous GPU work it queued."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _gpu_nms_case(num_boxes: int) -> dict[str, Callable[[], object]]:
    """numba.cuda NMS against torchvision's CUDA NMS on the same GPU tensors."""
    boxes, scores = (t.cuda() for t in clustered_boxes(num_boxes))
    return {
        "torchvision": _synced(lambda: torchvision.ops.nms(boxes, scores, NMS_THRESHOLD)),
        "cuda": _synced(lambda: nms(boxes, scores, NMS_THRESHOLD, backend="cuda")),
    }


def _gpu_box_iou_case(n: int, m: int) -> dict[str, Callable[[], object]]:
    boxes1 = clustered_boxes(n, seed=1)[0].cuda()
    boxes2 = clustered_boxes(m, seed=2)[0].cuda()
    return {
        "torchvision": _synced(lambda: torchvision.ops.box_iou(boxes1, boxes2)),
        "cuda": _synced(lambda: box_iou(boxes1, boxes2, backend="cuda")),
    }


def cases(quick: bool) -> list[tuple[str, dict[str, Callable[[], object]]]]:
    """``[(case name, {backend: zero-argument callable running the op once})]``.

    Full sizes: NMS on 1,000 / 5,000 / 20,000 clustered boxes at IoU 0.7 (no "reference" for
    20,000: its Python loop runs once per kept box), box_iou 2000 x 2000, and batched NMS of
    1000 RoIs x 90 classes (the COCO box head's post-processing). ``quick``: small
    sizes for CI and ``make demo``. With a GPU, ``[gpu]`` cases time the "cuda" backend against
    torchvision's CUDA kernels on the same device tensors.
    """
    nms_sizes = (100, 300, 1000) if quick else (1000, 5000, 20000)
    iou_size = 200 if quick else 2000
    # the reference's Python loop runs once per kept box: only where it takes seconds, not minutes
    ref_limit = 1000 if quick else 5000
    out = [(f"nms {n} boxes", _nms_case(n, with_reference=n <= ref_limit)) for n in nms_sizes]
    out.append((f"box_iou {iou_size}x{iou_size}", _box_iou_case(iou_size, iou_size)))
    rois, classes = (100, 20) if quick else (1000, 90)
    out.append((f"batched_nms {rois} RoIs x {classes} classes", _batched_nms_case(rois, classes)))
    if torch.cuda.is_available():  # GPU cases: the ratio is against torchvision's CUDA kernels
        out += [(f"nms {n} boxes [gpu]", _gpu_nms_case(n)) for n in nms_sizes]
        out.append((f"box_iou {iou_size}x{iou_size} [gpu]", _gpu_box_iou_case(iou_size, iou_size)))
    return out

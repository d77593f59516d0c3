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

from mrcnn_edu.ops import box_iou, nms

NMS_THRESHOLD = 0.7  # the RPN's NMS threshold (Faster R-CNN section 3.1.2)
IMAGE_SIZE = 1000.0  # boxes lie in a 1000 x 1000 image


def clustered_boxes(num_boxes: int, seed: int = 0, boxes_per_object: int = 8,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
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
    if torch.cuda.is_available():
        boxes_gpu, scores_gpu = boxes.cuda(), scores.cuda()
        # nms ends with a nonzero() on the device, which waits for the kernels.
        fns["cuda"] = lambda: nms(boxes_gpu, scores_gpu, NMS_THRESHOLD, backend="cuda")
    return fns


def _box_iou_case(n: int, m: int) -> dict[str, Callable[[], object]]:
    boxes1, _ = clustered_boxes(n, seed=1)
    boxes2, _ = clustered_boxes(m, seed=2)
    fns: dict[str, Callable[[], object]] = {
        "torchvision": lambda: torchvision.ops.box_iou(boxes1, boxes2),
        "numba": lambda: box_iou(boxes1, boxes2, backend="numba"),
        "reference": lambda: box_iou(boxes1, boxes2, backend="reference"),
    }
    if torch.cuda.is_available():
        boxes1_gpu, boxes2_gpu = boxes1.cuda(), boxes2.cuda()

        def run_cuda():
            out = box_iou(boxes1_gpu, boxes2_gpu, backend="cuda")
            torch.cuda.synchronize()  # the kernel is asynchronous: time it to the end
            return out

        fns["cuda"] = run_cuda
    return fns


def cases(quick: bool) -> list[tuple[str, dict[str, Callable[[], object]]]]:
    """``[(case name, {backend: zero-argument callable running the op once})]``.

    Full sizes: NMS on 1,000 / 5,000 / 20,000 clustered boxes at IoU 0.7 (no "reference" for
    20,000: its Python loop runs once per kept box) and box_iou 2000 x 2000. ``quick``: small
    sizes for CI and ``make demo``. "cuda" appears when ``torch.cuda.is_available()``.
    """
    nms_sizes = (100, 300, 1000) if quick else (1000, 5000, 20000)
    iou_size = 200 if quick else 2000
    out = [(f"nms {n} boxes", _nms_case(n, with_reference=n <= 5000)) for n in nms_sizes]
    out.append((f"box_iou {iou_size}x{iou_size}", _box_iou_case(iou_size, iou_size)))
    return out

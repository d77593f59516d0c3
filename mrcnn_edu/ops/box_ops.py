"""PLACEHOLDER (being replaced by the NMS/IoU work): delegates to torchvision."""
import torchvision


def nms(boxes, scores, iou_threshold, backend="auto"):
    return torchvision.ops.nms(boxes, scores, iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold, backend="auto"):
    return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)


def box_iou(boxes1, boxes2, backend="auto"):
    return torchvision.ops.box_iou(boxes1, boxes2)

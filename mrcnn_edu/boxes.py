"""Box coding and box utilities: the (dx, dy, dw, dh) parametrisation of R-CNN.

Explained in notebook ``04_anchors_and_rpn.ipynb``. Every network that regresses boxes in Mask
R-CNN (the RPN of Faster R-CNN, section 3.1.2, and the Fast R-CNN box head) does not predict
corners directly: it predicts *deltas* relative to a reference box (an anchor or a proposal).
With the reference box P (centre ``P_x, P_y``, size ``P_w, P_h``) and the ground-truth box G,
the targets are (R-CNN, Girshick et al. 2014, appendix C, eqns. (6)-(9); Faster R-CNN eqn. (2))::

    t_x = w_x (G_x - P_x) / P_w          t_w = w_w log(G_w / P_w)
    t_y = w_y (G_y - P_y) / P_h          t_h = w_h log(G_h / P_h)

and decoding inverts them (R-CNN eqns. (1)-(4))::

    G_x = P_w t_x / w_x + P_x            G_w = P_w exp(t_w / w_w)
    G_y = P_h t_y / w_y + P_y            G_h = P_h exp(t_h / w_h)

The weights ``(w_x, w_y, w_w, w_h)`` are ``(1, 1, 1, 1)`` for the RPN and ``(10, 10, 5, 5)`` for
the box head (they scale the targets to roughly unit variance, as in Detectron). Before the
``exp`` the decoded ``t_w, t_h`` are clamped to ``log(1000 / 16)`` so an untrained network cannot
produce infinite boxes.

Conventions: boxes are ``[N, 4] (x1, y1, x2, y2)`` float tensors in pixels; widths are
``x2 - x1`` (no ``+ 1``), as in torchvision and detectron2. The arithmetic is ordered as in
torchvision's ``det_utils.BoxCoder`` so both give the same float32 bits (``tests/test_boxes.py``).
Mixed precision: :class:`BoxCoder` codes in float32 even under ``torch.autocast``, with float16 /
bfloat16 inputs upcast (``mrcnn_edu.utils.full_precision``): bfloat16 keeps 8 significant bits,
so a decoded corner near x = 600 would move in steps of 4 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .utils import full_precision

__all__ = [
    "BoxCoder",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "clip_boxes_to_image",
    "remove_small_boxes",
]


def _check_boxes(boxes, name: str, fn: str, multiple: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``fn`` and ``name`` unless ``boxes`` is a float
    ``[..., 4]`` tensor (``[..., 4 * k]`` when ``multiple``)."""
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(boxes).__name__}")
    last = boxes.shape[-1] if boxes.dim() > 0 else 0
    ok = last > 0 and last % 4 == 0 if multiple else last == 4
    if not ok:
        want = "4 * k (k sets of dx, dy, dw, dh)" if multiple else "4 (x1, y1, x2, y2)"
        raise ValueError(
            f"{fn}: {name} must have a last dimension of {want}, got shape {tuple(boxes.shape)}"
        )
    if not boxes.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {boxes.dtype}")


class BoxCoder:
    """Encode boxes as deltas relative to reference boxes, and decode deltas back into boxes.

    Args:
        weights: ``(w_x, w_y, w_w, w_h)``; ``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for
            the Fast R-CNN box head.
        bbox_xform_clip: upper clamp on the decoded ``dw, dh`` before ``exp`` (default
            ``log(1000 / 16)``, i.e. a box may grow at most 62.5 times its reference).

    >>> coder = BoxCoder()
    >>> anchors = torch.tensor([[0., 0., 10., 10.]])
    >>> gt = torch.tensor([[5., 0., 15., 20.]])
    >>> coder.encode(gt, anchors)          # centre moves by half a width, height doubles
    tensor([[0.5000, 0.5000, 0.0000, 0.6931]])
    >>> coder.decode(coder.encode(gt, anchors), anchors)
    tensor([[ 5.,  0., 15., 20.]])
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4:
            raise ValueError(
                f"BoxCoder: weights must have 4 entries (wx, wy, ww, wh), got {weights!r}"
            )
        if any(float(w) <= 0 for w in weights):
            raise ValueError(f"BoxCoder: weights must be positive, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip:.4f})"

    # ----------------------------------------------------------------------------------- encode
    @full_precision
    def encode(self, matched_gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets of ``matched_gt_boxes`` relative to ``anchors`` (eqns. (6)-(9)).

        Args:
            matched_gt_boxes: ``[N, 4]`` float, the ground-truth box matched to each anchor.
            anchors: ``[N, 4]`` float, the reference boxes (anchors or proposals), positive size.

        Returns:
            deltas: ``[N, 4]`` (t_x, t_y, t_w, t_h), dtype of ``matched_gt_boxes`` (float32
            for float16 / bfloat16 inputs, which are upcast; autocast is off inside).
        """
        _check_boxes(matched_gt_boxes, "matched_gt_boxes", "BoxCoder.encode")
        _check_boxes(anchors, "anchors", "BoxCoder.encode")
        if matched_gt_boxes.dim() != 2 or matched_gt_boxes.shape != anchors.shape:
            raise ValueError(
                "BoxCoder.encode: matched_gt_boxes and anchors must both be [N, 4] with the same "
                f"N, got {tuple(matched_gt_boxes.shape)} and {tuple(anchors.shape)}"
            )
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(matched_gt_boxes.dtype)

        # reference boxes P: size and centre
        p_w = anchors[:, 2] - anchors[:, 0]
        p_h = anchors[:, 3] - anchors[:, 1]
        p_x = anchors[:, 0] + 0.5 * p_w
        p_y = anchors[:, 1] + 0.5 * p_h
        # ground truth G: size and centre
        g_w = matched_gt_boxes[:, 2] - matched_gt_boxes[:, 0]
        g_h = matched_gt_boxes[:, 3] - matched_gt_boxes[:, 1]
        g_x = matched_gt_boxes[:, 0] + 0.5 * g_w
        g_y = matched_gt_boxes[:, 1] + 0.5 * g_h

        t_x = wx * (g_x - p_x) / p_w  # eqn. (6)
        t_y = wy * (g_y - p_y) / p_h  # eqn. (7)
        t_w = ww * torch.log(g_w / p_w)  # eqn. (8)
        t_h = wh * torch.log(g_h / p_h)  # eqn. (9)
        return torch.stack((t_x, t_y, t_w, t_h), dim=1)  # 4 x [N] -> [N, 4]

    @full_precision
    def encode_batch(
        self, matched_gt_boxes: Sequence[Tensor], anchors: Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        """Per-image form of :meth:`encode` (torchvision's ``BoxCoder.encode``).

        Args:
            matched_gt_boxes: list of ``[N_i, 4]``.
            anchors: list of ``[N_i, 4]``, same lengths.

        Returns:
            tuple of ``[N_i, 4]`` deltas, one per image.
        """
        if len(matched_gt_boxes) != len(anchors):
            raise ValueError(
                f"BoxCoder.encode_batch: got {len(matched_gt_boxes)} images of matched_gt_boxes "
                f"but {len(anchors)} of anchors"
            )
        counts = [len(b) for b in matched_gt_boxes]
        deltas = self.encode(
            torch.cat(list(matched_gt_boxes), dim=0), torch.cat(list(anchors), dim=0)
        )
        return deltas.split(counts, dim=0)

    # ----------------------------------------------------------------------------------- decode
    @full_precision
    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Apply ``deltas`` to reference ``boxes`` (eqns. (1)-(4)); the inverse of :meth:`encode`.

        Args:
            deltas: ``[N, 4 * k]`` float, k sets of (t_x, t_y, t_w, t_h) per box (k = 1 for the
                RPN, k = number of classes for the box head).
            boxes: ``[N, 4]`` float reference boxes (anchors or proposals).

        Returns:
            ``[N, 4 * k]`` decoded boxes (x1, y1, x2, y2), dtype of ``deltas`` (float32 for
            float16 / bfloat16 deltas, which are upcast; autocast is off inside). ``t_w, t_h``
            are clamped to ``bbox_xform_clip`` before ``exp``.
        """
        _check_boxes(deltas, "deltas", "BoxCoder.decode", multiple=True)
        _check_boxes(boxes, "boxes", "BoxCoder.decode")
        if (
            deltas.dim() != 2
            or boxes.dim() != 2
            or boxes.shape[1] != 4
            or deltas.shape[0] != boxes.shape[0]
        ):
            raise ValueError(
                "BoxCoder.decode: deltas must be [N, 4*k] and boxes [N, 4] with the same N, got "
                f"{tuple(deltas.shape)} and {tuple(boxes.shape)}"
            )
        wx, wy, ww, wh = self.weights
        boxes = boxes.to(deltas.dtype)

        p_w = boxes[:, 2] - boxes[:, 0]
        p_h = boxes[:, 3] - boxes[:, 1]
        p_x = boxes[:, 0] + 0.5 * p_w
        p_y = boxes[:, 1] + 0.5 * p_h

        # every 4th column belongs to the same coordinate: [N, 4k] -> 4 x [N, k]
        t_x = deltas[:, 0::4] / wx
        t_y = deltas[:, 1::4] / wy
        t_w = torch.clamp(deltas[:, 2::4] / ww, max=self.bbox_xform_clip)
        t_h = torch.clamp(deltas[:, 3::4] / wh, max=self.bbox_xform_clip)

        g_x = t_x * p_w[:, None] + p_x[:, None]  # eqn. (1)
        g_y = t_y * p_h[:, None] + p_y[:, None]  # eqn. (2)
        g_w = torch.exp(t_w) * p_w[:, None]  # eqn. (3)
        g_h = torch.exp(t_h) * p_h[:, None]  # eqn. (4)

        half_w = 0.5 * g_w
        half_h = 0.5 * g_h
        out = torch.stack(
            (g_x - half_w, g_y - half_h, g_x + half_w, g_y + half_h), dim=2
        )  # [N, k, 4]
        return out.flatten(1)  # [N, k, 4] -> [N, 4k]

    @full_precision
    def decode_batch(self, deltas: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Per-image form of :meth:`decode` (torchvision's ``BoxCoder.decode``).

        Args:
            deltas: ``[sum_i N_i, 4 * k]`` (or anything reshapeable to it).
            boxes: list of ``[N_i, 4]`` reference boxes.

        Returns:
            ``[sum_i N_i, k, 4]`` decoded boxes.
        """
        total = sum(int(b.shape[0]) for b in boxes)
        if total == 0:
            return deltas.new_zeros((0, 1, 4))
        deltas = deltas.reshape(total, -1)  # [sum N_i, 4k]
        return self.decode(deltas, torch.cat(list(boxes), dim=0)).reshape(total, -1, 4)


# ------------------------------------------------------------------------------ box utilities
def box_area(boxes: Tensor) -> Tensor:
    """Areas ``(x2 - x1) * (y2 - y1)`` of ``[..., 4]`` xyxy boxes -> ``[...]``, same dtype."""
    _check_boxes(boxes, "boxes", "box_area")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp ``[..., 4]`` xyxy boxes into an image of ``size = (height, width)``.

    x coordinates go to ``[0, width]``, y coordinates to ``[0, height]``; returns a new tensor of
    the same shape and dtype.
    """
    _check_boxes(boxes, "boxes", "clip_boxes_to_image")
    if len(size) != 2:
        raise ValueError(f"clip_boxes_to_image: size must be (height, width), got {size!r}")
    height, width = size
    xs = boxes[..., 0::2].clamp(min=0, max=width)  # [..., 2] (x1, x2)
    ys = boxes[..., 1::2].clamp(min=0, max=height)  # [..., 2] (y1, y2)
    # [..., 2] + [..., 2] -> [..., 2, 2] (x1 y1 / x2 y2) -> [..., 4]
    return torch.stack((xs, ys), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices ``[K]`` int64 of the ``[N, 4]`` boxes whose width AND height are ``>= min_size``."""
    _check_boxes(boxes, "boxes", "remove_small_boxes")
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return torch.where((widths >= min_size) & (heights >= min_size))[0]


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> ``[..., 4]`` (centre x, centre y, width, height)."""
    _check_boxes(boxes, "boxes", "box_xyxy_to_cxcywh")
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (centre x, centre y, width, height) -> ``[..., 4]`` (x1, y1, x2, y2)."""
    _check_boxes(boxes, "boxes", "box_cxcywh_to_xyxy")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)

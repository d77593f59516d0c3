"""Matching anchors (or proposals) to ground truth, and sampling balanced mini-batches.

Explained in notebook ``04_anchors_and_rpn.ipynb``. Faster R-CNN section 3.1.2: an anchor is
*positive* if its IoU with some ground-truth box is ``>= 0.7``, or if it is the anchor with the
highest IoU for some ground-truth box (so every object gets at least one anchor, even when no
anchor reaches 0.7: the "low-quality matches"); it is *negative* if its best IoU is ``< 0.3``;
anchors in between are ignored. The loss then looks at 256 anchors per image, at most half of
them positive ("we randomly sample 256 anchors in an image ... positive and negative anchors have
a ratio of up to 1:1"). The box head (Fast R-CNN section 2.3, Mask R-CNN section 3.1) uses the
same two pieces with IoU 0.5 / 0.5 and 512 RoIs, 25 % positive.

Both classes reproduce torchvision's ``det_utils.Matcher`` and
``det_utils.BalancedPositiveNegativeSampler`` exactly, including ties and random draws
(``tests/test_matching.py``), with one documented difference: a ground-truth box whose best IoU
with every prediction is 0 (outside the image, or of zero width) claims no prediction through
the low-quality-match rule (torchvision would make every IoU-0 anchor its positive).
:func:`match_targets` and :func:`add_gt_proposals` are the steps the RPN and the box head share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ops import box_iou
from .utils import full_precision

__all__ = ["BalancedSampler", "Matcher", "add_gt_proposals", "match_targets"]


class Matcher:
    """Assign to every prediction (column) the ground-truth box (row) it overlaps most.

    Args:
        high_threshold: quality ``>= high_threshold`` is a match (0.7 for the RPN).
        low_threshold: quality ``< low_threshold`` is :attr:`BELOW_LOW_THRESHOLD` (background);
            ``[low, high)`` is :attr:`BETWEEN_THRESHOLDS` (ignored). 0.3 for the RPN.
        allow_low_quality_matches: also match, for every ground truth, the prediction(s) with the
            highest quality for it, whatever that quality (ties included).

    Worked example (2 ground-truth boxes, 4 anchors, thresholds 0.7 / 0.3)::

        >>> iou = torch.tensor([[0.9, 0.5, 0.1, 0.0],    # gt 0
        ...                     [0.2, 0.6, 0.2, 0.1]])   # gt 1: best anchor is 1, IoU 0.6 only
        >>> Matcher(0.7, 0.3)(iou)
        tensor([ 0, -2, -1, -1])
        >>> Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)
        tensor([ 0,  1, -1, -1])

    Anchor 0 matches gt 0 (0.9 >= 0.7); anchor 1's best IoU 0.6 lies between the thresholds
    (-2, ignored) unless low-quality matches are allowed: it is gt 1's best anchor, so it becomes
    a positive for gt 1; anchors 2 and 3 never reach 0.3 (-1, background).

    One documented difference from torchvision, which only matters for a ground truth that
    overlaps NO prediction (best quality 0: a box outside the image, or of zero width): in
    torchvision every prediction "reaches" that gt's best quality 0, so the low-quality rule
    turns all of them into positives (matched to whatever their own best gt is, gt 0 for an
    all-zero column) and the RPN trains on garbage. Here such a gt claims nothing::

        >>> iou = torch.tensor([[0.8, 0.0, 0.0],    # gt 0
        ...                     [0.0, 0.0, 0.0]])   # gt 1: outside the image, overlaps nothing
        >>> Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou)   # torchvision: [0, 0, 0]
        tensor([ 0, -1, -1])

    A quality matrix holding NaN (e.g. ``box_iou`` of two zero-area boxes) is an error: every
    comparison with NaN is False, so NaN would silently count as a match.
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError(
                f"Matcher: low_threshold ({low_threshold}) must be <= "
                f"high_threshold ({high_threshold})"
            )
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __repr__(self) -> str:
        return (
            f"Matcher(high_threshold={self.high_threshold}, low_threshold={self.low_threshold}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """Match predictions to ground truth.

        Args:
            match_quality_matrix: ``[G, N]`` float, quality (IoU) of ground truth ``g`` with
                prediction ``n``.

        Returns:
            matched_idxs: ``[N]`` int64, a ground-truth index in ``[0, G)``, or
            ``BELOW_LOW_THRESHOLD`` (-1) / ``BETWEEN_THRESHOLDS`` (-2).

        Unlike torchvision (which raises), ``G == 0`` gives all ``BELOW_LOW_THRESHOLD`` (an image
        without objects is all background) and ``N == 0`` gives an empty tensor.

        Raises:
            ValueError: not a ``[G, N]`` tensor, or NaN in it (naming the first ``(g, n)``).
        """
        if not isinstance(match_quality_matrix, Tensor) or match_quality_matrix.dim() != 2:
            shape = (
                tuple(match_quality_matrix.shape)
                if isinstance(match_quality_matrix, Tensor)
                else type(match_quality_matrix).__name__
            )
            raise ValueError(f"Matcher: match_quality_matrix must be a [G, N] tensor, got {shape}")
        G, N = match_quality_matrix.shape
        device = match_quality_matrix.device
        nan = torch.isnan(match_quality_matrix)
        if bool(nan.any()):
            g, n = (int(i) for i in nan.nonzero()[0])
            raise ValueError(
                f"Matcher: match_quality_matrix [G={G}, N={N}] holds NaN (first at gt {g}, "
                f"prediction {n}); box_iou gives NaN for two zero-area boxes: drop zero-area "
                "ground-truth boxes and predictions before matching"
            )
        if N == 0:
            return torch.zeros((0,), dtype=torch.int64, device=device)
        if G == 0:
            return torch.full((N,), self.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=device)

        # best ground truth for every prediction: [G, N] -> [N] values and [N] indices
        matched_vals, matches = match_quality_matrix.max(dim=0)
        best_gt_for_pred = matches.clone() if self.allow_low_quality_matches else None

        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below] = self.BELOW_LOW_THRESHOLD
        matches[between] = self.BETWEEN_THRESHOLDS

        if best_gt_for_pred is not None:
            self.set_low_quality_matches_(matches, best_gt_for_pred, match_quality_matrix)
        return matches

    @staticmethod
    def set_low_quality_matches_(
        matches: Tensor, best_gt_for_pred: Tensor, match_quality_matrix: Tensor
    ) -> None:
        """Re-match, in place, the predictions that are the best for some ground truth.

        For each ground truth take every prediction that reaches its highest quality (ties
        included); each such prediction gets back its own best ground truth
        (``best_gt_for_pred``), even if that quality was below the thresholds. A ground truth
        whose highest quality is 0 overlaps no prediction and claims none (torchvision lets it
        claim every prediction; see the class docstring).
        """
        best_quality_per_gt = match_quality_matrix.max(dim=1).values  # [G, N] -> [G]
        # (gt, pred) pairs that reach their gt's best quality, for gts that overlap something;
        # [G, N] == [G, 1] and [G, 1] > 0
        reaches_best = (match_quality_matrix == best_quality_per_gt[:, None]) & (
            best_quality_per_gt[:, None] > 0
        )
        _, preds = torch.where(reaches_best)
        matches[preds] = best_gt_for_pred[preds]


class BalancedSampler:
    """Sample a fixed-size mini-batch of positives and negatives per image.

    Args:
        batch_size_per_image: how many elements to sample per image (256 for the RPN, 512 for
            the box head).
        positive_fraction: at most this fraction of the batch is positive (0.5 RPN, 0.25 box
            head); negatives fill the rest when positives run short.

    Draws: per image, one ``torch.randperm`` over the positives, then one over the negatives, on
    ``generator`` (or torch's global generator when ``generator`` is None, which draws exactly as
    torchvision's ``BalancedPositiveNegativeSampler`` does after the same ``torch.manual_seed``).
    """

    def __init__(self, batch_size_per_image: int = 256, positive_fraction: float = 0.5) -> None:
        if int(batch_size_per_image) < 0:
            raise ValueError(
                f"BalancedSampler: batch_size_per_image must be >= 0, got {batch_size_per_image}"
            )
        if not 0.0 <= float(positive_fraction) <= 1.0:
            raise ValueError(
                f"BalancedSampler: positive_fraction must be in [0, 1], got {positive_fraction}"
            )
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __repr__(self) -> str:
        return (
            f"BalancedSampler(batch_size_per_image={self.batch_size_per_image}, "
            f"positive_fraction={self.positive_fraction})"
        )

    @staticmethod
    def _randperm(n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
        if generator is None:
            return torch.randperm(n, device=device)
        return torch.randperm(n, generator=generator, device=generator.device).to(device)

    def __call__(
        self, labels: Sequence[Tensor], generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Sample positives (label ``>= 1``) and negatives (label ``0``); ``-1`` is never sampled.

        Args:
            labels: list per image of ``[N_i]`` labels (any dtype: 1 / class id = foreground,
                0 = background, -1 = ignore).
            generator: optional ``torch.Generator`` for the draws.

        Returns:
            ``(pos_masks, neg_masks)``: lists per image of ``[N_i]`` bool masks of the sampled
            positives and negatives (``num_pos <= batch * fraction``,
            ``num_pos + num_neg <= batch``).
        """
        if isinstance(labels, Tensor):
            raise TypeError(
                "BalancedSampler: labels must be a list of [N_i] tensors, one per image, "
                "not a tensor"
            )
        pos_masks, neg_masks = [], []
        for i, labels_i in enumerate(labels):
            if not isinstance(labels_i, Tensor) or labels_i.dim() != 1:
                shape = (
                    tuple(labels_i.shape)
                    if isinstance(labels_i, Tensor)
                    else type(labels_i).__name__
                )
                raise ValueError(
                    f"BalancedSampler: labels[{i}] must be a 1-D [N_i] tensor, got {shape}"
                )
            positive = torch.where(labels_i >= 1)[0]
            negative = torch.where(labels_i == 0)[0]

            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)

            pos_pick = positive[
                self._randperm(positive.numel(), positive.device, generator)[:num_pos]
            ]
            neg_pick = negative[
                self._randperm(negative.numel(), negative.device, generator)[:num_neg]
            ]

            pos_mask = torch.zeros(labels_i.shape, dtype=torch.bool, device=labels_i.device)
            neg_mask = torch.zeros(labels_i.shape, dtype=torch.bool, device=labels_i.device)
            pos_mask[pos_pick] = True
            neg_mask[neg_pick] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


@full_precision
def match_targets(boxes: Tensor, gt_boxes: Tensor, matcher: Matcher) -> Tensor:
    """Match one image's boxes (anchors or proposals) to its ground-truth boxes.

    The one matching step the RPN (anchors, ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``)
    and the box head (proposals, ``Matcher(0.5, 0.5)``) share.

    Args:
        boxes: ``[N, 4]`` float ``(x1, y1, x2, y2)`` anchors or proposals.
        gt_boxes: ``[G, 4]`` float ground-truth boxes; ``G`` may be 0.
        matcher: a :class:`Matcher`.

    Returns:
        matched_idxs: ``[N]`` int64, a ground-truth index in ``[0, G)`` or one of the Matcher's
        codes ``BELOW_LOW_THRESHOLD`` (-1, background) / ``BETWEEN_THRESHOLDS`` (-2, ignored).
        ``G == 0`` gives all -1: an image without objects is all background.

    The IoUs are float32 even under ``torch.autocast`` (float16 / bfloat16 boxes are upcast,
    autocast is off inside): an IoU of 0.4995 must not round to the threshold 0.5.
    """
    for name, b in (("boxes", boxes), ("gt_boxes", gt_boxes)):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[-1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"match_targets: {name} must be [N, 4] (x1, y1, x2, y2), got {shape}")
        if not b.is_floating_point():
            raise TypeError(f"match_targets: {name} must be floating point, got {b.dtype}")
    if boxes.device != gt_boxes.device:
        raise ValueError(
            f"match_targets: boxes are on {boxes.device} but gt_boxes on {gt_boxes.device}"
        )
    if gt_boxes.shape[0] == 0:
        return torch.full(
            (boxes.shape[0],), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=boxes.device
        )
    return matcher(box_iou(gt_boxes, boxes))  # [G, N] -> [N]


def add_gt_proposals(proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor]) -> list[Tensor]:
    """Append each image's ground-truth boxes to its proposals (Fast R-CNN training).

    Early in training the RPN proposes little near the objects; appending the ground truth
    guarantees positives for the box head (torchvision's ``add_gt_proposals``, Detectron's
    ``roi_data``). ``[P_i, 4]`` + ``[G_i, 4]`` -> ``[P_i + G_i, 4]`` per image, gt last.
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(
            f"add_gt_proposals: {len(proposals)} images of proposals but {len(gt_boxes)} "
            "of gt boxes"
        )
    return [torch.cat((p, g.to(p.dtype))) for p, g in zip(proposals, gt_boxes)]

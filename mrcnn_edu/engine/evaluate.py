"""Evaluation: how good are the boxes a model proposes or detects?

For now this file holds :func:`proposal_recall`, the measure of a Region Proposal Network used
by Ren et al. 2015 (Faster R-CNN, section 4.1 and figure 4: recall against IoU for 300 / 1000 /
2000 proposals) and by Hosang et al. 2016 ("What makes for effective detection proposals?").
Notebook ``04_anchors_and_rpn.ipynb`` plots it for the RPN trained there. COCO box / mask AP
through ``pycocotools.cocoeval.COCOeval`` joins this file with the full model (notebook 08).

``engine`` reports through return values: nothing here prints or plots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mrcnn_edu.ops import box_iou


def _check_boxes(boxes, what: str, i: int) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"proposal_recall: {what}[{i}] must be a torch.Tensor, "
                        f"got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"proposal_recall: {what}[{i}] must have shape [N, 4] (x1, y1, x2, y2), "
                         f"got {tuple(boxes.shape)}")
    return boxes.detach().to(torch.float32)


def proposal_recall(
    proposals: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    num_proposals: Sequence[int] = (50, 100, 300, 1000),
    iou_thresholds: Sequence[float] = (0.5, 0.7),
) -> dict[tuple[int, float], float]:
    """Fraction of ground-truth boxes covered by at least one of the top-``k`` proposals.

    A gt box counts as recalled at ``(k, t)`` when some proposal among the first ``k`` of its
    image has IoU ``>= t`` with it. The recall pools all gt boxes of all images (a gt box is one
    vote, as in COCO's AR, so images with many objects weigh more).

    Args:
        proposals: per image, ``[P_i, 4]`` float (x1, y1, x2, y2) in pixels, **sorted by
            decreasing score** (as ``RegionProposalNetwork`` returns them); an image with
            ``P_i < k`` simply uses all of its proposals.
        gt_boxes: per image, ``[G_i, 4]`` float ground-truth boxes (``G_i`` may be 0).
        num_proposals: the ``k`` values.
        iou_thresholds: the ``t`` values.

    Returns:
        ``{(k, t): recall}`` with ``recall`` a Python float in [0, 1], or ``nan`` when there
        is no gt box at all.

    Example (one image, two gt boxes; the best proposal covers the first only)::

        >>> p = [torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 25.]])]
        >>> g = [torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])]
        >>> proposal_recall(p, g, num_proposals=(1, 2), iou_thresholds=(0.5, 0.7))
        {(1, 0.5): 0.5, (1, 0.7): 0.5, (2, 0.5): 1.0, (2, 0.7): 0.5}
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"proposal_recall: got {len(proposals)} proposal lists but "
                         f"{len(gt_boxes)} gt lists; need one of each per image")
    ks = [int(k) for k in num_proposals]
    ts = [float(t) for t in iou_thresholds]
    if any(k < 1 for k in ks):
        raise ValueError(f"proposal_recall: num_proposals must be >= 1, got {ks}")
    if any(not 0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"proposal_recall: iou_thresholds must lie in [0, 1], got {ts}")

    covered = {(k, t): 0 for k in ks for t in ts}
    num_gt = 0
    for i, (props, gts) in enumerate(zip(proposals, gt_boxes)):
        props = _check_boxes(props, "proposals", i)
        gts = _check_boxes(gts, "gt_boxes", i).to(props.device)
        num_gt += gts.shape[0]
        if gts.shape[0] == 0:
            continue
        if props.shape[0] == 0:
            continue  # nothing proposed: no gt box of this image is covered
        iou = box_iou(gts, props[: max(ks)])  # [G, min(P, max k)]
        # best_upto[:, j] = best IoU of each gt box among the first j+1 proposals
        best_upto = iou.cummax(dim=1).values  # [G, P']
        for k in ks:
            best = best_upto[:, min(k, best_upto.shape[1]) - 1]  # [G]
            for t in ts:
                covered[(k, t)] += int((best >= t).sum())
    if num_gt == 0:
        return {key: float("nan") for key in covered}
    return {key: n / num_gt for key, n in covered.items()}

"""The Region Proposal Network: head, loss and proposal selection (Faster R-CNN, section 3.1).

Explained in notebook ``04_anchors_and_rpn.ipynb``. Mask R-CNN (section 3) keeps Faster R-CNN's
RPN unchanged, run on every FPN level with shared weights:

1. **Head** (:class:`RPNHead`): a 3x3 conv + ReLU, then two sibling 1x1 convs giving, at every
   position, ``A`` objectness logits and ``4A`` box deltas (one per anchor, section 3.1).
2. **Anchors** (``anchors.AnchorGenerator``) and **box coding** (``boxes.BoxCoder``, weights
   1, 1, 1, 1): the deltas decode the anchors into proposals.
3. **Loss** (:func:`rpn_loss`, Faster R-CNN eqn. (1))::

       L = 1/N_cls sum_i L_cls(p_i, p_i*) + lambda 1/N_reg sum_i p_i* L_reg(t_i, t_i*)

   with binary cross-entropy for ``L_cls`` on the 256 sampled anchors per image
   (``matching.Matcher`` 0.7 / 0.3 with low-quality matches, ``matching.BalancedSampler`` 1:1)
   and smooth L1 (``beta = 1/9``) on the positives for ``L_reg``. As in torchvision and
   Detectron, both terms are divided by the number of sampled anchors (so ``lambda`` is 1).
4. **Proposals** (:func:`filter_proposals`): per level keep the ``pre_nms_top_n`` highest
   logits (2000 when training, 1000 when testing), sigmoid, clip to the image, drop boxes
   smaller than ``1e-3``, drop scores below ``score_thresh``, NMS at IoU 0.7 independently per
   level, then keep the ``post_nms_top_n`` best per image.

Everything matches torchvision 0.29's ``RegionProposalNetwork`` given the same weights and seed
(``tests/test_rpn.py``), and :class:`RPNHead`'s parameter names are torchvision's, so its
``state_dict`` loads directly. Unlike torchvision, :meth:`RegionProposalNetwork.forward` always
returns proposals AND losses (losses whenever ``targets`` are given, in either mode).

Mixed precision (``torch.autocast``): only the head's convs run in float16 / bfloat16. The
anchors are float32, and box coding, matching, proposal filtering (NMS) and the loss run in
float32 with autocast off (``mrcnn_edu.utils.full_precision``), as torchvision and detectron2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .boxes import BoxCoder, clip_boxes_to_image, remove_small_boxes
from .matching import BalancedSampler, Matcher, match_targets
from .ops import batched_nms
from .utils import LOW_PRECISION, full_precision

__all__ = [
    "RPNHead",
    "RegionProposalNetwork",
    "concat_box_prediction_layers",
    "filter_proposals",
    "label_anchors",
    "rpn_loss",
    "select_proposals",
    "top_n_per_level",
]


# ------------------------------------------------------------------------------------- head
class RPNHead(nn.Module):
    """3x3 conv + ReLU (``conv_depth`` times), then 1x1 objectness and 1x1 box-delta convs.

    Args:
        in_channels: channels ``C`` of every feature level (shared weights across levels).
        num_anchors: anchors ``A`` per location.
        conv_depth: number of 3x3 conv + ReLU blocks.

    Parameter names (``conv.0.0.weight``, ``conv.0.0.bias``, ``cls_logits.*``, ``bbox_pred.*``)
    are torchvision's, so ``head.load_state_dict(tv_head.state_dict())`` works, and so does an
    old checkpoint's ``conv.weight`` / ``conv.bias`` (renamed on load, as torchvision does).
    """

    _version = 2

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        if in_channels <= 0 or num_anchors <= 0 or conv_depth < 0:
            raise ValueError(
                f"RPNHead: need in_channels > 0, num_anchors > 0, conv_depth >= 0; got "
                f"{in_channels}, {num_anchors}, {conv_depth}"
            )
        # conv.<i> is (Conv2d, ReLU) like torchvision's Conv2dNormActivation without norm:
        # conv.<i>.0.*
        self.conv = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1),
                    nn.ReLU(inplace=True),
                )
                for _ in range(conv_depth)
            ]
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        self.in_channels = in_channels
        self.num_anchors = num_anchors
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # Faster R-CNN section 3.1.3: N(0, 0.01^2), bias 0
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # checkpoints written before torchvision 0.12 name the single conv "conv.weight"
        if local_metadata.get("version", None) is None or local_metadata.get("version") < 2:
            for kind in ("weight", "bias"):
                old, new = f"{prefix}conv.{kind}", f"{prefix}conv.0.0.{kind}"
                if old in state_dict and new not in state_dict:
                    state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Objectness logits and box deltas for every level.

        Args:
            features: list per level of ``[B, C, h_l, w_l]`` float.

        Returns:
            ``(objectness, deltas)``: lists per level of ``[B, A, h_l, w_l]`` and
            ``[B, 4A, h_l, w_l]`` (channel ``4a + k`` is coordinate ``k`` of anchor ``a``).
        """
        objectness, deltas = [], []
        for level, feature in enumerate(features):
            if (
                not isinstance(feature, Tensor)
                or feature.dim() != 4
                or feature.shape[1] != self.in_channels
            ):
                shape = (
                    tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
                )
                raise ValueError(
                    f"RPNHead: features[{level}] must be [B, {self.in_channels}, h, w], got {shape}"
                )
            t = self.conv(feature)
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas


def concat_box_prediction_layers(
    objectness: Sequence[Tensor], deltas: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Flatten the head's per-level maps into the anchors' order and concatenate the levels.

    Args:
        objectness: list per level of ``[B, A, h, w]`` logits.
        deltas: list per level of ``[B, 4A, h, w]`` deltas.

    Returns:
        ``(objectness [B * R], deltas [B * R, 4])`` with ``R = sum_l h_l * w_l * A_l``, image-major:
        rows ``b * R ... (b + 1) * R - 1`` are image ``b``, in the order of
        ``AnchorGenerator.__call__`` (level, then location ``(i, j)``, then anchor).
    """
    if len(objectness) != len(deltas):
        raise ValueError(
            f"concat_box_prediction_layers: {len(objectness)} objectness levels but "
            f"{len(deltas)} deltas levels"
        )
    flat_obj, flat_deltas = [], []
    for obj, reg in zip(objectness, deltas):
        B, A, H, W = obj.shape
        if tuple(reg.shape) != (B, 4 * A, H, W):
            raise ValueError(
                f"concat_box_prediction_layers: deltas {tuple(reg.shape)} do not match objectness "
                f"{tuple(obj.shape)} (expected {(B, 4 * A, H, W)})"
            )
        # (B, A, H, W) -> (B, H, W, A) -> (B, H*W*A)
        flat_obj.append(obj.permute(0, 2, 3, 1).reshape(B, -1))
        # (B, A*4, H, W) -> (B, A, 4, H, W) -> (B, H, W, A, 4) -> (B, H*W*A, 4)
        flat_deltas.append(reg.view(B, A, 4, H, W).permute(0, 3, 4, 1, 2).reshape(B, -1, 4))
    # levels side by side, then images stacked: (B, R) -> (B*R,), (B, R, 4) -> (B*R, 4)
    return torch.cat(flat_obj, dim=1).reshape(-1), torch.cat(flat_deltas, dim=1).reshape(-1, 4)


# ------------------------------------------------------------------------------ training targets
@full_precision
def label_anchors(anchors: Tensor, gt_boxes: Tensor, matcher: Matcher) -> tuple[Tensor, Tensor]:
    """Label one image's anchors and pick the ground-truth box each anchor regresses to.

    Args:
        anchors: ``[R, 4]`` float anchors.
        gt_boxes: ``[G, 4]`` float ground-truth boxes (``G`` may be 0).
        matcher: e.g. ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``.

    Returns:
        ``labels [R]`` float32 (1 object, 0 background, -1 ignored) and ``matched_gt_boxes
        [R, 4]`` (for labels other than 1 an arbitrary box that the loss never looks at; zeros
        when ``G == 0``, where every anchor is background).
    """
    if not isinstance(gt_boxes, Tensor) or gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        shape = tuple(gt_boxes.shape) if isinstance(gt_boxes, Tensor) else type(gt_boxes).__name__
        raise ValueError(f"label_anchors: gt boxes must be [G, 4] (x1, y1, x2, y2), got {shape}")
    if not gt_boxes.is_floating_point():
        raise TypeError(
            f"label_anchors: gt boxes must be floating point, got dtype {gt_boxes.dtype}"
        )
    R = anchors.shape[0]
    if gt_boxes.numel() == 0:  # an image without objects: every anchor is background
        return (
            torch.zeros((R,), dtype=torch.float32, device=anchors.device),
            torch.zeros((R, 4), dtype=torch.float32, device=anchors.device),
        )
    matched_idxs = match_targets(anchors, gt_boxes, matcher)  # [R]
    # clamp: -1 / -2 would index out of range; those anchors never use their box
    matched_gt_boxes = gt_boxes[matched_idxs.clamp(min=0)]  # [R, 4]
    labels = (matched_idxs >= 0).to(torch.float32)
    labels[matched_idxs == Matcher.BELOW_LOW_THRESHOLD] = 0.0
    labels[matched_idxs == Matcher.BETWEEN_THRESHOLDS] = -1.0
    return labels, matched_gt_boxes


@full_precision
def rpn_loss(
    objectness: Tensor,
    pred_deltas: Tensor,
    labels: Sequence[Tensor],
    regression_targets: Sequence[Tensor],
    pos_masks: Sequence[Tensor],
    neg_masks: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """RPN loss, Faster R-CNN eqn. (1), on the sampled anchors (pure function).

    Args:
        objectness: ``[R_total]`` (or ``[R_total, 1]``) logits, ``R_total = sum_i N_i``, images
            concatenated in the order of ``labels``.
        pred_deltas: ``[R_total, 4]`` predicted deltas.
        labels: list per image of ``[N_i]`` float labels (1, 0, -1).
        regression_targets: list per image of ``[N_i, 4]`` encoded gt boxes.
        pos_masks, neg_masks: lists per image of ``[N_i]`` bool/uint8 masks of the sampled anchors.

    Returns:
        ``(loss_objectness, loss_rpn_box_reg)`` scalars:
        ``mean_{sampled} BCE(logit, label)`` and
        ``sum_{sampled positives} smoothL1_{beta=1/9}(delta - target) / num_sampled``.
        With nothing sampled both are ``0`` (still connected to the graph).
    """
    objectness = objectness.reshape(-1)
    labels = torch.cat(list(labels), dim=0)
    regression_targets = torch.cat(list(regression_targets), dim=0)
    pos = torch.cat([m.bool() for m in pos_masks], dim=0)
    neg = torch.cat([m.bool() for m in neg_masks], dim=0)
    R = objectness.shape[0]
    for name, t, want in (
        ("pred_deltas", pred_deltas, (R, 4)),
        ("labels", labels, (R,)),
        ("regression_targets", regression_targets, (R, 4)),
        ("pos_masks", pos, (R,)),
        ("neg_masks", neg, (R,)),
    ):
        if tuple(t.shape) != want:
            raise ValueError(
                f"rpn_loss: {name} (concatenated over images) must be {want}, got {tuple(t.shape)}"
            )

    pos_idx = torch.where(pos)[0]
    neg_idx = torch.where(neg)[0]
    sampled = torch.cat([pos_idx, neg_idx], dim=0)  # positives first, as torchvision
    if sampled.numel() == 0:  # nothing to learn from: zero losses that still backpropagate
        return objectness.sum() * 0, pred_deltas.sum() * 0

    loss_box = (
        F.smooth_l1_loss(
            pred_deltas[pos_idx], regression_targets[pos_idx], beta=1 / 9, reduction="sum"
        )
        / sampled.numel()
    )
    loss_objectness = F.binary_cross_entropy_with_logits(
        objectness[sampled], labels[sampled].to(objectness.dtype)
    )
    return loss_objectness, loss_box


# ------------------------------------------------------------------------------------ proposals
def top_n_per_level(objectness: Tensor, num_anchors_per_level: Sequence[int], top_n: int) -> Tensor:
    """Indices ``[B, K]`` of the ``top_n`` highest logits of every level, levels side by side.

    Args:
        objectness: ``[B, R]`` logits.
        num_anchors_per_level: ``R_l`` per level, ``sum R_l = R``.
        top_n: per level (a level with fewer anchors keeps all of them).
    """
    out, offset = [], 0
    for level_obj in objectness.split(list(num_anchors_per_level), dim=1):  # [B, R_l]
        k = min(int(top_n), level_obj.shape[1])
        _, idx = level_obj.topk(k, dim=1)
        out.append(idx + offset)
        offset += level_obj.shape[1]
    return torch.cat(out, dim=1)


@full_precision
def filter_proposals(
    proposals: Tensor,
    objectness: Tensor,
    image_sizes: Sequence[tuple[int, int]],
    num_anchors_per_level: Sequence[int],
    pre_nms_top_n: int = 1000,
    post_nms_top_n: int = 1000,
    nms_thresh: float = 0.7,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
) -> tuple[list[Tensor], list[Tensor]]:
    """From decoded anchors to proposals: top-k per level, clip, small/low-score removal, NMS.

    Args:
        proposals: ``[B, R, 4]`` decoded boxes (all anchors of each image).
        objectness: ``[B, R]`` (or ``[B * R]``) logits; detached here.
        image_sizes: ``(h, w)`` per image (the real image inside the padded batch).
        num_anchors_per_level: ``R_l`` per level.
        pre_nms_top_n: logits kept per level before NMS (torchvision: 2000 train / 1000 test).
        post_nms_top_n: proposals kept per image after NMS.
        nms_thresh: IoU threshold of the per-level NMS.
        score_thresh: keep ``sigmoid(logit) >= score_thresh``.
        min_size: drop boxes with a side ``< min_size`` after clipping.

    Returns:
        ``(boxes, scores)``: lists per image of ``[P_i, 4]`` proposals and ``[P_i]`` sigmoid
        scores, best first.
    """
    if proposals.dim() != 3 or proposals.shape[-1] != 4:
        raise ValueError(
            f"filter_proposals: proposals must be [B, R, 4], got {tuple(proposals.shape)}"
        )
    B, R, _ = proposals.shape
    if len(image_sizes) != B:
        raise ValueError(
            f"filter_proposals: {len(image_sizes)} image sizes for a batch of {B} images"
        )
    if sum(num_anchors_per_level) != R:
        raise ValueError(
            "filter_proposals: num_anchors_per_level sums to "
            f"{sum(num_anchors_per_level)}, not R={R}"
        )
    device = proposals.device
    objectness = objectness.detach().reshape(B, R)  # [B*R] -> [B, R]

    # level id of every anchor: [R] -> [B, R]
    levels = (
        torch.cat(
            [
                torch.full((n,), lvl, dtype=torch.int64, device=device)
                for lvl, n in enumerate(num_anchors_per_level)
            ]
        )
        .reshape(1, -1)
        .expand(B, R)
    )

    top_idx = top_n_per_level(objectness, num_anchors_per_level, pre_nms_top_n)  # [B, K]
    batch_idx = torch.arange(B, device=device)[:, None]  # [B, 1] broadcasts against [B, K]
    objectness = objectness[batch_idx, top_idx]  # [B, K]
    levels = levels[batch_idx, top_idx]  # [B, K]
    proposals = proposals[batch_idx, top_idx]  # [B, K, 4]
    probs = torch.sigmoid(objectness)

    final_boxes, final_scores = [], []
    for boxes, scores, lvl, size in zip(proposals, probs, levels, image_sizes):
        boxes = clip_boxes_to_image(boxes, (int(size[0]), int(size[1])))
        keep = remove_small_boxes(boxes, min_size)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = torch.where(scores >= score_thresh)[0]
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, nms_thresh)  # NMS independently per level
        keep = keep[: int(post_nms_top_n)]
        final_boxes.append(boxes[keep])
        final_scores.append(scores[keep])
    return final_boxes, final_scores


@full_precision
def select_proposals(
    objectness: Sequence[Tensor],
    deltas: Sequence[Tensor],
    anchors: Tensor,
    image_sizes: Sequence[tuple[int, int]],
    box_coder: BoxCoder | None = None,
    **filter_kwargs,
) -> tuple[list[Tensor], list[Tensor]]:
    """The whole inference path from the head's raw outputs to proposals and their scores.

    Args:
        objectness, deltas: the :class:`RPNHead` outputs (lists per level of ``[B, A, h, w]`` and
            ``[B, 4A, h, w]``).
        anchors: ``[R, 4]`` from ``AnchorGenerator`` (shared by the images of the batch).
        image_sizes: ``(h, w)`` per image.
        box_coder: default ``BoxCoder((1, 1, 1, 1))``.
        **filter_kwargs: ``pre_nms_top_n``, ``post_nms_top_n``, ``nms_thresh``, ``score_thresh``,
            ``min_size`` of :func:`filter_proposals`.

    Returns:
        ``(boxes, scores)`` lists per image of ``[P_i, 4]`` and ``[P_i]``.
    """
    box_coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
    B = objectness[0].shape[0]
    num_anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
    if sum(num_anchors_per_level) != anchors.shape[0]:
        raise ValueError(
            f"select_proposals: the head predicts {sum(num_anchors_per_level)} anchors per image "
            f"but anchors has {anchors.shape[0]} rows (check sizes/aspect ratios against "
            "num_anchors)"
        )
    obj, reg = concat_box_prediction_layers(objectness, deltas)  # [B*R], [B*R, 4]
    # the same anchors for every image: [R, 4] -> [B*R, 4]
    proposals = box_coder.decode(reg.detach(), anchors.repeat(B, 1)).view(B, -1, 4)
    return filter_proposals(proposals, obj, image_sizes, num_anchors_per_level, **filter_kwargs)


# ---------------------------------------------------------------------------------- the module
class RegionProposalNetwork(nn.Module):
    """Anchors + head + matching/sampling + loss + proposal selection.

    Args:
        anchor_generator: an ``AnchorGenerator`` with one level per feature map.
        head: an :class:`RPNHead` (``num_anchors`` = the generator's anchors per location).
        fg_iou_thresh, bg_iou_thresh: Matcher thresholds (0.7 / 0.3, section 3.1.2).
        batch_size_per_image, positive_fraction: sampler (256 anchors, up to 1:1).
        pre_nms_top_n, post_nms_top_n: dicts with ``training`` and ``testing`` counts (None:
            ``{"training": 2000, "testing": 1000}``); ``self.training`` (``.train()`` /
            ``.eval()``) chooses between them, and that is all the mode changes.
        nms_thresh: IoU of the per-level NMS.
        score_thresh: minimum sigmoid score of a proposal.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: Mapping[str, int] | None = None,
        post_nms_top_n: Mapping[str, int] | None = None,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
    ) -> None:
        super().__init__()
        default = {"training": 2000, "testing": 1000}  # Faster R-CNN / torchvision with FPN
        pre_nms_top_n = dict(default if pre_nms_top_n is None else pre_nms_top_n)
        post_nms_top_n = dict(default if post_nms_top_n is None else post_nms_top_n)
        for name, d in (("pre_nms_top_n", pre_nms_top_n), ("post_nms_top_n", post_nms_top_n)):
            if set(d) != {"training", "testing"}:
                raise ValueError(
                    f"RegionProposalNetwork: {name} needs keys 'training' and 'testing', "
                    f"got {sorted(d)}"
                )
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.proposal_matcher = Matcher(
            fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True
        )
        self.fg_bg_sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = pre_nms_top_n
        self._post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = 1e-3

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def assign_targets_to_anchors(
        self, anchors: Tensor | Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Labels and matched gt boxes per image (see :func:`label_anchors`).

        Args:
            anchors: ``[R, 4]`` shared by all images, or a list per image of ``[R, 4]``.
            targets: list per image of dicts with ``"boxes"`` ``[G_i, 4]``.

        Returns:
            ``(labels, matched_gt_boxes)``: lists per image of ``[R]`` float32 and ``[R, 4]``.
        """
        if isinstance(anchors, Tensor):
            anchors = [anchors] * len(targets)
        if len(anchors) != len(targets):
            raise ValueError(
                f"assign_targets_to_anchors: {len(anchors)} images of anchors but "
                f"{len(targets)} targets"
            )
        labels, matched = [], []
        for i, (anchors_i, target) in enumerate(zip(anchors, targets)):
            if "boxes" not in target:
                raise KeyError(
                    f"RegionProposalNetwork: targets[{i}] has no 'boxes' field "
                    f"(keys: {sorted(target)})"
                )
            lab, gt = label_anchors(anchors_i, target["boxes"], self.proposal_matcher)
            labels.append(lab)
            matched.append(gt)
        return labels, matched

    def forward(
        self,
        images: Tensor,
        image_sizes: Sequence[tuple[int, int]],
        features: Sequence[Tensor] | Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals for every image, and the RPN losses when ``targets`` are given.

        Args:
            images: ``[B, 3, H, W]`` padded batch (only its size is used).
            image_sizes: ``(h_i, w_i)`` of every image inside the padded batch.
            features: list or (ordered) dict of ``[B, C, h_l, w_l]``, one per anchor level.
            targets: optional list per image of dicts with ``"boxes"`` ``[G_i, 4]`` float.
            generator: optional ``torch.Generator`` for the anchor sampling.

        Returns:
            ``(proposals, losses)``: list per image of ``[P_i, 4]`` proposals (best first) and
            ``{"loss_objectness", "loss_rpn_box_reg"}`` (empty dict when ``targets`` is None).
        """
        if isinstance(features, Mapping):
            features = list(features.values())
        features = list(features)
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"RegionProposalNetwork: images must be a [B, 3, H, W] padded batch, got {shape}"
            )
        B = images.shape[0]
        if len(image_sizes) != B:
            raise ValueError(
                f"RegionProposalNetwork: {len(image_sizes)} image_sizes for a batch of {B} images"
            )
        if len(features) != self.anchor_generator.num_levels:
            raise ValueError(
                f"RegionProposalNetwork: {len(features)} feature levels but the anchor generator "
                f"has {self.anchor_generator.num_levels}"
            )
        for level, f in enumerate(features):
            if f.dim() != 4 or f.shape[0] != B:
                raise ValueError(
                    f"RegionProposalNetwork: features[{level}] must be [B={B}, C, h, w], "
                    f"got {tuple(f.shape)}"
                )
        if targets is not None and len(targets) != B:
            raise ValueError(
                f"RegionProposalNetwork: {len(targets)} targets for a batch of {B} images"
            )

        objectness, deltas = self.head(features)
        # under torch.autocast the head's outputs are float16 / bfloat16, but the anchors, the
        # decoded proposals, NMS and the loss are float32 (the functions below upcast)
        dtype = features[0].dtype
        anchors = self.anchor_generator(
            tuple(images.shape[-2:]),
            [f.shape[-2:] for f in features],
            dtype=torch.float32 if dtype in LOW_PRECISION else dtype,
            device=features[0].device,
        )  # [R, 4], the same for every image
        num_anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        if sum(num_anchors_per_level) != anchors.shape[0]:
            raise ValueError(
                f"RegionProposalNetwork: the head predicts {sum(num_anchors_per_level)} anchors "
                f"per image but the generator made {anchors.shape[0]}; head.num_anchors must equal "
                f"{self.anchor_generator.num_anchors_per_location()}"
            )
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # [B*R], [B*R, 4]
        # no gradient through the proposals (Faster R-CNN approximate joint training)
        proposals = self.box_coder.decode(deltas.detach(), anchors.repeat(B, 1)).view(B, -1, 4)
        boxes, _scores = filter_proposals(
            proposals,
            objectness,
            image_sizes,
            num_anchors_per_level,
            pre_nms_top_n=self.pre_nms_top_n(),
            post_nms_top_n=self.post_nms_top_n(),
            nms_thresh=self.nms_thresh,
            score_thresh=self.score_thresh,
            min_size=self.min_size,
        )

        losses: dict[str, Tensor] = {}
        if targets is not None:
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = [
                self.box_coder.encode(gt.to(anchors.dtype), anchors) for gt in matched_gt_boxes
            ]
            pos_masks, neg_masks = self.fg_bg_sampler(labels, generator=generator)
            loss_objectness, loss_rpn_box_reg = rpn_loss(
                objectness, deltas, labels, regression_targets, pos_masks, neg_masks
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses

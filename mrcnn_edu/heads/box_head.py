"""The Fast R-CNN box head: layers, training targets, loss and detections.

Explained in notebook ``05_box_head.ipynb``. Mask R-CNN (He et al. 2017, section 3) keeps the
second stage of Faster R-CNN for boxes: every RoI is pooled to a ``C x 7 x 7`` feature
(``mrcnn_edu.ops.roi_align``), a small network turns it into one vector, and two sibling
linear layers (Fast R-CNN, Girshick 2015, section 2) predict

* ``C + 1`` class scores (``C`` object classes plus background, index 0), and
* ``4 (C + 1)`` box deltas, one ``(t_x, t_y, t_w, t_h)`` set per class ("class-specific
  bounding-box regression", Fast R-CNN section 2.2; the background set is never trained).

The pieces, in the order a notebook meets them:

1. **Layers**: :class:`TwoMLPHead` (two 1024-d fully connected layers, the FPN head of Mask
   R-CNN figure 4, right), :class:`ConvFCHead` (four 3x3 convs + one fc, torchvision's "v2"
   head) and :class:`FastRCNNPredictor` (the two siblings).
2. **Targets** (:func:`sample_proposals`, Fast R-CNN section 2.3 "Mini-batch sampling", Mask
   R-CNN section 3.1 "Training"): the ground-truth boxes are appended to the proposals, each
   proposal is matched to the gt box it overlaps most; IoU ``>= 0.5`` is a positive with that
   box's class, ``< 0.5`` background; 512 RoIs per image are sampled, at most 25 % positive.
   Positives regress to their gt box, encoded with weights ``(10, 10, 5, 5)``.
3. **Loss** (:func:`box_loss`, Fast R-CNN eqn. (1)): ``L = L_cls + [u >= 1] L_loc``, cross-
   entropy over the ``C + 1`` classes plus smooth L1 on the gt class's deltas of the positives.
4. **Detections** (:func:`postprocess_detections`, Mask R-CNN section 3.1 "Inference"): softmax,
   decode every class's box, clip, score threshold, per-class NMS at IoU 0.5, keep 100.

Every piece equals torchvision 0.29's (``roi_heads.py``, ``faster_rcnn.py``): same parameter
names (so torchvision checkpoints load), same sampled RoIs after the same ``torch.manual_seed``,
same losses and detections (``tests/test_box_head.py``).

Mixed precision: under ``torch.autocast`` the layers run in float16 / bfloat16, while the targets
(matching, sampling, encoding), the loss and the detections (decoding, softmax, NMS) run in float32
with autocast off: they upcast their float16 / bfloat16 inputs (the logits included) with
``mrcnn_edu.utils.full_precision``, so losses, boxes and scores are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..boxes import BoxCoder, clip_boxes_to_image, remove_small_boxes
from ..matching import BalancedSampler, Matcher, add_gt_proposals, match_targets
from ..ops import batched_nms
from ..utils import full_precision

__all__ = [
    "ConvFCHead",
    "FastRCNNPredictor",
    "TwoMLPHead",
    "box_loss",
    "default_box_coder",
    "default_proposal_matcher",
    "default_roi_sampler",
    "label_proposals",
    "postprocess_detections",
    "sample_proposals",
]


# ------------------------------------------------------------------------------ defaults
def default_proposal_matcher() -> Matcher:
    """``Matcher(0.5, 0.5)``: IoU >= 0.5 foreground, < 0.5 background, no low-quality matches."""
    return Matcher(0.5, 0.5, allow_low_quality_matches=False)


def default_roi_sampler() -> BalancedSampler:
    """``BalancedSampler(512, 0.25)``: 512 RoIs per image, at most 25 % positive."""
    return BalancedSampler(512, 0.25)


def default_box_coder() -> BoxCoder:
    """``BoxCoder((10, 10, 5, 5))``: the box head's delta weights (Detectron, torchvision)."""
    return BoxCoder((10.0, 10.0, 5.0, 5.0))


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


# ---------------------------------------------------------------------------------- layers
class TwoMLPHead(nn.Module):
    """Flatten the pooled RoI features, then fc6 + ReLU, fc7 + ReLU (Mask R-CNN figure 4, right).

    Args:
        in_channels: the FLATTENED size of one pooled feature, ``C * 7 * 7`` (as torchvision's
            ``TwoMLPHead``, e.g. ``256 * 7 * 7`` for FPN features pooled to 7x7).
        representation_size: width of both layers (1024 in the paper).

    Shapes: ``[K, C, 7, 7]`` -> flatten -> ``[K, C * 49]`` -> ``[K, 1024]``. Parameter names
    ``fc6.*``, ``fc7.*`` are torchvision's.
    """

    def __init__(self, in_channels: int, representation_size: int = 1024) -> None:
        super().__init__()
        if int(in_channels) <= 0 or int(representation_size) <= 0:
            raise ValueError(
                f"TwoMLPHead: in_channels and representation_size must be positive, got "
                f"{in_channels}, {representation_size}"
            )
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.in_channels = int(in_channels)
        self.out_channels = int(representation_size)

    def forward(self, x: Tensor) -> Tensor:
        """``[K, C, h, w]`` (or ``[K, C*h*w]``) pooled features -> ``[K, representation_size]``."""
        if not isinstance(x, Tensor) or x.dim() < 2 or math.prod(x.shape[1:]) != self.in_channels:
            raise ValueError(
                f"TwoMLPHead: expected [K, C, h, w] features with C*h*w = in_channels = "
                f"{self.in_channels}, got {_shape(x)}"
            )
        x = x.flatten(start_dim=1)  # [K, C, h, w] -> [K, C*h*w]
        x = F.relu(self.fc6(x))
        return F.relu(self.fc7(x))


class ConvFCHead(nn.Sequential):
    """Convs then fully connected layers on pooled RoI features (torchvision's v2 box head).

    ``len(conv_dims)`` blocks of 3x3 conv (+ BatchNorm) + ReLU, then flatten, then
    ``len(fc_dims)`` blocks of Linear + ReLU. This is the "4conv1fc" head of the FPN paper's
    follow-ups that torchvision's ``fasterrcnn_resnet50_fpn_v2`` / ``maskrcnn_resnet50_fpn_v2``
    use (``FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)``).

    Args:
        in_channels: ``C`` of the pooled features.
        resolution: their height and width (7).
        conv_dims: output channels of each conv block.
        fc_dims: output width of each fully connected block.
        norm: ``"bn"`` (BatchNorm2d after each conv, conv without bias) or ``None``.

    Parameter names are torchvision's: conv block ``i`` is ``i.0`` (conv), ``i.1`` (BatchNorm,
    when ``norm="bn"``); then ``len(conv_dims)`` is the Flatten and the Linear layers sit at
    ``len(conv_dims) + 1``, ``+ 3``, ... (each followed by its ReLU). A v2 checkpoint's
    ``roi_heads.box_head.*`` entries load directly.

    Shapes: ``[K, C, r, r]`` -> ``[K, conv_dims[-1], r, r]`` -> ``[K, fc_dims[-1]]``.
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int = 7,
        conv_dims: Sequence[int] = (256, 256, 256, 256),
        fc_dims: Sequence[int] = (1024,),
        norm: str | None = "bn",
    ) -> None:
        if norm not in ("bn", None):
            raise ValueError(f"ConvFCHead: norm must be 'bn' or None, got {norm!r}")
        if int(in_channels) <= 0 or int(resolution) <= 0:
            raise ValueError(
                f"ConvFCHead: in_channels and resolution must be positive, got {in_channels}, "
                f"{resolution}"
            )
        blocks: list[nn.Module] = []
        previous = int(in_channels)
        for dim in conv_dims:
            blocks.append(_conv_norm_relu(previous, int(dim), dilation=1, norm=norm))
            previous = int(dim)
        blocks.append(nn.Flatten())  # [K, c, r, r] -> [K, c*r*r]
        previous = previous * int(resolution) ** 2
        for dim in fc_dims:
            blocks.append(nn.Linear(previous, int(dim)))
            blocks.append(nn.ReLU(inplace=True))
            previous = int(dim)
        super().__init__(*blocks)
        _init_convs(self)
        self.in_channels = int(in_channels)
        self.resolution = int(resolution)
        self.out_channels = previous

    def forward(self, x: Tensor) -> Tensor:
        """``[K, C, r, r]`` pooled features -> ``[K, fc_dims[-1]]``."""
        r = self.resolution
        if (
            not isinstance(x, Tensor)
            or x.dim() != 4
            or tuple(x.shape[1:]) != (self.in_channels, r, r)
        ):
            raise ValueError(
                f"ConvFCHead: expected [K, {self.in_channels}, {r}, {r}] features, got {_shape(x)}"
            )
        return super().forward(x)


def _conv_norm_relu(in_ch: int, out_ch: int, dilation: int, norm: str | None) -> nn.Sequential:
    """3x3 conv (+ BatchNorm) + ReLU as an ``nn.Sequential`` whose children are numbered like
    torchvision's ``Conv2dNormActivation``: ``0`` conv, ``1`` BatchNorm (if any), then ReLU.
    The conv has a bias only without a norm (BatchNorm's own bias makes it redundant)."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_ch,
            out_ch,
            kernel_size=3,
            stride=1,
            padding=dilation,
            dilation=dilation,
            bias=norm is None,
        )
    ]
    if norm == "bn":
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _init_convs(module: nn.Module) -> None:
    """He initialisation (``kaiming_normal_``, fan_out, ReLU) and zero bias for every conv, as
    torchvision's ``FastRCNNConvFCHead`` and ``MaskRCNNHeads``; Linear layers keep PyTorch's
    default init (torchvision does the same)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class FastRCNNPredictor(nn.Module):
    """The two sibling output layers of Fast R-CNN (section 2, figure 1).

    Args:
        in_channels: width of the head's output vector (1024).
        num_classes: number of classes INCLUDING background (index 0), e.g. 91 for COCO in
            torchvision's numbering, 2 for one object class.

    ``cls_score``: ``[K, in_channels]`` -> ``[K, num_classes]`` logits; ``bbox_pred``:
    ``[K, in_channels]`` -> ``[K, 4 * num_classes]`` class-specific deltas (columns
    ``4c .. 4c + 3`` are class ``c``'s ``(t_x, t_y, t_w, t_h)``). Parameter names and default
    init are torchvision's ``FastRCNNPredictor``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if int(in_channels) <= 0 or int(num_classes) < 1:
            raise ValueError(
                f"FastRCNNPredictor: need in_channels > 0 and num_classes >= 1 (background "
                f"included), got {in_channels}, {num_classes}"
            )
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[K, D]`` (or ``[K, D, 1, 1]``) -> ``(class_logits [K, C+1], box_regression
        [K, 4 (C+1)])``."""
        ok = isinstance(x, Tensor) and (
            (x.dim() == 2 and x.shape[1] == self.in_channels)
            or (x.dim() == 4 and tuple(x.shape[1:]) == (self.in_channels, 1, 1))
        )
        if not ok:
            raise ValueError(
                f"FastRCNNPredictor: expected [K, {self.in_channels}] (or "
                f"[K, {self.in_channels}, 1, 1]) features, got {_shape(x)}"
            )
        x = x.flatten(start_dim=1)  # [K, D, 1, 1] -> [K, D]
        return self.cls_score(x), self.bbox_pred(x)


# ------------------------------------------------------------------------- training targets
@full_precision
def label_proposals(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, matcher: Matcher
) -> tuple[Tensor, Tensor]:
    """Match one image's proposals to its ground truth and give each a class label.

    Args:
        proposals: ``[P, 4]`` float (x1, y1, x2, y2), gt boxes already appended.
        gt_boxes: ``[G, 4]`` float; ``G`` may be 0.
        gt_labels: ``[G]`` integer classes (1 .. C).
        matcher: e.g. :func:`default_proposal_matcher` (IoU 0.5 / 0.5).

    Returns:
        ``(matched_idxs [P] int64, labels [P] int64)``: ``matched_idxs`` is the matched gt
        index, clamped to ``>= 0`` (background and ignored proposals point at gt 0, a box the
        loss never looks at; all 0 when ``G == 0``), as torchvision's
        ``assign_targets_to_proposals``. ``labels`` is the gt class for a match, 0 for
        background (``Matcher.BELOW_LOW_THRESHOLD``), -1 for ignored
        (``Matcher.BETWEEN_THRESHOLDS``; never with 0.5 / 0.5).
    """
    matched = match_targets(proposals, gt_boxes, matcher)  # [P], gt index or -1 / -2
    if gt_boxes.shape[0] == 0:  # background image: every proposal is background
        zeros = torch.zeros((proposals.shape[0],), dtype=torch.int64, device=proposals.device)
        return zeros, zeros.clone()
    clamped = matched.clamp(min=0)
    labels = gt_labels[clamped].to(torch.int64)  # [G] -> [P]
    labels[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
    labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1  # the sampler skips -1
    return clamped, labels


def _check_targets(proposals, gt_boxes, gt_labels, fn: str) -> None:
    if isinstance(proposals, Tensor) or isinstance(gt_boxes, Tensor):
        raise TypeError(f"{fn}: proposals and gt_boxes must be lists of per-image tensors")
    if not (len(proposals) == len(gt_boxes) == len(gt_labels)):
        raise ValueError(
            f"{fn}: got {len(proposals)} images of proposals, {len(gt_boxes)} of gt_boxes and "
            f"{len(gt_labels)} of gt_labels"
        )
    for i, (p, b, lab) in enumerate(zip(proposals, gt_boxes, gt_labels)):
        for name, t in (("proposals", p), ("gt_boxes", b)):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != 4:
                raise ValueError(
                    f"{fn}: {name}[{i}] must be [N, 4] (x1, y1, x2, y2), got {_shape(t)}"
                )
            if not t.is_floating_point():
                raise TypeError(f"{fn}: {name}[{i}] must be floating point, got {t.dtype}")
        if not isinstance(lab, Tensor) or lab.dim() != 1 or lab.shape[0] != b.shape[0]:
            raise ValueError(
                f"{fn}: gt_labels[{i}] must be [G] with G = {b.shape[0]} (as gt_boxes[{i}]), got "
                f"{_shape(lab)}"
            )
        if lab.is_floating_point() or lab.dtype == torch.bool:
            raise TypeError(f"{fn}: gt_labels[{i}] must be an integer tensor, got {lab.dtype}")


@full_precision
def sample_proposals(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    matcher: Matcher | None = None,
    sampler: BalancedSampler | None = None,
    box_coder: BoxCoder | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Choose the RoIs the box head trains on, with their labels and regression targets.

    Fast R-CNN section 2.3 / Mask R-CNN section 3.1; torchvision's
    ``RoIHeads.select_training_samples``, step by step:

    1. append each image's gt boxes to its proposals (``matching.add_gt_proposals``), so every
       object has at least one perfect positive;
    2. match and label (:func:`label_proposals`): IoU ``>= 0.5`` -> the gt box's class,
       ``< 0.5`` -> background 0;
    3. sample ``batch_size_per_image`` (512) RoIs per image, at most ``positive_fraction``
       (25 %) positive (``matching.BalancedSampler``), kept in increasing index order;
    4. encode each sampled RoI's matched gt box as deltas (``BoxCoder((10, 10, 5, 5))``). An
       image without gt has a zero box as its "match" (as torchvision), so its targets hold
       ``-inf`` in ``t_w, t_h`` (``log 0``); its RoIs are all background, and the loss reads
       the targets of positives only.

    Args:
        proposals: list per image of ``[P_i, 4]`` float proposals (x1, y1, x2, y2).
        gt_boxes: list per image of ``[G_i, 4]`` float gt boxes (cast to the proposals' dtype).
        gt_labels: list per image of ``[G_i]`` integer classes (1 .. C).
        matcher: default :func:`default_proposal_matcher` (0.5 / 0.5).
        sampler: default :func:`default_roi_sampler` (512, 0.25).
        box_coder: default :func:`default_box_coder` (weights 10, 10, 5, 5).
        generator: ``torch.Generator`` for the sampler's draws; ``None`` draws from torch's
            global RNG exactly as torchvision does.

    Returns:
        ``(proposals, matched_idxs, labels, regression_targets)``, lists per image of the
        ``S_i`` sampled RoIs: ``[S_i, 4]`` boxes, ``[S_i]`` int64 matched gt index (clamped to
        ``>= 0``, 0 for background), ``[S_i]`` int64 labels (0 = background), ``[S_i, 4]``
        deltas.
    """
    fn = "sample_proposals"
    _check_targets(proposals, gt_boxes, gt_labels, fn)
    if len(proposals) == 0:
        return [], [], [], []
    matcher = matcher if matcher is not None else default_proposal_matcher()
    sampler = sampler if sampler is not None else default_roi_sampler()
    box_coder = box_coder if box_coder is not None else default_box_coder()
    dtype, device = proposals[0].dtype, proposals[0].device
    gt_boxes = [b.to(dtype) for b in gt_boxes]

    proposals = add_gt_proposals(proposals, gt_boxes)  # [P_i + G_i, 4] per image
    matched_idxs, labels = [], []
    for p, b, lab in zip(proposals, gt_boxes, gt_labels):
        m, lab = label_proposals(p, b, lab, matcher)
        matched_idxs.append(m)
        labels.append(lab)

    pos_masks, neg_masks = sampler(labels, generator=generator)
    matched_gt_boxes = []
    for i, (pos, neg) in enumerate(zip(pos_masks, neg_masks)):
        keep = torch.where(pos | neg)[0]  # sampled indices, increasing
        proposals[i], labels[i], matched_idxs[i] = (
            proposals[i][keep],
            labels[i][keep],
            matched_idxs[i][keep],
        )
        boxes_i = gt_boxes[i]
        if boxes_i.shape[0] == 0:  # no gt: index 0 of a single zero box
            boxes_i = torch.zeros((1, 4), dtype=dtype, device=device)
        matched_gt_boxes.append(boxes_i[matched_idxs[i]])  # [S_i, 4]
    regression_targets = list(box_coder.encode_batch(matched_gt_boxes, proposals))
    return proposals, matched_idxs, labels, regression_targets


# -------------------------------------------------------------------------------------- loss
@full_precision
def box_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Sequence[Tensor] | Tensor,
    regression_targets: Sequence[Tensor] | Tensor,
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN multi-task loss, eqn. (1), on the sampled RoIs (pure function).

    ``L(p, u, t^u, v) = L_cls(p, u) + [u >= 1] L_loc(t^u, v)``: cross-entropy of the class
    logits against the label ``u`` (0 = background) averaged over all ``K`` RoIs, plus smooth L1
    (``beta = 1/9``, as Detectron and torchvision) between the deltas ``t^u`` predicted FOR THE
    GT CLASS ``u`` and the target ``v``, summed over the positives and divided by ``K`` (not by
    the number of positives): torchvision's ``fastrcnn_loss``.

    Args:
        class_logits: ``[K, C+1]`` logits.
        box_regression: ``[K, 4 (C+1)]`` class-specific deltas.
        labels: ``[K]`` int64 (or a list per image, concatenated in order), 0 = background.
        regression_targets: ``[K, 4]`` (or a list per image).

    Returns:
        ``(loss_classifier, loss_box_reg)`` scalars. No positives: ``loss_box_reg`` is 0; no
        RoIs at all (``K == 0``): both are 0, still connected to the graph.
    """
    fn = "box_loss"
    if not isinstance(labels, Tensor):
        labels = torch.cat(list(labels), dim=0)
    if not isinstance(regression_targets, Tensor):
        regression_targets = torch.cat(list(regression_targets), dim=0)
    if not isinstance(class_logits, Tensor) or class_logits.dim() != 2:
        raise ValueError(f"{fn}: class_logits must be [K, C+1], got {_shape(class_logits)}")
    K, num_classes = class_logits.shape
    for name, t, want in (
        ("box_regression", box_regression, (K, 4 * num_classes)),
        ("labels", labels, (K,)),
        ("regression_targets", regression_targets, (K, 4)),
    ):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{fn}: {name} must be {want} for class_logits {tuple(class_logits.shape)}, got "
                f"{tuple(t.shape)}"
            )
    if labels.is_floating_point():
        raise TypeError(f"{fn}: labels must be an integer tensor, got {labels.dtype}")
    if K == 0:  # nothing sampled: zero losses that still backpropagate
        return class_logits.sum() * 0, box_regression.sum() * 0
    labels = labels.to(torch.int64)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"{fn}: labels must lie in [0, {num_classes}) (ignored RoIs, -1, are never "
            f"sampled), got range [{int(labels.min())}, {int(labels.max())}]"
        )

    loss_classifier = F.cross_entropy(class_logits, labels)

    pos = torch.where(labels > 0)[0]  # [K_pos]
    labels_pos = labels[pos]
    box_regression = box_regression.reshape(K, num_classes, 4)  # [K, 4(C+1)] -> [K, C+1, 4]
    loss_box_reg = (
        F.smooth_l1_loss(
            box_regression[pos, labels_pos],  # each positive's deltas for its gt class: [K_pos, 4]
            regression_targets[pos],
            beta=1 / 9,
            reduction="sum",
        )
        / labels.numel()
    )
    return loss_classifier, loss_box_reg


# -------------------------------------------------------------------------------- detections
@full_precision
def postprocess_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    box_coder: BoxCoder | None = None,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """From the predictor's outputs to final detections (Mask R-CNN section 3.1, "Inference").

    Per image: softmax over the classes; decode every RoI into one box per class; clip to the
    image; drop the background column; treat every (RoI, class) pair as one candidate; keep
    scores ``> score_thresh``; drop boxes with a side ``< min_size``; NMS at ``nms_thresh``
    independently per class (``mrcnn_edu.ops.batched_nms``); keep the ``detections_per_img``
    best. Equal to torchvision's ``RoIHeads.postprocess_detections``.

    Args:
        class_logits: ``[K, C+1]``, ``K = sum_i P_i``, images concatenated in order.
        box_regression: ``[K, 4 (C+1)]``.
        proposals: list per image of ``[P_i, 4]`` boxes the deltas refer to.
        image_sizes: ``(h, w)`` per image.
        box_coder: default :func:`default_box_coder` (10, 10, 5, 5).
        score_thresh, nms_thresh, detections_per_img, min_size: torchvision's defaults.

    Returns:
        ``(boxes, scores, labels)``: lists per image of ``[D_i, 4]`` float, ``[D_i]`` float
        softmax scores (best first) and ``[D_i]`` int64 classes in ``1 .. C``.
    """
    fn = "postprocess_detections"
    if isinstance(proposals, Tensor):
        raise TypeError(f"{fn}: proposals must be a list of [P_i, 4] tensors, one per image")
    if len(image_sizes) != len(proposals):
        raise ValueError(
            f"{fn}: {len(image_sizes)} image sizes for {len(proposals)} images of proposals"
        )
    if not isinstance(class_logits, Tensor) or class_logits.dim() != 2:
        raise ValueError(f"{fn}: class_logits must be [K, C+1], got {_shape(class_logits)}")
    K, num_classes = class_logits.shape
    boxes_per_image = [int(p.shape[0]) for p in proposals]
    if sum(boxes_per_image) != K:
        raise ValueError(
            f"{fn}: class_logits has {K} rows but the proposals hold {sum(boxes_per_image)} boxes"
        )
    if not isinstance(box_regression, Tensor) or tuple(box_regression.shape) != (
        K,
        4 * num_classes,
    ):
        raise ValueError(
            f"{fn}: box_regression must be {(K, 4 * num_classes)}, got {_shape(box_regression)}"
        )
    box_coder = box_coder if box_coder is not None else default_box_coder()
    device = class_logits.device

    pred_boxes = box_coder.decode_batch(box_regression, proposals)  # [K, C+1, 4]
    pred_scores = F.softmax(class_logits, dim=-1)  # [K, C+1]

    all_boxes, all_scores, all_labels = [], [], []
    for boxes, scores, size in zip(
        pred_boxes.split(boxes_per_image, 0), pred_scores.split(boxes_per_image, 0), image_sizes
    ):
        boxes = clip_boxes_to_image(boxes, (int(size[0]), int(size[1])))  # [P, C+1, 4]
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
        # drop background, then every (RoI, class) pair is one candidate:
        # [P, C, 4] -> [P*C, 4], [P, C] -> [P*C]
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)

        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = remove_small_boxes(boxes, min_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh)  # per class, best first
        keep = keep[: int(detections_per_img)]
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels

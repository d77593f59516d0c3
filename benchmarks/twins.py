"""torchvision's own detection classes built with the same widths as an mrcnn_edu config.

The speed and accuracy benchmarks compare ``mrcnn_edu`` with torchvision *on the same network*:
:func:`torchvision_twin` builds torchvision's ``MaskRCNN`` / ``FasterRCNN`` / ``KeypointRCNN``
from the same ``ModelConfig`` (ResNet depth and norm, FPN channels, anchors, head widths,
thresholds, image sizes), and :func:`copy_weights` loads the mrcnn_edu model's weights into it
through ``mrcnn_edu.weights``, so both compute the same function (``tests/test_twins.py``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import misc

from mrcnn_edu.backbone import RESNET_SPECS
from mrcnn_edu.config import ModelConfig
from mrcnn_edu.weights import to_torchvision_state_dict

_NORMS = {"frozen_bn": misc.FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


def torchvision_twin(cfg: ModelConfig) -> nn.Module:
    """torchvision's detector with ``cfg``'s architecture (FPN backbones only).

    ``roi_heads.mask_rois_per_image`` has no torchvision counterpart: the twin's mask and
    keypoint heads train on every positive RoI, as ``mask_rois_per_image=None`` does. Nor have
    ``keypoint_decoding="subpixel"`` and ``keypoint_rescore``: the twin decodes keypoints and
    scores detections as torchvision does (``"torchvision"``, ``False``)."""
    b, r, h, t = cfg.backbone, cfg.rpn, cfg.roi_heads, cfg.transform
    if b.kind != "resnet_fpn":
        raise ValueError("torchvision_twin: only resnet_fpn backbones have a torchvision twin")
    block, blocks = RESNET_SPECS[b.depth]  # torchvision's resnet{depth} blocks (and ResNet-10)
    body = resnet.ResNet(block, list(blocks), norm_layer=_NORMS[b.norm])
    # torchvision's _resnet_fpn_extractor, written out because it fixes 256 FPN channels
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][: b.trainable_layers]
    if b.trainable_layers == 5:
        layers.append("bn1")
    for name, p in body.named_parameters():
        if all(not name.startswith(x) for x in layers):
            p.requires_grad_(False)
    in_list = [body.inplanes // 8 * 2 ** (i - 1) for i in b.returned_layers]
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(b.returned_layers)}
    backbone = BackboneWithFPN(
        body,
        return_layers,
        in_list,
        b.fpn_channels,
        norm_layer=nn.BatchNorm2d if b.fpn_norm == "bn" else None,
    )
    C = backbone.out_channels
    anchors = AnchorGenerator(r.anchor_sizes, r.aspect_ratios)
    rpn_head = RPNHead(C, anchors.num_anchors_per_location()[0], conv_depth=r.conv_depth)
    R = h.box_resolution
    if h.box_head == "mlp":
        box_head = TwoMLPHead(C * R * R, h.representation_size)
    else:
        box_head = FastRCNNConvFCHead(
            (C, R, R),
            list(h.box_conv_dims),
            [h.representation_size],
            norm_layer=nn.BatchNorm2d if h.box_norm else None,
        )
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    names = [str(i) for i in range(len(b.returned_layers))]
    kwargs = dict(  # noqa: C408 - torchvision keyword names, read as keywords
        min_size=t.min_size,
        max_size=t.max_size,
        image_mean=list(t.image_mean),
        image_std=list(t.image_std),
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=r.pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=r.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=r.post_nms_top_n_train,
        rpn_post_nms_top_n_test=r.post_nms_top_n_test,
        rpn_nms_thresh=r.nms_thresh,
        rpn_fg_iou_thresh=r.fg_iou_thresh,
        rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image,
        rpn_positive_fraction=r.positive_fraction,
        rpn_score_thresh=r.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(names, R, h.sampling_ratio),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(h.representation_size, cfg.num_classes),
        box_score_thresh=h.score_thresh,
        box_nms_thresh=h.nms_thresh,
        box_detections_per_img=h.detections_per_img,
        box_fg_iou_thresh=h.fg_iou_thresh,
        box_bg_iou_thresh=h.bg_iou_thresh,
        box_batch_size_per_image=h.batch_size_per_image,
        box_positive_fraction=h.positive_fraction,
        bbox_reg_weights=h.bbox_reg_weights,
    )
    if h.keypoint:
        if h.mask:
            raise ValueError("torchvision_twin: torchvision has no model with masks and keypoints")
        return KeypointRCNN(
            backbone,
            keypoint_roi_pool=MultiScaleRoIAlign(names, h.keypoint_resolution, h.sampling_ratio),
            keypoint_head=KeypointRCNNHeads(C, list(h.keypoint_layers)),
            keypoint_predictor=KeypointRCNNPredictor(h.keypoint_layers[-1], h.num_keypoints),
            **kwargs,
        )
    if not h.mask:
        return FasterRCNN(backbone, **kwargs)
    mask_head = MaskRCNNHeads(
        C, list(h.mask_layers), h.mask_dilation, norm_layer=nn.BatchNorm2d if h.mask_norm else None
    )
    return MaskRCNN(
        backbone,
        mask_roi_pool=MultiScaleRoIAlign(names, h.mask_resolution, h.sampling_ratio),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(h.mask_layers[-1], h.mask_dim_reduced, cfg.num_classes),
        **kwargs,
    )


def copy_weights(ours: nn.Module, tv: nn.Module) -> None:
    """Load ``ours``' weights into its torchvision twin (strict)."""
    sd = to_torchvision_state_dict(ours)
    own = tv.state_dict()
    for k in own:  # num_batches_tracked of plain BN
        if k not in sd:
            sd[k] = own[k]
    tv.load_state_dict(sd, strict=True)


@torch.no_grad()
def same_function(ours: nn.Module, tv: nn.Module, images) -> float:
    """Max abs difference of the eval-mode boxes (a sanity check of the twin)."""
    ours.eval()
    tv.eval()
    a, _ = ours(images)
    b = tv(images)
    n = min(len(a[0]["boxes"]), len(b[0]["boxes"]))
    return float((a[0]["boxes"][:n] - b[0]["boxes"][:n]).abs().max()) if n else 0.0

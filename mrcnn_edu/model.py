"""Mask R-CNN assembled: transform -> backbone -> RPN -> RoI heads -> post-processing.

He, Gkioxari, Dollar, Girshick 2017, section 3: "Mask R-CNN adopts the same two-stage procedure
[as Faster R-CNN], with an identical first stage (which is RPN). In the second stage, in parallel
to predicting the class and box offset, Mask R-CNN also outputs a binary mask for each RoI."
Notebook ``07_fpn_full_model.ipynb`` builds it stage by stage; ``docs/ARCHITECTURE.md`` draws
the data flow with shapes.

The stages are passed into the constructor (no registry); :func:`build_model` translates a
:class:`mrcnn_edu.config.ModelConfig` into them. Unlike torchvision, ``forward`` always returns
``(detections, losses)``: losses whenever targets are given (in train or eval mode, so a
validation loss needs no mode switch), detections whenever the model is in eval mode (or when
``return_detections=True``). :meth:`MaskRCNN.run_stages` returns every intermediate result
(features, anchors' proposals, sampled RoIs, head logits) for notebooks and tests.

Given the same weights (``mrcnn_edu.weights``) it computes what torchvision's
``maskrcnn_resnet50_fpn`` computes: ``tests/test_model_equivalence.py``.

Mixed precision (``torch.autocast``, ``mrcnn_edu.engine.train(amp="bf16" | "fp16")``), as in
torchvision and detectron2: the layers (convs, linears) run in bfloat16 / float16, the geometry
in float32. The anchors are float32; box coding, IoU matching, NMS, RoI sampling, proposal
filtering, the losses, the post-processing and the mask pasting upcast their inputs and run with
autocast off (``mrcnn_edu.utils.full_precision``); the poolers take low-precision features with
float32 boxes. So losses and detections are float32 (``tests/test_amp.py``), and without
autocast nothing changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .anchors import AnchorGenerator
from .backbone import (
    Res5Head,
    ResNetC4Backbone,
    ResNetC5Backbone,
    resnet_fpn_backbone,
)
from .boxes import BoxCoder
from .config import ModelConfig
from .heads.box_head import (
    ConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
    box_loss,
    postprocess_detections,
    sample_proposals,
)
from .heads.keypoint_head import (
    KeypointHead,
    KeypointPredictor,
    keypoint_confidence,
    keypoint_decoder,
    keypoint_inference,
    keypoint_loss,
)
from .heads.mask_head import (
    MaskHead,
    MaskPredictor,
    mask_inference,
    mask_loss,
    paste_masks_in_image,
)
from .matching import BalancedSampler, Matcher
from .poolers import MultiLevelRoIPooler
from .rpn import RegionProposalNetwork, RPNHead
from .structures import Instances
from .transforms import (
    batch_images,
    postprocess_boxes,
    postprocess_keypoints,
    resize_boxes,
    resize_keypoints,
    resize_scale,
)
from .utils import full_precision

__all__ = ["ImageTransform", "MaskRCNN", "Res5BoxHead", "RoIHeads", "build_model"]


# ------------------------------------------------------------------------------ the transform
class ImageTransform(nn.Module):
    """Normalize, resize (sec. 3.1: shorter side 800, longer <= 1333) and batch the images.

    Equal to torchvision's ``GeneralizedRCNNTransform``: per image ``(x - mean) / std``, then a
    bilinear resize by ``scale = min(min_size / short, max_size / long)`` (targets' boxes scaled
    by the integer size ratio, masks by nearest neighbour), then zero padding into a
    ``[B, 3, H, W]`` batch with ``H, W`` multiples of ``size_divisible``.

    When training, one ``min_size`` is drawn per image from ``min_size`` (multi-scale training),
    with torch's global RNG exactly as torchvision draws it (``torch.empty(1).uniform_``), so the
    same seed gives the same sizes *and* leaves the RNG where torchvision leaves it.
    """

    def __init__(
        self,
        min_size: Sequence[int] = (800,),
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
    ):
        super().__init__()
        self.min_size = tuple(
            int(s) for s in (min_size if isinstance(min_size, Sequence) else (min_size,))
        )
        self.max_size = int(max_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.size_divisible = int(size_divisible)

    def _min_size(self) -> float:
        if not self.training:
            return float(self.min_size[-1])
        # torchvision's torch_choice: one uniform draw even when there is a single size
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return float(self.min_size[index])

    def resize(self, image: Tensor, target: dict | None) -> tuple[Tensor, dict | None]:
        """``[3, H, W]`` (normalized) -> ``[3, H', W']``; the target's boxes and masks follow."""
        H, W = image.shape[-2:]
        scale = resize_scale(H, W, self._min_size(), self.max_size)
        # [3, H, W] -> [1, 3, H, W] -> bilinear -> [3, H', W']
        image = F.interpolate(
            image[None],
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        if target is None:
            return image, None
        target = dict(target)
        if "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], (H, W), tuple(image.shape[-2:]))
        if "masks" in target:
            # [N, H, W] -> [N, 1, H, W] float -> nearest -> [N, H', W'] uint8
            target["masks"] = F.interpolate(
                target["masks"][:, None].float(), scale_factor=scale, recompute_scale_factor=True
            )[:, 0].byte()
        if "keypoints" in target:
            target["keypoints"] = resize_keypoints(
                target["keypoints"], (H, W), tuple(image.shape[-2:])
            )
        return image, target

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[dict] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]], list[dict] | None]:
        """``images``: list of ``[3, H_i, W_i]`` float in 0..1. Returns the padded batch
        ``[B, 3, H, W]``, the resized sizes ``(h_i, w_i)`` and the resized targets."""
        out_images, out_targets = [], [] if targets is not None else None
        for i, image in enumerate(images):
            mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
            std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
            image = (image - mean[:, None, None]) / std[:, None, None]
            image, target = self.resize(image, None if targets is None else targets[i])
            out_images.append(image)
            if out_targets is not None:
                out_targets.append(target)
        batch, image_sizes = batch_images(out_images, self.size_divisible)
        return batch, image_sizes, out_targets


# -------------------------------------------------------------------------- the C4 box head
class Res5BoxHead(nn.Module):
    """The C4 box head (Table 2, "ResNet-50-C4"): res5 on the 14x14 pooled RoI features, then
    global average pooling: ``[K, C4, 14, 14] -> res5 -> [K, C5, 7, 7] -> mean -> [K, C5]``.

    ``last_res5`` keeps the ``[K, C5, 7, 7]`` map of the last call: the C4 mask branch of the
    paper (figure 4, left) deconvolves it for the positive RoIs."""

    def __init__(self, res5: nn.Module) -> None:
        super().__init__()
        self.res5 = res5
        self.out_channels = res5.out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.res5(x)  # [K, C5, 7, 7]
        return x.mean(dim=(2, 3))  # [K, C5]


# ----------------------------------------------------------------------------- the RoI heads
class RoIHeads(nn.Module):
    """The second stage: box branch and (optionally) mask branch on pooled RoI features.

    Training (targets given): append the gt to the proposals, match (IoU 0.5) and sample 512
    RoIs per image, 25 % positive (:func:`mrcnn_edu.heads.box_head.sample_proposals`); pool
    ``box_resolution`` features, box head, :func:`box_loss`; pool ``mask_resolution`` features
    of the positive RoIs, mask head, :func:`mask_loss` on each RoI's gt class only (sec. 3,
    "L_mask is defined only on positive RoIs"; ``mask_rois_per_image`` caps them at a random
    subset per image, a speed setting for small CPU runs). Inference: softmax, per-class
    decode, NMS, top 100 (:func:`postprocess_detections`), then the mask branch on the
    detected boxes ("the mask branch is then applied to the highest scoring 100 detection
    boxes", sec. 3.1); likewise the keypoint branch, whose heatmaps become keypoints by
    ``keypoint_decoding`` (torchvision's by default, see
    :data:`mrcnn_edu.heads.keypoint_head.KEYPOINT_DECODINGS`). ``keypoint_rescore=True``
    (not torchvision's) multiplies each detection's score by the mean
    :func:`~mrcnn_edu.heads.keypoint_head.keypoint_confidence` of its heatmaps and re-sorts
    the detections by that score.

    The per-image bookkeeping travels in :class:`mrcnn_edu.structures.Instances`.
    """

    def __init__(
        self,
        box_pooler: MultiLevelRoIPooler,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        *,
        mask_pooler: MultiLevelRoIPooler | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: MaskPredictor | None = None,
        mask_loss_mode: str = "sigmoid",
        keypoint_pooler: MultiLevelRoIPooler | None = None,
        keypoint_head: nn.Module | None = None,
        keypoint_predictor: KeypointPredictor | None = None,
        keypoint_decoding: str = "torchvision",
        keypoint_rescore: bool = False,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        mask_rois_per_image: int | None = None,
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        if mask_loss_mode not in ("sigmoid", "softmax", "agnostic"):
            raise ValueError(
                f"RoIHeads: mask_loss_mode must be 'sigmoid', 'softmax' or "
                f"'agnostic', got {mask_loss_mode!r}"
            )
        self.box_roi_pool = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_roi_pool = mask_pooler
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.mask_loss_mode = mask_loss_mode
        if mask_rois_per_image is not None and (
            isinstance(mask_rois_per_image, bool)
            or not isinstance(mask_rois_per_image, int)
            or mask_rois_per_image < 1
        ):
            raise ValueError(
                "RoIHeads: mask_rois_per_image must be None (all positive RoIs) or a "
                f"positive int, got {mask_rois_per_image!r}"
            )
        self.mask_rois_per_image = mask_rois_per_image
        self.keypoint_roi_pool = keypoint_pooler
        self.keypoint_head = keypoint_head
        self.keypoint_predictor = keypoint_predictor
        keypoint_decoder(keypoint_decoding, "RoIHeads", "keypoint_decoding")  # a known name
        if not isinstance(keypoint_rescore, bool):
            raise TypeError(f"RoIHeads: keypoint_rescore must be a bool, got {keypoint_rescore!r}")
        self.keypoint_decoding = keypoint_decoding
        self.keypoint_rescore = keypoint_rescore
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, False)
        self.fg_bg_sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(tuple(bbox_reg_weights))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    @property
    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    @property
    def has_keypoint(self) -> bool:
        return self.keypoint_predictor is not None

    def _head_positives(self, sampled: Instances, generator: torch.Generator | None) -> Instances:
        """The positive RoIs of one image that train the mask and keypoint branches: all of
        them, or a random ``mask_rois_per_image`` of them (drawn with ``generator``, as the
        box sampler's draws, so a resumed run draws the same)."""
        pos = sampled[sampled.gt_labels > 0]
        k = self.mask_rois_per_image
        if k is None or len(pos) <= k:
            return pos
        keep = BalancedSampler._randperm(len(pos), sampled.gt_labels.device, generator)[:k]
        return pos[keep]

    def _keypoint_logits(self, features, boxes: list[Tensor], image_sizes) -> Tensor:
        x = self.keypoint_roi_pool(features, boxes, image_sizes)  # [P, C, 14, 14]
        return self.keypoint_predictor(self.keypoint_head(x))  # [P, K, 56, 56]

    def _pooling_layout(self, features: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The Numba CPU RoI kernels read NHWC: convert each level once here, not once per
        pooler call (the box and mask branches pool the same levels)."""
        if self.box_roi_pool.backend not in ("auto", "numba"):
            return features
        out = OrderedDict()
        for name, f in features.items():
            if f.device.type == "cpu" and f.dim() == 4 and name in self.box_roi_pool.featmap_names:
                f = f.contiguous(memory_format=torch.channels_last)  # free if already NHWC
            out[name] = f
        return out

    def _mask_features(self, features, boxes: list[Tensor], image_sizes) -> Tensor:
        x = self.mask_roi_pool(features, boxes, image_sizes)  # [P, C, 14, 14]
        if self.mask_head is not None:
            x = self.mask_head(x)
        return self.mask_predictor(x)  # [P, num_classes (or 1), 28, 28]

    def forward(
        self,
        features: Mapping[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict] | None = None,
        *,
        return_detections: bool = True,
        generator: torch.Generator | None = None,
        stages: dict | None = None,
    ) -> tuple[list[Instances], dict[str, Tensor]]:
        """Per-image detections (``Instances`` with ``pred_boxes [N, 4]``, ``pred_scores [N]``,
        ``pred_labels [N]`` int64 and ``pred_masks [N, 1, M, M]`` probabilities, in the
        resized image's pixels) and the losses ``loss_classifier``, ``loss_box_reg``,
        ``loss_mask`` when ``targets`` are given. ``stages`` (a dict) collects intermediates."""
        losses: dict[str, Tensor] = {}
        features = self._pooling_layout(features)
        if targets is not None:
            gt_boxes = [t["boxes"] for t in targets]
            gt_labels = [t["labels"] for t in targets]
            rois, matched_idxs, labels, regression_targets = sample_proposals(
                proposals,
                gt_boxes,
                gt_labels,
                self.proposal_matcher,
                self.fg_bg_sampler,
                self.box_coder,
                generator=generator,
            )
            sampled = [
                Instances(
                    size, proposal_boxes=r, matched_idxs=m, gt_labels=lab, regression_targets=t
                )
                for size, r, m, lab, t in zip(
                    image_sizes, rois, matched_idxs, labels, regression_targets
                )
            ]
            box_features = self.box_roi_pool(
                features, [s.proposal_boxes for s in sampled], image_sizes
            )  # [K, C, 7, 7]
            class_logits, box_regression = self.box_predictor(self.box_head(box_features))
            loss_classifier, loss_box_reg = box_loss(
                class_logits,
                box_regression,
                [s.gt_labels for s in sampled],
                [s.regression_targets for s in sampled],
            )
            losses.update(loss_classifier=loss_classifier, loss_box_reg=loss_box_reg)
            if stages is not None:
                stages.update(
                    sampled_rois=sampled,
                    train_class_logits=class_logits,
                    train_box_regression=box_regression,
                )
            positives = [self._head_positives(s, generator) for s in sampled]
            if stages is not None:
                stages["train_head_rois"] = positives  # what the mask/keypoint branches train on
            if self.has_mask:
                mask_logits = self._mask_features(
                    features, [p.proposal_boxes for p in positives], image_sizes
                )
                losses["loss_mask"] = mask_loss(
                    mask_logits,
                    [p.proposal_boxes for p in positives],
                    [t["masks"] for t in targets],
                    gt_labels,
                    [p.matched_idxs for p in positives],
                    mode=self.mask_loss_mode,
                )
                if stages is not None:
                    stages["train_mask_logits"] = mask_logits
            if self.has_keypoint:
                kp_logits = self._keypoint_logits(
                    features, [p.proposal_boxes for p in positives], image_sizes
                )
                losses["loss_keypoint"] = keypoint_loss(
                    kp_logits,
                    [p.proposal_boxes for p in positives],
                    [t["keypoints"] for t in targets],
                    [p.matched_idxs for p in positives],
                )
                if stages is not None:
                    stages["train_keypoint_logits"] = kp_logits

        detections: list[Instances] = []
        if return_detections:
            box_features = self.box_roi_pool(features, proposals, image_sizes)
            class_logits, box_regression = self.box_predictor(self.box_head(box_features))
            boxes, scores, labels = postprocess_detections(
                class_logits,
                box_regression,
                proposals,
                image_sizes,
                self.box_coder,
                score_thresh=self.score_thresh,
                nms_thresh=self.nms_thresh,
                detections_per_img=self.detections_per_img,
            )
            detections = [
                Instances(size, pred_boxes=b, pred_scores=s, pred_labels=lab)
                for size, b, s, lab in zip(image_sizes, boxes, scores, labels)
            ]
            if stages is not None:
                stages.update(class_logits=class_logits, box_regression=box_regression)
            if self.has_mask:
                mask_logits = self._mask_features(features, boxes, image_sizes)
                probs = mask_inference(mask_logits, labels, mode=self.mask_loss_mode)
                for det, p in zip(detections, probs):
                    det.pred_masks = p  # [N_i, 1, M, M]
                if stages is not None:
                    stages["mask_logits"] = mask_logits
            if self.has_keypoint:
                kp_logits = self._keypoint_logits(features, boxes, image_sizes)
                keypoints, kp_scores = keypoint_inference(
                    kp_logits, boxes, decoding=self.keypoint_decoding
                )
                for det, k, s in zip(detections, keypoints, kp_scores):
                    det.pred_keypoints = k  # [N_i, K, 3] (x, y, 1)
                    det.pred_keypoint_scores = s  # [N_i, K]
                if self.keypoint_rescore:
                    confidence = keypoint_confidence(kp_logits).mean(dim=1)  # [D]
                    rows, start = [], 0  # the new order of the D rows, image by image
                    for i, c in enumerate(confidence.split([len(d) for d in detections])):
                        det = detections[i]
                        det.pred_scores = det.pred_scores * c.to(det.pred_scores.dtype)
                        o = det.pred_scores.argsort(descending=True, stable=True)
                        detections[i] = det[o]
                        rows.append(o + start)
                        start += len(det)
                    order = torch.cat(rows)
                    kp_logits = kp_logits[order]  # the stages' rows follow the detections
                    if stages is not None and "mask_logits" in stages:
                        stages["mask_logits"] = stages["mask_logits"][order]
                if stages is not None:
                    stages["keypoint_logits"] = kp_logits
        return detections, losses


# --------------------------------------------------------------------------------- the model
def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


class MaskRCNN(nn.Module):
    """Mask R-CNN: ``forward(images, targets=None) -> (detections, losses)``.

    Args:
        transform: an :class:`ImageTransform`.
        backbone: module ``[B, 3, H, W] -> OrderedDict`` of feature maps, with ``out_channels``.
        rpn: a :class:`mrcnn_edu.rpn.RegionProposalNetwork`.
        roi_heads: a :class:`RoIHeads`.
        num_classes: number of classes including background (labels must be in ``1..C-1``).
        config: the :class:`~mrcnn_edu.config.ModelConfig` it was built from (kept for
            checkpoints), if any.
    """

    def __init__(
        self,
        transform: ImageTransform,
        backbone: nn.Module,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        num_classes: int,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = int(num_classes)
        self.config = config
        self.channels_last = bool(config is not None and config.channels_last)
        if self.channels_last:  # conv weights [O, I, kh, kw] stored as NHWC
            self.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ input checks
    def check_inputs(self, images, targets) -> None:
        """Clear errors for what the model cannot take (names image index, field, shape)."""
        if isinstance(images, Tensor):
            if images.dim() == 4:
                raise TypeError(
                    "MaskRCNN: images must be a list of [3, H, W] tensors (images "
                    f"of different sizes), got one tensor {_shape(images)}; use "
                    "list(images)"
                )
            images = [images] if images.dim() == 3 else images
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise TypeError(
                f"MaskRCNN: images must be a non-empty list of [3, H, W] float "
                f"tensors, got {type(images).__name__}"
            )
        device = images[0].device if isinstance(images[0], Tensor) else None
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"MaskRCNN: images[{i}] must be [3, H, W] (RGB), got {_shape(img)}"
                )
            if not img.is_floating_point():
                raise TypeError(
                    f"MaskRCNN: images[{i}] has dtype {img.dtype}; the model takes "
                    "float images with values in 0..1 (use image.float() / 255)"
                )
            if img.device != device:
                raise ValueError(
                    f"MaskRCNN: images[{i}] is on {img.device} but images[0] on {device}"
                )
            if min(img.shape[-2:]) < 1:
                raise ValueError(f"MaskRCNN: images[{i}] is empty: {_shape(img)}")
            lo, hi = float(img.min()), float(img.max())
            if not (lo >= -1e-3 and hi <= 1.0 + 1e-3):  # also catches NaN
                raise ValueError(
                    f"MaskRCNN: images[{i}] has values in [{lo:.4g}, {hi:.4g}]; the "
                    "model takes RGB values in 0..1 and normalizes them itself "
                    "(divide 0..255 images by 255; do not normalize beforehand)"
                )
        param = next(self.parameters(), None)
        if param is not None and device != param.device:
            raise ValueError(
                f"MaskRCNN: the images are on {device} but the model is on "
                f"{param.device}; move one of them (model.to(device))"
            )
        if targets is None:
            return
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(
                f"MaskRCNN: {len(images)} images but targets is {n}; give one target dict per image"
            )
        for i, (img, t) in enumerate(zip(images, targets)):
            if not isinstance(t, Mapping):
                raise TypeError(f"MaskRCNN: targets[{i}] must be a dict, got {type(t).__name__}")
            for key in ("boxes", "labels") + (("masks",) if self.roi_heads.has_mask else ()):
                if key not in t:
                    raise KeyError(f"MaskRCNN: targets[{i}] has no {key!r} (keys: {sorted(t)})")
            boxes, labels = t["boxes"], t["labels"]
            if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(
                    f"MaskRCNN: targets[{i}]['boxes'] must be [N, 4] (x1, y1, x2, "
                    f"y2), got {_shape(boxes)}"
                )
            if not boxes.is_floating_point():
                raise TypeError(f"MaskRCNN: targets[{i}]['boxes'] must be float, got {boxes.dtype}")
            n = boxes.shape[0]
            if not isinstance(labels, Tensor) or labels.shape != (n,):
                raise ValueError(
                    f"MaskRCNN: targets[{i}]['labels'] must be [{n}] (one per "
                    f"box), got {_shape(labels)}"
                )
            if labels.dtype != torch.int64:
                raise TypeError(
                    f"MaskRCNN: targets[{i}]['labels'] must be int64, got {labels.dtype}"
                )
            for key in ("boxes", "labels") + (("masks",) if self.roi_heads.has_mask else ()):
                if t[key].device != device:
                    raise ValueError(
                        f"MaskRCNN: targets[{i}][{key!r}] is on {t[key].device} "
                        f"but images[{i}] on {device}"
                    )
            if n:
                if not torch.isfinite(boxes).all():
                    j = int((~torch.isfinite(boxes)).any(dim=1).nonzero()[0])
                    raise ValueError(
                        f"MaskRCNN: targets[{i}]['boxes'][{j}] is not finite: {boxes[j].tolist()}"
                    )
                bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
                if bad.any():
                    j = int(bad.nonzero()[0])
                    raise ValueError(
                        f"MaskRCNN: targets[{i}]['boxes'][{j}] = {boxes[j].tolist()}"
                        " is degenerate (needs x2 > x1 and y2 > y1)"
                    )
                out = (labels < 1) | (labels >= self.num_classes)
                if out.any():
                    j = int(out.nonzero()[0])
                    raise ValueError(
                        f"MaskRCNN: targets[{i}]['labels'][{j}] = {int(labels[j])} "
                        f"is outside 1..{self.num_classes - 1} (num_classes="
                        f"{self.num_classes} includes background 0)"
                    )
            if self.roi_heads.has_keypoint:
                kps = t.get("keypoints")
                K = self.roi_heads.keypoint_predictor.out_channels
                if not isinstance(kps, Tensor) or tuple(kps.shape) != (n, K, 3):
                    raise ValueError(
                        f"MaskRCNN: targets[{i}]['keypoints'] must be [{n}, {K}, 3] "
                        f"(x, y, visibility per keypoint), got {_shape(kps)}"
                    )
                if not kps.is_floating_point():
                    raise TypeError(
                        f"MaskRCNN: targets[{i}]['keypoints'] must be float, got {kps.dtype}"
                    )
            if self.roi_heads.has_mask:
                masks = t["masks"]
                want = (n, img.shape[-2], img.shape[-1])
                if not isinstance(masks, Tensor) or tuple(masks.shape) != want:
                    raise ValueError(
                        f"MaskRCNN: targets[{i}]['masks'] must be {list(want)} "
                        f"(one mask per box at the image's size), got "
                        f"{_shape(masks)}"
                    )

    # ------------------------------------------------------------------ the pipeline
    def run_stages(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict] | None = None,
        *,
        return_detections: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """Run the whole model and return every stage's result in a dict.

        Keys: ``images`` (padded batch ``[B, 3, H, W]``), ``image_sizes`` (resized ``(h, w)``),
        ``original_sizes``, ``targets`` (resized), ``features`` (OrderedDict of
        ``[B, C, h_l, w_l]``), ``proposals`` (list of ``[P_i, 4]``), RoI-head intermediates
        (``sampled_rois``, ``class_logits``, ``box_regression``, ``mask_logits`` ...),
        ``instances`` (per image :class:`Instances` in resized pixels), ``detections`` (per
        image dicts in original pixels) and ``losses``.
        """
        if isinstance(images, Tensor) and images.dim() == 3:
            images = [images]
        self.check_inputs(images, targets)
        if return_detections is None:
            return_detections = not self.training
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, image_sizes, rtargets = self.transform(images, targets)
        if self.channels_last:
            # NHWC end to end: oneDNN's convolutions run NHWC, and the Numba RoI kernels,
            # which read pixels with their channels contiguous, need no layout copy
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.backbone(batch)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, losses = self.rpn(batch, image_sizes, features, rtargets, generator=generator)
        stages: dict = {
            "images": batch,
            "image_sizes": image_sizes,
            "original_sizes": original_sizes,
            "targets": rtargets,
            "features": features,
            "proposals": proposals,
        }
        instances, head_losses = self.roi_heads(
            features,
            proposals,
            image_sizes,
            rtargets,
            return_detections=return_detections,
            generator=generator,
            stages=stages,
        )
        losses.update(head_losses)
        stages["instances"] = instances
        stages["detections"] = [
            self.postprocess(inst, osize) for inst, osize in zip(instances, original_sizes)
        ]
        stages["losses"] = losses
        return stages

    @staticmethod
    @full_precision
    def postprocess(inst: Instances, original_size: tuple[int, int]) -> dict[str, Tensor]:
        """Resized-image detections -> the output dict in the original image's pixels:
        ``boxes [N, 4]``, ``labels [N]``, ``scores [N]``, ``masks [N, 1, H, W]`` (the 28x28
        probabilities pasted into the image, as torchvision does; threshold at 0.5 to binarize).
        """
        boxes = postprocess_boxes(inst.pred_boxes, inst.image_size, original_size)
        out = {"boxes": boxes, "labels": inst.pred_labels, "scores": inst.pred_scores}
        if inst.has("pred_masks"):
            out["masks"] = paste_masks_in_image(inst.pred_masks, boxes, original_size)
        if inst.has("pred_keypoints"):
            out["keypoints"] = postprocess_keypoints(
                inst.pred_keypoints, inst.image_size, original_size
            )
            out["keypoints_scores"] = inst.pred_keypoint_scores
        return out

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict] | None = None,
        *,
        return_detections: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Detect objects in ``images`` and/or compute the training losses.

        Args:
            images: list of ``[3, H_i, W_i]`` float tensors, values in 0..1.
            targets: optional list per image of dicts with ``boxes [N, 4]`` float
                ``(x1, y1, x2, y2)`` pixels, ``labels [N]`` int64 in ``1..num_classes-1``,
                ``masks [N, H_i, W_i]`` uint8 (for a model with a mask branch).
            return_detections: default: in eval mode only (computing detections in train
                mode costs a second pass of the box head over all proposals).
            generator: optional ``torch.Generator`` for the RPN's and box head's sampling
                (None: torch's global RNG, as torchvision).

        Returns:
            ``(detections, losses)``: per image a dict with ``boxes [N, 4]``, ``labels [N]``
            int64, ``scores [N]`` and ``masks [N, 1, H_i, W_i]`` float probabilities in the
            original image's pixels ([] when detections are not requested); losses
            ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``,
            ``loss_mask`` (empty without targets).
        """
        stages = self.run_stages(
            images, targets, return_detections=return_detections, generator=generator
        )
        return stages["detections"], stages["losses"]


# ------------------------------------------------------------------------------ build_model
def _backbone(cfg: ModelConfig):
    b = cfg.backbone
    if b.kind == "resnet_fpn":
        backbone = resnet_fpn_backbone(
            depth=b.depth,
            out_channels=b.fpn_channels,
            norm=b.norm,
            fpn_norm=b.fpn_norm,
            trainable_layers=b.trainable_layers,
            returned_layers=tuple(b.returned_layers),
        )
        names = [str(i) for i in range(len(b.returned_layers))]
        return backbone, names, None
    if b.kind == "resnet_c4":
        backbone = ResNetC4Backbone(depth=b.depth, norm=b.norm, trainable_layers=b.trainable_layers)
        res5 = Res5Head(depth=b.depth, norm=b.norm, trainable_layers=b.trainable_layers)
        return backbone, ["0"], res5
    if b.kind == "resnet_c5":
        backbone = ResNetC5Backbone(depth=b.depth, norm=b.norm, trainable_layers=b.trainable_layers)
        return backbone, ["0"], None
    raise ValueError(
        f"build_model: backbone.kind must be 'resnet_fpn', 'resnet_c4' or "
        f"'resnet_c5', got {b.kind!r}"
    )


def build_model(cfg: ModelConfig | str) -> MaskRCNN:
    """Translate a config (or a preset name) into a :class:`MaskRCNN` with fresh weights."""
    if isinstance(cfg, str):
        from .config import get_preset

        cfg = get_preset(cfg)
    r, h, t = cfg.rpn, cfg.roi_heads, cfg.transform
    if cfg.num_classes < 2:
        raise ValueError(
            f"build_model: num_classes counts background, so it must be >= 2, got {cfg.num_classes}"
        )
    backbone, featmap_names, res5 = _backbone(cfg)
    C = backbone.out_channels

    anchor_generator = AnchorGenerator(r.anchor_sizes, r.aspect_ratios)
    strides = tuple(backbone.strides)
    if anchor_generator.num_levels != len(strides):
        raise ValueError(
            f"build_model: rpn.anchor_sizes has {anchor_generator.num_levels} levels "
            f"but the backbone returns {len(strides)} feature maps (strides "
            f"{strides}); give one tuple of sizes per feature map"
        )
    num_anchors = anchor_generator.num_anchors_per_location()
    if len(set(num_anchors)) != 1:
        raise ValueError(
            f"build_model: the RPN head is shared by all levels, so every level "
            f"needs the same number of anchors, got {num_anchors}"
        )
    rpn = RegionProposalNetwork(
        anchor_generator,
        RPNHead(C, num_anchors[0], conv_depth=r.conv_depth),
        fg_iou_thresh=r.fg_iou_thresh,
        bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
        score_thresh=r.score_thresh,
    )

    def pooler(resolution: int) -> MultiLevelRoIPooler:
        return MultiLevelRoIPooler(
            featmap_names,
            resolution,
            h.sampling_ratio,
            op=h.pooler_op,
            aligned=h.aligned,
            backend=h.backend,
        )

    R = h.box_resolution
    if h.box_head == "mlp":
        box_head = TwoMLPHead(C * R * R, h.representation_size)
        box_dim = h.representation_size
    elif h.box_head == "convfc":
        box_head = ConvFCHead(
            C,
            R,
            conv_dims=tuple(h.box_conv_dims),
            fc_dims=(h.representation_size,),
            norm=h.box_norm,
        )
        box_dim = h.representation_size
    elif h.box_head == "res5":
        if res5 is None:
            raise ValueError(
                "build_model: box_head 'res5' needs the C4 backbone (backbone.kind='resnet_c4')"
            )
        box_head = Res5BoxHead(res5)
        box_dim = res5.out_channels
    else:
        raise ValueError(
            f"build_model: roi_heads.box_head must be 'mlp', 'convfc' or 'res5', got {h.box_head!r}"
        )
    box_predictor = FastRCNNPredictor(box_dim, cfg.num_classes)

    mask_kwargs = {}
    if h.mask:
        mask_channels = 1 if h.mask_loss == "agnostic" else cfg.num_classes
        if h.box_head == "res5":
            # C4 (figure 4 left): res5 on the positive RoIs, then the 2x deconv predictor
            mask_head = box_head.res5
            mask_predictor = MaskPredictor(res5.out_channels, h.mask_dim_reduced, mask_channels)
        else:
            mask_head = MaskHead(C, tuple(h.mask_layers), h.mask_dilation, norm=h.mask_norm)
            mask_predictor = MaskPredictor(h.mask_layers[-1], h.mask_dim_reduced, mask_channels)
        mask_kwargs = {
            "mask_pooler": pooler(h.mask_resolution),
            "mask_head": mask_head,
            "mask_predictor": mask_predictor,
            "mask_loss_mode": h.mask_loss,
        }
    if h.keypoint:
        mask_kwargs.update(
            keypoint_pooler=pooler(h.keypoint_resolution),
            keypoint_head=KeypointHead(C, tuple(h.keypoint_layers)),
            keypoint_predictor=KeypointPredictor(h.keypoint_layers[-1], h.num_keypoints),
            keypoint_decoding=h.keypoint_decoding,
            keypoint_rescore=h.keypoint_rescore,
        )
    roi_heads = RoIHeads(
        pooler(R),
        box_head,
        box_predictor,
        fg_iou_thresh=h.fg_iou_thresh,
        bg_iou_thresh=h.bg_iou_thresh,
        batch_size_per_image=h.batch_size_per_image,
        positive_fraction=h.positive_fraction,
        mask_rois_per_image=h.mask_rois_per_image,
        bbox_reg_weights=h.bbox_reg_weights,
        score_thresh=h.score_thresh,
        nms_thresh=h.nms_thresh,
        detections_per_img=h.detections_per_img,
        **mask_kwargs,
    )
    transform = ImageTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible)
    return MaskRCNN(transform, backbone, rpn, roi_heads, cfg.num_classes, config=cfg)

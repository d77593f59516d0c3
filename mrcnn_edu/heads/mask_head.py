"""The Mask R-CNN mask branch: layers, targets, the three mask losses, inference and pasting.

Explained in notebook ``06_mask_head.ipynb``. Mask R-CNN (He et al. 2017) adds to every
positive RoI a small fully convolutional network that predicts an ``m x m`` mask for each class
(section 3, "Mask Representation": ``K m^2`` outputs, ``m = 28`` with FPN):

1. **Layers** (section 3, "Network Architecture", figure 4 right): the RoI's ``14 x 14``
   RoIAlign feature goes through four 3x3 convs + ReLU (:class:`MaskHead`), a 2x2 stride-2
   deconvolution + ReLU to ``28 x 28``, and a 1x1 conv with one output channel per class
   (:class:`MaskPredictor`).
2. **Targets** (:func:`mask_targets`, section 3 "Training": "the mask target is the
   intersection between an RoI and its associated ground-truth mask"): the gt mask of the
   matched object, cropped to the RoI and resampled to ``28 x 28`` with RoIAlign.
3. **Loss** (:func:`mask_loss`, section 3 "Multi-task loss"): the paper's *decoupled* average
   binary cross-entropy on the gt class's channel only (``mode="sigmoid"``); for the ablation
   of Table 2b the *coupled* per-pixel softmax over classes (``mode="softmax"``); and the
   class-agnostic single mask of the same section (``mode="agnostic"``).
4. **Inference** (:func:`mask_inference`, section 3.1 "Inference"): the ``28 x 28``
   probabilities of the predicted class, then :func:`paste_masks_in_image` resizes each one to
   its box and pastes it into a full-size image (the paper thresholds it at 0.5).

The layers, :func:`mask_targets`, the sigmoid loss, the inference and the pasting equal
torchvision 0.29's ``MaskRCNNHeads``, ``MaskRCNNPredictor``, ``project_masks_on_boxes``,
``maskrcnn_loss``, ``maskrcnn_inference`` and ``paste_masks_in_image`` (bit for bit where the
test says so; ``tests/test_mask_head.py``).

Mixed precision: under ``torch.autocast`` the layers run in float16 / bfloat16, while the targets,
the losses, the inference (sigmoid / softmax) and the pasting run in float32 with autocast off:
they upcast their float16 / bfloat16 inputs (the logits included) with
``mrcnn_edu.utils.full_precision``, so losses and masks are float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import roi_align
from ..utils import full_precision
from .box_head import _conv_norm_relu, _init_convs, _shape

__all__ = [
    "MASK_LOSS_MODES",
    "MaskHead",
    "MaskPredictor",
    "expand_boxes",
    "expand_masks",
    "mask_inference",
    "mask_loss",
    "mask_targets",
    "paste_mask_in_image",
    "paste_masks_in_image",
]

MASK_LOSS_MODES = ("sigmoid", "softmax", "agnostic")


# ---------------------------------------------------------------------------------- layers
class MaskHead(nn.Sequential):
    """The mask branch's conv tower: ``len(layers)`` blocks of 3x3 conv (+ BatchNorm) + ReLU.

    Args:
        in_channels: ``C`` of the pooled RoI features (256 with FPN).
        layers: output channels of each conv (``(256,) * 4`` in the paper's FPN head).
        dilation: dilation of every conv (padding equals it, so the size is kept).
        norm: ``None`` (convs with bias, torchvision's v1 ``maskrcnn_resnet50_fpn``) or ``"bn"``
            (BatchNorm after each bias-free conv, the v2 head).

    Shapes: ``[K, C, 14, 14]`` -> ``[K, layers[-1], 14, 14]``. Parameter names are torchvision's
    ``MaskRCNNHeads``: block ``i`` holds ``i.0`` (conv) and, with ``norm="bn"``, ``i.1``
    (BatchNorm). Checkpoints written before torchvision 0.12 name the convs ``mask_fcn1`` ..
    ``mask_fcn4``; they are renamed on load, as torchvision does. Convs are initialised with
    ``kaiming_normal_`` (fan_out, ReLU) and zero bias.
    """

    _version = 2

    def __init__(
        self,
        in_channels: int,
        layers: Sequence[int] = (256, 256, 256, 256),
        dilation: int = 1,
        norm: str | None = None,
    ) -> None:
        if norm not in ("bn", None):
            raise ValueError(f"MaskHead: norm must be 'bn' or None, got {norm!r}")
        if int(in_channels) <= 0 or int(dilation) <= 0 or len(layers) == 0:
            raise ValueError(
                f"MaskHead: need in_channels > 0, dilation > 0 and at least one layer, got "
                f"{in_channels}, {dilation}, {tuple(layers)}"
            )
        blocks, previous = [], int(in_channels)
        for dim in layers:
            blocks.append(_conv_norm_relu(previous, int(dim), dilation=int(dilation), norm=norm))
            previous = int(dim)
        super().__init__(*blocks)
        _init_convs(self)
        self.in_channels = int(in_channels)
        self.out_channels = previous

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # pre-0.12 checkpoints: "mask_fcn{i+1}.weight" -> "{i}.0.weight"
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            for i in range(len(self)):
                for kind in ("weight", "bias"):
                    old, new = f"{prefix}mask_fcn{i + 1}.{kind}", f"{prefix}{i}.0.{kind}"
                    if old in state_dict:
                        state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[K, C, h, w]`` pooled features -> ``[K, layers[-1], h, w]``."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MaskHead: expected [K, {self.in_channels}, h, w] features, got {_shape(x)}"
            )
        return super().forward(x)


class MaskPredictor(nn.Module):
    """Upsample x2 and predict one mask per class (figure 4, right: "deconv" then "x 80").

    Args:
        in_channels: channels of the :class:`MaskHead` output (256).
        dim_reduced: channels of the deconvolution (256).
        num_classes: output masks per RoI. For ``mask_loss(mode="sigmoid")`` and
            ``"softmax"`` this is the box head's ``num_classes`` INCLUDING background: channel
            ``c`` is class ``c``'s mask and channel 0 belongs to background (never trained in
            sigmoid mode; the background logit of the per-pixel softmax in softmax mode). For
            ``mode="agnostic"`` use ``num_classes=1``.

    ``conv5_mask``: ConvTranspose2d 2x2 stride 2, ``[K, in, 14, 14]`` -> ``[K, dim_reduced,
    28, 28]``; ReLU; ``mask_fcn_logits``: 1x1 conv -> ``[K, num_classes, 28, 28]`` logits.
    Parameter names and init (``kaiming_normal_`` weights, PyTorch's default biases) are
    torchvision's ``MaskRCNNPredictor``.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        if int(in_channels) <= 0 or int(dim_reduced) <= 0 or int(num_classes) < 1:
            raise ValueError(
                f"MaskPredictor: need in_channels > 0, dim_reduced > 0, num_classes >= 1, got "
                f"{in_channels}, {dim_reduced}, {num_classes}"
            )
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[K, in_channels, h, w]`` -> ``[K, num_classes, 2h, 2w]`` mask logits."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MaskPredictor: expected [K, {self.in_channels}, h, w] features, got {_shape(x)}"
            )
        return self.mask_fcn_logits(self.relu(self.conv5_mask(x)))


# ---------------------------------------------------------------------------------- targets
@full_precision
def mask_targets(
    gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, M: int = 28, backend: str = "auto"
) -> Tensor:
    """Crop each RoI's matched gt mask to the RoI and resample it to ``M x M``.

    The ``G`` gt masks act as a batch of ``G`` one-channel images, and RoI ``p`` is pooled from
    image ``matched_idxs[p]``: ``roi_align(gt_masks[:, None], [matched_idx, box], (M, M),
    spatial_scale=1, sampling_ratio=-1, aligned=False)``, exactly torchvision's
    ``project_masks_on_boxes``. The result is a soft target in ``[0, 1]`` (bilinear averages
    near the mask's edge); the sigmoid loss uses it as is.

    Args:
        gt_masks: ``[G, H, W]`` (uint8, bool or float) binary masks of one image.
        boxes: ``[P, 4]`` float RoIs (x1, y1, x2, y2) in the image's pixels.
        matched_idxs: ``[P]`` integer gt index of each RoI, in ``[0, G)``.
        M: output resolution (28).
        backend: ``mrcnn_edu.ops.roi_align`` backend.

    Returns:
        ``[P, M, M]`` float targets, dtype of ``boxes``.
    """
    fn = "mask_targets"
    if not isinstance(gt_masks, Tensor) or gt_masks.dim() != 3:
        raise ValueError(f"{fn}: gt_masks must be [G, H, W], got {_shape(gt_masks)}")
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{fn}: boxes must be [P, 4] (x1, y1, x2, y2), got {_shape(boxes)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{fn}: boxes must be floating point, got {boxes.dtype}")
    P = boxes.shape[0]
    if not isinstance(matched_idxs, Tensor) or tuple(matched_idxs.shape) != (P,):
        raise ValueError(f"{fn}: matched_idxs must be [P] = [{P}], got {_shape(matched_idxs)}")
    if matched_idxs.is_floating_point() or matched_idxs.dtype == torch.bool:
        raise TypeError(f"{fn}: matched_idxs must be an integer tensor, got {matched_idxs.dtype}")
    if int(M) <= 0:
        raise ValueError(f"{fn}: M must be positive, got {M}")
    if P == 0:
        return boxes.new_zeros((0, int(M), int(M)))
    G = gt_masks.shape[0]
    if int(matched_idxs.min()) < 0 or int(matched_idxs.max()) >= G:
        raise ValueError(
            f"{fn}: matched_idxs must lie in [0, G) = [0, {G}), got range "
            f"[{int(matched_idxs.min())}, {int(matched_idxs.max())}]"
        )
    # (P,) + (P, 4) -> rois (P, 5): the batch index is the matched gt mask
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    masks = gt_masks[:, None].to(rois)  # [G, H, W] -> [G, 1, H, W] float
    out = roi_align(
        masks, rois, (int(M), int(M)), 1.0, sampling_ratio=-1, aligned=False, backend=backend
    )  # [P, 1, M, M]
    return out[:, 0]  # [P, 1, M, M] -> [P, M, M]


# -------------------------------------------------------------------------------------- loss
def _check_mode(mode: str, fn: str) -> None:
    if mode not in MASK_LOSS_MODES:
        raise ValueError(f"{fn}: mode must be one of {MASK_LOSS_MODES}, got {mode!r}")


def _check_mask_logits(mask_logits, mode: str, fn: str) -> None:
    if not isinstance(mask_logits, Tensor) or mask_logits.dim() != 4:
        raise ValueError(f"{fn}: mask_logits must be [P, C, M, M], got {_shape(mask_logits)}")
    if mask_logits.shape[2] != mask_logits.shape[3]:
        raise ValueError(
            f"{fn}: mask_logits must be square [P, C, M, M], got {tuple(mask_logits.shape)}"
        )
    if not mask_logits.is_floating_point():
        raise TypeError(f"{fn}: mask_logits must be floating point, got {mask_logits.dtype}")
    if mode == "agnostic" and mask_logits.shape[1] != 1:
        raise ValueError(
            f"{fn}: mode='agnostic' needs one mask channel, [P, 1, M, M], got "
            f"{tuple(mask_logits.shape)}"
        )


def _check_label_range(labels: Tensor, C: int, mode: str, fn: str) -> None:
    if mode == "agnostic" or labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 1 or hi >= C:
        raise ValueError(
            f"{fn}: labels must lie in [1, {C}) to pick a channel of mask_logits with C = {C} "
            f"channels (mode={mode!r}, channel 0 is background), got range [{lo}, {hi}]"
        )


@full_precision
def mask_loss(
    mask_logits: Tensor,
    proposals: Sequence[Tensor],
    gt_masks: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    mask_matched_idxs: Sequence[Tensor],
    mode: str = "sigmoid",
) -> Tensor:
    """The mask loss ``L_mask`` on the positive RoIs (section 3, "Multi-task loss"; pure).

    Targets come from :func:`mask_targets` (``M`` = ``mask_logits``' size), labels are the
    matched gt classes. Three modes:

    * ``"sigmoid"`` (the paper's choice): for an RoI of class ``k`` only channel ``k`` enters
      the loss, a per-pixel sigmoid binary cross-entropy against the (soft) target, averaged
      over all ``P M^2`` pixels. Other classes' masks do not compete: mask and class
      prediction are *decoupled* (the box branch picks the class). Equal to torchvision's
      ``maskrcnn_loss``.
    * ``"softmax"`` (Table 2b's "multinomial" alternative, as in FCNs): a per-pixel softmax
      over all ``C`` channels, where channel 0 is background and channel ``c`` is class ``c``
      (so the same predictor, with the box head's ``num_classes`` including background, serves
      both modes). The target class of a pixel is the RoI's gt label ``k`` where the target
      mask is ``>= 0.5`` and 0 (background) elsewhere; the loss is the cross-entropy averaged
      over all ``P M^2`` pixels. The classes now compete at every pixel: mask and class are
      *coupled*, which the paper finds much worse.
    * ``"agnostic"``: ``mask_logits`` has one channel, one mask for every class (sigmoid binary
      cross-entropy as in ``"sigmoid"``); the paper finds it nearly as good.

    Args:
        mask_logits: ``[P, C, M, M]`` (``[P, 1, M, M]`` for ``"agnostic"``), ``P = sum_i P_i``.
        proposals: list per image of ``[P_i, 4]`` positive RoIs.
        gt_masks: list per image of ``[G_i, H_i, W_i]`` binary masks.
        gt_labels: list per image of ``[G_i]`` int64 classes (1 .. C-1).
        mask_matched_idxs: list per image of ``[P_i]`` gt index of each RoI.
        mode: ``"sigmoid"`` | ``"softmax"`` | ``"agnostic"``.

    Returns:
        scalar loss; ``mask_logits.sum() * 0`` when there are no positive RoIs.
    """
    fn = "mask_loss"
    _check_mode(mode, fn)
    _check_mask_logits(mask_logits, mode, fn)
    if not (len(proposals) == len(gt_masks) == len(gt_labels) == len(mask_matched_idxs)):
        raise ValueError(
            f"{fn}: got {len(proposals)} images of proposals, {len(gt_masks)} of gt_masks, "
            f"{len(gt_labels)} of gt_labels and {len(mask_matched_idxs)} of mask_matched_idxs"
        )
    P, C, M, _ = mask_logits.shape
    total = sum(int(p.shape[0]) for p in proposals)
    if total != P:
        raise ValueError(f"{fn}: mask_logits has {P} rows but the proposals hold {total} RoIs")
    if P == 0:  # no positives: a zero that still backpropagates
        return mask_logits.sum() * 0

    labels = torch.cat(
        [lab[idx.to(torch.int64)] for lab, idx in zip(gt_labels, mask_matched_idxs)], dim=0
    ).to(torch.int64)  # [P]
    targets = torch.cat(
        [mask_targets(m, p, i, M) for m, p, i in zip(gt_masks, proposals, mask_matched_idxs)],
        dim=0,
    ).to(mask_logits.dtype)  # [P, M, M]
    _check_label_range(labels, C, mode, fn)
    rows = torch.arange(P, device=labels.device)

    if mode == "sigmoid":
        # the gt class's channel only: [P, C, M, M] -> [P, M, M]
        return F.binary_cross_entropy_with_logits(mask_logits[rows, labels], targets)
    if mode == "agnostic":
        return F.binary_cross_entropy_with_logits(mask_logits[:, 0], targets)
    # softmax: per-pixel class = label inside the mask, background 0 outside; [P, M, M] int64
    pixel_classes = (targets >= 0.5).to(torch.int64) * labels[:, None, None]  # [P,M,M]*[P,1,1]
    return F.cross_entropy(mask_logits, pixel_classes)  # softmax over dim 1, mean over P*M*M


# --------------------------------------------------------------------------------- inference
@full_precision
def mask_inference(
    mask_logits: Tensor, labels: Sequence[Tensor], mode: str = "sigmoid"
) -> list[Tensor]:
    """Mask probabilities of each detection's class (section 3.1, "Inference").

    Args:
        mask_logits: ``[D, C, M, M]`` (``[D, 1, M, M]`` for ``"agnostic"``), ``D = sum_i D_i``.
        labels: list per image of ``[D_i]`` int64 predicted classes.
        mode: as in :func:`mask_loss`: ``"sigmoid"`` takes ``sigmoid`` of the label's channel
            (torchvision's ``maskrcnn_inference``), ``"agnostic"`` ``sigmoid`` of channel 0,
            ``"softmax"`` the label's channel of the softmax over all channels.

    Returns:
        list per image of ``[D_i, 1, M, M]`` probabilities in ``[0, 1]``.
    """
    fn = "mask_inference"
    _check_mode(mode, fn)
    _check_mask_logits(mask_logits, mode, fn)
    if isinstance(labels, Tensor):
        raise TypeError(f"{fn}: labels must be a list of [D_i] tensors, one per image")
    D, C = mask_logits.shape[:2]
    counts = [int(lab.shape[0]) for lab in labels]
    if sum(counts) != D:
        raise ValueError(f"{fn}: mask_logits has {D} rows but labels hold {sum(counts)}")
    flat = (torch.cat(list(labels)) if labels else torch.zeros(0)).to(
        device=mask_logits.device, dtype=torch.int64
    )
    _check_label_range(flat, C, mode, fn)
    rows = torch.arange(D, device=mask_logits.device)
    if mode == "sigmoid":
        probs = mask_logits.sigmoid()[rows, flat]  # [D, C, M, M] -> [D, M, M]
    elif mode == "agnostic":
        probs = mask_logits[:, 0].sigmoid()
    else:
        probs = F.softmax(mask_logits, dim=1)[rows, flat]
    return list(probs[:, None].split(counts, dim=0))  # [D, M, M] -> [D, 1, M, M] per image


# ------------------------------------------------------------------------------------ pasting
def expand_masks(masks: Tensor, padding: int) -> tuple[Tensor, float]:
    """Pad ``[N, 1, M, M]`` masks with ``padding`` zero pixels on each side.

    Returns the ``[N, 1, M + 2p, M + 2p]`` masks and the scale ``(M + 2p) / M`` by which their
    boxes must grow so the original ``M x M`` part still covers the original box. The zero
    border makes the bilinear resize fade to 0 at the box edge instead of smearing the last row
    of the mask outwards.
    """
    M = masks.shape[-1]
    scale = float(M + 2 * padding) / M
    return F.pad(masks, (padding,) * 4), scale


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale ``[N, 4]`` xyxy boxes about their centres by ``scale`` (same dtype).

    The arithmetic is torchvision's ``expand_boxes`` step for step (half sizes and centres
    first), so the boxes have the same float bits.
    """
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    # 4 x [N] -> [N, 4]
    return torch.stack((x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half), dim=1)


def paste_mask_in_image(mask: Tensor, box: Sequence[int], im_h: int, im_w: int) -> Tensor:
    """Resize one ``[m, m]`` mask to its integer box and paste it into an ``[im_h, im_w]`` zero
    image.

    ``box = (x1, y1, x2, y2)`` in whole pixels covers the ``(x2 - x1 + 1) x (y2 - y1 + 1)``
    pixels ``x1 .. x2``, ``y1 .. y2`` inclusive (at least 1 x 1). The mask is resized to that
    size (bilinear, ``align_corners=False``), then the part inside the image is copied; a box
    entirely outside the image pastes nothing (torchvision raises or pastes nothing there).
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    w = max(x2 - x1 + 1, 1)
    h = max(y2 - y1 + 1, 1)
    # [m, m] -> [1, 1, m, m] -> [1, 1, h, w] -> [h, w]
    resized = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)
    resized = resized[0, 0]
    im_mask = torch.zeros((im_h, im_w), dtype=mask.dtype, device=mask.device)
    # the part of the box inside the image, in image and in box coordinates
    x_0, x_1 = max(x1, 0), min(x2 + 1, im_w)
    y_0, y_1 = max(y1, 0), min(y2 + 1, im_h)
    if x_1 > x_0 and y_1 > y_0:
        im_mask[y_0:y_1, x_0:x_1] = resized[y_0 - y1 : y_1 - y1, x_0 - x1 : x_1 - x1]
    return im_mask


@full_precision
def paste_masks_in_image(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1
) -> Tensor:
    """Paste ``M x M`` mask probabilities into full-size images (torchvision's, bit for bit).

    1. :func:`expand_masks`: pad each mask by ``padding`` zero pixels, and
       :func:`expand_boxes`: grow its box by ``(M + 2 padding) / M`` to match;
    2. round the grown boxes to whole pixels by truncation toward zero (``.to(int64)``, as
       torchvision: ``-0.7`` becomes ``0``, not ``-1``);
    3. :func:`paste_mask_in_image`, one mask at a time.

    Args:
        masks: ``[N, 1, M, M]`` float probabilities (from :func:`mask_inference`).
        boxes: ``[N, 4]`` float (x1, y1, x2, y2) detections in the same image's pixels.
        image_size: ``(h, w)`` of the image to paste into.
        padding: border pixels added to each mask (1).

    Returns:
        ``[N, 1, h, w]`` masks, dtype of ``masks`` (threshold at 0.5 for binary masks).
    """
    fn = "paste_masks_in_image"
    if not isinstance(masks, Tensor) or masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"{fn}: masks must be [N, 1, M, M], got {_shape(masks)}")
    if not masks.is_floating_point():
        raise TypeError(f"{fn}: masks must be floating point, got {masks.dtype}")
    N = masks.shape[0]
    if not isinstance(boxes, Tensor) or tuple(boxes.shape) != (N, 4):
        raise ValueError(f"{fn}: boxes must be [N, 4] = [{N}, 4], got {_shape(boxes)}")
    if len(image_size) != 2:
        raise ValueError(f"{fn}: image_size must be (h, w), got {image_size!r}")
    if int(padding) < 0:
        raise ValueError(f"{fn}: padding must be >= 0, got {padding}")
    im_h, im_w = int(image_size[0]), int(image_size[1])
    if N == 0:
        return masks.new_empty((0, 1, im_h, im_w))

    masks, scale = expand_masks(masks, int(padding))  # [N, 1, M+2p, M+2p]
    int_boxes = expand_boxes(boxes, scale).to(torch.int64)  # truncation toward zero
    pasted = [paste_mask_in_image(m[0], b, im_h, im_w) for m, b in zip(masks, int_boxes.tolist())]
    return torch.stack(pasted, dim=0)[:, None]  # N x [h, w] -> [N, 1, h, w]

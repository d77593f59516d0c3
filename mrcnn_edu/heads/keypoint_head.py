"""The keypoint branch of Mask R-CNN: layers, one-hot targets, the m^2-way softmax loss, inference.

Explained in notebook ``10_keypoints.ipynb``. Mask R-CNN section 5, "Mask R-CNN for Human Pose
Estimation", models "a keypoint's location as a one-hot mask" and predicts ``K`` masks per RoI,
one per keypoint type, "with minimal modification" of the mask branch:

1. **Layers** ("Implementation Details" of sec. 5): "a stack of eight 3x3 512-d conv layers"
   (:class:`KeypointHead`), "followed by a deconv layer and 2x bilinear upscaling, producing an
   output resolution of 56x56" (:class:`KeypointPredictor`): the ``14 x 14`` pooled RoI feature
   becomes ``28 x 28`` after the 4x4 stride-2 deconvolution and ``56 x 56`` after the upscaling.
   The paper finds that "a relatively high resolution output (compared to masks) is required
   for keypoint-level localization accuracy".
2. **Targets** (:func:`keypoint_targets`): "the training target is a one-hot m x m binary mask
   where only a single pixel is labeled as foreground": the pixel of the ``m x m`` grid laid
   over the RoI that holds the keypoint, stored as its flat index ``y * m + x``. Keypoints that
   are not visible or fall outside the RoI give no target.
3. **Loss** (:func:`keypoint_loss`): "for each visible ground-truth keypoint, we minimize the
   cross-entropy loss over an m^2-way softmax output (which encourages a single point to be
   detected)". Each keypoint of each RoI is its own multinomial over the ``m^2`` positions (the
   ``K`` keypoints do not compete, unlike the masks' per-pixel softmax over classes).
4. **Inference** (:func:`heatmaps_to_keypoints`, :func:`keypoint_inference`): each ``56 x 56``
   heatmap is resized (bicubic) to the RoI's size in pixels, its maximum becomes the keypoint
   (pixel centre: ``+ 0.5``) and the resized logit there its score.
5. **Sub-pixel decoding and keypoint-aware scores** (options, off by default, not torchvision's):
   :func:`heatmaps_to_keypoints_subpixel` refines the heatmap's maximum with one Newton step
   on the logits (a log-probability up to a constant), as the "distribution-aware" decoding of
   pose estimators (Zhang et al., CVPR 2020) does on a smoothed heatmap, and
   :func:`keypoint_confidence` measures how sure each heatmap is of its peak, so a detection's
   score can weigh its keypoints as well as its box (``RoIHeads(keypoint_rescore=True)``). On
   small people (the stick figures' median area is ~1250 px^2, where OKS tolerates about
   2 px for the head) they add about 0.03 keypoint AP (``benchmarks/RESULTS.md``).

Every function (but those of item 5) equals torchvision 0.29's counterpart (``KeypointRCNNHeads``,
``KeypointRCNNPredictor``, ``keypoints_to_heatmap``, ``keypointrcnn_loss``,
``heatmaps_to_keypoints``, ``keypointrcnn_inference``) bit for bit on valid inputs, with clear
errors on invalid ones; ``tests/test_keypoint_head.py`` checks it.

Mixed precision: under ``torch.autocast`` the layers run in float16 / bfloat16, while the loss and
the inference (heatmap resizing, argmax) run in float32 with autocast off: they upcast their
float16 / bfloat16 inputs (the logits included) with ``mrcnn_edu.utils.full_precision``, so the
loss, keypoints and scores are float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import full_precision
from .box_head import _shape

__all__ = [
    "KeypointHead",
    "KeypointPredictor",
    "heatmaps_to_keypoints",
    "heatmaps_to_keypoints_subpixel",
    "keypoint_confidence",
    "keypoint_decoder",
    "keypoint_inference",
    "keypoint_loss",
    "keypoint_targets",
    "one_hot_heatmaps",
]


# ---------------------------------------------------------------------------------- layers
class KeypointHead(nn.Sequential):
    """The keypoint branch's conv tower: ``len(layers)`` blocks of 3x3 conv + ReLU.

    Args:
        in_channels: ``C`` of the pooled RoI features (256 with FPN).
        layers: output channels of each conv (the paper's ``(512,) * 8``; a CPU preset can use
            fewer, narrower convs).

    Shapes: ``[P, C, 14, 14]`` -> ``[P, layers[-1], 14, 14]`` (padding 1 keeps the size).

    Like torchvision's ``KeypointRCNNHeads`` the children are a flat sequence ``conv, ReLU,
    conv, ReLU, ...``, so the parameters are named ``0.weight, 0.bias, 2.weight, 2.bias, ...,
    2 * (len(layers) - 1).bias`` (even indices; the ReLUs hold none). Convs are created first
    and then initialised with ``kaiming_normal_`` (fan_out, ReLU) and zero bias, in
    torchvision's order, so the same seed gives the same weights.
    """

    def __init__(self, in_channels: int, layers: Sequence[int] = (512,) * 8) -> None:
        layers = tuple(int(d) for d in layers)
        if int(in_channels) <= 0 or len(layers) == 0 or min(layers) <= 0:
            raise ValueError(
                f"KeypointHead: need in_channels > 0 and at least one layer of positive width, "
                f"got in_channels={in_channels}, layers={layers}"
            )
        blocks: list[nn.Module] = []
        previous = int(in_channels)
        for dim in layers:
            blocks.append(nn.Conv2d(previous, dim, kernel_size=3, stride=1, padding=1))
            blocks.append(nn.ReLU(inplace=True))
            previous = dim
        super().__init__(*blocks)
        for layer in self.children():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(layer.bias, 0)
        self.in_channels = int(in_channels)
        self.out_channels = previous

    def forward(self, x: Tensor) -> Tensor:
        """``[P, C, h, w]`` pooled features -> ``[P, layers[-1], h, w]``."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KeypointHead: expected [P, {self.in_channels}, h, w] features, got {_shape(x)}"
            )
        return super().forward(x)


class KeypointPredictor(nn.Module):
    """One heatmap per keypoint: a 4x4 stride-2 deconvolution, then 2x bilinear upscaling.

    Args:
        in_channels: channels of the :class:`KeypointHead` output (512).
        num_keypoints: ``K``, heatmaps per RoI (17 for COCO people).

    ``kps_score_lowres``: ConvTranspose2d, kernel 4, stride 2, padding 1: ``[P, in, h, w]`` ->
    ``[P, K, 2h, 2w]`` (``(h - 1) * 2 - 2 + 4 = 2h``); then ``F.interpolate`` by
    ``up_scale = 2`` (bilinear, ``align_corners=False``) -> ``[P, K, 4h, 4w]`` logits, i.e.
    ``56 x 56`` from a ``14 x 14`` pooled feature. There is no ReLU between the two: the
    heatmaps are logits of the m^2-way softmax. Parameter names and init (``kaiming_normal_``
    fan_out weights, zero bias) are torchvision's ``KeypointRCNNPredictor``.
    """

    def __init__(self, in_channels: int, num_keypoints: int) -> None:
        super().__init__()
        if int(in_channels) <= 0 or int(num_keypoints) < 1:
            raise ValueError(
                f"KeypointPredictor: need in_channels > 0 and num_keypoints >= 1, got "
                f"{in_channels}, {num_keypoints}"
            )
        deconv_kernel = 4
        self.kps_score_lowres = nn.ConvTranspose2d(
            int(in_channels),
            int(num_keypoints),
            deconv_kernel,
            stride=2,
            padding=deconv_kernel // 2 - 1,
        )
        nn.init.kaiming_normal_(self.kps_score_lowres.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.kps_score_lowres.bias, 0)
        self.up_scale = 2
        self.in_channels = int(in_channels)
        self.out_channels = int(num_keypoints)

    def forward(self, x: Tensor) -> Tensor:
        """``[P, in_channels, h, w]`` -> ``[P, num_keypoints, 4h, 4w]`` heatmap logits."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KeypointPredictor: expected [P, {self.in_channels}, h, w] features, got "
                f"{_shape(x)}"
            )
        x = self.kps_score_lowres(x)  # [P, C, h, w] -> [P, K, 2h, 2w]
        return F.interpolate(  # [P, K, 2h, 2w] -> [P, K, 4h, 4w]
            x,
            scale_factor=float(self.up_scale),
            mode="bilinear",
            align_corners=False,
            recompute_scale_factor=False,
        )


# ----------------------------------------------------------------------------------- targets
def _check_boxes(boxes, fn: str, name: str) -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{fn}: {name} must be [P, 4] (x1, y1, x2, y2), got {_shape(boxes)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{fn}: {name} must be floating point, got {boxes.dtype}")


def keypoint_targets(
    keypoints: Tensor, rois: Tensor, heatmap_size: int = 56
) -> tuple[Tensor, Tensor]:
    """Each keypoint's one-hot target in its RoI: the flat index of its heatmap pixel.

    The RoI ``(x1, y1, x2, y2)`` is divided into an ``m x m`` grid (``m = heatmap_size``); a
    keypoint ``(x, y)`` falls in cell ::

        col = floor((x - x1) * (m / (x2 - x1))),   row = floor((y - y1) * (m / (y2 - y1)))

    and its target is the one-hot ``m x m`` mask with a 1 at ``(row, col)``, stored as the flat
    index ``row * m + col`` (the class of the m^2-way softmax). A keypoint exactly on the RoI's
    right (``x == x2``) or bottom (``y == y2``) border would land in column/row ``m``, one past
    the grid; it is put in the last one, ``m - 1``. A keypoint is *valid* when it is visible
    (``v > 0``) and its cell lies inside the grid (``0 <= row, col < m``); invalid ones get
    index 0 and are ignored by the loss (non-finite coordinates are invalid too).

    Equal to torchvision's ``keypoints_to_heatmap`` (the same float operations in the same
    order; the validity test is made on the floored floats before the integer conversion, which
    changes nothing for finite in-range values and avoids undefined float -> int64 casts).

    Args:
        keypoints: ``[P, K, 3]`` float ``(x, y, visibility)`` in image pixels, the matched gt
            keypoints of each RoI.
        rois: ``[P, 4]`` float (x1, y1, x2, y2) RoIs with ``x2 > x1`` and ``y2 > y1``.
        heatmap_size: ``m`` (56).

    Returns:
        ``(index, valid)``: ``[P, K]`` int64 flat indices in ``[0, m^2)`` and ``[P, K]`` bool.
    """
    fn = "keypoint_targets"
    _check_boxes(rois, fn, "rois")
    P = rois.shape[0]
    if (
        not isinstance(keypoints, Tensor)
        or keypoints.dim() != 3
        or keypoints.shape[2] != 3
        or keypoints.shape[0] != P
    ):
        raise ValueError(
            f"{fn}: keypoints must be [P, K, 3] = [{P}, K, 3] (x, y, visibility), one row per "
            f"RoI, got {_shape(keypoints)}"
        )
    if not keypoints.is_floating_point():
        raise TypeError(f"{fn}: keypoints must be floating point, got {keypoints.dtype}")
    m = int(heatmap_size)
    if m <= 0:
        raise ValueError(f"{fn}: heatmap_size must be positive, got {heatmap_size}")
    widths = rois[:, 2] - rois[:, 0]  # [P]
    heights = rois[:, 3] - rois[:, 1]  # [P]
    bad = ~((widths > 0) & (heights > 0))
    if bad.any():
        j = int(bad.nonzero()[0])
        raise ValueError(
            f"{fn}: rois[{j}] = {rois[j].tolist()} is degenerate (needs x2 > x1 and y2 > y1)"
        )

    scale_x = (m / widths)[:, None]  # [P] -> [P, 1]: grid cells per pixel
    scale_y = (m / heights)[:, None]
    x, y = keypoints[..., 0], keypoints[..., 1]  # [P, K] each
    on_right = x == rois[:, 2][:, None]  # [P, K]: exactly on the right border
    on_bottom = y == rois[:, 3][:, None]
    col = ((x - rois[:, 0][:, None]) * scale_x).floor()  # [P, K] float, may be outside [0, m)
    row = ((y - rois[:, 1][:, None]) * scale_y).floor()
    col = torch.where(on_right, torch.full_like(col, m - 1), col)
    row = torch.where(on_bottom, torch.full_like(row, m - 1), row)
    inside = (col >= 0) & (row >= 0) & (col < m) & (row < m)  # NaN compares False
    valid = inside & (keypoints[..., 2] > 0)  # [P, K] bool
    zero = torch.zeros_like(col)
    col = torch.where(valid, col, zero).to(torch.int64)  # invalid -> 0 before the cast
    row = torch.where(valid, row, zero).to(torch.int64)
    return row * m + col, valid


def one_hot_heatmaps(index: Tensor, valid: Tensor, heatmap_size: int = 56) -> Tensor:
    """The one-hot ``m x m`` target masks of :func:`keypoint_targets`, for drawing.

    Args:
        index: ``[P, K]`` int64 flat indices ``row * m + col``.
        valid: ``[P, K]`` bool; invalid keypoints give an all-zero mask.
        heatmap_size: ``m``.

    Returns:
        ``[P, K, m, m]`` float32 with a single 1 per valid keypoint.
    """
    fn = "one_hot_heatmaps"
    if not isinstance(index, Tensor) or index.dim() != 2:
        raise ValueError(f"{fn}: index must be [P, K], got {_shape(index)}")
    if not isinstance(valid, Tensor) or valid.shape != index.shape:
        raise ValueError(
            f"{fn}: valid must have index's shape {tuple(index.shape)}, got {_shape(valid)}"
        )
    m = int(heatmap_size)
    P, K = index.shape
    flat = torch.zeros(P, K, m * m, dtype=torch.float32, device=index.device)
    flat.scatter_(2, index[..., None].clamp(0, m * m - 1), valid[..., None].to(torch.float32))
    return flat.view(P, K, m, m)  # [P, K, m*m] -> [P, K, m, m]


# -------------------------------------------------------------------------------------- loss
@full_precision
def keypoint_loss(
    keypoint_logits: Tensor,
    proposals: Sequence[Tensor],
    gt_keypoints: Sequence[Tensor],
    keypoint_matched_idxs: Sequence[Tensor],
) -> Tensor:
    """The keypoint loss on the positive RoIs (sec. 5: m^2-way softmax cross-entropy; pure).

    Every (RoI, keypoint) pair with a valid target (:func:`keypoint_targets` with ``m`` =
    ``keypoint_logits``' size) is one sample of an ``m^2``-class classification: the logits are
    its ``m x m`` heatmap flattened, the class its one-hot pixel. The loss is the cross-entropy
    ``logsumexp(heatmap) - heatmap[target]`` averaged over all valid pairs of the batch (so an
    image with more visible keypoints weighs more, as in torchvision). Equal to torchvision's
    ``keypointrcnn_loss``.

    Args:
        keypoint_logits: ``[P, K, m, m]`` heatmap logits, ``P = sum_i P_i``.
        proposals: list per image of ``[P_i, 4]`` positive RoIs.
        gt_keypoints: list per image of ``[G_i, K, 3]`` float gt keypoints (x, y, visibility).
        keypoint_matched_idxs: list per image of ``[P_i]`` int64 gt index of each RoI.

    Returns:
        scalar loss; ``keypoint_logits.sum() * 0`` (a zero that still backpropagates) when
        there is no RoI or no valid keypoint.
    """
    fn = "keypoint_loss"
    if not isinstance(keypoint_logits, Tensor) or keypoint_logits.dim() != 4:
        raise ValueError(
            f"{fn}: keypoint_logits must be [P, K, m, m], got {_shape(keypoint_logits)}"
        )
    if not keypoint_logits.is_floating_point():
        raise TypeError(
            f"{fn}: keypoint_logits must be floating point, got {keypoint_logits.dtype}"
        )
    P, K, H, W = keypoint_logits.shape
    if H != W:
        raise ValueError(
            f"{fn}: keypoint_logits must be square [P, K, m, m], got {tuple(keypoint_logits.shape)}"
        )
    if (
        isinstance(proposals, Tensor)
        or isinstance(gt_keypoints, Tensor)
        or isinstance(keypoint_matched_idxs, Tensor)
    ):
        raise TypeError(
            f"{fn}: proposals, gt_keypoints and keypoint_matched_idxs must be lists "
            "with one tensor per image"
        )
    if not (len(proposals) == len(gt_keypoints) == len(keypoint_matched_idxs)):
        raise ValueError(
            f"{fn}: got {len(proposals)} images of proposals, {len(gt_keypoints)} of "
            f"gt_keypoints and {len(keypoint_matched_idxs)} of keypoint_matched_idxs"
        )
    total = 0
    for i, (boxes, kps, idx) in enumerate(zip(proposals, gt_keypoints, keypoint_matched_idxs)):
        _check_boxes(boxes, fn, f"proposals[{i}]")
        n = boxes.shape[0]
        total += n
        if not isinstance(kps, Tensor) or kps.dim() != 3 or kps.shape[1:] != (K, 3):
            raise ValueError(
                f"{fn}: gt_keypoints[{i}] must be [G, K, 3] = [G, {K}, 3] (K from "
                f"keypoint_logits), got {_shape(kps)}"
            )
        if not isinstance(idx, Tensor) or tuple(idx.shape) != (n,):
            raise ValueError(
                f"{fn}: keypoint_matched_idxs[{i}] must be [{n}] (one per "
                f"proposal), got {_shape(idx)}"
            )
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(
                f"{fn}: keypoint_matched_idxs[{i}] must be an integer tensor, got {idx.dtype}"
            )
        if n and (int(idx.min()) < 0 or int(idx.max()) >= kps.shape[0]):
            raise ValueError(
                f"{fn}: keypoint_matched_idxs[{i}] must lie in [0, "
                f"{kps.shape[0]}) (gt objects of image {i}), got range "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
    if total != P:
        raise ValueError(f"{fn}: keypoint_logits has {P} rows but the proposals hold {total} RoIs")

    index, valid = [], []
    for boxes, kps, idx in zip(proposals, gt_keypoints, keypoint_matched_idxs):
        ind_i, val_i = keypoint_targets(kps[idx], boxes, H)  # [P_i, K] each
        index.append(ind_i.reshape(-1))  # [P_i, K] -> [P_i * K]
        valid.append(val_i.reshape(-1))
    targets = torch.cat(index, dim=0) if index else keypoint_logits.new_zeros(0, dtype=torch.int64)
    rows = torch.where(torch.cat(valid, dim=0))[0] if valid else targets  # [V] valid pairs
    if targets.numel() == 0 or rows.numel() == 0:  # no RoI or no visible keypoint in one
        return keypoint_logits.sum() * 0

    logits = keypoint_logits.reshape(P * K, H * W)  # [P, K, m, m] -> [P*K, m*m]
    # one m^2-way softmax per (RoI, keypoint) pair, averaged over the V valid pairs
    return F.cross_entropy(logits[rows], targets[rows].to(logits.device))


# --------------------------------------------------------------------------------- inference
def _check_maps_rois(maps, rois, fn: str) -> None:
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        raise ValueError(f"{fn}: maps must be [N, K, m, m], got {_shape(maps)}")
    if not maps.is_floating_point():
        raise TypeError(f"{fn}: maps must be floating point, got {maps.dtype}")
    _check_boxes(rois, fn, "rois")
    if rois.shape[0] != maps.shape[0]:
        raise ValueError(f"{fn}: maps has {maps.shape[0]} RoIs but rois has {rois.shape[0]}")
    if rois.shape[0] and not torch.isfinite(rois).all():
        j = int((~torch.isfinite(rois)).any(dim=1).nonzero()[0])
        raise ValueError(f"{fn}: rois[{j}] = {rois[j].tolist()} is not finite")


@full_precision
def heatmaps_to_keypoints(maps: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """Keypoints in image pixels from each RoI's heatmaps (torchvision's, bit for bit).

    For RoI ``i`` of size ``w x h`` pixels (each at least 1):

    1. resize its ``[K, m, m]`` heatmaps to ``ceil(h) x ceil(w)`` (bicubic,
       ``align_corners=False``): one heatmap pixel per image pixel;
    2. take each keypoint's maximum: flat position ``pos`` -> ``x_int = pos % W``,
       ``y_int = pos // W``;
    3. map the pixel's centre back to the image: ``x = (x_int + 0.5) * w / ceil(w) + x1`` (the
       ``+ 0.5`` is Heckbert's discrete -> continuous ``c = d + 0.5``, consistent with the
       floor of :func:`keypoint_targets`), likewise ``y``; the visibility is set to 1;
    4. the score is the resized heatmap's value (a logit, not a probability) at the maximum.

    Args:
        maps: ``[N, K, m, m]`` float heatmap logits.
        rois: ``[N, 4]`` float (x1, y1, x2, y2) boxes in image pixels.

    Returns:
        ``(keypoints, scores)``: ``[N, K, 3]`` float32 ``(x, y, 1)`` and ``[N, K]`` float32
        (float32 whatever the input dtype, as torchvision).
    """
    _check_maps_rois(maps, rois, "heatmaps_to_keypoints")
    N, K = maps.shape[:2]

    offset_x, offset_y = rois[:, 0], rois[:, 1]  # [N] each
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)  # [N], at least one pixel
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()

    xy_preds = torch.zeros((N, K, 3), dtype=torch.float32, device=maps.device)
    end_scores = torch.zeros((N, K), dtype=torch.float32, device=maps.device)
    for i in range(N):
        roi_map_width = int(widths_ceil[i].item())
        roi_map_height = int(heights_ceil[i].item())
        width_correction = widths[i] / roi_map_width  # image pixels per resized-map pixel
        height_correction = heights[i] / roi_map_height
        # [K, m, m] -> [K, 1, m, m] -> bicubic -> [K, 1, Hr, Wr] -> [K, Hr, Wr]
        roi_map = F.interpolate(
            maps[i][:, None],
            size=(roi_map_height, roi_map_width),
            mode="bicubic",
            align_corners=False,
        )[:, 0]
        w = roi_map.shape[2]
        pos = roi_map.reshape(K, -1).argmax(dim=1)  # [K, Hr, Wr] -> [K, Hr*Wr] -> [K]
        x_int = pos % w
        y_int = torch.div(pos - x_int, w, rounding_mode="floor")
        x = (x_int.float() + 0.5) * width_correction  # [K], pixel centre in the RoI
        y = (y_int.float() + 0.5) * height_correction
        xy_preds[i, :, 0] = x + offset_x[i]
        xy_preds[i, :, 1] = y + offset_y[i]
        xy_preds[i, :, 2] = 1
        end_scores[i] = roi_map[torch.arange(K, device=roi_map.device), y_int, x_int]
    return xy_preds, end_scores


@full_precision
def heatmaps_to_keypoints_subpixel(maps: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """Keypoints in image pixels from each RoI's heatmaps, to a fraction of a heatmap cell.

    Not torchvision's decoding (:func:`heatmaps_to_keypoints` is); chosen with
    ``roi_heads.keypoint_decoding = "subpixel"``. For each of the ``K`` heatmaps ``L`` (logits)
    of RoI ``i`` of size ``w x h`` (each at least 1 px):

    1. the maximum cell ``(x0, y0)`` of the ``m x m`` map itself (no resizing);
    2. one Newton step on ``L`` around it: with central differences ``g = (dL/dx, dL/dy)`` and
       the 2 x 2 Hessian ``H``, the offset ``d = -H^-1 g``, the maximum of the quadratic
       through the 3 x 3 neighbourhood. Since ``L`` is the log-softmax up to a constant, this
       is the peak of the log-probability. The step is taken only where it is well defined:
       the cell is not on the map's border, ``H`` is negative definite and ``|d| <= 1`` per axis;
       elsewhere ``d = 0``;
    3. the cell coordinate ``x0 + dx`` maps to the image as the targets of
       :func:`keypoint_targets` bin it (cell ``j`` covers ``[j, j + 1) * w / m`` of the RoI):
       ``x = (x0 + dx + 0.5) * w / m + x1``, likewise ``y``; the visibility is 1;
    4. the score is the logit of the maximum cell (a logit, as :func:`heatmaps_to_keypoints`'s).

    On an exactly quadratic heatmap the step lands on its maximum; on a trained one it recovers
    the sub-pixel position that torchvision's one-pixel argmax (after resizing the map to the
    RoI's pixels) rounds away, which matters for small RoIs.

    Args:
        maps: ``[N, K, m, m]`` float heatmap logits.
        rois: ``[N, 4]`` float (x1, y1, x2, y2) boxes in image pixels.

    Returns:
        ``(keypoints, scores)``: ``[N, K, 3]`` float32 ``(x, y, 1)`` and ``[N, K]`` float32.
    """
    fn = "heatmaps_to_keypoints_subpixel"
    _check_maps_rois(maps, rois, fn)
    N, K, m = maps.shape[0], maps.shape[1], maps.shape[2]
    if maps.shape[3] != m:
        raise ValueError(f"{fn}: heatmaps must be square, got {tuple(maps.shape[2:])}")
    L = maps.double()  # [N, K, m, m]; the finite differences cancel: use float64
    flat = L.reshape(N, K, m * m)
    pos = flat.argmax(dim=2)  # [N, K]
    x0, y0 = pos % m, torch.div(pos, m, rounding_mode="floor")
    padded = F.pad(L, (1, 1, 1, 1)).reshape(N, K, (m + 2) ** 2)  # border cells get no step

    def at(dy: int, dx: int) -> Tensor:  # L[y0 + dy, x0 + dx], [N, K]
        return padded.gather(2, ((y0 + 1 + dy) * (m + 2) + x0 + 1 + dx)[..., None])[..., 0]

    c = at(0, 0)
    gx, gy = (at(0, 1) - at(0, -1)) / 2, (at(1, 0) - at(-1, 0)) / 2
    hxx = at(0, 1) - 2 * c + at(0, -1)
    hyy = at(1, 0) - 2 * c + at(-1, 0)
    hxy = (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1)) / 4
    det = hxx * hyy - hxy * hxy
    safe = torch.where(det > 0, det, torch.ones_like(det))
    dx = -(hyy * gx - hxy * gy) / safe  # -H^-1 g
    dy = -(hxx * gy - hxy * gx) / safe
    ok = (
        (x0 >= 1)
        & (x0 <= m - 2)
        & (y0 >= 1)
        & (y0 <= m - 2)
        & (det > 0)
        & (hxx < 0)
        & (dx.abs() <= 1)
        & (dy.abs() <= 1)
    )
    dx, dy = torch.where(ok, dx, 0.0), torch.where(ok, dy, 0.0)
    r = rois.double()
    widths = (r[:, 2] - r[:, 0]).clamp(min=1)[:, None]  # [N, 1]
    heights = (r[:, 3] - r[:, 1]).clamp(min=1)[:, None]
    x = (x0 + dx + 0.5) * widths / m + r[:, :1]
    y = (y0 + dy + 0.5) * heights / m + r[:, 1:2]
    keypoints = torch.stack([x, y, torch.ones_like(x)], dim=2).float()  # [N, K, 3]
    return keypoints, flat.gather(2, pos[..., None])[..., 0].float()


@full_precision
def keypoint_confidence(maps: Tensor) -> Tensor:
    """How sure each heatmap is of where its keypoint is: ``[N, K, m, m]`` logits -> ``[N, K]``.

    The largest probability the ``m^2``-way softmax of the heatmap (the distribution the loss
    trains) puts in any ``3 x 3`` window of cells: near 1 for a sharp, single peak, low for a
    flat or many-peaked map (``9 / m^2`` for a uniform one). Unlike the logit at the maximum
    (torchvision's keypoint score) it does not depend on the logits' arbitrary offset (the
    softmax ignores one). ``RoIHeads(keypoint_rescore=True)`` multiplies each detection's box
    score by the mean of its ``K`` confidences, so that COCO's keypoint AP, which ranks
    detections by score, sees well-localised people first.

    The result has the input's dtype (float32 for float16 / bfloat16 input, upcast first).
    """
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        raise ValueError(f"keypoint_confidence: maps must be [N, K, m, m], got {_shape(maps)}")
    if not maps.is_floating_point():
        raise TypeError(f"keypoint_confidence: maps must be floating point, got {maps.dtype}")
    N, K, H, W = maps.shape
    if N * K == 0:
        return maps.new_zeros((N, K))
    prob = maps.reshape(N * K, 1, H * W).softmax(dim=2).reshape(N * K, 1, H, W)
    window = F.avg_pool2d(prob, 3, stride=1, padding=1, count_include_pad=True) * 9
    return window.reshape(N, K, H * W).amax(dim=2)


@full_precision
def keypoint_inference(
    keypoint_logits: Tensor, boxes: Sequence[Tensor], decoding: str = "torchvision"
) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`heatmaps_to_keypoints` per image (torchvision's ``keypointrcnn_inference``), or
    :func:`heatmaps_to_keypoints_subpixel` with ``decoding="subpixel"``.

    Args:
        keypoint_logits: ``[D, K, m, m]`` heatmaps of all detections, ``D = sum_i D_i``.
        boxes: list per image of ``[D_i, 4]`` detected boxes (the RoIs the heatmaps were
            pooled from), in the (resized) image's pixels.
        decoding: ``"torchvision"`` (the default, torchvision's bit for bit) or ``"subpixel"``
            (:data:`KEYPOINT_DECODINGS`).

    Returns:
        ``(keypoints, scores)``: lists per image of ``[D_i, K, 3]`` float32 ``(x, y, 1)`` and
        ``[D_i, K]`` float32 scores.
    """
    fn = "keypoint_inference"
    decode = keypoint_decoder(decoding, fn)
    if not isinstance(keypoint_logits, Tensor) or keypoint_logits.dim() != 4:
        raise ValueError(
            f"{fn}: keypoint_logits must be [D, K, m, m], got {_shape(keypoint_logits)}"
        )
    if isinstance(boxes, Tensor):
        raise TypeError(f"{fn}: boxes must be a list of [D_i, 4] tensors, one per image")
    for i, b in enumerate(boxes):
        _check_boxes(b, fn, f"boxes[{i}]")
    counts = [int(b.shape[0]) for b in boxes]
    if sum(counts) != keypoint_logits.shape[0]:
        raise ValueError(
            f"{fn}: keypoint_logits has {keypoint_logits.shape[0]} rows but boxes "
            f"hold {sum(counts)}"
        )
    keypoints, scores = [], []
    for maps, b in zip(keypoint_logits.split(counts, dim=0), boxes):
        kps, sc = decode(maps, b)
        keypoints.append(kps)
        scores.append(sc)
    return keypoints, scores


# ``roi_heads.keypoint_decoding``: name -> ``(maps [N, K, m, m], rois [N, 4]) -> (kps, scores)``
KEYPOINT_DECODINGS = {
    "torchvision": heatmaps_to_keypoints,
    "subpixel": heatmaps_to_keypoints_subpixel,
}


def keypoint_decoder(name: str, fn: str, what: str = "decoding"):
    """The decoding called ``name`` in :data:`KEYPOINT_DECODINGS`; any other name raises a
    ``ValueError`` that starts with ``fn`` and names the setting (``what``) and the choices."""
    if name not in KEYPOINT_DECODINGS:
        raise ValueError(
            f"{fn}: {what} must be one of {', '.join(KEYPOINT_DECODINGS)}, got {name!r}"
        )
    return KEYPOINT_DECODINGS[name]

"""Image + target transforms: resize, flip, normalize, batch (boxes, masks and keypoints together).

Mask R-CNN (He et al. 2017, section 3.1 "Implementation Details") resizes every image so that its
shorter side is 800 pixels, unless the longer side would then exceed 1333, and trains with
horizontal flips as the only augmentation. The images of a batch are then zero-padded to a common
size that the network's largest stride divides (32 for FPN). This file holds those steps as small
callables on ``(image, target) -> (image, target)`` that move the targets with the pixels.
Notebook ``00_tour.ipynb`` shows them at work; ``07_fpn_full_model.ipynb`` wires them into the
model the way torchvision's ``GeneralizedRCNNTransform`` does.

Formats (docs/ARCHITECTURE.md):

* ``image``   float tensor ``[3, H, W]``, values in 0..1 (``Normalize`` makes them zero-mean),
* ``target``  dict with ``boxes [N, 4]`` float32 ``(x1, y1, x2, y2)`` in pixels, ``labels [N]``
  int64, optional ``masks [N, H, W]`` uint8 and ``keypoints [N, K, 3]`` float32
  ``(x, y, visibility)`` with visibility 0 = not labelled, 1 = labelled but occluded,
  2 = visible. ``crowd_boxes [M, 4]`` and ``crowd_masks [M, H, W]`` (the ``iscrowd=1`` regions
  of ``mrcnn_edu.data.CocoDetection``) move like boxes and masks. Other keys (``image_id``,
  ``area``, ``iscrowd``, ``ann_ids``) pass through unchanged.

Pixel convention: coordinates are continuous; pixel column ``i`` covers ``[i, i + 1)`` and its
centre is at ``i + 0.5``. An image of width ``W`` spans ``[0, W]``, so a horizontal mirror maps
``x -> W - x`` for box corners and keypoints alike, and flipping twice is exactly the identity.

Transforms return a new target dict when they change it; the caller's dict and tensors are
never modified in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "BOX_FIELDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KEYPOINT_FIELDS",
    "MASK_FIELDS",
    "Compose",
    "ConvertImageDtype",
    "Normalize",
    "RandomHorizontalFlip",
    "Resize",
    "batch_images",
    "check_sample",
    "collate_fn",
    "flip_boxes",
    "flip_keypoints",
    "postprocess_boxes",
    "postprocess_keypoints",
    "resize_boxes",
    "resize_keypoints",
    "resize_scale",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel RGB mean of ImageNet, images in 0..1
IMAGENET_STD = (0.229, 0.224, 0.225)  # per-channel RGB std of ImageNet

Target = dict  # str -> tensor (and pass-through values)


# --------------------------------------------------------------------------------------------
# input checks: bad input gets an error that names the transform, the field, shape and dtype
# --------------------------------------------------------------------------------------------


def _check_image(image, where: str, floating: bool = True) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"{where}: image must be a torch.Tensor [3, H, W], got {type(image).__name__}"
        )
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{where}: image must have shape [3, H, W], got {tuple(image.shape)}")
    if floating and not image.is_floating_point():
        hint = (
            " (a uint8 image holds 0..255: ConvertImageDtype() turns it into float32 in 0..1)"
            if image.dtype == torch.uint8
            else " (use ConvertImageDtype() first)"
        )
        raise TypeError(
            f"{where}: image must be a floating tensor with values in 0..1, got dtype "
            f"{image.dtype}{hint}"
        )


#: Target fields the geometric transforms move with the pixels. ``crowd_*`` are the ``iscrowd=1``
#: regions that ``mrcnn_edu.data.CocoDetection`` returns apart from the N training instances.
BOX_FIELDS = ("boxes", "crowd_boxes")  # [N, 4] / [M, 4] float (x1, y1, x2, y2)
MASK_FIELDS = ("masks", "crowd_masks")  # [N, H, W] / [M, H, W] uint8
KEYPOINT_FIELDS = ("keypoints",)  # [N, K, 3] float (x, y, visibility)

# field -> (group, ndim, shape in words); fields of one group share their first dimension
_FIELDS = {
    "boxes": ("instances", 2, "[N, 4]"),
    "labels": ("instances", 1, "[N]"),
    "masks": ("instances", 3, "[N, H, W]"),
    "keypoints": ("instances", 3, "[N, K, 3]"),
    "area": ("instances", 1, "[N]"),
    "iscrowd": ("instances", 1, "[N]"),
    "crowd_boxes": ("crowd", 2, "[M, 4]"),
    "crowd_masks": ("crowd", 3, "[M, H, W]"),
}


def check_sample(image: torch.Tensor, target: Target | None, where: str = "check_sample") -> None:
    """Raise a clear ``TypeError``/``ValueError`` if ``(image, target)`` breaks the formats above.

    Checks: image is a floating ``[3, H, W]`` tensor; ``boxes`` is ``[N, 4]`` floating;
    ``labels``, ``area``, ``iscrowd`` ``[N]``; ``masks`` ``[N, H, W]`` at the image's ``H, W``;
    ``keypoints`` ``[N, K, 3]``; all of them agree on ``N`` (and ``crowd_boxes [M, 4]``,
    ``crowd_masks [M, H, W]`` on ``M``). ``where`` names the caller in the message.
    """
    _check_image(image, where)
    if target is None:
        return
    if not isinstance(target, dict):
        raise TypeError(f"{where}: target must be a dict, got {type(target).__name__}")
    H, W = image.shape[-2:]
    lengths: dict[str, tuple[str, int]] = {}  # group -> (first field seen, its length)
    for key, (group, ndim, want) in _FIELDS.items():
        if key not in target:
            continue
        x = target[key]
        if not isinstance(x, torch.Tensor) or x.dim() != ndim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: target['{key}'] must have shape {want}, got {shape}")
        if key in BOX_FIELDS:
            if x.shape[1] != 4:
                raise ValueError(
                    f"{where}: target['{key}'] must have shape {want}, got {tuple(x.shape)}"
                )
            if not x.is_floating_point():
                raise TypeError(
                    f"{where}: target['{key}'] must be floating (float32), got {x.dtype}"
                )
        if key in MASK_FIELDS and tuple(x.shape[1:]) != (H, W):
            raise ValueError(
                f"{where}: target['{key}'] has size {tuple(x.shape[1:])} but the image is "
                f"{(H, W)}; masks must be {want} at the image's size"
            )
        if key in KEYPOINT_FIELDS and x.shape[2] != 3:
            raise ValueError(
                f"{where}: target['{key}'] must have shape {want} (x, y, visibility), "
                f"got {tuple(x.shape)}"
            )
        if group not in lengths:
            lengths[group] = (key, x.shape[0])
        elif x.shape[0] != lengths[group][1]:
            first, n = lengths[group]
            raise ValueError(
                f"{where}: target['{key}'] has {x.shape[0]} entries but target['{first}'] has "
                f"{n}; these per-instance fields must have the same length"
            )


# --------------------------------------------------------------------------------------------
# plain functions (the transforms below are thin wrappers; the model's post-processing uses these)
# --------------------------------------------------------------------------------------------


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """The scale factor of section 3.1: shorter side to ``min_size``, unless the longer side
    would then exceed ``max_size``.

    ``scale = min(min_size / short, max_size / long)``, computed in Python floats exactly as
    torchvision's ``_resize_image_and_masks`` does.
    ``resize_scale(480, 640, 800, 1333) == 800/480``.
    """
    short, long = min(height, width), max(height, width)
    return min(min_size / short, max_size / long)


def _ratios(
    from_size: Sequence[int], to_size: Sequence[int], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis ratios ``new / old`` as float32 tensors ``(ratio_h, ratio_w)`` (as torchvision)."""
    ratio_h, ratio_w = (
        torch.tensor(float(s_new), dtype=torch.float32, device=device)
        / torch.tensor(float(s_old), dtype=torch.float32, device=device)
        for s_new, s_old in zip(to_size, from_size)
    )
    return ratio_h, ratio_w


def resize_boxes(
    boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]
) -> torch.Tensor:
    """Scale ``boxes [N, 4]`` float (x1, y1, x2, y2) from an image of ``from_size (h, w)`` to
    ``to_size``.

    x is multiplied by ``w_new / w_old`` and y by ``h_new / h_old`` (ratios of the integer sizes
    actually produced, not the requested scale). Returns a new ``[N, 4]`` tensor.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"resize_boxes: boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    ratio_h, ratio_w = _ratios(from_size, to_size, boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def resize_keypoints(
    keypoints: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]
) -> torch.Tensor:
    """Scale ``keypoints [N, K, 3]`` (x, y, visibility) between image sizes; visibility is kept."""
    if keypoints.dim() != 3 or keypoints.shape[2] != 3:
        raise ValueError(
            f"resize_keypoints: keypoints must have shape [N, K, 3], got {tuple(keypoints.shape)}"
        )
    ratio_h, ratio_w = _ratios(from_size, to_size, keypoints.device)
    out = keypoints.clone()
    out[..., 0] *= ratio_w
    out[..., 1] *= ratio_h
    return out


def postprocess_boxes(
    boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]
) -> torch.Tensor:
    """Map predicted ``boxes [N, 4]`` from the resized input ``from_size (h, w)`` back to the
    original image ``to_size (h, w)``: the model's last step (torchvision's ``resize_boxes``)."""
    return resize_boxes(boxes, from_size, to_size)


def postprocess_keypoints(
    keypoints: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]
) -> torch.Tensor:
    """Map predicted ``keypoints [N, K, 3]`` from the resized input back to the original image."""
    return resize_keypoints(keypoints, from_size, to_size)


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``boxes [N, 4]`` (x1, y1, x2, y2) in an image of ``width``:
    ``x1' = W - x2``, ``x2' = W - x1``."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=1)


def flip_keypoints(
    keypoints: torch.Tensor, width: int, flip_index: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Mirror ``keypoints [N, K, 3]``: ``x' = W - x``, then swap left/right with ``flip_index``.

    ``flip_index[k]`` is the keypoint that becomes keypoint ``k`` after the flip (for COCO people,
    ``left_eye`` <-> ``right_eye`` and so on); ``None`` keeps the order. Without the swap a flipped
    person's "left wrist" would sit on the right side of the body, so the keypoint head would be
    taught contradictory targets. Keypoints with visibility 0 (not labelled; COCO stores them as
    ``(0, 0, 0)``) keep their coordinates. Flipping twice with the same ``flip_index`` is the
    identity whenever ``flip_index`` is its own inverse (a swap of pairs, as in every keypoint set),
    exactly for coordinates on a dyadic grid (integers, half pixels) and up to one float32 rounding
    of ``W - x`` otherwise.
    """
    out = keypoints.clone()
    labelled = out[..., 2] > 0  # [N, K]
    out[..., 0] = torch.where(labelled, width - out[..., 0], out[..., 0])
    if flip_index is not None:
        idx = torch.as_tensor(flip_index, dtype=torch.long, device=keypoints.device)
        if idx.dim() != 1 or idx.numel() != keypoints.shape[1]:
            raise ValueError(
                f"flip_keypoints: flip_index must list one index per keypoint "
                f"({keypoints.shape[1]}), got shape {tuple(idx.shape)}"
            )
        out = out[:, idx]  # [N, K, 3], keypoint k <- keypoint flip_index[k]
    return out


# --------------------------------------------------------------------------------------------
# transforms: callables (image, target) -> (image, target)
# --------------------------------------------------------------------------------------------


class Compose:
    """Apply transforms in order: ``Compose([Resize(800, 1333), RandomHorizontalFlip(0.5)])``."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target=None):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class ConvertImageDtype:
    """Turn a ``[3, H, W]`` uint8 image (0..255) into float32 (0..1); float images pass through."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def __call__(self, image, target=None):
        _check_image(image, "ConvertImageDtype", floating=False)
        if image.dtype == torch.uint8:
            image = image.to(self.dtype) / 255.0
        elif image.is_floating_point():
            image = image.to(self.dtype)
        else:
            raise TypeError(
                f"ConvertImageDtype: expected a uint8 or float image, got {image.dtype}"
            )
        return image, target

    def __repr__(self) -> str:
        return f"ConvertImageDtype({self.dtype})"


class Resize:
    """Resize so the shorter side is ``min_size`` unless the longer side would exceed ``max_size``.

    Identical to torchvision's ``GeneralizedRCNNTransform`` resize (section 3.1 of the paper):

    * ``scale = min(min_size / short_side, max_size / long_side)``;
    * image ``[3, H, W]``: bilinear ``F.interpolate(scale_factor=scale,
      recompute_scale_factor=True, align_corners=False)``, so the new size is
      ``floor(H * scale), floor(W * scale)``;
    * ``masks [N, H, W]`` uint8: nearest-neighbour interpolation with the same scale;
    * ``boxes [N, 4]`` and ``keypoints [N, K, 3]``: x times ``W'/W``, y times ``H'/H`` (the ratio
      of the integer sizes, so boxes stay aligned with the pixels actually produced);
      keypoint visibility is kept.

    ``min_size`` may be a tuple for multi-scale training; one entry is then drawn per call with
    ``generator`` (torchvision draws it the same way from the global RNG). ``area`` is left as it
    is (COCO evaluation reads areas of the original annotations).
    """

    def __init__(
        self,
        min_size: int | Sequence[int] = 800,
        max_size: int = 1333,
        generator: torch.Generator | None = None,
    ):
        self.min_sizes = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        if not self.min_sizes or any(s <= 0 for s in self.min_sizes) or max_size <= 0:
            raise ValueError(
                f"Resize: sizes must be positive, got min_size={min_size}, max_size={max_size}"
            )
        self.max_size = max_size
        self.generator = generator

    def _pick_min_size(self) -> int:
        if len(self.min_sizes) == 1:
            return self.min_sizes[0]
        i = int(torch.randint(len(self.min_sizes), (1,), generator=self.generator).item())
        return self.min_sizes[i]

    def __call__(self, image, target=None):
        check_sample(image, target, "Resize")
        H, W = image.shape[-2:]
        scale = resize_scale(H, W, self._pick_min_size(), self.max_size)
        # [3, H, W] -> [1, 3, H, W] -> interpolate -> [3, H', W']
        image = F.interpolate(
            image[None],
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        if target is None:
            return image, None
        new_size = tuple(image.shape[-2:])
        target = dict(target)
        for key in BOX_FIELDS:
            if key in target:
                target[key] = resize_boxes(target[key], (H, W), new_size)
        for key in MASK_FIELDS:
            if key in target:
                masks = target[key]
                # [N, H, W] -> [N, 1, H, W] float -> nearest -> [N, H', W'] in the input dtype
                resized = F.interpolate(
                    masks[:, None].float(), scale_factor=scale, recompute_scale_factor=True
                )[:, 0]
                target[key] = resized.to(masks.dtype)
        for key in KEYPOINT_FIELDS:
            if key in target:
                target[key] = resize_keypoints(target[key], (H, W), new_size)
        return image, target

    def __repr__(self) -> str:
        m = self.min_sizes[0] if len(self.min_sizes) == 1 else self.min_sizes
        return f"Resize(min_size={m}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror image, boxes, masks and keypoints left-right with probability ``p``.

    ``flip_index`` (see :func:`flip_keypoints`) swaps left/right keypoints; ``generator`` makes the
    coin flips reproducible (``torch.rand(1, generator=generator) < p``). With ``p=1`` it always
    flips, and applying it twice gives back the input exactly.
    """

    def __init__(
        self,
        p: float = 0.5,
        flip_index: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p
        self.flip_index = None if flip_index is None else list(flip_index)
        self.generator = generator

    def __call__(self, image, target=None):
        check_sample(image, target, "RandomHorizontalFlip")
        if torch.rand(1, generator=self.generator).item() >= self.p:
            return image, target
        W = image.shape[-1]
        image = image.flip(-1)  # [3, H, W], column x -> W - 1 - x
        if target is None:
            return image, None
        target = dict(target)
        for key in BOX_FIELDS:
            if key in target:
                target[key] = flip_boxes(target[key], W)
        for key in MASK_FIELDS:
            if key in target:
                target[key] = target[key].flip(-1)  # [N, H, W], column x -> W - 1 - x
        for key in KEYPOINT_FIELDS:
            if key in target:
                target[key] = flip_keypoints(target[key], W, self.flip_index)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Normalize:
    """``(image - mean) / std`` per channel (ImageNet statistics by default); targets untouched.

    ``Normalize.inverse(image)`` undoes it (``image * std + mean``), e.g. to draw a network input.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"Normalize: mean and std need 3 values (RGB), got {mean}, {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize: std must be positive, got {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def _stats(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.as_tensor(self.mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=image.dtype, device=image.device)[:, None, None]
        return mean, std  # [3, 1, 1] each, broadcast over H, W

    def __call__(self, image, target=None):
        _check_image(image, "Normalize")
        mean, std = self._stats(image)
        return (image - mean) / std, target

    def inverse(self, image: torch.Tensor) -> torch.Tensor:
        """Undo the normalization of a ``[3, H, W]`` (or ``[B, 3, H, W]``) float image."""
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(
                f"Normalize.inverse: image must be [3, H, W] or [B, 3, H, W], got {shape}"
            )
        mean, std = self._stats(image)
        return image * std + mean

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------


def batch_images(
    images: Sequence[torch.Tensor], size_divisible: int = 32
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad a list of float ``[3, H_i, W_i]`` images into one ``[B, 3, H', W']`` tensor.

    ``H' = ceil(max_i H_i / size_divisible) * size_divisible`` (same for ``W'``), so every
    feature map of a stride-``size_divisible`` backbone has an integer size. Each image sits in
    the top-left corner, padding at the bottom and right, so box coordinates need no change.
    Equal to torchvision's ``GeneralizedRCNNTransform.batch_images``. Returns the batch and
    ``image_sizes``, the list of ``(H_i, W_i)`` before padding (the model clips boxes to these).
    """
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("batch_images: images must be a non-empty list of [3, H, W] tensors")
    if size_divisible < 1:
        raise ValueError(f"batch_images: size_divisible must be >= 1, got {size_divisible}")
    for i, img in enumerate(images):
        # float only: a uint8 batch would reach the backbone as 0..255 (or fail deep inside it)
        _check_image(img, f"batch_images (image {i})")
        if img.dtype != images[0].dtype or img.device != images[0].device:
            raise ValueError(
                f"batch_images: image {i} is {img.dtype} on {img.device} but image 0 is "
                f"{images[0].dtype} on {images[0].device}"
            )
    image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    max_h = max(h for h, _ in image_sizes)
    max_w = max(w for _, w in image_sizes)
    H = int(math.ceil(max_h / size_divisible) * size_divisible)
    W = int(math.ceil(max_w / size_divisible) * size_divisible)
    batch = images[0].new_zeros((len(images), 3, H, W))  # [B, 3, H', W']
    for i, img in enumerate(images):
        h, w = image_sizes[i]
        batch[i, :, :h, :w].copy_(img)
    return batch, image_sizes


def collate_fn(batch: Sequence[tuple]) -> tuple[list, list]:
    """DataLoader ``collate_fn``: ``[(image, target), ...] -> ([images], [targets])``.

    Detection images differ in size and targets in length, so they stay in lists; the model
    pads the images with :func:`batch_images`.
    """
    if len(batch) == 0:
        return [], []
    for i, sample in enumerate(batch):
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise ValueError(
                f"collate_fn: sample {i} must be an (image, target) pair, "
                f"got {type(sample).__name__}"
            )
    images, targets = zip(*batch)
    return list(images), list(targets)

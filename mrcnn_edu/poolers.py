"""Multi-level RoI pooling: crop every RoI from the one pyramid level that suits its size.

Mask R-CNN (He et al. 2017) section 3, "Network Architecture", pools RoI features from the
Feature Pyramid Network (Lin et al. 2017) as the FPN paper's section 4.2 prescribes: an RoI of
width ``w`` and height ``h`` (image pixels) is pooled from level ``P_k`` with::

    k = floor(k0 + log2(sqrt(w * h) / 224))            # Eqn. (1) of the FPN paper

where ``224`` (``CANONICAL_SCALE``) is the ImageNet pre-training size and ``k0 = 4``
(``CANONICAL_LEVEL``) the level a 224 x 224 RoI maps to (``P4``, like the single-map C4
detector). Halving the RoI's side moves it one level finer, so every RoI covers about the same
number of feature-map cells. ``k`` is clamped to the levels present (``P2..P5`` in the paper:
``P6`` only serves the RPN). Notebook ``07_fpn_full_model.ipynb`` explains it.

:class:`MultiLevelRoIPooler` is torchvision's ``MultiScaleRoIAlign`` (same level assignment,
including its ``eps`` and float handling, same scale inference) with two switches the paper's
Table 2 ablations need: ``op="align" | "pool"`` (RoIAlign vs RoIPool) and ``aligned`` (the
half-pixel shift), plus the ``backend`` of ``mrcnn_edu.ops``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .ops import roi_align, roi_pool
from .ops._common import BACKENDS
from .ops.roi import boxes_to_rois
from .utils import LOW_PRECISION, autocast_disabled

__all__ = [
    "CANONICAL_LEVEL",
    "CANONICAL_SCALE",
    "MultiLevelRoIPooler",
    "assign_levels",
    "infer_scales",
]

# Eqn. (1) of the FPN paper: k = floor(CANONICAL_LEVEL + log2(sqrt(w * h) / CANONICAL_SCALE))
CANONICAL_SCALE = 224  # side (pixels) of an RoI that maps to CANONICAL_LEVEL: ImageNet's 224
CANONICAL_LEVEL = 4  # k0: a 224 x 224 RoI is pooled from P4 (stride 16)
OPS = ("align", "pool")


def assign_levels(
    boxes: torch.Tensor,
    k_min: int,
    k_max: int,
    canonical_scale: float = CANONICAL_SCALE,
    canonical_level: int = CANONICAL_LEVEL,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Pyramid level of every box by Eqn. (1) of the FPN paper, as an index from ``k_min``.

    ``k = clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), k_min,
    k_max)``, returned as ``k - k_min``. The small ``eps`` puts a box exactly on a level boundary
    (e.g. 224 x 224) on the coarser level despite float rounding. Numerics are those of
    torchvision's ``LevelMapper`` (float16/bfloat16 boxes are computed in float32); a box of
    negative area (only one of ``x2 < x1``, ``y2 < y1``) gets level ``k_min``, where torchvision's
    result is undefined.

    Args:
        boxes: ``[K, 4]`` float ``(x1, y1, x2, y2)`` in image pixels.
        k_min, k_max: finest and coarsest level present (2 and 5 for ``P2..P5``).
        canonical_scale, canonical_level: ``224`` and ``k0 = 4`` of Eqn. (1).
        eps: added before the floor.

    Returns:
        ``[K]`` int64 level index in ``0 .. k_max - k_min``.

    >>> assign_levels(torch.tensor([[0., 0., 224., 224.], [0., 0., 112., 112.],
    ...                             [0., 0., 10., 10.], [0., 0., 1000., 1000.]]), 2, 5)
    tensor([2, 1, 0, 3])
    """
    who = "assign_levels"
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{who}: boxes must be a [K, 4] tensor, got {got}")
    if not boxes.is_floating_point():
        raise TypeError(f"{who}: boxes must be floating point, got {boxes.dtype}")
    if int(k_min) != k_min or int(k_max) != k_max or k_min > k_max:
        raise ValueError(
            f"{who}: k_min and k_max must be ints with k_min <= k_max, got {k_min}, {k_max}"
        )
    k_min, k_max = int(k_min), int(k_max)
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()  # torchvision's box_area upcasts half precision
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [K]
    s = torch.sqrt(area)  # [K] sqrt(w h)
    # Eqn. (1) of the FPN paper (same operation order as torchvision, so same rounding)
    k = torch.floor(
        canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype)
    )
    k = torch.clamp(k, min=k_min, max=k_max)
    k = torch.where(torch.isnan(k), torch.full_like(k, k_min), k)  # negative area
    return k.to(torch.int64) - k_min


def infer_scales(feature_shapes, image_size) -> list[float]:
    """Spatial scale (feature pixels per image pixel) of each map, a power of two.

    ``scale = 2 ** round(log2(h_feature / H))``: rounding absorbs the ceil of odd sizes and the
    padding of the batch. Like torchvision's ``_infer_scale`` only the height is used, and
    ``image_size`` is the largest ``(H, W)`` over the batch's images (the pooler passes it).

    Args:
        feature_shapes: per map, its shape or size; the last two entries are ``(h, w)``.
        image_size: ``(H, W)`` in image pixels.

    Returns:
        list of floats, e.g. ``[0.25, 0.125, 0.0625, 0.03125]`` for strides 4..32.

    >>> infer_scales([(2, 256, 200, 304), (2, 256, 100, 152)], (800, 1201))
    [0.25, 0.125]
    """
    H = float(image_size[0])
    if not H > 0:
        raise ValueError(f"infer_scales: image height must be positive, got {image_size}")
    scales = []
    for shape in feature_shapes:
        approx = float(shape[-2]) / H
        scales.append(2 ** float(torch.tensor(approx).log2().round()))
    return scales


def _output_size(output_size) -> tuple[int, int]:
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, Sequence)
        and len(output_size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in output_size)
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(
            f"MultiLevelRoIPooler: output_size must be an int or a pair of ints "
            f"(h, w), got {output_size!r}"
        )
    if min(size) <= 0:
        raise ValueError(f"MultiLevelRoIPooler: output_size must be positive, got {size}")
    return size


class MultiLevelRoIPooler(nn.Module):
    """Pool ``output_size`` features for every proposal from its pyramid level.

    Args:
        featmap_names: keys of the feature dict to pool from, finest first, consecutive
            levels (each half the resolution of the previous), e.g. ``["0", "1", "2", "3"]``
            (``"pool"`` = P6 is left out, as in the paper).
        output_size: ``int`` or ``(oh, ow)``: 7 for the box head, 14 for the mask head.
        sampling_ratio: RoIAlign samples per bin and axis (``<= 0``: adaptive).
        op: ``"align"`` (RoIAlign, Mask R-CNN) or ``"pool"`` (RoIPool, Fast R-CNN).
        aligned: RoIAlign's half-pixel shift (``False``: torchvision/Detectron v1).
        backend: ``mrcnn_edu.ops`` backend: ``"auto"`` | ``"reference"`` | ``"numba"`` |
            ``"cuda"`` | ``"torchvision"``.
        canonical_scale, canonical_level: ``224`` and ``k0 = 4`` of Eqn. (1).

    ``op``, ``aligned``, ``sampling_ratio`` and ``backend`` are attributes that may be set
    later (an ablation switches them on a built model); a bad value raises at once.

    ``forward(features, proposals, image_sizes)``:
        features: mapping name -> ``[B, C, h_l, w_l]`` float (may hold extra maps).
        proposals: list of ``B`` tensors ``[K_i, 4]`` ``(x1, y1, x2, y2)`` in image pixels,
            of the features' dtype and device (float32 or float64 for float16 / bfloat16
            features: the mixed-precision case, where the boxes stay float32).
        image_sizes: list of ``B`` ``(h, w)``: the images' sizes before padding; their
            maximum fixes the scales (:func:`infer_scales`), recomputed on every call (torchvision
            keeps those of its first call).
        returns ``[sum K_i, C, oh, ow]`` of the features' dtype, rows in the order of the
        concatenated proposals. It runs with ``torch.autocast`` off: float16 / bfloat16
        features are pooled in float32 by ``mrcnn_edu.ops`` and returned in their own dtype.
    """

    def __init__(
        self,
        featmap_names,
        output_size,
        sampling_ratio: int = 2,
        *,
        op: str = "align",
        aligned: bool = False,
        backend: str = "auto",
        canonical_scale: float = CANONICAL_SCALE,
        canonical_level: int = CANONICAL_LEVEL,
    ) -> None:
        super().__init__()
        if isinstance(featmap_names, str) or not isinstance(featmap_names, Sequence):
            raise TypeError(
                f"MultiLevelRoIPooler: featmap_names must be a list of str, got {featmap_names!r}"
            )
        names = list(featmap_names)
        if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(
                f"MultiLevelRoIPooler: featmap_names must be distinct strings, "
                f"got {featmap_names!r}"
            )
        if not canonical_scale > 0:
            raise ValueError(
                f"MultiLevelRoIPooler: canonical_scale must be positive, got {canonical_scale!r}"
            )
        self.featmap_names = names
        self.output_size = _output_size(output_size)
        self.op = op
        self.aligned = aligned
        self.sampling_ratio = sampling_ratio
        self.backend = backend
        self.canonical_scale = canonical_scale
        self.canonical_level = int(canonical_level)

    # -- switchable settings, validated when set ----------------------------------------------
    @property
    def op(self) -> str:
        return self._op

    @op.setter
    def op(self, value: str) -> None:
        if value not in OPS:
            raise ValueError(f"MultiLevelRoIPooler: unknown op {value!r}; expected one of {OPS}")
        self._op = value

    @property
    def aligned(self) -> bool:
        return self._aligned

    @aligned.setter
    def aligned(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"MultiLevelRoIPooler: aligned must be a bool, got {value!r}")
        self._aligned = value

    @property
    def sampling_ratio(self) -> int:
        return self._sampling_ratio

    @sampling_ratio.setter
    def sampling_ratio(self, value: int) -> None:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"MultiLevelRoIPooler: sampling_ratio must be an int, got {value!r}")
        self._sampling_ratio = int(value)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(
                f"MultiLevelRoIPooler: unknown backend {value!r}; expected one of {BACKENDS}"
            )
        self._backend = value

    def extra_repr(self) -> str:
        return (
            f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio}, op={self.op!r}, aligned={self.aligned}, "
            f"backend={self.backend!r}"
        )

    # -- pooling -------------------------------------------------------------------------------
    def _pool(self, fmap: torch.Tensor, rois: torch.Tensor, scale: float) -> torch.Tensor:
        """``fmap [B, C, h, w]``, ``rois [K, 5]`` -> ``[K, C, oh, ow]`` with the chosen op."""
        if self.op == "align":
            return roi_align(
                fmap,
                rois,
                self.output_size,
                scale,
                self.sampling_ratio,
                self.aligned,
                backend=self.backend,
            )
        return roi_pool(fmap, rois, self.output_size, scale, backend=self.backend)

    def _check_inputs(self, features, proposals, image_sizes) -> list[torch.Tensor]:
        who = "MultiLevelRoIPooler"
        if not isinstance(features, Mapping):
            raise TypeError(
                f"{who}: features must be a dict name -> [B, C, h, w] tensor, got "
                f"{type(features).__name__}"
            )
        missing = [n for n in self.featmap_names if n not in features]
        if missing:
            raise KeyError(
                f"{who}: feature maps {missing} are missing from features (it has {list(features)})"
            )
        maps = [features[n] for n in self.featmap_names]
        first = maps[0]
        for name, m in zip(self.featmap_names, maps):
            if not isinstance(m, torch.Tensor) or m.dim() != 4 or not m.is_floating_point():
                got = (
                    f"{tuple(m.shape)} {m.dtype}"
                    if isinstance(m, torch.Tensor)
                    else type(m).__name__
                )
                raise ValueError(
                    f"{who}: features[{name!r}] must be a float [B, C, h, w] tensor, got {got}"
                )
            if m.shape[:2] != first.shape[:2] or m.dtype != first.dtype or m.device != first.device:
                raise ValueError(
                    f"{who}: features[{name!r}] is [B, C] = {tuple(m.shape[:2])} "
                    f"{m.dtype} on {m.device} but features"
                    f"[{self.featmap_names[0]!r}] is {tuple(first.shape[:2])} "
                    f"{first.dtype} on {first.device}"
                )
        B = first.shape[0]
        if not isinstance(proposals, (list, tuple)) or len(proposals) != B:
            got = (
                len(proposals) if isinstance(proposals, (list, tuple)) else type(proposals).__name__
            )
            raise ValueError(
                f"{who}: proposals must be a list of one [K_i, 4] tensor per image; "
                f"the features have B={B} images, got {got}"
            )
        for i, p in enumerate(proposals):
            if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[1] != 4:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"{who}: proposals[{i}] must be a [K, 4] tensor, got {got}")
            # under torch.autocast the features are float16 / bfloat16 while the boxes stay
            # float32 (bfloat16 coordinates would be off by pixels): the ops take that pair
            same = p.dtype == first.dtype or (
                first.dtype in LOW_PRECISION and p.dtype in (torch.float32, torch.float64)
            )
            if not same or p.device != first.device:
                raise TypeError(
                    f"{who}: proposals[{i}] is {p.dtype} on {p.device} but the "
                    f"features are {first.dtype} on {first.device}"
                )
        if not isinstance(image_sizes, (list, tuple)) or len(image_sizes) != B:
            got = (
                len(image_sizes)
                if isinstance(image_sizes, (list, tuple))
                else type(image_sizes).__name__
            )
            raise ValueError(
                f"{who}: image_sizes must be a list of one (h, w) per image; the "
                f"features have B={B} images, got {got}"
            )
        return maps

    def forward(self, features: Mapping[str, torch.Tensor], proposals, image_sizes) -> torch.Tensor:
        # autocast off: the level assignment and the RoI ops compute in float32 (float16 /
        # bfloat16 features are pooled in float32 and returned in their own dtype)
        with autocast_disabled():
            return self._forward(features, proposals, image_sizes)

    def _forward(self, features, proposals, image_sizes) -> torch.Tensor:
        maps = self._check_inputs(features, proposals, image_sizes)
        B, C = maps[0].shape[:2]
        # torchvision's reference size: the largest height and width over the batch's images
        image_size = (max(int(s[0]) for s in image_sizes), max(int(s[1]) for s in image_sizes))
        scales = infer_scales([m.shape for m in maps], image_size)
        rois = boxes_to_rois(list(proposals)) if B else maps[0].new_zeros((0, 5))  # [K, 5]

        if len(maps) == 1:  # a single map (C4, C5): no level assignment
            return self._pool(maps[0], rois, scales[0])

        levels_k = [-math.log2(s) for s in scales]  # e.g. [2, 3, 4, 5] for strides 4..32
        if any(b - a != 1 for a, b in itertools.pairwise(levels_k)):
            raise ValueError(
                f"MultiLevelRoIPooler: feature maps {self.featmap_names} must be "
                f"consecutive pyramid levels, finest first; inferred strides "
                f"{[round(1 / s) for s in scales]} from image size {image_size}"
            )
        levels = assign_levels(
            rois[:, 1:],
            round(levels_k[0]),
            round(levels_k[-1]),
            self.canonical_scale,
            self.canonical_level,
        )  # [K] 0..L-1

        result = maps[0].new_zeros((rois.shape[0], C) + self.output_size)  # [K, C, oh, ow]
        for level, (fmap, scale) in enumerate(zip(maps, scales)):
            idx = torch.where(levels == level)[0]  # rows of the RoIs pooled from this level
            # called even for no RoIs, so the result stays in the graph of every map (as
            # torchvision); the cast matters under autocast, where the levels' dtypes may differ
            result[idx] = self._pool(fmap, rois[idx], scale).to(result.dtype)
        return result

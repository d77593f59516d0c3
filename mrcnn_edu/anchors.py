"""Anchors: the reference boxes the RPN classifies and regresses (Faster R-CNN, section 3.1.1).

Explained in notebook ``04_anchors_and_rpn.ipynb``. At every position of a feature map the RPN
looks at ``A`` anchors: boxes of a few sizes (scales) and aspect ratios centred on that
position. With FPN (Mask R-CNN section 3, FPN paper section 4.1) each pyramid level gets ONE size
(32, 64, 128, 256, 512 pixels for P2..P6) and three aspect ratios (1:2, 1:1, 2:1), so ``A = 3``.

An anchor of size ``s`` and aspect ratio ``r = h / w`` keeps the area ``s^2``::

    h = s * sqrt(r)          w = s / sqrt(r)

The zero-centred "cell anchor" ``(-w/2, -h/2, w/2, h/2)`` is rounded to integers (as torchvision
and Detectron do), then shifted to the top-left corner of every feature-map cell:
position ``(i, j)`` of a level with stride ``(s_y, s_x)`` gets the shift ``(j s_x, i s_y)``.
The order of the flattened anchors is torchvision's: level by level, then location-major (row
``i``, column ``j``), then the ``A`` anchors of that location. The RPN head's outputs are
flattened in the same order (``rpn.concat_box_prediction_layers``), so anchor ``n`` and
prediction ``n`` belong together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["AnchorGenerator", "generate_cell_anchors"]


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Zero-centred anchors for every (aspect ratio, size) pair, rounded to integers.

    Args:
        sizes: anchor sizes ``s`` (square root of the area), pixels.
        aspect_ratios: ``r = height / width``.

    Returns:
        ``[len(aspect_ratios) * len(sizes), 4]`` float32 ``(x1, y1, x2, y2)``, ratio-major
        (all sizes of the first ratio, then the next ratio), as torchvision orders them.

    >>> generate_cell_anchors((32,), (0.5, 1.0, 2.0))
    tensor([[-23., -11.,  23.,  11.],
            [-16., -16.,  16.,  16.],
            [-11., -23.,  11.,  23.]])
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)  # [S]
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)  # [R]
    if scales.dim() != 1 or ratios.dim() != 1 or scales.numel() == 0 or ratios.numel() == 0:
        raise ValueError(
            "generate_cell_anchors: sizes and aspect_ratios must be non-empty sequences of "
            f"numbers, got {sizes!r} and {aspect_ratios!r}"
        )
    if bool((scales <= 0).any()) or bool((ratios <= 0).any()):
        raise ValueError(
            "generate_cell_anchors: sizes and aspect_ratios must be positive, "
            f"got {sizes!r}, {aspect_ratios!r}"
        )
    h_ratios = torch.sqrt(ratios)  # h = s * sqrt(r)
    w_ratios = 1 / h_ratios  # w = s / sqrt(r)
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # [R, S] -> [R*S]
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)  # [R, S] -> [R*S]
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [R*S, 4]


class AnchorGenerator:
    """Anchors for every level of a feature pyramid.

    Args:
        sizes: one tuple of sizes per level (default: one size per FPN level P2..P6).
        aspect_ratios: one tuple of ratios ``h / w`` per level.

    Attributes:
        cell_anchors: list per level of ``[A_l, 4]`` float32 zero-centred anchors.

    >>> gen = AnchorGenerator(sizes=((32,),), aspect_ratios=((1.0,),))
    >>> gen((64, 64), [(2, 2)])          # stride 32: 4 cells, 1 anchor each
    tensor([[-16., -16.,  16.,  16.],
            [ 16., -16.,  48.,  16.],
            [-16.,  16.,  16.,  48.],
            [ 16.,  16.,  48.,  48.]])
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
    ) -> None:
        # accept the flat forms torchvision accepts: sizes=(32, 64) means one size per level, and a
        # flat aspect_ratios tuple is used on every level
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"AnchorGenerator: got {len(sizes)} levels of sizes but {len(aspect_ratios)} "
                "levels of aspect_ratios; give one tuple of each per feature level"
            )
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
        self.cell_anchors = [
            generate_cell_anchors(s, a) for s, a in zip(self.sizes, self.aspect_ratios)
        ]

    def __repr__(self) -> str:
        return f"AnchorGenerator(sizes={self.sizes}, aspect_ratios={self.aspect_ratios})"

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def num_anchors_per_location(self) -> list[int]:
        """``A_l`` for every level: ``len(sizes[l]) * len(aspect_ratios[l])``."""
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(
        self,
        feature_shapes: Sequence[tuple[int, int]],
        strides: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """Shift each level's cell anchors to every position of its feature map.

        Args:
            feature_shapes: ``(h_l, w_l)`` per level.
            strides: ``(s_y, s_x)`` per level, pixels between neighbouring positions.

        Returns:
            list per level of ``[h_l * w_l * A_l, 4]`` anchors, location-major then anchor.
        """
        if not (len(feature_shapes) == len(strides) == self.num_levels):
            raise ValueError(
                f"AnchorGenerator.grid_anchors: got {len(feature_shapes)} feature shapes and "
                f"{len(strides)} strides, but the generator has {self.num_levels} levels of sizes "
                f"{self.sizes}; give one feature map per level"
            )
        anchors = []
        for (h, w), (stride_y, stride_x), cell in zip(feature_shapes, strides, self.cell_anchors):
            cell = cell.to(dtype=dtype, device=device)  # [A, 4]
            shifts_x = torch.arange(0, int(w), dtype=torch.int64, device=device) * int(
                stride_x
            )  # [w]
            shifts_y = torch.arange(0, int(h), dtype=torch.int64, device=device) * int(
                stride_y
            )  # [h]
            grid_y, grid_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")  # [h, w] each
            grid_x = grid_x.reshape(-1)  # [h, w] -> [h*w], row-major: location (i, j) -> i*w + j
            grid_y = grid_y.reshape(-1)
            shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=1)  # [h*w, 4]
            # [h*w, 1, 4] + [1, A, 4] -> [h*w, A, 4] -> [h*w*A, 4]
            anchors.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def strides_for(
        self, image_shape: tuple[int, int], feature_shapes: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """Strides ``(H // h_l, W // w_l)`` per level for a padded batch of size ``(H, W)``.

        A feature map larger than the image (``h_l > H`` or ``w_l > W``) would give stride 0, and
        every anchor of that level would sit at the origin (torchvision computes exactly that,
        silently): it is an error here, as is an empty image or feature map.
        """
        H, W = (int(v) for v in image_shape)
        if H <= 0 or W <= 0:
            raise ValueError(f"AnchorGenerator: image_shape {(H, W)} has an empty side")
        strides = []
        for level, (h, w) in enumerate(feature_shapes):
            if int(h) <= 0 or int(w) <= 0:
                raise ValueError(
                    f"AnchorGenerator: feature shape {(int(h), int(w))} has an empty side"
                )
            if int(h) > H or int(w) > W:
                raise ValueError(
                    f"AnchorGenerator: feature map {level} is {(int(h), int(w))} (h, w), larger "
                    f"than the image {(H, W)}: its stride would be {(H // int(h), W // int(w))} "
                    "and every anchor would sit at the origin. Pass image_shape as the padded "
                    "batch's (H, W) (images.shape[-2:]) and feature_shapes as the maps' (h, w)"
                )
            strides.append((H // int(h), W // int(w)))
        return strides

    def __call__(
        self,
        image_shape: tuple[int, int],
        feature_shapes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """All anchors of a padded batch, shared by every image of the batch.

        Args:
            image_shape: ``(H, W)`` of the padded batch tensor (``images.shape[-2:]``).
            feature_shapes: ``(h_l, w_l)`` per level (``feature.shape[-2:]``).
            dtype, device: of the returned anchors (use the features').

        Returns:
            ``[sum_l h_l * w_l * A_l, 4]`` anchors (x1, y1, x2, y2) in padded-image pixels.
        """
        if len(image_shape) != 2:
            raise ValueError(
                f"AnchorGenerator: image_shape must be (H, W), got {tuple(image_shape)!r}"
            )
        feature_shapes = [tuple(int(v) for v in s) for s in feature_shapes]
        strides = self.strides_for(image_shape, feature_shapes)
        return torch.cat(
            self.grid_anchors(feature_shapes, strides, dtype=dtype, device=device), dim=0
        )

"""One per-image container for everything that travels with a set of boxes.

Between the RPN and the final detections, the model carries per image a set of boxes and, for
each box, fields of equal length: the proposal's score, the ground truth it matched, its label,
its regression target, later its predicted class, score and mask. They are selected together
(sampling 512 RoIs, score thresholds, NMS, top-k) and must never fall out of step.
:class:`Instances` holds them as named fields of equal first dimension and is indexed as a whole,
as detectron2's ``Instances`` is::

    >>> import torch
    >>> inst = Instances((4, 6), boxes=torch.tensor([[0., 0., 2., 2.], [1., 1., 5., 3.]]),
    ...                  scores=torch.tensor([0.9, 0.2]))
    >>> kept = inst[inst.scores > 0.5]
    >>> len(kept), kept.boxes.tolist()
    (1, [[0.0, 0.0, 2.0, 2.0]])

Vocabulary (``docs/ARCHITECTURE.md``): ``proposal_*`` for what the RPN proposes
(``proposal_boxes``, ``proposal_scores``), ``gt_*`` for what the ground truth assigns to a box
(``gt_labels``, ``gt_boxes``, ``matched_idxs``, ``regression_targets``), ``pred_*`` for what
the heads predict (``pred_boxes``, ``pred_scores``, ``pred_labels``, ``pred_masks``).
The model's *output* per image is a plain dict (``boxes``, ``labels``, ``scores``, ``masks``) as
torchvision's is, so code written for torchvision reads it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["Instances"]


class Instances:
    """Per-image fields of equal length, indexable as a whole.

    Args:
        image_size: ``(h, w)`` of the image the boxes live in (pixels, before padding).
        **fields: tensors (or lists) whose first dimension is the number of instances ``N``;
            every field must have the same ``N``.

    Fields read and write as attributes (``inst.boxes``) or with :meth:`get` / :meth:`set`.
    Indexing with an int, a slice, a bool mask ``[N]`` or an int64 index tensor returns a new
    :class:`Instances` with every field indexed the same way. ``len(inst)`` is ``N``.
    """

    __slots__ = ("_fields", "_image_size")

    def __init__(self, image_size: tuple[int, int], **fields: Any) -> None:
        object.__setattr__(self, "_image_size", (int(image_size[0]), int(image_size[1])))
        object.__setattr__(self, "_fields", {})
        for name, value in fields.items():
            self.set(name, value)

    # ---------------------------------------------------------------- fields
    @property
    def image_size(self) -> tuple[int, int]:
        """``(h, w)`` of the image (pixels, before padding)."""
        return self._image_size

    def __len__(self) -> int:
        for value in self._fields.values():
            return len(value)
        return 0

    def set(self, name: str, value: Any) -> None:
        """Add or replace field ``name``; its length must equal the other fields'."""
        if not hasattr(value, "__len__"):
            raise TypeError(
                f"Instances: field {name!r} must be a tensor or a list, got {type(value).__name__}"
            )
        if isinstance(value, Tensor) and value.dim() == 0:
            raise ValueError(
                f"Instances: field {name!r} must have a first dimension, got a 0-d tensor"
            )
        if self._fields:
            n = len(self)
            if len(value) != n and not (len(self._fields) == 1 and name in self._fields):
                others = ", ".join(f"{k} ({len(v)})" for k, v in self._fields.items())
                raise ValueError(
                    f"Instances: field {name!r} has length {len(value)} but the "
                    f"other fields have {n}: {others}"
                )
        self._fields[name] = value

    def get(self, name: str) -> Any:
        """Field ``name``; a ``KeyError`` lists the fields that exist."""
        try:
            return self._fields[name]
        except KeyError:
            raise KeyError(
                f"Instances has no field {name!r}; fields: {sorted(self._fields)}"
            ) from None

    def has(self, name: str) -> bool:
        return name in self._fields

    def remove(self, name: str) -> None:
        del self._fields[name]

    @property
    def fields(self) -> dict[str, Any]:
        """The fields as a dict (the object's own; do not resize them in place)."""
        return self._fields

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(
                f"Instances has no field {name!r}; fields: {sorted(self._fields)}"
            ) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self.set(name, value)

    # ---------------------------------------------------------------- selection
    def __getitem__(self, item) -> Instances:
        """Index every field the same way: ``inst[mask]``, ``inst[idx]``, ``inst[2:5]``,
        ``inst[0]``."""
        if isinstance(item, int):
            n = len(self)
            if not -n <= item < n:
                raise IndexError(f"Instances: index {item} out of range for {n} instances")
            item = slice(item, None if item == -1 else item + 1)
        if isinstance(item, Tensor) and item.dtype == torch.bool and item.shape != (len(self),):
            raise IndexError(
                f"Instances: a bool mask must have shape [{len(self)}], got {tuple(item.shape)}"
            )
        out = Instances(self._image_size)
        for name, value in self._fields.items():
            if isinstance(value, Tensor):
                out._fields[name] = value[item]
            else:  # a list: index it like a tensor would be
                if isinstance(item, slice):
                    out._fields[name] = value[item]
                else:
                    idx = torch.as_tensor(item)
                    if idx.dtype == torch.bool:
                        idx = idx.nonzero().flatten()
                    out._fields[name] = [value[int(i)] for i in idx]
        return out

    @staticmethod
    def cat(instances: list[Instances]) -> Instances:
        """Concatenate instances of one image (same ``image_size``, same fields)."""
        if not instances:
            raise ValueError("Instances.cat: needs at least one Instances")
        first = instances[0]
        for i, inst in enumerate(instances[1:], start=1):
            if inst.image_size != first.image_size:
                raise ValueError(
                    f"Instances.cat: item {i} has image_size {inst.image_size}, "
                    f"item 0 has {first.image_size}"
                )
            if set(inst.fields) != set(first.fields):
                raise ValueError(
                    f"Instances.cat: item {i} has fields {sorted(inst.fields)}, "
                    f"item 0 has {sorted(first.fields)}"
                )
        out = Instances(first.image_size)
        for name, value in first.fields.items():
            values = [inst.fields[name] for inst in instances]
            out._fields[name] = (
                torch.cat(values) if isinstance(value, Tensor) else [v for vs in values for v in vs]
            )
        return out

    def to(self, *args: Any, **kwargs: Any) -> Instances:
        """Move / cast every tensor field (``inst.to("cuda")``); lists are kept as they are."""
        out = Instances(self._image_size)
        for name, value in self._fields.items():
            out._fields[name] = value.to(*args, **kwargs) if isinstance(value, Tensor) else value
        return out

    def __iter__(self) -> Iterator:
        raise TypeError("Instances is not iterable; index it (inst[i]) or read a field")

    def __repr__(self) -> str:
        parts = []
        for name, value in self._fields.items():
            if isinstance(value, Tensor):
                parts.append(
                    f"{name}: {list(value.shape)} {str(value.dtype).replace('torch.', '')}"
                )
            else:
                parts.append(f"{name}: list[{len(value)}]")
        return (
            f"Instances(num_instances={len(self)}, image_size={self._image_size}, "
            f"fields=[{', '.join(parts)}])"
        )

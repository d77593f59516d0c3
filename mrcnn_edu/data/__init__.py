"""Data: COCO-format data sets (``coco.py``) and the synthetic shapes generator (``shapes.py``).

Explained in notebook ``01_data_coco_format.ipynb``. ``data`` knows no network: it yields
``(image float32 [3, H, W], target dict)`` pairs (see ``coco.CocoDetection``).
"""

from .coco import CocoDetection, CocoFormatError, coco2017, shapes_dataset
from .sampler import GroupedBatchSampler, aspect_ratio_groups, infinite, make_train_loader
from .shapes import write_shapes_dataset

__all__ = [
    "CocoDetection",
    "CocoFormatError",
    "GroupedBatchSampler",
    "aspect_ratio_groups",
    "coco2017",
    "infinite",
    "make_train_loader",
    "shapes_dataset",
    "write_shapes_dataset",
]

"""Hot operators of Mask R-CNN, each in several backends (see ``_common.BACKENDS``).

Explained in notebooks 02 (RoIPool vs RoIAlign), 03 (Numba CPU and CUDA kernels) and
04 (NMS and IoU). ``ops`` is a leaf: it imports nothing else from ``mrcnn_edu``.
"""

from .box_ops import batched_nms, box_iou, nms
from .roi import roi_align, roi_pool

__all__ = ["batched_nms", "box_iou", "nms", "roi_align", "roi_pool"]

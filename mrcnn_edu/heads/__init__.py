"""The RoI heads of Mask R-CNN: the Fast R-CNN box head and the mask head.

Explained in notebooks ``05_box_head.ipynb`` (:mod:`.box_head`) and ``06_mask_head.ipynb``
(:mod:`.mask_head`). Each module holds layers (``nn.Module``), training targets, pure loss
functions and post-processing as functions on lists of per-image tensors; ``model.RoIHeads``
wires them (pooler -> box head -> mask head). ``heads`` imports ``ops``, ``boxes`` and
``matching`` only, never ``rpn``.
"""

from .box_head import (
    ConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
    box_loss,
    default_box_coder,
    default_proposal_matcher,
    default_roi_sampler,
    label_proposals,
    postprocess_detections,
    sample_proposals,
)
from .keypoint_head import (
    KEYPOINT_DECODINGS,
    KeypointHead,
    KeypointPredictor,
    heatmaps_to_keypoints,
    heatmaps_to_keypoints_subpixel,
    keypoint_confidence,
    keypoint_decoder,
    keypoint_inference,
    keypoint_loss,
    keypoint_targets,
    one_hot_heatmaps,
)
from .mask_head import (
    MASK_LOSS_MODES,
    MaskHead,
    MaskPredictor,
    expand_boxes,
    expand_masks,
    mask_inference,
    mask_loss,
    mask_targets,
    paste_mask_in_image,
    paste_masks_in_image,
)

__all__ = [
    "MASK_LOSS_MODES",
    "ConvFCHead",
    "FastRCNNPredictor",
    "KeypointHead",
    "KeypointPredictor",
    "MaskHead",
    "MaskPredictor",
    "TwoMLPHead",
    "box_loss",
    "default_box_coder",
    "default_proposal_matcher",
    "default_roi_sampler",
    "expand_boxes",
    "expand_masks",
    "KEYPOINT_DECODINGS",
    "heatmaps_to_keypoints",
    "heatmaps_to_keypoints_subpixel",
    "keypoint_confidence",
    "keypoint_decoder",
    "keypoint_inference",
    "keypoint_loss",
    "keypoint_targets",
    "label_proposals",
    "mask_inference",
    "mask_loss",
    "mask_targets",
    "one_hot_heatmaps",
    "paste_mask_in_image",
    "paste_masks_in_image",
    "postprocess_detections",
    "sample_proposals",
]

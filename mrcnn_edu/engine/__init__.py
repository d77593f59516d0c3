"""Engine: training loops and evaluation (no plotting; results come back as return values).

``rpn_train`` trains a Region Proposal Network alone (notebook 04); ``evaluate`` measures
proposals (recall at k proposals) and, later, COCO AP. The full Mask R-CNN training loop
(``train.py``: AMP, checkpoints, DDP through torchrun) joins this package in a later issue.
"""

from .evaluate import proposal_recall
from .rpn_train import predict_proposals, train_rpn

__all__ = ["predict_proposals", "proposal_recall", "train_rpn"]

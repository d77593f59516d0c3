"""Engine: training loops, checkpoints, optimizers and evaluation.

Nothing here plots or prints: results come back as return values and through callbacks (a tqdm
progress bar is the one exception). ``train`` runs any model whose ``forward(images, targets)``
returns ``(detections, losses)``; ``rpn_train`` trains a Region Proposal Network alone
(notebook 04); ``evaluate`` scores a model with pycocotools' COCOeval (notebook 08);
``check_data`` names every bad target before training.
"""

from .check_data import DataError, DataReport, Problem, check_data
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import (
    DistributedError,
    init_distributed,
    make_distributed_train_loader,
    wrap_model,
)
from .evaluate import EvalResult, coco_results, evaluate, format_metrics_table, proposal_recall
from .optim import TimeBudgetFactor, build_optimizer, build_scheduler
from .rpn_train import pick_example, predict_proposals, train_rpn
from .train import (
    Callback,
    NonFiniteLossError,
    TrainingOutOfMemoryError,
    TrainResult,
    read_metrics_csv,
    train,
)

__all__ = [
    "Callback",
    "CheckpointError",
    "DataError",
    "DataReport",
    "DistributedError",
    "EvalResult",
    "NonFiniteLossError",
    "Problem",
    "TimeBudgetFactor",
    "TrainResult",
    "TrainingOutOfMemoryError",
    "build_optimizer",
    "build_scheduler",
    "check_data",
    "coco_results",
    "evaluate",
    "format_metrics_table",
    "init_distributed",
    "load_checkpoint",
    "make_distributed_train_loader",
    "pick_example",
    "predict_proposals",
    "proposal_recall",
    "read_metrics_csv",
    "save_checkpoint",
    "train",
    "train_rpn",
    "wrap_model",
]

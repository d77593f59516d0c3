"""Training recipes: a model config + an optimisation schedule + a data layout, by name.

Mask R-CNN's COCO recipe (He et al. 2017, section 3.1 "Training"): 16 images per mini-batch
(8 GPUs x 2), learning rate 0.02 for 160k iterations decreased by 10 at 120k (the paper's
schedule; Detectron's and torchvision's "1x" schedule is 90k iterations with decays at 60k and
80k), weight decay 1e-4, momentum 0.9, shorter side 800, horizontal flips, a ResNet-50 that
starts from ImageNet weights (torchvision's ``ResNet50_Weights.IMAGENET1K_V1``, as its
``maskrcnn_resnet50_fpn``; ``model.backbone.weights``). The ``shapes`` recipe
trains a small model from scratch on the synthetic set on a 2-core CPU in minutes (``make demo``);
``stick-figures`` does the same for Keypoint R-CNN on the stick-figure set (``make
demo-keypoints``) and ``coco-keypoints-r50-fpn`` is the paper's COCO keypoint recipe (sec. 5).
``shapes-c4`` and ``shapes-c5`` put the ``shapes`` heads on a single stride-16 or stride-32
ResNet-10 map, for the RoIPool vs RoIAlign ablation (Table 2c/2d, ``engine.ablate``).

``run_training(experiment, data_root, out_dir)`` builds the data sets, checks them
(``check_data``), builds the model, the optimizer and the schedule, and runs
:func:`mrcnn_edu.engine.train.train`; the CLI's ``mrcnn-edu train`` is a thin wrapper around it.
Notebook ``08_training.ipynb`` calls it directly. Under ``torchrun`` (after
``engine.distributed.init_distributed()``, which the CLI calls) the same call trains with
``DistributedDataParallel``: ``batch_size`` is the global batch, split evenly over the ranks, so
the learning rate and warm-up do not depend on how many processes share it
(``09_coco_training.ipynb``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrcnn_edu.backbone import resnet_state_dict
from mrcnn_edu.config import (
    ModelConfig,
    from_dict,
    get_preset,
    override,
    unknown_name,
)
from mrcnn_edu.data.coco import CocoDetection, coco2017, shapes_dataset
from mrcnn_edu.data.sampler import make_train_loader, transform_generators
from mrcnn_edu.data.shapes import flip_index
from mrcnn_edu.model import MaskRCNN, build_model
from mrcnn_edu.transforms import RandomHorizontalFlip
from mrcnn_edu.weights import load_backbone_weights

from . import distributed as dist_utils
from .check_data import check_data
from .checkpoint import load_checkpoint
from .optim import TimeBudgetFactor, build_optimizer, build_scheduler
from .train import TrainResult, train

__all__ = [
    "DataConfig",
    "Experiment",
    "TrainConfig",
    "build_datasets",
    "experiment_from_checkpoint",
    "get_experiment",
    "list_experiments",
    "load_model",
    "run_training",
]


@dataclass
class TrainConfig:
    optimizer: str = "sgd"  # "sgd" (the paper) or "adamw"
    lr: float = 0.02  # learning rate for `reference_batch` images per step
    reference_batch: int = 16  # lr scales linearly with batch_size / reference_batch (Goyal 2017)
    momentum: float = 0.9  # SGD momentum (sec. 3.1)
    weight_decay: float = 1e-4  # sec. 3.1
    norm_bias_decay: bool = False  # also decay norm weights and biases
    batch_size: int = 16  # images per step, all processes together
    steps: int = 90000  # optimizer steps ("1x": 90k)
    warmup_steps: int = 1000  # linear warm-up (steps of reference_batch images; scaled too)
    warmup_factor: float = 0.001  # warm-up start factor
    schedule: str = "step"  # "step" (decay at milestones), "cosine" or "constant"
    milestones: tuple[int, ...] = (60000, 80000)  # "step": lr x gamma at these steps
    gamma: float = 0.1  # "step": decay factor
    min_lr_ratio: float = 0.0  # "cosine": final lr / lr
    grad_clip: float | None = None  # clip the global gradient norm (None: no clipping)
    amp: str | None = None  # None, "bf16" or "fp16" (mixed precision)
    max_minutes: float | None = None  # stop at this wall-time budget (None: run all steps)
    hflip: float = 0.5  # probability of a horizontal flip (sec. 3.1)
    num_workers: int = 2  # DataLoader worker processes
    aspect_ratio_grouping: bool = True  # batch images of similar shape (less padding)
    seed: int = 0  # seeds the data order, the flips and the model's initialisation
    log_every: int = 20  # a metrics row every this many steps
    checkpoint_every: int = 5000  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints kept


@dataclass
class DataConfig:
    layout: str = "coco"  # "coco": root/{train2017,val2017}; "shapes": root/{train,val}
    train_split: str = "train2017"  # folder / annotation-file split name for training
    val_split: str = "val2017"  # ... for evaluation
    class_names: tuple[str, ...] = ()  # filled from the training set (background first)


@dataclass
class Experiment:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ------------------------------------------------------------------------------------ presets
# The ImageNet weights torchvision's maskrcnn_resnet50_fpn and keypointrcnn_resnet50_fpn start
# their ResNet-50 from (their default ``weights_backbone``; the paper fine-tunes ImageNet ones).
IMAGENET_R50 = "ResNet50_Weights.IMAGENET1K_V1"


def coco_r50_fpn_1x() -> Experiment:
    """torchvision's and Detectron's "1x": R50-FPN from ImageNet weights (``IMAGENET_R50``,
    loaded by :func:`run_training`), 16 images/step, lr 0.02, 90k steps, decays at 60k and 80k,
    1000 warm-up steps, shorter side 800. Expected: box AP ~37.9, mask AP ~34.6."""
    model = get_preset("maskrcnn-r50-fpn")
    model.backbone.weights = IMAGENET_R50
    return Experiment(model=model, train=TrainConfig(), data=DataConfig())


def coco_r50_fpn_3x() -> Experiment:
    """The "3x" schedule (270k steps, decays at 210k and 250k), multi-scale training
    (shorter side 640..800, as detectron2's 3x recipe)."""
    exp = coco_r50_fpn_1x()
    exp.train.steps = 270000
    exp.train.milestones = (210000, 250000)
    exp.model.transform.min_size = (640, 672, 704, 736, 768, 800)
    return exp


def shapes_recipe() -> Experiment:
    """The ``shapes`` model (``mrcnn_edu.config.shapes``) from scratch on the synthetic set:
    AdamW, warm-up and cosine decay, batch 4, horizontal flips, with a 10-minute budget on a
    2-core CPU (``make demo``)."""
    train_cfg = TrainConfig(
        optimizer="adamw",
        lr=5e-4,
        reference_batch=4,
        weight_decay=1e-4,
        batch_size=4,
        steps=1000,
        warmup_steps=50,
        schedule="cosine",
        milestones=(),
        min_lr_ratio=0.02,
        grad_clip=10.0,
        max_minutes=10.0,
        num_workers=1,
        log_every=10,
        checkpoint_every=250,
        keep_last=2,
    )
    return Experiment(
        model=get_preset("shapes"),
        train=train_cfg,
        data=DataConfig(layout="shapes", train_split="train", val_split="val"),
    )


def stick_figures_recipe() -> Experiment:
    """The ``stick-figures`` Keypoint R-CNN (``mrcnn_edu.config.stick_figures``) from scratch on
    the stick-figure set (``mrcnn-edu make-shapes --keypoints``, by default in
    ``data/shapes_keypoints``): the ``shapes`` recipe's AdamW (lr 5e-4, warm-up and cosine
    decay, batch 4) with horizontal flips that swap left and right keypoints (the set's flip
    map, see :func:`build_datasets`), on a 15-minute budget (``make demo-keypoints``)."""
    exp = shapes_recipe()
    exp.model = get_preset("stick-figures")
    exp.train.steps = 1500
    exp.train.max_minutes = 15.0
    return exp


def coco_keypoints_r50_fpn() -> Experiment:
    """The paper's COCO keypoint recipe (Mask R-CNN sec. 5, "Implementation Details"):
    ``keypointrcnn-r50-fpn`` on the ``person_keypoints_*`` files, 16 images per step, lr 0.02
    for 90k steps, divided by 10 at 60k and 80k, shorter side drawn from 640..800 when training
    (800 at test), horizontal flips with COCO's left/right flip map. (torchvision's released
    weights, keypoint AP 65.0 on val2017, follow its own schedule instead: 46 epochs of about
    3.7k steps, decays at epochs 36 and 43.)"""
    exp = coco_r50_fpn_1x()
    exp.model = get_preset("keypointrcnn-r50-fpn")
    exp.model.backbone.weights = IMAGENET_R50  # keypointrcnn_resnet50_fpn's weights_backbone
    return exp


def _single_level(exp: Experiment) -> Experiment:
    """One feature map: the ``shapes`` anchor sizes of all FPN levels at that one level (15
    anchors per location, as the paper's C4 RPN), and more pre-NMS proposals for it."""
    r = exp.model.rpn
    r.anchor_sizes = (tuple(s for sizes in r.anchor_sizes for s in sizes),)  # ((16, ..., 256),)
    r.aspect_ratios = (r.aspect_ratios[0],)
    r.pre_nms_top_n_train = 2000  # one level holds every anchor (C4: 16x16x15 at 256 px)
    r.pre_nms_top_n_test = 1000
    return exp


def at_image_size(exp: Experiment, size: int) -> Experiment:
    """Rescale a recipe made for square images of side ``max(transform.min_size)`` (256 px for
    the ``shapes`` recipes) to images of side ``size``, in place: the transform's sizes become
    ``size`` and every anchor size is scaled by the same factor (rounded, at least 1 px), so
    the anchors cover the same fraction of the image. Used by the ablations
    (:mod:`mrcnn_edu.engine.ablate`), which train on 128 px sets to afford three seeds."""
    if size < 1:
        raise ValueError(f"at_image_size: size must be >= 1, got {size}")
    t = exp.model.transform
    ratio = size / max(t.min_size)
    t.min_size = (int(size),)
    t.max_size = int(size)
    r = exp.model.rpn
    r.anchor_sizes = tuple(tuple(max(1, round(a * ratio)) for a in lvl) for lvl in r.anchor_sizes)
    return exp


def shapes_c4_recipe() -> Experiment:
    """The ``shapes`` recipe on a C4-style backbone: ResNet-10 ``conv1 .. layer3``, one
    stride-16 map (256 channels) that the RPN and both RoI poolers read.

    Unlike the paper's ResNet-50-C4 (res5 run on every 14 x 14 pooled RoI, figure 4 left) the
    heads are the small ``shapes`` heads of figure 4 (right): res5 per RoI would cost about
    twenty times the whole backbone at 256 px on a CPU. What Table 2c varies, the stride of
    the map the RoIs are pooled from, is kept. ``--set model.roi_heads.box_head=res5 --set
    model.roi_heads.box_resolution=14`` restores the paper's head."""
    exp = _single_level(shapes_recipe())
    exp.model.backbone.kind = "resnet_c4"
    return exp


def shapes_c5_recipe() -> Experiment:
    """The ``shapes`` recipe on a C5-style backbone (Table 2d): ResNet-10 ``conv1 .. layer4``,
    one stride-32 map (512 channels), the small ``shapes`` heads (as the paper's C5 rows, which
    use figure 4's right head)."""
    exp = _single_level(shapes_recipe())
    exp.model.backbone.kind = "resnet_c5"
    return exp


_EXPERIMENTS = {
    "shapes": shapes_recipe,
    "stick-figures": stick_figures_recipe,
    "coco-keypoints-r50-fpn": coco_keypoints_r50_fpn,
    "coco-r50-fpn-1x": coco_r50_fpn_1x,
    "coco-r50-fpn-3x": coco_r50_fpn_3x,
    "shapes-c4": shapes_c4_recipe,  # the Table 2c/2d ablations (engine.ablate)
    "shapes-c5": shapes_c5_recipe,
}


def list_experiments() -> list[str]:
    """Names accepted by :func:`get_experiment` (``mrcnn-edu train --preset``)."""
    return sorted(_EXPERIMENTS)


def get_experiment(name: str, overrides: dict | None = None) -> Experiment:
    """A fresh :class:`Experiment` for recipe ``name`` with dotted ``overrides`` applied
    (``{"train.lr": "0.01", "model.roi_heads.pooler_op": "pool"}``). An unknown name lists
    the recipes; an unknown key names the nearest keys."""
    if name not in _EXPERIMENTS:
        raise unknown_name(name, _EXPERIMENTS)
    exp = _EXPERIMENTS[name]()
    if overrides:
        override(exp, overrides)
    return exp


# ---------------------------------------------------------------------------------------- data
def build_datasets(
    exp: Experiment,
    root: str | Path,
    *,
    train: bool = True,
    val: bool = True,
) -> tuple[CocoDetection | None, CocoDetection | None]:
    """``(train_set, val_set)`` for the experiment's data layout under ``root``.

    The training set skips images without objects and flips with probability
    ``exp.train.hflip`` (a seeded generator, saved in checkpoints); a keypoint set's flip also
    swaps its ``left_*`` and ``right_*`` keypoints (``data.shapes.flip_index`` of the set's
    keypoint names: the stick figures' or COCO's 17). A model with a keypoint branch reads the
    ``person_keypoints_*`` files of a COCO root. A root without the expected layout raises
    ``FileNotFoundError`` listing what is missing.
    """
    root = Path(root)
    d = exp.data
    if d.layout not in ("coco", "shapes"):
        raise ValueError(f"data.layout must be 'coco' or 'shapes', got {d.layout!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist")
    missing = []
    for split, wanted in ((d.train_split, train), (d.val_split, val)):
        if not wanted:
            continue
        stems = ("instances", "person_keypoints")
        anns = [root / "annotations" / f"{s}_{split}.json" for s in stems]
        if not (root / split).is_dir():
            missing.append(f"{root / split}/ (images)")
        if not any(a.is_file() for a in anns):
            missing.append(str(anns[0]))
    if missing:
        hint = (
            "make one with `mrcnn-edu make-shapes --out " + str(root) + "`"
            if d.layout == "shapes"
            else "see data/README.md for the COCO 2017 layout"
        )
        raise FileNotFoundError(
            f"{root} does not have the {d.layout} layout; missing: {', '.join(missing)} ({hint})"
        )

    def load(split: str, **kw) -> CocoDetection:
        if d.layout == "shapes":
            return shapes_dataset(root, split, **kw)
        kp = exp.model.roi_heads.keypoint or (  # a keypoint model reads the keypoint files
            (root / "annotations" / f"person_keypoints_{split}.json").is_file()
            and not (root / "annotations" / f"instances_{split}.json").is_file()
        )
        return coco2017(root, split, keypoints=kp, **kw)

    train_set = val_set = None
    if train:
        train_set = load(d.train_split, skip_empty=True)
        if exp.train.hflip > 0:  # with keypoints: the set's flip map swaps left and right
            gen = torch.Generator().manual_seed(exp.train.seed + 1)
            names = train_set.keypoint_names
            train_set.transforms = RandomHorizontalFlip(
                exp.train.hflip, flip_index=flip_index(names) if names else None, generator=gen
            )
    if val:
        val_set = load(d.val_split)
    return train_set, val_set


# ---------------------------------------------------------------------------------- training
def _fit_num_classes(exp: Experiment, dataset: CocoDetection) -> None:
    n = len(dataset.class_names)  # background + categories
    exp.model.num_classes = n
    exp.data.class_names = tuple(dataset.class_names)


def time_train_step(
    model: MaskRCNN, loader, *, steps: int = 3, device: str | torch.device = "cpu"
) -> float:
    """Seconds per training step (forward + backward, no optimizer update) of ``model`` on
    ``loader``'s batches: the median of ``steps`` steps after one warm-up step, on a copy of
    the model, with torch's random state restored afterwards (training is not disturbed)."""
    import copy
    import statistics
    import time

    rng = torch.get_rng_state()
    probe = copy.deepcopy(model).to(device).train()
    times = []
    it = iter(loader)
    try:
        for i in range(steps + 1):
            images, targets = next(it)
            images = [im.to(device) for im in images]
            targets = [
                {k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                for t in targets
            ]
            start = time.perf_counter()
            _, losses = probe(images, targets)
            sum(losses.values()).backward()
            if i:
                times.append(time.perf_counter() - start)
    finally:
        torch.set_rng_state(rng)
    return statistics.median(times)


def build_optimization(
    exp: Experiment,
    model: torch.nn.Module,
    *,
    budget_minutes: float | None = None,
    distributed: bool = False,
    started: float | None = None,
):
    """The recipe's optimizer, learning-rate schedule and step count: ``(optimizer, scheduler,
    steps)``. The lr scales with ``batch_size / reference_batch`` and the warm-up the other way
    (the same number of images). With ``budget_minutes`` the schedule runs on the wall clock
    (:class:`~mrcnn_edu.engine.optim.TimeBudgetFactor`, the budget counted from ``started``, a
    ``time.perf_counter()`` value, or from now) and ``steps`` is only a cap: the clock ends the
    run, so the decay completes however fast the machine is."""
    import time

    t = exp.train
    lr = t.lr * t.batch_size / t.reference_batch  # the global batch (all ranks together)
    warmup_steps = round(t.warmup_steps * t.reference_batch / t.batch_size)  # same images
    if t.warmup_steps <= t.steps:  # (a warm-up longer than the run stays build_scheduler's error)
        warmup_steps = min(warmup_steps, t.steps)
    optimizer = build_optimizer(
        model,
        t.optimizer,
        lr=lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        norm_bias_decay=t.norm_bias_decay,
    )
    if budget_minutes:
        if distributed:
            raise ValueError(
                "run_training: fit_budget runs the learning rate on the wall clock, "
                "which differs between ranks (their parameters would drift apart); "
                "under torchrun use a step schedule (and --max-minutes to stop)"
            )
        spent = 0.0 if started is None else time.perf_counter() - started
        factor = TimeBudgetFactor(
            budget_s=budget_minutes * 60 - spent,
            total_steps=t.steps,
            warmup_steps=warmup_steps,
            warmup_factor=t.warmup_factor,
            schedule=t.schedule,
            milestones=t.milestones,
            gamma=t.gamma,
            min_lr_ratio=t.min_lr_ratio,
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), 100 * t.steps
    scheduler = build_scheduler(
        optimizer,
        total_steps=t.steps,
        warmup_steps=warmup_steps,
        warmup_factor=t.warmup_factor,
        schedule=t.schedule,
        milestones=t.milestones,
        gamma=t.gamma,
        min_lr_ratio=t.min_lr_ratio,
    )
    return optimizer, scheduler, t.steps


def run_training(
    exp: Experiment,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks=(),
    device: str | torch.device = "cpu",
    check: bool = True,
    max_minutes: float | None = None,
    fit_budget: bool = False,
) -> tuple[MaskRCNN, TrainResult]:
    """Train ``exp`` on the data under ``data_root``; checkpoints and ``metrics.csv`` go to
    ``out_dir``. Returns the trained model (eval mode) and the :class:`TrainResult`.

    Linear scaling (Goyal et al. 2017): the learning rate is ``lr * batch_size /
    reference_batch`` and the warm-up lasts ``warmup_steps * reference_batch / batch_size``
    steps (the same number of images), where ``batch_size`` is the global batch.

    Distributed (the process group initialised, e.g. under ``torchrun``): every rank builds
    the same model (same seed; DDP broadcasts rank 0's), wraps it in
    ``DistributedDataParallel`` and trains on its shard of each epoch with ``batch_size /
    world size`` images per step (``make_distributed_train_loader``); flips and RoI sampling
    draw from per-rank seeds. Rank 0 writes the checkpoints and ``metrics.csv``; ``resume``
    reads ``out_dir/last.pt`` on every rank. The returned model is the unwrapped one.

    Initial weights: the model is built from the seed, then, when
    ``exp.model.backbone.weights`` is set (the ``coco-*`` recipes: torchvision's ImageNet
    ResNet-50, downloaded once into torch's hub cache; offline, a local copy passed with
    ``--set model.backbone.weights=/path/resnet50-0676ba61.pth``), its ResNet body is loaded
    from them (:func:`mrcnn_edu.weights.load_backbone_weights`). They are read first, before
    the data check, so a wrong name or path, or no network, fails at once; distributed, each
    machine's first process fetches them before the others read its cache
    (:func:`~mrcnn_edu.engine.distributed.local_main_first`). A run that resumes
    from ``out_dir/last.pt`` skips this: the checkpoint holds its weights.

    The number of classes comes from the data (background + its categories). ``check`` runs
    :func:`~mrcnn_edu.engine.check_data.check_data` first and refuses a set with bad targets
    (listing them). ``resume`` continues from ``out_dir/last.pt``.

    ``fit_budget`` (with a time budget, ``max_minutes`` or ``exp.train.max_minutes``) runs the
    learning-rate schedule on the wall clock (:class:`~mrcnn_edu.engine.optim.TimeBudgetFactor`)
    and stops when the budget is spent, so the schedule completes however fast the machine is
    (a step schedule cut short by the clock would never reach its small learning rates).
    """
    import time

    started = time.perf_counter()
    dist_utils.require_initialized("run_training")
    distributed = dist_utils.is_distributed()
    progress = progress and dist_utils.is_main_process()
    t = exp.train
    out_dir = Path(out_dir)
    initial = None  # the ResNet's start, read (or downloaded) before the long data check
    if exp.model.backbone.weights is not None and not (resume and (out_dir / "last.pt").is_file()):
        initial = dist_utils.local_main_first(  # one download per machine, then the cache
            lambda: resnet_state_dict(exp.model.backbone.weights, "run_training"), "run_training"
        )
    train_set, _ = build_datasets(exp, data_root, val=False)
    if check:
        check_data(train_set, progress=progress).raise_if_bad()
    _fit_num_classes(exp, train_set)
    torch.manual_seed(t.seed)
    model = build_model(exp.model)
    if initial is not None:  # the ImageNet start (a resumed run has its own weights)
        load_backbone_weights(model, initial)
    model = model.to(device)
    if distributed:
        loader = dist_utils.make_distributed_train_loader(
            train_set,
            t.batch_size,
            num_workers=t.num_workers,
            seed=t.seed,
            aspect_ratio_grouping=t.aspect_ratio_grouping,
        )
        torch.manual_seed(dist_utils.rank_seed(t.seed))  # RoI sampling differs between ranks
        for gen in transform_generators(train_set).values():  # and so do the flips
            gen.manual_seed(dist_utils.rank_seed(gen.initial_seed()))
    else:
        loader = make_train_loader(
            train_set,
            t.batch_size,
            num_workers=t.num_workers,
            seed=t.seed,
            aspect_ratio_grouping=t.aspect_ratio_grouping,
        )
    budget = max_minutes if max_minutes is not None else t.max_minutes
    optimizer, scheduler, steps = build_optimization(
        exp,
        model,
        budget_minutes=budget if fit_budget and not resume else None,
        distributed=distributed,
        started=started,
    )
    if fit_budget and budget and not resume:  # the budget counts from the start of this call
        budget -= (time.perf_counter() - started) / 60
    out_dir.mkdir(parents=True, exist_ok=True)
    result = train(
        dist_utils.wrap_model(model, device),
        loader,
        optimizer,
        scheduler,
        steps=steps,
        device=device,
        amp=t.amp,
        grad_clip=t.grad_clip,
        callbacks=callbacks,
        checkpoint_dir=out_dir,
        checkpoint_every=t.checkpoint_every,
        keep_last=t.keep_last,
        resume=True if resume else None,
        log_every=t.log_every,
        metrics_csv=out_dir / "metrics.csv",
        progress=progress,
        config=exp,
        max_minutes=budget,
    )
    return model.eval(), result


def experiment_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> Experiment:
    """The :class:`Experiment` stored in a checkpoint written by :func:`run_training`."""
    values = ckpt.get("config")
    if not isinstance(values, dict) or "model" not in values:
        raise ValueError(
            f"{path}: holds no mrcnn_edu training config (was it written by `mrcnn-edu train`?)"
        )
    return from_dict(Experiment, values)


# Settings that change what a trained model predicts but not its weights: ``load_model`` (and
# ``mrcnn-edu eval|predict --set``) may override these, and only these.
TEST_TIME_KEYS = (
    "model.rpn.pre_nms_top_n_test",
    "model.rpn.post_nms_top_n_test",
    "model.roi_heads.score_thresh",
    "model.roi_heads.nms_thresh",
    "model.roi_heads.detections_per_img",
    "model.roi_heads.keypoint_decoding",
    "model.roi_heads.keypoint_rescore",
)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | None = None,
) -> tuple[MaskRCNN, Experiment]:
    """Rebuild the model a training checkpoint holds (its config, then its weights), in eval
    mode. A file that is not a checkpoint, or whose weights do not fit its config, raises an
    error naming what does not match.

    ``overrides`` (dotted key -> value, as ``--set``) change test-time settings of the stored
    config before the model is built, e.g. ``{"model.roi_heads.keypoint_decoding":
    "subpixel"}``; a key outside :data:`TEST_TIME_KEYS` raises ``ValueError`` (it would not
    fit the trained weights, or would not matter at test time), an unknown one ``KeyError``."""
    from mrcnn_edu.utils import load_torch_dict

    path = Path(path)
    ckpt = load_torch_dict(path, "checkpoint")
    exp = experiment_from_checkpoint(ckpt, path)
    if overrides:
        override(exp, overrides)  # unknown keys: KeyError naming the nearest
        other = sorted(set(overrides) - set(TEST_TIME_KEYS))
        if other:
            raise ValueError(
                f"load_model: only test-time settings can change on a trained model, not "
                f"{', '.join(other)}; test-time settings: {', '.join(TEST_TIME_KEYS)}"
            )
    model = build_model(exp.model)
    load_checkpoint(path, model=model, restore_rng=False)
    return model.to(device).eval(), exp

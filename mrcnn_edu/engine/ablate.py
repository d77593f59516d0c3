"""The paper's ablations (He et al. 2017, Table 2) rerun on the shapes set, with seeds and spread.

Mask R-CNN's central claims are ablations, measured on COCO ``minival`` (numbers below copied
from the paper's Table 2 and section 4.2; mask AP unless marked "box")::

    Table 2b, ResNet-50-C4          AP    AP50  AP75
      softmax (coupled)             24.8  44.1  25.1
      sigmoid (decoupled)           30.3  51.2  31.5
      class-agnostic (sec. 4.2 text) 29.7   -     -
    Table 2c, ResNet-50-C4 (stride 16)
      RoIPool                       26.9  48.8  26.4
      RoIWarp (max / ave)           27.2 / 27.1  49.2 / 48.9  27.1 / 27.1
      RoIAlign (max / ave)          30.2 / 30.3  51.0 / 51.2  31.8 / 31.5
    Table 2d, ResNet-50-C5 (stride 32): mask AP  AP50  AP75 | box AP  AP50  AP75
      RoIPool                       23.6  46.5  21.6 | 28.2  52.7  26.9
      RoIAlign                      30.9  51.8  32.1 | 34.0  55.3  36.4

(Table 2d's RoIAlign mask AP75 is 32.1: "+10.5 points (50% relative improvement)" over 21.6;
32.8 is Table 2e's MLP row.) The paper's RoIAlign averages bilinear samples without the
half-pixel shift (``aligned=False``, Detectron's and torchvision v1's convention); the
``aligned=True`` variant is detectron2's later correction and has no number in the paper.

A *study* names the claim, the data set that lets the mechanism show, and its *variants* (recipes
that differ in one switch). :func:`run_study` trains and evaluates every (variant, seed) with the
same data, seed and number of steps, writes one JSON per run and ``results.md`` (mean and sample
standard deviation over seeds beside the paper's numbers, and a verdict per comparison that says
"within the noise" when the difference of the means is smaller than the spread over seeds).

* ``roi-pool`` (Table 2c/2d): RoIPool vs RoIAlign vs RoIAlign aligned, on a stride-16 (C4-style)
  and a stride-32 (C5-style) ResNet-10 with small heads (CPU recipes ``shapes-c4`` and
  ``shapes-c5`` of ``engine.recipe``), on the default shapes drawn at 128 px
  (``data/shapes_128``, object sides 11..95 px, median 31): rounding an RoI to cells of 16 or
  32 px moves its mask edges by a large fraction of such an object. (The generator's
  ``small=True`` objects, 8..32 px at 128 px, left the stride-32 model at mask AP 0.01 after
  400 steps: too few features to learn from, whatever the pooling.)
* ``mask-loss`` (Table 2b): sigmoid vs softmax vs class-agnostic masks on the ``shapes``
  FPN recipe, on dense scenes where objects of different classes overlap
  (``data/shapes_overlap``): inside one RoI the softmax must call another class's pixels
  background, while elsewhere it must call the same pixels that class.

Size: both studies train on 128 px sets (:data:`IMAGE_SIZE`; the recipes made for 256 px are
rescaled by :func:`~mrcnn_edu.engine.recipe.at_image_size`: transform and anchor sizes halved).
A quarter of the pixels makes the convolutions, most of a step on a CPU, four times cheaper
(the RoI heads cost the same), to buy steps for three seeds of nine variants on a 2-core
machine; the mechanisms the studies test depend on object size relative to the stride, which
halving the objects with the images keeps (and makes only sharper).

Pre-training: the paper's variants all fine-tune one ImageNet-trained ResNet-50. From random
weights, the few hundred steps a 2-core CPU affords per run left every model near AP 0 (mask
AP 0.03 for the FPN sigmoid model and 0.001 for C5 RoIAlign on 8..32 px objects after 400
steps), too little to compare anything. So each study first trains one ResNet-10 on its own
training images (:mod:`mrcnn_edu.engine.pretrain`: semantic segmentation, every pixel's class,
FCN-style, 400 steps; no boxes, no instances, no RoI operator, so no variant's switch is
involved), and every variant and seed starts its body from those weights
(:func:`pretrained_weights`, ``pretrain_steps``; ``0`` restores training from scratch). With
them, 400 steps reach mask AP 0.10 (FPN, sigmoid, overlapping scenes) and 0.02-0.04 (C5,
default objects at 128 px).

Heads: every study trains the heads of :data:`STUDY_HEADS` (a mask head of two 64-channel
convs on every positive of 64 RoIs per image), the ``shapes`` preset's when the committed results
were made; the demo's preset has since been tuned further, and pinning keeps the studies
reproducible (a test checks each committed run's config against what the code builds).

Fairness: every variant of a comparison gets the same data, the same seeds (data order, flips,
initialisation, RoI sampling) and the same number of optimizer steps (the paper compares equal
schedules). With a wall-time budget (``minutes``) the steps are chosen once per group of
variants, from the *slowest* variant's timed step, and stored in ``plan.json``, so a resumed
study trains its missing runs exactly like the finished ones. Shared ``overrides`` apply to every
variant alike and may not touch the switch a study varies. Runs resume: a run whose JSON exists
is skipped, and an interrupted run continues from its last checkpoint.

Each run also keeps its detections (score >= 0.3, RLE masks) on the same 8 val images, the
ones of smallest id, in ``{run file stem}.predictions.json`` (:func:`predictions_file`, a few
tens of KB), so masks of RoIPool and RoIAlign models, or of softmax and sigmoid models, can be
drawn side by side without keeping the checkpoints.

``mrcnn-edu ablate`` is the command-line wrapper (charts come from ``mrcnn_edu.viz``); notebook
``08b_ablations.ipynb`` reads the committed results. Nothing here prints or plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrcnn_edu.config import override
from mrcnn_edu.data.sampler import make_train_loader
from mrcnn_edu.data.shapes import MANIFEST_NAME, write_shapes_dataset
from mrcnn_edu.model import build_model
from mrcnn_edu.utils import atomic_write

from .check_data import check_data
from .evaluate import evaluate, unwrap_coco_dataset
from .pretrain import file_sha256, pretrain_resnet
from .recipe import (
    Experiment,
    _fit_num_classes,
    at_image_size,
    build_datasets,
    get_experiment,
    run_training,
    shapes_c4_recipe,
    shapes_c5_recipe,
    time_train_step,
)

__all__ = [
    "METRICS",
    "STUDY_HEADS",
    "Comparison",
    "ShapesData",
    "Study",
    "Variant",
    "VariantSummary",
    "compare",
    "decode_predictions",
    "format_results",
    "get_study",
    "list_studies",
    "load_predictions",
    "load_runs",
    "mean_std",
    "plan_steps",
    "predictions_file",
    "pretrained_weights",
    "run_study",
    "select_predictions",
    "shapes_c4_recipe",
    "shapes_c5_recipe",
    "summarize",
    "write_results",
]

#: The table's columns: (key, COCOeval IoU type, metric name, column title).
METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("segm AP", "segm", "AP", "mask AP"),
    ("segm AP50", "segm", "AP50", "mask AP50"),
    ("segm AP75", "segm", "AP75", "mask AP75"),
    ("bbox AP", "bbox", "AP", "box AP"),
)
IMAGE_SIZE = 128  # the studies' image side: 256 px recipes rescaled (a quarter of the pixels)
FIT = 0.85  # fraction of the budget planned for training steps (as run_training's fit_budget)
MIN_STEPS = 20  # fewest steps a budget plans (as run_training's fit_budget)
PREDICTION_IMAGES = 8  # val images (smallest ids) whose detections each run keeps
PREDICTION_MIN_SCORE = 0.3  # detections kept from this score up (what a figure would draw)
PRETRAIN_STEPS = 400  # pre-training steps of a study's ResNet (engine.pretrain)
#: The RoI-head settings every study trains with, whatever the ``shapes`` preset says now:
#: the preset's heads when the committed results (``results/ablations``) were made (a
#: mask head of two 64-channel convs on every positive of 64 RoIs per image). The demo's preset
#: has since moved on (``config.shapes``: four convs on 16 of 128 RoIs' positives, tuned for
#: the 10-minute demo); pinning the studies here keeps ``mrcnn-edu ablate`` reproducing the
#: committed runs, and a test checks each committed run's config against what
#: :meth:`Variant.experiment` builds today. ``--set`` may still change them for every variant.
STUDY_HEADS: Mapping[str, object] = {
    "model.roi_heads.mask_layers": (64, 64),
    "model.roi_heads.batch_size_per_image": 64,
    "model.roi_heads.mask_rois_per_image": None,
}
_RUN_FILE = re.compile(r"^(?P<study>[a-z0-9-]+)_(?P<variant>[a-z0-9-]+)_seed(?P<seed>\d+)\.json$")


# ------------------------------------------------------------------------- study definitions
@dataclass(frozen=True)
class ShapesData:
    """The synthetic set a study trains on: ``data_root / name``, written if absent."""

    name: str  # folder under the data root, e.g. "shapes_128"
    train: int = 1000  # training images
    val: int = 200  # validation images (all evaluated unless run_study's val_images says less)
    size: int = 256  # image side (px)
    seed: int = 0  # the set's seed (the same for every run of a study)
    overlap: bool = False  # denser scenes, objects across objects of other classes
    small: bool = False  # smaller objects (1/16 .. 1/4 of the side: 8..32 px at 128 px)

    def options(self) -> dict[str, bool]:
        """The generator options as the set's manifest records them (``{}``: the default set)."""
        return {k: True for k in ("overlap", "small") if getattr(self, k)}

    def ensure(self, data_root: str | Path, progress: bool = True) -> Path:
        """The set's folder; written (with this spec's sizes) when it does not exist. An
        existing set made with other generator options is a ``ValueError`` naming both."""
        root = Path(data_root) / self.name
        manifest = root / MANIFEST_NAME
        if not root.exists() or (root.is_dir() and not any(root.iterdir())):
            write_shapes_dataset(
                root,
                train=self.train,
                val=self.val,
                size=self.size,
                seed=self.seed,
                overlap=self.overlap,
                small=self.small,
                progress=progress,
            )
            return root
        if manifest.is_file():
            try:
                have = json.loads(manifest.read_text(encoding="utf-8")).get("options", {})
            except (OSError, ValueError) as err:
                raise ValueError(f"ablate: cannot read {manifest} ({err})") from None
            if have != self.options():
                raise ValueError(
                    f"ablate: {root} holds a shapes set made with options {have or 'none'}, but "
                    f"this study needs {self.options() or 'none'}; move it away (ablate then "
                    f"writes the right one) or pass another data root"
                )
        return root


@dataclass(frozen=True)
class Variant:
    """One arm of a study: a recipe plus the switch that makes it differ."""

    name: str  # short id, used in file names: "c4-pool"
    label: str  # what the table and charts call it: "RoIPool"
    group: str  # variants compared with each other share a group (and a number of steps)
    recipe: str  # an engine.recipe experiment name
    overrides: Mapping[str, object] = field(default_factory=dict)  # the switch(es)
    paper: Mapping[str, float] = field(default_factory=dict)  # METRICS key -> paper's value (%)
    image_size: int | None = None  # rescale the recipe to images of this side (at_image_size)

    def experiment(self, seed: int, overrides: Mapping[str, object] | None = None) -> Experiment:
        """A fresh :class:`Experiment`: the recipe, the studies' pinned heads
        (:data:`STUDY_HEADS`), the shared ``overrides``, then this variant's own, with
        ``train.seed = seed``. Shared overrides may not set the keys the variant sets, nor
        ``train.seed``: they would erase the difference being measured."""
        shared = dict(overrides or {})
        clash = sorted((set(shared) & set(self.overrides)) | ({"train.seed"} & set(shared)))
        if clash:
            raise ValueError(
                f"ablate: shared overrides may not set {', '.join(clash)} (variant "
                f"{self.name!r} varies it, or run_study's seeds set it)"
            )
        exp = get_experiment(self.recipe)
        if self.image_size is not None:
            at_image_size(exp, self.image_size)
        override(exp, {**STUDY_HEADS, **shared, **self.overrides})
        exp.train.seed = int(seed)
        return exp


@dataclass(frozen=True)
class Comparison:
    """A claim of the paper as a pair of variants: ``a`` should beat ``b``."""

    a: str  # variant name the paper finds better
    b: str
    claim: str  # e.g. "RoIAlign beats RoIPool"
    paper: str  # the paper's difference, in words, e.g. "+3.4 mask AP, +5.1 AP75 (Table 2c)"


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    why: str  # the claim and how the data lets its mechanism show
    data: ShapesData
    groups: Mapping[str, str]  # group -> title ("C4-style: ResNet-10 to res4, ...")
    short: Mapping[str, str]  # group -> short name for charts ("C4, stride 16")
    variants: tuple[Variant, ...]
    comparisons: Mapping[str, tuple[Comparison, ...]]  # group -> comparisons

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(
            f"study {self.name!r} has no variant {name!r}; variants: "
            f"{', '.join(v.name for v in self.variants)}"
        )


_T2C_POOL = {"segm AP": 26.9, "segm AP50": 48.8, "segm AP75": 26.4}
_T2C_ALIGN = {"segm AP": 30.3, "segm AP50": 51.2, "segm AP75": 31.5}  # "ave", the paper's default
_T2D_POOL = {"segm AP": 23.6, "segm AP50": 46.5, "segm AP75": 21.6, "bbox AP": 28.2}
_T2D_ALIGN = {"segm AP": 30.9, "segm AP50": 51.8, "segm AP75": 32.1, "bbox AP": 34.0}


def _roi_pool_study() -> Study:
    pool = {"model.roi_heads.pooler_op": "pool", "model.roi_heads.aligned": False}
    align = {"model.roi_heads.pooler_op": "align", "model.roi_heads.aligned": False}
    aligned = {"model.roi_heads.pooler_op": "align", "model.roi_heads.aligned": True}
    variants = []
    for group, recipe, p_pool, p_align in (
        ("c4", "shapes-c4", _T2C_POOL, _T2C_ALIGN),
        ("c5", "shapes-c5", _T2D_POOL, _T2D_ALIGN),
    ):
        variants += [
            Variant(f"{group}-pool", "RoIPool", group, recipe, pool, p_pool, IMAGE_SIZE),
            Variant(f"{group}-align", "RoIAlign", group, recipe, align, p_align, IMAGE_SIZE),
            Variant(
                f"{group}-aligned", "RoIAlign, aligned", group, recipe, aligned, {}, IMAGE_SIZE
            ),
        ]

    def comps(group: str, paper: str) -> tuple[Comparison, ...]:
        return (
            Comparison(f"{group}-align", f"{group}-pool", "RoIAlign beats RoIPool", paper),
            Comparison(
                f"{group}-aligned",
                f"{group}-align",
                "the half-pixel shift (aligned=True) helps RoIAlign",
                "not in the paper (detectron2's later correction)",
            ),
        )

    return Study(
        name="roi-pool",
        title="RoIPool vs RoIAlign (Table 2c, 2d)",
        why="RoIPool rounds each RoI and each of its bins to whole cells of the feature map, so "
        "the features it pools sit up to half a cell (8 px at stride 16, 16 px at stride 32) "
        "away from the object; RoIAlign samples the map bilinearly at the exact positions. "
        "On the shapes set drawn at 128 px (data/shapes_128: object sides 11..95 px, median "
        "31) a median object covers about one cell of the stride-32 map and two of the "
        "stride-16 one, so that shift is a large part of the object, and it grows with the "
        "stride: the paper's gap is 3.4 mask AP at stride 16 and 7.3 at stride 32, largest "
        "at AP75 (tight masks).",
        data=ShapesData("shapes_128", size=IMAGE_SIZE),
        groups={
            "c4": "C4-style: ResNet-10 to res4, one stride-16 map (recipe shapes-c4)",
            "c5": "C5-style: ResNet-10 to res5, one stride-32 map (recipe shapes-c5)",
        },
        short={"c4": "C4, stride 16", "c5": "C5, stride 32"},
        variants=tuple(variants),
        comparisons={
            "c4": comps("c4", "+3.4 mask AP, +5.1 AP75 (Table 2c, R50-C4)"),
            "c5": comps("c5", "+7.3 mask AP, +10.5 AP75, +5.8 box AP (Table 2d, R50-C5)"),
        },
    )


def _mask_loss_study() -> Study:
    def v(mode: str, label: str, paper: dict) -> Variant:
        return Variant(
            mode, label, "fpn", "shapes", {"model.roi_heads.mask_loss": mode}, paper, IMAGE_SIZE
        )

    return Study(
        name="mask-loss",
        title="Decoupled vs coupled masks (Table 2b)",
        why="Mask R-CNN predicts one binary mask per class with a per-pixel sigmoid and trains "
        "only the mask of the RoI's class: classes do not compete for pixels. A per-pixel "
        "softmax over classes (as in FCNs) couples mask and class. On dense scenes where "
        "objects of different classes overlap (data/shapes_overlap) one RoI holds pixels "
        "of two classes: the softmax must call the other class's pixels background there, "
        "and that class elsewhere. A single class-agnostic mask should be nearly as good "
        "as the per-class masks (the classification is the box head's job).",
        data=ShapesData("shapes_overlap", size=IMAGE_SIZE, overlap=True),
        groups={"fpn": "ResNet-10-FPN (recipe shapes; the paper used ResNet-50-C4)"},
        short={"fpn": "R10-FPN"},
        variants=(
            v(
                "sigmoid",
                "sigmoid (decoupled)",
                {"segm AP": 30.3, "segm AP50": 51.2, "segm AP75": 31.5},
            ),
            v(
                "softmax",
                "softmax (coupled)",
                {"segm AP": 24.8, "segm AP50": 44.1, "segm AP75": 25.1},
            ),
            v("agnostic", "class-agnostic", {"segm AP": 29.7}),
        ),
        comparisons={
            "fpn": (
                Comparison(
                    "sigmoid",
                    "softmax",
                    "decoupled sigmoid masks beat a coupled softmax",
                    "+5.5 mask AP, +6.4 AP75 (Table 2b, R50-C4)",
                ),
                Comparison(
                    "sigmoid",
                    "agnostic",
                    "per-class masks are only slightly better than one class-agnostic mask",
                    "+0.6 mask AP (sec. 4.2, R50-C4)",
                ),
            )
        },
    )


_STUDIES: dict[str, Callable[[], Study]] = {
    "roi-pool": _roi_pool_study,
    "mask-loss": _mask_loss_study,
}


def list_studies() -> list[str]:
    """Names accepted by :func:`get_study` (``mrcnn-edu ablate --study``)."""
    return list(_STUDIES)


def get_study(name: str) -> Study:
    """The study called ``name``; an unknown name lists the studies."""
    if name not in _STUDIES:
        raise KeyError(f"unknown study {name!r}; studies: {', '.join(_STUDIES)}")
    return _STUDIES[name]()


# ------------------------------------------------------------------------ provenance helpers
def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository holding this file
    (``git rev-parse HEAD``; tracked files changed but not committed make it dirty)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, check=False, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def machine_info(device: str | torch.device = "cpu") -> dict:
    """Platform, CPU count (and the CPUs this process may use), torch version and threads."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, allow_nan=False).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


# ------------------------------------------------------------------------------ the schedule
def fit_schedule(exp: Experiment, steps: int) -> None:
    """Shorten ``exp.train`` to ``steps`` optimizer steps as ``run_training``'s budget fit does
    (milestones scaled, warm-up at most a tenth, four checkpoints), with no wall-time cut-off:
    every run of a group ends at the same step."""
    t = exp.train
    if steps < 1:
        raise ValueError(f"ablate: steps must be >= 1, got {steps}")
    if steps != t.steps:
        t.milestones = tuple(int(m * steps / t.steps) for m in t.milestones)
        t.warmup_steps = min(t.warmup_steps, steps // 10)
        t.steps = steps
    t.checkpoint_every = min(t.checkpoint_every, max(1, steps // 4))
    t.keep_last = 1
    t.max_minutes = None


def time_variant(exp: Experiment, data_dir: Path, device: str | torch.device = "cpu") -> float:
    """Seconds per training step of ``exp`` (``engine.recipe.time_train_step``: the median of 3
    forward + backward passes after a warm-up, on ``exp.train.batch_size`` images)."""
    train_set, _ = build_datasets(exp, data_dir, val=False)
    _fit_num_classes(exp, train_set)
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(exp.train.seed)
        model = build_model(exp.model).to(device)
    finally:
        torch.set_rng_state(rng)
    loader = make_train_loader(
        train_set,
        exp.train.batch_size,
        num_workers=0,
        seed=exp.train.seed + 7,
        aspect_ratio_grouping=exp.train.aspect_ratio_grouping,
    )
    return time_train_step(model, loader, device=device)


def plan_steps(
    study: Study,
    group: str,
    data_dir: Path,
    *,
    minutes: float | None,
    steps: int | None,
    overrides: Mapping | None = None,
    device: str | torch.device = "cpu",
    plan: dict | None = None,
) -> dict:
    """The number of steps every run of ``group`` trains, as a ``plan.json`` entry.

    ``steps`` given: that number. Else every variant of the group is timed
    (:func:`time_variant`) and the slowest sets ``max(MIN_STEPS, minutes * 60 * FIT /
    seconds per step)``, capped at the recipe's own steps. ``plan`` holds the entry of an
    earlier call (a resumed study): it is reused if it was made the same way (same ``steps``,
    or same ``minutes``), and a different request is a ``ValueError`` (a study whose runs
    trained different numbers of steps would not compare like with like).
    """
    key = f"{study.name}/{group}"
    variants = [v for v in study.variants if v.group == group]
    if plan is not None:
        same = (
            plan.get("steps") == steps
            if steps is not None
            else plan.get("how") == "timed" and plan.get("minutes") == minutes
        )
        if not same:
            was = (
                f"--steps {plan.get('steps')}"
                if plan.get("how") == "given"
                else f"--minutes {plan.get('minutes')} ({plan.get('steps')} steps)"
            )
            now = f"--steps {steps}" if steps is not None else f"--minutes {minutes}"
            raise ValueError(
                f"ablate: the runs of {key} in this output folder were planned "
                f"with {was}, not {now}; rerun with the same setting to resume, "
                "or choose another output folder"
            )
        return plan
    cap = min(v.experiment(0, overrides).train.steps for v in variants)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"ablate: steps must be >= 1, got {steps}")
        return {"how": "given", "steps": int(steps), "minutes": None, "step_seconds": {}}
    if minutes is None or not minutes > 0:
        raise ValueError(f"ablate: give steps or a positive budget in minutes, got {minutes}")
    secs = {v.name: time_variant(v.experiment(0, overrides), data_dir, device) for v in variants}
    slowest = max(secs.values())
    fitted = min(cap, max(MIN_STEPS, int(minutes * 60 * FIT / slowest)))
    return {
        "how": "timed",
        "steps": fitted,
        "minutes": minutes,
        "step_seconds": {k: round(s, 4) for k, s in secs.items()},
    }


# ------------------------------------------------------------------------- the pre-training
def pretrained_weights(
    study: Study,
    data_dir: Path,
    work_dir: Path,
    steps: int,
    overrides: Mapping | None = None,
    *,
    plan: dict | None = None,
    progress: bool = True,
) -> dict:
    """The ``plan.json`` entry of the weights every run of ``study`` starts from.

    The paper fine-tunes one ImageNet-trained ResNet-50 in every variant. Here one ResNet body
    (the variants' depth and norm) is trained once per study on the study's own training
    images (:func:`mrcnn_edu.engine.pretrain.pretrain_resnet`: semantic segmentation; no
    boxes, instances or RoI operator), seed 0, into
    ``work_dir/pretrained/{set}_resnet{depth}_{steps}steps.pt``. ``steps == 0``: every variant
    starts from random weights (``{"steps": 0}``).

    ``plan`` holds the entry an earlier call made (a resumed study): a different ``steps`` is a
    ``ValueError``; a weights file that is gone is trained again, and must come out identical
    (its SHA-256), else the finished runs and the missing ones would start from different
    weights and the ``ValueError`` says so. An existing file whose sidecar JSON records the
    same request is reused.
    """
    if steps < 0:
        raise ValueError(f"ablate: pretrain steps must be >= 0, got {steps}")
    if plan is not None and plan.get("steps") != steps:
        raise ValueError(
            f"ablate: the runs of study {study.name!r} in this output folder started from "
            f"weights pre-trained for {plan.get('steps')} steps, not {steps}; rerun with "
            f"--pretrain-steps {plan.get('steps')} to resume, or choose another output folder"
        )
    if steps == 0:
        return {"steps": 0}
    exps = [v.experiment(0, overrides) for v in study.variants]
    bodies = {(e.model.backbone.depth, e.model.backbone.norm) for e in exps}
    if len(bodies) != 1:
        raise ValueError(f"ablate: the variants of {study.name!r} use different ResNets {bodies}")
    (depth, norm), t = bodies.pop(), exps[0].model.transform
    path = work_dir / "pretrained" / f"{study.data.name}_resnet{depth}_{steps}steps.pt"
    request = {"depth": depth, "norm": norm, "steps": steps, "seed": 0, "data": str(data_dir)}
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        same = all(info.get(k) == v for k, v in request.items())
        wanted = plan["sha256"] if plan is not None else info.get("sha256")
        if same and file_sha256(path) == wanted:
            return info
    info = pretrain_resnet(
        data_dir,
        path,
        depth=depth,
        norm=norm,
        steps=steps,
        seed=0,
        image_mean=t.image_mean,
        image_std=t.image_std,
        progress=progress,
    )
    if plan is not None and info["sha256"] != plan["sha256"]:
        raise ValueError(
            f"ablate: {path} was missing and training it again gave other weights (SHA-256 "
            f"{info['sha256'][:12]}, the finished runs started from {plan['sha256'][:12]}; "
            "another machine or thread count?); the missing runs would not compare with the "
            "finished ones: start the study in another output folder"
        )
    return info


# --------------------------------------------------------------------------------- the runs
def run_file(out_dir: str | Path, study: str, variant: str, seed: int) -> Path:
    """Where the JSON of one run goes: ``out_dir/{study}_{variant}_seed{seed}.json``."""
    return Path(out_dir) / f"{study}_{variant}_seed{seed}.json"


def predictions_file(out_dir: str | Path, study: str, variant: str, seed: int) -> Path:
    """Where one run's kept detections go (:func:`select_predictions`), beside its JSON:
    ``out_dir/{study}_{variant}_seed{seed}.predictions.json``."""
    return Path(out_dir) / f"{study}_{variant}_seed{seed}.predictions.json"


def select_predictions(
    results: Sequence[Mapping],
    image_ids: Iterable[int],
    *,
    num_images: int = PREDICTION_IMAGES,
    min_score: float = PREDICTION_MIN_SCORE,
) -> tuple[list[int], list[dict]]:
    """The detections a run keeps so that its masks can be drawn without its checkpoint.

    Args:
        results: COCO result dicts (``engine.evaluate.coco_results``: ``image_id``,
            ``category_id``, ``score``, ``bbox`` [x, y, w, h], ``segmentation`` RLE).
        image_ids: the images that were evaluated (any order).
        num_images: how many images to keep: the ``num_images`` smallest ids, so every variant
            and seed of a study (same data, same evaluated images) keeps the same images.
        min_score: keep detections with ``score >= min_score``.

    Returns:
        ``(kept image ids in increasing order, their results with score >= min_score, sorted
        by image id, then by decreasing score)``; the results are the given dicts, not copies.
    """
    if num_images < 1:
        raise ValueError(f"ablate: prediction images must be >= 1, got {num_images}")
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"ablate: prediction min_score must be in [0, 1], got {min_score}")
    kept = sorted({int(i) for i in image_ids})[:num_images]
    keep = set(kept)
    for j, r in enumerate(results):
        missing = {"image_id", "category_id", "score", "bbox", "segmentation"} - set(r)
        if missing:
            raise ValueError(
                f"ablate: result {j} (image id {r.get('image_id')}) lacks {sorted(missing)}; "
                "select_predictions needs COCO box and mask results"
            )
    chosen = [r for r in results if int(r["image_id"]) in keep and r["score"] >= min_score]
    chosen.sort(key=lambda r: (int(r["image_id"]), -float(r["score"])))
    return kept, chosen


def load_predictions(path: str | Path) -> list[dict]:
    """The COCO results of a predictions file (:func:`predictions_file`): a list of dicts with
    ``image_id``, ``category_id``, ``score``, ``bbox`` [x, y, w, h] and ``segmentation``
    (compressed RLE, ``pycocotools.mask.decode`` gives the [H, W] uint8 mask). A missing
    file is a ``FileNotFoundError``; anything that is not such a list a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablate: no predictions file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"ablate: cannot read predictions file {path} ({err})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"ablate: {path} is not a list of COCO result dicts")
    for j, r in enumerate(data):
        missing = {"image_id", "category_id", "score", "bbox", "segmentation"} - set(r)
        if missing:
            raise ValueError(f"ablate: {path}: result {j} lacks {sorted(missing)}")
    return data


def decode_predictions(
    results: Sequence[Mapping],
    image_id: int,
    image_size: tuple[int, int],
    cat_id_to_label: Mapping[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """One image's detections, decoded from COCO results (a predictions file), in the layout
    the model returns them (what ``mrcnn_edu.viz`` draws).

    Args:
        results: COCO result dicts (:func:`load_predictions`); those of other images are skipped.
        image_id: the COCO image id.
        image_size: ``(H, W)`` of the image; every mask must have this size.
        cat_id_to_label: COCO category id -> training label (``CocoDetection.cat_id_to_label``);
            ``None``: labels are the category ids.

    Returns:
        ``boxes`` [N, 4] float32 (x1, y1, x2, y2), ``labels`` [N] int64, ``scores`` [N] float32,
        ``masks`` [N, H, W] uint8 0/1 (the RLE decoded), in the order of ``results``.
    """
    from pycocotools import mask as mask_utils

    H, W = (int(v) for v in image_size)
    mine = [r for r in results if int(r["image_id"]) == int(image_id)]
    masks = np.zeros((len(mine), H, W), np.uint8)
    labels = []
    for j, r in enumerate(mine):
        size = [int(v) for v in r["segmentation"]["size"]]
        if size != [H, W]:
            raise ValueError(
                f"decode_predictions: result {j} of image {image_id} has a mask of size {size}, "
                f"but the image is {[H, W]} (H, W)"
            )
        masks[j] = mask_utils.decode(r["segmentation"])  # [H, W] uint8
        cat = int(r["category_id"])
        if cat_id_to_label is not None and cat not in cat_id_to_label:
            raise ValueError(
                f"decode_predictions: result {j} of image {image_id} has category id {cat}, "
                f"which maps to no label; known {sorted(cat_id_to_label)}"
            )
        labels.append(cat if cat_id_to_label is None else int(cat_id_to_label[cat]))
    boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x1, y1, x2, y2)
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor([float(r["score"]) for r in mine], dtype=torch.float32),
        "masks": torch.from_numpy(masks),
    }


def _seeds(seeds: int | Iterable[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"ablate: seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"ablate: seeds must be distinct non-negative ints, got {out}")
    return out


def _train_and_evaluate(
    study: Study,
    variant: Variant,
    seed: int,
    *,
    data_dir: Path,
    steps: int,
    overrides: Mapping,
    run_dir: Path,
    device: str | torch.device,
    progress: bool,
    val_images: int | None,
    predictions_path: Path | None = None,
    prediction_images: int = PREDICTION_IMAGES,
    prediction_min_score: float = PREDICTION_MIN_SCORE,
) -> dict:
    """Train one (variant, seed) for ``steps`` steps (continuing from ``run_dir/last.pt`` if an
    earlier call was interrupted), evaluate it and return its record. With
    ``predictions_path`` its detections on ``prediction_images`` val images
    (:func:`select_predictions`) are written there: ``evaluate`` writes every detection to
    ``run_dir/eval_results.json``, which is filtered and then deleted."""
    exp = variant.experiment(seed, overrides)
    fit_schedule(exp, steps)
    t0 = time.perf_counter()
    model, result = run_training(
        exp,
        data_dir,
        run_dir,
        resume=True,
        progress=progress,
        device=device,
        check=False,
        fit_budget=False,
    )
    train_minutes = (time.perf_counter() - t0) / 60
    t0 = time.perf_counter()
    _, val = build_datasets(exp, data_dir, train=False)
    full = run_dir / "eval_results.json"  # every detection on every evaluated image
    res = evaluate(
        model,
        val,
        iou_types=("bbox", "segm"),
        max_images=val_images,
        progress=progress,
        device=device,
        results_file=full if predictions_path is not None else None,
    )
    eval_minutes = (time.perf_counter() - t0) / 60
    predictions = None
    if predictions_path is not None:
        evaluated = unwrap_coco_dataset(val)[1][: res.num_images]  # evaluate's first images
        kept, chosen = select_predictions(
            json.loads(full.read_text(encoding="utf-8")),
            evaluated,
            num_images=prediction_images,
            min_score=prediction_min_score,
        )
        text = json.dumps(chosen, separators=(",", ":")).encode("utf-8")
        atomic_write(predictions_path, lambda f: f.write(text))
        full.unlink()
        predictions = {
            "file": predictions_path.name,
            "image_ids": kept,
            "min_score": prediction_min_score,
            "num_detections": len(chosen),
            "mask_threshold": 0.5,  # evaluate's: a pixel is in the mask from this probability
        }
    manifest = json.loads((data_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    return {
        "study": study.name,
        "variant": variant.name,
        "label": variant.label,
        "group": variant.group,
        "recipe": variant.recipe,
        "seed": seed,
        "variant_overrides": dict(variant.overrides),
        "shared_overrides": dict(overrides),
        "steps": result.step,
        "steps_planned": steps,
        "resumed_from_step": result.step - result.steps_done or None,
        "minutes": round(train_minutes, 3),
        "eval_minutes": round(eval_minutes, 3),
        "data": {
            "root": str(data_dir),
            "seed": manifest.get("seed"),
            "size": manifest.get("size"),
            "options": manifest.get("options", {}),
            "train_images": manifest["splits"]["train"]["num_images"],
            "val_images": manifest["splits"]["val"]["num_images"],
            "evaluated_images": res.num_images,
        },
        "stats": {t: [_finite(s) for s in res.stats[t]] for t in ("bbox", "segm")},
        "metrics": {
            t: {k: _finite(v) for k, v in res.metrics[t].items()} for t in ("bbox", "segm")
        },
        "val_losses": {k: _finite(v) for k, v in res.val_losses.items()},
        "predictions": predictions,
        "config": dataclasses.asdict(exp),
        "git": git_commit(),
        "machine": machine_info(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_study(
    study: str | Study,
    seeds: int | Iterable[int] = 3,
    minutes: float | None = 2.0,
    data_root: str | Path = "data",
    out_dir: str | Path = "results/ablations",
    *,
    progress: bool = True,
    steps: int | None = None,
    overrides: Mapping[str, object] | None = None,
    work_dir: str | Path = "build/ablations",
    val_images: int | None = None,
    device: str | torch.device = "cpu",
    keep: str = "first-seed",
    command: str | None = None,
    on_run: Callable[[dict, bool], None] | None = None,
    prediction_images: int = PREDICTION_IMAGES,
    prediction_min_score: float = PREDICTION_MIN_SCORE,
    pretrain_steps: int = PRETRAIN_STEPS,
) -> list[dict]:
    """Train and evaluate every (variant, seed) of ``study``; returns their records.

    Args:
        study: a :class:`Study` or a name of :func:`list_studies`.
        seeds: how many (seeds 0..n-1) or which seeds. Each seed sets ``train.seed`` (data
            order, flips, initialisation, RoI sampling), the same for every variant.
        minutes: wall-time budget per training run, turned into a number of steps per group
            of variants by timing them (:func:`plan_steps`); ignored when ``steps`` is given.
        data_root: the folder holding the study's set (``data_root / study.data.name``),
            written there by :meth:`ShapesData.ensure` when absent.
        out_dir: one JSON per run (:func:`run_file`), its detections on a few val images
            (:func:`predictions_file`, a few tens of KB: the notebook draws masks from them
            without the checkpoints), ``plan.json`` (the steps per group) and ``results.md``
            (:func:`write_results`, over every run in the folder).
        progress: tqdm bars while training and evaluating.
        steps: optimizer steps per run (instead of a budget).
        overrides: dotted config overrides applied to every variant alike (e.g. tiny widths).
        work_dir: checkpoints and ``metrics.csv`` of each run, under
            ``work_dir/{study}/{variant}/seed{seed}/``.
        val_images: evaluate only the first ``val_images`` validation images (default all).
        device: where training and evaluation run.
        keep: which runs keep their checkpoint once evaluated: ``"first-seed"`` (one model per
            variant, for the notebook's side-by-side masks), ``"all"`` or ``"none"``.
        command: the command that made the runs, recorded in each JSON and in ``results.md``.
        on_run: called after each run as ``on_run(record, skipped)`` (``skipped``: its JSON was
            already there).
        prediction_images, prediction_min_score: each run keeps its detections with a score
            from ``prediction_min_score`` on the ``prediction_images`` evaluated val images of
            smallest id (:func:`select_predictions`), the same images for every run.
        pretrain_steps: every variant starts from one ResNet body pre-trained for this many
            steps on semantic segmentation of the study's training images
            (:func:`pretrained_weights`, recorded in ``plan.json`` and in each run's
            ``"pretrained"``), as the paper's variants all start from ImageNet weights;
            ``0``: from random weights.

    A run whose JSON exists is skipped (its record is read back), so an interrupted study
    re-runs only what is missing. The same data, seeds and steps for every variant.
    """
    if isinstance(study, str):
        study = get_study(study)
    if keep not in ("first-seed", "all", "none"):
        raise ValueError(f"ablate: keep must be 'first-seed', 'all' or 'none', got {keep!r}")
    seed_list = _seeds(seeds)
    # bad prediction settings fail before anything is trained
    select_predictions([], [], num_images=prediction_images, min_score=prediction_min_score)
    overrides = dict(overrides or {})
    for v in study.variants:  # bad overrides fail before anything is written or trained
        v.experiment(seed_list[0], overrides)
    if pretrain_steps and "model.backbone.weights" in overrides:
        raise ValueError(
            "ablate: model.backbone.weights is set by the pre-training; pass pretrain_steps=0 "
            "(--pretrain-steps 0) to start every variant from your weights instead"
        )
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [
        (v, s)
        for v in study.variants
        for s in seed_list
        if not run_file(out_dir, study.name, v.name, s).is_file()
    ]
    plan_path = out_dir / "plan.json"
    plan = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else {}
    data_dir, run_overrides, pkey = None, overrides, f"{study.name}/pretrain"
    if todo:
        data_dir = study.data.ensure(data_root, progress=progress)
        train_set, _ = build_datasets(todo[0][0].experiment(0, overrides), data_dir, val=False)
        check_data(train_set, progress=progress).raise_if_bad()
        plan[pkey] = pretrained_weights(
            study,
            data_dir,
            work_dir,
            pretrain_steps,
            overrides,
            plan=plan.get(pkey),
            progress=progress,
        )
        _write_json(plan_path, plan)
        if pretrain_steps:
            run_overrides = {**overrides, "model.backbone.weights": plan[pkey]["path"]}
    records = []
    for v in study.variants:
        key = f"{study.name}/{v.group}"
        for s in seed_list:
            path = run_file(out_dir, study.name, v.name, s)
            if path.is_file():
                record = _read_run(path)
                records.append(record)
                if on_run is not None:
                    on_run(record, True)
                continue
            if key not in plan:
                plan[key] = plan_steps(
                    study,
                    v.group,
                    data_dir,
                    minutes=minutes,
                    steps=steps,
                    overrides=overrides,
                    device=device,
                )
                _write_json(plan_path, plan)
            else:
                plan_steps(
                    study, v.group, data_dir, minutes=minutes, steps=steps, plan=plan[key]
                )  # same request as before, or a ValueError
            run_dir = work_dir / study.name / v.name / f"seed{s}"
            _claim_run_dir(
                run_dir,
                {
                    "variant_overrides": dict(v.overrides),
                    "shared_overrides": run_overrides,
                    "seed": s,
                    "steps": plan[key]["steps"],
                    "data": str(data_dir),
                    "pretrained": plan[pkey].get("sha256"),
                },
            )
            record = _train_and_evaluate(
                study,
                v,
                s,
                data_dir=data_dir,
                steps=plan[key]["steps"],
                overrides=run_overrides,
                run_dir=run_dir,
                device=device,
                progress=progress,
                val_images=val_images,
                predictions_path=predictions_file(out_dir, study.name, v.name, s),
                prediction_images=prediction_images,
                prediction_min_score=prediction_min_score,
            )
            record["command"] = command
            record["pretrained"] = plan[pkey]
            _write_json(path, record)
            if keep == "none" or (keep == "first-seed" and s != seed_list[0]):
                shutil.rmtree(run_dir, ignore_errors=True)
            records.append(record)
            if on_run is not None:
                on_run(record, False)
    write_results(out_dir)
    return records


def _claim_run_dir(run_dir: Path, what: dict) -> None:
    """Make ``run_dir`` the folder of this run: a folder left by an interrupted run of the same
    request (``ablate_run.json`` equal to ``what``) is kept, so training continues from its
    checkpoint; anything else there (another study's or another setting's run) is removed."""
    marker = run_dir / "ablate_run.json"
    if run_dir.exists():
        try:
            same = json.loads(marker.read_text(encoding="utf-8")) == json.loads(json.dumps(what))
        except (OSError, ValueError):
            same = False
        if same:
            return
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    _write_json(marker, what)


# ----------------------------------------------------------------------------- the summaries
def _read_run(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"ablate: cannot read run file {path} ({err}); delete it to re-run that run"
        ) from None
    missing = {"study", "variant", "seed", "metrics"} - set(record)
    if missing:
        raise ValueError(f"ablate: {path} is not a run file (missing {sorted(missing)})")
    return record


def load_runs(out_dir: str | Path) -> list[dict]:
    """Every run record (``{study}_{variant}_seed{n}.json``) in ``out_dir``, in file-name order."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return [_read_run(p) for p in sorted(out_dir.iterdir()) if _RUN_FILE.match(p.name)]


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """``(mean, sample standard deviation, n)`` of the finite values (``None``/NaN skipped);
    the standard deviation divides by ``n - 1`` and is NaN for fewer than two values."""
    xs = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def _metric(record: dict, key: str) -> float | None:
    iou_type, name = key.split(" ")
    return record.get("metrics", {}).get(iou_type, {}).get(name)


@dataclass
class VariantSummary:
    """The runs of one variant, summarised over seeds (AP in percent, as the paper's tables)."""

    study: str
    group: str
    variant: str
    label: str
    seeds: list[int]
    steps: list[int]
    values: dict[str, list[float | None]]  # METRICS key -> one value per seed (percent)
    mean: dict[str, float]
    std: dict[str, float]
    paper: dict[str, float]


def summarize(records: Iterable[dict]) -> list[VariantSummary]:
    """One :class:`VariantSummary` per (study, variant), in the studies' own order (unknown
    studies or variants after, alphabetically); seeds in increasing order."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by.setdefault((r["study"], r["variant"]), []).append(r)

    def order(key: tuple[str, str]) -> tuple:
        study, variant = key
        if study in _STUDIES:
            names = [v.name for v in get_study(study).variants]
            if variant in names:
                return (list(_STUDIES).index(study), names.index(variant), "")
        return (len(_STUDIES), 0, f"{study}/{variant}")

    out = []
    for key in sorted(by, key=order):
        runs = sorted(by[key], key=lambda r: r["seed"])
        study, variant = key
        try:
            paper = dict(get_study(study).variant(variant).paper)
        except KeyError:
            paper = {}
        values = {
            m: [None if _metric(r, m) is None else 100 * _metric(r, m) for r in runs]
            for m, *_ in METRICS
        }
        stats = {m: mean_std(vs) for m, vs in values.items()}
        out.append(
            VariantSummary(
                study=study,
                group=runs[0].get("group", ""),
                variant=variant,
                label=runs[0].get("label", variant),
                seeds=[r["seed"] for r in runs],
                steps=[r.get("steps") for r in runs],
                values=values,
                mean={m: s[0] for m, s in stats.items()},
                std={m: s[1] for m, s in stats.items()},
                paper=paper,
            )
        )
    return out


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def compare(a: VariantSummary, b: VariantSummary, metric: str = "segm AP") -> str:
    """One sentence on ``a`` vs ``b`` in ``metric``: the difference of the means against the
    spread over seeds (the larger of the two sample standard deviations). A difference smaller
    than the spread is "within the noise"; with one seed there is no spread to compare."""
    title = {k: t for k, _, _, t in METRICS}[metric]
    ma, sa, na = mean_std(a.values[metric])
    mb, sb, nb = mean_std(b.values[metric])
    if na == 0 or nb == 0:
        return f"{title}: no values to compare."
    d = ma - mb
    head = (
        f"{title}: {a.label} {_pm(ma, sa)} vs {b.label} {_pm(mb, sb)}, a difference of "
        f"{d:+.1f} points"
    )
    if na < 2 or nb < 2:
        return (
            f"{head}; one seed only, so no spread over seeds was measured and the noise "
            "cannot be told from an effect."
        )
    spread = max(sa, sb)
    if abs(d) < spread or d == 0:
        return (
            f"{head}, within the noise (the spread over seeds is {spread:.1f}): these runs "
            "cannot tell the two apart."
        )
    who = a.label if d > 0 else b.label
    return (
        f"{head}, larger than the spread over seeds ({spread:.1f}): {who} is better "
        f"here, {'as the paper found' if d > 0 else 'unlike the paper'}."
    )


def _table(rows: list[VariantSummary]) -> list[str]:
    head = (
        ["variant", "seeds", "steps"]
        + [t for *_, t in METRICS]
        + [f"paper {t}" for *_, t in METRICS]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        steps = sorted({s for s in r.steps if s is not None})
        cells = [r.label, str(len(r.seeds)), "/".join(str(s) for s in steps) or "?"]
        cells += [_pm(r.mean[m], r.std[m]) for m, *_ in METRICS]
        cells += [f"{r.paper[m]:.1f}" if m in r.paper else "—" for m, *_ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_results(records: Sequence[dict]) -> str:
    """``results.md``: per study and group, the table (mean ± sample std over seeds, AP in
    percent, the paper's numbers beside) and the verdict of each comparison."""
    records = list(records)
    summaries = summarize(records)
    lines = [
        "# The paper's ablations on the shapes set",
        "",
        (
            "Mask R-CNN (He et al. 2017) Table 2, rerun small: every variant of a comparison "
            "trains on the same data with the same seeds for the same number of steps; AP in "
            "percent on the val split, mean ± sample standard deviation over seeds. The "
            "paper's numbers are COCO minival with ResNet-50 and a full schedule: compare the "
            "*direction and size of the differences*, not the values. A difference smaller than "
            "the spread over seeds is reported as within the noise."
        ),
        "",
    ]
    commands = sorted({r.get("command") for r in records if r.get("command")})
    if commands:
        lines += ["Made with:", ""] + [f"    {c}" for c in commands] + [""]
    commits = sorted({(r.get("git") or {}).get("commit") or "unknown" for r in records})
    dirty = any((r.get("git") or {}).get("dirty") for r in records)
    machines = sorted(
        {
            f"{m.get('platform')}, {m.get('cpu_count')} CPUs, torch {m.get('torch')}, "
            f"{m.get('device')}"
            for m in (r.get("machine") or {} for r in records)
        }
    )
    minutes = [r.get("minutes") for r in records if r.get("minutes") is not None]
    evals = [r.get("eval_minutes") for r in records if r.get("eval_minutes") is not None]
    lines += [
        f"Commit: {', '.join(c[:12] for c in commits)}"
        + (" (with uncommitted changes)" if dirty else "")
        + ".  ",
        f"Machine: {'; '.join(machines)}.  ",
        f"{len(records)} runs, {sum(minutes):.0f} minutes of training"
        f" ({min(minutes):.1f}..{max(minutes):.1f} per run)"
        + (f" and {sum(evals):.0f} of evaluation." if evals else ".")
        if minutes
        else f"{len(records)} runs.",
        "",
    ]
    for study_name in dict.fromkeys(s.study for s in summaries):
        try:
            study = get_study(study_name)
        except KeyError:
            study = None
        rows = [s for s in summaries if s.study == study_name]
        lines += [f"## {study.title if study else study_name}", ""]
        if study is not None:
            data = next(r.get("data", {}) for r in records if r["study"] == study_name)
            lines += [
                study.why,
                "",
                (
                    f"Data: `{data.get('root')}` ({data.get('train_images')} train images, "
                    f"{data.get('evaluated_images')} val images evaluated, "
                    f"{data.get('size')} px, options {data.get('options') or 'none'})."
                ),
                "",
                _start_line([r for r in records if r["study"] == study_name]),
                "",
            ]
        for group in dict.fromkeys(r.group for r in rows):
            group_rows = [r for r in rows if r.group == group]
            title = study.groups.get(group, group) if study else group
            lines += [f"### {title}", ""] + _table(group_rows) + [""]
            by_name = {r.variant: r for r in group_rows}
            for c in study.comparisons.get(group, ()) if study else ():
                if c.a not in by_name or c.b not in by_name:
                    continue
                a, b = by_name[c.a], by_name[c.b]
                lines.append(
                    f"- **{c.claim}?** Paper: {c.paper}. Here: "
                    + " ".join(compare(a, b, m) for m in ("segm AP", "segm AP75"))
                )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _start_line(records: Sequence[dict]) -> str:
    """What the study's runs started from (their ``"pretrained"`` entries)."""
    starts = {json.dumps(r.get("pretrained") or {"steps": 0}, sort_keys=True) for r in records}
    if len(starts) > 1:
        return "Start: the runs started from DIFFERENT weights (see their `pretrained` entries)."
    p = json.loads(starts.pop())
    if not p.get("steps"):
        return "Start: random weights (no pre-training)."
    miou, base = p.get("val_miou"), p.get("val_miou_background_only")
    score = (
        f"; val mean IoU {miou:.2f}, against {base:.2f} for calling every pixel background"
        if miou is not None and base is not None
        else ""
    )
    return (
        f"Start: every run from one ResNet-{p.get('depth')} pre-trained for {p['steps']} steps "
        f"on semantic segmentation of the training images (`engine.pretrain`{score}; SHA-256 "
        f"{str(p.get('sha256'))[:12]}), as the paper's variants all start from ImageNet weights."
    )


def write_results(out_dir: str | Path) -> Path:
    """Write ``out_dir/results.md`` from every run JSON in ``out_dir``; returns its path."""
    out_dir = Path(out_dir)
    text = format_results(load_runs(out_dir)).encode("utf-8")
    path = out_dir / "results.md"
    atomic_write(path, lambda f: f.write(text))
    return path


def chart_data(
    summaries: Sequence[VariantSummary],
    study: str,
    metrics: Sequence[str] = ("segm AP", "segm AP75", "bbox AP"),
) -> tuple[dict, dict]:
    """``(panels, paper)`` for ``mrcnn_edu.viz.plot_ablation_study``: ``{group name: {metric
    title: {variant label: per-seed values}}}`` and the paper's values in the same layout."""
    try:
        groups = get_study(study).short
    except KeyError:
        groups = {}
    titles = {k: t for k, _, _, t in METRICS}
    panels: dict = {}
    paper: dict = {}
    for s in summaries:
        if s.study != study:
            continue
        g = groups.get(s.group, s.group)
        for m in metrics:
            panels.setdefault(g, {}).setdefault(titles[m], {})[s.label] = [
                v for v in s.values[m] if v is not None
            ]
            if m in s.paper:
                paper.setdefault(g, {}).setdefault(titles[m], {})[s.label] = s.paper[m]
    return panels, paper

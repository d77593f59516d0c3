"""Optimizer and learning-rate schedule of the Mask R-CNN recipe.

Mask R-CNN (He et al. 2017, section 3.1 "Training") trains with SGD, momentum 0.9, weight decay
1e-4 and a learning rate of 0.02 for 16 images per batch, divided by 10 at 120k of 160k
iterations; Detectron's shorter "1x" schedule (the one torchvision's COCO weights were trained
with) is 90k iterations, divided by 10 at 60k and 80k. Goyal
et al. 2017 ("Accurate, Large Minibatch SGD") add a linear warm-up over the first iterations,
which Detectron, detectron2 and torchvision's reference scripts all use. Notebook
``08_training.ipynb`` plots these schedules and trains with them;
``09_coco_training.ipynb`` uses the 1x recipe.

Two choices follow detectron2 and torchvision rather than the paper, which does not mention them:

* norm layers' scale/shift and all biases get no weight decay (``norm_bias_decay=False``):
  pulling a BatchNorm / GroupNorm scale towards zero shrinks a whole channel, and a bias has no
  "size" to regularise;
* the schedule is stepped per iteration (not per epoch), through a
  ``torch.optim.lr_scheduler.LambdaLR`` whose factor is ``warmup(step) * main(step)``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["NORM_CLASSES", "LRFactor", "build_optimizer", "build_scheduler", "param_groups"]

#: Norm layers whose ``weight`` (scale) and ``bias`` (shift) get no weight decay; the same tuple
#: as torchvision's reference ``set_weight_decay``. A module whose class name contains "Norm"
#: (e.g. a custom GroupNorm variant) counts too.
NORM_CLASSES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_CLASSES) or "norm" in type(module).__name__.lower()


def param_groups(
    model: nn.Module, weight_decay: float, norm_bias_decay: bool = False
) -> list[dict]:
    """Split ``model``'s trainable parameters into a decayed and a non-decayed group.

    Returns ``[{"name": "decay", "params": [...], "weight_decay": weight_decay},
    {"name": "no_decay", "params": [...], "weight_decay": 0.0}]`` (empty groups left out).
    ``no_decay`` holds every parameter of a norm layer and every parameter named ``*bias``,
    unless ``norm_bias_decay`` puts them all in ``decay``. Parameters with
    ``requires_grad=False`` (a frozen stem, FrozenBatchNorm buffers) are left out; a parameter
    shared by two modules appears once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if not norm_bias_decay and (norm or name == "bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": float(weight_decay)},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    norm_bias_decay: bool = False,
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW over :func:`param_groups` of ``model``.

    Args:
        model: its trainable parameters (``requires_grad=True``) are optimised.
        name: ``"sgd"`` (``torch.optim.SGD(momentum=momentum)``) or ``"adamw"``
            (``torch.optim.AdamW``, default betas; ``momentum`` is not used).
        lr: base learning rate (the paper: 0.02 for 16 images per batch, scaled linearly with
            the batch size).
        weight_decay: L2 penalty of the ``decay`` group (the paper: 1e-4).
        norm_bias_decay: also decay norm layers' parameters and biases.

    Raises:
        ValueError: unknown ``name``, a negative ``lr`` / ``weight_decay``, or a model with no
            trainable parameter.
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(
            f"build_optimizer: lr and weight_decay must be >= 0, got lr={lr}, "
            f"weight_decay={weight_decay}"
        )
    groups = param_groups(model, weight_decay, norm_bias_decay)
    if not groups:
        raise ValueError(
            f"build_optimizer: {type(model).__name__} has no parameter with requires_grad=True"
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"build_optimizer: name must be 'sgd' or 'adamw', got {name!r}")


class LRFactor:
    """The learning-rate multiplier at iteration ``step``: ``warmup(step) * main(step)``.

    * warm-up (Goyal et al. 2017; detectron2's and torchvision's "linear" warm-up): for
      ``step < warmup_steps``, ``alpha = step / warmup_steps`` and
      ``warmup = warmup_factor * (1 - alpha) + alpha``, rising linearly from ``warmup_factor``
      to 1; then 1.
    * ``"step"``: ``gamma ** (number of milestones <= step)`` (as ``MultiStepLR``).
    * ``"cosine"``: ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * step / total_steps)) / 2``
      (the whole run, warm-up included, as detectron2's ``WarmupCosineLR``); 1 -> ``min_lr_ratio``.
    * ``"constant"``: 1.

    An object with plain attributes rather than a closure, so ``LambdaLR.state_dict()`` saves
    its settings and a notebook can evaluate ``factor(step)`` to plot the schedule.

    >>> f = LRFactor(total_steps=100, warmup_steps=10, warmup_factor=0.001, schedule="step",
    ...              milestones=(60, 80), gamma=0.1)
    >>> [round(f(s), 6) for s in (0, 5, 10, 59, 60, 80)]
    [0.001, 0.5005, 1.0, 1.0, 0.1, 0.01]
    """

    def __init__(
        self,
        *,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_factor: float = 0.001,
        schedule: str = "step",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
    ):
        where = "build_scheduler"
        if total_steps < 1:
            raise ValueError(f"{where}: total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"{where}: warmup_steps must be in [0, total_steps={total_steps}], "
                f"got {warmup_steps}"
            )
        if not 0.0 < warmup_factor <= 1.0:
            raise ValueError(f"{where}: warmup_factor must be in (0, 1], got {warmup_factor}")
        if schedule not in ("step", "cosine", "constant"):
            raise ValueError(
                f"{where}: schedule must be 'step', 'cosine' or 'constant', got {schedule!r}"
            )
        milestones = tuple(int(m) for m in milestones)
        if list(milestones) != sorted(milestones) or any(m < 1 for m in milestones):
            raise ValueError(
                f"{where}: milestones must be increasing positive steps, got {milestones}"
            )
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"{where}: gamma must be in (0, 1], got {gamma}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"{where}: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.schedule = schedule
        self.milestones = milestones
        self.gamma = float(gamma)
        self.min_lr_ratio = float(min_lr_ratio)

    def warmup(self, step: int) -> float:
        if step >= self.warmup_steps:
            return 1.0
        alpha = step / self.warmup_steps
        return self.warmup_factor * (1.0 - alpha) + alpha

    def main(self, step: int) -> float:
        if self.schedule == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, step)
        if self.schedule == "cosine":
            t = min(step, self.total_steps) / self.total_steps
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (
                1.0 + math.cos(math.pi * t)
            )
        return 1.0

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.main(step)

    def __repr__(self) -> str:
        return (
            f"LRFactor(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
            f"warmup_factor={self.warmup_factor}, schedule={self.schedule!r}, "
            f"milestones={self.milestones}, gamma={self.gamma}, "
            f"min_lr_ratio={self.min_lr_ratio})"
        )


class TimeBudgetFactor(LRFactor):
    """:class:`LRFactor` whose schedule runs on the wall clock instead of the step counter.

    For a run with a fixed time budget (``make demo``: 10 minutes) the number of steps depends
    on the machine and its load, so a schedule written in steps is either cut short (the
    learning rate never decays) or ends early. Here the warm-up still counts steps, but the
    main schedule reads ``t = elapsed / budget_s`` (the clock starts at the first call, when
    the ``LambdaLR`` is built): ``"cosine"`` decays from 1 to ``min_lr_ratio`` exactly when the
    budget runs out, and ``"step"`` milestones are fractions ``m / total_steps`` of it.
    Not bit-reproducible (it depends on timing): use step schedules for exact resumes.
    """

    def __init__(self, *, budget_s: float, **kwargs):
        super().__init__(**kwargs)
        if budget_s <= 0:
            raise ValueError(f"TimeBudgetFactor: budget_s must be > 0, got {budget_s}")
        self.budget_s = float(budget_s)
        self.start: float | None = None

    def progress(self) -> float:
        """Fraction of the budget spent, in [0, 1]."""
        import time

        now = time.monotonic()
        if self.start is None:
            self.start = now
        return min(1.0, (now - self.start) / self.budget_s)

    def warmup(self, step: int) -> float:
        # also ends once 5 % of the budget is spent: on a slow machine 50 warm-up steps could
        # otherwise outlast the whole run
        return max(super().warmup(step), min(1.0, self.progress() / 0.05))

    def main(self, step: int) -> float:
        return super().main(round(self.progress() * self.total_steps))

    def __repr__(self) -> str:
        return f"TimeBudgetFactor(budget_s={self.budget_s}, {super().__repr__()})"


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_factor: float = 0.001,
    schedule: str = "step",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR`` with factor :class:`LRFactor` (see there for the formulas).

    Call ``scheduler.step()`` once after every ``optimizer.step()``: the learning rate of the
    ``s``-th step (0-based) is then ``base_lr * factor(s)``. The paper's 1x COCO schedule for
    16 images per batch is ``build_scheduler(opt, total_steps=90_000, warmup_steps=1000,
    milestones=(60_000, 80_000))``.
    """
    factor = LRFactor(
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        warmup_factor=warmup_factor,
        schedule=schedule,
        milestones=milestones,
        gamma=gamma,
        min_lr_ratio=min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

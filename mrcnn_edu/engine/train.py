"""The training loop: any detector that returns named losses, with AMP, checkpoints and resume.

Mask R-CNN (He et al. 2017, section 3.1 "Training") minimises the multi-task loss
``L = L_cls + L_box + L_mask`` (plus the RPN's two terms, Faster R-CNN Eqn. (1)) end to end by
SGD. This loop knows nothing of that structure: the model is any
``model(images, targets) -> (detections, losses)`` whose ``losses`` dict holds named scalar
tensors, and one step minimises their sum. Notebook ``08_training.ipynb`` trains on the
shapes set with it (a live loss plot through a callback); ``09_coco_training.ipynb`` runs the 1x
COCO recipe.

What the loop adds to ``loss.backward(); optimizer.step()``:

* mixed precision (``amp="bf16"`` or ``"fp16"``, the latter with a ``GradScaler``);
* gradient clipping, a per-iteration LR schedule, a CSV of metrics, callbacks, a tqdm bar;
* a clear error, before the parameters change, when a loss is not finite (naming the step, the
  loss and the batch's image ids) or when memory runs out;
* checkpoints every ``checkpoint_every`` steps, at a wall-time budget (``max_minutes``), at the
  end, and on Ctrl-C; and ``resume`` that continues *exactly*: with ``num_workers=0`` a run
  interrupted and resumed ends with the same parameters, bit for bit, as one that never stopped
  (the random states and the position in the shuffled data are part of the checkpoint);
* under ``torchrun`` (``engine.distributed``): a ``DistributedDataParallel`` model, rows that
  average the losses over the ranks, a bar, CSV and checkpoints on rank 0 only (holding every
  rank's random states and data position, so a distributed resume is exact too), and a clear
  :class:`~mrcnn_edu.engine.distributed.DistributedError` when another rank dies or hangs.

``engine`` reports through return values and callbacks; it never plots or prints (except the
optional progress bar).
"""

from __future__ import annotations

import csv
import io
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mrcnn_edu.data.sampler import infinite, transform_generators
from mrcnn_edu.utils import atomic_write, keep_freed_memory

from .checkpoint import (
    checkpoint_files,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from .distributed import (
    all_gather_object,
    all_reduce_mean,
    any_rank,
    broadcast_buffers,
    broadcast_object,
    is_comm_error,
    is_distributed,
    is_main_process,
    peer_lost_error,
    rank,
    world_size,
)

__all__ = [
    "Callback",
    "NonFiniteLossError",
    "TrainResult",
    "TrainingOutOfMemoryError",
    "read_metrics_csv",
    "train",
]

_SMOOTH = 20  # the progress bar shows losses averaged over this many recent steps


class NonFiniteLossError(FloatingPointError):
    """A loss (or the gradient norm) became NaN or infinite; raised before the optimizer step.

    Attributes:
        step: the step that failed (1-based: the parameters are those after ``step - 1``).
        losses: ``{name: value}`` of that step, the non-finite ones included.
        bad: names of the non-finite values.
        image_ids: the batch's ``target["image_id"]`` values (``None`` where absent).
    """

    def __init__(self, step: int, losses: dict[str, float], image_ids: list):
        self.step, self.losses, self.image_ids = step, dict(losses), list(image_ids)
        self.bad = [k for k, v in losses.items() if not math.isfinite(v)]
        values = ", ".join(f"{k}={losses[k]}" for k in self.bad)
        super().__init__(
            f"train: non-finite {values} at step {step}, batch image ids {self.image_ids}. The "
            f"parameters are left as after step {step - 1}. Try a lower learning rate, a longer "
            "warm-up or grad_clip, and check these images' annotations (e.g. degenerate boxes)."
        )


class TrainingOutOfMemoryError(RuntimeError):
    """The device ran out of memory in a training step (the message suggests what to shrink)."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        steps_done: optimizer steps taken by this call.
        history: the logged rows of this call (see :func:`train`), oldest first.
        stopped_early: stopped by the ``max_minutes`` budget before ``steps``.
        last_checkpoint: the newest checkpoint written by this call (``None``: none).
        step: the step counter at the end (``start``/resumed step + ``steps_done``).
        evals: ``{"step": s, **eval_fn(model)}`` for every evaluation, oldest first.
    """

    steps_done: int
    history: list[dict]
    stopped_early: bool
    last_checkpoint: Path | None
    step: int = 0
    evals: list[dict] = field(default_factory=list)


class Callback:
    """Base class for :func:`train` callbacks (all methods optional; a plain callable is used as
    ``on_step``). Callbacks should not draw from the global random generators, or a resumed run
    is no longer bit-identical to an uninterrupted one.
    """

    def on_step(self, step: int, row: dict) -> None:
        """After every step: ``row`` holds this step's ``step, epoch, lr``, each loss, ``loss``
        (the sum) and ``images``."""

    def on_log(self, step: int, row: dict) -> None:
        """After every logged row (the one appended to ``history`` and the CSV)."""

    def on_eval(self, step: int, metrics) -> None:
        """After ``eval_fn`` ran, with what it returned."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a checkpoint was written to ``path``."""


def _dispatch(callbacks: Sequence, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is None and hook == "on_step" and callable(cb):
            fn = cb
        if fn is not None:
            fn(*args)


# ---------------------------------------------------------------------------------------------
# Metrics CSV
# ---------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole CSV atomically, so a reader (a notebook plotting live) never sees a
    half-written row. Floats are written with ``repr``, so they read back exactly."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                for k, v in row.items()
            }
        )
    atomic_write(path, lambda f: f.write(buf.getvalue().encode("utf-8")))


def read_metrics_csv(path: str | Path) -> list[dict]:
    """Rows of a metrics CSV written by :func:`train`: ``step`` and ``epoch`` as int, the other
    numbers as float, empty cells as ``None``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_metrics_csv: no metrics file {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = []
        for raw in csv.DictReader(f):
            row: dict = {}
            for k, v in raw.items():
                if v is None or v == "":
                    row[k] = None
                elif k in ("step", "epoch", "images"):
                    row[k] = int(float(v))
                else:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# One batch
# ---------------------------------------------------------------------------------------------


def _unpack(batch, step: int, device: torch.device) -> tuple[list, list, list]:
    """``(images, targets)`` from the loader -> on ``device``, plus the batch's image ids."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(
            f"train: step {step}: a batch must be an (images, targets) pair (use "
            f"collate_fn=mrcnn_edu.transforms.collate_fn), got {type(batch).__name__}"
        )
    images, targets = batch
    if isinstance(images, torch.Tensor):
        images = list(images)  # [B, 3, H, W] -> B x [3, H, W]
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise TypeError(
            f"train: step {step}: expected one target dict per image, got "
            f"{len(images)} images and {n} targets"
        )
    image_ids = []
    for t in targets:
        iid = t.get("image_id") if isinstance(t, dict) else None
        image_ids.append(int(iid) if iid is not None else None)
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in t.items()
        }
        for t in targets
    ]
    return images, targets, image_ids


def _losses_of(out, step: int) -> dict[str, torch.Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], dict)):
        raise TypeError(
            f"train: step {step}: model(images, targets) must return (detections, "
            f"losses dict), got {type(out).__name__}"
        )
    losses = out[1]
    if not losses:
        raise ValueError(
            f"train: step {step}: the model returned no losses (is it in train "
            "mode, and were targets passed?)"
        )
    for k, v in losses.items():
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            what = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TypeError(f"train: step {step}: loss {k!r} must be a scalar tensor, got {what}")
    return losses


def _rank_state(ckpt: dict, path: Path, data) -> dict:
    """This process's ``{"rng", "data", "generators"}`` in a checkpoint: its own entry of
    ``extra["ranks"]`` when the checkpoint was written by a run of this world size, else the
    checkpoint's main states (rank 0's, or the single process's) with the data continuing at
    the start of the next epoch (not exact: the shards changed with the world size)."""
    main = {
        "rng": ckpt["rng"],
        "data": ckpt.get("data_state"),
        "generators": ckpt.get("generators") or {},
    }
    per_rank = ckpt["extra"].get("ranks")
    saved_world = len(per_rank) if per_rank else 1
    if saved_world == world_size():
        return per_rank[rank()] if per_rank else main
    warnings.warn(
        f"train: {path} was written by {saved_world} process(es), this run has "
        f"{world_size()}: the data order restarts at the next epoch and every rank "
        "takes the saved main random states, so the run continues but not bit for bit "
        "as it would have with the same number of processes",
        stacklevel=3,
    )
    if main["data"] is not None:
        main["data"] = {
            **data.state_dict(),
            "epoch": int(main["data"]["epoch"]) + 1,
            "batches_in_epoch": 0,
        }
    return main


def _is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(err, oom_type)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    loader_or_iterable: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    steps: int,
    device: torch.device | str = "cpu",
    amp: str | None = None,
    grad_clip: float | None = None,
    callbacks: Sequence = (),
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_last: int = 3,
    start_step: int = 0,
    resume: str | Path | bool | None = None,
    log_every: int = 10,
    metrics_csv: str | Path | None = None,
    progress: bool = True,
    config=None,
    max_minutes: float | None = None,
    eval_fn: Callable[[nn.Module], object] | None = None,
    eval_every: int = 0,
    generators: dict[str, torch.Generator] | None = None,
) -> TrainResult:
    """Train ``model`` until the step counter reaches ``steps``; return what happened.

    Each step: take the next ``(images, targets)`` batch (epoch after epoch, see
    ``mrcnn_edu.data.sampler.infinite``), move it to ``device``, run
    ``_, losses = model(images, targets)`` (under ``torch.autocast`` with ``amp``), check that
    every loss is finite, back-propagate ``sum(losses.values())``, clip the gradient norm to
    ``grad_clip``, ``optimizer.step()``, ``scheduler.step()``. Before the first step it
    calls :func:`mrcnn_edu.utils.keep_freed_memory` (about 12 % of a CPU step, measured on
    the ``stick-figures`` preset).

    Args:
        model: ``model(images: list of [3, H, W] float tensors, targets: list of dicts) ->
            (detections, losses: dict[str, scalar tensor])``; moved to ``device``, put in train
            mode (its previous mode is restored at the end).
        loader_or_iterable: batches ``(images list, targets list)``, e.g.
            ``mrcnn_edu.data.sampler.make_train_loader(ds, 4)``; any re-iterable works (a
            DataLoader, a list of batches) and is re-iterated per epoch.
        optimizer, scheduler: e.g. ``engine.optim.build_optimizer`` / ``build_scheduler``
            (the scheduler is stepped per iteration).
        steps: the step counter at which training ends (a run resumed at step ``s`` takes
            ``steps - s`` more steps).
        device: where to train.
        amp: ``None`` (float32), ``"bf16"`` (bfloat16 autocast; works on CPUs too) or
            ``"fp16"`` (float16 autocast with a ``torch.amp.GradScaler``, saved in checkpoints).
        grad_clip: clip the global gradient norm to this (``None``: no clipping); the logged
            rows then hold ``grad_norm`` (before clipping).
        callbacks: :class:`Callback` objects or plain callables ``f(step, row)``.
        checkpoint_dir: folder for ``step_XXXXXXX.pt`` / ``last.pt`` (``None``: no checkpoints).
            A checkpoint is written every ``checkpoint_every`` steps (0: only at the end), at
            the end, when ``max_minutes`` runs out, and on Ctrl-C (the last completed step,
            then the KeyboardInterrupt goes on). Only the ``keep_last`` newest are kept.
        start_step: the step counter to start from when not resuming (e.g. after loading
            weights by hand; the scheduler is the caller's to position).
        resume: a checkpoint file or folder to continue from, or ``True`` for
            ``checkpoint_dir/last.pt`` when it exists (a fresh start when it does not).
            Without ``resume``, a ``checkpoint_dir`` that already holds checkpoints is an error
            (so a run is not overwritten by accident).
        log_every: a row is logged every this many steps (and at the last step): ``step``,
            ``epoch``, ``lr`` (of the first parameter group, at the row's last step), each loss,
            ``loss`` (their sum), each averaged over the steps since the previous row,
            ``images_per_s`` over those steps, ``elapsed_s`` (training seconds since step 0,
            across resumes).
        metrics_csv: also write the rows to this CSV (rewritten atomically at every row; on
            resume, the rows after the checkpoint's step are dropped). Read it with
            :func:`read_metrics_csv`.
        progress: show a tqdm bar with the smoothed losses and images/s.
        config: stored in checkpoints; on resume, checked against the saved one
            (``engine.checkpoint.load_checkpoint``).
        max_minutes: stop cleanly once this many minutes of this call have passed (checked
            before each step), with a checkpoint when ``checkpoint_dir`` is set.
        eval_fn, eval_every: call ``eval_fn(model)`` every ``eval_every`` steps (0: never); its
            result goes to ``TrainResult.evals`` and ``on_eval``. The global random states are
            saved before and restored after it, so evaluating does not change the training.
        generators: extra named ``torch.Generator`` objects to save and restore with the
            checkpoints (e.g. one the model samples with). Those of the data set's transforms
            (``transform_generators``) are found and handled automatically.

    Distributed (launched by ``torchrun``, after ``engine.distributed.init_distributed()``):
    every rank calls ``train`` with its own loader (``make_distributed_train_loader``) and
    ``model`` wrapped in ``DistributedDataParallel`` (``engine.distributed.wrap_model``), which
    averages the gradients. The logged losses and ``images`` are over all ranks; the bar, the
    CSV, ``callbacks`` and ``on_eval`` run on rank 0 only (``eval_fn`` on every rank, so it may
    evaluate in parallel); rank 0 writes the checkpoints, with every rank's random states and
    data position, and ``resume`` on every rank from the same file restores each rank's own.
    The ``max_minutes`` stop is decided together. Ctrl-C writes no checkpoint (the ranks could
    not agree on one); the last periodic one stands.

    Returns:
        :class:`TrainResult`.

    Raises:
        NonFiniteLossError: a loss (or, with ``grad_clip``, the gradient norm) is NaN/inf;
            raised before the optimizer step, so the parameters are those of the step before.
        TrainingOutOfMemoryError: the device ran out of memory.
        FileExistsError: ``checkpoint_dir`` holds checkpoints and ``resume`` is not set.
        DistributedError: another rank died or hung (this rank lost contact with it).
    """
    if steps < 0 or start_step < 0:
        raise ValueError(
            f"train: steps and start_step must be >= 0, got steps={steps}, start_step={start_step}"
        )
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"train: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if log_every < 1 or checkpoint_every < 0 or eval_every < 0:
        raise ValueError(
            f"train: log_every must be >= 1 and checkpoint_every, eval_every >= 0, "
            f"got {log_every}, {checkpoint_every}, {eval_every}"
        )
    if (checkpoint_every or resume is True) and checkpoint_dir is None:
        raise ValueError("train: checkpoint_every and resume=True need a checkpoint_dir")
    if eval_every and eval_fn is None:
        raise ValueError("train: eval_every needs an eval_fn")
    device = torch.device(device)
    keep_freed_memory()  # a step's large activations reuse mapped pages (mrcnn_edu.utils)
    dist_on, main = is_distributed(), is_main_process()
    if dist_on and not isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"train: running distributed ({world_size()} processes) but the model "
            "is not wrapped in DistributedDataParallel, so the ranks' gradients "
            "would not be averaged; use mrcnn_edu.engine.distributed.wrap_model"
        )
    callbacks = list(callbacks) if main else []  # rank 0 reports; the others only compute
    progress = progress and main
    ckdir = None if checkpoint_dir is None else Path(checkpoint_dir)
    csv_path = None if metrics_csv is None or not main else Path(metrics_csv)

    model.to(device)  # in place: the optimizer's parameter references stay valid
    data = infinite(loader_or_iterable)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    gens = dict(generators or {})
    dataset = getattr(data.loader, "dataset", None)
    if dataset is not None:
        gens.update({f"data.{k}": g for k, g in transform_generators(dataset).items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]

    # --- where to start -------------------------------------------------------------------
    resume_path = None
    if resume is True:
        resume_path = ckdir / "last.pt" if (ckdir / "last.pt").is_file() else None
    elif resume:
        resume_path = Path(resume)
    elif ckdir is not None and ((ckdir / "last.pt").exists() or checkpoint_files(ckdir)):
        raise FileExistsError(
            f"train: {ckdir} already holds checkpoints; pass resume=True to "
            "continue that run, or use another checkpoint_dir"
        )
    step, elapsed_before = start_step, 0.0
    if resume_path is not None:
        ckpt = load_checkpoint(
            resume_path,
            model=unwrap_model(model),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            restore_rng=False,
            config=config,
        )
        step = int(ckpt["step"])
        elapsed_before = float(ckpt["extra"].get("elapsed_s", 0.0))
        own = _rank_state(ckpt, resume_path, data)  # this rank's states (all ranks: one file)
        if own["data"] is not None:
            data.load_state_dict(own["data"])  # may draw random numbers: before the RNGs
        saved_gens = own["generators"]
        for name, gen in gens.items():
            if name not in saved_gens:
                raise ValueError(
                    f"train: {resume_path} holds no state for generator {name!r} "
                    f"(it has {sorted(saved_gens) or 'none'})"
                )
            gen.set_state(saved_gens[name])
        set_rng_state(own["rng"])
    csv_rows: list[dict] = []
    if csv_path is not None and resume_path is not None and csv_path.is_file():
        csv_rows = [r for r in read_metrics_csv(csv_path) if r.get("step", 0) <= step]

    # --- the loop ---------------------------------------------------------------------------
    def snapshot() -> dict:
        """Everything random about "after this step", for a checkpoint taken later."""
        return {
            "rng": get_rng_state(),
            "data": data.state_dict(),
            "generators": {k: g.get_state() for k, g in gens.items()},
        }

    def save(state: dict, at_step: int) -> Path:
        extra = {"elapsed_s": elapsed_before + time.perf_counter() - t0}
        if dist_on:  # every rank's random states and data position, in rank order
            extra["ranks"] = all_gather_object(state)
        path = None
        if main:
            path = save_checkpoint(
                ckdir,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                step=at_step,
                config=config,
                extra=extra,
                data_state=state["data"],
                generators=state["generators"],
                rng_state=state["rng"],
                keep_last=keep_last,
            )
        path = broadcast_object(path)  # the others go on once the file is written
        _dispatch(callbacks, "on_checkpoint", at_step, path)
        return path

    was_training = model.training
    model.train()
    history: list[dict] = []
    evals: list[dict] = []
    first_step, saved_step, last_checkpoint = step, step, None
    stopped_early = False
    recent: deque[dict] = deque(maxlen=_SMOOTH)
    window: list[dict] = []
    window_start = t0 = time.perf_counter()
    state = snapshot()
    bar = tqdm(
        total=steps,
        initial=min(step, steps),
        desc="train",
        disable=not progress,
        dynamic_ncols=True,
    )

    def log_row() -> None:
        nonlocal window, window_start
        now = time.perf_counter()
        keys = [k for k in window[-1] if k not in ("step", "epoch", "lr", "images")]
        row = {"step": window[-1]["step"], "epoch": window[-1]["epoch"], "lr": window[-1]["lr"]}
        for k in keys:
            vals = [r[k] for r in window if k in r]
            row[k] = sum(vals) / len(vals)
        row["images_per_s"] = sum(r["images"] for r in window) / max(now - window_start, 1e-9)
        row["elapsed_s"] = elapsed_before + now - t0
        history.append(row)
        if csv_path is not None:
            csv_rows.append(row)
            _write_csv(csv_path, csv_rows)
        _dispatch(callbacks, "on_log", row["step"], row)
        window, window_start = [], now

    try:
        while step < steps:
            if max_minutes is not None and any_rank(  # all ranks stop at the same step
                time.perf_counter() - t0 >= 60.0 * max_minutes
            ):
                stopped_early = True
                break
            n = step + 1  # the step being taken
            images, targets, image_ids = _unpack(next(data), n, device)
            lr = float(optimizer.param_groups[0]["lr"])
            try:
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=amp is not None):
                    losses = _losses_of(model(images, targets), n)
                losses = {k: v.float().reshape(()) for k, v in losses.items()}
                values = {k: float(v.detach()) for k, v in losses.items()}
                num_images = len(images)
                if dist_on:  # means over the ranks: every rank logs and checks the same values
                    *means, mean_images = all_reduce_mean([*values.values(), num_images])
                    values = dict(zip(values, means))
                    num_images = round(mean_images * world_size())
                if not all(math.isfinite(v) for v in values.values()):
                    raise NonFiniteLossError(n, values, image_ids)
                total = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                grad_norm = None
                if scaler is not None:
                    scaler.scale(total).backward()
                    if grad_clip is not None:
                        scaler.unscale_(optimizer)
                        grad_norm = float(nn.utils.clip_grad_norm_(params, grad_clip))
                    scaler.step(optimizer)  # skips the step when the scaled grads overflowed
                    scaler.update()
                else:
                    total.backward()
                    if grad_clip is not None:
                        grad_norm = float(nn.utils.clip_grad_norm_(params, grad_clip))
                        if not math.isfinite(grad_norm):
                            raise NonFiniteLossError(
                                n, {**values, "grad_norm": grad_norm}, image_ids
                            )
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step = n
            except (RuntimeError, MemoryError) as err:
                if not _is_oom(err):
                    raise
                sizes = sorted({tuple(im.shape[-2:]) for im in images})
                raise TrainingOutOfMemoryError(
                    f"train: out of memory on {device} at step {n} (a batch of {len(images)} "
                    f"images, sizes {sizes}). Use a smaller batch size or smaller images "
                    f"(min_size / max_size), or amp='bf16'. ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''})"
                ) from err
            state = snapshot()

            row = {
                "step": step,
                "epoch": data.epoch,
                "lr": lr,
                **values,
                "loss": sum(values.values()),
                "images": num_images,
            }
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            recent.append(row)
            window.append(row)
            bar.update(1)
            if progress and max_minutes is not None:  # the clock ends the run: estimate its end
                spent = time.perf_counter() - t0
                expected = step + int((60.0 * max_minutes - spent) * (step - first_step) / spent)
                bar.total = max(step, min(steps, expected))
            if progress:
                shown = {
                    k.removeprefix("loss_"): f"{sum(r[k] for r in recent) / len(recent):.3f}"
                    for k in (*values, "loss")
                }
                span = max(time.perf_counter() - window_start, 1e-9)
                shown["img/s"] = f"{sum(r['images'] for r in window) / span:.1f}"
                bar.set_postfix(shown, refresh=False)
            _dispatch(callbacks, "on_step", step, row)
            if step % log_every == 0 or step == steps:
                log_row()
            if eval_fn is not None and eval_every and step % eval_every == 0:
                rng = get_rng_state()
                try:
                    metrics = eval_fn(model)
                finally:
                    set_rng_state(rng)
                    model.train()
                evals.append(
                    {"step": step, **metrics}
                    if isinstance(metrics, dict)
                    else {"step": step, "result": metrics}
                )
                _dispatch(callbacks, "on_eval", step, metrics)
            if ckdir is not None and checkpoint_every and step % checkpoint_every == 0:
                last_checkpoint, saved_step = save(state, step), step
        if window:
            log_row()
        if ckdir is not None and step != saved_step:
            last_checkpoint, saved_step = save(state, step), step
        broadcast_buffers(model)  # every rank returns rank 0's model (the checkpoint's)
    except KeyboardInterrupt:
        if ckdir is not None and step != saved_step and not dist_on:
            save(state, step)  # the last completed step; atomic, so last.pt is never half-written
        raise
    except RuntimeError as err:
        if dist_on and is_comm_error(err):  # a collective failed: another rank died or hung
            raise peer_lost_error(f"train: step {step + 1}", err) from err
        raise
    finally:
        bar.close()
        model.train(was_training)
    return TrainResult(
        steps_done=step - first_step,
        history=history,
        stopped_early=stopped_early,
        last_checkpoint=last_checkpoint,
        step=step,
        evals=evals,
    )

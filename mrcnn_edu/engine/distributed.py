"""Training on many processes: torchrun, DistributedDataParallel and a sharded data order.

Mask R-CNN (He et al. 2017, section 3.1 "Training") trains "on 8 GPUs (so effective minibatch
size is 16)": one process per GPU, each with 2 images, gradients averaged across the processes
before every SGD step. This module holds the few pieces that turn the single-process loop of
:mod:`mrcnn_edu.engine.train` into that; notebook ``09_coco_training.ipynb`` explains them and
runs them under ``torchrun`` with 2 CPU processes.

* :func:`init_distributed` joins the process group that ``torchrun`` describes in the
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``):
  NCCL on GPUs, gloo on CPUs. ``torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint
  HOST:PORT`` gives the same environment on several machines (``scripts/slurm_train.sh``).
* :func:`wrap_model` wraps the model in ``DistributedDataParallel``, which all-reduces (averages)
  the gradients during ``backward``, so every process takes the same optimizer step and the
  parameters stay identical, bit for bit, on every rank.
* :func:`make_distributed_train_loader`: every rank sees a different shard of each epoch
  (``DistributedSampler``: one permutation seeded with ``seed + epoch``, the same on every rank,
  dealt out rank by rank), batched by aspect ratio (``GroupedBatchSampler``) with a per-rank
  batch of ``global batch / world size``.
* helpers that every rank calls together (:func:`barrier`, :func:`all_gather_object`,
  :func:`gather_object`, :func:`broadcast_object`, :func:`broadcast_buffers`,
  :func:`any_rank`, :func:`all_reduce_mean`, :func:`local_main_first`)
  and those that say who this process is (:func:`rank`, :func:`world_size`,
  :func:`is_main_process`).

When a rank dies or hangs, the others must not wait forever in a collective. Two mechanisms,
no extra watchdog thread of our own:

1. torch's ``timeout=`` of ``init_process_group`` (:data:`DEFAULT_TIMEOUT_S`, or the
   ``MRCNN_EDU_DIST_TIMEOUT`` environment variable, in seconds). With gloo a collective that
   waits longer raises a ``RuntimeError``; with NCCL, torch's own watchdog thread aborts the
   communicator and ends the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
2. A dead peer closes its sockets: gloo raises "Connection closed by peer" at once, and torchrun
   stops the other processes it launched on that machine.

:func:`is_comm_error` recognises such errors and :func:`peer_lost_error` turns them into a
:class:`DistributedError` that says what happened and what to do (``mrcnn-edu train`` prints
it and exits with status 2).

Batch norm: layers that are not frozen (the ``shapes`` preset's trainable BN) normalise over
each process's own images, as torchvision's reference scripts do without ``--sync-bn``; the COCO
presets freeze their batch norm, as the paper does, so it does not matter there.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from mrcnn_edu.data.sampler import make_train_loader

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RANK_SEED_STRIDE",
    "TIMEOUT_ENV",
    "DistributedError",
    "all_gather_object",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "cleanup",
    "env_world_size",
    "gather_object",
    "init_distributed",
    "is_comm_error",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "local_main_first",
    "make_distributed_train_loader",
    "peer_lost_error",
    "rank",
    "rank_seed",
    "require_initialized",
    "timeout_seconds",
    "world_size",
    "wrap_model",
]

#: Seconds a collective may wait for the other ranks before it fails (NCCL's default). It must
#: exceed the longest time one rank works alone while the others wait: writing a checkpoint,
#: COCOeval on rank 0 at the end of an evaluation (a few minutes on COCO val2017).
DEFAULT_TIMEOUT_S = 600.0
#: Environment variable that overrides :data:`DEFAULT_TIMEOUT_S` (seconds, e.g. ``30``).
TIMEOUT_ENV = "MRCNN_EDU_DIST_TIMEOUT"
#: Per-rank seeds are ``seed + RANK_SEED_STRIDE * rank``: a large prime, so they never collide
#: with the ``seed + epoch`` and ``seed + 1`` seeds used elsewhere.
RANK_SEED_STRIDE = 1_000_003


class DistributedError(RuntimeError):
    """Another rank died or hung: this rank lost contact with it in a collective operation."""


# ---------------------------------------------------------------------------------------------
# Who am I
# ---------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 when absent)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0, the one that logs, shows progress and writes checkpoints."""
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"init_distributed: WORLD_SIZE must be an integer, got {value!r}"
        ) from None


def timeout_seconds() -> float:
    """The collective timeout: ``MRCNN_EDU_DIST_TIMEOUT`` (seconds) or :data:`DEFAULT_TIMEOUT_S`."""
    value = os.environ.get(TIMEOUT_ENV)
    if value in (None, ""):
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"init_distributed: {TIMEOUT_ENV} must be a positive number of seconds, got {value!r}"
        )
    return seconds


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """``seed`` made different per rank (``seed`` itself on rank 0): for the random choices that
    should differ between ranks (flips, RoI sampling), unlike the data order's permutation."""
    return int(seed) + RANK_SEED_STRIDE * (rank() if rank_ is None else int(rank_))


# ---------------------------------------------------------------------------------------------
# Start and stop
# ---------------------------------------------------------------------------------------------


def init_distributed(
    device: str | torch.device | None = None,
    *,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> torch.device:
    """Join the process group torchrun describes; return the device this process should use.

    Not launched by torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``): nothing is initialised
    and ``device`` (default ``"cuda"`` when available, else ``"cpu"``) is returned. Otherwise
    ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` must be set; the process group is initialised
    with ``backend`` (default: ``"nccl"`` for a CUDA device, ``"gloo"`` for the CPU) and a
    ``timeout`` of ``timeout_s`` seconds (default :func:`timeout_seconds`), and each process
    takes GPU ``LOCAL_RANK`` of its machine (``cuda:LOCAL_RANK``). Calling it again once the
    group exists returns the device without re-initialising.

    Raises:
        ValueError: missing or inconsistent torchrun variables, a CUDA device without CUDA,
            fewer GPUs on this machine than ``LOCAL_RANK + 1``.
    """
    dev = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if env_world_size() <= 1:
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("init_distributed: device 'cuda' asked for, but CUDA is not available")
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(
                f"init_distributed: LOCAL_RANK={local_rank()} but this machine has "
                f"{torch.cuda.device_count()} GPU(s): start at most that many "
                "processes per node (torchrun --nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return dev
    missing = [
        k
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        if k not in os.environ
    ]
    if missing:
        raise ValueError(
            f"init_distributed: WORLD_SIZE={env_world_size()} but {', '.join(missing)} "
            "not set; launch with torchrun (it sets them)"
        )
    r = int(os.environ["RANK"])
    if not 0 <= r < env_world_size():
        raise ValueError(f"init_distributed: RANK={r} is outside 0..{env_world_size() - 1}")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    seconds = timeout_s if timeout_s is not None else timeout_seconds()
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=seconds),
        device_id=dev if backend == "nccl" else None,
    )
    return dev


def cleanup() -> None:
    """Leave the process group (a no-op when none is initialised).

    Drop ``DistributedDataParallel`` wrappers (``del ddp``) before calling it: a DDP reducer
    keeps the group and its last all-reduce alive, and a gloo group torn down only at
    interpreter exit can abort the process ("terminate called without an active exception").
    Unreachable wrappers are collected here first, so that the group's teardown runs now.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def require_initialized(where: str) -> None:
    """Raise when torchrun started several processes but the process group was not joined: each
    would otherwise train alone and all would write the same files."""
    if env_world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{where}: launched with WORLD_SIZE={env_world_size()} (torchrun) but "
            "torch.distributed is not initialised; call "
            "mrcnn_edu.engine.distributed.init_distributed() first (the mrcnn-edu "
            "CLI does)"
        )


# ---------------------------------------------------------------------------------------------
# Collectives (every rank must call them, in the same order)
# ---------------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    """Where tensors for a collective must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (any picklable object)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list | None:
    """``[obj of rank 0, ...]`` on rank ``dst``, ``None`` on the others."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (the others' ``obj`` is ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. "the time is up")."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


T = TypeVar("T")


def local_main_first(fn: Callable[[], T], where: str) -> T:
    """``fn()`` on every rank, each machine's first process (``LOCAL_RANK`` 0) before the others.

    For a download into a cache that a machine's processes share (torch's hub cache, where
    torchvision's weights land): one process per machine fetches the file while the others
    wait, then they read it from the cache, instead of every process downloading the same
    file at once. Every rank must call it (it waits in :func:`any_rank`). An error on a first
    process reaches every rank, so none waits forever: that process raises its own error, the
    others a ``RuntimeError`` that says where to look. Not distributed: just ``fn()``.
    """
    if not is_distributed():
        return fn()
    first = local_rank() == 0
    result: T | None = None
    error: BaseException | None = None
    if first:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
            error = err
    failed = any_rank(error is not None)  # the others wait here for the first processes
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"{where}: the first process of a machine (LOCAL_RANK 0) failed to fetch what "
            f"this rank ({rank()} of {world_size()}) waits for; its error is in its output"
        )
    return result if first else fn()  # type: ignore[return-value]


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm running statistics) into every rank's ``model``.

    DDP does this at the start of every training forward, so after the last step each rank
    still holds the statistics of its own last batch; rank 0's are the ones checkpoints keep.
    Parameters need no such copy: the averaged gradients keep them identical.
    """
    if not is_distributed():
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    for buf in model.buffers():
        dist.broadcast(buf.data, src=src)


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """The mean over the ranks of each number in ``values`` (same length on every rank), in
    float64 so the means are the same on every rank up to the last bit."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


# ---------------------------------------------------------------------------------------------
# Failures of other ranks
# ---------------------------------------------------------------------------------------------

#: Phrases of gloo's and NCCL's errors when a peer is gone or late (gloo raises plain
#: ``RuntimeError`` s; its messages carry its source path, ``third_party/gloo/...``).
_COMM_FAILURE_WORDS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out waiting",
    "gloo",
    "nccl",
)


def is_comm_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (a peer that died, hung past the timeout, or a
    broken connection), as opposed to an error of this rank's own computation."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    if isinstance(err, DistributedError) or not isinstance(err, RuntimeError):
        return False
    text = str(err).lower()
    return any(word in text for word in _COMM_FAILURE_WORDS)


def peer_lost_error(where: str, err: BaseException) -> DistributedError:
    """A :class:`DistributedError` for ``err`` that names this rank, where it happened, the
    likely cause and what to do next."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DistributedError(
        f"{where}: rank {rank()} of {world_size()} lost contact with the other processes "
        f"({type(err).__name__}: {first}). Another rank has most likely died (its own log "
        f"shows the first error) or hung for longer than the {timeout_seconds():g} s timeout "
        f"({TIMEOUT_ENV}); every rank stops. Continue from the last checkpoint with --resume."
    )


# ---------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------


def wrap_model(
    model: nn.Module, device: str | torch.device | None = None, **ddp_kwargs
) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when distributed (unchanged otherwise).

    Construction broadcasts rank 0's parameters and buffers to every rank; then each
    ``backward`` averages the gradients over the ranks (bucketed all-reduces overlapping the
    backward pass), so every rank's optimizer takes the same step. Buffers (batch-norm running
    statistics) are broadcast from rank 0 at each forward. ``ddp_kwargs`` go to DDP (e.g.
    ``find_unused_parameters=True`` for a model with branches unused in some steps).
    """
    if not is_distributed():
        return model
    dev = (
        torch.device(device)
        if device is not None
        else next((p.device for p in model.parameters()), torch.device("cpu"))
    )
    model.to(dev)
    ids = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if dev.type == "cuda"
        else None
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)


def make_distributed_train_loader(
    dataset,
    global_batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    aspect_ratio_grouping: bool = True,
    group_factor: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    num_replicas: int | None = None,
    rank_: int | None = None,
) -> DataLoader:
    """This rank's training loader: a ``GroupedBatchSampler`` over a ``DistributedSampler``.

    Each epoch is one permutation of the data set (seeded with ``seed + epoch`` on every rank,
    through ``set_epoch``, which ``InfiniteLoader`` calls), dealt out so that rank ``r`` takes
    positions ``r, r + W, r + 2W, ...`` (``W`` ranks; the permutation is padded by repeating its
    start so every rank gets ``ceil(n / W)`` images). Each rank batches its share by aspect
    ratio into batches of ``global_batch_size / W`` images. The loader's own generator (the
    workers' seeds) gets a per-rank seed (:func:`rank_seed`), so workers of different ranks do
    not repeat each other's random flips.

    Args:
        dataset: ``dataset[i] -> (image, target)``, as for ``make_train_loader``.
        global_batch_size: images per step over all ranks (``TrainConfig.batch_size``); must be
            a multiple of the world size.
        num_workers, aspect_ratio_grouping, group_factor, drop_last, pin_memory: as for
            :func:`mrcnn_edu.data.sampler.make_train_loader`.
        seed: seeds the data order (the same on every rank).
        num_replicas, rank_: the world size and this rank (default: the process group's).

    Raises:
        ValueError: ``global_batch_size`` not a positive multiple of the world size.
    """
    world = world_size() if num_replicas is None else int(num_replicas)
    r = rank() if rank_ is None else int(rank_)
    if not isinstance(global_batch_size, int) or global_batch_size < 1 or global_batch_size % world:
        raise ValueError(
            f"make_distributed_train_loader: the global batch size "
            f"(train.batch_size={global_batch_size!r}) must be a positive multiple "
            f"of the world size {world}, so that every rank gets the same number "
            "of images per step"
        )
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=r, shuffle=True, seed=int(seed), drop_last=False
    )
    return make_train_loader(
        dataset,
        global_batch_size // world,
        num_workers=num_workers,
        seed=rank_seed(seed, r),
        aspect_ratio_grouping=aspect_ratio_grouping,
        group_factor=group_factor,
        sampler=sampler,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )

"""Batches for training: aspect-ratio grouping, a seeded DataLoader, and resumable endless epochs.

Detection images differ in shape, and a batch is zero-padded to its largest image
(``mrcnn_edu.transforms.batch_images``). Mixing a portrait and a landscape image pads both to a
square and wastes much of the batch on zeros, so Detectron (and torchvision's reference
``group_by_aspect_ratio.py``) batch together images whose width / height falls in the same bin.
Notebook ``08_training.ipynb`` shows the padding this saves; ``engine.train`` draws its
batches through :func:`make_train_loader` and :func:`infinite`.

Reproducibility: every random choice here comes from one ``torch.Generator`` seeded with
``seed``, re-seeded to ``seed + epoch`` at the start of each epoch (as ``DistributedSampler`` does
with ``set_epoch``), so the order of epoch ``e`` depends on ``(seed, e)`` only. That is what lets a
resumed run (:meth:`InfiniteLoader.load_state_dict`) pick up in the middle of an epoch: it
rebuilds epoch ``e``'s order and skips the batches already used, without loading them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..transforms import collate_fn

__all__ = [
    "GroupedBatchSampler",
    "InfiniteLoader",
    "aspect_ratio_groups",
    "image_sizes",
    "infinite",
    "make_train_loader",
    "transform_generators",
]


# ---------------------------------------------------------------------------------------------
# Aspect-ratio groups
# ---------------------------------------------------------------------------------------------


def image_sizes(dataset) -> list[tuple[int, int]]:
    """``(height, width)`` of every image of ``dataset``, read from its annotations, not pixels.

    Supports ``mrcnn_edu.data.CocoDetection`` (the JSON's ``width`` / ``height``), any data set
    with torchvision's ``get_height_and_width(idx)``, and ``torch.utils.data.Subset`` of those.

    Raises:
        TypeError: a data set that offers none of these (loading every image to measure it
            would take minutes on COCO; add ``get_height_and_width`` instead).
    """
    if isinstance(dataset, torch.utils.data.Subset):
        inner = image_sizes(dataset.dataset)
        return [inner[int(i)] for i in dataset.indices]
    coco, ids = getattr(dataset, "coco", None), getattr(dataset, "ids", None)
    if coco is not None and ids is not None:
        return [(int(coco.imgs[i]["height"]), int(coco.imgs[i]["width"])) for i in ids]
    if hasattr(dataset, "get_height_and_width"):
        return [tuple(int(v) for v in dataset.get_height_and_width(i)) for i in range(len(dataset))]
    raise TypeError(
        f"image_sizes: cannot read image sizes of a {type(dataset).__name__} without "
        "loading its images; give it a get_height_and_width(idx) -> (height, width) "
        "method (or use CocoDetection / Subset)"
    )


def aspect_ratio_groups(dataset, k: int = 0) -> list[int]:
    """Group id of every image of ``dataset`` by its aspect ratio ``width / height``.

    The bin edges are ``2 ** linspace(-1, 1, 2k + 1)`` (``k=0``: the single edge 1.0, so
    portrait images form group 0 and landscape or square ones group 1; ``k=3``, torchvision's
    default, gives 7 edges from 1/2 to 2 and 8 groups). Group ``g`` holds the ratios in
    ``[edge[g-1], edge[g])``, the convention of ``numpy.digitize``, exactly as torchvision's
    ``create_aspect_ratio_groups``. Sizes come from :func:`image_sizes`, not from the pixels.

    >>> class Sizes:
    ...     def __len__(self): return 3
    ...     def get_height_and_width(self, i): return [(480, 640), (640, 480), (500, 500)][i]
    >>> aspect_ratio_groups(Sizes())
    [1, 0, 1]
    """
    if k < 0:
        raise ValueError(f"aspect_ratio_groups: k must be >= 0, got {k}")
    ratios = [w / h for h, w in image_sizes(dataset)]
    edges = [1.0] if k == 0 else (2.0 ** np.linspace(-1, 1, 2 * k + 1)).tolist()
    return [int(g) for g in np.digitize(ratios, edges)]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images all come from one group (e.g. one aspect-ratio bin).

    Indices are drawn from ``sampler`` in its order and dropped into one buffer per group; a
    buffer is yielded as a batch the moment it holds ``batch_size`` indices. When ``sampler`` is
    exhausted, the partly filled buffers are yielded as smaller batches (in group order), so
    every index the sampler gave appears in exactly one batch; ``drop_last=True`` drops them
    instead. (torchvision's reference version tops these up with repeated images so that every
    batch is full; here a batch may be smaller, and no image is seen twice in an epoch.)

    Args:
        sampler: yields data set indices, e.g. ``RandomSampler(ds, generator=g)`` or a
            ``DistributedSampler`` (its ``set_epoch`` is forwarded by :meth:`set_epoch`).
        group_ids: the group of every data set index (``aspect_ratio_groups(ds)``).
        batch_size: images per batch.
        drop_last: drop each group's last incomplete batch.

    For resuming, :meth:`skip_next` makes the next pass skip its first batches: they are still
    formed from the sampler's draws (so the rest of the epoch is the same), just not yielded.

    >>> s = GroupedBatchSampler(range(6), [0, 1, 0, 1, 0, 0], batch_size=2)
    >>> list(s)
    [[0, 2], [1, 3], [4, 5]]
    """

    def __init__(
        self,
        sampler: Iterable[int],
        group_ids: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"GroupedBatchSampler: batch_size must be a positive int, got {batch_size!r}"
            )
        self.sampler = sampler
        self.group_ids = [int(g) for g in group_ids]
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Forward to the sampler's ``set_epoch`` (``DistributedSampler``), if it has one."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip_next(self, num_batches: int) -> None:
        """Make the next iteration skip (form but not yield) its first ``num_batches`` batches."""
        if num_batches < 0:
            raise ValueError(
                f"GroupedBatchSampler.skip_next: num_batches must be >= 0, got {num_batches}"
            )
        self._skip = int(num_batches)

    def _batches(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        for idx in self.sampler:
            idx = int(idx)
            if not 0 <= idx < len(self.group_ids):
                raise IndexError(
                    f"GroupedBatchSampler: the sampler gave index {idx}, but "
                    f"group_ids has {len(self.group_ids)} entries"
                )
            group = self.group_ids[idx]
            buffers[group].append(idx)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
        if not self.drop_last:
            for group in sorted(buffers):
                yield buffers[group]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0  # read when iteration starts: a one-shot request
        for i, batch in enumerate(self._batches()):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        """Batches per epoch, for a sampler that yields every data set index once per epoch
        (``RandomSampler`` without replacement, ``SequentialSampler``)."""
        n = len(self.sampler)
        if n != len(self.group_ids):
            raise TypeError(
                f"GroupedBatchSampler: len() is known only when the sampler covers "
                f"the whole data set ({len(self.group_ids)} indices), but it yields "
                f"{n} per epoch; the number of batches depends on which groups it "
                "draws"
            )
        counts = np.bincount(np.asarray(self.group_ids, dtype=np.int64) - min(self.group_ids))
        if self.drop_last:
            return int(sum(c // self.batch_size for c in counts))
        return int(sum(-(-c // self.batch_size) for c in counts))  # ceil(c / batch_size)


# ---------------------------------------------------------------------------------------------
# Random generators hidden inside data transforms
# ---------------------------------------------------------------------------------------------

_CHILD_ATTRS = ("dataset", "datasets", "transforms", "transform", "generator")


def transform_generators(dataset, max_depth: int = 8) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects that ``dataset``'s transforms draw from, by path.

    Follows the attributes ``dataset``, ``datasets``, ``transforms``, ``transform`` and
    ``generator`` (through lists), which covers ``CocoDetection(transforms=Compose([...,
    RandomHorizontalFlip(generator=g)]))``, ``Subset`` and ``ConcatDataset``. A checkpoint saves
    their states so that a resumed run flips the same images; :func:`make_train_loader` reseeds
    them in each DataLoader worker (where each worker holds a copy that would otherwise repeat
    the other workers' draws).

    >>> from mrcnn_edu.transforms import Compose, RandomHorizontalFlip
    >>> class DS: transforms = Compose([RandomHorizontalFlip(0.5, generator=torch.Generator())])
    >>> list(transform_generators(DS()))
    ['transforms.transforms[0].generator']
    """
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()

    def visit(obj, path: str, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > max_depth:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found[path] = obj
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                visit(item, f"{path}[{i}]", depth + 1)
        elif not isinstance(obj, (str, bytes, torch.Tensor)):
            for attr in _CHILD_ATTRS:
                child = getattr(obj, attr, None)
                if child is not None:
                    visit(child, f"{path}.{attr}" if path else attr, depth + 1)

    visit(dataset, "", 0)
    return found


def _seed_worker_generators(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's copy of the transforms' generators its
    own seed, derived from the worker's seed (torch seeds ``random``, numpy and torch there the
    same way)."""
    info = torch.utils.data.get_worker_info()
    seeder = torch.Generator().manual_seed(info.seed)
    for gen in transform_generators(info.dataset).values():
        gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=seeder)))


# ---------------------------------------------------------------------------------------------
# The training DataLoader
# ---------------------------------------------------------------------------------------------


def make_train_loader(
    dataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    aspect_ratio_grouping: bool = True,
    group_factor: int = 0,
    sampler: Sampler[int] | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A shuffling DataLoader of ``(images list, targets list)`` batches for training.

    Args:
        dataset: ``dataset[i] -> (image [3, H, W], target dict)``.
        batch_size: images per batch.
        num_workers: loader processes (0: load in the training process); workers persist across
            epochs (``persistent_workers``).
        seed: seeds the loader's ``torch.Generator``, which draws the shuffling (and the workers'
            base seed); :func:`infinite` re-seeds it to ``seed + epoch`` at each epoch.
        aspect_ratio_grouping: batch images of the same :func:`aspect_ratio_groups` bin together
            (with ``group_factor`` as ``k``); False puts every image in one group, i.e. plain
            batching of the shuffled order.
        sampler: the index sampler, e.g. ``DistributedSampler(dataset, seed=seed)`` under
            torchrun (default: ``RandomSampler(dataset, generator=the loader's generator)``).
        drop_last: drop each group's last incomplete batch.
        pin_memory: page-locked batches, for faster copies to a GPU.

    Returns:
        a ``DataLoader`` with ``batch_sampler`` a :class:`GroupedBatchSampler`, ``collate_fn``
        ``mrcnn_edu.transforms.collate_fn`` and ``generator`` seeded with ``seed``.
    """
    if len(dataset) == 0:
        raise ValueError("make_train_loader: the data set is empty")
    if num_workers < 0:
        raise ValueError(f"make_train_loader: num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    if sampler is None:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    group_ids = (
        aspect_ratio_groups(dataset, group_factor) if aspect_ratio_grouping else [0] * len(dataset)
    )
    batch_sampler = GroupedBatchSampler(sampler, group_ids, batch_size, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=generator,
        persistent_workers=num_workers > 0,
        worker_init_fn=_seed_worker_generators if num_workers > 0 else None,
        pin_memory=pin_memory,
    )


# ---------------------------------------------------------------------------------------------
# Endless, resumable iteration
# ---------------------------------------------------------------------------------------------


def _loader_generators(loader) -> list[torch.Generator]:
    """The distinct generators that shuffle ``loader`` (the loader's, its sampler's, and the
    sampler inside its batch sampler)."""
    candidates = [getattr(loader, "generator", None)]
    for s in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        candidates.append(getattr(s, "generator", None))
        candidates.append(getattr(getattr(s, "sampler", None), "generator", None))
    out: list[torch.Generator] = []
    for g in candidates:
        if isinstance(g, torch.Generator) and all(g is not o for o in out):
            out.append(g)
    return out


class InfiniteLoader:
    """Iterate ``loader`` epoch after epoch, forever, knowing where it is so it can resume.

    At the start of epoch ``e`` it calls ``set_epoch(e)`` on the loader's batch sampler (else
    its sampler) when that exists, and re-seeds each generator that shuffles the loader to
    ``its initial seed + e``. It counts the batches handed out in the current epoch;
    :meth:`state_dict` / :meth:`load_state_dict` save and restore ``(epoch, batches)``.
    Restoring rebuilds epoch ``e``'s order and skips the used batches: without loading them when
    the batch sampler has ``skip_next`` (:class:`GroupedBatchSampler`), else by loading and
    discarding them (slow on a big epoch, still exact).

    ``loader`` may be any re-iterable (a DataLoader, a list of batches). A loader that shuffles
    with torch's global RNG (``shuffle=True`` and no ``generator``) is handled too: the global
    RNG state at the start of each epoch is part of the saved state.

    Exactness of a resumed run also needs the random states of everything else (the model,
    the transforms); ``engine.checkpoint`` saves those. Transforms that run in DataLoader
    workers draw from the workers' RNGs, which a checkpoint cannot capture: with
    ``num_workers > 0`` the batch order resumes exactly but the random augmentations do not.
    """

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.epoch = 0
        self.batches_in_epoch = 0
        self._iter: Iterator | None = None
        self._generators = _loader_generators(loader)
        self._base_seeds = [g.initial_seed() for g in self._generators]
        self._epoch_rng_state: torch.Tensor | None = None

    def _begin_epoch(self, epoch: int, skip: int = 0) -> None:
        target = getattr(self.loader, "batch_sampler", None)
        if not hasattr(target, "set_epoch"):
            target = getattr(self.loader, "sampler", None)
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)
        for gen, base in zip(self._generators, self._base_seeds):
            gen.manual_seed(base + epoch)
        self._epoch_rng_state = torch.get_rng_state()  # used when shuffling draws from it
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        fast = skip > 0 and hasattr(batch_sampler, "skip_next")
        if fast:
            try:
                available = len(batch_sampler)
            except TypeError:  # unknown length (e.g. over a DistributedSampler): trust the state
                available = skip
            if skip > available:
                self.epoch, self.batches_in_epoch = epoch, available
                self._next_in_epoch_error()
            batch_sampler.skip_next(skip)
        self._iter = iter(self.loader)
        self.epoch, self.batches_in_epoch = epoch, 0
        if not fast:
            for i in range(skip):
                self.batches_in_epoch = i
                self._next_in_epoch(resuming=True)
        self.batches_in_epoch = skip

    def _next_in_epoch_error(self):
        raise ValueError(
            f"InfiniteLoader: cannot resume after batch {self.batches_in_epoch} of "
            f"epoch {self.epoch}: the epoch has no more batches (the data set or "
            "batch size changed since the checkpoint?)"
        )

    def _next_in_epoch(self, resuming: bool = False):
        try:
            return next(self._iter)
        except StopIteration:
            if resuming:
                self._next_in_epoch_error()
            raise

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self):
        if self._iter is None:
            self._begin_epoch(self.epoch)
        try:
            batch = next(self._iter)
        except StopIteration:
            if self.batches_in_epoch == 0:
                raise ValueError(
                    "InfiniteLoader: the loader yielded no batch in a whole epoch "
                    "(empty data set, or a one-shot iterator that is used up)"
                ) from None
            self._begin_epoch(self.epoch + 1)
            try:
                batch = next(self._iter)
            except StopIteration:
                raise ValueError(f"InfiniteLoader: epoch {self.epoch} yielded no batch") from None
        self.batches_in_epoch += 1
        return batch

    def state_dict(self) -> dict:
        """``{"epoch", "batches_in_epoch", "base_seeds", "epoch_rng_state"}``: where the next
        batch comes from."""
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "base_seeds": list(self._base_seeds),
            "epoch_rng_state": (
                None if self._epoch_rng_state is None else self._epoch_rng_state.clone()
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        """Position the iteration where ``state`` says (the next batch is the one that followed).

        This may draw from torch's global RNG (re-creating the epoch's order) and load batches;
        restore the global random states after calling it, not before.
        """
        if len(state["base_seeds"]) != len(self._generators):
            raise ValueError(
                f"InfiniteLoader.load_state_dict: the saved state has "
                f"{len(state['base_seeds'])} loader generator(s), this loader has "
                f"{len(self._generators)}: not the same kind of loader"
            )
        self._base_seeds = [int(s) for s in state["base_seeds"]]
        epoch, done = int(state["epoch"]), int(state["batches_in_epoch"])
        if done == 0:  # the epoch has not begun: begin it lazily, at the next batch
            self._iter, self.epoch, self.batches_in_epoch = None, epoch, 0
            return
        if state.get("epoch_rng_state") is not None:
            torch.set_rng_state(state["epoch_rng_state"])
        self._begin_epoch(epoch, skip=done)


def infinite(loader: Iterable) -> InfiniteLoader:
    """``loader``'s batches epoch after epoch without end (see :class:`InfiniteLoader`).

    >>> it = infinite([1, 2, 3])
    >>> [next(it) for _ in range(5)], it.epoch
    ([1, 2, 3, 1, 2], 1)
    """
    return loader if isinstance(loader, InfiniteLoader) else InfiniteLoader(loader)

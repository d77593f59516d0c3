"""Tests for the training batches: aspect-ratio groups, the grouped batch sampler, the seeded
loader and the resumable endless iteration.

References: the group ids are checked against hand-computed bins and against numpy's
``digitize`` on torchvision's bin edges; the sampler against the definition (one group per batch,
every index exactly once per epoch); resuming against an iteration that never stopped.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, Subset

from mrcnn_edu.data import CocoDetection
from mrcnn_edu.data.sampler import (
    GroupedBatchSampler,
    InfiniteLoader,
    aspect_ratio_groups,
    image_sizes,
    infinite,
    make_train_loader,
    transform_generators,
)
from mrcnn_edu.transforms import Compose, RandomHorizontalFlip

# (height, width) of 10 images: portrait, landscape, square and extreme shapes
SIZES = [
    (480, 640),
    (640, 480),
    (500, 500),
    (100, 400),
    (400, 100),
    (300, 600),
    (600, 300),
    (333, 500),
    (500, 333),
    (256, 257),
]


class SizedDataset(torch.utils.data.Dataset):
    """Image sizes only (torchvision's ``get_height_and_width``); an item is its own index."""

    def __init__(self, sizes):
        self.sizes = list(sizes)

    def __len__(self):
        return len(self.sizes)

    def get_height_and_width(self, idx):
        return self.sizes[idx]

    def __getitem__(self, idx):
        h, w = self.sizes[idx]
        return torch.zeros(3, 2, 2), {"image_id": torch.tensor(idx), "hw": (h, w)}


# ----------------------------------------------------------------------------- aspect ratios


def test_aspect_ratio_groups_k0_hand_computed():
    # k=0: one edge at 1.0; width/height < 1 -> group 0, >= 1 -> group 1
    assert aspect_ratio_groups(SizedDataset(SIZES)) == [1, 0, 1, 1, 0, 1, 0, 1, 0, 1]


def test_aspect_ratio_groups_k3_matches_torchvision_bins():
    # torchvision: bins = 2 ** linspace(-1, 1, 2k + 1); groups = np.digitize(ratios, bins)
    ratios = [w / h for h, w in SIZES]
    bins = (2 ** np.linspace(-1, 1, 7)).tolist()
    expected = [int(g) for g in np.digitize(ratios, bins)]
    assert aspect_ratio_groups(SizedDataset(SIZES), k=3) == expected
    # by hand: edges 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2; ratio 4 -> 7, 0.25 -> 0, 1 -> 4, 2 -> 7
    assert expected[3] == 7 and expected[4] == 0 and expected[2] == 4 and expected[5] == 7


def test_aspect_ratio_groups_from_coco_json_without_images(tmp_path):
    # only the annotation file's width / height are read: the image files need not exist
    (tmp_path / "images").mkdir()
    data = {
        "images": [
            {"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w}
            for i, (h, w) in enumerate(SIZES)
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    ds = CocoDetection(tmp_path / "images", ann)
    assert image_sizes(ds) == SIZES
    assert aspect_ratio_groups(ds) == aspect_ratio_groups(SizedDataset(SIZES))
    sub = Subset(ds, [3, 0, 1])
    assert image_sizes(sub) == [SIZES[3], SIZES[0], SIZES[1]]
    assert aspect_ratio_groups(sub) == [1, 1, 0]


def test_aspect_ratio_groups_errors():
    with pytest.raises(TypeError, match="get_height_and_width"):
        aspect_ratio_groups([1, 2, 3])
    with pytest.raises(ValueError, match="k must be >= 0"):
        aspect_ratio_groups(SizedDataset(SIZES), k=-1)


# ----------------------------------------------------------------------------- grouped batches


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4])
def test_grouped_batches_one_group_each_and_cover_every_index_once(batch_size):
    groups = aspect_ratio_groups(SizedDataset(SIZES), k=1)  # 4 bins
    gen = torch.Generator().manual_seed(0)
    sampler = GroupedBatchSampler(
        RandomSampler(range(len(SIZES)), generator=gen), groups, batch_size
    )
    for _ in range(3):  # three epochs, different orders
        batches = list(sampler)
        for b in batches:
            assert 1 <= len(b) <= batch_size
            assert len({groups[i] for i in b}) == 1, b
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(SIZES)))  # every index exactly once
        assert len(batches) == len(sampler)
        counts = np.bincount(groups)
        assert len(sampler) == sum(-(-c // batch_size) for c in counts if c)


def test_grouped_batches_order_and_drop_last():
    # sampler order 0..7, groups a/b alternating in pairs; a batch leaves as soon as it is full
    groups = [0, 0, 1, 1, 0, 1, 0, 0]
    s = GroupedBatchSampler(range(8), groups, batch_size=3)
    assert list(s) == [[0, 1, 4], [2, 3, 5], [6, 7]]
    s = GroupedBatchSampler(range(8), groups, batch_size=3, drop_last=True)
    assert list(s) == [[0, 1, 4], [2, 3, 5]] and len(s) == 2


def test_grouped_batches_skip_next_is_one_shot():
    s = GroupedBatchSampler(range(7), [0] * 7, batch_size=2)
    s.skip_next(2)
    assert list(s) == [[4, 5], [6]]
    assert list(s) == [[0, 1], [2, 3], [4, 5], [6]]


def test_grouped_batches_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(range(3), [0, 0, 0], batch_size=0)
    with pytest.raises(IndexError, match="index 3"):
        list(GroupedBatchSampler(range(4), [0, 0, 0], batch_size=2))


def test_grouped_batches_forward_set_epoch_to_distributed_sampler():
    ds = SizedDataset(SIZES)
    dist = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3)
    s = GroupedBatchSampler(dist, aspect_ratio_groups(ds), batch_size=2)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(i for b in e0 for i in b) == sorted(dist_indices(ds, 0))
    assert sorted(i for b in e1 for i in b) == sorted(dist_indices(ds, 1))
    assert e0 != e1


def dist_indices(ds, epoch):
    d = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3)
    d.set_epoch(epoch)
    return list(d)


# ----------------------------------------------------------------------------- loaders


def ids_of(batch):
    _, targets = batch
    return [int(t["image_id"]) for t in targets]


def test_make_train_loader_is_seeded_and_grouped():
    ds = SizedDataset(SIZES)
    groups = aspect_ratio_groups(ds)
    a = [ids_of(b) for b in make_train_loader(ds, 2, seed=5)]
    b = [ids_of(b) for b in make_train_loader(ds, 2, seed=5)]
    c = [ids_of(b) for b in make_train_loader(ds, 2, seed=6)]
    assert a == b and a != c
    assert all(len({groups[i] for i in batch}) == 1 for batch in a)
    # without grouping: the batches of torch's own DataLoader(shuffle=True) with that generator
    plain = [ids_of(b) for b in make_train_loader(ds, 2, seed=5, aspect_ratio_grouping=False)]
    assert plain == [ids_of(b) for b in torch_loader(ds, 2, seed=5)]


def torch_loader(ds, batch_size, seed):
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=lambda b: tuple(zip(*b)),
        generator=torch.Generator().manual_seed(seed),
    )


def test_infinite_reseeds_per_epoch():
    ds = SizedDataset(SIZES)
    it = infinite(make_train_loader(ds, 3, seed=2, aspect_ratio_grouping=False))
    per_epoch = len(it.loader)
    assert per_epoch == 4
    epochs = [[ids_of(next(it)) for _ in range(per_epoch)] for _ in range(3)]
    assert it.epoch == 2
    # epoch e's batches are those of a DataLoader whose generator is seeded with seed + e
    for e, batches in enumerate(epochs):
        assert batches == [ids_of(b) for b in torch_loader(ds, 3, seed=2 + e)]
    assert epochs[0] != epochs[1]


def make_loader(kind, ds):
    if kind == "grouped":  # fast resume: the batch sampler skips without loading
        return make_train_loader(ds, 3, seed=1)
    if kind == "generator":  # a plain DataLoader with its own generator: skip by loading
        return DataLoader(
            ds,
            batch_size=3,
            shuffle=True,
            collate_fn=lambda b: tuple(zip(*b)),
            generator=torch.Generator().manual_seed(1),
        )
    # shuffled from torch's global RNG: the epoch's starting RNG state is saved
    return DataLoader(ds, batch_size=3, shuffle=True, collate_fn=lambda b: tuple(zip(*b)))


@pytest.mark.parametrize("kind", ["grouped", "generator", "global"])
@pytest.mark.parametrize("stop", [0, 2, 4, 8])
def test_infinite_loader_resumes_exactly(kind, stop):
    ds = SizedDataset(SIZES)
    torch.manual_seed(0)
    it = InfiniteLoader(make_loader(kind, ds))
    straight = [ids_of(next(it)) for _ in range(12)]

    torch.manual_seed(0)
    it = InfiniteLoader(make_loader(kind, ds))
    first = [ids_of(next(it)) for _ in range(stop)]
    state = it.state_dict()
    rng = torch.get_rng_state()
    torch.manual_seed(123)  # a fresh process would have some other global RNG state
    resumed = InfiniteLoader(make_loader(kind, ds))
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    rest = [ids_of(next(resumed)) for _ in range(12 - stop)]
    assert first + rest == straight


def test_infinite_loader_errors():
    it = infinite([])
    with pytest.raises(ValueError, match="no batch"):
        next(it)
    it = InfiniteLoader(
        make_train_loader(SizedDataset(SIZES), 5, seed=0, aspect_ratio_grouping=False)
    )
    with pytest.raises(ValueError, match="no more batches"):
        it.load_state_dict(
            {"epoch": 0, "batches_in_epoch": 3, "base_seeds": [0], "epoch_rng_state": None}
        )
    with pytest.raises(ValueError, match="empty"):
        make_train_loader(SizedDataset([]), 2)


def test_transform_generators_found_and_reseeded_per_worker():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    tf = Compose([RandomHorizontalFlip(0.5, generator=g1), RandomHorizontalFlip(0.5, generator=g2)])

    class DS(SizedDataset):
        transforms = tf

        def __getitem__(self, idx):
            flips = [bool(torch.rand(1, generator=t.generator) < 0.5) for t in tf.transforms]
            return torch.zeros(3, 2, 2), {"image_id": torch.tensor(idx), "flips": flips}

    ds = DS([(10, 10)] * 8)
    found = transform_generators(Subset(ds, range(8)))
    assert list(found) == [
        "dataset.transforms.transforms[0].generator",
        "dataset.transforms.transforms[1].generator",
    ]
    assert found["dataset.transforms.transforms[0].generator"] is g1
    # two workers: without reseeding each worker's copy of g1 would repeat the other's draws
    loader = make_train_loader(ds, 1, num_workers=2, seed=0, aspect_ratio_grouping=False)
    draws = [t["flips"] for _, targets in loader for t in targets]
    by_worker = [draws[0::2], draws[1::2]]  # batches alternate between the two workers
    assert by_worker[0] != by_worker[1]

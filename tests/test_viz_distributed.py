"""Tests for notebook 09's drawings (``mrcnn_edu.viz``): the learning-rate schedule of the 1x
recipe, as the scheduler ``build_optimization`` builds it, and one step of DDP drawn from the
shards torch's own ``DistributedSampler`` deals out."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.patches import FancyBboxPatch
from torch.utils.data import DistributedSampler

from mrcnn_edu.engine.distributed import rank_seed
from mrcnn_edu.engine.recipe import build_optimization, get_experiment
from mrcnn_edu.viz import draw_ddp_step, plot_lr_schedule


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _by_gid(ax, gid: str):
    found = [a for a in ax.findobj() if a.get_gid() == gid]
    assert len(found) == 1, (gid, found)
    return found[0]


def test_lr_schedule_of_the_1x_recipe() -> None:
    exp = get_experiment("coco-r50-fpn-1x")
    optimizer, scheduler, total = build_optimization(exp, torch.nn.Linear(2, 2))
    base = optimizer.param_groups[0]["initial_lr"]
    steps = np.arange(0, total, 25)
    lrs = [base * scheduler.lr_lambdas[0](int(s)) for s in steps]
    ax = plot_lr_schedule(
        steps, lrs, milestones=exp.train.milestones, warmup_steps=exp.train.warmup_steps
    )
    x, y = _by_gid(ax, "lr").get_data()
    np.testing.assert_array_equal(x, steps)
    np.testing.assert_allclose(y, lrs)
    # the recipe by hand: 0.02 for 16 images, warm-up from 0.001 x, /10 at 60k and at 80k
    assert (base, total) == (0.02, 90000)
    assert y[0] == pytest.approx(0.02 * 0.001)
    assert y[steps.tolist().index(30000)] == pytest.approx(0.02)
    assert y[steps.tolist().index(70000)] == pytest.approx(0.002)
    assert y[-1] == pytest.approx(0.0002)
    for m in (60000, 80000):
        line = _by_gid(ax, f"milestone:{m}")
        assert list(line.get_xdata()) == [m, m]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["step 60,000: x0.1", "step 80,000: x0.1"]
    inset = _by_gid(ax, "warmup")
    (warm,) = inset.get_lines()[:1]
    assert warm.get_xdata().max() == 2000  # the first 2 x 1000 steps, linear
    assert inset.get_yscale() == "linear" and ax.get_yscale() == "log"


def test_lr_schedule_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="plot_lr_schedule: steps and lrs must be .* 3 and 2"):
        plot_lr_schedule([0, 1, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="lrs finite and positive"):
        plot_lr_schedule([0, 1], [1.0, 0.0])
    with pytest.raises(ValueError, match="steps must be increasing"):
        plot_lr_schedule([1, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match="milestone 5 lies outside the steps 0..2"):
        plot_lr_schedule([0, 1, 2], [1.0, 1.0, 0.1], milestones=(5,))


def test_ddp_step_draws_the_shards_torch_deals_out() -> None:
    """Rank r's batch: the first images of its shard of epoch 0, as ``DistributedSampler``
    (seeded alike on every rank) deals them: positions r, r + W, ... of one permutation."""
    data = list(range(10))
    W, per_rank = 2, 3
    shards = [
        list(DistributedSampler(data, num_replicas=W, rank=r, shuffle=True, seed=0))[:per_rank]
        for r in range(W)
    ]
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert shards == [perm[0::2][:per_rank], perm[1::2][:per_rank]]  # independent: by hand
    seeds = [rank_seed(0, r) for r in range(W)]
    ax = draw_ddp_step(shards, rank_seeds=seeds)
    texts = [t.get_text() for t in ax.texts]
    for r in range(W):
        for i, k in enumerate(shards[r]):
            assert isinstance(_by_gid(ax, f"image:{r}:{i}"), FancyBboxPatch)
            assert f"#{k}" in texts
        _by_gid(ax, f"grad:{r}")
        _by_gid(ax, f"update:{r}")
        assert f"replica {r}\nforward + backward\nseed {seeds[r]}" in texts
        assert f"rank {r}" in texts
    assert seeds == [0, 1_000_003]
    # the all-reduce spans every rank's row
    box = _by_gid(ax, "allreduce")
    assert box.get_y() < 0 and box.get_y() + box.get_height() > W - 1
    assert ax.get_title() == "one DDP step: 2 ranks, 6 images in all"


def test_ddp_step_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="draw_ddp_step: shards must be a non-empty list"):
        draw_ddp_step([])
    with pytest.raises(ValueError, match=r"shards\[1\] is empty"):
        draw_ddp_step([[1], []])
    with pytest.raises(ValueError, match=r"shards\[0\] must be a list of image indices"):
        draw_ddp_step([["a"]])
    with pytest.raises(ValueError, match="1 rank_seeds for 2 ranks"):
        draw_ddp_step([[1], [2]], rank_seeds=[0])

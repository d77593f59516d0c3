"""Training recipes end to end on a tiny shapes set: train, checkpoint, reload, evaluate."""

from __future__ import annotations

import math

import pytest
import torch

from mrcnn_edu.data.shapes import write_shapes_dataset
from mrcnn_edu.engine.evaluate import evaluate
from mrcnn_edu.engine.recipe import (
    build_datasets,
    get_experiment,
    list_experiments,
    load_model,
    run_training,
)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, train=6, val=3, size=96, seed=3, progress=False)
    return root


def _tiny(exp):
    exp.train.steps = 2
    exp.train.batch_size = 2
    exp.train.num_workers = 0
    exp.train.log_every = 1
    exp.train.warmup_steps = 1
    exp.model.transform.min_size = (96,)
    exp.model.transform.max_size = 96
    return exp


def test_presets_and_overrides():
    assert {"shapes", "coco-r50-fpn-1x", "coco-r50-fpn-3x"} <= set(list_experiments())
    exp = get_experiment("coco-r50-fpn-1x")
    assert (exp.train.batch_size, exp.train.lr, exp.train.steps) == (16, 0.02, 90000)
    assert exp.train.milestones == (60000, 80000) and exp.model.transform.min_size == (800,)
    exp = get_experiment(
        "shapes",
        {
            "train.lr": "0.001",
            "model.roi_heads.pooler_op": "pool",
            "model.transform.min_size": "(200, 256)",
        },
    )
    assert exp.train.lr == 0.001 and exp.model.roi_heads.pooler_op == "pool"
    assert exp.model.transform.min_size == (200, 256)
    with pytest.raises(KeyError, match="nearest: train.lr"):
        get_experiment("shapes", {"train.lrr": "1"})
    with pytest.raises(KeyError, match="presets: .*coco-r50-fpn-1x"):
        get_experiment("shapez")


def test_single_map_recipes_for_the_roi_pool_ablation():
    """shapes-c4 / shapes-c5 are recipes of engine.recipe itself (no import of engine.ablate
    needed): the shapes recipe on one stride-16 / stride-32 map, every anchor at that level."""
    from mrcnn_edu.engine import recipe

    assert recipe._EXPERIMENTS["shapes-c4"] is recipe.shapes_c4_recipe
    assert recipe._EXPERIMENTS["shapes-c5"] is recipe.shapes_c5_recipe
    base = get_experiment("shapes")
    for name, kind in (("shapes-c4", "resnet_c4"), ("shapes-c5", "resnet_c5")):
        exp = get_experiment(name)
        assert exp.model.backbone.kind == kind
        assert exp.model.rpn.anchor_sizes == ((16, 32, 64, 128, 256),)  # 5 sizes x 3 ratios
        assert exp.model.rpn.aspect_ratios == ((0.5, 1.0, 2.0),)
        assert (exp.model.rpn.pre_nms_top_n_train, exp.model.rpn.pre_nms_top_n_test) == (
            2000,
            1000,
        )
        assert exp.train == base.train and exp.data == base.data
        assert exp.model.roi_heads == base.model.roi_heads  # the switches ablate varies


def test_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: .*train/ \\(images\\)"):
        build_datasets(get_experiment("shapes"), tmp_path)
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        build_datasets(get_experiment("coco-r50-fpn-1x"), tmp_path)


def test_train_checkpoint_reload_evaluate(tiny_set, tmp_path):
    exp = _tiny(get_experiment("shapes"))
    model, result = run_training(exp, tiny_set, tmp_path / "run", progress=False)
    assert result.steps_done == 2
    assert model.num_classes == 4  # background + square, circle, triangle
    for row in result.history:
        assert math.isfinite(row["loss"])
    assert (tmp_path / "run" / "last.pt").is_file()
    reloaded, exp2 = load_model(tmp_path / "run" / "last.pt")
    assert exp2.model == exp.model
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), k
    _, val = build_datasets(exp2, tiny_set, train=False)
    res = evaluate(reloaded, val, progress=False)
    assert set(res.metrics) == {"bbox", "segm"}
    assert 0.0 <= res.metrics["segm"]["AP"] <= 1.0
    assert set(res.val_losses) >= {"loss_mask", "loss_classifier"}


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pt is not a readable torch checkpoint"):
        load_model(tmp_path / "bad.pt")
    torch.save({"step": 1}, tmp_path / "noconf.pt")
    with pytest.raises(ValueError, match="holds no mrcnn_edu training config"):
        load_model(tmp_path / "noconf.pt")

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


# ------------------------------------------------------------------ initial backbone weights
def test_coco_recipes_start_from_torchvisions_imagenet_weights():
    """The coco recipes name the weights torchvision's own builders start their ResNet-50 from
    (their default ``weights_backbone``, read from torchvision); nothing else sets weights."""
    import inspect

    from torchvision.models import get_weight
    from torchvision.models.detection import keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

    from mrcnn_edu.config import get_preset, list_presets

    builders = {
        "coco-r50-fpn-1x": maskrcnn_resnet50_fpn,
        "coco-r50-fpn-3x": maskrcnn_resnet50_fpn,
        "coco-keypoints-r50-fpn": keypointrcnn_resnet50_fpn,
    }
    for name, builder in builders.items():
        default = inspect.signature(builder).parameters["weights_backbone"].default
        assert default is not None, builder.__name__
        weights = get_experiment(name).model.backbone.weights
        assert weights == f"{type(default).__name__}.{default.name}", name
        assert get_weight(weights) is default  # the enum member itself, through the API
    for name in set(list_experiments()) - set(builders):  # shapes, stick-figures, ablations
        assert get_experiment(name).model.backbone.weights is None, name
    for name in list_presets():  # model presets: building a model never downloads
        assert get_preset(name).backbone.weights is None, name


def test_weights_set_from_the_command_line():
    exp = get_experiment("shapes", {"model.backbone.weights": "./resnet18.pth"})
    assert exp.model.backbone.weights == "./resnet18.pth"  # a relative path stays a string
    exp = get_experiment("coco-r50-fpn-1x", {"model.backbone.weights": "/data/resnet50.pth"})
    assert exp.model.backbone.weights == "/data/resnet50.pth"
    assert (
        get_experiment("coco-r50-fpn-1x", {"model.backbone.weights": "none"}).model.backbone.weights
        is None
    )


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(5)
    tv = torchvision.models.resnet18(weights=None)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # BN statistics unlike a fresh model's (0 / 1)
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pth"
    torch.save(tv.state_dict(), path)
    return tv.state_dict(), path


def test_load_backbone_weights_fills_every_resnet_part_and_nothing_else(r18_file):
    from mrcnn_edu.backbone import Res5Head
    from mrcnn_edu.model import build_model
    from mrcnn_edu.weights import load_backbone_weights

    sd, path = r18_file
    # C4 with the paper's res5 head: conv1..layer3 in the backbone, layer4 in the RoI head
    cfg = get_experiment(
        "shapes-c4",
        {
            "model.backbone.depth": "18",  # the file's ResNet (shapes itself is a ResNet-10)
            "model.roi_heads.box_head": "res5",
            "model.roi_heads.box_resolution": "14",
        },
    ).model
    torch.manual_seed(0)
    plain = build_model(cfg)
    cfg.backbone.weights = str(path)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert load_backbone_weights(model) is model  # from model.config.backbone.weights
    loaded = model.state_dict()
    res5 = tuple(  # the box head's res5 and the mask head (the same module, two names)
        name + "."
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, Res5Head)
    )
    assert len(res5) == 2
    for k, v in plain.state_dict().items():
        if k.startswith("backbone.body."):
            assert torch.equal(loaded[k], sd[k.removeprefix("backbone.body.")]), k
        elif k.startswith(res5):
            assert torch.equal(loaded[k], sd[k[k.index("layer4.") :]]), k
        else:  # RPN, heads: the same init (loading draws no random number)
            assert torch.equal(loaded[k], v), k
    with pytest.raises(ValueError, match="missing keys: layer1.0.conv3.weight"):
        load_backbone_weights(build_model(get_experiment("coco-r50-fpn-1x").model), path)


def test_run_training_loads_the_weights_and_resume_does_not(
    tiny_set, tmp_path, r18_file, monkeypatch
):
    from mrcnn_edu.engine import recipe

    sd, path = r18_file
    sets = {
        "model.backbone.weights": str(path),
        "model.backbone.depth": "18",
        "model.backbone.norm": "frozen_bn",  # with nothing trained, the body stays the file's
        "model.backbone.trainable_layers": "0",
    }
    exp = _tiny(get_experiment("shapes", sets))
    model, _ = run_training(exp, tiny_set, tmp_path / "run", progress=False)
    body = model.backbone.body.state_dict()
    assert body and all(torch.equal(v, sd[k]) for k, v in body.items())

    def no_reload(*args, **kwargs):
        raise AssertionError("a resumed run must take its weights from the checkpoint")

    monkeypatch.setattr(recipe, "resnet_state_dict", no_reload)
    monkeypatch.setattr(recipe, "load_backbone_weights", no_reload)
    exp = _tiny(get_experiment("shapes", sets))
    exp.train.steps = 3
    _, result = run_training(exp, tiny_set, tmp_path / "run", progress=False, resume=True)
    assert result.step == 3


def test_a_bad_weights_setting_fails_before_the_data_is_read(tmp_path):
    exp = get_experiment("coco-r50-fpn-1x", {"model.backbone.weights": str(tmp_path / "r50.pth")})
    with pytest.raises(
        FileNotFoundError, match=r"run_training: no ResNet weights file at .*r50\.pth"
    ):
        run_training(exp, tmp_path / "no-coco-here", tmp_path / "run", progress=False)


def test_at_image_size_rescales_transform_and_anchors():
    from mrcnn_edu.engine.recipe import at_image_size

    exp = get_experiment("shapes")
    assert exp.model.transform.min_size == (256,)
    at_image_size(exp, 128)
    assert exp.model.transform.min_size == (128,) and exp.model.transform.max_size == 128
    assert exp.model.rpn.anchor_sizes == ((8,), (16,), (32,), (64,), (128,))
    c4 = at_image_size(get_experiment("shapes-c4"), 128)
    assert c4.model.rpn.anchor_sizes == ((8, 16, 32, 64, 128),)
    with pytest.raises(ValueError, match="size"):
        at_image_size(get_experiment("shapes"), 0)


def test_ablation_variants_train_at_the_study_image_size():
    from mrcnn_edu.engine import ablate

    for name in ablate.list_studies():
        study = ablate.get_study(name)
        for v in study.variants:
            exp = v.experiment(0)
            assert exp.model.transform.min_size == (study.data.size,), v.name
            assert max(max(lvl) for lvl in exp.model.rpn.anchor_sizes) == study.data.size

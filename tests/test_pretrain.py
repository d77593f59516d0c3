"""engine.pretrain: image-level pre-training of the ablation studies' ResNet body."""

from __future__ import annotations

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from mrcnn_edu.backbone import ResNetBody, resnet_state_dict, torchvision_resnet
from mrcnn_edu.data.shapes import write_shapes_dataset
from mrcnn_edu.engine import pretrain
from mrcnn_edu.engine.pretrain import (
    SegmentationNet,
    class_maps,
    file_sha256,
    load_images,
    pretrain_resnet,
)
from mrcnn_edu.engine.recipe import get_experiment
from mrcnn_edu.model import build_model
from mrcnn_edu.weights import load_backbone_weights


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _coco(tmp_path):
    a = np.zeros((4, 5), np.uint8)
    a[0:2, 0:2] = 1  # a triangle (category 5 -> label 2)
    b = np.zeros((4, 5), np.uint8)
    b[1:3, 1:4] = 1  # a square (category 1 -> label 1), after it: wins at (1, 1)
    crowd = np.zeros((4, 5), np.uint8)
    crowd[3, 4] = 1
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 5, "height": 4},
            {"id": 9, "file_name": "b.png", "width": 5, "height": 4},
        ],
        "categories": [{"id": 5, "name": "triangle"}, {"id": 1, "name": "square"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 9,
                "category_id": 5,
                "segmentation": _rle(a),
                "bbox": [0, 0, 2, 2],
                "area": 4,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 9,
                "category_id": 1,
                "segmentation": _rle(b),
                "bbox": [1, 1, 3, 2],
                "area": 6,
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 7,
                "category_id": 1,
                "segmentation": _rle(crowd),
                "bbox": [4, 3, 1, 1],
                "area": 1,
                "iscrowd": 1,
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_class_maps_by_hand(tmp_path):
    files, maps, names = class_maps(_coco(tmp_path))
    assert files == ["a.png", "b.png"]
    assert names == ["square", "triangle"]  # labels 1, 2 by category id 1, 5
    assert maps.dtype == torch.uint8 and maps.shape == (2, 4, 5)
    assert maps[0].tolist() == [[0] * 5, [0] * 5, [0] * 5, [0, 0, 0, 0, 255]]  # crowd: ignored
    assert maps[1].tolist() == [
        [2, 2, 0, 0, 0],
        [2, 1, 1, 1, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ]


def test_segmentation_net_shapes_and_miou_by_hand():
    torch.manual_seed(0)
    net = SegmentationNet(torchvision_resnet(10, norm="bn", trainable_layers=5), 4)
    assert [c.in_channels for c in net.score] == [128, 256, 512]
    assert net(torch.rand(2, 3, 72, 40)).shape == (2, 4, 72, 40)
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    # IoU of class 0: 2 / 4 pixels; class 1: 2 / 3; class 2: 1 / 2 (the 255 pixel, where the
    # prediction says 2, is ignored)
    assert pretrain._miou(pred, target, 3) == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)


def test_load_images_checks_sizes_and_names_the_file(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "b.png")
    x = load_images(tmp_path, ["a.png"])
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.uint8 and int(x[0, 0, 0, 0]) == 10
    with pytest.raises(ValueError, match=r"b\.png is 8x6 px"):
        load_images(tmp_path, ["a.png", "b.png"])
    with pytest.raises(OSError, match=r"cannot read image .*c\.png"):
        load_images(tmp_path, ["c.png"])


def test_pretrain_writes_loadable_deterministic_weights(tmp_path):
    root = tmp_path / "set"
    write_shapes_dataset(root, train=6, val=3, size=64, overlap=True, progress=False)
    out = tmp_path / "w" / "r10.pt"
    info = pretrain_resnet(root, out, steps=3, batch_size=4, progress=False)
    assert out.is_file() and info["sha256"] == file_sha256(out)
    assert json.loads(out.with_suffix(".json").read_text()) == info
    assert info["steps"] == 3 and info["depth"] == 10
    assert 0 <= info["val_miou_background_only"] <= 1 and 0 <= info["val_miou"] <= 1
    state = resnet_state_dict(str(out))
    assert not any(k.startswith("fc.") for k in state)
    # it loads strictly into the detectors' bodies (FPN, C4, C5) as run_training loads it:
    # every stage the body holds, BatchNorm statistics included
    for recipe in ("shapes", "shapes-c4", "shapes-c5"):
        exp = get_experiment(recipe, {"model.backbone.weights": str(out)})
        model = load_backbone_weights(build_model(exp.model))
        body = next(m for m in model.modules() if isinstance(m, ResNetBody))
        got = body.state_dict()
        assert got and all(torch.equal(v, state[k]) for k, v in got.items()), recipe
    assert "layer4.0.conv1.weight" in got  # C5 holds every stage
    # training moved the weights away from the seeded initialisation it started from
    torch.manual_seed(0)
    init = torchvision_resnet(10, norm="bn", trainable_layers=5).state_dict()
    assert not torch.equal(init["conv1.weight"], state["conv1.weight"])
    assert not torch.equal(init["bn1.running_mean"], state["bn1.running_mean"])
    # the same request gives the same bytes (a resumed study checks this)
    again = pretrain_resnet(root, tmp_path / "w2.pt", steps=3, batch_size=4, progress=False)
    assert again["sha256"] == info["sha256"]
    with pytest.raises(ValueError, match="steps and batch_size"):
        pretrain_resnet(root, tmp_path / "w3.pt", steps=0, progress=False)

"""The benchmarks' torchvision twin (``benchmarks/twins.py``) computes the same function as the
mrcnn_edu model it mirrors: the side-by-side comparisons of ``bench_train.py`` rest on it."""

import sys
from pathlib import Path

import pytest
import torch

from mrcnn_edu.config import get_preset
from mrcnn_edu.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from twins import copy_weights, torchvision_twin  # noqa: E402


@pytest.mark.parametrize("preset", ["shapes", "stick-figures"])
def test_twin_same_detections_and_losses(preset):
    cfg = get_preset(preset)
    cfg.roi_heads.score_thresh = 0.0
    # torchvision trains its mask and keypoint heads on every positive RoI: no cap to mirror
    cfg.roi_heads.mask_rois_per_image = None
    # nor does it decode keypoints to a fraction of a cell or score detections by their heatmaps
    cfg.roi_heads.keypoint_decoding, cfg.roi_heads.keypoint_rescore = "torchvision", False
    torch.manual_seed(0)
    ours = build_model(cfg)
    tv = torchvision_twin(cfg)
    copy_weights(ours, tv)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 256, 256, generator=g), torch.rand(3, 200, 240, generator=g)]
    ours.eval()
    tv.eval()
    with torch.no_grad():
        a, _ = ours(images)
        b = tv(images)
    for x, y in zip(a, b):
        assert len(x["boxes"]) > 0
        torch.testing.assert_close(x["boxes"], y["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(x["scores"], y["scores"], rtol=0, atol=1e-5)
        key = "masks" if cfg.roi_heads.mask else "keypoints"
        torch.testing.assert_close(x[key], y[key], rtol=0, atol=1e-4)
    # train mode: the same losses from the same seed
    targets = []
    for img in images:
        t = {"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0]]), "labels": torch.tensor([1])}
        if cfg.roi_heads.mask:
            m = torch.zeros(1, *img.shape[1:], dtype=torch.uint8)
            m[0, 30:150, 20:120] = 1
            t["masks"] = m
        if cfg.roi_heads.keypoint:
            k = cfg.roi_heads.num_keypoints
            xy = torch.stack([torch.linspace(25, 115, k), torch.linspace(35, 145, k)], 1)
            t["keypoints"] = torch.cat([xy, torch.full((k, 1), 2.0)], 1)[None]
        targets.append(t)
    ours.train()
    tv.train()
    torch.manual_seed(2)
    _, la = ours(images, targets)
    torch.manual_seed(2)
    lb = tv(images, targets)
    assert set(la) == set(lb)
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=0, atol=1e-5, msg=k)

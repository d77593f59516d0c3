"""The assembled model equals torchvision's R50-FPN detectors given the same weights.

For each builder: torchvision's model with ``weights=None, weights_backbone=None`` and a fixed
seed; its state dict loaded into ours through ``mrcnn_edu.weights``; then, on images of three
sizes, eval mode with the score threshold at 0 (random weights give low scores, so every
detection is compared): features, proposals, head logits, boxes, scores, labels, masks,
keypoints; and in train mode with the same seed, every loss. Images are resized to a short side
of 192 here (not 800), and eval mode keeps ``DETECTIONS`` per image (not 100: the paper's 8 x
512 keypoint head on 100 RoIs x 3 images x 3 passes took two thirds of that test's 90 s), to
keep the test quick on a 2-core CPU; the code path is the same.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import detection as tvd

from mrcnn_edu.config import get_preset
from mrcnn_edu.model import build_model
from mrcnn_edu.weights import (
    ARCHS,
    from_torchvision,
    load_torchvision_state_dict,
    map_torchvision_state_dict,
    to_torchvision_state_dict,
)

MIN_SIZE, MAX_SIZE = 192, 320
SIZES = [(3, 180, 240), (3, 240, 200), (3, 150, 150)]
DETECTIONS = 30  # per image in eval mode, on both sides (torchvision's default is 100)


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) for s in SIZES]


def _targets(images, seed=1, with_masks=True, keypoints=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, img in enumerate(images):
        H, W = img.shape[-2:]
        n = [3, 1, 0][k % 3]  # the third image has no objects
        xy = torch.rand(n, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6])
        wh = 12 + torch.rand(n, 2, generator=g) * torch.tensor([W * 0.35, H * 0.35])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, H, W, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        t = {"boxes": boxes, "labels": torch.randint(1, 91, (n,), generator=g)}
        if with_masks:
            t["masks"] = masks
        if keypoints:  # persons: label 1, 17 keypoints inside and around the box
            t["labels"] = torch.ones(n, dtype=torch.int64)
            u = torch.rand(n, 17, 2, generator=g) * 1.2 - 0.1
            xy = boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])
            vis = torch.randint(0, 3, (n, 17, 1), generator=g).float()
            t["keypoints"] = torch.cat([xy, vis], dim=2)
        out.append(t)
    return out


def _pair(arch: str):
    torch.manual_seed(0)
    tv = getattr(tvd, arch)(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE
    )
    cfg = get_preset(ARCHS[arch])
    # torchvision without pretrained weights: plain BatchNorm, all 5 stages trainable
    cfg.backbone.norm = "bn"
    cfg.backbone.trainable_layers = 5
    cfg.transform.min_size = (MIN_SIZE,)
    cfg.transform.max_size = MAX_SIZE
    ours = build_model(cfg)
    load_torchvision_state_dict(ours, tv.state_dict())
    return tv, ours


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request):
    return request.param, *_pair(request.param)


def _close(a, b, what, atol=1e-4):
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol}"


def test_state_dict_maps_one_to_one(pair):
    _arch, tv, ours = pair
    tv_sd = tv.state_dict()
    mapped = map_torchvision_state_dict(tv_sd)
    assert set(mapped) == set(ours.state_dict()), set(mapped) ^ set(ours.state_dict())
    back = to_torchvision_state_dict(ours)
    assert set(back) == set(tv_sd)
    for k, v in back.items():
        assert torch.equal(v, tv_sd[k]), k


@torch.no_grad()
def test_eval_mode_equals_torchvision(pair):
    _arch, tv, ours = pair
    tv.eval()
    ours.eval()
    tv.roi_heads.score_thresh = 0.0
    ours.roi_heads.score_thresh = 0.0
    tv.roi_heads.detections_per_img = DETECTIONS
    ours.roi_heads.detections_per_img = DETECTIONS
    images = _images()
    # stage by stage on torchvision's side
    tv_batch, _ = tv.transform(images)
    tv_features = tv.backbone(tv_batch.tensors)
    tv_proposals, _ = tv.rpn(tv_batch, tv_features)
    tv_dets, _ = tv.roi_heads(tv_features, tv_proposals, tv_batch.image_sizes)
    tv_out = tv.transform.postprocess(
        tv_dets, tv_batch.image_sizes, [tuple(i.shape[-2:]) for i in images]
    )
    stages = ours.run_stages(images)
    _close(stages["images"], tv_batch.tensors, "normalized, resized, padded batch", 1e-6)
    assert stages["image_sizes"] == [tuple(s) for s in tv_batch.image_sizes]
    assert list(stages["features"]) == list(tv_features)
    for name in tv_features:
        _close(stages["features"][name], tv_features[name], f"feature {name}")
    for i, (p, q) in enumerate(zip(stages["proposals"], tv_proposals)):
        _close(p, q, f"proposals of image {i}")
    box_features = tv.roi_heads.box_roi_pool(tv_features, tv_proposals, tv_batch.image_sizes)
    tv_logits, tv_deltas = tv.roi_heads.box_predictor(tv.roi_heads.box_head(box_features))
    _close(stages["class_logits"], tv_logits, "class logits")
    _close(stages["box_regression"], tv_deltas, "box regression")
    for i, (d, e) in enumerate(zip(stages["detections"], tv_out)):
        assert len(e["boxes"]) == DETECTIONS, f"score_thresh 0 should keep {DETECTIONS} detections"
        _close(d["boxes"], e["boxes"], f"image {i} boxes")
        _close(d["scores"], e["scores"], f"image {i} scores")
        assert torch.equal(d["labels"], e["labels"]), f"image {i} labels"
        if "masks" in e:
            _close(d["masks"], e["masks"], f"image {i} masks")
        else:
            assert "masks" not in d
        if "keypoints" in e:
            _close(d["keypoints"], e["keypoints"], f"image {i} keypoints")
            _close(d["keypoints_scores"], e["keypoints_scores"], f"image {i} keypoint scores")
        else:
            assert "keypoints" not in d
    # forward() gives the same detections as run_stages, and no losses without targets
    dets, losses = ours(images)
    assert losses == {}
    assert torch.equal(dets[0]["boxes"], stages["detections"][0]["boxes"])


def test_train_mode_losses_equal_torchvision(pair):
    arch, tv, ours = pair
    tv.train()
    ours.train()
    images = _images(2)
    with_masks = "mask" in arch
    targets = _targets(images, with_masks=with_masks, keypoints="keypoint" in arch)
    torch.manual_seed(123)
    tv_losses = tv(images, targets)
    torch.manual_seed(123)
    dets, losses = ours(images, targets)
    assert dets == []
    assert set(losses) == set(tv_losses)
    for k in tv_losses:
        _close(losses[k], tv_losses[k], k, atol=1e-5)
    total = sum(losses.values())
    total.backward()  # gradients reach the first conv
    assert ours.backbone.body.conv1.weight.grad is not None


def test_from_torchvision_file_and_errors(tmp_path):
    torch.manual_seed(0)
    tv = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5)
    path = tmp_path / "frcnn.pth"
    torch.save(tv.state_dict(), path)
    model = from_torchvision(path, arch="fasterrcnn_resnet50_fpn")
    assert not model.training and model.num_classes == 5
    assert torch.equal(
        model.roi_heads.box_predictor.cls_score.weight, tv.roi_heads.box_predictor.cls_score.weight
    )
    # a checkpoint of another architecture names what does not fit
    with pytest.raises(ValueError, match="unexpected keys: roi_heads.mask_head"):
        from_torchvision(
            _pair("maskrcnn_resnet50_fpn")[0].state_dict(), arch="fasterrcnn_resnet50_fpn"
        )
    with pytest.raises(ValueError, match="missing keys: .*mask"):
        from_torchvision(path, arch="maskrcnn_resnet50_fpn")
    with pytest.raises(ValueError, match="unknown arch"):
        from_torchvision(path, arch="yolo")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        from_torchvision(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth is not a readable torch checkpoint"):
        from_torchvision(tmp_path / "junk.pth")


def test_torchvision_weights_api_is_used_for_enums(monkeypatch):
    # the weights enum path: get_state_dict is what torchvision downloads through
    torch.manual_seed(0)
    tv = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    calls = []

    class FakeEnum:
        def get_state_dict(self, progress=True):
            calls.append(progress)
            return tv.state_dict()

    model = from_torchvision(FakeEnum(), arch="fasterrcnn_resnet50_fpn")
    assert calls == [True] and model.num_classes == 3
    assert hasattr(
        torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.DEFAULT, "get_state_dict"
    )


@torch.no_grad()
def test_channels_last_model_computes_the_same():
    # NHWC sums in another order: compare stage by stage on the same inputs (with random
    # weights all scores are nearly tied, so a 1e-7 change reorders the final detections)
    torch.manual_seed(0)
    tv = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=160, max_size=240)
    models = []
    for channels_last in (False, True):
        cfg = get_preset("maskrcnn-r50-fpn")
        cfg.backbone.norm = "bn"
        cfg.transform.min_size, cfg.transform.max_size = (160,), 240
        cfg.channels_last = channels_last
        m = build_model(cfg)
        load_torchvision_state_dict(m, tv.state_dict())
        models.append(m.eval())
    nchw, nhwc = models
    assert nhwc.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = _images()[:2]
    a, b = nchw.run_stages(images), nhwc.run_stages(images)
    assert b["features"]["0"].is_contiguous(memory_format=torch.channels_last)
    for name in a["features"]:
        fa, fb = a["features"][name], b["features"][name]
        # float32 sums of ~10^4 terms in another order: relative differences ~1e-6
        rel = ((fb - fa).abs().max() / fa.abs().max()).item()
        assert rel < 1e-5, f"feature {name}: relative difference {rel:.2g}"
    # the second stage on the same proposals
    sizes = a["image_sizes"]
    stages_a, stages_b = {}, {}
    dets_a, _ = nchw.roi_heads(a["features"], a["proposals"], sizes, stages=stages_a)
    nhwc.roi_heads(b["features"], a["proposals"], sizes, stages=stages_b)
    _close(stages_b["class_logits"], stages_a["class_logits"], "class logits")
    _close(stages_b["box_regression"], stages_a["box_regression"], "box regression")
    # masks of the same boxes
    boxes = [d.pred_boxes for d in dets_a]
    ma = nchw.roi_heads._mask_features(a["features"], boxes, sizes)
    mb = nhwc.roi_heads._mask_features(b["features"], boxes, sizes)
    rel = ((mb - ma).abs().max() / ma.abs().max()).item()
    assert rel < 1e-5, (
        f"mask logits: relative difference {rel:.2g} (max |logit| {ma.abs().max():.3g})"
    )

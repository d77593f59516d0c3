"""The assembled model on the shapes set: training works, switches reach the pooler, bad input
gets a clear error naming the image, field and shape."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from mrcnn_edu.config import get_preset, override
from mrcnn_edu.data import shapes_dataset
from mrcnn_edu.data.shapes import write_shapes_dataset
from mrcnn_edu.model import build_model


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, train=4, val=2, size=96, seed=5, progress=False)
    return shapes_dataset(root, "train")


def _model(**changes):
    cfg = get_preset("shapes")
    override(cfg, {"transform.min_size": (96,), "transform.max_size": 96, **changes})
    torch.manual_seed(0)
    return build_model(cfg)


def test_a_batch_of_shapes_trains_with_finite_losses(shapes):
    model = _model().train()
    images, targets = zip(*[shapes[i] for i in range(2)])
    before = model.roi_heads.mask_predictor.mask_fcn_logits.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    _, losses = model(list(images), list(targets))
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, model.roi_heads.mask_predictor.mask_fcn_logits.weight)


def test_images_without_objects_train(shapes):
    model = _model().train()
    image, _ = shapes[0]
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, *image.shape[-2:], dtype=torch.uint8),
    }
    _, losses = model([image], [empty])
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()


def test_losses_and_detections_together_in_eval_mode(shapes):
    model = _model().eval()
    image, target = shapes[0]
    dets, losses = model([image], [target])
    assert len(dets) == 1 and {"boxes", "labels", "scores", "masks"} <= set(dets[0])
    assert dets[0]["masks"].shape[1:] == (1, *image.shape[-2:])
    assert "loss_mask" in losses  # a validation loss without switching to train mode


@pytest.mark.parametrize("op,aligned", [("pool", False), ("align", True), ("align", False)])
def test_pooler_switches_reach_the_operator(shapes, op, aligned):
    model = _model(**{"roi_heads.pooler_op": op, "roi_heads.aligned": aligned}).eval()
    assert model.roi_heads.box_roi_pool.op == op and model.roi_heads.mask_roi_pool.op == op
    image, _ = shapes[0]
    stages = model.run_stages([image])
    feats = stages["features"]
    box = torch.tensor([[10.0, 12.0, 40.0, 44.0]])  # ~ 32 px: level P2 ("0"), stride 4
    pooled = model.roi_heads.box_roi_pool(feats, [box], stages["image_sizes"])
    rois = torch.cat([torch.zeros(1, 1), box], 1)
    if op == "pool":
        from torchvision.ops import roi_pool as tv_roi_pool

        expected = tv_roi_pool(feats["0"].contiguous(), rois, 7, 0.25)
    else:
        expected = tv_roi_align(feats["0"].contiguous(), rois, 7, 0.25, 2, aligned)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_bad_input_is_named(shapes):
    model = _model().train()
    image, target = shapes[0]
    with pytest.raises(TypeError, match=r"images must be a list .* got one tensor"):
        model(image[None], [target])
    with pytest.raises(ValueError, match=r"images\[0\] must be \[3, H, W\]"):
        model([image[:2]], [target])
    with pytest.raises(TypeError, match=r"images\[0\] has dtype torch.uint8"):
        model([(image * 255).byte()], [target])
    with pytest.raises(ValueError, match=r"images\[0\] has values in \[\d+, \d+\]; .* 0..1"):
        model([image * 255], [target])
    bad = dict(target, masks=target["masks"][:, :-1])
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] must be \[\d+, 96, 96\]"):
        model([image], [bad])
    bad = dict(target, labels=target["labels"] * 0 + 9)
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]\[0\] = 9 is outside 1..3"):
        model([image], [bad])
    boxes = target["boxes"].clone()
    boxes[0, 2] = boxes[0, 0]
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[0\] .* is degenerate"):
        model([image], [dict(target, boxes=boxes)])
    boxes[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[0\] is not finite"):
        model([image], [dict(target, boxes=boxes)])
    with pytest.raises(ValueError, match=r"2 images but targets is 1"):
        model([image, image], [target])
    with pytest.raises(TypeError, match=r"targets\[0\]\['labels'\] must be int64"):
        model([image], [dict(target, labels=target["labels"].int())])
    with pytest.raises(
        ValueError,
        match=r"images\[0\] is on meta but images\[0\] on cpu|"
        r"images\[1\] is on meta",
    ):
        model([image, image.to("meta")], None)


def test_mask_rois_per_image_caps_the_mask_branch_at_a_random_subset_of_positives(shapes):
    images, targets = zip(*[shapes[i] for i in range(2)])

    def run(cap, seed):
        model = _model(**{"roi_heads.mask_rois_per_image": cap}).train()
        gen = torch.Generator().manual_seed(seed)
        return model.run_stages(list(images), list(targets), generator=gen)

    full = run(None, 0)
    npos = [int((s.gt_labels > 0).sum()) for s in full["sampled_rois"]]
    assert sum(npos) == full["train_mask_logits"].shape[0]  # None: every positive RoI
    cap = min(npos) - 1
    assert cap >= 1, npos  # the fixture's images have several positives each
    capped = run(cap, 0)
    chosen = capped["train_head_rois"]
    assert [len(c) for c in chosen] == [cap] * 2
    assert capped["train_mask_logits"].shape[0] == 2 * cap
    for sampled, c in zip(capped["sampled_rois"], chosen):
        pos = sampled.proposal_boxes[sampled.gt_labels > 0]
        # each chosen RoI is one of the image's positives, none twice
        hits = (c.proposal_boxes[:, None] == pos[None]).all(-1)
        assert (hits.sum(1) >= 1).all() and torch.unique(c.proposal_boxes, dim=0).shape[0] == cap
        assert (c.gt_labels > 0).all()
    again = run(cap, 0)["train_head_rois"]  # the same generator seed draws the same subset
    assert all(torch.equal(a.proposal_boxes, b.proposal_boxes) for a, b in zip(chosen, again))
    assert torch.isfinite(capped["losses"]["loss_mask"])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_mask_rois_per_image_must_be_none_or_a_positive_int(bad):
    with pytest.raises(ValueError, match="mask_rois_per_image"):
        _model(**{"roi_heads.mask_rois_per_image": bad})

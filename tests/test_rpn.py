"""RPN head, loss and proposals against torchvision 0.29's RegionProposalNetwork.

Tiny sizes: 2 feature levels with 4 channels, a padded batch of 3 images of different sizes
(one without gt boxes), small top-n counts so the per-level top-k and post-NMS cuts bite.
"""

import math
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
    rpn_loss,
    select_proposals,
)

C = 4
SIZES = ((12,), (24,))
RATIOS = ((0.5, 1.0, 2.0),) * 2
PRE = {"training": 40, "testing": 25}
POST = {"training": 30, "testing": 12}


@pytest.mark.parametrize("depth", [1, 2])
def test_head_state_dict_keys_and_outputs_equal_torchvision(depth):
    torch.manual_seed(0)
    tv_head = tv_rpn.RPNHead(C, 3, conv_depth=depth)
    ours = RPNHead(C, 3, conv_depth=depth)
    assert list(ours.state_dict().keys()) == list(tv_head.state_dict().keys())
    for k, v in ours.state_dict().items():
        assert v.shape == tv_head.state_dict()[k].shape, k
    ours.load_state_dict(tv_head.state_dict())
    feats = [torch.randn(2, C, 6, 5), torch.randn(2, C, 3, 3)]
    (o1, d1), (o2, d2) = ours(feats), tv_head(feats)
    assert [o.shape for o in o1] == [(2, 3, 6, 5), (2, 3, 3, 3)]
    assert [d.shape for d in d1] == [(2, 12, 6, 5), (2, 12, 3, 3)]
    for a, b in zip(o1 + d1, o2 + d2):
        torch.testing.assert_close(a, b)


def test_head_init_and_old_checkpoint_keys():
    torch.manual_seed(0)
    head = RPNHead(64, 3)
    for name, p in head.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(float(p.detach().std()) - 0.01) < 0.002, name
    # a pre-0.12 checkpoint names the conv "conv.weight" (no version metadata)
    old = OrderedDict(
        (k.replace("conv.0.0.", "conv."), v.clone() + 1) for k, v in head.state_dict().items()
    )
    fresh = RPNHead(64, 3)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.conv[0][0].weight, head.conv[0][0].weight + 1)


def test_concat_box_prediction_layers_equals_torchvision():
    obj = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 2, 2)]
    reg = [torch.randn(2, 12, 4, 5), torch.randn(2, 12, 2, 2)]
    o, d = concat_box_prediction_layers(obj, reg)
    ro, rd = tv_rpn.concat_box_prediction_layers(obj, reg)
    assert o.shape == (2 * (60 + 12),) and d.shape == (2 * 72, 4)
    assert torch.equal(o, ro.flatten()) and torch.equal(d, rd)
    # hand check: image 1, level 0, location (i=2, j=3), anchor 1 -> row 72 + (2*5 + 3)*3 + 1
    assert o[72 + 39 + 1] == obj[0][1, 1, 2, 3]
    assert torch.equal(d[72 + 40], reg[0][1, 4:8, 2, 3])


def test_rpn_loss_hand_computed_and_empty():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0], requires_grad=True)
    deltas = torch.tensor(
        [[0.1, 0.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 0.0]], requires_grad=True
    )
    labels = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])]
    targets = [torch.zeros(2, 4), torch.zeros(2, 4)]
    pos = [torch.tensor([True, False]), torch.tensor([False, True])]
    neg = [torch.tensor([False, True]), torch.tensor([False, False])]
    lo, lb = rpn_loss(logits, deltas, labels, targets, pos, neg)

    # 3 sampled: BCE = mean(softplus(-2), softplus(-1), softplus(-3))
    def sp(x: float) -> float:  # softplus
        return math.log1p(math.exp(x))

    assert lo.item() == pytest.approx((sp(-2.0) + sp(-1.0) + sp(-3.0)) / 3, rel=1e-6)
    # smooth L1, beta = 1/9: |0.1| < 1/9 -> 0.5 * 0.01 * 9 = 0.045; |1| -> 1 - 1/18; / 3 sampled
    assert lb.item() == pytest.approx((0.045 + 1 - 1 / 18) / 3, rel=1e-6)
    (lo + lb).backward()
    assert logits.grad[2] == 0  # ignored anchor gets no gradient
    # nothing sampled: zero losses, still differentiable
    none = [torch.zeros(2, dtype=torch.bool)] * 2
    lo, lb = rpn_loss(logits, deltas, labels, targets, none, none)
    assert lo.item() == 0 and lb.item() == 0 and lo.requires_grad
    (lo + lb).backward()
    with pytest.raises(ValueError, match="pred_deltas"):
        rpn_loss(logits, deltas[:3], labels, targets, pos, neg)


def _setup(seed=0):
    """Our RPN and torchvision's with the same head weights; a padded batch of 3 images."""
    torch.manual_seed(seed)
    head = RPNHead(C, 3)
    with torch.no_grad():  # bigger weights than the 0.01 init so the proposals are varied
        for p in head.parameters():
            p.normal_(0, 0.5)
    tv_head = tv_rpn.RPNHead(C, 3)
    tv_head.load_state_dict(head.state_dict())
    kwargs = {
        "fg_iou_thresh": 0.7,
        "bg_iou_thresh": 0.3,
        "batch_size_per_image": 32,
        "positive_fraction": 0.5,
        "pre_nms_top_n": PRE,
        "post_nms_top_n": POST,
        "nms_thresh": 0.7,
    }
    ours = RegionProposalNetwork(AnchorGenerator(SIZES, RATIOS), head, **kwargs)
    tv = tv_rpn.RegionProposalNetwork(TVAnchorGenerator(SIZES, RATIOS), tv_head, **kwargs)

    images = torch.zeros(3, 3, 64, 80)
    image_sizes = [(64, 80), (50, 70), (60, 48)]
    g = torch.Generator().manual_seed(seed + 1)
    features = OrderedDict(
        [
            ("p3", torch.randn(3, C, 8, 10, generator=g)),
            ("p4", torch.randn(3, C, 4, 5, generator=g)),
        ]
    )
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 10.0, 70.0, 28.0]])},
        {"boxes": torch.zeros((0, 4))},  # an image without objects
        {"boxes": torch.tensor([[10.0, 12.0, 22.0, 20.0]])},
    ]
    return ours, tv, images, image_sizes, features, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_rpn_train_mode_equals_torchvision(seed):
    ours, tv, images, image_sizes, features, targets = _setup(seed)
    ours.train()
    tv.train()

    torch.manual_seed(100 + seed)
    ref_boxes, ref_losses = tv(ImageList(images, image_sizes), features, targets)
    (ref_losses["loss_objectness"] + ref_losses["loss_rpn_box_reg"]).backward()
    ref_grads = {k: p.grad.clone() for k, p in tv.head.named_parameters()}

    torch.manual_seed(100 + seed)
    boxes, losses = ours(images, image_sizes, features, targets)
    (losses["loss_objectness"] + losses["loss_rpn_box_reg"]).backward()

    assert len(boxes) == 3
    for b, rb, (h, w) in zip(boxes, ref_boxes, image_sizes):
        assert b.shape[1] == 4 and 0 < b.shape[0] <= POST["training"]
        torch.testing.assert_close(b, rb, rtol=0, atol=0)
        assert b[:, 2].max() <= w and b[:, 3].max() <= h
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}
    for k in losses:
        assert losses[k] > 0
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-6, atol=1e-7)
    for k, p in ours.head.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-5, atol=1e-7)


def test_rpn_eval_mode_equals_torchvision_and_still_returns_losses():
    ours, tv, images, image_sizes, features, _ = _setup(2)
    assert list(ours.state_dict()) == list(tv.state_dict())  # "head.conv.0.0.weight", ...
    ours.eval()
    tv.eval()
    ref_boxes, ref_losses = tv(ImageList(images, image_sizes), features)
    boxes, losses = ours(images, image_sizes, list(features.values()))
    assert ref_losses == {} and losses == {}
    for b, rb in zip(boxes, ref_boxes):
        assert b.shape[0] <= POST["testing"]
        torch.testing.assert_close(b, rb, rtol=0, atol=0)
    # the same forward with targets also gives the losses (a validation loss)
    _, _, _, _, _, targets = _setup(2)
    boxes2, losses2 = ours(images, image_sizes, features, targets)
    assert set(losses2) == {"loss_objectness", "loss_rpn_box_reg"}
    for b, b2 in zip(boxes, boxes2):
        assert torch.equal(b, b2)


def test_generator_makes_losses_reproducible():
    ours, _, images, image_sizes, features, targets = _setup(3)
    torch.manual_seed(7)
    _, seeded = ours(images, image_sizes, features, targets)
    torch.manual_seed(123)
    _, with_gen = ours(
        images, image_sizes, features, targets, generator=torch.Generator().manual_seed(7)
    )
    for k in seeded:
        assert torch.equal(seeded[k], with_gen[k])


def test_assign_targets_empty_image_is_background():
    ours, tv, _, _, features, targets = _setup(0)
    anchors = ours.anchor_generator((64, 80), [f.shape[-2:] for f in features.values()])
    labels, matched = ours.assign_targets_to_anchors(anchors, targets)
    ref_labels, ref_matched = tv.assign_targets_to_anchors([anchors] * 3, targets)
    for a, b, c, d in zip(labels, ref_labels, matched, ref_matched):
        assert torch.equal(a, b) and torch.equal(c, d)
    assert bool((labels[1] == 0).all()) and labels[1].dtype == torch.float32
    assert int((labels[0] == 1).sum()) >= 2  # each gt gets at least its best anchor


def test_select_proposals_matches_forward():
    ours, _, images, image_sizes, features, _ = _setup(4)
    ours.eval()
    feats = list(features.values())
    boxes, _ = ours(images, image_sizes, feats)
    obj, deltas = ours.head(feats)
    anchors = ours.anchor_generator((64, 80), [f.shape[-2:] for f in feats])
    sel_boxes, sel_scores = select_proposals(
        obj,
        deltas,
        anchors,
        image_sizes,
        pre_nms_top_n=PRE["testing"],
        post_nms_top_n=POST["testing"],
    )
    for b, sb, s in zip(boxes, sel_boxes, sel_scores):
        assert torch.equal(b, sb)
        assert bool((s[:-1] >= s[1:]).all()) and bool(((s > 0) & (s < 1)).all())


def test_bad_input_errors():
    ours, _, images, image_sizes, features, _ = _setup(0)
    feats = list(features.values())
    with pytest.raises(ValueError, match="image_sizes"):
        ours(images, image_sizes[:2], feats)
    with pytest.raises(ValueError, match="feature levels"):
        ours(images, image_sizes, feats[:1])
    with pytest.raises(KeyError, match="boxes"):
        ours(images, image_sizes, feats, [{"labels": torch.zeros(1)}] * 3)
    with pytest.raises(ValueError, match=r"\[G, 4\]"):
        ours(images, image_sizes, feats, [{"boxes": torch.zeros(4)}] * 3)
    with pytest.raises(ValueError, match="features\\[0\\]"):
        ours.head([torch.zeros(1, C + 1, 4, 4)])
    bad_head = RegionProposalNetwork(AnchorGenerator(SIZES, RATIOS), RPNHead(C, 2))
    with pytest.raises(ValueError, match="num_anchors"):
        bad_head(images, image_sizes, feats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rpn_on_cuda_equals_torchvision():
    ours, tv, images, image_sizes, features, targets = _setup(5)
    ours, tv = ours.cuda().train(), tv.cuda().train()
    images = images.cuda()
    features = OrderedDict((k, v.cuda()) for k, v in features.items())
    targets = [{"boxes": t["boxes"].cuda()} for t in targets]
    torch.manual_seed(11)
    ref_boxes, ref_losses = tv(ImageList(images, image_sizes), features, targets)
    torch.manual_seed(11)  # seeds the CUDA generator too: the sampler draws on the labels' device
    boxes, losses = ours(images, image_sizes, features, targets)
    for b, rb in zip(boxes, ref_boxes):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b, rb, rtol=0, atol=0)
    for k in losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-6, atol=1e-7)

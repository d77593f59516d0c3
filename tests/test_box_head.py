"""Fast R-CNN box head against torchvision 0.29 (roi_heads.py, faster_rcnn.py) and by hand.

Layers: same state_dict keys, same outputs after load_state_dict. Targets: the same sampled RoIs,
labels, matched indices and regression targets as ``RoIHeads.select_training_samples`` after
the same ``torch.manual_seed`` (an image without gt included). Loss: ``fastrcnn_loss`` and a
2-RoI case computed by hand. Detections: ``RoIHeads.postprocess_detections`` at two score
thresholds, and a hand case for per-class NMS.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import faster_rcnn as tv_frcnn
from torchvision.models.detection import roi_heads as tv_roi_heads

from mrcnn_edu.boxes import BoxCoder
from mrcnn_edu.heads import (
    ConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
    box_loss,
    label_proposals,
    postprocess_detections,
    sample_proposals,
)
from mrcnn_edu.matching import BalancedSampler, Matcher


def _tv_roi_heads(score_thresh=0.05, batch_size=512, fraction=0.25, detections=100):
    """torchvision's RoIHeads with the standard Mask R-CNN arguments (no pooler/head needed
    for select_training_samples and postprocess_detections)."""
    return tv_roi_heads.RoIHeads(
        None, None, None, 0.5, 0.5, batch_size, fraction, None, score_thresh, 0.5, detections
    )


def _assert_lists_equal(ours, ref, what):
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}[{i}]: {a.shape} vs {b.shape}"
        assert torch.equal(a, b), f"{what}[{i}] differs"


# ------------------------------------------------------------------------------------ layers
def test_two_mlp_head_equals_torchvision():
    torch.manual_seed(0)
    tv = tv_frcnn.TwoMLPHead(8 * 7 * 7, 32)
    ours = TwoMLPHead(8 * 7 * 7, 32)
    assert (
        list(ours.state_dict())
        == list(tv.state_dict())
        == ["fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"]
    )
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(5, 8, 7, 7)
    out = ours(x)
    assert out.shape == (5, 32) and (out >= 0).all()
    assert torch.equal(out, tv(x))
    assert ours(x[:0]).shape == (0, 32)  # an image without RoIs
    with pytest.raises(ValueError, match=r"TwoMLPHead: .*C\*h\*w = in_channels = 392"):
        ours(torch.randn(5, 8, 6, 6))


@pytest.mark.parametrize("norm", ["bn", None])
def test_conv_fc_head_keys_and_outputs_equal_torchvision(norm):
    torch.manual_seed(1)
    tv = tv_frcnn.FastRCNNConvFCHead(
        (6, 7, 7), [5, 4], [16, 12], norm_layer=nn.BatchNorm2d if norm else None
    )
    ours = ConvFCHead(6, resolution=7, conv_dims=(5, 4), fc_dims=(16, 12), norm=norm)
    assert list(ours.state_dict()) == list(tv.state_dict())
    for k, v in ours.state_dict().items():
        assert v.shape == tv.state_dict()[k].shape, k
    keys = list(ours.state_dict())
    if norm:  # conv without bias, then BatchNorm
        assert keys[:3] == ["0.0.weight", "0.1.weight", "0.1.bias"] and "0.0.bias" not in keys
    else:
        assert keys[:2] == ["0.0.weight", "0.0.bias"]
    assert "3.weight" in keys and "5.weight" in keys  # Flatten at 2, Linear at 3 and 5
    assert ours.out_channels == 12
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(3, 6, 7, 7)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(tv, mode)()
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ConvFCHead: expected \[K, 6, 7, 7\]"):
        ours(torch.randn(3, 6, 5, 5))
    with pytest.raises(ValueError, match="norm must be 'bn' or None"):
        ConvFCHead(6, norm="gn")


def test_conv_fc_head_v2_sizes_and_init():
    torch.manual_seed(0)
    head = ConvFCHead(256)  # the v2 head: 4 x (conv 256 + BN), 1 x fc 1024
    tv = tv_frcnn.FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)
    assert list(head.state_dict()) == list(tv.state_dict())
    conv = head[0][0]
    # kaiming_normal_, fan_out, relu: std = sqrt(2 / (256 * 3 * 3))
    assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / (256 * 9))) < 0.002
    assert conv.bias is None


def test_predictor_equals_torchvision():
    torch.manual_seed(2)
    tv = tv_frcnn.FastRCNNPredictor(16, 4)
    ours = FastRCNNPredictor(16, 4)
    assert (
        list(ours.state_dict())
        == list(tv.state_dict())
        == ["cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias"]
    )
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(6, 16)
    (s, d), (rs, rd) = ours(x), tv(x)
    assert s.shape == (6, 4) and d.shape == (6, 16)
    assert torch.equal(s, rs) and torch.equal(d, rd)
    s4, d4 = ours(x[:, :, None, None])  # [K, D, 1, 1] is accepted, as torchvision
    assert torch.equal(s4, s) and torch.equal(d4, d)
    with pytest.raises(ValueError, match=r"FastRCNNPredictor: expected \[K, 16\]"):
        ours(torch.randn(6, 16, 2, 2))


# ----------------------------------------------------------------------------------- targets
def _random_image(g, num_gt, num_props, size=(120, 160), classes=5):
    h, w = size
    xy = torch.rand(num_gt, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 10 + torch.rand(num_gt, 2, generator=g) * 30
    gt = torch.cat([xy, xy + wh], dim=1)
    labels = torch.randint(1, classes, (num_gt,), generator=g)
    props = []
    if num_gt:  # jittered copies of the gt boxes: many positives
        src = gt[torch.randint(0, num_gt, (num_props // 2,), generator=g)]
        jitter = (torch.rand(src.shape, generator=g) - 0.5) * 12
        props.append(src + jitter)
    n_rand = num_props - sum(len(p) for p in props)
    xy = torch.rand(n_rand, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 4 + torch.rand(n_rand, 2, generator=g) * 40
    props.append(torch.cat([xy, xy + wh], dim=1))
    return torch.cat(props), gt, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_sample_proposals_equals_torchvision(seed):
    g = torch.Generator().manual_seed(100 + seed)
    images = [_random_image(g, 6, 900), _random_image(g, 2, 30), _random_image(g, 0, 40)]
    proposals = [p for p, _, _ in images]
    gt_boxes = [b for _, b, _ in images]
    gt_labels = [lab for _, _, lab in images]

    torch.manual_seed(seed)
    ours = sample_proposals(
        proposals,
        gt_boxes,
        gt_labels,
        Matcher(0.5, 0.5),
        BalancedSampler(512, 0.25),
        BoxCoder((10.0, 10.0, 5.0, 5.0)),
    )
    torch.manual_seed(seed)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(gt_boxes, gt_labels)]
    ref = _tv_roi_heads().select_training_samples([p.clone() for p in proposals], targets)
    for what, a, b in zip(("proposals", "matched_idxs", "labels", "regression_targets"), ours, ref):
        _assert_lists_equal(a, b, what)

    props, matched, labels, reg = ours
    # the sampling bit: image 0 has > 128 positives and > 384 negatives -> exactly 128 + 384
    assert (labels[0] > 0).sum() == 128 and (labels[0] == 0).sum() == 384
    # image 1 keeps every proposal (32 < 512); image 2 (no gt) is all background
    assert len(labels[1]) == 30 + 2 and (labels[2] == 0).all() and len(labels[2]) == 40
    # no gt: every RoI "matches" a zero box, so t_w = t_h = 5 log(0 / w) = -inf, as in
    # torchvision; the loss only reads positives' targets
    assert (matched[2] == 0).all() and (reg[2][:, 2:] == -math.inf).all()
    # the defaults are the standard arguments
    torch.manual_seed(seed)
    for a, b in zip(sample_proposals(proposals, gt_boxes, gt_labels), ours):
        _assert_lists_equal(a, b, "defaults")
    # the positives' targets decode back onto their gt boxes
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    for i in (0, 1):
        pos = labels[i] > 0
        decoded = coder.decode(reg[i][pos], props[i][pos])
        torch.testing.assert_close(decoded, gt_boxes[i][matched[i][pos]], atol=1e-3, rtol=0)
        assert torch.equal(labels[i][pos], gt_labels[i][matched[i][pos]])


def test_sample_proposals_generator_is_reproducible_and_leaves_global_rng_alone():
    g = torch.Generator().manual_seed(5)
    props, gt, lab = _random_image(g, 4, 700)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = sample_proposals([props], [gt], [lab], generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(1), before)  # the global RNG was not touched
    b = sample_proposals([props], [gt], [lab], generator=torch.Generator().manual_seed(3))
    for x, y in zip(a, b):
        _assert_lists_equal(x, y, "generator")


def test_label_proposals_hand_example():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    gt_labels = torch.tensor([3, 7])
    props = torch.tensor(
        [
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with gt 0: foreground (>= 0.5), class 3
            [0.0, 0.0, 10.0, 4.0],  # IoU 0.4: background
            [21.0, 20.0, 30.0, 30.0],  # IoU 0.9 with gt 1: class 7
            [50.0, 50.0, 60.0, 60.0],  # no overlap: background
        ]
    )
    matched, labels = label_proposals(props, gt, gt_labels, Matcher(0.5, 0.5))
    assert matched.tolist() == [0, 0, 1, 0]  # clamped: background points at gt 0
    assert labels.tolist() == [3, 0, 7, 0] and labels.dtype == torch.int64
    # an in-between band (0.3 .. 0.5) gives -1, which the sampler never draws
    _, labels = label_proposals(props, gt, gt_labels, Matcher(0.5, 0.3))
    assert labels.tolist() == [3, -1, 7, 0]
    matched, labels = label_proposals(props, gt[:0], gt_labels[:0], Matcher(0.5, 0.5))
    assert matched.tolist() == [0, 0, 0, 0] and labels.tolist() == [0, 0, 0, 0]


def test_sample_proposals_errors():
    p, b, lab = torch.rand(3, 4), torch.rand(2, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"sample_proposals: got 2 images of proposals, 1"):
        sample_proposals([p, p], [b], [lab])
    with pytest.raises(ValueError, match=r"sample_proposals: gt_boxes\[0\] must be \[N, 4\]"):
        sample_proposals([p], [torch.rand(2, 5)], [lab])
    with pytest.raises(ValueError, match=r"gt_labels\[0\] must be \[G\] with G = 2"):
        sample_proposals([p], [b], [torch.tensor([1])])
    with pytest.raises(TypeError, match=r"gt_labels\[0\] must be an integer tensor"):
        sample_proposals([p], [b], [torch.tensor([1.0, 2.0])])
    with pytest.raises(TypeError, match=r"proposals\[0\] must be floating point"):
        sample_proposals([torch.ones(3, 4, dtype=torch.int64)], [b], [lab])
    assert sample_proposals([], [], []) == ([], [], [], [])


# -------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("seed", [0, 1])
def test_box_loss_equals_fastrcnn_loss(seed):
    g = torch.Generator().manual_seed(seed)
    C1 = 6  # classes including background
    labels = [torch.randint(0, C1, (n,), generator=g) for n in (20, 0, 13)]
    targets = [torch.randn(len(lab), 4, generator=g) for lab in labels]
    logits = torch.randn(33, C1, generator=g, requires_grad=True)
    deltas = torch.randn(33, 4 * C1, generator=g, requires_grad=True)
    ours = box_loss(logits, deltas, labels, targets)
    ref = tv_roi_heads.fastrcnn_loss(logits, deltas, labels, targets)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    ga = torch.autograd.grad(sum(ours), (logits, deltas))
    gb = torch.autograd.grad(sum(ref), (logits, deltas))
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)
    # tensors instead of lists give the same
    same = box_loss(logits, deltas, torch.cat(labels), torch.cat(targets))
    assert all(torch.equal(a, b) for a, b in zip(same, ours))


def test_box_loss_hand_computed():
    # 2 RoIs, 3 classes (0 = background). RoI 0 is class 2, RoI 1 background.
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    deltas = torch.zeros(2, 12)
    deltas[0, 8:12] = torch.tensor([0.05, -0.2, 1.0, 0.0])  # class 2's deltas of RoI 0
    deltas[0, 4:8] = 100.0  # another class's deltas: never looked at
    deltas[1] = 50.0  # a background RoI's deltas: never looked at
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.5], [9.0, 9.0, 9.0, 9.0]])
    labels = torch.tensor([2, 0])
    loss_cls, loss_reg = box_loss(logits, deltas, labels, targets)

    # cross-entropy: -log softmax at the label, averaged over the 2 RoIs
    ce0 = -(2.0 - math.log(math.exp(0) + math.exp(1) + math.exp(2)))
    ce1 = -(1.0 - math.log(math.exp(1) + 2 * math.exp(0)))
    assert math.isclose(loss_cls.item(), (ce0 + ce1) / 2, rel_tol=1e-6)

    # smooth L1 with beta = 1/9: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta
    beta = 1 / 9

    def sl1(d):
        return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta

    diffs = [0.05 - 0.0, -0.2 - 0.0, 1.0 - 0.0, 0.0 - 0.5]
    expected = sum(sl1(d) for d in diffs) / 2  # summed over the positive, divided by 2 RoIs
    assert math.isclose(loss_reg.item(), expected, rel_tol=1e-6)


def test_box_loss_empty_cases_and_errors():
    logits = torch.randn(4, 3, requires_grad=True)
    deltas = torch.randn(4, 12, requires_grad=True)
    cls, reg = box_loss(logits, deltas, torch.zeros(4, dtype=torch.int64), torch.zeros(4, 4))
    assert reg.item() == 0.0 and cls.item() > 0  # no positives: only classification
    reg.backward(retain_graph=True)
    cls, reg = box_loss(
        logits[:0], deltas[:0], [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 4)]
    )
    assert cls.item() == 0.0 and reg.item() == 0.0
    (cls + reg).backward()
    assert logits.grad is not None
    with pytest.raises(ValueError, match=r"box_loss: box_regression must be \(4, 12\)"):
        box_loss(logits, deltas[:, :8], torch.zeros(4, dtype=torch.int64), torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"box_loss: labels must be \(4,\)"):
        box_loss(logits, deltas, torch.zeros(3, dtype=torch.int64), torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        box_loss(logits, deltas, torch.tensor([0, 1, 3, 0]), torch.zeros(4, 4))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        box_loss(logits, deltas, torch.zeros(4), torch.zeros(4, 4))


# -------------------------------------------------------------------------------- detections
def _detection_inputs(seed, counts, C1=5):
    g = torch.Generator().manual_seed(seed)
    sizes = [(90, 120), (64, 64), (100, 80)][: len(counts)]
    proposals = []
    for n, (h, w) in zip(counts, sizes):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) - 10  # some off the image
        wh = 1 + torch.rand(n, 2, generator=g) * 50
        proposals.append(torch.cat([xy, xy + wh], dim=1))
    K = sum(counts)
    logits = torch.randn(K, C1, generator=g) * 2
    deltas = torch.randn(K, 4 * C1, generator=g) * 0.6
    deltas[:3] = 30.0  # huge dw, dh: clamped by bbox_xform_clip, then clipped to the image
    return logits, deltas, proposals, sizes


@pytest.mark.parametrize("score_thresh", [0.0, 0.05])
@pytest.mark.parametrize("counts", [(60, 0, 45), (400, 30)])
def test_postprocess_equals_torchvision(score_thresh, counts):
    # (400, 30) with score_thresh 0: 1600 candidates in image 0, above the 4000 coordinates at
    # which torchvision's batched_nms switches from the offset trick to a loop over classes
    logits, deltas, proposals, sizes = _detection_inputs(len(counts), counts)
    ours = postprocess_detections(logits, deltas, proposals, sizes, score_thresh=score_thresh)
    ref = _tv_roi_heads(score_thresh=score_thresh).postprocess_detections(
        logits, deltas, proposals, sizes
    )
    for what, a, b in zip(("boxes", "scores", "labels"), ours, ref):
        _assert_lists_equal(a, b, what)
    boxes, scores, labels = ours
    assert len(boxes[0]) == 100  # detections_per_img bites
    for b, s, lab, (h, w) in zip(boxes, scores, labels, sizes):
        assert (lab >= 1).all() and (s > score_thresh).all()
        assert (s[:-1] >= s[1:]).all()  # best first
        assert (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all() and (b >= 0).all()


def test_postprocess_hand_example():
    # 3 RoIs, classes {0 background, 1, 2}; zero deltas decode to the RoI itself
    proposals = [
        torch.tensor([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [0.0, 0.0, 0.2, 30.0]])
    ]
    logits = torch.tensor(
        [
            [0.0, 5.0, 4.9],  # class 1: 0.523, class 2 close: 0.473
            [0.0, 0.0, -9.0],  # class 1: 0.5 < 0.523, overlaps RoI 0 (IoU 0.905): suppressed
            [0.0, 5.0, -9.0],  # 0.2 px wide: survives the 1e-2 size limit
        ]
    )
    deltas = torch.zeros(3, 12)
    boxes, scores, labels = postprocess_detections(
        logits, deltas, proposals, [(100, 100)], score_thresh=0.05
    )
    p = F.softmax(logits, dim=1)
    # kept: RoI 2 class 1, RoI 0 class 1, RoI 0 class 2 (another class: never suppressed by
    # class 1); RoI 1 class 1 is suppressed by RoI 0 class 1; class-2 scores of RoIs 1, 2 < 0.05
    assert labels[0].tolist() == [1, 1, 2]
    torch.testing.assert_close(scores[0], torch.stack([p[2, 1], p[0, 1], p[0, 2]]))
    torch.testing.assert_close(boxes[0], proposals[0][[2, 0, 0]])
    # min_size 0.5 removes the thin box
    _, _, labels = postprocess_detections(logits, deltas, proposals, [(100, 100)], min_size=0.5)
    assert labels[0].tolist() == [1, 2]


def test_postprocess_errors_and_empty():
    logits, deltas, proposals, sizes = _detection_inputs(0, (5, 4))
    with pytest.raises(ValueError, match="class_logits has 9 rows but the proposals hold 5"):
        postprocess_detections(logits, deltas, proposals[:1], sizes[:1])
    with pytest.raises(ValueError, match=r"box_regression must be \(9, 20\)"):
        postprocess_detections(logits, deltas[:, :8], proposals, sizes)
    with pytest.raises(ValueError, match="1 image sizes for 2 images"):
        postprocess_detections(logits, deltas, proposals, sizes[:1])
    boxes, scores, labels = postprocess_detections(
        logits[:0], deltas[:0], [torch.zeros(0, 4)], [(10, 10)]
    )
    assert boxes[0].shape == (0, 4) and scores[0].shape == (0,) and labels[0].shape == (0,)

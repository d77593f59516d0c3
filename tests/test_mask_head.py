"""Mask head against torchvision 0.29 (mask_rcnn.py, roi_heads.py), by hand and by gradcheck.

Layers: state_dict keys and outputs of ``MaskRCNNHeads`` / ``MaskRCNNPredictor``. Targets:
``project_masks_on_boxes`` and two hand-drawn cases (the half-pixel offset of aligned=False).
Losses: ``maskrcnn_loss`` for "sigmoid"; "softmax" and "agnostic" against per-pixel formulas
written out here; gradients by finite differences. Inference: ``maskrcnn_inference``.
Pasting: ``paste_masks_in_image`` bit for bit, boxes partly outside the image included.
"""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection import roi_heads as tv_roi_heads

from mrcnn_edu.heads import (
    MaskHead,
    MaskPredictor,
    mask_inference,
    mask_loss,
    mask_targets,
    paste_masks_in_image,
)


# ------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("norm,dilation", [(None, 1), ("bn", 1), (None, 2)])
def test_mask_head_keys_and_outputs_equal_torchvision(norm, dilation):
    torch.manual_seed(0)
    tv = tv_mask_rcnn.MaskRCNNHeads(
        6, [5, 4, 3], dilation, norm_layer=nn.BatchNorm2d if norm else None
    )
    ours = MaskHead(6, layers=(5, 4, 3), dilation=dilation, norm=norm)
    assert list(ours.state_dict()) == list(tv.state_dict())
    keys = list(ours.state_dict())
    if norm:
        assert keys[:3] == ["0.0.weight", "0.1.weight", "0.1.bias"] and "0.0.bias" not in keys
    else:
        assert keys == [f"{i}.0.{k}" for i in range(3) for k in ("weight", "bias")]
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 6, 14, 14)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(tv, mode)()
        out = ours(x)
        assert out.shape == (2, 3, 14, 14)
        assert torch.equal(out, tv(x))
    with pytest.raises(ValueError, match=r"MaskHead: expected \[K, 6, h, w\]"):
        ours(torch.randn(2, 5, 14, 14))
    with pytest.raises(ValueError, match="norm must be 'bn' or None"):
        MaskHead(6, norm="gn")


def test_mask_head_init_and_pre_0_12_checkpoint():
    torch.manual_seed(0)
    head = MaskHead(256)  # the paper's 4 x conv 256
    for i in range(4):
        conv = head[i][0]
        # kaiming_normal_, fan_out, relu: std = sqrt(2 / (256 * 3 * 3))
        assert abs(float(conv.weight.detach().std()) - (2 / (256 * 9)) ** 0.5) < 0.002
        assert torch.equal(conv.bias, torch.zeros(256))
    small = MaskHead(4, (3, 3))
    # an old checkpoint names the convs mask_fcn1, mask_fcn2 and carries no version metadata
    old = OrderedDict(
        (k.replace(f"{i}.0.", f"mask_fcn{i + 1}."), v + 1)
        for i in range(2)
        for k, v in small.state_dict().items()
        if k.startswith(f"{i}.0.")
    )
    fresh = MaskHead(4, (3, 3))
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh[1][0].weight, small[1][0].weight + 1)
    tv = tv_mask_rcnn.MaskRCNNHeads(4, [3, 3], 1)
    tv.load_state_dict(OrderedDict(old))  # torchvision reads it the same way
    assert torch.equal(tv[1][0].bias, fresh[1][0].bias)


def test_mask_predictor_equals_torchvision():
    torch.manual_seed(1)
    tv = tv_mask_rcnn.MaskRCNNPredictor(6, 5, 4)
    ours = MaskPredictor(6, 5, 4)
    assert (
        list(ours.state_dict())
        == list(tv.state_dict())
        == [
            "conv5_mask.weight",
            "conv5_mask.bias",
            "mask_fcn_logits.weight",
            "mask_fcn_logits.bias",
        ]
    )
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(3, 6, 14, 14)
    out = ours(x)
    assert out.shape == (3, 4, 28, 28)  # the 2x2 stride-2 deconvolution doubles the size
    assert torch.equal(out, tv(x))
    with pytest.raises(ValueError, match=r"MaskPredictor: expected \[K, 6, h, w\]"):
        ours(torch.randn(3, 6, 14))


# ----------------------------------------------------------------------------------- targets
def _blobs(g, G, H, W):
    """G random rectangles-with-holes as uint8 masks [G, H, W]."""
    masks = torch.zeros(G, H, W, dtype=torch.uint8)
    for i in range(G):
        x0, y0 = (
            int(torch.randint(0, W // 2, (1,), generator=g)),
            int(torch.randint(0, H // 2, (1,), generator=g)),
        )
        masks[i, y0 : y0 + H // 2, x0 : x0 + W // 2] = 1
        masks[i] &= (torch.rand(H, W, generator=g) > 0.2).to(torch.uint8)
    return masks


def _boxes(g, n, H, W):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W, H]) - 5  # some start outside
    wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([W, H]) * 0.6
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("M", [28, 7])
def test_mask_targets_equal_project_masks_on_boxes(M):
    g = torch.Generator().manual_seed(M)
    masks = _blobs(g, 3, 40, 50)
    boxes = _boxes(g, 9, 40, 50)
    idx = torch.randint(0, 3, (9,), generator=g)
    ref = tv_roi_heads.project_masks_on_boxes(masks, boxes, idx, M)
    ours = mask_targets(masks, boxes, idx, M)
    assert ours.shape == (9, M, M) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)  # the Numba kernel sums the samples in torchvision's order
    assert torch.equal(mask_targets(masks, boxes, idx, M, backend="torchvision"), ref)
    assert torch.equal(mask_targets(masks.bool(), boxes, idx, M, backend="torchvision"), ref)


def test_mask_targets_hand_drawn_right_half():
    # a 28 x 28 image whose gt mask is its right half: pixel columns 14..27
    gt = torch.zeros(1, 28, 28, dtype=torch.uint8)
    gt[0, :, 14:] = 1
    want = torch.zeros(28, 28)
    want[:, 14:] = 1.0

    # aligned=False samples bin p of a 28-px box starting at x1 at x1 + p + 0.5, and reads pixel
    # i at coordinate i. A proposal covering pixels 0..27 as [-0.5, 27.5] puts every sample
    # exactly on a pixel: the target is the right half, columns 14..27 = 1, 0..13 = 0.
    box = torch.tensor([[-0.5, -0.5, 27.5, 27.5]])
    for out in (
        mask_targets(gt, box, torch.tensor([0])),
        tv_roi_heads.project_masks_on_boxes(gt, box, torch.tensor([0]), 28),
    ):
        assert torch.equal(out[0], want)

    # the same pixels as the box [0, 28] (pixel i covering [i, i+1]) is the half-pixel
    # misalignment of aligned=False: column 13 samples x = 13.5, half way between pixels 13
    # (0) and 14 (1); column 27 samples 27.5, past the last pixel, which clamps to pixel 27
    box = torch.tensor([[0.0, 0.0, 28.0, 28.0]])
    shifted = want.clone()
    shifted[:, 13] = 0.5
    for out in (
        mask_targets(gt, box, torch.tensor([0])),
        tv_roi_heads.project_masks_on_boxes(gt, box, torch.tensor([0]), 28),
    ):
        assert torch.equal(out[0], shifted)


def test_mask_targets_errors_and_empty():
    masks = torch.zeros(2, 10, 10, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    assert mask_targets(masks, boxes[:0], torch.zeros(0, dtype=torch.int64)).shape == (0, 28, 28)
    with pytest.raises(ValueError, match=r"mask_targets: matched_idxs must lie in \[0, G\)"):
        mask_targets(masks, boxes, torch.tensor([2]))
    with pytest.raises(ValueError, match=r"mask_targets: gt_masks must be \[G, H, W\]"):
        mask_targets(masks[0], boxes, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"matched_idxs must be \[P\] = \[1\]"):
        mask_targets(masks, boxes, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="matched_idxs must be an integer tensor"):
        mask_targets(masks, boxes, torch.tensor([0.0]))


# -------------------------------------------------------------------------------------- loss
def _loss_inputs(seed, counts=(4, 0, 3), C=5, M=14):
    g = torch.Generator().manual_seed(seed)
    sizes = [(30, 40), (20, 20), (36, 28)]
    proposals, gt_masks, gt_labels, matched = [], [], [], []
    for n, (h, w) in zip(counts, sizes):
        G = 3
        gt_masks.append(_blobs(g, G, h, w))
        gt_labels.append(torch.randint(1, C, (G,), generator=g))
        proposals.append(_boxes(g, n, h, w))
        matched.append(torch.randint(0, G, (n,), generator=g))
    logits = torch.randn(sum(counts), C, M, M, generator=g, requires_grad=True)
    return logits, proposals, gt_masks, gt_labels, matched


@pytest.mark.parametrize("seed", [0, 1])
def test_sigmoid_loss_equals_maskrcnn_loss(seed):
    logits, proposals, gt_masks, gt_labels, matched = _loss_inputs(seed)
    ours = mask_loss(logits, proposals, gt_masks, gt_labels, matched)
    ref = tv_roi_heads.maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    torch.testing.assert_close(ours, ref)
    (ga,) = torch.autograd.grad(ours, logits)
    (gb,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ga, gb)
    # only the gt class's channel gets a gradient
    labels = torch.cat([lab[i] for lab, i in zip(gt_labels, matched)])
    touched = ga.abs().flatten(2).sum(-1) > 0  # [P, C]
    assert torch.equal(touched, F.one_hot(labels, 5).bool())


def _two_roi_case():
    """Two RoIs on an 8 x 8 image whose targets are exact 0/1 (boxes on pixel centres, M = 8):
    RoI 0 -> gt 0 = right half (columns 4..7), class 2; RoI 1 -> gt 1 = top half, class 1."""
    gt = torch.zeros(2, 8, 8, dtype=torch.uint8)
    gt[0, :, 4:] = 1
    gt[1, :4, :] = 1
    box = [-0.5, -0.5, 7.5, 7.5]
    proposals = [torch.tensor([box, box], dtype=torch.float64)]
    targets = torch.zeros(2, 8, 8, dtype=torch.float64)
    targets[0, :, 4:] = 1
    targets[1, :4, :] = 1
    return proposals, [gt], [torch.tensor([2, 1])], [torch.tensor([0, 1])], targets


def _bce(x, t):
    """Per-pixel binary cross-entropy with logits, the stable closed form."""
    return torch.clamp(x, min=0) - x * t + torch.log1p(torch.exp(-x.abs()))


def test_three_modes_hand_computed():
    proposals, gt_masks, gt_labels, matched, targets = _two_roi_case()
    assert torch.equal(mask_targets(gt_masks[0], proposals[0], matched[0], 8), targets)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)

    # sigmoid: BCE on channel 2 for RoI 0 and channel 1 for RoI 1, mean over 2 * 64 pixels
    want = torch.cat([_bce(logits[0, 2], targets[0]), _bce(logits[1, 1], targets[1])]).mean()
    got = mask_loss(logits, proposals, gt_masks, gt_labels, matched, mode="sigmoid")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        got, tv_roi_heads.maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    )

    # softmax: per pixel class 2 (RoI 0) or 1 (RoI 1) inside the mask, 0 outside;
    # loss = logsumexp over the 3 channels - logit of the pixel's class, mean over 128 pixels
    classes = torch.stack([2 * (targets[0] > 0.5), 1 * (targets[1] > 0.5)]).long()  # [2, 8, 8]
    picked = logits.gather(1, classes[:, None])[:, 0]  # [2, 8, 8]
    want = (torch.logsumexp(logits, dim=1) - picked).mean()
    got = mask_loss(logits, proposals, gt_masks, gt_labels, matched, mode="softmax")
    torch.testing.assert_close(got, want)

    # agnostic: one channel for both RoIs, whatever their class
    agn = logits[:, :1]
    want = torch.cat([_bce(agn[0, 0], targets[0]), _bce(agn[1, 0], targets[1])]).mean()
    got = mask_loss(agn, proposals, gt_masks, gt_labels, matched, mode="agnostic")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax", "agnostic"])
def test_mask_loss_gradcheck(mode):
    g = torch.Generator().manual_seed(3)
    gt_masks = [_blobs(g, 2, 6, 6)]
    proposals = [torch.tensor([[0.0, 0.5, 5.0, 6.0], [1.0, 1.0, 4.5, 3.5]], dtype=torch.float64)]
    gt_labels, matched = [torch.tensor([1, 2])], [torch.tensor([1, 0])]
    C = 1 if mode == "agnostic" else 3
    logits = torch.randn(2, C, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x):
        return mask_loss(x, proposals, gt_masks, gt_labels, matched, mode=mode)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["sigmoid", "softmax", "agnostic"])
def test_mask_loss_no_positives(mode):
    C = 1 if mode == "agnostic" else 4
    logits = torch.randn(0, C, 28, 28, requires_grad=True)
    loss = mask_loss(
        logits,
        [torch.zeros(0, 4)],
        [torch.zeros(0, 9, 9, dtype=torch.uint8)],
        [torch.zeros(0, dtype=torch.int64)],
        [torch.zeros(0, dtype=torch.int64)],
        mode=mode,
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    ref = tv_roi_heads.maskrcnn_loss(
        logits,
        [torch.zeros(0, 4)],
        [torch.zeros(0, 9, 9, dtype=torch.uint8)],
        [torch.zeros(0, dtype=torch.int64)],
        [torch.zeros(0, dtype=torch.int64)],
    )
    assert ref.item() == 0.0


def test_mask_loss_errors():
    logits, proposals, gt_masks, gt_labels, matched = _loss_inputs(0)
    with pytest.raises(ValueError, match=r"mask_loss: mode must be one of \('sigmoid'"):
        mask_loss(logits, proposals, gt_masks, gt_labels, matched, mode="multinomial")
    with pytest.raises(ValueError, match=r"mode='agnostic' needs one mask channel"):
        mask_loss(logits, proposals, gt_masks, gt_labels, matched, mode="agnostic")
    with pytest.raises(ValueError, match="mask_logits has 6 rows but the proposals hold 7"):
        mask_loss(logits[:6], proposals, gt_masks, gt_labels, matched)
    with pytest.raises(ValueError, match=r"labels must lie in \[1, 2\)"):
        mask_loss(logits[:, :2], proposals, gt_masks, gt_labels, matched)
    with pytest.raises(ValueError, match=r"mask_logits must be square"):
        mask_loss(logits[..., :5], proposals, gt_masks, gt_labels, matched)
    with pytest.raises(ValueError, match="got 3 images of proposals, 2 of gt_masks"):
        mask_loss(logits, proposals, gt_masks[:2], gt_labels, matched)


# --------------------------------------------------------------------------------- inference
def test_mask_inference_three_modes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 6, 6, generator=g)
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.int64), torch.tensor([2, 2, 1])]
    ours = mask_inference(logits, labels)
    ref = tv_roi_heads.maskrcnn_inference(logits, labels)
    assert [tuple(o.shape) for o in ours] == [(2, 1, 6, 6), (0, 1, 6, 6), (3, 1, 6, 6)]
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    flat = torch.cat(labels)
    soft = torch.cat(mask_inference(logits, labels, mode="softmax"))
    for d in range(5):
        want = torch.exp(logits[d, flat[d]]) / torch.exp(logits[d]).sum(0)
        torch.testing.assert_close(soft[d, 0], want)
    agn = torch.cat(mask_inference(logits[:, :1], labels, mode="agnostic"))
    assert torch.equal(agn, torch.sigmoid(logits[:, :1]))
    with pytest.raises(ValueError, match="mask_inference: mask_logits has 5 rows but labels"):
        mask_inference(logits, labels[:2])
    with pytest.raises(ValueError, match=r"labels must lie in \[1, 4\)"):
        mask_inference(logits, [torch.tensor([1, 4, 1, 1, 1])])


# ----------------------------------------------------------------------------------- pasting
@pytest.mark.parametrize("padding", [1, 0, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_paste_masks_bit_equal_torchvision(seed, padding):
    g = torch.Generator().manual_seed(seed)
    h, w = 60, 80
    N = 12
    masks = torch.rand(N, 1, 28, 28, generator=g)
    # x1 in [-20, w), width > 20: every box overlaps the image (torchvision fails on one
    # entirely outside, see below)
    xy = torch.rand(N, 2, generator=g) * torch.tensor([w + 20, h + 20]) - 20
    wh = 20.5 + torch.rand(N, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[0] = torch.tensor([-15.3, -7.8, 30.2, 20.9])  # off the top-left corner
    boxes[1] = torch.tensor([60.4, 40.1, 95.0, 75.5])  # off the bottom-right corner
    boxes[2] = torch.tensor([10.0, 10.0, 10.4, 10.2])  # smaller than a pixel
    ours = paste_masks_in_image(masks, boxes, (h, w), padding=padding)
    ref = tv_roi_heads.paste_masks_in_image(masks, boxes, (h, w), padding=padding)
    assert ours.shape == (N, 1, h, w) and ours.dtype == masks.dtype
    assert torch.equal(ours, ref)
    assert (ours[0, 0, 0, 0] > 0) and (ours[1, 0, -1, -1] > 0)  # the corners got pasted


def test_paste_hand_case_and_edges():
    # padding 0: a 1x1 mask of 0.7 in box (2, 3, 4, 5) fills pixels x 2..4, y 3..5 inclusive
    out = paste_masks_in_image(
        torch.full((1, 1, 1, 1), 0.7), torch.tensor([[2.0, 3.0, 4.0, 5.0]]), (8, 9), padding=0
    )
    want = torch.zeros(8, 9)
    want[3:6, 2:5] = 0.7
    assert torch.equal(out[0, 0], want)
    # truncation toward zero: -0.9 becomes 0, not -1
    out = paste_masks_in_image(
        torch.full((1, 1, 1, 1), 0.7), torch.tensor([[-0.9, -0.9, 1.0, 1.0]]), (4, 4), padding=0
    )
    assert out[0, 0, :2, :2].eq(0.7).all() and out[0, 0].gt(0).sum() == 4
    # a box entirely outside the image pastes nothing (torchvision raises on a box left of or
    # above the image: its slice end goes negative and wraps around)
    for box in ([50.0, 50.0, 70.0, 70.0], [-17.0, -18.0, -5.0, 24.0]):
        out = paste_masks_in_image(torch.ones(1, 1, 28, 28), torch.tensor([box]), (20, 30))
        assert out.shape == (1, 1, 20, 30) and (out == 0).all()
    with pytest.raises(RuntimeError):
        tv_roi_heads.paste_masks_in_image(
            torch.ones(1, 1, 28, 28), torch.tensor([[-17.0, -18.0, -5.0, 24.0]]), (20, 30)
        )
    empty = paste_masks_in_image(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (5, 6))
    assert empty.shape == (0, 1, 5, 6)
    with pytest.raises(ValueError, match=r"paste_masks_in_image: masks must be \[N, 1, M, M\]"):
        paste_masks_in_image(torch.zeros(2, 28, 28), torch.zeros(2, 4), (5, 6))
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\] = \[2, 4\]"):
        paste_masks_in_image(torch.zeros(2, 1, 28, 28), torch.zeros(3, 4), (5, 6))

"""Keypoint head against torchvision 0.29 (keypoint_rcnn.py, roi_heads.py), by hand, by gradcheck.

Layers: state_dict keys, same-seed init and outputs of ``KeypointRCNNHeads`` /
``KeypointRCNNPredictor``. Targets: ``keypoints_to_heatmap`` on random keypoints and on
hand-placed ones (on the RoI's right/bottom border, just outside it, invisible). Loss:
``keypointrcnn_loss`` bit for bit, a 1-RoI 2-keypoint case computed by hand, gradients by finite
differences. Inference: ``heatmaps_to_keypoints`` / ``keypointrcnn_inference`` bit for bit and a
round trip target -> one-hot heatmap -> keypoint. The options that are not torchvision's: the
sub-pixel decoding on heatmaps whose maximum is known exactly (quadratics), on borders and
saddles; the heatmap confidence against a loop over windows written out in numpy; the model's
keypoint rescoring against the plain model's outputs.
"""

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection import keypoint_rcnn as tv_keypoint_rcnn
from torchvision.models.detection import roi_heads as tv_roi_heads

from mrcnn_edu.heads import (
    KeypointHead,
    KeypointPredictor,
    heatmaps_to_keypoints,
    heatmaps_to_keypoints_subpixel,
    keypoint_confidence,
    keypoint_inference,
    keypoint_loss,
    keypoint_targets,
    one_hot_heatmaps,
)


# ------------------------------------------------------------------------------------ layers
def test_keypoint_head_keys_init_and_outputs_equal_torchvision():
    torch.manual_seed(0)
    tv = tv_keypoint_rcnn.KeypointRCNNHeads(6, (5, 4, 3))
    torch.manual_seed(0)
    ours = KeypointHead(6, layers=(5, 4, 3))
    # a flat conv, ReLU, conv, ReLU ... sequence: parameters at the even indices only
    assert (
        list(ours.state_dict())
        == list(tv.state_dict())
        == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    )
    # the same seed gives the same weights: convs created first, then re-initialised in order
    for (ka, a), (_kb, b) in zip(ours.state_dict().items(), tv.state_dict().items()):
        assert torch.equal(a, b), ka
    fresh = KeypointHead(6, layers=(5, 4, 3))
    fresh.load_state_dict(tv.state_dict())
    x = torch.randn(2, 6, 14, 14)
    out = fresh(x)
    assert out.shape == (2, 3, 14, 14) and fresh.out_channels == 3
    assert torch.equal(out, tv(x))
    assert fresh(torch.randn(0, 6, 14, 14)).shape == (0, 3, 14, 14)
    with pytest.raises(ValueError, match=r"KeypointHead: expected \[P, 6, h, w\] features"):
        fresh(torch.randn(2, 5, 14, 14))
    with pytest.raises(ValueError, match="KeypointHead: need in_channels > 0"):
        KeypointHead(6, layers=())


def test_keypoint_head_default_is_the_papers_eight_512_convs():
    torch.manual_seed(0)
    head = KeypointHead(256)
    tv = tv_keypoint_rcnn.KeypointRCNNHeads(256, tuple(512 for _ in range(8)))
    keys = list(head.state_dict())
    assert keys == list(tv.state_dict())
    assert keys[0] == "0.weight" and keys[-1] == "14.bias" and len(keys) == 16
    assert [tuple(v.shape) for v in head.state_dict().values()] == [
        tuple(v.shape) for v in tv.state_dict().values()
    ]
    conv = head[14]
    # kaiming_normal_, fan_out, relu: std = sqrt(2 / (512 * 3 * 3)); zero bias
    assert abs(float(conv.weight.detach().std()) - (2 / (512 * 9)) ** 0.5) < 0.001
    assert torch.equal(conv.bias, torch.zeros(512))


def test_keypoint_predictor_equals_torchvision():
    torch.manual_seed(1)
    tv = tv_keypoint_rcnn.KeypointRCNNPredictor(6, 4)
    torch.manual_seed(1)
    ours = KeypointPredictor(6, 4)
    assert (
        list(ours.state_dict())
        == list(tv.state_dict())
        == ["kps_score_lowres.weight", "kps_score_lowres.bias"]
    )
    assert torch.equal(ours.kps_score_lowres.weight, tv.kps_score_lowres.weight)
    assert torch.equal(ours.kps_score_lowres.bias, torch.zeros(4))
    fresh = KeypointPredictor(6, 4)
    fresh.load_state_dict(tv.state_dict())
    x = torch.randn(3, 6, 14, 14)
    out = fresh(x)
    # 14 -> deconv 4x4 stride 2 pad 1 -> 28 -> bilinear x2 -> 56
    assert out.shape == (3, 4, 56, 56) and fresh.up_scale == 2 and fresh.out_channels == 4
    assert torch.equal(out, tv(x))
    assert fresh(torch.randn(0, 6, 14, 14)).shape == (0, 4, 56, 56)
    with pytest.raises(ValueError, match=r"KeypointPredictor: expected \[P, 6, h, w\]"):
        fresh(torch.randn(3, 6, 14))
    with pytest.raises(ValueError, match="num_keypoints >= 1"):
        KeypointPredictor(6, 0)


# ----------------------------------------------------------------------------------- targets
def _rois(g, n, dtype=torch.float32):
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 50 - 5
    wh = 0.5 + torch.rand(n, 2, generator=g, dtype=dtype) * 40
    return torch.cat([xy, xy + wh], dim=1)


def _keypoints_around(g, rois, K, dtype=torch.float32):
    """[P, K, 3] keypoints in and around each RoI (a 20 % margin), visibility 0, 1 or 2, and a
    few exactly on the right / bottom border or the top-left corner."""
    P = rois.shape[0]
    u = torch.rand(P, K, 2, generator=g, dtype=dtype) * 1.4 - 0.2  # [-0.2, 1.2] of the size
    wh = (rois[:, 2:] - rois[:, :2])[:, None]  # [P, 1, 2]
    xy = rois[:, None, :2] + u * wh
    vis = torch.randint(0, 3, (P, K, 1), generator=g).to(dtype)
    kps = torch.cat([xy, vis], dim=2)
    centre = (rois[:, :2] + rois[:, 2:]) / 2  # [P, 2]
    kps[::3, 0, 0], kps[::3, 0, 1] = rois[::3, 2], centre[::3, 1]  # on the right border
    kps[1::3, 1, 0], kps[1::3, 1, 1] = centre[1::3, 0], rois[1::3, 3]  # on the bottom border
    kps[2::3, 2, :2] = rois[2::3, 2:]  # the bottom-right corner
    kps[::4, 3, :2] = rois[::4, :2]  # the top-left corner
    kps[:, :4, 2] = 2  # visible, so the border cases count
    return kps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [56, 7])
def test_keypoint_targets_equal_keypoints_to_heatmap(m, dtype):
    g = torch.Generator().manual_seed(m)
    rois = _rois(g, 40, dtype)
    kps = _keypoints_around(g, rois, 6, dtype)
    ref_index, ref_valid = tv_roi_heads.keypoints_to_heatmap(kps, rois, m)
    index, valid = keypoint_targets(kps, rois, m)
    assert index.dtype == torch.int64 and valid.dtype == torch.bool
    assert index.shape == valid.shape == (40, 6)
    assert torch.equal(valid, ref_valid.bool())
    assert torch.equal(index, ref_index)  # invalid pairs get index 0 in both
    assert 0 < int(valid.sum()) < valid.numel()
    assert (index[valid] < m * m).all() and (index[~valid] == 0).all()
    # every border keypoint set above is valid and lands in the last column / row
    assert (index[::3, 0] % m == m - 1).all() and (index[1::3, 1] // m == m - 1).all()
    assert (index[2::3, 2] == m * m - 1).all() and valid[2::3, 2].all()


def test_keypoint_targets_border_and_outside_by_hand():
    # RoI 20 px wide, 40 px tall, m = 4: a cell is 5 px wide and 10 px tall
    roi = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    cases = [  # (x, y, v) -> (valid, row, col)
        ((10.0, 20.0, 2), (True, 0, 0)),  # top-left corner: cell (0, 0)
        ((30.0, 60.0, 2), (True, 3, 3)),  # bottom-right corner: floor gives 4, clamped to 3
        ((30.0, 20.0, 1), (True, 0, 3)),  # on the right border (v = 1, labelled but occluded)
        ((12.0, 60.0, 2), (True, 3, 0)),  # on the bottom border
        ((29.99, 59.99, 2), (True, 3, 3)),  # just inside
        ((24.9, 39.0, 2), (True, 1, 2)),  # 14.9 / 5 = 2.98, 19 / 10 = 1.9
        ((9.99, 30.0, 2), (False, 0, 0)),  # just left of the RoI: column -1
        ((30.01, 30.0, 2), (False, 0, 0)),  # just right of it: column 4
        ((20.0, 60.5, 2), (False, 0, 0)),  # below it: row 4
        ((20.0, 19.0, 2), (False, 0, 0)),  # above it
        ((20.0, 30.0, 0), (False, 0, 0)),  # inside but not labelled
        ((float("nan"), 30.0, 2), (False, 0, 0)),  # not finite: invalid, no undefined cast
    ]
    kps = torch.tensor([[c[0] for c in cases]])  # [1, K, 3]
    index, valid = keypoint_targets(kps, roi, 4)
    want_valid = torch.tensor([[c[1][0] for c in cases]])
    want_index = torch.tensor([[c[1][1] * 4 + c[1][2] if c[1][0] else 0 for c in cases]])
    assert torch.equal(valid, want_valid)
    assert torch.equal(index, want_index)
    finite = slice(0, len(cases) - 1)  # torchvision casts NaN to int64 (undefined): skip it
    ref_index, ref_valid = tv_roi_heads.keypoints_to_heatmap(kps[:, finite], roi, 4)
    assert torch.equal(index[:, finite], ref_index) and torch.equal(
        valid[:, finite], ref_valid.bool()
    )
    # the one-hot masks: a single 1 at (row, col) for a valid keypoint, all zero otherwise
    hm = one_hot_heatmaps(index, valid, 4)
    assert hm.shape == (1, len(cases), 4, 4)
    assert torch.equal(hm.flatten(2).sum(-1), want_valid.float())
    assert hm[0, 1, 3, 3] == 1 and hm[0, 2, 0, 3] == 1 and hm[0, 5, 1, 2] == 1


def test_keypoint_targets_errors_and_empty():
    roi = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    kps = torch.zeros(1, 2, 3)
    index, valid = keypoint_targets(torch.zeros(0, 2, 3), torch.zeros(0, 4))
    assert index.shape == valid.shape == (0, 2)
    with pytest.raises(ValueError, match=r"keypoint_targets: rois\[0\] = .* is degenerate"):
        keypoint_targets(kps, torch.tensor([[0.0, 0.0, 0.0, 10.0]]))
    with pytest.raises(ValueError, match=r"keypoints must be \[P, K, 3\] = \[1, K, 3\]"):
        keypoint_targets(torch.zeros(1, 2, 2), roi)
    with pytest.raises(ValueError, match=r"keypoints must be \[P, K, 3\] = \[1, K, 3\]"):
        keypoint_targets(torch.zeros(2, 2, 3), roi)
    with pytest.raises(TypeError, match="keypoint_targets: keypoints must be floating point"):
        keypoint_targets(kps.long(), roi)
    with pytest.raises(ValueError, match=r"rois must be \[P, 4\]"):
        keypoint_targets(kps, roi[0])
    with pytest.raises(ValueError, match="heatmap_size must be positive"):
        keypoint_targets(kps, roi, 0)


# -------------------------------------------------------------------------------------- loss
def _loss_inputs(seed, counts=(5, 0, 3), K=4, m=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    proposals, gt_keypoints, matched = [], [], []
    for n in counts:
        G = 3
        gt_boxes = _rois(g, G, dtype)
        gt_keypoints.append(_keypoints_around(g, gt_boxes, K, dtype))
        idx = torch.randint(0, G, (n,), generator=g)
        # proposals: the matched gt box, jittered, so some keypoints fall outside
        jitter = (torch.rand(n, 4, generator=g, dtype=dtype) - 0.5) * 6
        boxes = gt_boxes[idx] + jitter
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
        proposals.append(boxes)
        matched.append(idx)
    logits = torch.randn(sum(counts), K, m, m, generator=g, dtype=dtype, requires_grad=True)
    return logits, proposals, gt_keypoints, matched


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keypoint_loss_equals_keypointrcnn_loss(seed):
    logits, proposals, gt_keypoints, matched = _loss_inputs(seed)
    ours = keypoint_loss(logits, proposals, gt_keypoints, matched)
    ref = tv_roi_heads.keypointrcnn_loss(logits, proposals, gt_keypoints, matched)
    # the same valid rows in the same order through the same cross_entropy: bit-equal
    assert torch.equal(ours, ref)
    (ga,) = torch.autograd.grad(ours, logits)
    (gb,) = torch.autograd.grad(ref, logits)
    assert torch.equal(ga, gb)
    # only valid (RoI, keypoint) heatmaps get a gradient, and each sums to 0 (a softmax's)
    valid = torch.cat(
        [keypoint_targets(k[i], p, 8)[1] for k, p, i in zip(gt_keypoints, proposals, matched)]
    )
    assert valid.any() and not valid.all()  # some keypoints invisible or outside their RoI
    touched = ga.abs().flatten(2).sum(-1) > 0  # [P, K]
    assert torch.equal(touched, valid)
    torch.testing.assert_close(ga.flatten(2).sum(-1), torch.zeros(8, 4), atol=1e-7, rtol=0)


def test_keypoint_loss_hand_computed_one_roi_two_keypoints():
    # one RoI [0, 0, 8, 8] with m = 4 (cells of 2 x 2 px), one gt person with 2 keypoints:
    #   keypoint 0 at (3, 5): col floor(3 / 2) = 1, row floor(5 / 2) = 2 -> index 2 * 4 + 1 = 9
    #   keypoint 1 at (8, 0): on the right border -> col 3, row 0 -> index 3
    roi = [torch.tensor([[0.0, 0.0, 8.0, 8.0]], dtype=torch.float64)]
    gt = [torch.tensor([[[3.0, 5.0, 2.0], [8.0, 0.0, 1.0]]], dtype=torch.float64)]
    matched = [torch.tensor([0])]
    index, valid = keypoint_targets(gt[0], roi[0], 4)
    assert index.tolist() == [[9, 3]] and valid.all()
    logits = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    logits[0, 0, 2, 1] = math.log(3.0)  # keypoint 0: its target pixel has logit ln 3
    logits[0, 1, 0, 0] = math.log(5.0)  # keypoint 1: another pixel has logit ln 5
    # CE_0 = log(15 e^0 + e^{ln 3}) - ln 3 = log(18 / 3) = ln 6
    # CE_1 = log(15 e^0 + e^{ln 5}) - 0 = ln 20
    want = (math.log(6.0) + math.log(20.0)) / 2
    got = keypoint_loss(logits, roi, gt, matched)
    assert abs(float(got) - want) < 1e-12
    assert torch.equal(got, tv_roi_heads.keypointrcnn_loss(logits, roi, gt, matched))
    # an invisible keypoint drops out of the mean: only CE_0 remains
    gt_hidden = [gt[0].clone()]
    gt_hidden[0][0, 1, 2] = 0
    assert abs(float(keypoint_loss(logits, roi, gt_hidden, matched)) - math.log(6.0)) < 1e-12


def test_keypoint_loss_gradcheck():
    logits, proposals, gt_keypoints, matched = _loss_inputs(
        3, counts=(2, 1), K=4, m=3, dtype=torch.float64
    )
    assert (
        sum(
            int(keypoint_targets(k[i], p, 3)[1].sum())
            for k, p, i in zip(gt_keypoints, proposals, matched)
        )
        > 0
    )

    def f(x):
        return keypoint_loss(x, proposals, gt_keypoints, matched)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


def test_keypoint_loss_no_positives_or_no_visible_keypoints():
    logits = torch.randn(0, 5, 56, 56, requires_grad=True)
    args = ([torch.zeros(0, 4)], [torch.zeros(2, 5, 3)], [torch.zeros(0, dtype=torch.int64)])
    loss = keypoint_loss(logits, *args)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert tv_roi_heads.keypointrcnn_loss(logits, *args).item() == 0.0
    # RoIs exist but no keypoint is visible: a zero whose gradient is zero everywhere
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    args = (
        [torch.tensor([[0.0, 0.0, 9.0, 9.0], [1.0, 1.0, 5.0, 5.0]])],
        [torch.rand(1, 5, 3) * torch.tensor([9.0, 9.0, 0.0])],
        [torch.tensor([0, 0])],
    )
    loss = keypoint_loss(logits, *args)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert tv_roi_heads.keypointrcnn_loss(logits, *args).item() == 0.0


def test_keypoint_loss_errors():
    logits, proposals, gt_keypoints, matched = _loss_inputs(0)
    with pytest.raises(
        ValueError, match="keypoint_loss: keypoint_logits has 7 rows but the proposals hold 8"
    ):
        keypoint_loss(logits[:7], proposals, gt_keypoints, matched)
    with pytest.raises(ValueError, match="keypoint_logits must be square"):
        keypoint_loss(logits[..., :5], proposals, gt_keypoints, matched)
    with pytest.raises(ValueError, match=r"keypoint_logits must be \[P, K, m, m\]"):
        keypoint_loss(logits[0], proposals, gt_keypoints, matched)
    with pytest.raises(ValueError, match=r"gt_keypoints\[0\] must be \[G, K, 3\] = \[G, 3, 3\]"):
        keypoint_loss(logits[:, :3], proposals, gt_keypoints, matched)
    with pytest.raises(ValueError, match="got 3 images of proposals, 2 of gt_keypoints"):
        keypoint_loss(logits, proposals, gt_keypoints[:2], matched)
    bad = [matched[0] + 3, matched[1], matched[2]]
    with pytest.raises(ValueError, match=r"keypoint_matched_idxs\[0\] must lie in \[0, 3\)"):
        keypoint_loss(logits, proposals, gt_keypoints, bad)
    with pytest.raises(ValueError, match=r"keypoint_matched_idxs\[2\] must be \[3\]"):
        keypoint_loss(logits, proposals, gt_keypoints, [matched[0], matched[1], matched[2][:2]])
    with pytest.raises(TypeError, match="must be an integer tensor"):
        keypoint_loss(logits, proposals, gt_keypoints, [m.float() for m in matched])
    with pytest.raises(TypeError, match="must be lists with one tensor per image"):
        keypoint_loss(logits, proposals[0], gt_keypoints[0], matched[0])


# --------------------------------------------------------------------------------- inference
def _inference_rois(g, n):
    rois = _rois(g, n)
    rois[0] = torch.tensor([3.0, 4.0, 3.4, 4.2])  # smaller than a pixel: clamped to 1 x 1
    rois[1] = torch.tensor([-7.3, 2.5, 60.2, 90.75])  # large, fractional, partly negative
    rois[2] = torch.tensor([10.0, 10.0, 66.0, 66.0])  # exactly 56 x 56 px
    return rois


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_heatmaps_to_keypoints_bit_equal_torchvision(dtype):
    g = torch.Generator().manual_seed(0)
    rois = _inference_rois(g, 9).to(dtype)
    maps = torch.randn(9, 5, 56, 56, generator=g, dtype=dtype)
    ours_kps, ours_scores = heatmaps_to_keypoints(maps, rois)
    ref_kps, ref_scores = tv_roi_heads.heatmaps_to_keypoints(maps, rois)
    assert ours_kps.shape == (9, 5, 3) and ours_scores.shape == (9, 5)
    assert ours_kps.dtype == ours_scores.dtype == torch.float32
    assert torch.equal(ours_kps, ref_kps) and torch.equal(ours_scores, ref_scores)
    assert (ours_kps[..., 2] == 1).all()
    # every keypoint lies in its RoI (at least one pixel wide)
    x, y = ours_kps[..., 0], ours_kps[..., 1]
    x1, y1 = rois[:, :1].float(), rois[:, 1:2].float()
    assert (x >= x1).all() and (y >= y1).all()
    w = (rois[:, 2:3] - rois[:, :1]).clamp(min=1).float()
    h = (rois[:, 3:4] - rois[:, 1:2]).clamp(min=1).float()
    assert (x <= x1 + w).all() and (y <= y1 + h).all()


def test_heatmaps_to_keypoints_by_hand_and_round_trip():
    # a 56 x 56 px RoI: the bicubic resize to 56 x 56 is the identity, so the maximum at
    # (row 7, col 40) gives the pixel centre (x1 + 40.5, y1 + 7.5) and the logit as score
    roi = torch.tensor([[10.0, 20.0, 66.0, 76.0]])
    maps = torch.zeros(1, 2, 56, 56)
    maps[0, 0, 7, 40] = 3.0
    maps[0, 1, 55, 0] = 1.5
    kps, scores = heatmaps_to_keypoints(maps, roi)
    assert kps.tolist() == [[[50.5, 27.5, 1.0], [10.5, 75.5, 1.0]]]
    assert scores.tolist() == [[3.0, 1.5]]
    # round trip on a RoI twice as large (2 px per heatmap cell): a keypoint -> its one-hot
    # target -> a heatmap peaked there -> the centre of that cell's pixels (within a pixel)
    roi = torch.tensor([[0.0, 0.0, 112.0, 112.0]])
    gt = torch.tensor([[[37.0, 91.0, 2.0], [111.0, 4.0, 2.0]]])
    index, valid = keypoint_targets(gt, roi, 56)
    peaked = one_hot_heatmaps(index, valid, 56) * 20.0  # [1, 2, 56, 56]
    kps, _ = heatmaps_to_keypoints(peaked, roi)
    assert (kps[0, :, :2] - gt[0, :, :2]).abs().max() <= 1.0


def test_keypoint_inference_equals_torchvision():
    g = torch.Generator().manual_seed(1)
    boxes = [_inference_rois(g, 4), torch.zeros(0, 4), _rois(g, 2)]
    logits = torch.randn(6, 3, 56, 56, generator=g)
    ours_kps, ours_scores = keypoint_inference(logits, boxes)
    ref_kps, ref_scores = tv_roi_heads.keypointrcnn_inference(logits, boxes)
    assert [tuple(k.shape) for k in ours_kps] == [(4, 3, 3), (0, 3, 3), (2, 3, 3)]
    assert [tuple(s.shape) for s in ours_scores] == [(4, 3), (0, 3), (2, 3)]
    for a, b in zip(ours_kps + ours_scores, ref_kps + ref_scores):
        assert torch.equal(a, b)
    with pytest.raises(
        ValueError, match="keypoint_inference: keypoint_logits has 6 rows but boxes hold 4"
    ):
        keypoint_inference(logits, boxes[:2])
    with pytest.raises(TypeError, match="boxes must be a list"):
        keypoint_inference(logits, torch.cat(boxes))
    with pytest.raises(ValueError, match=r"heatmaps_to_keypoints: maps has 2 RoIs but rois has 3"):
        heatmaps_to_keypoints(logits[:2], boxes[0][:3])
    with pytest.raises(ValueError, match=r"rois\[1\] = .* is not finite"):
        heatmaps_to_keypoints(logits[:2], torch.tensor([[0.0, 0, 5, 5], [0, 0, float("inf"), 5]]))
    with pytest.raises(ValueError, match=r"maps must be \[N, K, m, m\]"):
        heatmaps_to_keypoints(logits[0], boxes[0])
    empty_kps, empty_scores = heatmaps_to_keypoints(torch.zeros(0, 3, 56, 56), torch.zeros(0, 4))
    assert empty_kps.shape == (0, 3, 3) and empty_scores.shape == (0, 3)


# ----------------------------------------------------------- sub-pixel decoding, confidence
def _quadratic_maps(centres, m=56, a=0.3, b=0.2, c=0.1, top=5.0):
    """[1, K, m, m] concave quadratics L = top - a dx^2 - b dy^2 - c dx dy, maxima at centres."""
    ys, xs = torch.meshgrid(
        torch.arange(m, dtype=torch.float64), torch.arange(m, dtype=torch.float64), indexing="ij"
    )
    maps = []
    for cx, cy in centres:
        dx, dy = xs - cx, ys - cy
        maps.append(top - a * dx**2 - b * dy**2 - c * dx * dy)
    return torch.stack(maps)[None]


def test_subpixel_decoding_lands_on_a_quadratic_peak():
    # cells (x, y) = (12.3, 40.8), (30.5, 7.25), (44.9, 50.1): 4a b - c^2 > 0, so one Newton
    # step from the best cell reaches the exact maximum; the RoI is 112 x 84 px at (10, 20), so
    # x = (cx + 0.5) * 112 / 56 + 10 and y = (cy + 0.5) * 84 / 56 + 20
    centres = [(12.3, 40.8), (30.5, 7.25), (44.9, 50.1)]
    maps = _quadratic_maps(centres)
    roi = torch.tensor([[10.0, 20.0, 122.0, 104.0]], dtype=torch.float64)
    kps, scores = heatmaps_to_keypoints_subpixel(maps, roi)
    want = torch.tensor([[(cx + 0.5) * 2 + 10, (cy + 0.5) * 1.5 + 20, 1.0] for cx, cy in centres])
    assert kps.dtype == scores.dtype == torch.float32 and kps.shape == (1, 3, 3)
    assert torch.allclose(kps[0], want, atol=1e-4), (kps[0], want)
    # the score is the logit of the best cell (12, 41), (30 or 31, 7), (45, 50)
    best = maps[0].reshape(3, -1).max(dim=1).values.float()
    assert torch.equal(scores[0], best)
    # torchvision's decoding rounds the same maps to whole pixels: off by up to a pixel
    tv_kps, _ = heatmaps_to_keypoints(maps.float(), roi.float())
    assert (tv_kps[0, :, :2] - want[:, :2]).abs().max() > 0.1


def test_subpixel_decoding_without_a_step():
    roi = torch.tensor([[0.0, 0.0, 56.0, 56.0]])
    maps = torch.full((1, 4, 56, 56), -20.0)

    def put(k, y, x, c, left, right, up, down, ul, ur, dl, dr):
        """the best cell (y, x) = c and its 8 neighbours"""
        maps[0, k, y, x] = c
        maps[0, k, y, x - 1], maps[0, k, y, x + 1] = left, right
        maps[0, k, y - 1, x], maps[0, k, y + 1, x] = up, down
        maps[0, k, y - 1, x - 1], maps[0, k, y - 1, x + 1] = ul, ur
        maps[0, k, y + 1, x - 1], maps[0, k, y + 1, x + 1] = dl, dr

    maps[0, 0, 9, 0] = 4.0  # on the left border: no step, the cell centre
    put(1, 20, 30, 4.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0)  # symmetric: zero gradient
    # g = (0.9, 0.9), hxx = hyy = -2, hxy = 1.9: H is negative definite (det 0.39) but the
    # step -H^-1 g = (9, 9) leaves the neighbourhood: refused
    put(2, 30, 10, 0.0, -1.9, -0.1, -1.9, -0.1, -0.01, -3.81, -3.81, -0.01)
    # g = (0.5, 0), hxx = hyy = -2, hxy = 6.995: a saddle (det < 0): refused
    put(3, 40, 40, 4.0, 2.5, 3.5, 3.0, 3.0, 3.99, -10.0, -10.0, 3.99)
    kps, scores = heatmaps_to_keypoints_subpixel(maps, roi)
    assert kps[0].tolist() == [
        [0.5, 9.5, 1.0],
        [30.5, 20.5, 1.0],
        [10.5, 30.5, 1.0],
        [40.5, 40.5, 1.0],
    ]
    assert scores[0].tolist() == [4.0, 4.0, 0.0, 4.0]
    # the third map with a weak cross term (hxy = 0.5) takes its step, x0 - H^-1 g = x0 + 0.6
    put(2, 30, 10, 0.0, -1.9, -0.1, -1.9, -0.1, -0.5, -1.5, -1.5, -0.5)
    kps, _ = heatmaps_to_keypoints_subpixel(maps, roi)
    step = torch.linalg.solve(
        torch.tensor([[-2.0, 0.5], [0.5, -2.0]], dtype=torch.float64),
        torch.tensor([0.9, 0.9], dtype=torch.float64),
    )
    assert torch.allclose(kps[0, 2, :2].double(), torch.tensor([10.5, 30.5]) - step, atol=1e-5)
    # one-hot peaks (what the loss trains towards) decode as torchvision's on a 56 px RoI
    g = torch.Generator().manual_seed(3)
    index = torch.randint(0, 56 * 56, (2, 5), generator=g)
    peaked = one_hot_heatmaps(index, torch.ones(2, 5, dtype=torch.bool), 56) * 20.0
    rois = torch.tensor([[3.0, 4.0, 59.0, 60.0], [100.0, 50.0, 156.0, 106.0]])
    sub, _ = heatmaps_to_keypoints_subpixel(peaked, rois)
    tv, _ = heatmaps_to_keypoints(peaked, rois)
    assert torch.allclose(sub, tv, atol=1e-5)
    # errors name the function and the problem
    with pytest.raises(ValueError, match="heatmaps_to_keypoints_subpixel: heatmaps must be square"):
        heatmaps_to_keypoints_subpixel(torch.zeros(1, 2, 56, 28), roi)
    with pytest.raises(ValueError, match="maps has 1 RoIs but rois has 2"):
        heatmaps_to_keypoints_subpixel(maps[:, :1], rois)
    empty_kps, empty_scores = heatmaps_to_keypoints_subpixel(
        torch.zeros(0, 3, 56, 56), torch.zeros(0, 4)
    )
    assert empty_kps.shape == (0, 3, 3) and empty_scores.shape == (0, 3)


def _confidence_by_loops(maps: np.ndarray) -> np.ndarray:
    N, K, H, W = maps.shape
    out = np.zeros((N, K))
    for n in range(N):
        for k in range(K):
            e = np.exp(maps[n, k] - maps[n, k].max())
            p = e / e.sum()
            best = 0.0
            for y in range(H):
                for x in range(W):
                    best = max(best, p[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].sum())
            out[n, k] = best
    return out


def test_keypoint_confidence_by_hand():
    g = torch.Generator().manual_seed(5)
    maps = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64) * 3
    ours = keypoint_confidence(maps)
    assert ours.shape == (2, 3) and ours.dtype == torch.float64
    assert keypoint_confidence(maps.to(torch.bfloat16)).dtype == torch.float32  # upcast
    assert np.allclose(ours.numpy(), _confidence_by_loops(maps.numpy()), atol=1e-6)
    # the softmax ignores a constant added to a map's logits; the logit at the peak does not
    assert torch.allclose(keypoint_confidence(maps + 7.0), ours)
    uniform = torch.zeros(1, 1, 56, 56)
    assert keypoint_confidence(uniform).item() == pytest.approx(9 / 56**2)
    sharp = torch.zeros(1, 1, 56, 56)
    sharp[0, 0, 10, 10] = 30.0
    assert keypoint_confidence(sharp).item() == pytest.approx(1.0, abs=1e-6)
    assert keypoint_confidence(torch.zeros(0, 4, 56, 56)).shape == (0, 4)
    with pytest.raises(TypeError, match="keypoint_confidence: maps must be floating point"):
        keypoint_confidence(torch.zeros(1, 1, 4, 4, dtype=torch.long))


def test_keypoint_inference_decoding_option():
    g = torch.Generator().manual_seed(6)
    boxes = [_inference_rois(g, 3), torch.zeros(0, 4), _rois(g, 2)]
    logits = torch.randn(5, 4, 56, 56, generator=g)
    kps, scores = keypoint_inference(logits, boxes, decoding="subpixel")
    want = heatmaps_to_keypoints_subpixel(logits, torch.cat(boxes))
    assert torch.equal(torch.cat(kps), want[0]) and torch.equal(torch.cat(scores), want[1])
    assert [len(k) for k in kps] == [3, 0, 2]
    with pytest.raises(ValueError, match="decoding must be one of torchvision, subpixel"):
        keypoint_inference(logits, boxes, decoding="dark")


@torch.no_grad()
def test_model_keypoint_rescore_and_subpixel_options():
    """The stick-figure model with torchvision's decoding and box scores vs the same weights
    with ``keypoint_decoding="subpixel"`` and ``keypoint_rescore=True``: the same detections,
    scored box score x mean heatmap confidence (computed here by loops), sorted by it, with
    keypoints decoded from the plain model's heatmaps."""
    from mrcnn_edu.config import stick_figures
    from mrcnn_edu.model import build_model

    cfg = stick_figures()
    cfg.roi_heads.score_thresh = 0.0  # a fresh model's scores are low: keep all 20
    cfg.roi_heads.keypoint_decoding, cfg.roi_heads.keypoint_rescore = "torchvision", False
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    cfg.roi_heads.keypoint_decoding, cfg.roi_heads.keypoint_rescore = "subpixel", True
    options = build_model(cfg).eval()
    options.load_state_dict(plain.state_dict())
    cfg.roi_heads.keypoint_decoding = "dark"
    with pytest.raises(
        ValueError, match="RoIHeads: keypoint_decoding must be one of torchvision, subpixel"
    ):
        build_model(cfg)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 256, 256, generator=g) for _ in range(2)]  # no resizing at 256
    a, b = plain.run_stages(images), options.run_stages(images)
    conf = _confidence_by_loops(a["keypoint_logits"].double().numpy()).mean(axis=1)
    start = 0
    for i, (d, e) in enumerate(zip(a["detections"], b["detections"])):
        n = len(d["scores"])
        assert n == 20 and len(e["scores"]) == n
        rescored = d["scores"].double() * torch.from_numpy(conf[start : start + n])
        order = rescored.argsort(descending=True, stable=True)
        assert torch.allclose(e["scores"].double(), rescored[order], atol=1e-6), i
        assert (e["scores"][:-1] >= e["scores"][1:]).all()
        assert torch.equal(e["boxes"], d["boxes"][order])
        assert torch.equal(e["labels"], d["labels"][order])
        logits = a["keypoint_logits"][start : start + n]
        kps, kp_scores = heatmaps_to_keypoints_subpixel(logits, d["boxes"])
        assert torch.allclose(e["keypoints"], kps[order], atol=1e-4), i
        assert torch.equal(e["keypoints_scores"], kp_scores[order])
        assert torch.equal(b["keypoint_logits"][start : start + n], logits[order])
        start += n

"""Matcher and balanced sampler against torchvision and a hand-computed example."""

import pytest
import torch
from torchvision.models.detection import _utils as tv_det_utils

from mrcnn_edu.matching import BalancedSampler, Matcher
from mrcnn_edu.ops import box_iou


def test_two_by_two_hand_example():
    # gt 0 = [0,0,10,10]; anchor 0 = [0,0,10,5] covers half of it: IoU = 50 / 100 = 0.5
    # gt 1 = [20,20,30,30]; anchor 1 = [20,20,30,30]: IoU 1; cross IoUs are 0
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 5.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(gt, anchors)
    torch.testing.assert_close(iou, torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    assert Matcher(0.7, 0.3)(iou).tolist() == [Matcher.BETWEEN_THRESHOLDS, 1]
    assert Matcher(0.7, 0.6)(iou).tolist() == [Matcher.BELOW_LOW_THRESHOLD, 1]
    # anchor 0 is gt 0's best anchor: a low-quality match
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, 1]
    assert Matcher(0.7, 0.6, allow_low_quality_matches=True)(iou).tolist() == [0, 1]
    # thresholds are inclusive at the top: IoU exactly 0.5 >= high 0.5 is a match
    assert Matcher(0.5, 0.3)(iou).tolist() == [0, 1]
    assert Matcher(0.7, 0.3)(iou).dtype == torch.int64


@pytest.mark.parametrize("low_quality", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_equals_torchvision_with_ties(low_quality, seed):
    g = torch.Generator().manual_seed(seed)
    # quantized qualities in {0, .1, ..., .9}: many ties, both per prediction and per gt
    quality = torch.randint(0, 10, (5, 60), generator=g).float() / 10
    quality[3] = quality[3] * 0.3  # a gt whose best match is low quality
    ours = Matcher(0.7, 0.3, low_quality)(quality.clone())
    ref = tv_det_utils.Matcher(0.7, 0.3, low_quality)(quality.clone())
    assert torch.equal(ours, ref)
    assert ours.dtype == torch.int64 and ours.shape == (60,)


def test_gt_that_overlaps_no_anchor_claims_none():
    """A gt box outside the image or of zero width has best IoU 0 with every anchor.
    torchvision's low-quality rule then makes EVERY anchor a positive; here such a gt claims
    nothing, and the result is torchvision's result for the other gts alone."""
    from mrcnn_edu.anchors import AnchorGenerator

    anchors = AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),))(
        (64, 64), [(8, 8)]
    )  # [384, 4]
    gt = torch.tensor(
        [
            [4.0, 6.0, 30.0, 28.0],
            [36.0, 30.0, 60.0, 62.0],  # two real objects
            [200.0, 200.0, 230.0, 240.0],  # outside the image
            [10.0, 10.0, 10.0, 40.0],
        ]
    )  # zero width
    iou = box_iou(gt, anchors)  # [4, 384]
    assert iou[2:].max() == 0
    for high, low in ((0.7, 0.3), (0.5, 0.5)):
        ours = Matcher(high, low, allow_low_quality_matches=True)(iou.clone())
        ref_good = tv_det_utils.Matcher(high, low, True)(iou[:2].clone())
        assert torch.equal(ours, ref_good)
        tv_all = tv_det_utils.Matcher(high, low, True)(iou.clone())
        assert int((tv_all >= 0).sum()) == anchors.shape[0]  # torchvision's flaw: all positive
        assert int((ours >= 0).sum()) < 40
    # a gt with a tiny but positive overlap still gets its best anchor
    tiny = torch.tensor([[0.0, 0.0, 1e-3, 1e-3]])
    ours = Matcher(0.7, 0.3, True)(box_iou(tiny, anchors))
    assert torch.equal(ours, tv_det_utils.Matcher(0.7, 0.3, True)(box_iou(tiny, anchors)))
    assert int((ours == 0).sum()) >= 1


def test_matcher_empty_cases():
    assert Matcher(0.7, 0.3)(torch.zeros(0, 4)).tolist() == [-1, -1, -1, -1]
    assert Matcher(0.7, 0.3, True)(torch.zeros(3, 0)).shape == (0,)
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError, match=r"\[G, N\]"):
        Matcher(0.7, 0.3)(torch.zeros(3))


def _labels(seed):
    g = torch.Generator().manual_seed(seed)
    few_pos = torch.zeros(300)
    few_pos[torch.randperm(300, generator=g)[:7]] = 1  # 7 positives < 128
    many_pos = torch.randint(-1, 2, (500,), generator=g).float()  # ~167 positives > 128
    few_neg = torch.ones(200)
    few_neg[:20] = 0  # 200 positives, 20 negatives
    all_ignored = torch.full((50,), -1.0)
    return [few_pos, many_pos, few_neg, all_ignored]


@pytest.mark.parametrize("batch, fraction", [(256, 0.5), (64, 0.25)])
def test_sampler_equals_torchvision_global_rng(batch, fraction):
    labels = _labels(3)
    torch.manual_seed(1234)
    ref_pos, ref_neg = tv_det_utils.BalancedPositiveNegativeSampler(batch, fraction)(labels)
    torch.manual_seed(1234)
    pos, neg = BalancedSampler(batch, fraction)(labels)
    for p, n, rp, rn, lab in zip(pos, neg, ref_pos, ref_neg, labels):
        assert p.dtype == torch.bool and p.shape == lab.shape
        assert torch.equal(p, rp.bool()) and torch.equal(n, rn.bool())
        assert bool((lab[p] >= 1).all()) and bool((lab[n] == 0).all())
        assert int(p.sum()) <= int(batch * fraction) and int(p.sum() + n.sum()) <= batch
    # hand-checked counts: all 7 positives taken and negatives fill the batch
    assert int(pos[0].sum()) == 7 and int(neg[0].sum()) == batch - 7
    assert int(pos[1].sum()) == int(batch * fraction)
    assert int(neg[2].sum()) == 20
    assert int(pos[3].sum()) == 0 and int(neg[3].sum()) == 0


def test_sampler_generator_draws_like_the_seeded_global_rng():
    labels = _labels(4)
    torch.manual_seed(99)
    pos_g, neg_g = BalancedSampler(32, 0.5)(labels)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    pos, neg = BalancedSampler(32, 0.5)(labels, generator=torch.Generator().manual_seed(99))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    for a, b, c, d in zip(pos, pos_g, neg, neg_g):
        assert torch.equal(a, b) and torch.equal(c, d)
    # a different seed draws a different sample
    pos2, _ = BalancedSampler(32, 0.5)(labels, generator=torch.Generator().manual_seed(100))
    assert not torch.equal(pos2[1], pos[1])


def test_sampler_bad_input():
    with pytest.raises(TypeError, match="list"):
        BalancedSampler()(torch.zeros(10))
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        BalancedSampler()([torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(256, 1.5)

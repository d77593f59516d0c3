"""Instances (the per-image container) and the shared matching step."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.ops import box_iou as tv_box_iou

from mrcnn_edu.matching import Matcher, add_gt_proposals, match_targets
from mrcnn_edu.structures import Instances


def _inst(n=5):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 20], dim=1)
    return Instances(
        (64, 80),
        proposal_boxes=boxes,
        scores=torch.arange(n, dtype=torch.float32),
        names=[f"o{i}" for i in range(n)],
    )


def test_index_selects_every_field_together():
    inst = _inst()
    sel = inst[inst.scores > 2.5]
    assert len(sel) == 2
    assert sel.scores.tolist() == [3.0, 4.0]
    assert torch.equal(sel.proposal_boxes, inst.proposal_boxes[3:])
    assert sel.names == ["o3", "o4"]
    assert sel.image_size == (64, 80)
    idx = torch.tensor([4, 0])
    assert inst[idx].names == ["o4", "o0"] and inst[idx].scores.tolist() == [4.0, 0.0]
    assert len(inst[1]) == 1 and inst[-1].names == ["o4"]
    assert inst[1:3].scores.tolist() == [1.0, 2.0]


def test_cat_to_and_errors():
    a, b = _inst(3), _inst(2)
    c = Instances.cat([a, b])
    assert len(c) == 5 and c.names == a.names + b.names
    assert c.to(torch.float64).scores.dtype == torch.float64
    with pytest.raises(ValueError, match="length 4 but the other fields have 3"):
        a.labels = torch.zeros(4)
    with pytest.raises(AttributeError, match="no field 'nope'"):
        a.nope  # noqa: B018
    with pytest.raises(IndexError, match=r"bool mask must have shape \[3\]"):
        a[torch.tensor([True, False])]
    with pytest.raises(ValueError, match="image_size"):
        Instances.cat(
            [
                a,
                Instances(
                    (1, 1), proposal_boxes=torch.zeros(1, 4), scores=torch.zeros(1), names=["x"]
                ),
            ]
        )
    assert "num_instances=3" in repr(a)


def test_match_targets_equals_torchvision_matcher():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 60], dim=1)
    gt = boxes[torch.tensor([3, 50, 120])] + torch.randn(3, 4, generator=g)
    for args in ((0.5, 0.5, False), (0.7, 0.3, True)):
        ours = match_targets(boxes, gt, Matcher(*args))
        theirs = tv_utils.Matcher(*args)(tv_box_iou(gt, boxes))
        assert torch.equal(ours, theirs)
    empty = match_targets(boxes, torch.zeros(0, 4), Matcher(0.5, 0.5))
    assert (empty == Matcher.BELOW_LOW_THRESHOLD).all() and empty.shape == (300,)
    with pytest.raises(TypeError, match="floating point"):
        match_targets(boxes, gt.long(), Matcher(0.5, 0.5))


def test_add_gt_proposals_appends_last():
    p = [torch.zeros(2, 4), torch.ones(1, 4)]
    g = [torch.full((1, 4), 7.0), torch.zeros(0, 4)]
    out = add_gt_proposals(p, g)
    assert out[0].shape == (3, 4) and out[0][-1].tolist() == [7.0] * 4
    assert torch.equal(out[1], p[1])

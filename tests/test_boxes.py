"""Box coder and box utilities against torchvision and hand-computed values."""

import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.ops import boxes as tv_box_ops

from mrcnn_edu.boxes import (
    BoxCoder,
    box_area,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    clip_boxes_to_image,
    remove_small_boxes,
)


def random_boxes(n, seed, scale=100.0, min_side=1.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * scale + min_side
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_equals_torchvision(weights):
    anchors, gt = random_boxes(200, 0), random_boxes(200, 1)
    ours = BoxCoder(weights).encode(gt, anchors)
    ref = tv_det_utils.BoxCoder(weights).encode_single(gt, anchors)
    assert ours.shape == (200, 4) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_encode_batch_equals_torchvision_per_image():
    anchors = [random_boxes(5, 2), random_boxes(0, 3), random_boxes(7, 4)]
    gt = [random_boxes(5, 5), random_boxes(0, 6), random_boxes(7, 7)]
    ours = BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_batch(gt, anchors)
    ref = tv_det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gt, anchors)
    assert [o.shape[0] for o in ours] == [5, 0, 7]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_equals_torchvision(weights, k):
    boxes = random_boxes(150, 8)
    g = torch.Generator().manual_seed(9)
    deltas = torch.randn(150, 4 * k, generator=g) * 3  # large enough that some dw, dh hit the clamp
    assert (deltas[:, 2::4] / weights[2]).max() > math.log(1000 / 16) or weights[2] > 1
    ours = BoxCoder(weights).decode(deltas, boxes)
    ref = tv_det_utils.BoxCoder(weights).decode_single(deltas, boxes)
    assert ours.shape == (150, 4 * k)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    batched = BoxCoder(weights).decode_batch(deltas, [boxes[:100], boxes[100:]])
    torch.testing.assert_close(
        batched,
        tv_det_utils.BoxCoder(weights).decode(deltas, [boxes[:100], boxes[100:]]),
        rtol=1e-6,
        atol=1e-4,
    )


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_round_trip(weights):
    anchors, gt = random_boxes(100, 10), random_boxes(100, 11)
    coder = BoxCoder(weights)
    torch.testing.assert_close(
        coder.decode(coder.encode(gt, anchors), anchors), gt, rtol=1e-5, atol=1e-4
    )


def test_hand_computed_values():
    # anchor: centre (5, 5), size 10 x 10; gt: centre (10, 10), size 10 x 20
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 0.0, 15.0, 20.0]])
    torch.testing.assert_close(
        BoxCoder().encode(gt, anchors), torch.tensor([[0.5, 0.5, 0.0, math.log(2.0)]])
    )
    torch.testing.assert_close(
        BoxCoder((10.0, 10.0, 5.0, 5.0)).encode(gt, anchors),
        torch.tensor([[5.0, 5.0, 0.0, 5 * math.log(2.0)]]),
    )
    # the clamp: dw = 10 is clipped to log(1000/16), so the width grows by 62.5 exactly
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, 10.0, 0.0]]), anchors)
    torch.testing.assert_close(out, torch.tensor([[5 - 312.5, 0.0, 5 + 312.5, 10.0]]))
    # no clamp from below: dw = -10 shrinks the box
    out = BoxCoder().decode(torch.tensor([[0.0, 0.0, -10.0, 0.0]]), anchors)
    torch.testing.assert_close(out[0, 2] - out[0, 0], torch.tensor(10 * math.exp(-10)))


def test_clip_remove_small_area_convert_equal_torchvision():
    boxes = random_boxes(300, 12, scale=60.0, min_side=0.0) - 10
    for size in [(40, 50), (17, 33)]:
        torch.testing.assert_close(
            clip_boxes_to_image(boxes, size),
            tv_box_ops.clip_boxes_to_image(boxes, size),
            rtol=0,
            atol=0,
        )
    clipped = clip_boxes_to_image(boxes, (40, 50))
    assert (
        clipped[:, 0::2].min() >= 0
        and clipped[:, 0::2].max() <= 50
        and clipped[:, 1::2].max() <= 40
    )
    for min_size in [1e-3, 5.0, 20.0]:
        assert torch.equal(
            remove_small_boxes(clipped, min_size), tv_box_ops.remove_small_boxes(clipped, min_size)
        )
    torch.testing.assert_close(box_area(boxes), tv_box_ops.box_area(boxes), rtol=0, atol=0)
    cxcywh = box_xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(
        cxcywh, tv_box_ops.box_convert(boxes, "xyxy", "cxcywh"), rtol=1e-6, atol=1e-5
    )
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), boxes, rtol=1e-6, atol=1e-5)
    assert torch.equal(
        box_xyxy_to_cxcywh(torch.tensor([[0.0, 2.0, 4.0, 10.0]])),
        torch.tensor([[2.0, 6.0, 4.0, 8.0]]),
    )


def test_clip_batched_shape():
    boxes = random_boxes(12, 13).reshape(3, 4, 4) - 20
    out = clip_boxes_to_image(boxes, (30, 30))
    assert out.shape == (3, 4, 4)
    torch.testing.assert_close(out, tv_box_ops.clip_boxes_to_image(boxes, (30, 30)))


def test_bad_input_errors():
    coder = BoxCoder()
    with pytest.raises(ValueError, match="same N"):
        coder.encode(random_boxes(3, 0), random_boxes(4, 1))
    with pytest.raises(TypeError, match="floating-point"):
        coder.encode(torch.zeros(3, 4, dtype=torch.int64), random_boxes(3, 1))
    with pytest.raises(ValueError, match="last dimension of 4 \\* k"):
        coder.decode(torch.zeros(3, 5), random_boxes(3, 1))
    with pytest.raises(ValueError, match="last dimension of 4"):
        box_area(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="weights"):
        BoxCoder((1.0, 1.0, 1.0))

"""Anchor generator against torchvision's AnchorGenerator and hand-computed anchors."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mrcnn_edu.anchors import AnchorGenerator, generate_cell_anchors


def test_cell_anchors_hand_computed():
    # size 32, ratio h/w = 0.5: w = 32 / sqrt(.5) = 45.25, h = 22.63 -> halves 22.6, 11.3 -> rounded
    cell = generate_cell_anchors((32,), (0.5, 1.0, 2.0))
    assert cell.dtype == torch.float32
    assert torch.equal(
        cell,
        torch.tensor(
            [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
        ),
    )
    # every anchor keeps (about) the area of its size squared
    areas = (cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1])
    torch.testing.assert_close(areas, torch.full((3,), 32.0**2), rtol=0.02, atol=0)


@pytest.mark.parametrize(
    "sizes, ratios",
    [
        (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
        (((16, 24), (48,)), ((0.5, 1.0, 2.0), (1.0, 3.0))),
    ],
)
def test_cell_anchors_and_counts_equal_torchvision(sizes, ratios):
    ours, tv = AnchorGenerator(sizes, ratios), TVAnchorGenerator(sizes, ratios)
    assert len(ours.cell_anchors) == len(tv.cell_anchors)
    for a, b in zip(ours.cell_anchors, tv.cell_anchors):
        assert torch.equal(a, b)
    assert ours.num_anchors_per_location() == tv.num_anchors_per_location()


def test_default_sizes_are_fpn_levels():
    gen = AnchorGenerator()
    assert gen.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert gen.num_anchors_per_location() == [3] * 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_call_equals_torchvision(dtype):
    sizes, ratios = ((8,), (16, 20), (32,)), ((0.5, 1.0, 2.0), (1.0,), (0.5, 2.0))
    H, W = 70, 90  # padded batch not divisible by the strides: stride = H // h as torchvision
    images = torch.zeros(2, 3, H, W, dtype=dtype)
    feats = [
        torch.zeros(2, 4, 18, 23, dtype=dtype),
        torch.zeros(2, 4, 9, 12, dtype=dtype),
        torch.zeros(2, 4, 5, 6, dtype=dtype),
    ]
    ref = TVAnchorGenerator(sizes, ratios)(ImageList(images, [(70, 80), (60, 90)]), feats)
    ours = AnchorGenerator(sizes, ratios)((H, W), [f.shape[-2:] for f in feats], dtype=dtype)
    assert ours.dtype == dtype
    assert ours.shape == (18 * 23 * 3 + 9 * 12 * 2 + 5 * 6 * 2, 4)
    for r in ref:
        assert torch.equal(ours, r)


def test_grid_anchors_order_is_location_major():
    gen = AnchorGenerator(
        sizes=((4,),), aspect_ratios=((0.25, 1.0),)
    )  # cells: [-4,-1,4,1], [-2,-2,2,2]
    (anchors,) = gen.grid_anchors([(2, 3)], [(10, 20)])
    assert anchors.shape == (2 * 3 * 2, 4)
    # location (i=1, j=2) is cell 1*3 + 2 = 5; shift (x, y) = (2*20, 1*10); anchors 10 and 11
    assert torch.equal(anchors[10], torch.tensor([40.0 - 4, 10 - 1, 40 + 4, 10 + 1]))
    assert torch.equal(anchors[11], torch.tensor([40.0 - 2, 10 - 2, 40 + 2, 10 + 2]))
    # location (0, 1): shift (20, 0)
    assert torch.equal(anchors[2], torch.tensor([16.0, -1.0, 24.0, 1.0]))


def test_bad_input_errors():
    gen = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="2 levels"):
        gen((32, 32), [(4, 4)])
    with pytest.raises(ValueError, match="levels of aspect_ratios"):
        AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,),) * 3)
    with pytest.raises(ValueError, match="positive"):
        generate_cell_anchors((0,), (1.0,))
    # a feature map larger than the image: stride 0 would put every anchor at the origin
    with pytest.raises(
        ValueError,
        match=r"feature map 1 is \(40, 40\).*larger than the image "
        r"\(32, 32\).*stride would be \(0, 0\)",
    ):
        gen((32, 32), [(4, 4), (40, 40)])
    with pytest.raises(ValueError, match="larger than the image"):
        gen((32, 32), [(4, 4), (8, 33)])
    with pytest.raises(ValueError, match=r"image_shape \(0, 32\) has an empty side"):
        gen((0, 32), [(4, 4), (8, 8)])
    assert gen((32, 32), [(4, 4), (32, 32)]).shape == (16 + 32 * 32, 4)  # stride 1 is fine

"""Multi-level RoI pooler against torchvision's MultiScaleRoIAlign / LevelMapper / roi_pool.

The features are random maps of a 2-image batch whose images differ in size (padded to a
multiple of 32, as the transform does); the boxes span every pyramid level, including boxes
straddling level boundaries and boxes partly outside the image.
"""

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _infer_scale, initLevelMapper

from mrcnn_edu.poolers import (
    CANONICAL_LEVEL,
    CANONICAL_SCALE,
    MultiLevelRoIPooler,
    assign_levels,
    infer_scales,
)

IMAGE_SIZES = [(200, 300), (230, 260)]  # padded batch: 256 x 320
PADDED = (256, 320)
STRIDES = (4, 8, 16, 32, 64)
NAMES = ["0", "1", "2", "3"]
C = 5
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_features(dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    keys = NAMES + ["pool"]
    return {
        k: torch.randn(
            2, C, -(-PADDED[0] // s), -(-PADDED[1] // s), generator=g, dtype=dtype
        ).requires_grad_(requires_grad)
        for k, s in zip(keys, STRIDES)
    }


def make_proposals(dtype=torch.float32, seed=0):
    """Per image: square-ish boxes of sides 2..700 px (every level, clamped at both ends),
    boxes exactly on the level boundaries 112 / 224 / 448 and a little under them, and boxes
    sticking out of the image."""
    g = torch.Generator().manual_seed(seed)
    proposals = []
    for i, (H, W) in enumerate(IMAGE_SIZES):
        sides = torch.cat(
            [
                torch.logspace(0.3, 2.85, 30 + 7 * i, dtype=torch.float64),
                torch.tensor([56.0, 112.0, 111.99, 224.0, 223.9, 448.0, 447.5]),
            ]
        )
        K = sides.numel()
        aspect = torch.exp(0.6 * torch.randn(K, generator=g, dtype=torch.float64))
        w, h = sides * aspect.sqrt(), sides / aspect.sqrt()
        w[-7:], h[-7:] = sides[-7:], sides[-7:]  # exact squares on the boundaries
        cx = torch.rand(K, generator=g, dtype=torch.float64) * W
        cy = torch.rand(K, generator=g, dtype=torch.float64) * H
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
        zeros = torch.zeros(7, dtype=torch.float64)
        boxes[-7:] = torch.stack([zeros, zeros, sides[-7:], sides[-7:]], dim=1)
        proposals.append(boxes.to(dtype))
    return proposals


# ---------------------------------------------------------------------------------------------
# Level assignment and scales
# ---------------------------------------------------------------------------------------------
def test_canonical_constants():
    assert CANONICAL_SCALE == 224 and CANONICAL_LEVEL == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assign_levels_hand_picked_equals_level_mapper(dtype):
    boxes = torch.tensor(
        [
            [0, 0, 224, 224],  # canonical: level 4 -> index 2 for k_min = 2
            [10, 20, 234, 244],  # same size elsewhere
            [0, 0, 112, 112],  # exactly half: level 3
            [0, 0, 111.9, 111.9],  # just under: level 2
            [0, 0, 448, 448],  # level 5
            [0, 0, 447, 447],  # level 4
            [0, 0, 50, 1003.52],  # sqrt(w h) = 224: level 4
            [0, 0, 8, 8],  # tiny: clamped to level 2
            [0, 0, 2000, 1500],  # huge: clamped to level 5
            [5, 5, 5, 9],  # zero area: log2(0) = -inf -> level 2
        ],
        dtype=dtype,
    )
    expected = torch.tensor([2, 2, 1, 0, 3, 2, 2, 0, 3, 0])
    ours = assign_levels(boxes, 2, 5)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, expected)
    assert torch.equal(ours, initLevelMapper(2, 5)([boxes]))
    # other canonical settings are passed through
    assert torch.equal(
        assign_levels(boxes, 2, 6, canonical_scale=112, canonical_level=3),
        initLevelMapper(2, 6, canonical_scale=112, canonical_level=3)([boxes]),
    )


def test_assign_levels_random_equals_level_mapper():
    for dtype in (torch.float32, torch.float64):
        boxes = torch.cat(make_proposals(dtype))
        assert torch.equal(assign_levels(boxes, 2, 5), initLevelMapper(2, 5)([boxes]))
        assert torch.equal(assign_levels(boxes, 3, 4), initLevelMapper(3, 4)([boxes]))


def test_assign_levels_negative_area_goes_to_finest_level():
    assert assign_levels(torch.tensor([[10.0, 0.0, 0.0, 10.0]]), 2, 5).tolist() == [0]


def test_infer_scales_equals_torchvision():
    image_sizes = [(800, 1333), (800, 1201), (97, 129), (256, 320), (31, 47)]
    for H, W in image_sizes:
        shapes = [(1, C, -(-H // s), -(-W // s)) for s in STRIDES]
        # padded to a multiple of 32, as the batch transform does
        padded = [(1, C, -(-(-(-H // 32) * 32) // s), 1) for s in STRIDES]
        for sh in (shapes, padded):
            ours = infer_scales(sh, (H, W))
            ref = [_infer_scale(torch.empty(s), [H, W]) for s in sh]
            assert ours == ref
    assert infer_scales([(64, 80), (32, 40)], (256, 320)) == [0.25, 0.125]


# ---------------------------------------------------------------------------------------------
# The pooler against MultiScaleRoIAlign
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_pooler_equals_multiscale_roi_align(output_size, backend):
    features, proposals = make_features(), make_proposals()
    ref = MultiScaleRoIAlign(NAMES, output_size, 2)(features, proposals, IMAGE_SIZES)
    pooler = MultiLevelRoIPooler(NAMES, output_size, 2, backend=backend)
    out = pooler(features, proposals, IMAGE_SIZES)
    K = sum(p.shape[0] for p in proposals)
    assert out.shape == (K, C, output_size, output_size)
    torch.testing.assert_close(out, ref, **TOL)
    # every level is used (the case is not trivially one level)
    levels = assign_levels(torch.cat(proposals), 2, 5)
    assert set(levels.tolist()) == {0, 1, 2, 3}


def test_pooler_gradients_equal_multiscale_roi_align():
    proposals = make_proposals()
    w = torch.randn(
        sum(p.shape[0] for p in proposals), C, 7, 7, generator=torch.Generator().manual_seed(3)
    )
    grads = []
    for module in (MultiScaleRoIAlign(NAMES, 7, 2), MultiLevelRoIPooler(NAMES, 7, 2)):
        features = make_features(requires_grad=True)
        (module(features, proposals, IMAGE_SIZES) * w).sum().backward()
        grads.append({k: v.grad for k, v in features.items()})
    ref, ours = grads
    assert ours["pool"] is None and ref["pool"] is None  # P6 is not pooled from
    for k in NAMES:
        assert ref[k].abs().sum() > 0
        torch.testing.assert_close(ours[k], ref[k], **TOL)


def test_pooler_float64():
    features, proposals = make_features(torch.float64), make_proposals(torch.float64)
    ref = MultiScaleRoIAlign(NAMES, 7, 2)(features, proposals, IMAGE_SIZES)
    out = MultiLevelRoIPooler(NAMES, 7, 2)(features, proposals, IMAGE_SIZES)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def per_level_reference(features, proposals, op):
    """Pool each RoI from the level torchvision's LevelMapper picks with ``op(fmap, rois,
    scale)``; scales from the padded batch size (stride 4 .. 32)."""
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(proposals)
    levels = initLevelMapper(2, 5)(proposals)
    out = torch.zeros(rois.shape[0], C, 7, 7)
    for level, name in enumerate(NAMES):
        idx = torch.where(levels == level)[0]
        out[idx] = op(features[name], rois[idx], 1.0 / STRIDES[level])
    return out


def test_op_switch_to_pool_reaches_roi_pool():
    features, proposals = make_features(), make_proposals()
    pooler = MultiLevelRoIPooler(NAMES, 7, 2)
    align = pooler(features, proposals, IMAGE_SIZES)
    pooler.op = "pool"
    out = pooler(features, proposals, IMAGE_SIZES)
    ref = per_level_reference(
        features, proposals, lambda f, r, s: torchvision.ops.roi_pool(f, r, 7, s)
    )
    torch.testing.assert_close(out, ref, **TOL)
    assert not torch.allclose(out, align)


def test_aligned_and_sampling_ratio_switches_reach_roi_align():
    features, proposals = make_features(), make_proposals()
    pooler = MultiLevelRoIPooler(NAMES, 7, 2)
    before = pooler(features, proposals, IMAGE_SIZES)
    pooler.aligned, pooler.sampling_ratio = True, 0
    out = pooler(features, proposals, IMAGE_SIZES)
    ref = per_level_reference(
        features,
        proposals,
        lambda f, r, s: torchvision.ops.roi_align(f, r, 7, s, sampling_ratio=0, aligned=True),
    )
    torch.testing.assert_close(out, ref, **TOL)
    assert not torch.allclose(out, before)
    pooler.backend = "torchvision"  # the backend switch is used as well
    torch.testing.assert_close(pooler(features, proposals, IMAGE_SIZES), ref, **TOL)


def test_single_level_skips_level_assignment():
    # a C4 map: stride 16, every box pooled from it however large or small
    g = torch.Generator().manual_seed(1)
    features = {"0": torch.randn(2, C, 16, 20, generator=g)}
    proposals = make_proposals()
    pooler = MultiLevelRoIPooler(["0"], 14, 2)
    out = pooler(features, proposals, IMAGE_SIZES)
    ref = MultiScaleRoIAlign(["0"], 14, 2)(features, proposals, IMAGE_SIZES)
    torch.testing.assert_close(out, ref, **TOL)
    rois = torchvision.ops._utils.convert_boxes_to_roi_format(proposals)
    torch.testing.assert_close(
        out, torchvision.ops.roi_align(features["0"], rois, 14, 1 / 16, 2), **TOL
    )


def test_empty_proposals_and_graph():
    features, proposals = make_features(requires_grad=True), make_proposals()
    pooler = MultiLevelRoIPooler(NAMES, 7, 2)
    empty = proposals[0][:0]
    out = pooler(features, [empty, proposals[1]], IMAGE_SIZES)
    ref = MultiScaleRoIAlign(NAMES, 7, 2)(features, [empty, proposals[1]], IMAGE_SIZES)
    torch.testing.assert_close(out, ref, **TOL)
    none = pooler(features, [empty, empty], IMAGE_SIZES)
    assert none.shape == (0, C, 7, 7)
    none.sum().backward()  # still connected to the features, as torchvision's
    assert features["0"].grad is not None and features["0"].grad.abs().sum() == 0


def test_rows_follow_concatenated_proposals():
    features, proposals = make_features(), make_proposals()
    pooler = MultiLevelRoIPooler(NAMES, 7, 2)
    out = pooler(features, proposals, IMAGE_SIZES)
    perm = torch.randperm(proposals[1].shape[0], generator=torch.Generator().manual_seed(0))
    out_perm = pooler(features, [proposals[0], proposals[1][perm]], IMAGE_SIZES)
    K0 = proposals[0].shape[0]
    torch.testing.assert_close(out_perm[K0:], out[K0:][perm], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_clear_errors():
    features, proposals = make_features(), make_proposals()
    with pytest.raises(ValueError, match="unknown op 'max'"):
        MultiLevelRoIPooler(NAMES, 7, op="max")
    pooler = MultiLevelRoIPooler(NAMES, 7)
    with pytest.raises(ValueError, match="unknown op"):
        pooler.op = "roi_align"
    with pytest.raises(TypeError, match="aligned must be a bool"):
        pooler.aligned = 1
    with pytest.raises(TypeError, match="aligned must be a bool"):
        MultiLevelRoIPooler(NAMES, 7, aligned="yes")
    with pytest.raises(ValueError, match="unknown backend"):
        pooler.backend = "triton"
    with pytest.raises(TypeError, match="sampling_ratio must be an int"):
        pooler.sampling_ratio = 2.0
    assert pooler.op == "align" and pooler.aligned is False  # failed sets changed nothing
    with pytest.raises(KeyError, match=r"\['p5', 'p6'\] are missing"):
        MultiLevelRoIPooler(["0", "p5", "p6"], 7)(features, proposals, IMAGE_SIZES)
    with pytest.raises(ValueError, match="features have B=2 images, got 1"):
        pooler(features, proposals[:1], IMAGE_SIZES)
    with pytest.raises(ValueError, match="image_sizes must be a list"):
        pooler(features, proposals, IMAGE_SIZES[:1])
    with pytest.raises(ValueError, match=r"proposals\[1\] must be a \[K, 4\]"):
        pooler(features, [proposals[0], proposals[1][:, :3]], IMAGE_SIZES)
    with pytest.raises(TypeError, match=r"proposals\[0\] is torch.float64"):
        pooler(features, [p.double() for p in proposals], IMAGE_SIZES)
    with pytest.raises(ValueError, match="consecutive pyramid levels"):
        MultiLevelRoIPooler(["0", "2"], 7)(features, proposals, IMAGE_SIZES)
    with pytest.raises(ValueError, match=r"features\['1'\]"):
        bad = dict(features, **{"1": features["1"][:, :2]})
        pooler(bad, proposals, IMAGE_SIZES)
    with pytest.raises(TypeError, match="output_size"):
        MultiLevelRoIPooler(NAMES, 7.0)

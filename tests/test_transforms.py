"""Tests for mrcnn_edu.transforms against torchvision's GeneralizedRCNNTransform and hand values."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.detection.transform import resize_boxes as tv_resize_boxes

from mrcnn_edu.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    ConvertImageDtype,
    Normalize,
    RandomHorizontalFlip,
    Resize,
    batch_images,
    collate_fn,
    flip_keypoints,
    postprocess_boxes,
    resize_scale,
)


def make_sample(h: int, w: int, n: int, k: int = 3, seed: int = 0):
    """A random image with ``n`` rectangular instances whose boxes tightly enclose their masks."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g)
    masks = torch.zeros(n, h, w, dtype=torch.uint8)
    boxes = torch.zeros(n, 4)
    for i in range(n):
        x1 = int(torch.randint(0, w - 4, (1,), generator=g))
        y1 = int(torch.randint(0, h - 4, (1,), generator=g))
        x2 = int(torch.randint(x1 + 2, w + 1, (1,), generator=g))
        y2 = int(torch.randint(y1 + 2, h + 1, (1,), generator=g))
        masks[i, y1:y2, x1:x2] = 1
        boxes[i] = torch.tensor([x1, y1, x2, y2], dtype=torch.float32)
    kp_xy = torch.rand(n, k, 2, generator=g) * torch.tensor([w, h])
    kp_v = torch.randint(0, 3, (n, k, 1), generator=g).float()
    target = {
        "boxes": boxes,
        "labels": torch.randint(1, 4, (n,), generator=g),
        "masks": masks,
        "keypoints": torch.cat([kp_xy, kp_v], dim=2),
        "image_id": torch.tensor(seed),
        # one iscrowd=1 region (CocoDetection returns them apart), here a copy of instance 0
        "crowd_boxes": boxes[:1].clone(),
        "crowd_masks": masks[:1].clone(),
    }
    return image, target


SIZES = [(40, 70), (90, 30), (50, 50), (33, 120)]  # (H, W): both branches of min() in the scale


@pytest.mark.parametrize("min_size,max_size", [(64, 100), (48, 1000), (20, 30)])
def test_resize_normalize_batch_equals_torchvision(min_size, max_size):
    samples = [make_sample(h, w, n=3, seed=i) for i, (h, w) in enumerate(SIZES)]
    tv = GeneralizedRCNNTransform(
        min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD)
    ).eval()
    tv_images, tv_targets = tv([s[0] for s in samples], [dict(s[1]) for s in samples])

    ours = Compose([Resize(min_size, max_size), Normalize()])
    out = [ours(img, tgt) for img, tgt in samples]
    batch, sizes = batch_images([img for img, _ in out], size_divisible=32)

    assert sizes == tv_images.image_sizes
    assert batch.shape == tv_images.tensors.shape
    # torchvision normalizes before resizing; bilinear weights sum to 1, so the order only
    # changes float rounding
    torch.testing.assert_close(batch, tv_images.tensors, atol=1e-5, rtol=1e-5)
    for (_, tgt), tv_tgt in zip(out, tv_targets):
        torch.testing.assert_close(tgt["boxes"], tv_tgt["boxes"], atol=1e-5, rtol=0)
        assert torch.equal(tgt["masks"], tv_tgt["masks"])
        assert tgt["masks"].dtype == torch.uint8
        torch.testing.assert_close(tgt["keypoints"], tv_tgt["keypoints"], atol=1e-5, rtol=0)
        assert torch.equal(tgt["labels"], tv_tgt["labels"])


def test_resize_scale_hand_values():
    assert resize_scale(480, 640, 800, 1333) == 800 / 480  # shorter side -> 800
    assert resize_scale(400, 1200, 800, 1333) == 1333 / 1200  # long side capped at 1333
    img = torch.rand(3, 480, 640)
    out, _ = Resize(80, 1333)(img)
    assert tuple(out.shape) == (3, 80, 106)  # floor(640 * 80 / 480) = 106


@pytest.mark.parametrize("size_divisible", [32, 16, 1])
def test_batch_images_equals_torchvision(size_divisible):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=g) for h, w in [(37, 61), (64, 20), (5, 100)]]
    tv = GeneralizedRCNNTransform(800, 1333, list(IMAGENET_MEAN), list(IMAGENET_STD))
    expected = tv.batch_images(images, size_divisible=size_divisible)
    batch, sizes = batch_images(images, size_divisible=size_divisible)
    assert torch.equal(batch, expected)
    assert sizes == [(37, 61), (64, 20), (5, 100)]
    assert batch.shape[-2] % size_divisible == 0 and batch.shape[-1] % size_divisible == 0


def test_flip_twice_is_identity():
    image, target = make_sample(31, 45, n=4, k=4, seed=3)
    flip = RandomHorizontalFlip(p=1.0, flip_index=[1, 0, 3, 2])
    once_img, once = flip(image, target)
    assert not torch.equal(once_img, image)
    assert not torch.equal(once["boxes"], target["boxes"])
    twice_img, twice = flip(once_img, once)
    assert torch.equal(twice_img, image)
    for key in ("boxes", "masks", "labels", "crowd_boxes", "crowd_masks"):
        assert torch.equal(twice[key], target[key]), key
    # crowd regions move exactly like instances
    assert torch.equal(once["crowd_boxes"], once["boxes"][:1])
    assert torch.equal(once["crowd_masks"], once["masks"][:1])
    # W - (W - x) rounds twice in float32, so random keypoints come back to within an ulp ...
    torch.testing.assert_close(twice["keypoints"], target["keypoints"], atol=1e-5, rtol=0)
    # ... and exactly when they lie on a fine dyadic grid (pixel indices, half pixels, COCO)
    target["keypoints"] = torch.round(target["keypoints"] * 64) / 64
    assert torch.equal(flip(*flip(image, target))[1]["keypoints"], target["keypoints"])
    # the caller's target is not modified in place
    fresh = make_sample(31, 45, n=4, k=4, seed=3)[1]
    flip(image, fresh)
    assert torch.equal(fresh["boxes"], target["boxes"])


def test_flip_hand_built_example_swaps_left_right():
    W, H = 10, 6
    image = torch.zeros(3, H, W)
    image[0, :, 1] = 1.0  # a red column at x = 1
    masks = torch.zeros(1, H, W, dtype=torch.uint8)
    masks[0, 2:6, 1:4] = 1  # columns 1, 2, 3 -> box x in [1, 4)
    # keypoint 0 = "left" (visible), keypoint 1 = "right" (occluded)
    keypoints = torch.tensor([[[2.0, 3.0, 2.0], [7.0, 4.0, 1.0]]])
    target = {
        "boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]),
        "labels": torch.tensor([1]),
        "masks": masks,
        "keypoints": keypoints,
    }
    img2, t2 = RandomHorizontalFlip(p=1.0, flip_index=[1, 0])(image, target)
    assert torch.equal(img2[0, :, W - 1 - 1], torch.ones(H))  # column 1 -> column 8
    assert torch.equal(t2["boxes"], torch.tensor([[6.0, 2.0, 9.0, 6.0]]))  # x1' = W - x2 = 6
    assert t2["masks"][0, 2:6, 6:9].all() and t2["masks"].sum() == masks.sum()
    # new keypoint 0 (left) is the mirrored old "right" one; visibility travels with it
    assert torch.equal(t2["keypoints"], torch.tensor([[[3.0, 4.0, 1.0], [8.0, 3.0, 2.0]]]))
    # without flip_index only x is mirrored
    same_order = flip_keypoints(keypoints, W)
    assert torch.equal(same_order, torch.tensor([[[8.0, 3.0, 2.0], [3.0, 4.0, 1.0]]]))
    # unlabelled keypoints (v = 0, stored as 0, 0, 0) stay at the origin
    assert torch.equal(flip_keypoints(torch.zeros(1, 1, 3), W), torch.zeros(1, 1, 3))


def test_flip_probability_and_generator():
    image, target = make_sample(20, 30, n=1, seed=5)
    img0, t0 = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(img0, image) and torch.equal(t0["boxes"], target["boxes"])

    def decisions(seed):
        flip = RandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(seed))
        return [not torch.equal(flip(image, target)[0], image) for _ in range(40)]

    a, b = decisions(0), decisions(0)
    assert a == b  # reproducible
    assert 5 < sum(a) < 35  # and actually random


def _assert_boxes_enclose_masks(target):
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(xs) > 0
        # pixel (x, y) covers [x, x+1) x [y, y+1); its sampling point (top-left corner for
        # nearest-neighbour) must lie inside the box
        assert xs.min() >= box[0] - 1e-4 and xs.max() < box[2] + 1e-4, (box, xs.min(), xs.max())
        assert ys.min() >= box[1] - 1e-4 and ys.max() < box[3] + 1e-4, (box, ys.min(), ys.max())


@pytest.mark.parametrize("min_size,max_size", [(77, 200), (25, 60), (50, 50)])
def test_boxes_enclose_masks_after_flip_and_resize(min_size, max_size):
    for seed, (h, w) in enumerate(SIZES):
        image, target = make_sample(h, w, n=4, seed=seed)
        _assert_boxes_enclose_masks(target)
        t = Compose([RandomHorizontalFlip(1.0), Resize(min_size, max_size)])
        _, out = t(image, target)
        _assert_boxes_enclose_masks(out)
        assert torch.equal(out["crowd_boxes"], out["boxes"][:1])  # crowd regions move alike
        assert torch.equal(out["crowd_masks"], out["masks"][:1])


def test_normalize_round_trip_and_hand_value():
    image = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(2))
    norm = Normalize()
    x, _ = norm(image)
    torch.testing.assert_close(norm.inverse(x), image, atol=1e-6, rtol=0)
    mean_image = torch.tensor(IMAGENET_MEAN)[:, None, None].expand(3, 4, 4)
    torch.testing.assert_close(norm(mean_image)[0], torch.zeros(3, 4, 4))
    ones = norm(torch.ones(3, 2, 2))[0][:, 0, 0]
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(ones, expected)
    # batched inverse
    torch.testing.assert_close(norm.inverse(x[None])[0], image, atol=1e-6, rtol=0)


def test_convert_image_dtype():
    img = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1)
    out, _ = ConvertImageDtype()(img)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.2, 1.0]))


def test_empty_targets():
    image = torch.rand(3, 24, 40)
    target = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 24, 40, dtype=torch.uint8),
        "keypoints": torch.zeros(0, 5, 3),
    }
    t = Compose(
        [Resize(48, 100), RandomHorizontalFlip(1.0, flip_index=[0, 2, 1, 4, 3]), Normalize()]
    )
    img, out = t(image, target)
    assert tuple(img.shape) == (3, 48, 80)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 48, 80)
    assert out["keypoints"].shape == (0, 5, 3) and out["labels"].shape == (0,)
    batch, sizes = batch_images([img])
    assert batch.shape == (1, 3, 64, 96) and sizes == [(48, 80)]


def test_postprocess_boxes_matches_torchvision_and_round_trips():
    boxes = torch.tensor([[1.5, 2.0, 30.0, 40.25], [0.0, 0.0, 63.0, 47.0]])
    torch.testing.assert_close(
        postprocess_boxes(boxes, (48, 64), (300, 401)),
        tv_resize_boxes(boxes, (48, 64), (300, 401)),
        atol=0,
        rtol=0,
    )
    image, target = make_sample(37, 53, n=2, seed=9)
    resized, out = Resize(100, 1000)(image, target)
    back = postprocess_boxes(out["boxes"], resized.shape[-2:], image.shape[-2:])
    torch.testing.assert_close(back, target["boxes"], atol=1e-4, rtol=0)


def test_resize_multiscale_uses_generator():
    image = torch.rand(3, 20, 30)
    heights = [
        Resize((10, 20, 40), 1000, generator=torch.Generator().manual_seed(s))(image)[0].shape[1]
        for s in range(12)
    ]
    again = [
        Resize((10, 20, 40), 1000, generator=torch.Generator().manual_seed(s))(image)[0].shape[1]
        for s in range(12)
    ]
    assert heights == again
    assert set(heights) <= {10, 20, 40} and len(set(heights)) > 1


def test_collate_fn_with_dataloader():
    samples = [make_sample(20 + i, 30, n=i + 1, seed=i) for i in range(3)]
    loader = torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 2
    assert images[1].shape == (3, 21, 30)
    assert targets[1]["boxes"].shape == (2, 4)


def test_bad_input_errors():
    image, target = make_sample(20, 30, n=2, seed=0)
    with pytest.raises(ValueError, match=r"image must have shape \[3, H, W\]"):
        Resize(10, 20)(torch.rand(20, 30), None)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        RandomHorizontalFlip()(torch.rand(1, 3, 20, 30), None)
    with pytest.raises(TypeError, match="floating"):
        Resize(10, 20)(torch.zeros(3, 20, 30, dtype=torch.uint8), None)
    with pytest.raises(ValueError, match=r"boxes'\] must have shape \[N, 4\]"):
        Resize(10, 20)(image, {**target, "boxes": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="labels'\\] has 3 entries"):
        RandomHorizontalFlip(1.0)(image, {**target, "labels": torch.ones(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="area'\\] has 1 entries but target\\['boxes'\\] has 2"):
        Resize(10, 20)(image, {**target, "area": torch.ones(1)})
    with pytest.raises(
        ValueError, match="crowd_masks'\\] has 2 entries but target\\['crowd_boxes'\\] has 1"
    ):
        Resize(10, 20)(image, {**target, "crowd_masks": torch.zeros(2, 20, 30, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="crowd_masks'\\] has size"):
        RandomHorizontalFlip(1.0)(image, {**target, "crowd_masks": torch.zeros(1, 20, 31)})
    with pytest.raises(ValueError, match="masks'\\] has size"):
        Resize(10, 20)(image, {**target, "masks": torch.zeros(2, 19, 30, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="keypoints"):
        Resize(10, 20)(image, {**target, "keypoints": torch.zeros(2, 4, 2)})
    with pytest.raises(ValueError, match="flip_index"):
        RandomHorizontalFlip(1.0, flip_index=[0, 1])(image, target)  # 3 keypoints
    with pytest.raises(ValueError, match="non-empty"):
        batch_images([])
    with pytest.raises(ValueError, match="image 1 is torch.float64"):
        batch_images([torch.rand(3, 4, 4), torch.rand(3, 4, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="p must be"):
        RandomHorizontalFlip(1.5)

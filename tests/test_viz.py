"""Tests for mrcnn_edu.viz: render figures to pixel arrays and check the colours where they belong."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from mrcnn_edu.transforms import batch_images
from mrcnn_edu.viz import (
    PALETTE,
    class_color,
    draw_instances,
    draw_pipeline,
    show_batch,
    show_samples,
)

H, W = 48, 64
GREY = 0.5


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def render(image, **kw) -> np.ndarray:
    """Draw into an axes that fills a figure of exactly W x H pixels; return [H, W, 3] in 0..1."""
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    draw_instances(image, ax=ax, **kw)
    fig.canvas.draw()
    out = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    plt.close(fig)
    assert out.shape == (H, W, 3)
    return out


def grey_image() -> torch.Tensor:
    return torch.full((3, H, W), GREY)


def rect_mask(y1, y2, x1, x2) -> torch.Tensor:
    m = torch.zeros(1, H, W, dtype=torch.uint8)
    m[0, y1:y2, x1:x2] = 1
    return m


def test_class_color_fixed_and_distinct():
    assert class_color(0) == PALETTE[0]
    colors = [class_color(i) for i in range(1, len(PALETTE))]
    assert len(set(colors)) == len(colors)  # distinct within one cycle
    assert class_color(3) == class_color(3) == class_color(torch.tensor(3))
    assert class_color(len(PALETTE)) == class_color(1)  # cycles
    assert all(0.0 <= c <= 1.0 for col in colors for c in col)
    with pytest.raises(ValueError, match="label"):
        class_color(-1)


def test_mask_region_moves_towards_class_color():
    label = 2
    out = render(grey_image(), boxes=torch.tensor([[8.0, 10.0, 56.0, 40.0]]),
                 labels=torch.tensor([label]), masks=rect_mask(10, 40, 8, 56))
    expected = 0.5 * GREY + 0.5 * np.asarray(class_color(label))  # mask_alpha = 0.5
    inside = out[20:32, 20:44].reshape(-1, 3)
    np.testing.assert_allclose(inside, np.broadcast_to(expected, inside.shape), atol=0.02)
    outside = out[44:, :].reshape(-1, 3)  # rows below the box and its outline
    np.testing.assert_allclose(outside, GREY, atol=0.02)
    # the box outline is drawn in the class colour on the box edge (x = 8 -> column 7.5)
    edge = out[25, 6:10]
    assert np.abs(edge - np.asarray(class_color(label))).sum(axis=1).min() < 0.15


def test_both_image_formats_give_the_same_picture():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    kw = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([1]),
              "masks": rect_mask(4, 20, 4, 30)}
    a = render(u8.float() / 255.0, **kw)  # [3, H, W] float tensor
    b = render(u8.permute(1, 2, 0).numpy(), **kw)  # [H, W, 3] uint8 numpy
    c = render(u8, **kw)  # [3, H, W] uint8 tensor
    d = render(u8.permute(1, 2, 0).numpy().astype(np.float32) / 255.0, **kw)  # HWC float
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)


def test_probability_masks_are_thresholded_and_scores_filter():
    probs = torch.full((2, 1, H, W), 0.2)
    probs[0, 0, 5:20, 5:25] = 0.9  # instance 0: high score
    probs[1, 0, 28:44, 36:60] = 0.9  # instance 1: low score
    out = render(grey_image(), labels=torch.tensor([1, 3]), scores=torch.tensor([0.9, 0.3]),
                 masks=probs, score_threshold=0.5)
    expected = 0.5 * GREY + 0.5 * np.asarray(class_color(1))
    np.testing.assert_allclose(out[10, 12], expected, atol=0.02)
    np.testing.assert_allclose(out[2, 40], GREY, atol=0.02)  # p = 0.2: not part of the mask
    np.testing.assert_allclose(out[30:42, 40:56].reshape(-1, 3), GREY, atol=0.02)  # filtered out


def test_keypoints_visible_occluded_unlabelled():
    label = 4
    color = np.asarray(class_color(label))
    # continuous coordinates: (20.5, 20.5) is the centre of pixel (20, 20)
    kps = torch.tensor([[[12.5, 12.5, 2.0], [40.5, 12.5, 1.0], [40.5, 36.5, 0.0]]])
    out = render(grey_image(), labels=torch.tensor([label]), keypoints=kps)
    # visible: a filled dot in the class colour
    np.testing.assert_allclose(out[12, 12], color, atol=0.1)
    # occluded: a hollow circle -> grey centre, coloured ring around it
    np.testing.assert_allclose(out[12, 40], GREY, atol=0.05)
    ring = out[8:17, 36:45].reshape(-1, 3)
    assert np.abs(ring - color).sum(axis=1).min() < 0.3
    # unlabelled: nothing drawn
    np.testing.assert_allclose(out[32:41, 36:45].reshape(-1, 3), GREY, atol=0.02)
    # a skeleton line between the two labelled points (1-based pair (1, 2)) crosses x = 26
    with_line = render(grey_image(), labels=torch.tensor([label]), keypoints=kps,
                       skeleton=[(1, 2), (2, 3)])
    assert np.abs(with_line[11:15, 26] - color).sum(axis=1).min() < 0.2
    np.testing.assert_allclose(with_line[20:34, 40], GREY, atol=0.02)  # (2, 3): v=0 end, no line


def test_draw_instances_returns_axes_and_names():
    ax = draw_instances(grey_image(), boxes=torch.tensor([[1.0, 12.0, 20.0, 30.0]]),
                        labels=torch.tensor([2]), scores=torch.tensor([0.876]),
                        class_names=["__background__", "square", "circle"], title="t")
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["circle 0.88"]
    assert ax.get_title() == "t"
    # empty instances are fine
    draw_instances(grey_image(), boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                   masks=torch.zeros(0, H, W, dtype=torch.uint8), keypoints=torch.zeros(0, 3, 3))


def test_bad_inputs_raise_clear_errors():
    img = grey_image()
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        draw_instances(torch.rand(H, W))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        draw_instances(np.zeros((3, H, W), dtype=np.uint8))  # CHW numpy
    with pytest.raises(ValueError, match="normalized"):
        draw_instances(torch.rand(3, H, W) * 4 - 2)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\]"):
        draw_instances(img, boxes=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        draw_instances(img, boxes=torch.zeros(2, 4), labels=torch.ones(3))
    with pytest.raises(ValueError, match="masks are 20x64 but the image is 48x64"):
        draw_instances(img, masks=torch.zeros(1, 20, W))
    with pytest.raises(ValueError, match="keypoints"):
        draw_instances(img, keypoints=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="1-based"):
        draw_instances(img, keypoints=torch.ones(1, 2, 3), skeleton=[(1, 3)])
    with pytest.raises(TypeError, match="image must be"):
        draw_instances([[0.0]])


class _TinyDataset:
    class_names = ("__background__", "square", "circle", "triangle")

    def __len__(self):
        return 5

    def __getitem__(self, i):
        m = rect_mask(5, 5 + 4 * i + 4, 5, 30)
        return grey_image(), {"boxes": torch.tensor([[5.0, 5.0, 30.0, 9.0 + 4 * i]]),
                              "labels": torch.tensor([1 + i % 3]), "masks": m}


def test_show_samples_grid():
    fig = show_samples(_TinyDataset(), [0, 1, 2, 3, 4], ncols=3)
    axes = fig.get_axes()
    assert len(axes) == 6  # 2 rows x 3 columns, the last one blank
    assert [ax.get_title() for ax in axes[:5]] == [f"[{i}]" for i in range(5)]
    assert axes[2].texts[0].get_text() == "triangle"  # class_names from the dataset
    with pytest.raises(ValueError, match="indices is empty"):
        show_samples(_TinyDataset(), [])


def test_show_batch_and_pipeline():
    images = [torch.rand(3, 20, 30), torch.rand(3, 33, 17)]
    batch, sizes = batch_images(images)
    mask = torch.zeros(1, 20, 30, dtype=torch.uint8)
    mask[0, 1:10, 1:10] = 1
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 10.0, 10.0]]), "labels": torch.tensor([1]),
                "masks": mask},  # masks at the unpadded size
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    fig = show_batch(batch, sizes, targets)
    assert len(fig.get_axes()) == 2
    assert "20x30 in 64x32" in fig.get_axes()[0].get_title()
    with pytest.raises(ValueError, match=r"masks'\] must be \[N, 20, 30\]"):
        show_batch(batch, sizes, [{**targets[0], "masks": mask[:, :10]}, targets[1]])
    with pytest.raises(ValueError, match="2 images but 1 image_sizes"):
        show_batch(batch, sizes[:1])
    ax = draw_pipeline()
    assert len(ax.patches) == 6  # six stages
    labels = [t.get_text() for t in ax.texts]
    assert "RoIAlign" in labels and "backbone + FPN" in labels

"""Tests for mrcnn_edu.viz: render figures to pixel arrays, check the colours where they belong."""

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
    best_proposals,
    class_color,
    draw_best_proposals,
    draw_box_deltas,
    draw_data_race,
    draw_instances,
    draw_keypoints_closeup,
    draw_memory_layout,
    draw_pipeline,
    draw_rle_runs,
    draw_thread_mapping,
    memory_offsets,
    plot_anchors_at,
    rle_runs,
    show_batch,
    show_samples,
    simulate_increments,
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
    out = render(
        grey_image(),
        boxes=torch.tensor([[8.0, 10.0, 56.0, 40.0]]),
        labels=torch.tensor([label]),
        masks=rect_mask(10, 40, 8, 56),
    )
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
    kw = {
        "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]),
        "labels": torch.tensor([1]),
        "masks": rect_mask(4, 20, 4, 30),
    }
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
    out = render(
        grey_image(),
        labels=torch.tensor([1, 3]),
        scores=torch.tensor([0.9, 0.3]),
        masks=probs,
        score_threshold=0.5,
    )
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
    with_line = render(
        grey_image(), labels=torch.tensor([label]), keypoints=kps, skeleton=[(1, 2), (2, 3)]
    )
    assert np.abs(with_line[11:15, 26] - color).sum(axis=1).min() < 0.2
    np.testing.assert_allclose(with_line[20:34, 40], GREY, atol=0.02)  # (2, 3): v=0 end, no line


def test_draw_instances_returns_axes_and_names():
    ax = draw_instances(
        grey_image(),
        boxes=torch.tensor([[1.0, 12.0, 20.0, 30.0]]),
        labels=torch.tensor([2]),
        scores=torch.tensor([0.876]),
        class_names=["__background__", "square", "circle"],
        title="t",
    )
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["circle 0.88"]
    assert ax.get_title() == "t"
    # empty instances are fine
    draw_instances(
        grey_image(),
        boxes=torch.zeros(0, 4),
        labels=torch.zeros(0, dtype=torch.int64),
        masks=torch.zeros(0, H, W, dtype=torch.uint8),
        keypoints=torch.zeros(0, 3, 3),
    )


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
        return grey_image(), {
            "boxes": torch.tensor([[5.0, 5.0, 30.0, 9.0 + 4 * i]]),
            "labels": torch.tensor([1 + i % 3]),
            "masks": m,
        }


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
    targets = [
        {
            "boxes": torch.tensor([[1.0, 1.0, 10.0, 10.0]]),
            "labels": torch.tensor([1]),
            "masks": mask,
        },  # masks at the unpadded size
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
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


# ------------------------------------------------------------------ the pictures of notebooks 00-04


def test_keypoints_closeup_tells_visible_from_occluded():
    kps = torch.tensor([[10.0, 12.0, 2.0], [30.0, 20.0, 1.0], [0.0, 0.0, 0.0], [25.0, 30.0, 2.0]])
    names = ["head", "hand", "foot", "hip"]
    ax = plt.figure().add_subplot()
    draw_keypoints_closeup(ax, grey_image(), kps, names=names, skeleton=[(1, 2), (1, 4), (3, 4)])
    scat = {c.get_gid(): c for c in ax.collections}
    np.testing.assert_allclose(scat["keypoints_visible"].get_offsets(), [[10, 12], [25, 30]])
    np.testing.assert_allclose(scat["keypoints_occluded"].get_offsets(), [[30, 20]])
    assert scat["keypoints_visible"].get_facecolors()[0, 3] == 1.0  # filled
    assert len(scat["keypoints_occluded"].get_facecolors()) == 0  # hollow ring: no face
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["visible (v=2): 2", "occluded (v=1): 1", "not labelled (v=0): 1, not drawn"]
    # limbs: head-hand ends in an occluded point (dashed), head-hip is solid, foot (v=0) none
    styles = [line.get_linestyle() for line in ax.lines if len(line.get_xdata()) == 2]
    assert styles == ["--", "-"]
    assert sorted(t.get_text() for t in ax.texts) == ["hand", "head", "hip"]
    with pytest.raises(ValueError, match=r"\[K, 3\]"):
        draw_keypoints_closeup(ax, grey_image(), kps[:, :2])


def test_draw_instances_occluded_ring_is_larger_than_visible_dot():
    kps = torch.tensor([[[12.5, 24.5, 2.0], [40.5, 24.5, 1.0]]])
    out = render(grey_image(), labels=torch.tensor([1]), keypoints=kps)
    coloured = np.abs(out - GREY).sum(axis=2) > 0.15
    vis_w = coloured[24, 4:22].sum()  # the dot's width along its row
    ring = np.flatnonzero(coloured[24, 30:52])
    assert ring.max() - ring.min() + 1 > vis_w  # the ring reaches further out than the dot
    assert not coloured[24, 40]  # and it is hollow


def test_rle_runs_hand_computed_and_read_by_pycocotools():
    from pycocotools import mask as mask_utils

    toy = np.zeros((4, 3), np.uint8)
    toy[1:3, 0] = 1
    toy[0, 1] = 1
    # by hand, column by column: 1 zero, 2 ones, 1 zero, 1 one, 7 zeros
    assert rle_runs(toy) == [(0, 0, 1), (1, 1, 2), (0, 3, 1), (1, 4, 1), (0, 5, 7)]
    ax = plt.figure().add_subplot()
    draw_rle_runs(ax, toy)
    assert [t.get_text() for t in ax.texts if t.get_gid() == "rle_run"] == ["1", "2", "1", "1", "7"]
    assert ax.get_title() == "counts = [1, 2, 1, 1, 7]"
    cells = [p for p in ax.patches]
    assert len(cells) == toy.size
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = (rng.random((6, 5)) < 0.5).astype(np.uint8)
        m[0, 0] = 1  # the first run of zeros is empty
        counts = [n for _, _, n in rle_runs(m)]
        assert counts[0] == 0
        rle = mask_utils.frPyObjects({"size": [6, 5], "counts": counts}, 6, 5)
        assert (mask_utils.decode(rle) == m).all()


def test_thread_mapping_unflattens_row_major():
    shape, tpb = (2, 3, 2, 3), 8
    K, C, oh, ow = shape
    ax = plt.figure().add_subplot()
    draw_thread_mapping(ax, shape, tpb)
    labels = [t for t in ax.texts if t.get_gid() == "thread_index"]
    assert len(labels) == K * C * oh * ow
    flat = torch.arange(K * C * oh * ow).reshape(shape)  # torch's own row-major layout
    for t in labels:
        x, y = t.get_position()
        k, pw = divmod(int(x - 0.5), ow + 1)
        c, ph = divmod(int(y - 0.5), oh + 1)
        assert int(t.get_text()) == int(flat[k, c, ph, pw])
    blocks = [t for t in ax.texts if t.get_text().startswith("block ")]
    assert len(blocks) == -(-K * C * oh * ow // tpb)  # ceil(36 / 8) = 5
    idle = [p for p in ax.patches if p.get_hatch()]
    assert len(idle) == 5 * tpb - K * C * oh * ow
    with pytest.raises(ValueError, match="shape"):
        draw_thread_mapping(ax, (2, 3, 2))


def test_data_race_loses_an_update():
    racy = simulate_increments([0, 1, 0, 1, 0, 1])
    assert racy[-1][2] == 1  # both read 0, both write 1
    assert simulate_increments([0, 0, 0, 1, 1, 1])[-1][2] == 2  # one after the other
    assert simulate_increments([0, 0, 1, 0, 1, 1], start=5)[-1][2] == 6
    ax = plt.figure().add_subplot()
    draw_data_race(ax)
    memory = [t.get_text() for t in ax.texts if t.get_gid() == "memory"]
    assert memory == ["x = 0"] * 4 + ["x = 1"] * 2
    assert "1 update lost" in ax.get_title()
    draw_data_race(ax, [0, 0, 0, 1, 1, 1])
    assert "both updates kept" in ax.get_title()
    with pytest.raises(ValueError, match="three"):
        simulate_increments([0, 1, 0, 1])


def test_memory_layout_matches_torch_strides():
    C, H, W = 3, 2, 4
    t = torch.empty(1, C, H, W)
    for layout, tensor in (("NCHW", t), ("NHWC", t.contiguous(memory_format=torch.channels_last))):
        _, sc, sh, sw = tensor.stride()
        c, y, x = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
        np.testing.assert_array_equal(memory_offsets((C, H, W), layout), c * sc + y * sh + x * sw)
    ax = plt.figure().add_subplot()
    draw_memory_layout(ax, (C, H, W), pixel=(1, 2))
    for layout, expect in (("NCHW", [6, 14, 22]), ("NHWC", [18, 19, 20])):
        xs = sorted(p.get_x() for p in ax.patches if p.get_gid() == f"pixel_{layout}")
        assert xs == expect, layout  # NCHW: H*W = 8 apart; NHWC: side by side
    with pytest.raises(ValueError, match="layout"):
        memory_offsets((C, H, W), "CHWN")


def test_box_deltas_arrows_end_at_the_decoded_boxes():
    from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

    anchors = torch.tensor([[4.0, 6.0, 20.0, 22.0], [30.0, 10.0, 62.0, 26.0]])
    gt = torch.tensor([[7.0, 5.0, 25.0, 28.0], [28.0, 14.0, 54.0, 40.0]])
    deltas = TVBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt, anchors)  # independent encoder
    ax = plt.figure().add_subplot()
    draw_box_deltas(ax, grey_image(), anchors, deltas, gt_boxes=gt)
    arrows = [t for t in ax.texts if t.get_gid() == "delta_arrow"]
    assert len(arrows) == 2
    for arrow, a, g in zip(arrows, anchors.tolist(), gt.tolist()):
        np.testing.assert_allclose(arrow.xyann, [(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
        np.testing.assert_allclose(arrow.xy, [(g[0] + g[2]) / 2, (g[1] + g[3]) / 2], atol=1e-4)
    boxes = [p for p in ax.patches if p.get_gid() == "decoded_box"]
    got = [
        [p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()] for p in boxes
    ]
    np.testing.assert_allclose(got, gt.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="2 anchors but 1 deltas"):
        draw_box_deltas(ax, grey_image(), anchors, deltas[:1])


def test_best_proposals_rank_and_iou():
    import torchvision

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [50.0, 0.0, 60.0, 8.0]])
    proposals = torch.tensor(
        [
            [19.0, 21.0, 41.0, 40.0],  # rank 0: gt 1
            [0.0, 0.0, 10.0, 5.0],  # rank 1: gt 0, IoU 0.5
            [0.0, 5.0, 10.0, 10.0],  # rank 2: gt 0, IoU 0.5 too (a tie)
            [48.0, 30.0, 60.0, 40.0],
        ]
    )  # rank 3: misses gt 2
    rank, iou = best_proposals(proposals, gt)
    ref = torchvision.ops.box_iou(gt, proposals)
    assert rank.tolist() == [1, 0, 0]  # the tie goes to the better-ranked proposal
    torch.testing.assert_close(iou, ref.max(dim=1).values)
    ax = plt.figure().add_subplot()
    draw_best_proposals(ax, torch.full((3, 48, 64), 0.5), proposals, gt)
    labels = [t.get_text() for t in ax.texts if t.get_gid() == "best_proposal"]
    assert labels == [f"#{r} IoU {u:.2f}" for r, u in zip(rank.tolist(), iou.tolist())]
    rank, iou = best_proposals(torch.zeros(0, 4), gt)
    assert rank.tolist() == [-1, -1, -1] and iou.tolist() == [0.0, 0.0, 0.0]


def test_plot_anchors_at_centres_on_the_cell():
    from matplotlib.patches import Rectangle

    fig = plot_anchors_at(
        torch.rand(3, 64, 96), (16, 32), (0.5, 1.0, 2.0), 16, 2, 1, show_grid=False
    )
    rects = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(rects) == 6
    for r in rects:
        np.testing.assert_allclose(
            [r.get_x() + r.get_width() / 2, r.get_y() + r.get_height() / 2], [32.0, 16.0]
        )  # cell (x=2, y=1) at stride 16

"""Tests for the RoIAlign / RoIPool drawings (``mrcnn_edu.viz``) and their explorer
(``mrcnn_edu.widgets.roi``).

The drawn geometry comes from the reference operators (``mrcnn_edu.ops.roi_reference``). It is
checked against hand-computed points and against what ``torchvision.ops.roi_align`` /
``roi_pool`` actually compute (an independent implementation): on a linear ramp ``f[y, x] = x``
bilinear interpolation is exact, so each RoIAlign output bin equals the mean x of its sampling
points.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
import torchvision
from matplotlib.figure import Figure

from mrcnn_edu.ops.roi_reference import roi_align_reference, roi_align_sampling_points
from mrcnn_edu.viz import (
    bilinear_neighbours,
    draw_roi_comparison,
    draw_roi_sampling,
    pool_bins,
    sampling_points,
)
from mrcnn_edu.widgets.roi import roi_explorer


def test_sampling_points_hand_computed():
    # box 4x4 cells, 2x2 bins of 2 cells, 2x2 points per bin at 1/4 and 3/4 of each bin
    p = sampling_points((0.0, 0.0, 4.0, 4.0), 2, sampling_ratio=2, aligned=False)
    assert p.shape == (2, 2, 2, 2, 2)
    xs = p[0, :, 0, :, 0].reshape(-1)  # (pw, ix) -> x
    ys = p[:, 0, :, 0, 1].reshape(-1)  # (ph, iy) -> y
    torch.testing.assert_close(xs, torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64))
    torch.testing.assert_close(ys, torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64))
    # aligned=True shifts everything by half a cell; spatial_scale=0.5 halves an 8-pixel box
    q = sampling_points((0.0, 0.0, 8.0, 8.0), 2, sampling_ratio=2, aligned=True, spatial_scale=0.5)
    torch.testing.assert_close(q, p - 0.5)
    # one point per bin sits at the bin centre: box (1, 2, 7, 5), 3x1 bins of width 2, height 3
    c = sampling_points((1.0, 2.0, 7.0, 5.0), (1, 3), sampling_ratio=1)
    assert c.shape == (1, 3, 1, 1, 2)
    torch.testing.assert_close(
        c[0, :, 0, 0], torch.tensor([[2.0, 3.5], [4.0, 3.5], [6.0, 3.5]], dtype=torch.float64)
    )


def test_sampling_points_adaptive_grid_and_small_boxes():
    # adaptive: ceil(roi / bins) points per bin side: width 5 over 2 bins -> 3, height 2 -> 1
    assert sampling_points((0.0, 0.0, 5.0, 2.0), 2, sampling_ratio=-1).shape == (2, 2, 1, 3, 2)
    # aligned=False clamps a tiny box to one cell (torchvision's legacy behaviour)
    p = sampling_points((2.0, 2.0, 2.2, 2.1), 1, sampling_ratio=1, aligned=False)
    torch.testing.assert_close(p.reshape(2), torch.tensor([2.5, 2.5], dtype=torch.float64))


@pytest.mark.parametrize(
    "box, output_size, sampling_ratio, aligned, scale",
    [
        ((1.3, 1.2, 5.7, 6.4), 3, 2, False, 1.0),
        ((1.3, 1.2, 5.7, 6.4), (2, 3), -1, True, 1.0),
        ((4.6, 2.4, 17.4, 14.8), 2, 3, True, 0.5),
        ((9.0, 7.0, 22.0, 21.0), (3, 2), -1, False, 0.25),
        ((3.0, 4.0, 3.3, 4.1), 2, 2, False, 1.0),  # clamped to one cell
    ],
)
def test_sampling_points_match_torchvision_on_ramps(
    box, output_size, sampling_ratio, aligned, scale
):
    H, W = 10, 12
    ramp_x = torch.arange(W, dtype=torch.float64).expand(H, W)  # f[y, x] = x
    ramp_y = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W)  # f[y, x] = y
    feat = torch.stack([ramp_x, ramp_y])[None]  # (1, 2, H, W)
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    out = torchvision.ops.roi_align(feat, rois, output_size, scale, sampling_ratio, aligned)[0]
    p = sampling_points(box, output_size, sampling_ratio, aligned, scale)
    assert float(p[..., 0].min()) >= 0 and float(p[..., 0].max()) <= W - 1  # ramp is exact here
    assert float(p[..., 1].min()) >= 0 and float(p[..., 1].max()) <= H - 1
    torch.testing.assert_close(out[0], p[..., 0].mean(dim=(2, 3)), rtol=0, atol=1e-9)
    torch.testing.assert_close(out[1], p[..., 1].mean(dim=(2, 3)), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "x, y", [(2.3, 4.7), (0.0, 0.0), (-0.6, 3.2), (6.8, 4.5), (3.0, 5.9), (-1.5, 2.0)]
)
def test_bilinear_neighbours_match_torchvision(x, y):
    H, W = 6, 7
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 1, H, W, generator=g, dtype=torch.float64)
    # a 1x1 RoIAlign with one sample reads exactly the centre of its box
    rois = torch.tensor([[0.0, x - 0.5, y - 0.5, x + 0.5, y + 0.5]], dtype=torch.float64)
    ref = torchvision.ops.roi_align(feat, rois, 1, 1.0, 1, False)[0, 0, 0, 0]
    nb = bilinear_neighbours(x, y, (H, W))
    ours = sum(w * feat[0, 0, r, c] for r, c, w in nb) if nb else torch.tensor(0.0)
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float64), ref)
    if nb:
        assert abs(sum(w for _, _, w in nb) - 1.0) < 1e-12
        assert all(0 <= r < H and 0 <= c < W for r, c, _ in nb)


@pytest.mark.parametrize(
    "box, output_size, scale",
    [
        ((1.4, 2.5, 7.6, 8.5), 3, 1.0),
        ((0.0, 0.0, 11.0, 9.0), (2, 4), 1.0),
        ((6.0, 3.0, 30.0, 22.0), (3, 2), 0.25),
        ((8.0, 7.0, 15.0, 12.0), 4, 1.0),  # runs off the map: clipped bins
        ((3.0, 3.0, 3.2, 3.1), 2, 1.0),  # one cell, 2x2 bins
    ],
)
def test_pool_bins_match_torchvision_roi_pool(box, output_size, scale):
    H, W = 10, 12
    # strictly increasing values: the max over a bin is its bottom-right cell
    idx = torch.arange(H * W, dtype=torch.float32).reshape(1, 1, H, W)
    ref = torchvision.ops.roi_pool(idx, torch.tensor([[0.0, *box]]), output_size, scale)[0, 0]
    bins = pool_bins(box, output_size, scale, (H, W))
    empty = (bins[..., 1] <= bins[..., 0]) | (bins[..., 3] <= bins[..., 2])
    expect = ((bins[..., 1] - 1) * W + bins[..., 3] - 1).float()
    expect[empty] = 0.0  # torchvision writes 0 for an empty bin
    torch.testing.assert_close(ref, expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_bins_float_rounding_as_torchvision(dtype):
    # a box of 29 cells in 7 bins: 7 * (29 / 7) is 29 in float32 but 29.000000000000004 in
    # float64, so the last bin's ceil differs by one cell between the two float types
    H, W = 4, 40
    idx = torch.arange(H * W, dtype=dtype).reshape(1, 1, H, W)
    box = (0.0, 0.0, 28.0, 2.0)
    ref = torchvision.ops.roi_pool(idx, torch.tensor([[0.0, *box]], dtype=dtype), (1, 7), 1.0)
    bins = pool_bins(box, (1, 7), 1.0, (H, W), dtype=dtype)
    torch.testing.assert_close(ref[0, 0], ((bins[..., 1] - 1) * W + bins[..., 3] - 1).to(dtype))
    assert int(bins[0, 6, 3]) == (29 if dtype == torch.float32 else 30)


def test_pool_bins_match_torchvision_on_random_boxes():
    H, W = 24, 36
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(H * W, dtype=torch.float32).reshape(1, 1, H, W)
    for _ in range(200):
        scale = [1.0, 0.5, 0.25, 1 / 16][int(torch.randint(4, (1,), generator=g))]
        xy = torch.rand(2, generator=g) * torch.tensor([W, H]) / scale
        wh = torch.rand(2, generator=g) * torch.tensor([W, H]) / scale
        box = torch.cat([xy, xy + wh]).tolist()
        size = tuple(int(v) for v in torch.randint(1, 15, (2,), generator=g))
        ref = torchvision.ops.roi_pool(idx, torch.tensor([[0.0, *box]]), size, scale)[0, 0]
        bins = pool_bins(box, size, scale, (H, W))
        empty = (bins[..., 1] <= bins[..., 0]) | (bins[..., 3] <= bins[..., 2])
        expect = ((bins[..., 1] - 1) * W + bins[..., 3] - 1).float()
        expect[empty] = 0.0
        torch.testing.assert_close(ref, expect, msg=f"box {box}, size {size}, scale {scale}")


def test_inverted_box_aligned_has_no_samples_like_torchvision():
    box = (5.0, 5.0, 3.0, 4.0)  # x2 < x1, y2 < y1
    p = sampling_points(box, 2, sampling_ratio=-1, aligned=True)
    assert p.shape == (2, 2, 0, 0, 2)
    feat = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = torchvision.ops.roi_align(feat, torch.tensor([[0.0, *box]]), 2, 1.0, -1, True)
    assert torch.count_nonzero(ref) == 0  # no sample anywhere: every bin reads 0
    draw_roi_sampling(Figure().add_subplot(), (8, 8), box, 2, -1, True)  # draws, no error


def test_pool_bins_round_half_away_from_zero():
    # C's round(2.5) = 3 (Python's round gives 2): the box starts at cell 3
    assert int(pool_bins((2.5, 2.5, 6.0, 6.0), 1)[0, 0, 0]) == 3


def test_draw_shows_the_sampling_points_and_pool_bins():
    box, size, sr = (1.3, 1.2, 5.7, 6.4), (2, 3), 2
    for aligned in (False, True):
        ax = Figure().add_subplot()
        draw_roi_sampling(ax, (8, 8), box, size, sr, aligned, "align", highlight=(1, 2, 1, 0))
        pts = [c for c in ax.collections if c.get_gid() == "sampling_points"]
        assert len(pts) == 1
        drawn = torch.as_tensor(pts[0].get_offsets().data, dtype=torch.float64)
        torch.testing.assert_close(drawn, sampling_points(box, size, sr, aligned).reshape(-1, 2))
        assert len([c for c in ax.collections if c.get_gid() == "neighbours"]) == 4
    ax = Figure().add_subplot()
    draw_roi_sampling(ax, (8, 8), box, size, sr, method="pool")
    rects = [p for p in ax.patches if p.get_gid() == "pool_bin"]
    assert len(rects) == 6
    bins = pool_bins(box, size, 1.0, (8, 8))
    a, b, c, d = (int(v) for v in bins[0, 0])
    assert rects[0].get_xy() == (c - 0.5, a - 0.5)
    assert (rects[0].get_width(), rects[0].get_height()) == (d - c, b - a)
    assert not [c for c in ax.collections if c.get_gid() == "sampling_points"]


def test_bad_arguments_are_named():
    ax = Figure().add_subplot()
    with pytest.raises(ValueError, match="method"):
        draw_roi_sampling(ax, method="max")
    with pytest.raises(ValueError, match="output_size"):
        sampling_points((0, 0, 4, 4), 0)
    with pytest.raises(ValueError, match="box"):
        sampling_points((0, 0, 4), 2)
    with pytest.raises(TypeError, match="dtype"):
        pool_bins((0, 0, 4, 4), 2, dtype=torch.int64)


def test_explorer_redraws_on_every_change():
    import ipywidgets

    explorer = roi_explorer(feature_hw=(6, 6), box=(1.0, 1.0, 4.0, 4.0))
    assert isinstance(explorer, ipywidgets.VBox)
    assert explorer.output in explorer.children
    first = explorer.output.outputs
    assert len(first) == 1 and "image/png" in first[0]["data"]
    for w in explorer.controls.values():
        if isinstance(w, (ipywidgets.FloatSlider, ipywidgets.IntSlider)):
            assert w.continuous_update is False
    # the observer, called directly
    explorer.controls["method"].value = "pool"  # also fires the observer
    after_pool = explorer.output.outputs
    explorer.controls["aligned"].value = True
    explorer.redraw({"name": "value", "old": False, "new": True})
    last = explorer.output.outputs
    assert len(after_pool) == 1 and len(last) == 1  # cleared, not appended
    pngs = [o[0]["data"]["image/png"] for o in (first, after_pool, last)]
    assert pngs[0] != pngs[1]  # the picture changed with the method
    explorer.controls["method"].value = "align"
    explorer.controls["w"].value = 2.0
    assert explorer.output.outputs[0]["data"]["image/png"] not in pngs


# ------------------------------------------------------------------------ one geometry, shared
def test_drawn_points_are_the_reference_operators_points():
    # several RoIs with different adaptive grids in one call: the drawing's points for each box
    # are exactly (bit for bit) the reference's, and the reference's forward reads those points
    boxes = [(1.3, 1.2, 5.7, 6.4), (0.2, 3.1, 9.8, 4.0), (4.0, 4.0, 4.5, 4.2), (2.0, 0.5, 7.0, 8.5)]
    rois = torch.tensor([[0.0, *b] for b in boxes], dtype=torch.float64)
    H, W = 10, 12
    for aligned in (False, True):
        geo = roi_align_sampling_points(rois, (3, 2), 1.0, -1, aligned)
        assert geo["x"].shape[2] == int(geo["grid_w"].max()) > int(geo["grid_w"].min())  # padded
        for k, box in enumerate(boxes):
            gh, gw = int(geo["grid_h"][k]), int(geo["grid_w"][k])
            pts = sampling_points(box, (3, 2), -1, aligned)
            assert pts.shape == (3, 2, gh, gw, 2)
            assert torch.equal(pts[0, :, 0, :, 0], geo["x"][k, :, :gw])
            assert torch.equal(pts[:, 0, :, 0, 1], geo["y"][k, :, :gh])
        # a ramp f[y, x] = x: each bin of the reference forward is the mean x of its valid points
        ramp = torch.arange(W, dtype=torch.float64).expand(H, W)[None, None]
        out = roi_align_reference(ramp, rois, (3, 2), 1.0, -1, aligned)[:, 0]  # (K, 3, 2)
        x = geo["x"].clamp(0, W - 1)  # the ramp is exact inside the map (the boxes stay inside)
        valid = geo["x_valid"].to(x.dtype)  # (K, 1, Gw)
        expect = (x * valid).sum(-1) / valid.sum(-1)  # (K, ow): mean over the bin's samples
        torch.testing.assert_close(out, expect[:, None, :].expand(-1, 3, -1), rtol=0, atol=1e-12)


def test_pool_bins_unclipped_without_a_feature_size():
    bins = pool_bins((-2.0, -3.0, 3.0, 3.0), 1)
    assert bins[0, 0].tolist() == [-3, 4, -2, 4]  # rounded box, not clipped to the map
    assert pool_bins((-2.0, -3.0, 3.0, 3.0), 1, feature_hw=(8, 8))[0, 0].tolist() == [0, 4, 0, 4]


def test_roi_comparison_draws_the_same_box_in_both_panels():
    box = (1.3, 1.2, 5.7, 6.4)

    def rect(ax, gid):
        found = [p for p in ax.patches if p.get_gid() == gid]
        assert len(found) == 1, gid
        r = found[0]
        return (*r.get_xy(), r.get_width(), r.get_height())

    expected = (1.3, 1.2, 5.7 - 1.3, 6.4 - 1.2)
    fig = draw_roi_comparison((8, 8), box, 2, 2, aligned=False)
    pool_ax, align_ax = fig.get_axes()
    torch.testing.assert_close(torch.tensor(rect(pool_ax, "given_box")), torch.tensor(expected))
    torch.testing.assert_close(torch.tensor(rect(align_ax, "roi_box")), torch.tensor(expected))
    assert not [p for p in align_ax.patches if p.get_gid() == "given_box"]  # nothing shifted
    fig = draw_roi_comparison((8, 8), box, 2, 2, aligned=True)
    align_ax = fig.get_axes()[1]
    torch.testing.assert_close(torch.tensor(rect(align_ax, "given_box")), torch.tensor(expected))
    shifted = (1.3 - 0.5, 1.2 - 0.5, *expected[2:])  # the half-pixel shift, drawn and explained
    torch.testing.assert_close(torch.tensor(rect(align_ax, "roi_box")), torch.tensor(shifted))
    assert "half-pixel" in align_ax.get_title()
    plt.close("all")  # draw_roi_comparison makes pyplot figures: leave none behind

"""Tests for the RPN engine: proposal recall, the tiny backbone, RPN training, the anchor drawings.

``proposal_recall`` is checked on hand-computed cases and against a brute-force count over
``torchvision.ops.box_iou`` (an independent IoU). Training is checked on a tiny synthetic batch:
the RPN loss on a fixed batch (same sampled anchors) must drop, and two seeded runs must agree.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torchvision

from mrcnn_edu.backbone import TinyBackbone
from mrcnn_edu.engine import predict_proposals, proposal_recall, train_rpn

# ----------------------------------------------------------------------------- proposal_recall


def test_recall_hand_cases():
    # image 0: gt A = proposal 0 exactly; gt B is half-covered (IoU 50/100 = 0.5) by proposal 1
    p0 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 25.0]])
    g0 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    r = proposal_recall([p0], [g0], num_proposals=(1, 2, 5), iou_thresholds=(0.5, 0.51, 0.7))
    assert r == {
        (1, 0.5): 0.5,
        (1, 0.51): 0.5,
        (1, 0.7): 0.5,
        (2, 0.5): 1.0,
        (2, 0.51): 0.5,
        (2, 0.7): 0.5,  # IoU 0.5 counts at t = 0.5
        (5, 0.5): 1.0,
        (5, 0.51): 0.5,
        (5, 0.7): 0.5,
    }  # k > P uses all proposals

    # image 1: three gt boxes; the only good proposal is ranked third (after two far-away ones)
    p1 = torch.tensor(
        [[100.0, 100.0, 110.0, 110.0], [200.0, 0.0, 210.0, 5.0], [40.0, 40.0, 60.0, 60.0]]
    )
    g1 = torch.tensor([[40.0, 40.0, 60.0, 60.0], [40.0, 40.0, 60.0, 61.0], [0.0, 0.0, 5.0, 5.0]])
    r = proposal_recall([p1], [g1], num_proposals=(2, 3), iou_thresholds=(0.5, 0.99))
    # IoU(p1[2], g1[1]) = 400 / 420 = 0.952: recalled at 0.5, not at 0.99
    assert r == {(2, 0.5): 0.0, (2, 0.99): 0.0, (3, 0.5): 2 / 3, (3, 0.99): 1 / 3}

    # pooled over images: 2 + 3 gt boxes; at (3, 0.5): 2 (image 0) + 2 (image 1) = 4 of 5
    r = proposal_recall([p0, p1], [g0, g1], num_proposals=(3,), iou_thresholds=(0.5,))
    assert r == {(3, 0.5): pytest.approx(4 / 5)}


def test_recall_empty_cases():
    empty = torch.zeros(0, 4)
    g = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    # no proposals: nothing covered; an image without gt adds nothing to the denominator
    r = proposal_recall([empty, g.clone()], [g, empty], num_proposals=(1,), iou_thresholds=(0.5,))
    assert r == {(1, 0.5): 0.0}
    r = proposal_recall(
        [g.clone(), g.clone()], [g, empty], num_proposals=(1,), iou_thresholds=(0.5,)
    )
    assert r == {(1, 0.5): 1.0}
    # no gt anywhere: recall undefined
    r = proposal_recall([g], [empty], num_proposals=(1,), iou_thresholds=(0.5,))
    assert math.isnan(r[(1, 0.5)])


def test_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)

    def rand_boxes(n):
        xy = torch.rand(n, 2, generator=g) * 80
        wh = torch.rand(n, 2, generator=g) * 30 + 2
        return torch.cat([xy, xy + wh], dim=1)

    proposals = [rand_boxes(n) for n in (40, 7, 0, 25)]
    gts = [rand_boxes(n) for n in (5, 3, 2, 0)]
    ks, ts = (1, 5, 10, 30), (0.3, 0.5, 0.7)
    r = proposal_recall(proposals, gts, num_proposals=ks, iou_thresholds=ts)
    for k in ks:
        for t in ts:
            hit = 0
            for p, gt in zip(proposals, gts):
                for box in gt:
                    ious = [float(torchvision.ops.box_iou(box[None], q[None])) for q in p[:k]]
                    hit += any(iou >= t for iou in ious)
            assert r[(k, t)] == pytest.approx(hit / 10), (k, t)
    assert 0 < r[(30, 0.3)] < 1  # the random case is not trivial


def test_recall_bad_input():
    b = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="one of each per image"):
        proposal_recall([b, b], [b])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] must have shape \[N, 4\]"):
        proposal_recall([b], [torch.zeros(3)])
    with pytest.raises(TypeError, match=r"proposals\[0\] must be a torch.Tensor"):
        proposal_recall([[0, 0, 1, 1]], [b])
    with pytest.raises(ValueError, match="num_proposals"):
        proposal_recall([b], [b], num_proposals=(0,))


# -------------------------------------------------------------------------------- TinyBackbone


@pytest.mark.parametrize(
    "size, strides", [((256, 256), (8, 16)), ((70, 45), (4, 8, 32)), ((64, 96), (16,))]
)
def test_backbone_shapes(size, strides):
    torch.manual_seed(0)
    net = TinyBackbone(out_channels=24, strides=strides, width=8).eval()
    H, W = size
    feats = net(torch.rand(2, 3, H, W))
    assert list(feats) == [str(i) for i in range(len(strides))]  # finest first
    for (name, f), s in zip(feats.items(), strides):
        assert f.shape == (2, 24, math.ceil(H / s), math.ceil(W / s)), name
        assert f.dtype == torch.float32
    assert net.strides == tuple(strides) and net.out_channels == 24


def test_backbone_seeded_init_and_errors():
    a = TinyBackbone(generator=torch.Generator().manual_seed(3))
    b = TinyBackbone(generator=torch.Generator().manual_seed(3))
    c = TinyBackbone(generator=torch.Generator().manual_seed(4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stages.0.0.0.weight"], sc["stages.0.0.0.weight"])
    torch.manual_seed(5)
    d = TinyBackbone()
    torch.manual_seed(5)
    e = TinyBackbone()
    assert torch.equal(d.stages[0][0][0].weight, e.stages[0][0][0].weight)
    with pytest.raises(ValueError, match="powers of two"):
        TinyBackbone(strides=(8, 12))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        a(torch.rand(3, 32, 32))


# ---------------------------------------------------------------------------- RPN training


class SquaresSet:
    """Tiny synthetic detection set: 1-2 bright squares on a dark noisy 64x64 background."""

    def __init__(self, n=4, size=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            img = torch.rand(3, size, size, generator=g) * 0.2
            boxes = []
            for _ in range(1 + int(torch.randint(0, 2, (1,), generator=g))):
                s = int(torch.randint(14, 30, (1,), generator=g))
                x, y = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
                img[:, y : y + s, x : x + s] = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5
                boxes.append([x, y, x + s, y + s])
            self.items.append(
                (
                    img,
                    {
                        "boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.ones(len(boxes), dtype=torch.int64),
                    },
                )
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _tiny_rpn():
    from mrcnn_edu.anchors import AnchorGenerator
    from mrcnn_edu.rpn import RegionProposalNetwork, RPNHead

    torch.manual_seed(0)
    backbone = TinyBackbone(out_channels=16, strides=(8,), width=8, depth=1)
    anchor_gen = AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),))
    head = RPNHead(16, anchor_gen.num_anchors_per_location()[0])
    rpn = RegionProposalNetwork(
        anchor_gen,
        head,
        batch_size_per_image=64,
        pre_nms_top_n={"training": 200, "testing": 100},
        post_nms_top_n={"training": 100, "testing": 50},
    )
    return backbone, rpn


def _fixed_batch_loss(backbone, rpn, data):
    """RPN loss on all images with a fixed sampling seed (same sampled anchors every call)."""
    from mrcnn_edu.transforms import batch_images

    images, sizes = batch_images([im for im, _ in data.items])
    targets = [{"boxes": t["boxes"]} for _, t in data.items]
    backbone.train()
    rpn.train()
    with torch.no_grad():
        _, losses = rpn(
            images, sizes, backbone(images), targets, generator=torch.Generator().manual_seed(123)
        )
    return {k: float(v) for k, v in losses.items()}


@pytest.fixture
def one_thread():
    """Train on one intra-op thread: tiny convs gain nothing from more, and on a busy 2-core
    machine OpenMP threads waiting on each other made these steps ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_rpn_reduces_loss_and_is_deterministic(one_thread):
    data = SquaresSet()
    images, gt_boxes = [im for im, _ in data.items], [t["boxes"] for _, t in data.items]
    backbone, rpn = _tiny_rpn()
    before = _fixed_batch_loss(backbone, rpn, data)
    recall_before = proposal_recall(
        predict_proposals(backbone, rpn, images),
        gt_boxes,
        num_proposals=(5,),
        iou_thresholds=(0.7,),
    )
    steps = []
    hist = train_rpn(
        backbone,
        rpn,
        data,
        iterations=25,
        batch_size=2,
        lr=1e-2,
        seed=0,
        progress=False,
        callback=lambda step, rec: steps.append((step, rec["loss"])),
    )
    after = _fixed_batch_loss(backbone, rpn, data)
    assert set(hist) >= {"step", "loss", "loss_objectness", "loss_rpn_box_reg", "lr", "seconds"}
    assert hist["step"] == list(range(25)) and len(hist["loss"]) == 25
    assert steps == list(zip(hist["step"], hist["loss"]))
    for k in ("loss", "loss_objectness", "loss_rpn_box_reg"):
        assert all(math.isfinite(v) for v in hist[k])
    total_before = before["loss_objectness"] + before["loss_rpn_box_reg"]
    total_after = after["loss_objectness"] + after["loss_rpn_box_reg"]
    assert total_after < 0.5 * total_before, (before, after)
    assert after["loss_objectness"] < before["loss_objectness"]

    # same seeds -> the same run, bit for bit
    backbone2, rpn2 = _tiny_rpn()
    hist2 = train_rpn(
        backbone2, rpn2, data, iterations=25, batch_size=2, lr=1e-2, seed=0, progress=False
    )
    assert hist2["loss"] == hist["loss"]

    # the trained RPN proposes boxes inside the image, and its top 5 cover the squares better
    proposals = predict_proposals(backbone, rpn, images)
    assert len(proposals) == len(data)
    for p in proposals:
        assert p.dim() == 2 and p.shape[1] == 4 and 0 < p.shape[0] <= 50
        assert float(p.min()) >= 0 and float(p.max()) <= 64
    assert backbone.training and rpn.training  # modes restored
    recall = proposal_recall(proposals, gt_boxes, num_proposals=(5,), iou_thresholds=(0.7,))
    assert recall[(5, 0.7)] >= recall_before[(5, 0.7)] + 0.4, (recall_before, recall)


def test_train_rpn_bad_input():
    backbone, rpn = _tiny_rpn()
    with pytest.raises(ValueError, match="iterations"):
        train_rpn(backbone, rpn, SquaresSet(n=1), iterations=0, progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train_rpn(backbone, rpn, SquaresSet(n=1), iterations=1, optimizer="lbfgs", progress=False)
    bad = [(torch.rand(32, 32), {"boxes": torch.zeros(0, 4)})]
    with pytest.raises(ValueError, match=r"dataset\[0\] image must be a \[3, H, W\]"):
        train_rpn(backbone, rpn, bad, iterations=1, progress=False)
    bad = [(torch.rand(3, 32, 32), {"labels": torch.zeros(0)})]
    with pytest.raises(ValueError, match="'boxes'"):
        train_rpn(backbone, rpn, bad, iterations=1, progress=False)


def test_train_rpn_device_moves_both_modules(one_thread):
    backbone, rpn = _tiny_rpn()
    moved = []
    for name, module in (("backbone", backbone), ("rpn", rpn)):
        to = module.to
        module.to = lambda *a, _to=to, _name=name, **k: (moved.append((_name, a)), _to(*a, **k))[1]
    train_rpn(
        backbone, rpn, SquaresSet(n=2), iterations=1, batch_size=1, device="cpu", progress=False
    )
    assert moved == [("backbone", (torch.device("cpu"),)), ("rpn", (torch.device("cpu"),))]


# ------------------------------------------------------------------------- anchor drawings


def test_anchors_at_hand_computed():
    from mrcnn_edu.widgets.anchors import anchors_at

    # size 32, ratio 1 at stride 16, cell (x=3, y=4): centred on (48, 64)
    a = anchors_at((256, 256), (32,), (1.0,), 16, 3, 4)
    torch.testing.assert_close(a, torch.tensor([[32.0, 48.0, 64.0, 80.0]]))
    # ratio h / w = 4 keeps the area: w = 32 / 2 = 16, h = 64 (centred on (0, 0) at cell (0, 0))
    a = anchors_at((64, 64), (16, 32), (4.0,), 8, 0, 0)
    torch.testing.assert_close(
        a, torch.tensor([[-4.0, -16.0, 4.0, 16.0], [-8.0, -32.0, 8.0, 32.0]])
    )
    with pytest.raises(ValueError, match="outside"):
        anchors_at((64, 64), (16,), (1.0,), 8, 8, 0)


def test_draw_anchors_labels_and_explorer():
    import ipywidgets
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mrcnn_edu.widgets.anchors import LABEL_COLORS, anchor_explorer, draw_anchors

    image = torch.rand(3, 40, 60)
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 30], [-5, -5, 70, 30], [1, 1, 2, 2]])
    labels = torch.tensor([1, 0, -1, 1])
    fig, ax = plt.subplots()
    draw_anchors(ax, image, anchors, labels=labels, gt_boxes=torch.tensor([[1.0, 1, 9, 9]]))
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 5
    greens = [r for r in rects if r.get_edgecolor() == matplotlib.colors.to_rgba(LABEL_COLORS[1])]
    assert sorted((r.get_x(), r.get_width()) for r in greens) == [(0.0, 10.0), (1.0, 1.0)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["ignored (1)", "negative (1)", "positive (2)"]
    assert ax.get_xlim() == (-5.0, 70.0)  # the anchor sticking out stays visible
    plt.close(fig)
    with pytest.raises(ValueError, match="labels has 3 entries for 4 anchors"):
        draw_anchors(plt.gca(), image, anchors, labels=labels[:3])
    plt.close("all")

    explorer = anchor_explorer(torch.rand(3, 64, 96))
    assert isinstance(explorer, ipywidgets.VBox)
    assert isinstance(explorer.children[-1], ipywidgets.Output)
    (sizes_w, _ratios_w), (stride_w, x_w, y_w, _) = (
        c.children for c in explorer.children[0].children
    )
    stride_w.value = 8  # 64x96 image -> 8x12 feature map; the location keeps its pixel position
    assert (x_w.max, y_w.max) == (11, 7)
    assert (x_w.value, y_w.value) == (6, 4)
    sizes_w.value = ()  # nothing to draw must not raise
    plt.close("all")

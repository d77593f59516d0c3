"""Mixed precision on the real model: the ``shapes`` preset's Mask R-CNN under ``torch.autocast``.

The layers (convs, linears) run in bfloat16 / float16, the geometry (anchors, box coding,
matching, NMS, RoI sampling, post-processing, pasting) and the losses in float32
(``mrcnn_edu.utils.full_precision``). The reference is the same model, with the same weights
and the same seed, in float32. Tolerances come from the formats: bfloat16 keeps 8 significant
bits (a relative rounding of 2^-9 = 0.2 % per operation, a few tenths of a percent after the
twenty-odd layers), float16 11 bits; so a loss agrees with float32 to ``rtol = 5e-2``. A box
corner near pixel 128 is a bfloat16 number in steps of 0.5 pixel (1 pixel from 256 on): boxes
computed in float32 from bfloat16 deltas agree with float32's to 0.1 pixel, boxes computed in
bfloat16 would not.

On a CPU without bfloat16 instructions torch runs bfloat16 / float16 convolutions on its slow
path (ten times slower than float32): the images are small and each run is shared by the tests.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mrcnn_edu.config import get_preset, override
from mrcnn_edu.data import shapes_dataset
from mrcnn_edu.data.shapes import write_shapes_dataset
from mrcnn_edu.model import build_model
from mrcnn_edu.ops import box_iou
from mrcnn_edu.utils import autocast_disabled, full_precision, upcast

LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}


def cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast("cpu", dtype=dtype)`` really casts (older torch versions warn
    and disable autocast for a dtype the CPU backend does not support)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype):
            x = torch.ones(2, 2)
            return (x @ x).dtype == dtype


DTYPES = [
    torch.bfloat16,
    pytest.param(
        torch.float16,
        marks=pytest.mark.skipif(
            not cpu_autocast_supports(torch.float16),
            reason="this torch's CPU autocast has no float16",
        ),
    ),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for the module's shared runs too (a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Two 128 x 128 synthetic shapes images with their targets (boxes, labels, masks)."""
    root = tmp_path_factory.mktemp("shapes_amp")
    write_shapes_dataset(root, train=2, val=1, size=128, seed=5, progress=False)
    ds = shapes_dataset(root, "train")
    images, targets = zip(*[ds[i] for i in range(2)])
    assert all(len(t["boxes"]) > 0 for t in targets)
    return list(images), list(targets)


def shapes_model():
    """The ``shapes`` preset (num_classes 4) with fixed (seeded) weights, at the images' size
    (no resize: detections in the resized and the original image coincide)."""
    cfg = get_preset("shapes")
    assert cfg.num_classes == 4
    override(cfg, {"transform.min_size": (128,), "transform.max_size": 160})
    torch.manual_seed(0)
    return build_model(cfg)


def autocast(dtype):
    """``dtype`` None: float32 (autocast off)."""
    return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)


def train_step(model, images, targets, dtype):
    """One train-mode forward + backward; the stages and the gradients of every trainable
    parameter. Reseeded first: the RPN's anchor sampling and the box head's RoI sampling draw
    from torch's global RNG."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with autocast(dtype):
        stages = model.run_stages(images, targets)
    sum(stages["losses"].values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return stages, grads


@pytest.fixture(scope="module")
def train_runs(batch):
    images, targets = batch
    model = shapes_model().train()
    runs = {None: train_step(model, images, targets, None)}
    for dtype in (torch.bfloat16, torch.float16):
        if cpu_autocast_supports(dtype):
            runs[dtype] = train_step(model, images, targets, dtype)
    return runs


@pytest.fixture(scope="module")
def eval_runs(batch):
    """Eval mode, float32 and each low precision: the whole model, and the RoI heads of the
    low-precision run on float32's proposals (so both pick from the same candidates)."""
    images, _ = batch
    model = shapes_model().eval()
    runs = {}
    with torch.no_grad():
        runs[None] = model.run_stages(images)
        for dtype in (torch.bfloat16, torch.float16):
            if not cpu_autocast_supports(dtype):
                continue
            with autocast(dtype):
                stages = model.run_stages(images)
                shared, _ = model.roi_heads(
                    stages["features"], runs[None]["proposals"], stages["image_sizes"]
                )
            runs[dtype] = (stages, shared)
    return runs


# ------------------------------------------------------------------------------------ helpers
def test_full_precision_upcasts_and_turns_autocast_off():
    seen = {}

    @full_precision
    def f(x, boxes, *, k):
        seen.update(x=x.dtype, boxes=[b.dtype for b in boxes], k=k.dtype)
        seen["matmul"] = (x @ x).dtype
        return x

    x = torch.ones(2, 2, dtype=torch.bfloat16, requires_grad=True)
    boxes = [torch.ones(1, 4, dtype=torch.float16), torch.ones(1, 4, dtype=torch.float64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = f(x, boxes, k=torch.ones(1, dtype=torch.float16))
        assert torch.is_autocast_enabled("cpu")  # back on after the call
    assert seen == {
        "x": torch.float32,
        "boxes": [torch.float32, torch.float64],
        "k": torch.float32,
        "matmul": torch.float32,
    }
    out.sum().backward()  # the upcast is differentiable
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad.float(), torch.ones(2, 2))

    # float32 / float64 and non-tensors pass as the same objects, and nothing is entered
    a, b = torch.ones(3), [torch.ones(2, dtype=torch.float64)]
    assert upcast(a) is a and upcast(b) is b and upcast(3) == 3
    with autocast_disabled():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("op", ["align", "pool"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pooler_takes_low_precision_features_with_float32_boxes(op, dtype):
    """Under autocast the features are bf16 / fp16 and the boxes float32: the pooler pools in
    float32 (``mrcnn_edu.ops``) and returns the features' dtype, exactly the float32 pooling of
    the same (upcast) features rounded once; a float32 feature map with bfloat16 boxes is
    still an error."""
    from mrcnn_edu.poolers import MultiLevelRoIPooler

    g = torch.Generator().manual_seed(0)
    feats = {
        str(i): torch.randn(2, 8, 64 >> i, 80 >> i, generator=g).to(dtype) for i in range(4)
    }  # strides 4..32 of a 256 x 320 batch
    boxes = [
        torch.tensor([[3.3, 4.1, 40.7, 30.2], [10.0, 20.0, 250.5, 200.25]]),
        torch.tensor([[100.6, 60.2, 160.9, 190.4]]),
    ]
    pooler = MultiLevelRoIPooler(list(feats), 7, 2, op=op)
    with torch.autocast("cpu", dtype=dtype):
        out = pooler(feats, boxes, [(256, 320), (250, 300)])
    ref = pooler({k: v.float() for k, v in feats.items()}, boxes, [(256, 320), (250, 300)])
    assert out.dtype == dtype and out.shape == (3, 8, 7, 7)
    assert torch.equal(out, ref.to(dtype))
    with pytest.raises(TypeError, match="proposals\\[0\\] is torch.bfloat16"):
        pooler(
            {k: v.float() for k, v in feats.items()},
            [b.to(torch.bfloat16) for b in boxes],
            [(256, 320), (250, 300)],
        )


# ----------------------------------------------------------------------------------- training
@pytest.mark.parametrize("dtype", DTYPES)
def test_train_runs_layers_low_and_geometry_in_float32(train_runs, dtype):
    stages, _ = train_runs[dtype]
    # the network ran in low precision ...
    assert {f.dtype for f in stages["features"].values()} == {dtype}
    assert stages["train_class_logits"].dtype == dtype
    assert stages["train_mask_logits"].dtype == dtype
    # ... the geometry in float32
    assert all(p.dtype == torch.float32 for p in stages["proposals"])
    for s in stages["sampled_rois"]:
        assert s.proposal_boxes.dtype == torch.float32
        assert s.regression_targets.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_losses_are_finite_float32_and_close_to_float32s(train_runs, dtype):
    ref = train_runs[None][0]["losses"]
    losses = train_runs[dtype][0]["losses"]
    assert set(losses) == set(ref) == LOSSES
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        assert math.isfinite(value.item()), name
        assert value.item() == pytest.approx(ref[name].item(), rel=5e-2), name


def cosine(a: dict, b: dict, names) -> float:
    """Cosine of the angle between two gradients (the named parameters' flattened, in
    float64: a float32 sum over millions of products drifts by more than the test's margin)."""
    flat_a = torch.cat([a[n].flatten() for n in names]).double()
    flat_b = torch.cat([b[n].flatten() for n in names]).double()
    return float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_gradients_are_finite_and_point_where_float32s_do(train_runs, dtype):
    """Every trainable parameter gets a finite float32 gradient, in the direction of
    float32's. The heads' gradients (one or a few layers from the losses) agree to a cosine
    above 0.99 in both formats. The ResNet's have twenty low-precision backward layers to
    travel, and their error grows with that depth: bfloat16's 8-bit significand leaves a cosine
    near 0.99 at res5 and near 0.94 at conv1 (0.965 for the whole model here), float16's 11
    bits one above 0.99 everywhere; hence 0.9 and 0.99 for the whole model."""
    ref = train_runs[None][1]
    grads = train_runs[dtype][1]
    assert set(grads) == set(ref) and len(grads) > 0
    for name, g in grads.items():
        assert g is not None, name
        assert g.dtype == torch.float32, name  # parameters (and so gradients) stay float32
        assert torch.isfinite(g).all(), name
    heads = [n for n in grads if n.startswith(("rpn.", "roi_heads.", "backbone.fpn."))]
    assert any(n.startswith("rpn.") for n in heads) and any(n.startswith("roi_") for n in heads)
    assert cosine(grads, ref, heads) > 0.99
    assert cosine(grads, ref, list(grads)) > (0.9 if dtype == torch.bfloat16 else 0.99)


# ---------------------------------------------------------------------------------- inference
#: Per format, how far a low-precision detection may lie from float32's (fp16 has 3 more significand
#: bits than bf16: 8 times smaller). Boxes: decoded in float32 from deltas off by ~1 % (bf16),
#: measured within 0.025 pixel (bf16) / 0.002 (fp16); boxes computed in bfloat16 would sit on
#: its 0.5-pixel grid near pixel 128. Scores: measured within 7e-4 / 1e-4. Mask probabilities:
#: the mask logits span +-30 here and are off by ~2 % (bf16) / 0.25 % (fp16) of that, i.e.
#: 0.6 / 0.075 in logit, 0.15 / 0.02 in probability after the sigmoid's slope of at most 1/4.
TOLERANCES = {
    torch.bfloat16: {"box": 0.1, "score": 1e-2, "mask": 0.15},
    torch.float16: {"box": 0.02, "score": 2e-3, "mask": 0.02},
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_whole_model_detections_are_float32_and_mostly_float32s(eval_runs, batch, dtype):
    """The whole model in eval mode: float32 boxes, scores and pasted masks inside the image,
    and most of float32's 10 best detections found again (same class, corners within
    :data:`TOLERANCES`). Not all: the untrained RPN's scores are near-equal, and a rounding can
    swap two of them at the top-k or NMS step, so a proposal (and its detection) changes; 19
    of 20 are found here. Boxes rounded to bfloat16's 0.5-pixel grid would find almost none."""
    stages, _ = eval_runs[dtype]
    ref = eval_runs[None]["detections"]
    found = 0
    assert {f.dtype for f in stages["features"].values()} == {dtype}
    for det, image in zip(stages["detections"], batch[0]):
        assert len(det["boxes"]) > 0
        for key in ("boxes", "scores", "masks"):
            assert det[key].dtype == torch.float32, key
            assert torch.isfinite(det[key]).all(), key
        assert det["labels"].dtype == torch.int64
        H, W = image.shape[-2:]
        assert det["masks"].shape[1:] == (1, H, W)
        assert (det["boxes"] >= 0).all() and (det["boxes"][:, 2] <= W).all()
        assert (det["boxes"][:, 3] <= H).all()
    for det, det32 in zip(stages["detections"], ref):
        for j in range(10):
            same = det["labels"] == det32["labels"][j]
            err = (det["boxes"][same] - det32["boxes"][j]).abs().amax(dim=1)  # [n_same]
            found += bool((err <= TOLERANCES[dtype]["box"]).any())
    assert found >= 10  # of 20


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_top_detections_match_float32s(eval_runs, dtype):
    """On float32's proposals, each of float32's 10 best detections has a low-precision
    detection of the same class (the one whose box overlaps it most) with the same box, score
    and 28 x 28 mask probabilities, within :data:`TOLERANCES`. (On its own proposals the
    low-precision model may rank two near-equal RPN scores of the untrained model the other way
    round and propose a different box: the whole-model test above allows for that.)"""
    tol = TOLERANCES[dtype]
    ref = eval_runs[None]["instances"]
    _, shared = eval_runs[dtype]
    for a, b in zip(ref, shared):
        assert len(a) >= 10
        for key in ("pred_boxes", "pred_scores", "pred_masks"):
            assert b.get(key).dtype == torch.float32, key
        for j in range(10):
            same = torch.where(b.pred_labels == a.pred_labels[j])[0]
            assert len(same) > 0
            k = same[box_iou(a.pred_boxes[j : j + 1], b.pred_boxes[same])[0].argmax()]
            torch.testing.assert_close(b.pred_boxes[k], a.pred_boxes[j], rtol=0, atol=tol["box"])
            torch.testing.assert_close(
                b.pred_scores[k], a.pred_scores[j], rtol=0, atol=tol["score"]
            )
            torch.testing.assert_close(b.pred_masks[k], a.pred_masks[j], rtol=0, atol=tol["mask"])

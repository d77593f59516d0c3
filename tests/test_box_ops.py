"""NMS, batched NMS and box IoU: every backend against torchvision and hand-computed values.

Exactness is bit for bit: same kept indices in the same order (ties included) and identical IoU
values. The "cuda" backend runs on Numba's CUDA simulator when there is no GPU (conftest sets
``NUMBA_ENABLE_CUDASIM=1``), which is slow, so it sees only tiny inputs (<= 130 boxes: three
64-box blocks).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from mrcnn_edu.ops import batched_nms, box_iou, nms

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"  # where the "cuda" backend's inputs live
ALL_BACKENDS = ["reference", "numba", "cuda", "torchvision"]


def _device_for(backend: str) -> str:
    return DEVICE if backend == "cuda" else "cpu"


def random_boxes(
    n: int,
    seed: int,
    image: float = 200.0,
    max_size: float = 60.0,
    num_score_levels: int = 5,
    dtype=torch.float32,
):
    """``n`` overlapping random boxes with many tied scores and some exact duplicate boxes."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * image  # [n, 2] top-left corners
    wh = 1 + torch.rand(n, 2, generator=g) * max_size  # [n, 2] sizes >= 1
    boxes = torch.cat([xy, xy + wh], dim=1)  # [n, 4]
    if n > 4:  # a quarter of the rows repeat other rows exactly (identical boxes)
        dup = torch.randint(0, n, (n // 4,), generator=g)
        boxes[torch.randint(0, n, (n // 4,), generator=g)] = boxes[dup]
    # Few distinct score values: many ties, so the tie order is tested.
    scores = torch.randint(0, num_score_levels, (n,), generator=g).float() / num_score_levels
    return boxes.to(dtype), scores.to(dtype)


# ----------------------------------------------------------------------------- NMS exactness

NMS_CASES = [  # (n, seed, threshold)
    (1, 0, 0.5),
    (2, 1, 0.3),
    (10, 2, 0.9),
    (257, 3, 0.5),
    (1000, 4, 0.3),
    (1000, 5, 0.7),
    (2000, 6, 0.9),
    (5000, 7, 0.5),
    (10000, 8, 0.7),
]


@pytest.mark.parametrize("n,seed,thr", NMS_CASES)
def test_nms_numba_matches_torchvision(n, seed, thr):
    boxes, scores = random_boxes(n, seed, image=20.0 * n**0.5)
    expected = torchvision.ops.nms(boxes, scores, thr)
    assert 0 < expected.numel() < n or n <= 2  # the case really suppresses something
    kept = nms(boxes, scores, thr, backend="numba")
    assert kept.dtype == torch.int64
    assert torch.equal(kept, expected)


# The reference loops in Python once per kept box: smaller sets.
@pytest.mark.parametrize("n,seed,thr", NMS_CASES[:4] + [(600, 4, 0.3), (600, 6, 0.9)])
def test_nms_reference_matches_torchvision(n, seed, thr):
    boxes, scores = random_boxes(n, seed, image=20.0 * n**0.5)
    assert torch.equal(
        nms(boxes, scores, thr, backend="reference"), torchvision.ops.nms(boxes, scores, thr)
    )


@pytest.mark.parametrize("n,seed,thr", [(130, 11, 0.5), (100, 12, 0.3)])
def test_nms_cuda_matches_torchvision(n, seed, thr):
    boxes, scores = random_boxes(n, seed, image=80.0)
    expected = torchvision.ops.nms(boxes, scores, thr)
    assert 0 < expected.numel() < n
    kept = nms(boxes.to(DEVICE), scores.to(DEVICE), thr, backend="cuda")
    assert kept.dtype == torch.int64 and kept.device.type == DEVICE
    assert torch.equal(kept.cpu(), expected)


def test_nms_auto_is_numba_on_cpu_and_leaves_inputs_alone():
    boxes, scores = random_boxes(300, 21)
    boxes_before, scores_before = boxes.clone(), scores.clone()
    assert torch.equal(nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    assert torch.equal(boxes, boxes_before) and torch.equal(scores, scores_before)


def test_nms_float64_and_non_contiguous():
    boxes, scores = random_boxes(500, 31, image=300.0, dtype=torch.float64)
    expected = torchvision.ops.nms(boxes, scores, 0.6)
    for backend in ["reference", "numba"]:
        assert torch.equal(nms(boxes, scores, 0.6, backend=backend), expected)
    # A column-major view and a strided score view give the same answer.
    boxes_t = boxes.t().contiguous().t()
    scores_s = torch.stack([scores, scores], 1)[:, 0]
    assert torch.equal(nms(boxes_t, scores_s, 0.6, backend="numba"), expected)


# ----------------------------------------------------------------------------- NMS edge cases


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nms_hand_computed(backend):
    dev = _device_for(backend)
    # IoU(A, B) = 81 / (100 + 100 - 81) = 0.68; C overlaps nothing.
    boxes = torch.tensor([[1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.7, 0.9])
    assert nms(boxes.to(dev), scores.to(dev), 0.5, backend=backend).tolist() == [2, 1]
    assert nms(boxes.to(dev), scores.to(dev), 0.7, backend=backend).tolist() == [2, 0, 1]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nms_empty_single_identical_degenerate(backend):
    dev = _device_for(backend)
    empty = nms(torch.zeros(0, 4, device=dev), torch.zeros(0, device=dev), 0.5, backend=backend)
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    one = nms(
        torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=dev),
        torch.tensor([0.3], device=dev),
        0.5,
        backend=backend,
    )
    assert one.tolist() == [0]
    # Identical boxes with equal scores: the lowest index wins the tie.
    same = torch.tensor([[5.0, 5.0, 9.0, 9.0]] * 6, device=dev)
    assert nms(same, torch.ones(6, device=dev), 0.9, backend=backend).tolist() == [0]
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9, 0.9], device=dev)
    assert nms(same, scores, 0.9, backend=backend).tolist() == [4]
    # Zero-area boxes: IoU is 0/0 = nan, which never suppresses (as torchvision).
    flat = torch.tensor(
        [[1.0, 1.0, 1.0, 5.0], [1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0]], device=dev
    )
    flat_scores = torch.tensor([0.5, 0.6, 0.7], device=dev)
    assert nms(flat, flat_scores, 0.1, backend=backend).tolist() == [2, 1, 0]
    assert torchvision.ops.nms(flat.cpu(), flat_scores.cpu(), 0.1).tolist() == [2, 1, 0]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nms_threshold_is_strict_and_compared_in_float64(backend):
    dev = _device_for(backend)
    # IoU exactly 0.5 (50 / 100): suppressed only when iou > threshold.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]], device=dev)
    scores = torch.tensor([0.9, 0.8], device=dev)
    assert nms(boxes, scores, 0.5, backend=backend).tolist() == [0, 1]
    assert nms(boxes, scores, 0.4999, backend=backend).tolist() == [0]
    # IoU = 1/3 in float32 is f = 0.3333333432674408 (rounded up). A threshold just below f
    # rounds to f in float32: a float32 comparison f > f would keep box 1, but torchvision
    # compares in float64 (f > threshold) and suppresses it.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0]], device=dev)
    f = float(torchvision.ops.box_iou(boxes[:1].cpu(), boxes[1:].cpu()))
    threshold = f - 1e-12
    assert float(torch.tensor(threshold, dtype=torch.float32)) == f
    assert torchvision.ops.nms(boxes.cpu(), scores.cpu(), threshold).tolist() == [0]
    assert nms(boxes, scores, threshold, backend=backend).tolist() == [0]


# ----------------------------------------------------------------------------- batched NMS


@pytest.mark.parametrize(
    "backend,n,categories",
    [
        ("reference", 500, 4),
        ("numba", 900, 4),
        ("cuda", 100, 4),
        ("torchvision", 500, 4),
        ("reference", 1100, 30),
        ("numba", 6000, 30),
    ],
)
def test_batched_nms_matches_torchvision(backend, n, categories):
    # Up to 4000 coordinates (n * 4) torchvision shifts the boxes by category and runs one NMS;
    # above, it runs one NMS per category: the last two cases (tied scores, five levels, check
    # that the kept boxes come out in its order too). The loop over categories is the same
    # code for every backend; "cuda" on the simulator would take 9 s above the limit.
    boxes, scores = random_boxes(n, 41 + n, image=10.0 * n**0.5)
    idxs = torch.randint(0, categories, (n,), generator=torch.Generator().manual_seed(n))
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert 0 < expected.numel() < n
    dev = _device_for(backend)
    kept = batched_nms(boxes.to(dev), scores.to(dev), idxs.to(dev), 0.5, backend=backend)
    assert torch.equal(kept.cpu(), expected)


def test_batched_nms_separates_classes_and_handles_empty():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    scores = torch.tensor([0.9, 0.8, 0.7])
    idxs = torch.tensor([0, 1, 0], dtype=torch.int32)
    for backend in ["reference", "numba"]:
        assert batched_nms(boxes, scores, idxs, 0.5, backend=backend).tolist() == [0, 1]
        empty = batched_nms(
            torch.zeros(0, 4),
            torch.zeros(0),
            torch.zeros(0, dtype=torch.int64),
            0.5,
            backend=backend,
        )
        assert empty.dtype == torch.int64 and empty.shape == (0,)


# ----------------------------------------------------------------------------- box IoU


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_box_iou_hand_computed(backend):
    dev = _device_for(backend)
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], device=dev)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]], device=dev)
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 0.25, 0.0]])
    iou = box_iou(a, b, backend=backend)
    assert iou.shape == (2, 3) and iou.dtype == torch.float32 and iou.device.type == dev
    torch.testing.assert_close(iou.cpu(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "backend,n,m,dtype",
    [
        ("reference", 37, 53, torch.float32),
        ("numba", 37, 53, torch.float32),
        ("numba", 300, 200, torch.float32),
        ("numba", 120, 90, torch.float64),
        ("reference", 120, 90, torch.float64),
        ("cuda", 20, 33, torch.float32),
        ("cuda", 5, 7, torch.float64),
        ("numba", 0, 5, torch.float32),
        ("numba", 5, 0, torch.float32),
        ("reference", 0, 0, torch.float32),
    ],
)
def test_box_iou_matches_torchvision_exactly(backend, n, m, dtype):
    boxes1, _ = random_boxes(n, 51, image=50.0, dtype=dtype)
    boxes2, _ = random_boxes(m, 52, image=50.0, dtype=dtype)
    boxes2[:1] = boxes1[:1] if n and m else boxes2[:1]  # one identical pair: IoU 1
    expected = torchvision.ops.box_iou(boxes1, boxes2)
    dev = _device_for(backend)
    iou = box_iou(boxes1.to(dev), boxes2.to(dev), backend=backend)
    assert iou.shape == (n, m) and iou.dtype == dtype
    assert torch.equal(iou.cpu(), expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_box_iou_takes_what_torchvision_takes(backend):
    """Integer, float16 and bfloat16 boxes, and batched [..., N, 4] inputs whose batch
    dimensions broadcast: same values, dtype and shape as torchvision.ops.box_iou."""
    dev = _device_for(backend)
    boxes1, _ = random_boxes(9, 61, image=50.0)
    boxes2, _ = random_boxes(7, 62, image=50.0)
    boxes2[:1] = boxes1[:1]
    # small integers: every difference and area is exact in float16/bfloat16 and float32, so
    # torchvision's arithmetic (half-precision differences, float32 areas) gives exact numbers
    for dtype in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
        torch.float16,
        torch.bfloat16,
    ):
        a, b = boxes1.round().to(dtype), boxes2.round().to(dtype)
        # torchvision subtracts uint8 corners in uint8, which wraps around below 0 (negative
        # IoUs): its int64 answer is the reference there
        expected = torchvision.ops.box_iou(
            *(t.long() if dtype == torch.uint8 else t for t in (a, b))
        )
        iou = box_iou(a.to(dev), b.to(dev), backend=backend)
        assert iou.dtype == expected.dtype == torch.float32, dtype
        assert torch.equal(iou.cpu(), expected), dtype
    # fractional float16 boxes: torchvision rounds x2 - x1 to float16, we keep it in float32
    a, b = boxes1.half(), boxes2.half()
    torch.testing.assert_close(
        box_iou(a.to(dev), b.to(dev), backend=backend).cpu(),
        torchvision.ops.box_iou(a, b),
        rtol=0,
        atol=2e-3,
    )
    # batched: [2, 3, N, 4] x [3, M, 4] and [2, 1, N, 4] x [1, 4, M, 4]
    g = torch.Generator().manual_seed(63)
    for shape1, shape2 in (
        ((2, 3, 5), (3, 4)),
        ((2, 1, 5), (1, 4, 4)),
        ((3, 0), (3, 2)),
        ((2, 6), (2, 0)),
    ):
        a = torch.rand(*shape1, 4, generator=g) * 20
        b = torch.rand(*shape2, 4, generator=g) * 20
        a[..., 2:] += a[..., :2]
        b[..., 2:] += b[..., :2]
        expected = torchvision.ops.box_iou(a, b)
        iou = box_iou(a.to(dev), b.to(dev), backend=backend)
        assert iou.shape == expected.shape and torch.equal(iou.cpu(), expected), (shape1, shape2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_of_huge_boxes_is_computed_without_overflow(backend, dtype):
    """Areas of 1e40 overflow float32 (torchvision returns nan for two equal such boxes); the
    boxes are scaled by a power of two first, so the IoU is the float64 value (1 for equal
    boxes) and ordinary boxes in the same call keep their exact IoU."""
    dev = _device_for(backend)
    big = torch.finfo(dtype).max / 4
    boxes = torch.tensor(
        [[0.0, 0.0, 1.0, 1.0], [-big, -big, big, big], [0.0, 0.0, big, big], [0.0, 0.0, 2.0, 1.0]],
        dtype=torch.float64,
    ).to(dtype)
    iou = box_iou(boxes.to(dev), boxes.to(dev), backend=backend).cpu()
    assert iou.dtype == dtype and torch.isfinite(iou).all()
    assert torch.equal(torch.diagonal(iou), torch.ones(4, dtype=dtype))
    assert iou[1, 2] == iou[2, 1] == 0.25
    assert iou[0, 3] == iou[3, 0] == 0.5  # ordinary boxes: exact, as before
    assert torch.isnan(torchvision.ops.box_iou(boxes[1:2], boxes[1:2])).all()  # the flaw fixed


@pytest.mark.parametrize("backend", ["reference", "numba", "cuda"])
def test_box_iou_zero_area_pair_is_nan_like_torchvision(backend):
    dev = _device_for(backend)
    point = torch.tensor([[3.0, 3.0, 3.0, 3.0]], device=dev)
    box = torch.tensor([[0.0, 0.0, 4.0, 4.0]], device=dev)
    assert torch.isnan(box_iou(point, point, backend=backend)).all()
    assert box_iou(point, box, backend=backend).item() == 0.0


# ----------------------------------------------------------------------------- bad input

_B = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]])
_S = torch.tensor([0.5, 0.6])
_I = torch.tensor([0, 1])


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: nms(_B[:, :3], _S, 0.5), ValueError, r"boxes must have shape \[N, 4\]"),
        (lambda: nms(_B[0], _S, 0.5), ValueError, "boxes must have 2 dimensions"),
        (lambda: nms(_B.tolist(), _S, 0.5), TypeError, "boxes must be a torch.Tensor"),
        (lambda: nms(_B.long(), _S, 0.5), TypeError, "boxes must be float32 or float64"),
        (
            lambda: nms(torch.tensor([[0.0, 0, 1, 1], [2, 0, 1, 1]]), _S, 0.5),
            ValueError,
            r"row 1 .*x2 < x1 or y2 < y1",
        ),
        (lambda: nms(torch.tensor([[0.0, 0, 1, 1], [0, 3, 1, 2]]), _S, 0.5), ValueError, "row 1"),
        (
            lambda: nms(torch.tensor([[0.0, 0, 1, 1], [0, 0, float("nan"), 1]]), _S, 0.5),
            ValueError,
            r"boxes contains NaN or infinite values \(first at row 1\)",
        ),
        (
            lambda: nms(torch.tensor([[0.0, 0, 1, 1], [0, 0, float("inf"), 1]]), _S, 0.5),
            ValueError,
            "NaN or infinite",
        ),
        (
            lambda: nms(_B, torch.tensor([0.5, float("nan")]), 0.5),
            ValueError,
            "scores contains NaN or infinite",
        ),
        (
            lambda: nms(_B, torch.tensor([float("-inf"), 0.5]), 0.5),
            ValueError,
            "scores contains NaN or infinite",
        ),
        (lambda: nms(_B, _S[:1], 0.5), ValueError, "scores has 1 entries but boxes has 2 rows"),
        (lambda: nms(_B, _S.double(), 0.5), TypeError, "scores dtype torch.float64 differs"),
        (lambda: nms(_B, _S.long(), 0.5), TypeError, "scores must be a floating-point tensor"),
        (lambda: nms(_B, _S, float("nan")), ValueError, "iou_threshold must be finite"),
        (lambda: nms(_B, _S, "0.5"), TypeError, "iou_threshold must be a real number"),
        (lambda: nms(_B, _S, 0.5, backend="fast"), ValueError, "unknown backend 'fast'"),
        (lambda: batched_nms(_B, _S, _I.float(), 0.5), TypeError, "idxs must be an integer tensor"),
        (lambda: batched_nms(_B, _S, _I[:1], 0.5), ValueError, "idxs has 1 entries"),
        (lambda: batched_nms(_B, _S, _I[None], 0.5), ValueError, "idxs must have 1 dimensions"),
        (lambda: box_iou(_B, _B[:, :2]), ValueError, r"boxes2 must have shape \[N, 4\]"),
        (lambda: box_iou(_B, _B.double()), TypeError, "boxes2 dtype torch.float64 differs"),
        (
            lambda: box_iou(torch.tensor([[0.0, 0, 1, 1], [3, 0, 1, 1]]), _B),
            ValueError,
            "boxes1 row 1",
        ),
    ],
)
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device to mix devices")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="scores is on cpu but boxes is on cuda"):
        nms(_B.cuda(), _S, 0.5)
    with pytest.raises(ValueError, match="idxs is on cpu but boxes is on cuda"):
        batched_nms(_B.cuda(), _S.cuda(), _I, 0.5)
    with pytest.raises(ValueError, match="boxes2 is on cpu but boxes1 is on cuda"):
        box_iou(_B.cuda(), _B)


def test_device_mismatch_raises_without_gpu():
    # The meta device stands in for a second device: the check fires before any computation.
    with pytest.raises(ValueError, match="scores is on meta but boxes is on cpu"):
        nms(_B, torch.empty(2, device="meta"), 0.5)
    with pytest.raises(ValueError, match="idxs is on meta but boxes is on cpu"):
        batched_nms(_B, _S, torch.empty(2, dtype=torch.int64, device="meta"), 0.5)


@pytest.mark.skipif(not ON_GPU, reason="large cases need a real GPU (the simulator is slow)")
@pytest.mark.parametrize("n,seed,thr", NMS_CASES)
def test_nms_cuda_matches_torchvision_large(n, seed, thr):
    boxes, scores = random_boxes(n, seed, image=20.0 * n**0.5)
    expected = torchvision.ops.nms(boxes, scores, thr)
    kept = nms(boxes.cuda(), scores.cuda(), thr, backend="cuda")
    assert torch.equal(kept.cpu(), expected)
    for dtype in (torch.float64,):
        kept = nms(boxes.to(dtype).cuda(), scores.to(dtype).cuda(), thr, backend="cuda")
        assert torch.equal(kept.cpu(), torchvision.ops.nms(boxes.to(dtype), scores.to(dtype), thr))


def test_nms_input_checks_on_non_contiguous_and_grad_tensors():
    """The compiled CPU checks read strided views and tensors that require grad."""
    boxes = (
        torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, float("nan"), 1]]).t().contiguous().t()
    )
    scores = torch.tensor([0.5, 0.4, 0.3], requires_grad=True)
    with pytest.raises(
        ValueError, match=r"boxes contains NaN or infinite values \(first at row 2\)"
    ):
        nms(boxes, scores, 0.5)
    reversed_then_nan = torch.tensor([[2.0, 0, 1, 1], [0, 0, float("inf"), 1]])
    with pytest.raises(ValueError, match=r"NaN or infinite values \(first at row 1\)"):
        nms(reversed_then_nan, scores[:2], 0.5)
    bad_scores = torch.stack([torch.tensor([0.5, 0.4, float("nan")])] * 2, 1)[:, 0]
    with pytest.raises(
        ValueError, match=r"scores contains NaN or infinite values \(first at row 2\)"
    ):
        nms(boxes[:2].repeat(2, 1)[:3].nan_to_num(), bad_scores, 0.5)

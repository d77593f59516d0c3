"""RoIAlign / RoIPool backends against torchvision (forward and input gradient) and gradcheck.

Every backend must equal ``torchvision.ops.roi_align`` / ``roi_pool`` within 1e-5 (absolute, plus
1e-5 relative for large gradient sums whose summation order differs) in float32. The ``cuda``
backend runs on Numba's CUDA simulator when there is no GPU (conftest.py), so its cases are tiny.
"""

import itertools
import os

import pytest
import torch
import torchvision

from mrcnn_edu.ops import roi_align, roi_pool, roi_reference
from mrcnn_edu.ops._common import cuda_simulator_enabled
from mrcnn_edu.ops.roi import boxes_to_rois

CPU_BACKENDS = ["reference", "numba"]
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float64: {"atol": 1e-10, "rtol": 1e-10}}
HAS_CUDA_KERNELS = torch.cuda.is_available() or cuda_simulator_enabled()


# ---------------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------------
def random_rois(g, N, H, W, scale, K, dtype=torch.float32, allow_reversed=True):
    """K RoIs in image pixels covering the awkward kinds of boxes (one kind per row, cycling):
    inside, partly outside, wholly outside, zero width, zero height, tiny, integer, reversed."""
    img = torch.tensor([W, H, W, H], dtype=torch.float64) / scale
    rows = []
    for k in range(K):
        kind = k % 8
        a, b = (
            torch.rand(2, generator=g, dtype=torch.float64),
            torch.rand(2, generator=g, dtype=torch.float64),
        )
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        box = torch.cat([lo, hi]) * img  # inside the map
        if kind == 1:  # partly outside
            box = box + torch.tensor([-0.5, -0.5, 0.5, 0.5], dtype=torch.float64) * img
        elif kind == 2:  # wholly outside
            shift = (1.3 + torch.rand(1, generator=g, dtype=torch.float64)) * img[:2]
            box = box + (torch.cat([shift, shift]) if k % 16 < 8 else -torch.cat([shift, shift]))
        elif kind == 3:  # zero width
            box[2] = box[0]
        elif kind == 4:  # zero height
            box[3] = box[1]
        elif kind == 5:  # tiny (sub-pixel)
            box[2:] = box[:2] + 0.3 / scale * torch.rand(2, generator=g, dtype=torch.float64)
        elif kind == 6:  # integer coordinates
            box = box.round()
        elif kind == 7 and allow_reversed:  # x2 < x1, y2 < y1
            box = box[[2, 3, 0, 1]]
        n = torch.randint(0, N, (1,), generator=g).to(torch.float64)
        rows.append(torch.cat([n, box]))
    return torch.stack(rows).to(dtype) if rows else torch.zeros(0, 5, dtype=dtype)


def align(backend, *args):
    """t -> roi_align(t, *args) with ``backend`` ("torchvision" calls torchvision directly)."""
    if backend == "torchvision":
        return lambda t: torchvision.ops.roi_align(t, *args)
    return lambda t: roi_align(t, *args, backend=backend)


def pool(backend, *args):
    """t -> roi_pool(t, *args) with ``backend``."""
    if backend == "torchvision":
        return lambda t: torchvision.ops.roi_pool(t, *args)
    return lambda t: roi_pool(t, *args, backend=backend)


def run_both(fn, ref_fn, x, go=None):
    """(out, grad) of fn and of ref_fn on copies of x, with the same upstream gradient."""
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    a, b = fn(xa), ref_fn(xb)
    g = (
        torch.randn(b.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
        if go is None
        else go
    )
    if b.numel():
        a.backward(g)
        b.backward(g)
    return (a, xa.grad), (b, xb.grad)


def assert_matches(got, want, dtype):
    (a, ga), (b, gb) = got, want
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, **TOL[dtype])
    if b.numel():
        torch.testing.assert_close(ga, gb, **TOL[dtype])


ALIGN_GRID = list(
    itertools.product([False, True], [-1, 0, 1, 2, 4], [(1, 1), (7, 7), (14, 14), (3, 5)])
)


# ---------------------------------------------------------------------------------------------
# RoIAlign
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_roi_align_matches_torchvision(backend):
    g = torch.Generator().manual_seed(0)
    for i, (aligned, sr, size) in enumerate(ALIGN_GRID):
        scale = [1.0, 0.25, 1 / 32][i % 3]
        N, C = 2, 3
        H, W = (int(v) for v in torch.randint(3, 14, (2,), generator=g))
        x = torch.randn(N, C, H, W, generator=g)
        # torchvision itself cannot take reversed boxes with aligned=True and adaptive sampling
        rois = random_rois(g, N, H, W, scale, K=8, allow_reversed=not (aligned and sr <= 0))
        args = (rois, size, scale, sr, aligned)
        got, want = run_both(align(backend, *args), align("torchvision", *args), x)
        assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_roi_align_float64_batch_noncontiguous_and_list(backend):
    g = torch.Generator().manual_seed(1)
    # float64, three images
    x = torch.randn(3, 4, 11, 9, generator=g, dtype=torch.float64)
    rois = random_rois(g, 3, 11, 9, 0.5, K=16, dtype=torch.float64, allow_reversed=False)
    for aligned in (False, True):
        args = (rois, (5, 4), 0.5, -1, aligned)
        got, want = run_both(align(backend, *args), align("torchvision", *args), x)
        assert_matches(got, want, torch.float64)
    # non-contiguous input: a channel slice of a transposed map
    big = torch.randn(2, 6, 10, 12, generator=g).transpose(2, 3)[:, ::2]
    assert not big.is_contiguous()
    rois = random_rois(g, 2, 12, 10, 1.0, K=8)
    args = (rois, 7, 1.0, 2, True)
    got, want = run_both(align(backend, *args), align("torchvision", *args), big)
    assert_matches(got, want, torch.float32)
    # channels_last input and list-of-boxes rois
    x = torch.randn(2, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
    boxes = [
        torch.tensor([[0.5, 1.0, 6.0, 7.5], [2.0, 2.0, 3.0, 9.0]]),
        torch.tensor([[1.0, 0.0, 4.0, 4.0]]),
    ]
    args = (boxes, (2, 3), 1.0, 0, False)
    got, want = run_both(align(backend, *args), align("torchvision", *args), x)
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_roi_align_empty_rois(backend):
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    out = roi_align(x, torch.zeros(0, 5), 3, backend=backend)
    assert out.shape == (0, 2, 3, 3)
    out.sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_roi_align_hand_computed():
    """One RoI covering pixels [0, 2] x [0, 2] of a ramp map: 1x1 bin, 2x2 samples at 0.5/1.5."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # value = 4 * y + x
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])
    # samples (y, x) in {0.5, 1.5}^2: a linear map interpolates exactly -> mean = 4 * 1 + 1 = 5
    for backend in CPU_BACKENDS:
        out = roi_align(x, rois, 1, 1.0, 2, False, backend=backend)
        assert out.item() == pytest.approx(5.0)
    # aligned=True shifts the box by -0.5: samples at 0 and 1 -> mean = 4 * 0.5 + 0.5 = 2.5
    for backend in CPU_BACKENDS:
        out = roi_align(x, rois, 1, 1.0, 2, True, backend=backend)
        assert out.item() == pytest.approx(2.5)


def test_reference_chunking(monkeypatch):
    """The reference processes RoIs in chunks; a tiny chunk limit must not change the result."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 9, generator=g)
    rois = random_rois(g, 2, 9, 9, 1.0, K=10, allow_reversed=False)
    want = roi_reference.roi_align_reference(x, rois, (4, 4), 1.0, -1, True)
    monkeypatch.setattr(roi_reference, "_MAX_GATHER", 1)
    got = roi_reference.roi_align_reference(x, rois, (4, 4), 1.0, -1, True)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_roi_align_gradcheck(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(g, 2, 5, 6, 1.0, K=4, dtype=torch.float64, allow_reversed=False)
    for aligned, sr in ((False, 2), (True, -1)):
        assert torch.autograd.gradcheck(align(backend, rois, (3, 2), 1.0, sr, aligned), (x,))


# ---------------------------------------------------------------------------------------------
# RoIPool
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_roi_pool_matches_torchvision(backend):
    g = torch.Generator().manual_seed(4)
    for i, size in enumerate([(1, 1), (7, 7), (14, 14), (3, 5)] * 3):
        scale = [1.0, 0.25, 1 / 32][i % 3]
        N, C = 2, 3
        H, W = (int(v) for v in torch.randint(3, 14, (2,), generator=g))
        x = torch.randn(N, C, H, W, generator=g)
        if i % 4 == 3:  # many ties: the gradient must go to the first maximum, as in torchvision
            x = torch.randint(0, 3, (N, C, H, W), generator=g).float()
        rois = random_rois(g, N, H, W, scale, K=8)
        args = (rois, size, scale)
        got, want = run_both(pool(backend, *args), pool("torchvision", *args), x)
        assert_matches(got, want, torch.float32)
    # float64, list of boxes, non-contiguous input
    x = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64).transpose(2, 3)
    boxes = [
        random_rois(g, 1, 8, 9, 1.0, K=3, dtype=torch.float64)[:, 1:],
        random_rois(g, 1, 8, 9, 1.0, K=5, dtype=torch.float64)[:, 1:],
    ]
    args = (boxes, (2, 3), 1.0)
    got, want = run_both(pool(backend, *args), pool("torchvision", *args), x)
    assert_matches(got, want, torch.float64)


def test_roi_pool_hand_computed():
    """Boxes are rounded half away from zero: x1 = 0.5 -> 1, and the bin covers pixels 1..2."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0.0, 0.5, 0.5, 2.4, 2.4], [0.0, 9.0, 9.0, 12.0, 12.0]])
    for backend in CPU_BACKENDS:
        out = roi_pool(x, rois, 1, backend=backend)
        assert out[0].item() == 10.0  # max over rows 1..2, columns 1..2 = 4 * 2 + 2
        assert out[1].item() == 0.0  # outside the map: empty bin -> 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_roi_pool_gradcheck_and_empty(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rois = random_rois(g, 1, 5, 6, 1.0, K=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, (3, 2), backend=backend), (x,))
    out = roi_pool(x, torch.zeros(0, 5, dtype=torch.float64), 2, backend=backend)
    assert out.shape == (0, 2, 2, 2)


# ---------------------------------------------------------------------------------------------
# cuda backend (Numba's CUDA simulator without a GPU: tiny cases only)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU or NUMBA_ENABLE_CUDASIM=1")
def test_cuda_backend_matches_torchvision():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    cases = [
        (False, -1, (2, 2), 1.0, torch.float32),
        (True, 2, (3, 3), 0.5, torch.float32),
        (True, 0, (2, 3), 1.0, torch.float32),
        (False, 1, (1, 1), 0.25, torch.float64),
    ]
    for aligned, sr, size, scale, dtype in cases:
        x = torch.randn(2, 2, 5, 4, generator=g, dtype=dtype).to(device)
        rois = random_rois(
            g, 2, 5, 4, scale, K=3, dtype=dtype, allow_reversed=not (aligned and sr <= 0)
        ).to(device)
        go = torch.randn(3, 2, *size, generator=g, dtype=dtype).to(device)
        args = (rois, size, scale, sr, aligned)
        got, want = run_both(align("cuda", *args), align("torchvision", *args), x, go)
        assert_matches(got, want, dtype)
        args = (rois, size, scale)
        got, want = run_both(pool("cuda", *args), pool("torchvision", *args), x, go)
        assert_matches(got, want, dtype)
    # list form and K = 0
    x = torch.randn(1, 1, 4, 4, generator=g).to(device)
    boxes = [torch.tensor([[0.0, 0.5, 3.0, 2.0]], device=device)]
    torch.testing.assert_close(
        roi_align(x, boxes, 2, backend="cuda"),
        torchvision.ops.roi_align(x, boxes, 2),
        **TOL[torch.float32],
    )
    assert roi_align(x, torch.zeros(0, 5, device=device), 2, backend="cuda").shape == (0, 1, 2, 2)


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16 (what torchvision's autocast path does: float32 inside, input dtype out)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend", CPU_BACKENDS + ["torchvision"] + (["cuda"] if HAS_CUDA_KERNELS else [])
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_like_torchvision_autocast(backend, dtype):
    device = "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 7, 6, generator=g).to(dtype)
    rois = random_rois(g, 2, 7, 6, 0.5, K=8, allow_reversed=False).to(dtype)
    go = torch.randn(8, 3, 2, 3, generator=g).to(dtype)

    def run(fn, rois_):
        xi = x.detach().clone().to(device).requires_grad_()
        out = fn(xi, rois_.to(device))
        out.backward(go.to(device))
        return out.cpu(), xi.grad.cpu()

    for aligned, sr in ((True, -1), (False, 2)):
        args = ((2, 3), 0.5, sr, aligned)
        out, grad = run(lambda t, r, a=args: roi_align(t, r, *a, backend=backend), rois)
        # torchvision's own autocast path (CPU autocast exists for both dtypes)
        with torch.autocast("cpu", dtype=dtype):
            want = torchvision.ops.roi_align(x, rois, *args)
        assert out.dtype == grad.dtype == dtype and want.dtype == dtype
        assert torch.equal(out, want), (aligned, sr)
        # the gradient is the float32 gradient rounded once to the input's dtype
        x32 = x.detach().float().requires_grad_()
        torchvision.ops.roi_align(x32, rois.float(), *args).backward(go.float())
        torch.testing.assert_close(grad, x32.grad.to(dtype), rtol=0, atol=0)
        # float32 rois with low-precision features (AMP: features in half, boxes in float32)
        out32, _ = run(lambda t, r, a=args: roi_align(t, r, *a, backend=backend), rois.float())
        assert torch.equal(out32, out)
    out, grad = run(lambda t, r: roi_pool(t, r, (2, 3), 0.5, backend=backend), rois)
    want = torchvision.ops.roi_pool(x.float(), rois.float(), (2, 3), 0.5).to(dtype)
    assert out.dtype == grad.dtype == dtype and torch.equal(out, want)


# ---------------------------------------------------------------------------------------------
# Helpers and bad input
# ---------------------------------------------------------------------------------------------
def test_boxes_to_rois():
    rois = boxes_to_rois(
        [
            torch.tensor([[0.0, 1.0, 2.0, 3.0]]),
            torch.zeros(0, 4),
            torch.tensor([[4.0, 5.0, 6.0, 7.0], [1.0, 1.0, 2.0, 2.0]]),
        ]
    )
    assert torch.equal(
        rois,
        torch.tensor(
            [[0.0, 0.0, 1.0, 2.0, 3.0], [2.0, 4.0, 5.0, 6.0, 7.0], [2.0, 1.0, 1.0, 2.0, 2.0]]
        ),
    )
    assert boxes_to_rois([]).shape == (0, 5)
    with pytest.raises(ValueError, match=r"boxes\[1\] must have shape \[K, 4\]"):
        boxes_to_rois([torch.zeros(1, 4), torch.zeros(1, 5)])


@pytest.mark.parametrize("op", [roi_align, roi_pool])
def test_bad_input_errors(op):
    x = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0]])
    with pytest.raises(ValueError, match="input must be .*4 dimensions.*got shape"):
        op(x[0], rois, 2)
    with pytest.raises(ValueError, match=r"rois must be \[K, 5\]"):
        op(x, rois[:, 1:], 2)
    with pytest.raises(ValueError, match=r"rois\[0, 0\] = 2.0 is not a batch index in \[0, 2\)"):
        op(x, torch.tensor([[2.0, 1.0, 1.0, 4.0, 4.0]]), 2)
    with pytest.raises(ValueError, match=r"rois\[1, 0\] = -1.0 is not a batch index"):
        op(x, torch.tensor([[0.0, 1.0, 1.0, 4.0, 4.0], [-1.0, 1.0, 1.0, 4.0, 4.0]]), 2)
    with pytest.raises(ValueError, match="rois contains NaN.*row 0"):
        op(x, torch.tensor([[0.0, float("nan"), 1.0, 4.0, 4.0]]), 2)
    with pytest.raises(
        TypeError, match="rois dtype torch.float64 differs from input dtype torch.float32"
    ):
        op(x, rois.double(), 2)
    with pytest.raises(ValueError, match="rois are on meta but input is on cpu"):
        op(x, rois.to("meta"), 2)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        op(x, rois, 2, backend="fast")
    with pytest.raises(TypeError, match="output_size must be an int or a pair"):
        op(x, rois, (2, 2, 2))
    with pytest.raises(ValueError, match="output_size must be positive"):
        op(x, rois, 0)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        op(x.long(), rois, 2)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        op(x.numpy(), rois, 2)
    with pytest.raises(
        TypeError, match="rois dtype torch.float16 differs from input dtype torch.float32"
    ):
        op(x, rois.half(), 2)


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU or NUMBA_ENABLE_CUDASIM=1")
def test_cuda_backend_noncontiguous_input_and_expanded_grad():
    """A strided input and the stride-0 gradient of ``.sum()`` must be read correctly."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 6, 5, generator=g).transpose(2, 3)[:, ::2].to(device)  # [2, 2, 5, 6]
    assert not x.is_contiguous()
    rois = random_rois(g, 2, 5, 6, 1.0, K=3, allow_reversed=False).to(device)
    for fn, ref in (
        (
            align("cuda", rois, (2, 2), 1.0, 2, True),
            align("torchvision", rois, (2, 2), 1.0, 2, True),
        ),
        (pool("cuda", rois, (2, 2), 1.0), pool("torchvision", rois, (2, 2), 1.0)),
    ):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        fn(xa).sum().backward()
        ref(xb).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float32])


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU or NUMBA_ENABLE_CUDASIM=1")
def test_cuda_backend_gradcheck_tiny():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 1, 3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = x.to(device).requires_grad_()
    rois = torch.tensor([[0.0, 0.3, 0.2, 2.6, 2.1]], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(align("cuda", rois, 1, 1.0, 2, False), (x,))


def test_cuda_backend_unusable_gpu_gives_clear_error(monkeypatch):
    """When numba.cuda cannot drive the GPU, the error says so and names the op and the fix."""
    numba_cuda_common = pytest.importorskip("mrcnn_edu.ops._numba_cuda_common")
    monkeypatch.setattr(
        numba_cuda_common, "_numba_cuda_problem", lambda: "numba.cuda.is_available() is False"
    )
    with (
        pytest.raises(RuntimeError, match=r"roi_align \(backend='cuda'\): numba.cuda.is_avail"),
        numba_cuda_common.gpu_launch(torch.device("cuda", 0), "roi_align"),
    ):
        pass  # pragma: no cover
    monkeypatch.undo()
    if cuda_simulator_enabled():  # CUDA tensors on the simulator: a clear error, not garbage
        numba_cuda_common._numba_cuda_problem.cache_clear()
        assert "NUMBA_ENABLE_CUDASIM=1" in numba_cuda_common._numba_cuda_problem()


def test_numba_kernels_leave_torch_thread_count_alone():
    """Numba's OpenMP layer used to raise torch's thread count (1 -> 2 under
    OMP_NUM_THREADS=1) at the first parallel kernel: torch ops after it summed in another order."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from mrcnn_edu.ops import box_iou, nms, roi_align, roi_pool\n"
        "before = torch.get_num_threads()\n"
        "x = torch.rand(1, 4, 16, 16, requires_grad=True)\n"
        "r = torch.tensor([[0, 1.0, 1, 9, 9]])\n"
        "roi_align(x, r, (2, 2), 1.0, 2, True, backend='numba').sum().backward()\n"
        "roi_pool(x, r, (2, 2), 1.0, backend='numba').sum().backward()\n"
        "b = torch.tensor([[0, 0, 4, 4.0], [1, 1, 5, 5]])\n"
        "nms(b, torch.tensor([0.9, 0.8]), 0.5, backend='numba')\n"
        "box_iou(b, b, backend='numba')\n"
        "print(before, torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1", "1"], out.stdout + out.stderr

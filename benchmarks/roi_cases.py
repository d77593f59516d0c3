"""Benchmark cases for RoIAlign (Mask R-CNN section 3) and RoIPool, for ``benchmarks/bench_ops.py``.

Two workloads of a Mask R-CNN head on one FPN level (stride 4) of a 2-image batch:

* ``box``:  1000 RoIs pooled to 7x7 (the box head), sampling_ratio 2, aligned;
* ``mask``: the same RoIs pooled to 14x14 (the mask head);
* ``roi_pool box``: RoIPool of the same RoIs to 7x7, for comparison.

Each is timed forward only and forward + backward, for the ``numba``, ``reference`` and
``torchvision`` backends (and ``cuda`` when torch sees a GPU). Quick mode shrinks the map and
the RoI count so ``make demo`` stays short.

Contract: ``cases(quick) -> [(name, {backend: zero-argument callable})]``; the dict always has a
``"torchvision"`` entry; CUDA callables synchronise before returning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mrcnn_edu.ops import roi_align, roi_pool


def make_inputs(
    N: int, C: int, H: int, W: int, K: int, stride: int, device: str = "cpu", seed: int = 0
):
    """A random feature map ``[N, C, H, W]`` and ``K`` random RoIs ``[K, 5]`` inside the image.

    Boxes are 16..256 image pixels wide (typical proposals), in an image of ``stride * (H, W)``.
    """
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(N, C, H, W, generator=g)
    img_h, img_w = H * stride, W * stride
    wh = 16 + 240 * torch.rand(K, 2, generator=g)
    x1 = torch.rand(K, generator=g) * (img_w - wh[:, 0])
    y1 = torch.rand(K, generator=g) * (img_h - wh[:, 1])
    boxes = torch.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], dim=1)
    index = torch.randint(0, N, (K, 1), generator=g).float()
    rois = torch.cat([index, boxes], dim=1)  # (K, 1) + (K, 4) -> (K, 5)
    return feat.to(device), rois.to(device)


def _runner(feat, rois, size, scale, backend, backward, sync, op="align"):
    grad = None

    def run():
        nonlocal grad
        x = feat.detach().requires_grad_(backward)
        if op == "align":
            out = roi_align(x, rois, size, scale, sampling_ratio=2, aligned=True, backend=backend)
        else:
            out = roi_pool(x, rois, size, scale, backend=backend)
        if backward:
            if grad is None:
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
            out.backward(grad)
        if sync:
            torch.cuda.synchronize()
        return out

    return run


def cases(quick: bool) -> list[tuple[str, dict[str, Callable[[], object]]]]:
    """RoIAlign and RoIPool benchmark cases (see the module docstring)."""
    if quick:
        N, C, H, W, K = 2, 64, 64, 80, 200
    else:
        N, C, H, W, K = 2, 256, 200, 272, 1000
    stride = 4
    feat, rois = make_inputs(N, C, H, W, K, stride)
    devices = [("cpu", ["numba", "reference", "torchvision"])]
    if torch.cuda.is_available():
        devices.append(("cuda", ["cuda", "torchvision"]))
    out = []
    for device, backends in devices:
        f, r = feat.to(device), rois.to(device)
        tag = "" if device == "cpu" else " [gpu]"
        for head, size in (("box", 7), ("mask", 14)):
            for backward in (False, True):
                name = f"roi_align {head} {size}x{size} {'fwd+bwd' if backward else 'fwd'}{tag}"
                out.append(
                    (
                        name,
                        {
                            b: _runner(f, r, size, 1.0 / stride, b, backward, device == "cuda")
                            for b in backends
                        },
                    )
                )
        for backward in (False, True):  # RoIPool (Fast R-CNN), the operator RoIAlign replaces
            name = f"roi_pool box 7x7 {'fwd+bwd' if backward else 'fwd'}{tag}"
            out.append(
                (
                    name,
                    {
                        b: _runner(f, r, 7, 1.0 / stride, b, backward, device == "cuda", op="pool")
                        for b in backends
                    },
                )
            )
    return out

"""Helpers shared by every operator dispatcher in ``mrcnn_edu.ops``.

Each operator (``roi_align``, ``roi_pool``, ``nms``, ``box_iou``) comes in several backends:

* ``"reference"``   readable, vectorized pure PyTorch (autograd gives the backward),
* ``"numba"``       ``@njit(parallel=True, cache=True)`` CPU kernels,
* ``"cuda"``        ``numba.cuda`` kernels (run on Numba's CUDA simulator when
                    ``NUMBA_ENABLE_CUDASIM=1`` and no GPU is present),
* ``"torchvision"`` delegation to ``torchvision.ops``, for comparison,
* ``"auto"``        ``"cuda"`` for CUDA tensors, ``"numba"`` otherwise.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "reference", "numba", "cuda", "torchvision")


def cuda_simulator_enabled() -> bool:
    """True when Numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend`` (one of :data:`BACKENDS`) into a concrete backend for ``device``.

    ``"auto"`` picks ``"cuda"`` for CUDA tensors and ``"numba"`` on the CPU. Raises a
    ``ValueError`` naming ``op`` for an unknown backend, and for ``"cuda"`` on CPU tensors
    unless Numba's CUDA simulator is enabled.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "cuda" if device.type == "cuda" else "numba"
    if backend == "cuda" and device.type != "cuda" and not cuda_simulator_enabled():
        raise ValueError(
            f"{op}: backend='cuda' needs CUDA tensors (got device {device}); set "
            "NUMBA_ENABLE_CUDASIM=1 to run the numba.cuda kernels on Numba's CUDA simulator"
        )
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"{op}: backend='numba' runs on CPU tensors only (got device {device})")
    return backend


def check_tensor(x, name: str, op: str, ndim: int | None = None, floating: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``op`` and ``name`` if ``x`` is not a suitable
    tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {x.dtype}")


def check_finite(x: torch.Tensor, name: str, op: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinite values (names ``op``, ``name`` and a
    row)."""
    if x.is_floating_point() and x.numel() > 0:
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            row = (
                int(bad.reshape(x.shape[0], -1).any(dim=1).nonzero()[0])
                if x.dim() > 1
                else int(bad.nonzero()[0])
            )
            raise ValueError(f"{op}: {name} contains NaN or infinite values (first at row {row})")


def keep_torch_threads(fn):
    """Run a Numba parallel kernel wrapper with torch's thread count, and leave it unchanged.

    Numba's OpenMP threading layer shares the OpenMP runtime with torch: launching a parallel
    kernel sets the OpenMP thread count to Numba's (all cores), which silently changed
    ``torch.get_num_threads()`` (1 -> 2 under ``OMP_NUM_THREADS=1``), so every torch op after
    the first RoIAlign ran with another thread count (and its float sums in another order).
    The wrapped call runs its kernels on ``min(torch threads, NUMBA_NUM_THREADS)`` threads and
    restores torch's count afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import numba

        n = torch.get_num_threads()
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)

    return wrapper

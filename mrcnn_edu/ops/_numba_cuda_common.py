"""What the ``numba.cuda`` kernels (``roi_numba_cuda.py``, ``box_numba_cuda.py``) share on a GPU.

* :func:`gpu_launch` checks once that ``numba.cuda`` can really drive a GPU (a clear
  ``RuntimeError`` instead of a driver or NVVM traceback deep inside Numba), makes the tensors'
  device the current one for the launch, and yields torch's current stream on that device as a
  Numba stream. Numba launches on whatever CUDA context is current, so without the device guard
  a tensor on ``cuda:1`` (one process per GPU under ``torchrun``, or a model moved to a second
  card) would be read by a kernel queued on ``cuda:0``.
* :func:`device_view` is the zero-copy view of a CUDA tensor (``__cuda_array_interface__``).

Imported lazily by the dispatchers: importing ``numba.cuda`` is slow.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from numba import cuda

from ._common import cuda_simulator_enabled


@functools.cache
def _numba_cuda_problem() -> str | None:
    """Why ``numba.cuda`` cannot run kernels on a real GPU here, or ``None`` when it can."""
    if cuda_simulator_enabled():
        return (
            "NUMBA_ENABLE_CUDASIM=1 is set, so numba.cuda is Numba's CPU simulator, which "
            "cannot read CUDA tensors; unset it, or pass CPU tensors to run on the simulator"
        )
    try:
        if cuda.is_available():
            return None
        detail = "numba.cuda.is_available() is False"
    except Exception as exc:  # noqa: BLE001 - any driver/toolkit failure: report it clearly
        detail = f"{type(exc).__name__}: {exc}"
    return (
        f"Numba cannot use this machine's GPU ({detail}). Install a numba-cuda build that "
        "matches the CUDA driver (pip install numba-cuda), or pass backend='torchvision'"
    )


@contextlib.contextmanager
def gpu_launch(device: torch.device, op: str):
    """Context for launching kernels on CUDA ``device``; yields torch's current stream there.

    Raises ``RuntimeError`` naming ``op`` when ``numba.cuda`` cannot use the GPU.
    """
    problem = _numba_cuda_problem()
    if problem is not None:
        raise RuntimeError(f"{op} (backend='cuda'): {problem}")
    with torch.cuda.device(device):  # Numba uses the current context: make it this device's
        yield cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)


def device_view(t: torch.Tensor):
    """Zero-copy Numba device array of the contiguous CUDA tensor ``t``.

    ``sync=False``: Numba must not synchronise on its own, the kernels are queued on torch's
    stream behind the work that produced ``t``. Keeps a reference to ``t`` (its ``owner``).
    """
    try:
        return cuda.as_cuda_array(t, sync=False)
    except TypeError as exc:  # older numba without the `sync` argument
        if "sync" not in str(exc):
            raise
        return cuda.as_cuda_array(t)

"""Test-session set-up.

Numba's CUDA simulator must be chosen before ``numba.cuda`` is first imported, so it is
switched on here when torch sees no GPU: the numba.cuda kernels then run (slowly, on tiny
inputs) on the CPU, which is how CI checks them.
"""

import os

os.environ.setdefault("MRCNN_EDU_QUICK", "1")
try:
    import torch

    _has_gpu = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch missing is reported by the imports in the tests
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

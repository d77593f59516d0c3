"""Small helpers used everywhere: quick mode, a tensor summary, atomic file writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def quick_mode() -> bool:
    """True when ``MRCNN_EDU_QUICK=1``: notebooks and benchmarks then use tiny sizes (CI runs so)."""
    return os.environ.get("MRCNN_EDU_QUICK", "0") not in ("", "0")


def describe(name: str, x) -> str:
    """One line with name, shape, dtype, device, min and max of a tensor (matterport's ``log``).

    >>> describe("boxes", torch.tensor([[0., 1., 4., 5.]]))
    'boxes  shape=(1, 4)  dtype=torch.float32  device=cpu  min=0  max=5'
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.numel() == 0:
        rng = "empty"
    else:
        xf = x.detach().float()
        rng = f"min={xf.min().item():.4g}  max={xf.max().item():.4g}"
    return f"{name}  shape={tuple(x.shape)}  dtype={x.dtype}  device={x.device}  {rng}"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fileobj)`` on a binary temp file next to ``path``, then rename it over ``path``.

    A reader never sees a half-written file, and an error (or Ctrl-C) leaves any existing
    ``path`` untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

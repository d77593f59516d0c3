"""Small helpers used everywhere: quick mode, a tensor summary, atomic file writes."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def quick_mode() -> bool:
    """True when ``MRCNN_EDU_QUICK=1``: notebooks and benchmarks then use tiny sizes (as in CI)."""
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


def current_umask() -> int:
    """The process's file-mode creation mask (read without changing it where the OS allows)."""
    try:  # Linux >= 4.7 reports it; os.umask() would have to set it to read it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fileobj)`` on a binary temp file next to ``path``, then rename it over ``path``.

    A reader never sees a half-written file, and an error (or Ctrl-C) leaves any existing
    ``path`` untouched. Parent folders are created. The file gets the permissions a plain
    ``open(path, "wb")`` would give it: an existing file's mode is kept, a new file gets
    ``0o666 & ~umask`` (the temporary file's private 0600 is not left on the result).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_torch_dict(path: str | Path, what: str = "checkpoint") -> dict:
    """``torch.load`` a file that must hold a dict (a checkpoint or a state dict), safely
    (``weights_only=True``, on the CPU), with errors that name the file: a missing file is a
    ``FileNotFoundError``, anything unreadable or not a dict a ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure: name the file
        raise ValueError(
            f"{path} is not a readable torch {what} ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a {what}")  # noqa: TRY004
    return obj

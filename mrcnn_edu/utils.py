"""Small helpers used everywhere: quick mode, a tensor summary, atomic file writes, the
float32 islands of mixed precision (:func:`autocast_disabled`, :func:`full_precision`), and
:func:`keep_freed_memory` (glibc's malloc settings for a training loop on the CPU)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import torch


def quick_mode() -> bool:
    """True when ``MRCNN_EDU_QUICK=1``: notebooks and benchmarks then use tiny sizes (as in CI)."""
    return os.environ.get("MRCNN_EDU_QUICK", "0") not in ("", "0")


#: Environment variable: ``0`` leaves glibc's malloc settings alone (:func:`keep_freed_memory`).
MALLOC_ENV = "MRCNN_EDU_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
_malloc_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for the next allocation instead of handing it
    back to the operating system; ``train`` and ``evaluate`` call it. Returns whether it did.

    Why: a training step on the CPU allocates and frees the same large activations every step
    (the ``shapes`` stem's 4 x 64 x 128 x 128 float32 output alone is 16 MB). By default glibc
    serves blocks that large with a fresh ``mmap`` and unmaps them when they are freed, so each
    step pays again for page faults and for the kernel zeroing every new page: measured on
    the ``stick-figures`` preset, about 12 % of a step on average (``benchmarks/RESULTS.md``),
    felt most in the elementwise layers of the stem (batch norm, ReLU, max-pool). Raising
    ``M_MMAP_THRESHOLD`` (to 2 GiB) keeps such blocks in the heap and raising
    ``M_TRIM_THRESHOLD`` (to 1 GiB) keeps freed heap memory in the process, so later steps
    reuse pages that are already mapped. What the process holds at its peak is unchanged;
    afterwards up to 1 GiB of freed memory may stay with it.

    Applies once per process, on Linux with glibc only (elsewhere, or with
    ``MRCNN_EDU_MALLOC=0`` in the environment, it changes nothing and returns False).
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get(MALLOC_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, 2**31 - 1)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**30)
    )
    return _malloc_tuned


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


# ------------------------------------------------------------------------- mixed precision
#: Dtypes that ``torch.autocast`` computes in and that geometry must not: bfloat16 keeps 8
#: significant bits (a box corner near x = 600 moves in steps of 4 pixels), float16 11 bits and
#: a largest value of 65504 (an area of 300 x 300 pixels overflows it).
LOW_PRECISION = (torch.float16, torch.bfloat16)

# every device type torch knows an autocast for ("cpu", "cuda", ...), checked once
_AUTOCAST_DEVICES = tuple(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d)
)

_Fn = TypeVar("_Fn", bound=Callable)


@contextlib.contextmanager
def autocast_disabled() -> Iterator[None]:
    """Turn ``torch.autocast`` off, inside the block, on every device type where it is on.

    Mixed precision as torchvision and detectron2 do it: the network's layers (convs, linears)
    run in bfloat16 / float16 under ``torch.autocast``, while the geometry (anchors, box coding,
    IoU matching, NMS, RoI sampling, proposal filtering, post-processing, mask pasting) and the
    losses run in float32 inside this block. Outside autocast it enters nothing, so float32
    code runs exactly as without it (same ops, same bits).

    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     with autocast_disabled():
    ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    with contextlib.ExitStack() as stack:
        for device_type in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def upcast(x):
    """float16 / bfloat16 tensors -> float32; every other value (float32 and float64 tensors
    included) is returned as is, the same object. A list or tuple is upcast element by element
    (one level deep). Differentiable: gradients flow back to the low-precision tensor.

    >>> upcast(torch.ones(2, dtype=torch.bfloat16)).dtype, upcast(torch.ones(2)).dtype
    (torch.float32, torch.float32)
    >>> upcast([torch.ones(1, dtype=torch.float16), torch.ones(1, dtype=torch.float64)])[1].dtype
    torch.float64
    """
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in LOW_PRECISION else x
    if type(x) in (list, tuple) and any(
        isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION for t in x
    ):
        return type(x)(upcast(t) for t in x)
    return x


def full_precision(fn: _Fn) -> _Fn:
    """Decorator: run ``fn`` with autocast off (:func:`autocast_disabled`) and its float16 /
    bfloat16 tensor arguments (also inside list or tuple arguments) cast to float32
    (:func:`upcast`).

    Put on the functions that do geometry or losses, so that under ``torch.autocast`` the
    network's low-precision outputs (logits, deltas) enter them as float32 and what they return
    (boxes, scores, losses) is float32. For float32 (and float64) inputs outside autocast it
    changes nothing: the same tensors reach ``fn``, which runs as undecorated.

    >>> @full_precision
    ... def area(boxes):
    ...     return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    >>> area(torch.tensor([[0.0, 0.0, 300.0, 300.0]], dtype=torch.float16))  # float16: inf
    tensor([90000.])
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(upcast(a) for a in args)
        kwargs = {k: upcast(v) for k, v in kwargs.items()}
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def describe_mismatch(subject: str, missing, unexpected, shapes) -> str:
    """``"<subject>; missing keys: ...; unexpected keys: ...; shape mismatches: ..."``: a
    state dict that does not fit a module, each list cut to its first 8 entries."""

    def head(keys):
        keys = list(keys)
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = [subject]
    for name, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if keys:
            parts.append(f"{name}: {head(keys)}")
    return "; ".join(parts)

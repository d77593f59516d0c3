"""Checkpoints that let a training run stop (Ctrl-C, a time budget, a crash) and continue exactly.

A Mask R-CNN run on COCO takes hours to days (He et al. 2017, section 3.1: 160k iterations on 8
GPUs), so it must survive interruptions. Resuming "exactly" means more than reloading the
weights: the optimizer's momentum buffers, the learning-rate schedule's position, the fp16 loss
scaler, the random states (torch, CUDA, numpy, Python ``random``, and any ``torch.Generator`` a
transform draws from) and the position in the shuffled data all have to come back, or the
resumed run drifts from the one that never stopped. Notebook ``08_training.ipynb``
interrupts a run and resumes it; ``09_coco_training.ipynb`` relies on it for the long runs.

Files are written atomically (a temp file in the same folder, then ``os.replace``), so an
interrupt during a save leaves the previous file intact. In a checkpoint folder the run keeps
``step_0001000.pt``-style files (the last ``keep_last`` of them) and ``last.pt``, a copy of the
newest (a real file, not a symlink, so it survives copying the folder anywhere).

Checkpoints load with ``torch.load(weights_only=True)``: they hold only tensors and plain Python
values (the config as a dict), so loading one cannot run code.
"""

from __future__ import annotations

import dataclasses
import enum
import random
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mrcnn_edu
from mrcnn_edu.utils import atomic_write

__all__ = [
    "FORMAT",
    "CheckpointError",
    "checkpoint_files",
    "config_to_dict",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_rng_state",
    "unwrap_model",
]

#: Marker stored in every checkpoint, so a stray ``.pt`` file is recognised as "not ours".
FORMAT = "mrcnn_edu.checkpoint/1"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_MAX_LISTED = 10  # keys listed per kind in a mismatch error


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and what differs."""


# ---------------------------------------------------------------------------------------------
# Random states
# ---------------------------------------------------------------------------------------------


def get_rng_state() -> dict:
    """The global random states: torch CPU, CUDA (every device, when CUDA is initialised), numpy's
    legacy ``np.random`` and Python's ``random``, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only for the devices present)."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state.get("cuda") is not None and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------
# Config and model helpers
# ---------------------------------------------------------------------------------------------


def _plain(value, where: str):
    """``value`` as plain Python (what ``torch.load(weights_only=True)`` accepts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(
        f"save_checkpoint: config field {where!r} is a {type(value).__name__}; a "
        "checkpoint stores configs as plain values (numbers, strings, lists, dicts)"
    )


def config_to_dict(config) -> tuple[str | None, dict | None]:
    """``(class name, values)`` of a dataclass config (``dataclasses.asdict``) or a dict."""
    if config is None:
        return None, None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        cls = type(config)
        return f"{cls.__module__}.{cls.__qualname__}", _plain(dataclasses.asdict(config), "config")
    if isinstance(config, Mapping):
        return None, _plain(dict(config), "config")
    raise TypeError(
        f"save_checkpoint: config must be a dataclass instance or a dict, got "
        f"{type(config).__name__}"
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``, so
    checkpoints have the same keys however the model was wrapped."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def checkpoint_files(directory: str | Path) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the ``step_XXXXXXX.pt`` files in ``directory``, by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_FILE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler=None,
    scaler=None,
    step: int,
    config=None,
    extra: dict | None = None,
    data_state: dict | None = None,
    generators: Mapping[str, torch.Generator | torch.Tensor] | None = None,
    rng_state: dict | None = None,
    keep_last: int | None = 3,
) -> Path:
    """Write a checkpoint of the training state after ``step`` optimizer steps; returns its path.

    Args:
        path: a file ending in ``.pt`` (written alone), or a folder: then the checkpoint is
            ``path/step_{step:07d}.pt``, ``path/last.pt`` becomes a copy of it, and only the
            ``keep_last`` newest ``step_*.pt`` files are kept (``None``: keep all).
        model: its ``state_dict()`` (of the module under DDP / ``torch.compile``).
        optimizer, scheduler, scaler: their ``state_dict()`` (``None`` when absent);
            ``scaler`` is the ``torch.amp.GradScaler`` of fp16 training.
        step: optimizer steps done.
        config: a dataclass config (stored as ``dataclasses.asdict`` plus its class name) or a
            dict; its values must be plain (numbers, strings, lists, dicts, paths).
        extra: any other plain values / tensors to keep (e.g. ``{"best_ap": 0.31}``).
        data_state: where the data iteration stands (``InfiniteLoader.state_dict()``).
        generators: named ``torch.Generator`` objects whose states to keep (e.g. a
            transform's), or states (``Generator.get_state()``) taken earlier.
        rng_state: the global random states to store (default: :func:`get_rng_state` now);
            the trainer passes the states it captured at the end of ``step``.

    The file holds ``format``, ``step``, ``model``, ``optimizer``, ``scheduler``, ``scaler``,
    ``rng``, ``generators``, ``data_state``, ``config``, ``config_class``, ``extra``,
    ``version`` (``mrcnn_edu.__version__``), ``torch_version`` and ``time`` (Unix seconds).
    """
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    config_class, config_values = config_to_dict(config)
    ckpt = {
        "format": FORMAT,
        "step": int(step),
        "model": unwrap_model(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": get_rng_state() if rng_state is None else rng_state,
        "generators": {
            name: g.get_state() if isinstance(g, torch.Generator) else g
            for name, g in (generators or {}).items()
        },
        "data_state": data_state,
        "config": config_values,
        "config_class": config_class,
        "extra": dict(extra or {}),
        "version": mrcnn_edu.__version__,
        "torch_version": str(torch.__version__),
        "time": time.time(),
    }
    path = Path(path)
    if path.suffix == ".pt":
        atomic_write(path, lambda f: torch.save(ckpt, f))
        return path

    path.mkdir(parents=True, exist_ok=True)
    target = path / f"step_{int(step):07d}.pt"
    atomic_write(target, lambda f: torch.save(ckpt, f))

    def copy(f) -> None:
        with open(target, "rb") as src:
            shutil.copyfileobj(src, f)

    atomic_write(path / "last.pt", copy)
    if keep_last is not None:
        old = [p for _, p in checkpoint_files(path) if p != target]
        for p in old[: max(0, len(old) - (keep_last - 1))]:  # keep target + keep_last-1 newest
            p.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_diff(
    saved: dict | None, current: dict | None, keys: Sequence[str] | None = None
) -> list[str]:
    """Lines ``key: checkpoint X, now Y`` for the (dotted) keys whose values differ."""
    a, b = _flatten(saved), _flatten(current)
    names = (
        sorted(set(a) | set(b))
        if keys is None
        else [
            k for k in sorted(set(a) | set(b)) if any(k == p or k.startswith(p + ".") for p in keys)
        ]
    )
    missing = object()
    lines = []
    for k in names:
        va, vb = a.get(k, missing), b.get(k, missing)
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            sa = "(absent)" if va is missing else repr(va)
            sb = "(absent)" if vb is missing else repr(vb)
            lines.append(f"{k}: checkpoint {sa}, now {sb}")
    return lines


def _check_model_state(
    path: Path, model: nn.Module, state: Mapping[str, torch.Tensor], config_note: str
) -> None:
    expected = unwrap_model(model).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [f"load_checkpoint: {path} does not fit {type(unwrap_model(model)).__name__}:"]
    if missing:
        parts.append(f"  missing in the checkpoint ({len(missing)}): {_listed(missing)}")
    if unexpected:
        parts.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_listed(unexpected)}")
    if shapes:
        parts.append(
            f"  shape mismatches ({len(shapes)}): "
            + "; ".join(shapes[:_MAX_LISTED])
            + (f"; ... ({len(shapes) - _MAX_LISTED} more)" if len(shapes) > _MAX_LISTED else "")
        )
    if config_note:
        parts.append(config_note)
    raise CheckpointError("\n".join(parts))


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler=None,
    restore_rng: bool = True,
    map_location="cpu",
    config=None,
    arch_keys: Sequence[str] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` and load it into the given objects.

    Args:
        path: a checkpoint file, or a checkpoint folder (its ``last.pt`` is read).
        model, optimizer, scheduler, scaler: receive their states (each optional). A scaler
            given for a checkpoint saved without one keeps its fresh state.
        restore_rng: set the global random states (torch, CUDA, numpy, ``random``) to the
            saved ones.
        map_location: where tensors are loaded (``torch.load``'s argument); the optimizer then
            moves its state to its parameters' device.
        config: the current config (dataclass or dict): its class must be the saved one, and
            the values under ``arch_keys`` (dotted names, default the config class's
            ``ARCH_KEYS`` attribute, else none) must be equal. On a model mismatch the error
            also lists the config values that differ.
        generators: named ``torch.Generator`` objects to restore from the saved ones.

    Returns:
        the checkpoint dict (see :func:`save_checkpoint`; ``step``, ``extra``, ``config``, ...).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a mrcnn_edu checkpoint (names the file); a model state that does
            not fit (lists missing and unexpected keys and shape mismatches with both shapes);
            an optimizer / scheduler state that does not fit; a config of another class or
            with other architecture values; a generator that the checkpoint does not hold.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a junk file fails anywhere in the unpickler (even IndexError)
        raise CheckpointError(
            f"load_checkpoint: {path} is not a mrcnn_edu checkpoint (or is "
            f"damaged): torch.load failed with {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = (
            f"a dict with keys {_listed(sorted(map(str, ckpt)))}"
            if isinstance(ckpt, dict)
            else f"a {type(ckpt).__name__}"
        )
        raise CheckpointError(
            f"load_checkpoint: {path} is not a mrcnn_edu checkpoint (it holds "
            f"{what}, without format={FORMAT!r}); a plain model state dict "
            "loads with model.load_state_dict or mrcnn_edu.weights"
        )

    config_note = ""
    if config is not None:
        cls, values = config_to_dict(config)
        saved_cls = ckpt.get("config_class")
        if cls is not None and saved_cls is not None and cls != saved_cls:
            raise CheckpointError(
                f"load_checkpoint: {path} was saved with config class "
                f"{saved_cls}, the current config is a {cls}"
            )
        if arch_keys is None:
            arch_keys = tuple(getattr(type(config), "ARCH_KEYS", ()))
        if arch_keys:
            diff = _config_diff(ckpt.get("config"), values, arch_keys)
            if diff:
                raise CheckpointError(
                    f"load_checkpoint: {path} was saved for another "
                    "architecture; config values that differ:\n  " + "\n  ".join(diff)
                )
        diff = _config_diff(ckpt.get("config"), values)
        if diff and ckpt.get("config") is not None:
            config_note = "  config values that differ from the checkpoint's: " + "; ".join(
                diff[:_MAX_LISTED]
            )

    if model is not None:
        _check_model_state(path, model, ckpt["model"], config_note)
        unwrap_model(model).load_state_dict(ckpt["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if ckpt.get(name) is None:
            raise CheckpointError(f"load_checkpoint: {path} holds no {name} state")
        try:
            obj.load_state_dict(ckpt[name])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(
                f"load_checkpoint: the {name} state in {path} does not fit "
                f"this {type(obj).__name__} (other parameter groups or "
                f"settings?): {err}"
            ) from err
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if generators:
        saved = ckpt.get("generators") or {}
        absent = [n for n in generators if n not in saved]
        if absent:
            raise CheckpointError(
                f"load_checkpoint: {path} holds no state for generator(s) "
                f"{_listed(absent)} (it has: {_listed(sorted(saved)) or 'none'})"
            )
        for name, gen in generators.items():
            gen.set_state(saved[name])
    if restore_rng:
        set_rng_state(ckpt["rng"])
    return ckpt

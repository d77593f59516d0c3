"""Tests for checkpoints: what they hold, atomic writes, keep_last pruning, and clear errors.

The round trip is checked against the objects' own ``state_dict()`` and against random draws
made before saving (torch, numpy, ``random``, a private generator): after loading, the same
draws must come out again.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from torch import nn

import mrcnn_edu
from mrcnn_edu.engine import checkpoint as ckpt_mod
from mrcnn_edu.engine.checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    save_checkpoint,
)
from mrcnn_edu.engine.optim import build_optimizer, build_scheduler


@dataclasses.dataclass
class TinyConfig:
    width: int = 4
    lr: float = 0.1
    sizes: tuple = (1, 2)
    ARCH_KEYS = ("width",)


@dataclasses.dataclass
class OtherConfig:
    width: int = 4


def make_model(width=4, extra=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.Flatten(), nn.Linear(width, 2)]
    if extra:
        layers.append(nn.Linear(2, 2))
    return nn.Sequential(*layers)


def trained_objects():
    model = make_model()
    opt = build_optimizer(model, lr=0.1)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=3, milestones=(5,))
    for _ in range(2):  # momentum buffers and a scheduler position worth saving
        loss = model[3](torch.randn(5, 4)).square().mean() + model[0].weight.sum() * 0.01
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def draws(gen):
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        [random.random() for _ in range(3)],
        torch.rand(3, generator=gen).tolist(),
    )


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = trained_objects()
    gen = torch.Generator().manual_seed(7)
    torch.rand(2, generator=gen)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    path = save_checkpoint(
        tmp_path / "a.pt",
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        step=2,
        config=TinyConfig(),
        extra={"best": 0.5},
        generators={"flip": gen},
    )
    expected = draws(gen)  # what comes after the saved random states

    model2 = make_model()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    opt2 = build_optimizer(model2, lr=0.1)
    sched2 = build_scheduler(opt2, total_steps=10, warmup_steps=3, milestones=(5,))
    scaler2 = torch.amp.GradScaler("cpu")
    gen2 = torch.Generator().manual_seed(99)
    ck = load_checkpoint(
        path,
        model=model2,
        optimizer=opt2,
        scheduler=sched2,
        scaler=scaler2,
        generators={"flip": gen2},
        config=TinyConfig(),
    )
    assert draws(gen2) == expected
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        assert torch.equal(s1["state"][i]["momentum_buffer"], s2["state"][i]["momentum_buffer"])
    assert sched2.last_epoch == 2 and sched2.get_last_lr() == sched.get_last_lr()
    assert scaler2.get_scale() == 1024.0
    assert ck["step"] == 2 and ck["extra"] == {"best": 0.5}
    assert ck["config"] == {"width": 4, "lr": 0.1, "sizes": (1, 2)}
    assert ck["config_class"].endswith("TinyConfig")
    assert ck["version"] == mrcnn_edu.__version__ and ck["format"] == FORMAT
    # plain content: loads with weights_only=True
    torch.load(path, weights_only=True)


def test_restore_rng_false_leaves_random_states(tmp_path):
    model, opt, _sched = trained_objects()
    path = save_checkpoint(tmp_path / "a.pt", model=model, optimizer=opt, step=1)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    load_checkpoint(path, model=model, restore_rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_folder_keeps_last_k_and_last_pt(tmp_path):
    model, opt, sched = trained_objects()
    for step in range(1, 6):
        out = save_checkpoint(
            tmp_path, model=model, optimizer=opt, scheduler=sched, step=step, keep_last=2
        )
        assert out == tmp_path / f"step_{step:07d}.pt"
    assert [s for s, _ in checkpoint_files(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt",
        "step_0000004.pt",
        "step_0000005.pt",
    ]
    last = tmp_path / "last.pt"
    assert not last.is_symlink()
    assert last.read_bytes() == (tmp_path / "step_0000005.pt").read_bytes()
    assert load_checkpoint(tmp_path, restore_rng=False)["step"] == 5  # a folder reads last.pt
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=6, keep_last=None)
    assert [s for s, _ in checkpoint_files(tmp_path)] == [4, 5, 6]
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, model=model, optimizer=opt, step=7, keep_last=0)


def test_interrupted_write_leaves_previous_last_pt(tmp_path, monkeypatch):
    model, opt, _sched = trained_objects()
    save_checkpoint(tmp_path, model=model, optimizer=opt, step=1)
    before = (tmp_path / "last.pt").read_bytes()

    def half_then_interrupt(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model=model, optimizer=opt, step=2)
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_0000001.pt"]  # no temp
    assert load_checkpoint(tmp_path / "last.pt", restore_rng=False)["step"] == 1


def test_state_dict_mismatch_names_keys_and_shapes(tmp_path):
    model, opt, _sched = trained_objects()
    path = save_checkpoint(
        tmp_path / "a.pt", model=model, optimizer=opt, step=1, config={"width": 4}
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=make_model(width=6), config={"width": 6})
    msg = str(info.value)
    assert str(path) in msg
    assert "0.weight: checkpoint (4, 3, 3, 3), model (6, 3, 3, 3)" in msg
    assert "3.weight: checkpoint (2, 4), model (2, 6)" in msg
    assert "width: checkpoint 4, now 6" in msg  # the config values that differ
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=make_model(extra=True))
    assert "missing in the checkpoint (2): 4.weight, 4.bias" in str(info.value)
    small = nn.Sequential(*list(make_model())[:2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=small)
    assert "unexpected in the checkpoint (2): 3.weight, 3.bias" in str(info.value)


def test_optimizer_mismatch(tmp_path):
    model, opt, sched = trained_objects()
    path = save_checkpoint(tmp_path / "a.pt", model=model, optimizer=opt, step=1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)  # one group, not two
    with pytest.raises(CheckpointError, match="optimizer state in .* does not fit"):
        load_checkpoint(path, model=model, optimizer=other)
    with pytest.raises(CheckpointError, match="holds no scheduler state"):
        load_checkpoint(path, model=model, scheduler=sched)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt is not a mrcnn_edu checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "weights.pt"
    torch.save(make_model().state_dict(), plain)
    with pytest.raises(
        CheckpointError, match=r"weights.pt is not a mrcnn_edu checkpoint .*0\.weight"
    ):
        load_checkpoint(plain)


def test_config_class_and_arch_mismatch(tmp_path):
    model, opt, _sched = trained_objects()
    path = save_checkpoint(
        tmp_path / "a.pt", model=model, optimizer=opt, step=1, config=TinyConfig()
    )
    with pytest.raises(CheckpointError, match="config class .*TinyConfig.*OtherConfig"):
        load_checkpoint(path, model=model, config=OtherConfig())
    with pytest.raises(
        CheckpointError, match="(?s)another architecture.*width: checkpoint 4, now 8"
    ):
        load_checkpoint(path, config=TinyConfig(width=8))
    # a non-architecture value may change (e.g. a new lr for the rest of the run)
    load_checkpoint(path, model=model, config=TinyConfig(lr=0.5), restore_rng=False)


def test_config_must_be_plain(tmp_path):
    model, opt, _sched = trained_objects()
    with pytest.raises(TypeError, match="config field 'config.fn'"):
        save_checkpoint(tmp_path / "a.pt", model=model, optimizer=opt, step=1, config={"fn": print})


def test_generator_missing_from_checkpoint(tmp_path):
    model, opt, _sched = trained_objects()
    path = save_checkpoint(tmp_path / "a.pt", model=model, optimizer=opt, step=1)
    with pytest.raises(CheckpointError, match="no state for generator.*flip"):
        load_checkpoint(path, generators={"flip": torch.Generator()})

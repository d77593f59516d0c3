"""Tests for the training engine: the loop, resume, Ctrl-C, non-finite losses, AMP, the metrics
CSV, and the optimizer / schedule builders.

The model is a tiny conv net with the detector interface ``model(images, targets) -> (detections,
losses)``; its two losses are real differentiable functions of its output and the targets' boxes,
and it draws from torch's global RNG (dropout), so resuming must restore random states too. The
data is the synthetic shapes set, with a random flip (its own generator) and a transform that
draws from ``random`` and numpy. References: an uninterrupted run (resume must match it bit for
bit), torch's own ``LinearLR`` / ``MultiStepLR`` / ``CosineAnnealingLR`` and hand-computed values
(schedules), and the SGD update rule (weight decay groups).
"""

from __future__ import annotations

import importlib
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrcnn_edu.config import get_preset, override
from mrcnn_edu.data import shapes_dataset, write_shapes_dataset
from mrcnn_edu.data.sampler import make_train_loader
from mrcnn_edu.engine.checkpoint import checkpoint_files, load_checkpoint
from mrcnn_edu.engine.optim import LRFactor, build_optimizer, build_scheduler, param_groups
from mrcnn_edu.engine.train import (
    Callback,
    NonFiniteLossError,
    TrainingOutOfMemoryError,
    read_metrics_csv,
    train,
)
from mrcnn_edu.model import build_model
from mrcnn_edu.transforms import Compose, RandomHorizontalFlip, batch_images

# the module (the package exports the function train under the same name)
train_mod = importlib.import_module("mrcnn_edu.engine.train")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs gain nothing from more threads, and on a busy machine they slow down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyDetector(nn.Module):
    """conv -> GroupNorm -> ReLU -> dropout -> global mean -> linear: one box and one objectness
    logit per image. Losses: smooth L1 between the box and the mean ground-truth box (both in
    image-width units), and BCE of the logit against "the image has objects"."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(width, 5)

    def forward(self, images, targets=None):
        batch, _ = batch_images(images)  # [B, 3, H, W]
        x = self.drop(F.relu(self.norm(self.conv(batch)))).mean(dim=(2, 3))  # [B, C]
        out = self.head(x)  # [B, 5]
        W = batch.shape[-1]
        detections = [{"boxes": o[None, :4] * W, "scores": o[4:].sigmoid()} for o in out]
        if targets is None:
            return detections, {}
        gt = torch.stack(
            [t["boxes"].mean(0) / W if len(t["boxes"]) else out.new_zeros(4) for t in targets]
        )  # [B, 4]
        has = torch.tensor([float(len(t["boxes"]) > 0) for t in targets])
        return detections, {
            "loss_box": F.smooth_l1_loss(out[:, :4], gt),
            "loss_objectness": F.binary_cross_entropy_with_logits(out[:, 4], has),
        }


class Jitter:
    """Scale the image by a factor drawn from Python's ``random`` and numpy's global RNG."""

    def __call__(self, image, target):
        return image * (0.9 + 0.1 * random.random() + 0.1 * float(np.random.rand())), target


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, train=8, val=4, size=64, progress=False)
    return root


def make_run(root, steps=8, *, kind="grouped", batch_size=3, lr=0.05):
    """Fresh model, optimizer, scheduler and loader, as a new (seeded) process would build them."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    flip = RandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(11))
    ds = shapes_dataset(root, "train", transforms=Compose([flip, Jitter()]))
    model = TinyDetector()
    opt = build_optimizer(model, "sgd", lr=lr, weight_decay=1e-3)
    sched = build_scheduler(
        opt, total_steps=max(steps, 5), warmup_steps=3, milestones=(5,), gamma=0.5
    )
    if kind == "grouped":
        loader = make_train_loader(ds, batch_size, seed=3)
    else:  # a plain shuffled DataLoader with a generator: resume skips by loading batches
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
            collate_fn=lambda b: tuple(map(list, zip(*b))),
        )
    return model, opt, sched, loader


def assert_same_params(a: nn.Module, b: nn.Module):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind", ["grouped", "dataloader"])
def test_resume_is_bit_identical(shapes_root, tmp_path, kind):
    N = 8  # 8 images, batches of 3: epochs of 3 batches, so step 4 is inside epoch 1
    model, opt, sched, loader = make_run(shapes_root, N, kind=kind)
    straight = train(model, loader, opt, sched, steps=N, log_every=1, progress=False)

    model1, opt1, sched1, loader1 = make_run(shapes_root, N, kind=kind)
    first = train(
        model1,
        loader1,
        opt1,
        sched1,
        steps=N // 2,
        log_every=1,
        progress=False,
        checkpoint_dir=tmp_path / "ck",
    )
    assert first.last_checkpoint == tmp_path / "ck" / "step_0000004.pt"

    random.random(), np.random.rand(), torch.rand(3)  # a new process: other random states
    model2, opt2, sched2, loader2 = make_run(shapes_root, N, kind=kind)
    second = train(
        model2,
        loader2,
        opt2,
        sched2,
        steps=N,
        log_every=1,
        progress=False,
        checkpoint_dir=tmp_path / "ck",
        resume=True,
    )
    assert second.steps_done == N // 2 and second.step == N
    assert_same_params(model, model2)
    losses = [(r["loss_box"], r["loss_objectness"]) for r in straight.history]
    assert losses == [(r["loss_box"], r["loss_objectness"]) for r in first.history + second.history]
    assert [r["lr"] for r in straight.history] == [r["lr"] for r in first.history + second.history]
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), model1.parameters()))


def test_ctrl_c_saves_last_completed_step_and_resumes_exactly(shapes_root, tmp_path):
    N = 7
    model, opt, sched, loader = make_run(shapes_root, N)
    train(model, loader, opt, sched, steps=N, progress=False)

    seen = {}

    class Interrupt(Callback):
        def on_step(self, step, row):
            if step == 2:
                seen["params"] = {k: v.clone() for k, v in model1.state_dict().items()}
            if step == 3:
                raise KeyboardInterrupt

    model1, opt1, sched1, loader1 = make_run(shapes_root, N)
    with pytest.raises(KeyboardInterrupt):
        train(
            model1,
            loader1,
            opt1,
            sched1,
            steps=N,
            progress=False,
            callbacks=[Interrupt()],
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
        )
    assert [s for s, _ in checkpoint_files(tmp_path)] == [2, 3]
    ck = load_checkpoint(tmp_path / "last.pt", restore_rng=False)
    assert ck["step"] == 3
    for k, v in model1.state_dict().items():
        assert torch.equal(ck["model"][k], v), k
    step2 = load_checkpoint(tmp_path / "step_0000002.pt", restore_rng=False)
    for k, v in seen["params"].items():
        assert torch.equal(step2["model"][k], v), k

    model2, opt2, sched2, loader2 = make_run(shapes_root, N)
    train(
        model2, loader2, opt2, sched2, steps=N, progress=False, checkpoint_dir=tmp_path, resume=True
    )
    assert_same_params(model, model2)


def test_checkpoint_dir_in_use_needs_resume(shapes_root, tmp_path):
    model, opt, sched, loader = make_run(shapes_root, 2)
    train(model, loader, opt, sched, steps=1, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(model, loader, opt, sched, steps=2, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        train(model, loader, opt, sched, steps=2, progress=False, resume=True)


def test_keep_last_and_resume_at_the_end(shapes_root, tmp_path):
    model, opt, sched, loader = make_run(shapes_root, 5)
    r = train(
        model,
        loader,
        opt,
        sched,
        steps=5,
        progress=True,
        checkpoint_dir=tmp_path,
        checkpoint_every=1,
        keep_last=2,
    )  # the tqdm bar path runs too
    assert [s for s, _ in checkpoint_files(tmp_path)] == [4, 5]
    assert r.last_checkpoint == tmp_path / "step_0000005.pt"
    r = train(
        model, loader, opt, sched, steps=5, progress=False, checkpoint_dir=tmp_path, resume=True
    )
    assert r.steps_done == 0 and r.step == 5 and r.history == []


# ----------------------------------------------------------------------------- failures


def nan_batches():
    img = torch.rand(3, 32, 32)
    good = {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "image_id": torch.tensor(7)}
    bad = {"boxes": torch.tensor([[2.0, 2.0, float("nan"), 20.0]]), "image_id": torch.tensor(42)}
    return [([img, img], [good, good]), ([img, img], [good, bad])]


def test_non_finite_loss_names_step_loss_and_images_and_keeps_params():
    torch.manual_seed(0)
    model = TinyDetector()
    opt = build_optimizer(model, lr=0.1)
    kept = {}

    def remember(step, row):
        kept.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(NonFiniteLossError) as info:
        train(model, nan_batches(), opt, steps=5, progress=False, callbacks=[remember])
    err = info.value
    assert err.step == 2 and err.bad == ["loss_box"] and err.image_ids == [7, 42]
    msg = str(err)
    assert "loss_box=nan at step 2" in msg and "[7, 42]" in msg
    assert "loss_objectness" not in err.bad and math.isfinite(err.losses["loss_objectness"])
    for k, v in model.state_dict().items():  # unchanged since step 1
        assert torch.equal(kept[k], v), k


def test_out_of_memory_is_explained():
    class Hungry(TinyDetector):
        def forward(self, images, targets=None):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = Hungry()
    with pytest.raises(
        TrainingOutOfMemoryError,
        match=r"step 1 \(a batch of 2 images, sizes "
        r"\[\(32, 32\)\]\)\. Use a smaller batch size or smaller images",
    ):
        train(model, nan_batches(), build_optimizer(model, lr=0.1), steps=1, progress=False)

    # other errors pass through unchanged
    class Broken(TinyDetector):
        def forward(self, images, targets=None):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        train(Broken(), nan_batches(), build_optimizer(model, lr=0.1), steps=1, progress=False)


def test_bad_model_output_and_arguments():
    class NoDict(TinyDetector):
        def forward(self, images, targets=None):
            return super().forward(images, targets)[1]

    model = NoDict()
    opt = build_optimizer(model, lr=0.1)
    with pytest.raises(TypeError, match=r"must return \(detections, losses dict\)"):
        train(model, nan_batches(), opt, steps=1, progress=False)
    with pytest.raises(ValueError, match="amp must be"):
        train(model, nan_batches(), opt, steps=1, amp="fp8", progress=False)


# ----------------------------------------------------------------------------- AMP, clip, budget


def test_amp_bf16_on_cpu_runs_a_step(shapes_root):
    model, opt, sched, loader = make_run(shapes_root, 2)
    before = [p.detach().clone() for p in model.parameters()]
    r = train(model, loader, opt, sched, steps=2, amp="bf16", log_every=1, progress=False)
    assert r.steps_done == 2
    assert all(math.isfinite(row["loss"]) for row in r.history)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # bf16 really ran: the loss differs from the float32 loss of the same first step
    model32, opt32, sched32, loader32 = make_run(shapes_root, 2)
    r32 = train(model32, loader32, opt32, sched32, steps=1, progress=False)
    assert r.history[0]["loss"] != r32.history[0]["loss"]
    assert r.history[0]["loss"] == pytest.approx(r32.history[0]["loss"], rel=0.05)


def test_fp16_scaler_is_checkpointed(shapes_root, tmp_path):
    model, opt, sched, loader = make_run(shapes_root, 2)
    train(
        model,
        loader,
        opt,
        sched,
        steps=2,
        amp="fp16",
        grad_clip=1.0,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    ck = load_checkpoint(tmp_path, restore_rng=False)
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0


def _cpu_autocast_casts_to(dtype: torch.dtype) -> bool:
    with torch.autocast("cpu", dtype=dtype):
        x = torch.ones(2, 2)
        return (x @ x).dtype == dtype


@pytest.mark.parametrize(
    "amp",
    [
        "bf16",
        pytest.param(
            "fp16",
            marks=pytest.mark.skipif(
                not _cpu_autocast_casts_to(torch.float16),
                reason="this torch's CPU autocast has no float16",
            ),
        ),
    ],
)
def test_amp_trains_the_real_shapes_model(shapes_root, tmp_path, amp):
    """The real Mask R-CNN (the ``shapes`` preset at the set's 64 px), not the stand-in: its
    box geometry must stay float32 under autocast (issues 13 and 15). Two steps run with finite
    losses of every name; fp16 goes through the GradScaler (whose first steps may skip the
    update while the scale comes down from 2^16), bf16 updates the weights."""
    cfg = get_preset("shapes")
    override(cfg, {"transform.min_size": (64,), "transform.max_size": 64})
    torch.manual_seed(0)
    model = build_model(cfg)
    loader = make_train_loader(shapes_dataset(shapes_root, "train"), 2, seed=3)
    opt = build_optimizer(model, "sgd", lr=0.01, weight_decay=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r = train(
        model,
        loader,
        opt,
        None,
        steps=2,
        amp=amp,
        log_every=1,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    assert r.steps_done == 2 and len(r.history) == 2
    names = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    for row in r.history:
        assert names <= set(row)
        assert all(math.isfinite(row[k]) for k in names | {"loss"}), row
    assert all(p.dtype == torch.float32 for p in model.parameters())
    scaler = load_checkpoint(tmp_path, restore_rng=False)["scaler"]
    if amp == "fp16":
        assert scaler is not None and 0 < scaler["scale"] <= 2.0**16
    else:
        assert scaler is None
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_grad_clip_logs_norm_before_clipping(shapes_root):
    model, opt, _sched, loader = make_run(shapes_root, 1, lr=0.0)
    r = train(model, loader, opt, None, steps=1, grad_clip=1e-6, log_every=1, progress=False)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert r.history[0]["grad_norm"] > 1e-3
    assert float(norm) == pytest.approx(1e-6, rel=1e-3)  # the gradients were clipped


def test_max_minutes_stops_cleanly_with_a_checkpoint(shapes_root, tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: clock["t"])

    def tick(step, row):
        clock["t"] += 25.0  # each step "takes" 25 s; the 1-minute budget ends after step 3

    model, opt, sched, loader = make_run(shapes_root, 10)
    r = train(
        model,
        loader,
        opt,
        sched,
        steps=10,
        max_minutes=1.0,
        callbacks=[tick],
        progress=False,
        checkpoint_dir=tmp_path,
        log_every=2,
    )
    assert r.stopped_early and r.steps_done == 3
    assert load_checkpoint(tmp_path, restore_rng=False)["step"] == 3
    assert [row["step"] for row in r.history] == [2, 3]  # the partial window is logged too


# ----------------------------------------------------------------------------- logging


def test_csv_rows_parse_and_resume_drops_later_rows(shapes_root, tmp_path):
    csv_path = tmp_path / "metrics.csv"
    model, opt, sched, loader = make_run(shapes_root, 6)
    r = train(
        model,
        loader,
        opt,
        sched,
        steps=5,
        log_every=2,
        metrics_csv=csv_path,
        progress=False,
        checkpoint_dir=tmp_path / "ck",
        checkpoint_every=2,
    )
    rows = read_metrics_csv(csv_path)
    assert rows == r.history  # floats are written with repr: they read back exactly
    assert [row["step"] for row in rows] == [2, 4, 5]
    assert list(rows[0]) == [
        "step",
        "epoch",
        "lr",
        "loss_box",
        "loss_objectness",
        "loss",
        "images_per_s",
        "elapsed_s",
    ]
    for row in rows:
        assert row["loss"] == pytest.approx(row["loss_box"] + row["loss_objectness"])
        assert row["images_per_s"] > 0
    # resume from step 4 (step 5's checkpoint removed): row 5 is dropped, then re-logged
    (tmp_path / "ck" / "step_0000005.pt").unlink()
    (tmp_path / "ck" / "last.pt").write_bytes((tmp_path / "ck" / "step_0000004.pt").read_bytes())
    model, opt, sched, loader = make_run(shapes_root, 6)
    r2 = train(
        model,
        loader,
        opt,
        sched,
        steps=6,
        log_every=2,
        metrics_csv=csv_path,
        progress=False,
        checkpoint_dir=tmp_path / "ck",
        resume=True,
    )
    rows2 = read_metrics_csv(csv_path)
    assert [row["step"] for row in rows2] == [2, 4, 6]
    assert rows2[:2] == rows[:2] and rows2[2] == r2.history[0]
    assert rows2[2]["elapsed_s"] >= rows2[1]["elapsed_s"]


def test_callbacks_and_eval_do_not_change_training(shapes_root):
    model, opt, sched, loader = make_run(shapes_root, 4)
    train(model, loader, opt, sched, steps=4, progress=False)

    calls = {"step": [], "log": [], "eval": [], "plain": []}

    class Recorder(Callback):
        def on_step(self, step, row):
            calls["step"].append((step, sorted(row)))

        def on_log(self, step, row):
            calls["log"].append(step)

        def on_eval(self, step, metrics):
            calls["eval"].append((step, metrics))

    def evaluate(m):
        assert not m.training
        torch.rand(5), random.random(), np.random.rand()  # must not disturb the training RNGs
        return {"ap": 0.5}

    def eval_fn(m):
        m.eval()
        return evaluate(m)

    model2, opt2, sched2, loader2 = make_run(shapes_root, 4)
    r = train(
        model2,
        loader2,
        opt2,
        sched2,
        steps=4,
        progress=False,
        log_every=2,
        eval_fn=eval_fn,
        eval_every=2,
        callbacks=[Recorder(), lambda step, row: calls["plain"].append(step)],
    )
    assert_same_params(model, model2)
    assert model2.training
    assert calls["plain"] == [1, 2, 3, 4] and calls["log"] == [2, 4]
    assert calls["step"][0] == (
        1,
        sorted(["step", "epoch", "lr", "loss_box", "loss_objectness", "loss", "images"]),
    )
    assert calls["eval"] == [(2, {"ap": 0.5}), (4, {"ap": 0.5})]
    assert r.evals == [{"step": 2, "ap": 0.5}, {"step": 4, "ap": 0.5}]


# ----------------------------------------------------------------------------- optimizer


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def names_of(model, params):
    ids = {id(p): n for n, p in model.named_parameters()}
    return sorted(ids[id(p)] for p in params)


def test_no_weight_decay_on_norm_and_bias():
    model = NormNet()
    opt = build_optimizer(model, "sgd", lr=0.1, momentum=0.0, weight_decay=0.5)
    groups = {g["name"]: g for g in opt.param_groups}
    assert names_of(model, groups["decay"]["params"]) == ["conv.weight", "fc.weight"]
    assert names_of(model, groups["no_decay"]["params"]) == [
        "bn.bias",
        "bn.weight",
        "conv.bias",
        "fc.bias",
        "gn.bias",
        "gn.weight",
        "ln.bias",
        "ln.weight",
    ]
    assert groups["decay"]["weight_decay"] == 0.5 and groups["no_decay"]["weight_decay"] == 0.0
    # one SGD step with zero gradients: only weight decay moves the parameters,
    # p <- p - lr * wd * p for the decayed group, nothing for the others (and frozen ones)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n in ("conv.weight", "fc.weight") else before[n]
        assert torch.allclose(p, expected, rtol=0, atol=1e-7), n

    opt = build_optimizer(model, "adamw", lr=0.1, norm_bias_decay=True)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    assert len(opt.param_groups[0]["params"]) == 10  # every trainable parameter, frozen ones out
    assert len(param_groups(model, 1e-4)) == 2
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        build_optimizer(model, "adam")
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False))


# ----------------------------------------------------------------------------- schedules


def lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def sgd(lr=0.1):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_step_schedule_hand_computed_and_vs_torch():
    opt = sgd()
    sched = build_scheduler(
        opt,
        total_steps=10,
        warmup_steps=4,
        warmup_factor=0.001,
        schedule="step",
        milestones=(6, 8),
        gamma=0.1,
    )
    got = lrs(sched, opt, 10)
    # warm-up factor 0.001 * (1 - s/4) + s/4 at s = 0..3, then 1, 0.1 from 6, 0.01 from 8
    hand = [
        0.1 * 0.001,
        0.1 * 0.25075,
        0.1 * 0.5005,
        0.1 * 0.75025,
        0.1,
        0.1,
        0.01,
        0.01,
        0.001,
        0.001,
    ]
    assert got == pytest.approx(hand, rel=1e-12)
    # torch's own schedulers composed: LinearLR warm-up times MultiStepLR
    ref_opt = sgd()
    ref = torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=0.001, total_iters=4),
            torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[6, 8], gamma=0.1),
        ]
    )
    assert got == pytest.approx(lrs(ref, ref_opt, 10), rel=1e-9)


def test_cosine_schedule_vs_torch_and_hand():
    opt = sgd()
    sched = build_scheduler(
        opt, total_steps=20, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1
    )
    got = lrs(sched, opt, 21)
    ref_opt = sgd()
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=20, eta_min=0.01)
    assert got == pytest.approx(lrs(ref, ref_opt, 21), rel=1e-9)
    assert got[0] == pytest.approx(0.1) and got[10] == pytest.approx(0.055)  # (0.1 + 0.01) / 2
    assert got[20] == pytest.approx(0.01)
    # with warm-up: the product of both factors
    f = LRFactor(total_steps=20, warmup_steps=5, warmup_factor=0.2, schedule="cosine")
    assert f(2) == pytest.approx((0.2 * 0.6 + 0.4) * 0.5 * (1 + math.cos(math.pi * 2 / 20)))
    assert f(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_constant_schedule_and_bad_arguments():
    opt = sgd()
    assert lrs(build_scheduler(opt, total_steps=3, schedule="constant"), opt, 3) == [0.1] * 3
    with pytest.raises(ValueError, match="schedule must be"):
        build_scheduler(sgd(), total_steps=3, schedule="linear")
    with pytest.raises(ValueError, match="milestones must be increasing"):
        build_scheduler(sgd(), total_steps=9, milestones=(6, 3))
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(sgd(), total_steps=3, warmup_steps=5)


def test_scheduler_state_round_trip():
    opt = sgd()
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, milestones=(5,))
    lrs(sched, opt, 6)
    opt2 = sgd()
    sched2 = build_scheduler(opt2, total_steps=10, warmup_steps=2, milestones=(5,))
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert lrs(sched2, opt2, 4) == lrs(sched, opt, 4)

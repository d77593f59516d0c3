"""Training speed (and, with ``--minutes``, accuracy) of mrcnn_edu against torchvision.

Usage::

    python benchmarks/bench_train.py [--preset shapes|stick-figures] [--steps 5] [--minutes M]
                                     [--data data/shapes] [--only SIDE] [--json FILE]
                                     [--checkpoint RUN/last.pt]

* Step time: the preset's model and torchvision's own ``MaskRCNN`` built with the same widths
  (``benchmarks/twins.py``) and the same weights, timed on the same batches, alternating the
  two so that the machine's load hits both; prints medians and ours / torchvision (goal for
  ``shapes``: at most 0.8x). ``stick-figures`` compares with torchvision's ``KeypointRCNN``.
  Evaluation images/s of both on the validation set. ``--checkpoint RUN/last.pt`` times both
  with trained weights (a trained model's RPN finds the objects, so the mask head runs on many
  more positive RoIs than a fresh one's: that is the step a 10-minute run mostly takes).
  torchvision's ``RoIHeads`` trains its mask head on every positive RoI; when the preset caps
  them (``mask_rois_per_image``), the step is also timed with the cap off, like for like.
* ``--minutes M``: trains both for ``M`` minutes each with the preset's recipe (the same loop,
  data, seed and budget fitting), evaluates both with COCOeval and prints both APs: issue 13's
  side-by-side comparison (``M = 10`` for the ``make demo`` budget; ``M = 15`` with
  ``--preset stick-figures`` for issue 16's keypoint one). The ``stick-figures`` preset decodes
  keypoints to a fraction of a heatmap cell and weighs scores by the heatmaps (not
  torchvision's inference): its keypoint AP is also printed as torchvision would read the same
  weights, which separates what training reached from what the decoding adds.
* Both models run in this process after :func:`mrcnn_edu.utils.keep_freed_memory` (what
  ``train`` and ``evaluate`` call), so the malloc settings are the same for both.
* ``--preset coco-r50-fpn-1x``: seconds per iteration at COCO size (2 images of 800x1066 per
  device) and the projected time of the 90k-iteration 1x schedule on 8 such devices.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from twins import copy_weights, torchvision_twin

from mrcnn_edu.data.sampler import make_train_loader
from mrcnn_edu.engine.recipe import build_datasets, get_experiment, load_model
from mrcnn_edu.model import build_model
from mrcnn_edu.utils import atomic_write, keep_freed_memory


class TorchvisionAdapter(nn.Module):
    """torchvision's detector behind mrcnn_edu's interface: ``(detections, losses)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, targets=None):
        if self.training:
            return [], self.model(images, targets)
        return self.model(images), {}


def _batches(dataset, batch_size, n, seed=0):
    loader = make_train_loader(dataset, batch_size, num_workers=0, seed=seed)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def step_times(ours, tv, batches, device):
    def step(m, batch):
        images, targets = batch
        images = [i.to(device) for i in images]
        targets = [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets
        ]
        m.train()
        _, losses = m(images, targets)
        sum(losses.values()).backward()
        m.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(ours, batches[0])
    step(tv, batches[0])
    t_ours, t_tv = [], []
    for b in batches[1:]:
        for m, acc in ((ours, t_ours), (tv, t_tv)):
            s = time.perf_counter()
            step(m, b)
            acc.append(time.perf_counter() - s)
    return statistics.median(t_ours), statistics.median(t_tv)


@torch.no_grad()
def eval_speed(model, dataset, n, device):
    model.eval()
    images = [dataset[i][0].to(device) for i in range(min(n, len(dataset)))]
    model(images[:1])
    s = time.perf_counter()
    for img in images:
        model([img])
    return len(images) / (time.perf_counter() - s)


def train_and_eval(exp, data, model, minutes, device):
    """Train ``model`` with ``exp``'s recipe for ``minutes`` exactly as ``make demo`` does (the
    same optimizer and wall-clock schedule, ``recipe.build_optimization``) and return its COCO
    metrics."""
    from mrcnn_edu.engine.evaluate import evaluate
    from mrcnn_edu.engine.recipe import build_optimization
    from mrcnn_edu.engine.train import train

    t = exp.train
    train_set, val_set = build_datasets(exp, data)
    loader = make_train_loader(train_set, t.batch_size, num_workers=t.num_workers, seed=t.seed)
    opt, sched, steps = build_optimization(exp, model, budget_minutes=minutes)
    start = time.perf_counter()
    result = train(
        model,
        loader,
        opt,
        sched,
        steps=steps,
        device=device,
        grad_clip=t.grad_clip,
        max_minutes=minutes,
        progress=False,
        log_every=t.log_every,
    )
    seconds_per_step = (time.perf_counter() - start) / max(1, result.steps_done)
    res = evaluate(model, val_set, progress=False, device=device, with_losses=False)
    out = {"steps": result.steps_done, "seconds_per_step": seconds_per_step}
    for iou_type, m in res.metrics.items():  # bbox, and segm or keypoints
        for k in ("AP", "AP50", "AP75"):
            out[f"{iou_type}_{k}"] = m[k]
    heads = getattr(model, "roi_heads", None)
    if getattr(heads, "keypoint_decoding", "torchvision") != "torchvision" or getattr(
        heads, "keypoint_rescore", False
    ):  # the same weights read as torchvision reads them: what training alone reached
        saved = heads.keypoint_decoding, heads.keypoint_rescore
        heads.keypoint_decoding, heads.keypoint_rescore = "torchvision", False
        res = evaluate(model, val_set, progress=False, device=device, with_losses=False)
        heads.keypoint_decoding, heads.keypoint_rescore = saved
        for k in ("AP", "AP50", "AP75"):
            out[f"tv_decoding_keypoints_{k}"] = res.metrics["keypoints"][k]
    return out


def _summary(r: dict) -> str:
    main = "segm" if "segm_AP" in r else "keypoints"
    name = "mask" if main == "segm" else "keypoint"
    text = (
        f"box AP {r['bbox_AP']:.3f}, {name} AP {r[f'{main}_AP']:.3f} (AP50 "
        f"{r[f'{main}_AP50']:.3f}, AP75 {r[f'{main}_AP75']:.3f})"
    )
    if "tv_decoding_keypoints_AP" in r:
        text += (
            f"; with torchvision's keypoint decoding and scores {r['tv_decoding_keypoints_AP']:.3f}"
        )
    return text


def coco_projection(device, repeat):
    from bench_model import make_batch, make_pair

    ours, tv = make_pair(800, 1333, channels_last=True)
    ours, tv = ours.to(device), TorchvisionAdapter(tv).to(device)
    images, targets = make_batch(2, 800, 1066)
    batch = (
        [i.to(device) for i in images],
        [{k: v.to(device) for k, v in t.items()} for t in targets],
    )
    a, b = step_times(ours, tv, [batch] * (repeat + 1), device)
    for name, s in (("mrcnn_edu", a), ("torchvision", b)):
        hours = s * 90000 / 3600
        print(
            f"{name:12s} {s:.3f} s/iter (2 images) -> 1x schedule (90k iter, 16 images/iter "
            f"on 8 devices): {hours:.1f} h"
        )
    return {
        "ours_s_per_iter": a,
        "torchvision_s_per_iter": b,
        "ours_1x_hours_8dev": a * 90000 / 3600,
        "tv_1x_hours_8dev": b * 90000 / 3600,
    }


def host_gflops(n: int = 2048, repeat: int = 10) -> float:
    """The host's float32 matmul speed (GFLOP/s, torch's threads): what wall-clock results
    (steps in 10 minutes, AP at a budget) scale with, so runs on different hosts can be told
    apart. Same-run ratios do not depend on it."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="shapes")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the data root (default: data/shapes, data/shapes_keypoints for stick-figures)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="also train both for this many minutes and compare AP",
    )
    p.add_argument(
        "--only",
        choices=("mrcnn_edu", "torchvision"),
        default=None,
        help="with --minutes: train only this side (to split the side-by-side in two runs)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="time the steps with these trained weights (a run of the same preset)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.data is None:
        kp = args.preset == "stick-figures"
        args.data = Path("data/shapes_keypoints" if kp else "data/shapes")
    report = {
        "preset": args.preset,
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
        "host_matmul_gflops": host_gflops(),
        # both models run in this process, so both get it (as train() and evaluate() do)
        "malloc_keeps_freed_memory": keep_freed_memory(),
    }
    print(
        f"host: {report['host_matmul_gflops']:.0f} GFLOP/s (float32 matmul, "
        f"{report['threads']} threads); wall-clock results scale with it, ratios do not"
    )
    if args.preset.startswith("coco"):
        report.update(coco_projection(device, args.steps))
    else:
        exp = get_experiment(args.preset)
        train_set, val_set = build_datasets(exp, args.data)
        exp.model.num_classes = len(train_set.class_names)
        torch.manual_seed(exp.train.seed)
        if args.checkpoint is not None:
            ours, ck_exp = load_model(args.checkpoint)
            if ck_exp.model != exp.model:
                raise SystemExit(
                    f"bench_train: {args.checkpoint} was trained with another config than the "
                    f"{args.preset!r} preset's"
                )
            ours = ours.to(device)
            report["checkpoint"] = str(args.checkpoint)
        else:
            ours = build_model(exp.model).to(device)
        tv = torchvision_twin(exp.model)
        copy_weights(ours, tv)
        tv = TorchvisionAdapter(tv).to(device)
        batches = _batches(train_set, exp.train.batch_size, args.steps + 1)
        weights = "trained" if args.checkpoint is not None else "fresh"
        a, b = step_times(ours, tv, batches, device)
        print(
            f"train step (batch {exp.train.batch_size}, {weights} weights): mrcnn_edu {a:.3f} s, "
            f"torchvision {b:.3f} s, ratio {a / b:.2f}"
        )
        report.update(ours_step_s=a, tv_step_s=b, ratio=a / b)
        cap = ours.roi_heads.mask_rois_per_image
        if cap is not None:
            ours.roi_heads.mask_rois_per_image = None  # like torchvision: every positive RoI
            a2, b2 = step_times(ours, tv, batches, device)
            ours.roi_heads.mask_rois_per_image = cap
            print(
                f"  like for like (mask head on every positive RoI, as torchvision's): "
                f"mrcnn_edu {a2:.3f} s, torchvision {b2:.3f} s, ratio {a2 / b2:.2f}"
            )
            report.update(uncapped_ours_step_s=a2, uncapped_tv_step_s=b2, uncapped_ratio=a2 / b2)
        ea, eb = eval_speed(ours, val_set, 20, device), eval_speed(tv, val_set, 20, device)
        print(f"evaluation: mrcnn_edu {ea:.1f} images/s, torchvision {eb:.1f} images/s")
        report.update(ours_eval_ips=ea, tv_eval_ips=eb)
        if args.minutes:
            for name in ("mrcnn_edu", "torchvision"):
                if args.only and name != args.only:
                    continue
                torch.manual_seed(exp.train.seed)
                model = build_model(exp.model)  # the same initial weights for both
                if name == "torchvision":
                    twin = torchvision_twin(exp.model)
                    copy_weights(model, twin)
                    model = TorchvisionAdapter(twin)
                r = train_and_eval(
                    get_experiment(args.preset), args.data, model.to(device), args.minutes, device
                )
                print(
                    f"{name:12s} {r['steps']} steps in {args.minutes} min "
                    f"({r['seconds_per_step']:.2f} s/step): {_summary(r)}",
                    flush=True,
                )
                report[name] = r
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=2).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

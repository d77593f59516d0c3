"""Whole-model speed: mrcnn_edu's Mask R-CNN against torchvision's, same weights, same run.

Usage::

    python benchmarks/bench_model.py [--quick] [--repeat R] [--threads T] [--json FILE]

Cases (R50-FPN Mask R-CNN, ``maskrcnn-r50-fpn`` / ``maskrcnn_resnet50_fpn``; torchvision's
weights are loaded into ours through ``mrcnn_edu.weights``, so both compute the same function):

* ``inference``: eval mode, batch 1, an 800x1066 image (COCO's shape after resizing);
* ``train step``: forward + backward, batch 2 at 800x1066, frozen BatchNorm and 3 trainable
  stages (the COCO fine-tuning recipe), random targets with masks.

Each case runs once to warm up, then ``--repeat`` times, alternating ours and torchvision's so
that a change in the machine's load hits both; the table shows medians and the ratio
ours / torchvision (below 1 = faster). ``--quick`` (or ``MRCNN_EDU_QUICK=1``) uses 320x416
images. Goals (issue 12): inference at most 0.95x, training step at most 0.85x on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.models import detection as tvd
from torchvision.ops import misc

from mrcnn_edu.config import get_preset
from mrcnn_edu.model import build_model
from mrcnn_edu.utils import atomic_write
from mrcnn_edu.weights import load_torchvision_state_dict


def make_pair(min_size: int, max_size: int, *, channels_last: bool):
    torch.manual_seed(0)
    tv = tvd.maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        min_size=min_size,
        max_size=max_size,
        trainable_backbone_layers=3,
        norm_layer=misc.FrozenBatchNorm2d,
    )
    cfg = get_preset("maskrcnn-r50-fpn")  # frozen BN, 3 trainable stages
    cfg.transform.min_size = (min_size,)
    cfg.transform.max_size = max_size
    cfg.channels_last = channels_last
    ours = build_model(cfg)
    load_torchvision_state_dict(ours, tv.state_dict())
    return ours, tv


def make_batch(n: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g))
        k = 8
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 30 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        targets.append(
            {"boxes": boxes, "labels": torch.randint(1, 91, (k,), generator=g), "masks": masks}
        )
    return images, targets


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(name, ours_fn, tv_fn, repeat):
    ours_fn(), tv_fn()  # warm-up: Numba loads its cache, oneDNN picks its kernels
    t_ours, t_tv = [], []
    for _ in range(repeat):
        t_ours.append(timed(ours_fn))
        t_tv.append(timed(tv_fn))
    a, b = statistics.median(t_ours), statistics.median(t_tv)
    print(f"| {name:<28} | {a * 1000:>10.0f} | {b * 1000:>10.0f} | {a / b:>6.2f} |", flush=True)
    return {"case": name, "ours_ms": a * 1000, "torchvision_ms": b * 1000, "ratio": a / b}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--no-channels-last",
        action="store_true",
        help="run our model in NCHW (the default runs it channels-last)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    quick = args.quick or os.environ.get("MRCNN_EDU_QUICK") == "1"
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (320, 416) if quick else (800, 1066)
    ours, tv = make_pair(h, max(w, 1333), channels_last=not args.no_channels_last)
    print(
        f"# R50-FPN Mask R-CNN, {h}x{w}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print("| case                         |   ours ms  |  tv ms     |  ratio |")
    print("|------------------------------|-----------:|-----------:|-------:|")
    rows = []
    images, targets = make_batch(2, h, w)

    @torch.no_grad()
    def infer(model, is_tv):
        model.eval()
        return model(images[:1]) if is_tv else model(images[:1])[0]

    rows.append(
        run_case(
            "inference, batch 1", lambda: infer(ours, False), lambda: infer(tv, True), args.repeat
        )
    )

    def step(model, is_tv):
        model.train()
        losses = model(images, targets) if is_tv else model(images, targets)[1]
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)

    rows.append(
        run_case(
            "train step, batch 2", lambda: step(ours, False), lambda: step(tv, True), args.repeat
        )
    )
    if args.json:
        atomic_write(
            args.json,
            lambda f: f.write(
                json.dumps(
                    {
                        "size": [h, w],
                        "threads": torch.get_num_threads(),
                        "rows": rows,
                        "date": time.strftime("%Y-%m-%d"),
                    },
                    indent=2,
                ).encode()
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

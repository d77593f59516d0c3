"""The ``mrcnn-edu`` command line: one argparse subcommand per job.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that declares its
options and sets ``func``, the function that runs it with the parsed arguments and returns an exit
status. A new job (train, eval, ...) adds one such pair and one line in ``_SUBCOMMANDS``.

    mrcnn-edu make-shapes --out data/shapes --train 2000 --val 300 --size 256 --seed 0 [--keypoints]
                          [--overlap] [--small] [--overwrite]
    mrcnn-edu ablate --study roi-pool|mask-loss|all --seeds 3 --minutes 2 --out results/ablations
    mrcnn-edu check-data --coco data/coco [--split val2017] [--sample 500]

``train`` and ``eval`` also run under PyTorch's launcher, one process per GPU (or CPU process
with gloo), on one machine or several (``scripts/slurm_train.sh``)::

    torchrun --nproc_per_node=8 -m mrcnn_edu.cli train --preset coco-r50-fpn-1x --data COCO
                                                       --out RUN
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# make-shapes (notebook 01)
# ---------------------------------------------------------------------------------------------


def _shapes_int(kind: str):
    """argparse type: an int within the bounds ``write_shapes_dataset`` accepts for ``kind``
    (``"count"``, ``"size"`` or ``"seed"``), so e.g. ``--size 60000`` is a one-line usage error
    instead of a MemoryError traceback."""

    def parse(text: str) -> int:
        from mrcnn_edu.data import shapes

        lo, hi = {
            "count": (0, shapes.MAX_IMAGES),
            "size": (shapes.MIN_SIZE, shapes.MAX_SIZE),
            "seed": (0, 2**63 - 1),
        }[kind]
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def _add_make_shapes(subparsers) -> None:
    p = subparsers.add_parser(
        "make-shapes",
        help="write the synthetic shapes (or stick-figure) set in COCO format",
        description="Write the synthetic shapes set (squares, circles, triangles) or, with "
        "--keypoints, the stick-figure keypoint set, as COCO JSON + PNG images: "
        "OUT/annotations/instances_{train,val}.json (person_keypoints_* with "
        "--keypoints) and OUT/{train,val}/*.png.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: data/shapes, or data/shapes_keypoints with --keypoints)",
    )
    p.add_argument("--train", type=_shapes_int("count"), default=2000, help="train images (2000)")
    p.add_argument("--val", type=_shapes_int("count"), default=300, help="val images (300)")
    p.add_argument(
        "--size", type=_shapes_int("size"), default=256, help="image side in pixels, 32..4096 (256)"
    )
    p.add_argument(
        "--seed",
        type=_shapes_int("seed"),
        default=0,
        help="random seed, >= 0 (0); same seed, same bytes",
    )
    p.add_argument("--keypoints", action="store_true", help="stick figures with keypoints")
    p.add_argument(
        "--overlap",
        action="store_true",
        help="denser scenes, objects placed across objects of other classes (the "
        "mask-loss ablation's set; default --out data/shapes_overlap)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="smaller objects, 1/16..1/4 of the image side (the roi-pool ablation's "
        "set; default --out data/shapes_small)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a set already in OUT (by default an existing set is an error)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_make_shapes)


def _run_make_shapes(args: argparse.Namespace) -> int:
    from mrcnn_edu.data.shapes import write_shapes_dataset

    default = "data/shapes" + "".join(
        f"_{o}" for o in ("keypoints", "overlap", "small") if getattr(args, o)
    )
    out = args.out or Path(default)
    try:
        files = write_shapes_dataset(
            out,
            train=args.train,
            val=args.val,
            size=args.size,
            seed=args.seed,
            keypoints=args.keypoints,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            overlap=args.overlap,
            small=args.small,
        )
    except (ValueError, OSError) as err:  # bad sizes, an existing set, a folder we cannot write
        print(f"mrcnn-edu make-shapes: error: {err}", file=sys.stderr)
        return 2
    for split, path in files.items():
        print(f"{split}: {path}  (images in {Path(out) / split})")
    return 0


# ---------------------------------------------------------------------------------------------
# train / eval / predict / check-data (notebook 08)
# ---------------------------------------------------------------------------------------------


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _fail(command: str, err: BaseException) -> int:
    msg = str(err)
    if isinstance(err, KeyError) and msg.startswith(("'", '"')):
        msg = msg[1:-1]
    print(f"mrcnn-edu {command}: error: {msg}", file=sys.stderr)
    return 2


def _add_train(subparsers) -> None:
    from mrcnn_edu.engine.recipe import list_experiments

    p = subparsers.add_parser(
        "train",
        help="train a preset on a COCO-format data root",
        description="Train a recipe (model + schedule + data layout) and write checkpoints "
        "(RUN/step_*.pt, RUN/last.pt) and RUN/metrics.csv. Presets: "
        + ", ".join(list_experiments()),
    )
    p.add_argument("--preset", required=True, help="recipe name, e.g. shapes, coco-r50-fpn-1x")
    p.add_argument("--data", required=True, type=Path, help="data root (shapes or COCO layout)")
    p.add_argument("--out", required=True, type=Path, help="run folder for checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=0.01 (repeatable)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop cleanly after this many minutes (a checkpoint is written)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--amp",
        choices=("bf16", "fp16"),
        default=None,
        help="mixed precision (same as --set train.amp=...; fp16 with a gradient scaler)",
    )
    p.add_argument("--eval", action="store_true", help="evaluate on the val split at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _run_train(args: argparse.Namespace) -> int:
    from mrcnn_edu.engine import distributed as dist_utils
    from mrcnn_edu.engine.check_data import DataError
    from mrcnn_edu.engine.recipe import build_datasets, get_experiment, run_training

    try:  # under torchrun every rank runs this; rank 0 prints
        try:
            device = dist_utils.init_distributed(_device(args.device))
            sets = _parse_sets(args.set)
            if args.amp:
                sets["train.amp"] = args.amp
            exp = get_experiment(args.preset, sets)
            model, result = run_training(
                exp,
                args.data,
                args.out,
                resume=args.resume,
                progress=not args.no_progress,
                device=device,
                max_minutes=args.max_minutes,
            )
        except (
            KeyError,
            ValueError,
            FileNotFoundError,
            FileExistsError,
            DataError,
            dist_utils.DistributedError,
        ) as err:
            return _fail("train", err)
        main = dist_utils.is_main_process()
        if main:
            print(f"trained {result.steps_done} steps; last checkpoint: {result.last_checkpoint}")
        if args.eval:
            from mrcnn_edu.engine.evaluate import evaluate, format_metrics_table

            _, val = build_datasets(exp, args.data, train=False)
            res = evaluate(
                model,
                val,
                progress=not args.no_progress,
                results_file=args.out / "val_results.json",
                amp=exp.train.amp,
            )
            if main:
                print(format_metrics_table(res))
        return 0
    finally:
        dist_utils.cleanup()


class _TorchvisionLabels:
    """Wrap a model loaded from torchvision's COCO weights: its labels are COCO category ids
    (1..90), the data set's are contiguous (1..80); map them so ``evaluate`` maps them back."""

    def __init__(self, model, dataset):
        self.model = model
        self.cat_to_label = dataset.cat_id_to_label

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, images, targets=None):
        import torch

        dets, losses = self.model(images, None)
        for d in dets:
            labels = [self.cat_to_label.get(int(c), 0) for c in d["labels"]]
            keep = torch.tensor([lab > 0 for lab in labels], dtype=torch.bool)
            for k in list(d):
                d[k] = d[k][keep]
            d["labels"] = torch.tensor([lab for lab in labels if lab > 0], dtype=torch.int64)
        return dets, losses


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="COCO box/mask AP of a checkpoint on a data root's val split",
        description="Evaluate with pycocotools' COCOeval and print the AP table.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a training checkpoint (RUN/last.pt)")
    src.add_argument(
        "--weights",
        help="torchvision:<builder>[=FILE], e.g. "
        "torchvision:maskrcnn_resnet50_fpn (downloads where allowed) or "
        "torchvision:maskrcnn_resnet50_fpn=/path/to/weights.pth",
    )
    p.add_argument("--data", required=True, type=Path, help="data root")
    p.add_argument(
        "--layout",
        choices=("shapes", "coco"),
        default=None,
        help="data layout (default: the checkpoint's; coco for --weights)",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N images")
    p.add_argument("--results", type=Path, default=None, help="write COCO results JSON here")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --checkpoint: change a test-time setting of the model, e.g. --set "
        "model.roi_heads.keypoint_decoding=subpixel (repeatable; "
        "mrcnn_edu.engine.recipe.TEST_TIME_KEYS)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_eval)


def _load_weights_arg(spec: str):
    from mrcnn_edu.weights import ARCHS, from_torchvision

    if not spec.startswith("torchvision:"):
        raise ValueError(f"--weights must look like torchvision:<builder>, got {spec!r}")
    arch, _, file = spec[len("torchvision:") :].partition("=")
    if arch not in ARCHS:
        raise ValueError(f"--weights: unknown builder {arch!r}; choose one of {', '.join(ARCHS)}")
    if file:
        return from_torchvision(file, arch=arch)
    import torchvision.models.detection as tvd

    enum = {
        "maskrcnn_resnet50_fpn": tvd.MaskRCNN_ResNet50_FPN_Weights,
        "maskrcnn_resnet50_fpn_v2": tvd.MaskRCNN_ResNet50_FPN_V2_Weights,
        "fasterrcnn_resnet50_fpn": tvd.FasterRCNN_ResNet50_FPN_Weights,
        "fasterrcnn_resnet50_fpn_v2": tvd.FasterRCNN_ResNet50_FPN_V2_Weights,
        "keypointrcnn_resnet50_fpn": tvd.KeypointRCNN_ResNet50_FPN_Weights,
    }[arch].DEFAULT
    return from_torchvision(enum, arch=arch)


def _run_eval(args: argparse.Namespace) -> int:
    from mrcnn_edu.engine import distributed as dist_utils
    from mrcnn_edu.engine.evaluate import evaluate, format_metrics_table
    from mrcnn_edu.engine.recipe import build_datasets, get_experiment, load_model

    try:  # under torchrun each rank evaluates its shard (engine.evaluate); rank 0 prints
        device = dist_utils.init_distributed(_device(args.device))
        if args.set and args.checkpoint is None:
            raise ValueError("--set changes a checkpoint's settings: use it with --checkpoint")
        if args.checkpoint is not None:
            model, exp = load_model(args.checkpoint, device, _parse_sets(args.set))
            if args.layout:
                exp.data = get_experiment(
                    "shapes" if args.layout == "shapes" else "coco-r50-fpn-1x"
                ).data
        else:
            model = _load_weights_arg(args.weights).to(device)
            exp = get_experiment("shapes" if args.layout == "shapes" else "coco-r50-fpn-1x")
            exp.model.roi_heads.keypoint = model.roi_heads.has_keypoint  # person_keypoints_*
        _, val = build_datasets(exp, args.data, train=False)
        if args.weights is not None:
            model = _TorchvisionLabels(model, val)
        res = evaluate(
            model,
            val,
            max_images=args.max_images,
            progress=not args.no_progress,
            results_file=args.results,
            device=device,
            amp=args.amp,
        )
        main = dist_utils.is_main_process()
    except (KeyError, ValueError, FileNotFoundError, OSError, dist_utils.DistributedError) as err:
        return _fail("eval", err)
    finally:
        dist_utils.cleanup()
    if main:
        print(format_metrics_table(res))
        print(f"{res.num_images} images, {res.images_per_second:.2f} images/s")
    return 0


def _add_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="draw a checkpoint's detections on images",
        description="Run a checkpoint on image files; write DIR/<name>.png with boxes and "
        "masks drawn, and DIR/predictions.json (COCO results format, image_id = "
        "position in the list).",
    )
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG/JPEG)")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw scores above (0.5)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a test-time setting of the model (as eval --set; repeatable)",
    )
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import torch
    from PIL import Image

    from mrcnn_edu.engine.evaluate import coco_results
    from mrcnn_edu.engine.recipe import load_model
    from mrcnn_edu.utils import atomic_write
    from mrcnn_edu.viz import save_prediction_figure

    try:
        device = _device(args.device)
        model, exp = load_model(args.checkpoint, device, _parse_sets(args.set))
        names = list(exp.data.class_names) or None
        args.out.mkdir(parents=True, exist_ok=True)
        all_dets = []
        for path in args.images:
            if not path.is_file():
                raise FileNotFoundError(f"no image file {path}")
            try:
                arr = np.asarray(Image.open(path).convert("RGB"))
            except OSError as err:
                raise ValueError(f"{path}: not a readable image ({err})") from err
            image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
            with torch.no_grad():
                dets, _ = model([image.to(device)])
            det = {k: v.cpu() for k, v in dets[0].items()}
            all_dets.append(det)
            save_prediction_figure(
                image,
                det,
                args.out / f"{path.stem}.png",
                class_names=names,
                score_thresh=args.score_thresh,
            )
            print(
                f"{path}: {int((det['scores'] >= args.score_thresh).sum())} detections "
                f"-> {args.out / (path.stem + '.png')}"
            )
        results = coco_results(all_dets, list(range(len(all_dets))))
        atomic_write(args.out / "predictions.json", lambda f: f.write(json.dumps(results).encode()))
    except (KeyError, ValueError, FileNotFoundError, OSError) as err:
        return _fail("predict", err)
    return 0


def _add_check_data(subparsers) -> None:
    p = subparsers.add_parser(
        "check-data",
        help="name every bad annotation of a data root, or check a COCO 2017 layout",
        description="--data ROOT: check a data root's splits for degenerate or out-of-image "
        "boxes, labels outside 1..C, empty masks, masks that disagree with their box, and "
        "images whose size differs from the annotation file. --coco ROOT: check that ROOT "
        "holds COCO 2017 in its official layout (folders, annotation files, image counts, a "
        "sample of image sizes) and say what is missing and where to download it.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="data root: check every annotation")
    src.add_argument(
        "--coco",
        type=Path,
        metavar="ROOT",
        help="COCO 2017 root: check ROOT/{train2017,val2017}/ and ROOT/annotations/",
    )
    p.add_argument("--layout", choices=("shapes", "coco"), default="shapes", help="with --data")
    p.add_argument(
        "--split",
        action="append",
        choices=("train2017", "val2017"),
        help="with --coco: check only this split (repeatable; default both)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help="with --coco: image sizes checked per annotation file (default 500; 0: all)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_check_data)


def _run_check_coco(args: argparse.Namespace) -> int:
    from mrcnn_edu.engine.check_data import SIZE_SAMPLE, check_coco_layout

    sample = SIZE_SAMPLE if args.sample is None else (args.sample or None)
    try:
        report = check_coco_layout(
            args.coco,
            splits=tuple(dict.fromkeys(args.split or ("train2017", "val2017"))),
            sample=sample,
            log=None if args.no_progress else lambda line: print(line, file=sys.stderr),
        )
    except (ValueError, OSError) as err:
        return _fail("check-data", err)
    print(report)
    if report.ok:
        return 0
    print(
        f"mrcnn-edu check-data: error: {len(report.problems)} problem(s) in the COCO 2017 layout "
        f"of {args.coco}, listed above",
        file=sys.stderr,
    )
    return 1


def _run_check_data(args: argparse.Namespace) -> int:
    from mrcnn_edu.engine.check_data import check_data
    from mrcnn_edu.engine.recipe import build_datasets, get_experiment

    if args.coco is not None:
        return _run_check_coco(args)
    if args.split or args.sample is not None:
        return _fail("check-data", ValueError("--split and --sample go with --coco, not --data"))
    try:
        exp = get_experiment("shapes" if args.layout == "shapes" else "coco-r50-fpn-1x")
        train_set, val_set = build_datasets(exp, args.data)
    except (KeyError, ValueError, FileNotFoundError) as err:
        return _fail("check-data", err)
    status = 0
    for split, ds in (("train", train_set), ("val", val_set)):
        report = check_data(ds, progress=not args.no_progress)
        print(f"{split}: {report}")
        status = status or (0 if report.ok else 1)
    return status


# ---------------------------------------------------------------------------------------------
# demo: the main job of `make demo`
# ---------------------------------------------------------------------------------------------


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train the shapes preset for a few minutes, evaluate, draw (make demo)",
        description="Generate the shapes set if absent, train the `shapes` preset within a "
        "wall-time budget, evaluate with COCOeval, print the box and mask AP table "
        "and write OUT/predictions.png, OUT/losses.png and OUT/metrics.json. The "
        "run's checkpoints go to OUT/run (replaced on every demo). A keypoint "
        "recipe (--preset stick-figures, make demo-keypoints) uses the stick-figure "
        "set, reports keypoint AP (OKS) and draws skeletons.",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("data/shapes"),
        help="shapes set root (stick figures for a keypoint recipe)",
    )
    p.add_argument("--out", type=Path, default=Path("build/demo"), help="output folder")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget (10)")
    p.add_argument("--preset", default="shapes", help="recipe (shapes)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )
    p.add_argument("--num-images", type=int, default=4, help="images in predictions.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import json
    import shutil
    import time

    import torch

    from mrcnn_edu.data.shapes import KEYPOINT_NAMES, KEYPOINT_SIGMAS, write_shapes_dataset
    from mrcnn_edu.engine.evaluate import evaluate, format_metrics_table
    from mrcnn_edu.engine.recipe import build_datasets, get_experiment, run_training
    from mrcnn_edu.engine.train import read_metrics_csv
    from mrcnn_edu.utils import atomic_write
    from mrcnn_edu.viz import (
        draw_keypoint_predictions_vs_truth,
        draw_predictions_vs_truth,
        plot_loss_curves,
        save_figure,
    )

    progress = not args.no_progress
    try:
        exp = get_experiment(args.preset, _parse_sets(args.set))
        keypoints = exp.model.roi_heads.keypoint  # a keypoint recipe trains on stick figures
        stem = "person_keypoints" if keypoints else "instances"
        ann = args.data / "annotations" / f"{stem}_train.json"
        if not ann.is_file():
            print(
                f"no {'stick-figure' if keypoints else 'shapes'} set under {args.data}: "
                "writing one (2000 train / 300 val, 256 px)"
            )
            write_shapes_dataset(
                args.data,
                train=2000,
                val=300,
                size=256,
                seed=0,
                keypoints=keypoints,
                progress=progress,
            )
        run_dir = args.out / "run"
        if run_dir.exists():  # the demo's own previous run: start afresh
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        model, result = run_training(
            exp, args.data, run_dir, progress=progress, max_minutes=args.minutes, fit_budget=True
        )
        train_minutes = (time.perf_counter() - t0) / 60
        _, val = build_datasets(exp, args.data, train=False)
        # OKS sigmas come from the annotation file; a stick-figure set written before the
        # generator stored them is given the generator's own
        old_set = (
            keypoints
            and val.keypoint_names == list(KEYPOINT_NAMES)
            and not any(c.get("sigmas") for c in val.coco.dataset["categories"])
        )
        res = evaluate(
            model,
            val,
            progress=progress,
            results_file=args.out / "val_results.json",
            kpt_oks_sigmas=KEYPOINT_SIGMAS if old_set else None,
        )
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        return _fail("demo", err)

    print(format_metrics_table(res))
    metrics = {
        t: {k: res.metrics[t][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
        for t in ("bbox", "segm", "keypoints")
        if t in res.metrics
    }
    metrics.update(
        train_minutes=round(train_minutes, 2),
        steps=result.steps_done,
        eval_images_per_second=round(res.images_per_second, 2),
        preset=args.preset,
        overrides=args.set,
    )
    atomic_write(
        args.out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode())
    )
    save_figure(
        plot_loss_curves(
            read_metrics_csv(run_dir / "metrics.csv"),
            title=f"{args.preset}: {result.steps_done} steps, {train_minutes:.1f} min",
        ).figure,
        args.out / "losses.png",
    )
    idx = list(range(min(args.num_images, len(val))))
    samples = [val[i] for i in idx]
    with torch.no_grad():
        dets, _ = model([img for img, _ in samples])
    draw, extra = draw_predictions_vs_truth, {}
    if keypoints:  # skeletons drawn on the ground truth and on the predictions
        draw, extra = draw_keypoint_predictions_vs_truth, {"skeleton": val.skeleton}
    fig = draw(
        [img for img, _ in samples],
        dets,
        [t for _, t in samples],
        class_names=val.class_names,
        titles=[f"image {int(t['image_id'])}" for _, t in samples],
        **extra,
    )
    save_figure(fig, args.out / "predictions.png")
    iou_type, what = ("keypoints", "keypoint") if keypoints else ("segm", "mask")
    ap = metrics.get(iou_type, {}).get("AP", float("nan"))
    print(
        f"{what} AP {ap:.3f} after {result.steps_done} steps in {train_minutes:.1f} min; "
        f"wrote {args.out / 'metrics.json'}, {args.out / 'losses.png'}, "
        f"{args.out / 'predictions.png'}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# ablate: the paper's Table 2 on the shapes set (notebook 08b)
# ---------------------------------------------------------------------------------------------


def _add_ablate(subparsers) -> None:
    from mrcnn_edu.engine.ablate import list_studies

    p = subparsers.add_parser(
        "ablate",
        help="rerun the paper's Table 2 ablations on the shapes set, with seeds",
        description="Train and evaluate every variant of a study (roi-pool: RoIPool vs "
        "RoIAlign vs RoIAlign aligned on stride-16 and stride-32 backbones; "
        "mask-loss: sigmoid vs softmax vs class-agnostic masks) with the same "
        "data, seeds and number of steps. Writes OUT/<study>_<variant>_seed<n>.json "
        "per run (and .predictions.json beside it: the run's detections on 8 val "
        "images, for notebook 08b), OUT/results.md (mean and spread over seeds beside the paper's "
        "numbers, a verdict per comparison) and OUT/<study>.png. Runs whose JSON "
        "exists are skipped, so an interrupted study resumes.",
    )
    p.add_argument("--study", required=True, choices=[*list_studies(), "all"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (3)")
    p.add_argument(
        "--minutes",
        type=float,
        default=2.0,
        help="training budget per run, turned into one number of steps per group "
        "of variants by timing the slowest (2)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run instead of a budget"
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="every variant starts from one ResNet pre-trained for this many steps on the "
        "study's images (semantic segmentation; the paper's variants share ImageNet "
        "weights); 0: from random weights (default: engine.ablate.PRETRAIN_STEPS, 400)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("results/ablations"),
        help="results folder (results/ablations)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("data"),
        help="folder holding the studies' sets (data): data/shapes_128, "
        "data/shapes_overlap; written when absent",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("build/ablations"),
        help="checkpoints of the runs (build/ablations)",
    )
    p.add_argument(
        "--keep",
        choices=("first-seed", "all", "none"),
        default="first-seed",
        help="whose checkpoints stay after evaluation (first-seed)",
    )
    p.add_argument(
        "--val-images",
        type=int,
        default=None,
        help="evaluate only the first N val images (default: all)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for EVERY variant alike (repeatable)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> int:
    import shlex

    from mrcnn_edu.engine.ablate import (
        PRETRAIN_STEPS,
        chart_data,
        get_study,
        list_studies,
        load_runs,
        run_study,
        summarize,
        write_results,
    )
    from mrcnn_edu.engine.check_data import DataError
    from mrcnn_edu.viz import plot_ablation_study, save_figure

    names = list_studies() if args.study == "all" else [args.study]
    words = ["mrcnn-edu", "ablate", "--study", args.study, "--seeds", str(args.seeds)]
    words += (
        ["--steps", str(args.steps)]
        if args.steps is not None
        else ["--minutes", f"{args.minutes:g}"]
    )
    pretrain = PRETRAIN_STEPS if args.pretrain_steps is None else args.pretrain_steps
    words += ["--pretrain-steps", str(pretrain)]
    words += ["--out", str(args.out), "--data", str(args.data)]
    words += ["--val-images", str(args.val_images)] if args.val_images is not None else []
    words += [w for kv in args.set for w in ("--set", kv)]
    command = " ".join(shlex.quote(w) for w in words)  # what made the runs, for results.md

    def report(record: dict, skipped: bool) -> None:
        segm = (record["metrics"].get("segm") or {}).get("AP")
        ap = "n/a" if segm is None else f"{100 * segm:.1f}"
        how = "done before" if skipped else f"{record['minutes']:.1f} min"
        print(
            f"{record['study']} {record['variant']} seed {record['seed']}: mask AP {ap} "
            f"({record['steps']} steps, {how})",
            flush=True,
        )

    try:
        for name in names:
            run_study(
                get_study(name),
                args.seeds,
                args.minutes,
                args.data,
                args.out,
                progress=not args.no_progress,
                steps=args.steps,
                overrides=_parse_sets(args.set),
                work_dir=args.work,
                val_images=args.val_images,
                device=_device(args.device),
                keep=args.keep,
                command=command,
                on_run=report,
                pretrain_steps=pretrain,
            )
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, OSError, DataError) as err:
        return _fail("ablate", err)
    summaries = summarize(load_runs(args.out))
    charted = list(dict.fromkeys(s.study for s in summaries))
    for name in charted:
        panels, paper = chart_data(summaries, name)
        save_figure(
            plot_ablation_study(
                panels, paper=paper, title=get_study(name).title if name in list_studies() else name
            ),
            args.out / f"{name}.png",
        )
    path = write_results(args.out)
    print(path.read_text(encoding="utf-8"))
    print(f"wrote {path} and {', '.join(f'{n}.png' for n in charted)} in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

_SUBCOMMANDS = (
    _add_make_shapes,
    _add_train,
    _add_eval,
    _add_predict,
    _add_check_data,
    _add_demo,
    _add_ablate,
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="mrcnn-edu", description="Mask R-CNN rebuilt from its parts: command-line jobs."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # python -m mrcnn_edu.cli ...
    sys.exit(main())

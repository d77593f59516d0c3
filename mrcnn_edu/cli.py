"""The ``mrcnn-edu`` command line: one argparse subcommand per job.

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that declares its
options and sets ``func``, the function that runs it with the parsed arguments and returns an exit
status. A new job (train, eval, ...) adds one such pair and one line in ``_SUBCOMMANDS``.

    mrcnn-edu make-shapes --out data/shapes --train 2000 --val 300 --size 256 --seed 0 [--keypoints]
                          [--overwrite]
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

        lo, hi = {"count": (0, shapes.MAX_IMAGES), "size": (shapes.MIN_SIZE, shapes.MAX_SIZE),
                  "seed": (0, 2**63 - 1)}[kind]
        value = int(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def _add_make_shapes(subparsers) -> None:
    p = subparsers.add_parser(
        "make-shapes", help="write the synthetic shapes (or stick-figure) set in COCO format",
        description="Write the synthetic shapes set (squares, circles, triangles) or, with "
                    "--keypoints, the stick-figure keypoint set, as COCO JSON + PNG images: "
                    "OUT/annotations/instances_{train,val}.json (person_keypoints_* with "
                    "--keypoints) and OUT/{train,val}/*.png.")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: data/shapes, or data/shapes_keypoints with "
                        "--keypoints)")
    p.add_argument("--train", type=_shapes_int("count"), default=2000,
                   help="train images (2000)")
    p.add_argument("--val", type=_shapes_int("count"), default=300, help="val images (300)")
    p.add_argument("--size", type=_shapes_int("size"), default=256,
                   help="image side in pixels, 32..4096 (256)")
    p.add_argument("--seed", type=_shapes_int("seed"), default=0,
                   help="random seed, >= 0 (0); same seed, same bytes")
    p.add_argument("--keypoints", action="store_true", help="stick figures with keypoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a set already in OUT (by default an existing set is an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_make_shapes)


def _run_make_shapes(args: argparse.Namespace) -> int:
    from mrcnn_edu.data.shapes import write_shapes_dataset

    out = args.out or Path("data/shapes_keypoints" if args.keypoints else "data/shapes")
    try:
        files = write_shapes_dataset(out, train=args.train, val=args.val, size=args.size,
                                     seed=args.seed, keypoints=args.keypoints,
                                     progress=not args.no_progress,
                                     overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # bad sizes, an existing set, a folder we cannot write
        print(f"mrcnn-edu make-shapes: error: {err}", file=sys.stderr)
        return 2
    for split, path in files.items():
        print(f"{split}: {path}  (images in {Path(out) / split})")
    return 0


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

_SUBCOMMANDS = (_add_make_shapes,)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="mrcnn-edu", description="Mask R-CNN rebuilt from its parts: command-line jobs.")
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

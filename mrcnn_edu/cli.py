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


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
    p.add_argument("--train", type=_non_negative_int, default=2000, help="train images (2000)")
    p.add_argument("--val", type=_non_negative_int, default=300, help="val images (300)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0); same seed, same bytes")
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

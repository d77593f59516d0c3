"""Train the ``shapes`` recipe for a fixed number of steps and evaluate it: recipe trials.

Usage::

    python benchmarks/recipe_trial.py NAME [KEY=VALUE ...] [--data data/shapes] [--out build/trials]
                                            [--max-images N]

``KEY=VALUE`` are config overrides as ``--set`` takes them (``train.lr=1.5e-3``). The schedule
runs over ``train.steps`` (no wall-clock budget), so trials compare at equal steps whatever the
machine's load; pass ``train.steps=380`` for what ``make demo``'s 10 minutes hold on the 2-core
CPU (``benchmarks/RESULTS.md``). Writes ``OUT/NAME.json`` with the COCO metrics and prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mrcnn_edu.engine.evaluate import evaluate
from mrcnn_edu.engine.recipe import build_datasets, get_experiment, run_training
from mrcnn_edu.utils import atomic_write


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name")
    p.add_argument("sets", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--preset", default="shapes")
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--out", type=Path, default=Path("build/trials"))
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N val images")
    args = p.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in args.sets)
    exp = get_experiment(args.preset, overrides)
    exp.train.max_minutes = None  # equal steps, not equal minutes
    exp.train.num_workers = 0
    exp.train.checkpoint_every = 0
    start = time.perf_counter()
    model, result = run_training(exp, args.data, args.out / args.name, progress=False)
    train_s = time.perf_counter() - start
    _, val = build_datasets(exp, args.data, train=False)
    res = evaluate(model, val, progress=False, max_images=args.max_images)
    report = {
        "name": args.name,
        "overrides": overrides,
        "steps": result.step,
        "train_s": round(train_s, 1),
        **res.metrics,  # bbox, and segm or keypoints
    }
    text = json.dumps(report, indent=1)
    atomic_write(args.out / f"{args.name}.json", lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

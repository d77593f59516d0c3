"""Time mrcnn_edu's operator backends against torchvision, measured in the same run.

Usage::

    python benchmarks/bench_ops.py [--quick] [--repeat R] [--plot build/bench_ops.png]
                                   [--json build/bench_ops.json] [--case NAME_PART]

Case lists come from ``benchmarks/roi_cases.py`` (RoIAlign) and, when present,
``benchmarks/box_cases.py`` (NMS / IoU). Each module provides
``cases(quick) -> [(name, {backend: zero-argument callable})]`` with a ``"torchvision"`` entry in
every dict. Every callable is run once to warm up (Numba compiles or loads its cache then), then
``--repeat`` times; the table shows the median time and the ratio to torchvision's median in the
same run (below 1 = faster than torchvision); a backend whose runs exceed 10 s in total stops
repeating early. ``MRCNN_EDU_QUICK=1`` implies ``--quick``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from mrcnn_edu.utils import atomic_write

HERE = Path(__file__).resolve().parent
CASE_FILES = ("roi_cases.py", "box_cases.py")


def load_cases(quick: bool):
    """Collect ``(name, {backend: fn})`` from every case file next to this script."""
    all_cases = []
    for filename in CASE_FILES:
        path = HERE / filename
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, fns in module.cases(quick):
            if "torchvision" not in fns:
                raise ValueError(f"{filename}: case {name!r} has no 'torchvision' entry")
            all_cases.append((name, fns))
    return all_cases


def time_fn(fn, repeat: int, budget_s: float = 10.0) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call.

    Runs ``repeat`` times, but stops early (after at least one timed run) once ``budget_s``
    seconds are spent, so the slow readable reference does not dominate the run.
    """
    fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def run(cases, repeat: int):
    """Time every backend of every case -> list of row dicts."""
    rows = []
    for name, fns in cases:
        timings = {backend: time_fn(fn, repeat) for backend, fn in fns.items()}
        base = timings["torchvision"]
        for backend, ms in timings.items():
            rows.append({"case": name, "backend": backend, "ms": ms, "ratio": ms / base})
        print_rows(rows[-len(timings) :])
    return rows


def print_rows(rows) -> None:
    for r in rows:
        print(
            f"{r['case']:<34} {r['backend']:<12} {r['ms']:>10.2f} ms   x{r['ratio']:.2f}",
            flush=True,
        )


def plot(rows, path: Path) -> None:
    """Horizontal bars of the ratio to torchvision, one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [r for r in rows if r["backend"] != "torchvision"]
    labels = [f"{r['case']}  [{r['backend']}]" for r in others]
    ratios = [r["ratio"] for r in others]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(others) + 1.5))
    colors = ["tab:green" if q < 1 else "tab:red" for q in ratios]
    ax.barh(range(len(others)), ratios, color=colors)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(others)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time / torchvision time (same run; < 1 is faster)")
    ax.set_title("mrcnn_edu operator backends vs torchvision")
    for i, q in enumerate(ratios):
        ax.text(q, i, f" {q:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (also MRCNN_EDU_QUICK=1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per backend")
    parser.add_argument("--plot", type=Path, help="write a bar chart of the ratios (PNG)")
    parser.add_argument("--json", type=Path, help="write the timings as JSON")
    parser.add_argument(
        "--case", default=None, help="only the cases whose name contains this (e.g. batched_nms)"
    )
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("MRCNN_EDU_QUICK", "0") not in ("", "0")
    repeat = args.repeat if args.repeat is not None else (3 if quick else 5)
    if repeat < 1:
        parser.error("--repeat must be at least 1")

    import numba
    import torch

    print(
        f"# {datetime.date.today()}  {platform.processor() or platform.machine()}  "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba "
        f"{numba.__version__} ({numba.get_num_threads()} threads), quick={quick}, "
        f"repeat={repeat}"
    )
    print(f"{'case':<34} {'backend':<12} {'median':>13}   vs torchvision")
    cases = [c for c in load_cases(quick) if args.case is None or args.case in c[0]]
    if not cases:
        parser.error(f"--case {args.case!r} matches no case")
    rows = run(cases, repeat)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        meta = {
            "date": str(datetime.date.today()),
            "quick": quick,
            "repeat": repeat,
            "torch": torch.__version__,
            "numba": numba.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "argv": sys.argv[1:],
        }
        atomic_write(
            args.json,
            lambda f: f.write(json.dumps({"meta": meta, "rows": rows}, indent=2).encode()),
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

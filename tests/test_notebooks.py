"""Run every notebook in ``notebooks/`` top to bottom in quick mode (``MRCNN_EDU_QUICK=1``).

Also checks that notebooks are committed without outputs (STYLE.md: no megabytes of base64).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name}: cell {i} has outputs; clear them"
            assert cell.get("execution_count") is None, f"{path.name}: cell {i} has a count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path: Path, tmp_path: Path) -> None:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    os.environ["MRCNN_EDU_QUICK"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as err:  # name the notebook and the failing cell's first line
        pytest.fail(f"{path.name}: {str(err).strip().splitlines()[-1]}\n{err}")
    # a run that leaves no output at all would hide a notebook that does nothing
    n_out = sum(len(c.get("outputs", [])) for c in nb.cells if c.cell_type == "code")
    assert n_out > 0, f"{path.name} produced no output"

"""Run the teaching notebooks in JupyterLab in headless Chromium, as a reader would (issue 9).

For each notebook in ``notebooks.py``: open it in JupyterLab, Run > Run All Cells, wait until
no cell is queued or running and the kernel is idle (within the notebook's limit), then check:
no traceback in any output; figures are decoded ``<img>`` elements; every widget renders as
live controls (never its text repr); each explorer's picture changes when one control moves.
Screenshots land in ``build/screenshots/<notebook>/``: the page after the run and every
explorer before and after its change.

Three fixture notebooks check the checker first: a good one must pass, a broken one must be
reported with the cell's number and the error line, a slow one must be reported with the cell
still running when its limit is up.

Run with ``make test-browser``; plain ``make test`` skips these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
from fixture_notebooks import BAD, BAD_CELL_INDEX, BAD_ERROR, GOOD, SLOW

from notebooks import NOTEBOOKS, Notebook

if os.environ.get("MRCNN_EDU_BROWSER", "") != "1":  # one skip line in plain `make test`
    pytest.skip(
        "browser tests run with `make test-browser` (it sets MRCNN_EDU_BROWSER=1)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.browser
NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"


@dataclass
class Report:
    """What one notebook's run showed; ``problems`` empty means it passed."""

    name: str
    seconds: dict[str, float] = field(default_factory=dict)  # open, run, total
    images: int = 0
    explorers: int = 0
    changes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)  # the browser's console errors

    def failure(self) -> str:
        text = f"{self.name}: {len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems)
        if self.console:
            text += "\nbrowser console (last 5): " + " | ".join(self.console[-5:])[:800]
        return text


def check_notebook(lab, context, entry: Notebook, screenshots: Path) -> Report:
    """Open, run and inspect one notebook of the server's root; never raises for its content."""
    from lab_page import NotebookFailure, NotebookPage, PlaywrightError

    report = Report(entry.name)
    shots = screenshots / Path(entry.name).stem
    shutil.rmtree(shots, ignore_errors=True)
    page = context.new_page()
    nb = NotebookPage(page, lab, entry.name, shots)
    start = time.monotonic()
    try:
        try:
            nb.open(timeout_s=entry.limit_s)
            report.seconds["open"] = time.monotonic() - start
            nb.run_all()
            nb.wait_finished(deadline=start + entry.limit_s, limit_s=entry.limit_s)
            report.seconds["run"] = time.monotonic() - start - report.seconds["open"]
        except NotebookFailure as err:
            report.problems.append(str(err))
            nb.screenshot_page("page.png")
            return report
        except PlaywrightError as err:  # e.g. a Playwright timeout: say what the page shows
            report.problems.append(
                f"{entry.name}: {type(err).__name__}: "
                f"{str(err).splitlines()[0]}; the page shows:\n{nb.describe()}"
            )
            nb.screenshot_page("page.png")
            return report
        nb.screenshot_page("page.png")

        report.problems += [f"traceback in {e}" for e in nb.errors()]
        report.problems += nb.widget_problems()
        report.images = nb.count_images()
        report.problems += nb.image_problems()
        if entry.figures and report.images == 0:
            report.problems.append("no figure on the page (no <img> in any output area)")

        explorers = nb.explorers()
        report.explorers = len(explorers)
        if len(explorers) < entry.explorers:
            report.problems.append(
                f"{len(explorers)} widget explorer(s) rendered as live "
                f"controls, expected at least {entry.explorers}"
            )
        for ex in explorers:
            nb.screenshot_explorer(ex, f"explorer{ex.index}-before.png")
            try:
                report.changes.append(nb.change_explorer(ex))
            except NotebookFailure as err:
                report.problems.append(str(err))
            nb.screenshot_explorer(ex, f"explorer{ex.index}-after.png")
        return report
    finally:
        report.seconds["total"] = time.monotonic() - start
        report.console = list(nb.console)
        _write_report(report, shots / "report.json")
        page.close()
        lab.shutdown_sessions()  # free the kernel before the next notebook


def _write_report(report: Report, path: Path) -> None:
    """Save the report beside the screenshots (atomically: temp file, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = asdict(report)
    data["seconds"] = {k: round(v, 1) for k, v in report.seconds.items()}
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# --- the checker checks itself on two tiny notebooks -------------------------------------------
def test_fixture_good_notebook_passes(lab, browser_context, screenshots):
    report = check_notebook(lab, browser_context, Notebook(GOOD, limit_s=90), screenshots)
    assert not report.problems, report.failure()
    assert report.images >= 2, f"expected the plain figure and the explorer's: {report}"
    assert report.explorers == 1 and len(report.changes) == 1, report
    assert "slider 'freq' from 2 to 3" in report.changes[0], report.changes


def test_fixture_bad_notebook_is_reported(lab, browser_context, screenshots):
    report = check_notebook(
        lab, browser_context, Notebook(BAD, limit_s=90, figures=False, explorers=0), screenshots
    )
    expected_error = f"traceback in cell {BAD_CELL_INDEX} [{BAD_CELL_INDEX}]: {BAD_ERROR}"
    assert expected_error in report.problems, report.failure()
    assert sorted(report.problems) == sorted(
        [
            expected_error,
            "cell 1: widget shown as text 'IntSlider(value=3)'",
            "cell 2: 1 widget display(s), 0 rendered as live controls",
            "cell 2: 'Error displaying widget: model not found'",
        ]
    ), report.failure()


def test_fixture_slow_notebook_reports_what_runs(lab, browser_context, screenshots):
    from lab_page import NotebookFailure, NotebookPage

    page = browser_context.new_page()
    nb = NotebookPage(page, lab, SLOW, screenshots / "_fixture_slow")
    try:
        nb.open(timeout_s=90)
        nb.run_all()
        with pytest.raises(NotebookFailure) as failure:
            nb.wait_finished(deadline=time.monotonic() + 5, limit_s=5)
    finally:
        page.close()
        lab.shutdown_sessions()
    message = str(failure.value)
    assert message.startswith(f"{SLOW}: not finished within its limit of 5 s"), message
    assert "still running or queued: cell 2 ('import time')" in message, message


# --- the series ----------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", NOTEBOOKS, ids=[Path(n.name).stem for n in NOTEBOOKS])
def test_notebook_in_lab(entry: Notebook, lab, browser_context, screenshots):
    if not (NOTEBOOKS_DIR / entry.name).exists():
        pytest.fail(
            f"notebooks/{entry.name} is listed in tests/browser/notebooks.py but does not exist",
            pytrace=False,
        )
    report = check_notebook(lab, browser_context, entry, screenshots)
    if report.problems:
        pytest.fail(report.failure(), pytrace=False)

"""Fixtures of the browser suite: one JupyterLab server and one headless Chromium per session.

Plain ``make test`` collects these tests and skips them with one reason (they need
``MRCNN_EDU_BROWSER=1``, which ``make test-browser`` sets after ``setup.sh`` installed Chromium
and Playwright); nothing here imports Playwright until a browser test really runs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:  # the helper modules beside this file, whatever the import mode
    sys.path.insert(0, str(HERE))

# these helpers live beside this file: importable only after the sys.path line above
from fixture_notebooks import write_fixture_notebooks  # noqa: E402
from lab_server import LabServer  # noqa: E402

SKIP_REASON = "browser tests run with `make test-browser` (it sets MRCNN_EDU_BROWSER=1)"
NOTEBOOKS_DIR = ROOT / "notebooks"
SCREENSHOTS_DIR = ROOT / "build" / "screenshots"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
# issue 9: without the background-networking flags Chromium floods the closed network
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB; Chromium then crashes
]  # fmt: skip


def browser_enabled() -> bool:
    return os.environ.get("MRCNN_EDU_BROWSER", "") == "1"


def pytest_collection_modifyitems(config, items):
    if browser_enabled():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("browser") and HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


def find_chromium() -> str | None:
    """``MRCNN_EDU_CHROMIUM`` if set, else the first Chromium/Chrome on PATH."""
    explicit = os.environ.get("MRCNN_EDU_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        where = os.environ.get("MRCNN_EDU_CHROMIUM") or "PATH (" + ", ".join(CHROMIUM_NAMES) + ")"
        pytest.fail(
            f"no Chromium found in {where}: `make test-browser` installs it "
            "(bash tests/browser/setup.sh .venv/bin/python)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A JupyterLab server on a throw-away copy of notebooks/ plus the fixture notebooks."""
    server = LabServer(NOTEBOOKS_DIR, tmp_path_factory.mktemp("jupyterlab"))
    try:
        try:
            server.start()
        except RuntimeError as err:
            pytest.fail(str(err), pytrace=False)
        write_fixture_notebooks(server.root)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser(chromium_path):
    """Headless Chromium from ``chromium_path``, driven by Playwright (no browser download)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "Playwright's Python package is missing: `make test-browser` installs it "
            "(bash tests/browser/setup.sh .venv/bin/python)",
            pytrace=False,
        )
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def browser_context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def screenshots():
    """``build/screenshots/`` (git-ignored); each notebook writes into a subfolder of its own."""
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS_DIR

"""Tiny notebooks that check the checker (issue 9).

``write_fixture_notebooks(folder)`` writes three notebooks into the server's throw-away root:

* ``_fixture_good.ipynb``: one plain matplotlib figure and one explorer built exactly like the
  series' explorers (a VBox of an IntSlider with ``continuous_update=False`` and a Dropdown, plus
  an Output that is cleared and re-drawn on every change). The suite must pass it.
* ``_fixture_bad.ipynb``: a widget printed as its text repr (``IntSlider(value=3)``, what a
  page without the widget manager shows), a widget view whose model does not exist (the page
  cannot render it as controls) and a cell that raises: the suite must report all three, naming
  the cell's number and, for the error, its exception line.

* ``_fixture_slow.ipynb``: a cell that sleeps; a run past its limit must name the notebook and
  show what the page shows (the cell still running).

They need nothing from ``mrcnn_edu``, so the suite's own checks run even while the series'
notebooks are being written.
"""

from __future__ import annotations

from pathlib import Path

GOOD = "_fixture_good.ipynb"
BAD = "_fixture_bad.ipynb"
SLOW = "_fixture_slow.ipynb"  # its cell 2 sleeps for 10 minutes
BAD_CELL_INDEX = 3  # 1-based position of the raising cell in _fixture_bad.ipynb
BAD_ERROR = "ZeroDivisionError: fixture cell divides by zero"

_GOOD_CELLS = [
    ("markdown", "# Fixture\nA plain figure and a slider + dropdown explorer."),
    ("code", "%matplotlib inline\nimport matplotlib.pyplot as plt\nimport numpy as np"),
    (
        "code",
        "fig, ax = plt.subplots(figsize=(3, 2))\nax.plot(np.arange(10) ** 2)\nplt.show()",
    ),
    (
        "code",
        (
            "import ipywidgets as W\n"
            "from IPython.display import display\n"
            "\n"
            "def draw(freq, color):\n"
            "    fig, ax = plt.subplots(figsize=(3, 2))\n"
            "    x = np.linspace(0, 1, 200)\n"
            "    ax.plot(x, np.sin(2 * np.pi * freq * x), color=color)\n"
            "    ax.set_title(f'freq={freq}')\n"
            "    return fig\n"
            "\n"
            "def explorer():\n"
            "    freq = W.IntSlider(value=2, min=1, max=8, description='freq',\n"
            "                       continuous_update=False)\n"
            "    color = W.Dropdown(options=['tab:blue', 'tab:red'], description='color')\n"
            "    out = W.Output()\n"
            "    def redraw(_=None):\n"
            "        with out:\n"
            "            out.clear_output(wait=True)\n"
            "            fig = draw(freq.value, color.value)\n"
            "            plt.show()\n"
            "            plt.close(fig)\n"
            "    for control in (freq, color):\n"
            "        control.observe(redraw, names='value')\n"
            "    redraw()\n"
            "    return W.VBox([W.HBox([freq, color]), out])\n"
            "\n"
            "display(explorer())"
        ),
    ),
]

_BAD_CELLS = [
    ("code", "import ipywidgets as W\nprint(W.IntSlider(value=3))  # a widget's text repr"),
    (
        "code",
        (
            "from IPython.display import display\n"
            "view = {'model_id': 'no-such-model', 'version_major': 2, 'version_minor': 0}\n"
            "display({'application/vnd.jupyter.widget-view+json': view,\n"
            "         'text/plain': 'a widget view whose model does not exist'}, raw=True)"
        ),
    ),
    (
        "code",
        (
            "def fail():\n    return 1 / 0\n\ntry:\n    fail()\nexcept ZeroDivisionError as e:\n"
            "    raise ZeroDivisionError('fixture cell divides by zero') from e"
        ),
    ),
    ("code", "print('after the error')"),
]


_SLOW_CELLS = [
    ("code", "print('started')"),
    ("code", "import time\ntime.sleep(600)  # never finishes within a test's limit"),
]


def _notebook(cells):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for kind, source in cells:
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        nb.cells.append(make(source))
    return nb


def write_fixture_notebooks(folder: Path) -> None:
    """Write the fixture notebooks (good, bad, slow) into ``folder``."""
    import nbformat

    for name, cells in [(GOOD, _GOOD_CELLS), (BAD, _BAD_CELLS), (SLOW, _SLOW_CELLS)]:
        nbformat.write(_notebook(cells), str(Path(folder) / name))

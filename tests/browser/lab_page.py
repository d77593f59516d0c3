"""Drive one notebook in JupyterLab through Playwright and read what the page shows (issue 9).

``NotebookPage`` opens ``/lab/workspaces/<stem>/tree/<name>`` (a workspace of its own, so the
notebooks opened before it are not restored beside it), waits for the kernel, runs all cells
from the menu (Run > Run All Cells), waits until no prompt reads ``[*]`` and the kernel is idle,
then reports what a reader would see:

* ``errors()``: tracebacks in any output area, widget Outputs included, each as
  ``"cell 7 [In 5]: ValueError: ..."``;
* ``image_problems()`` and ``count_images()``: figures must be ``<img>`` elements that decoded;
* ``widget_problems()``: widgets shown as their text repr (``IntSlider(value=...``) or as
  "Error displaying widget" instead of live controls;
* ``explorers()`` and ``change_explorer(k)``: the widget explorers (a VBox of controls plus an
  Output holding a picture); moving one control must replace the picture.

Every check is read from the DOM, so a broken widget manager, renderer or kernel shows up as
a reader would meet it. ``window.jupyterapp`` (the server runs with ``expose_app_in_browser``)
is used only to know when the kernel is connected and idle.
"""

from __future__ import annotations

import re
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeout

OUTPUT = ".jp-OutputArea-output"
STDERR = f'{OUTPUT}[data-mime-type="application/vnd.jupyter.stderr"]'

# what a page shows instead of live controls when the widget manager is missing or broken
WIDGET_TEXT_REPR = re.compile(
    r"\b(?:Int|Float|FloatLog|IntRange|FloatRange|Selection|SelectionRange)?"
    r"(?:Slider|Dropdown|Checkbox|ToggleButtons?|VBox|HBox|GridBox|Output|Button|Text|Label|"
    r"HTML|Select|RadioButtons|Tab|Accordion|Play|Image)"
    r"\((?:value|children|options|outputs|layout|description|index)="
)
WIDGET_ERRORS = (
    "Error displaying widget",
    "A Jupyter widget could not be displayed",
    "Failed to load model class",
    "Loading widget...",
)
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$")

# Reads each cell: 1-based position, prompt ("[*]:", "[3]:"), first source line, and outputs.
_CELLS_JS = """
() => Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell'))
  .map((cell, i) => {
    const prompt = cell.querySelector('.jp-InputPrompt');
    const src = cell.querySelector('.cm-content');
    return {
      index: i + 1,
      prompt: prompt ? prompt.textContent.trim() : '',
      kind: cell.classList.contains('jp-CodeCell') ? 'code' : 'other',
      source: src ? src.innerText : '',
      outputs: Array.from(cell.querySelectorAll('.jp-OutputArea-output')).map(o => ({
        mime: o.getAttribute('data-mime-type') || '',
        text: o.innerText || '',
      })),
    };
  })
"""

# Signature of an explorer's picture(s): a hash over the src of every <img> in its Output widgets,
# and whether all of them decoded.
_PICTURE_JS = """
(el) => {
  const imgs = Array.from(el.querySelectorAll('.widget-output img'));
  let h = 2166136261 >>> 0;
  for (const img of imgs) {
    const s = img.src || '';
    for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
    h ^= 124; h = Math.imul(h, 16777619) >>> 0;
  }
  return {n: imgs.length, hash: h.toString(16),
          decoded: imgs.every(img => img.complete && img.naturalWidth > 0)};
}
"""

# True once the notebook's kernel is connected and idle (a restart or death reads as false).
_KERNEL_JS = """
() => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  const ctx = w && w.sessionContext;
  const k = ctx && ctx.session && ctx.session.kernel;
  return k ? k.status + '/' + k.connectionStatus : (ctx ? 'no-kernel' : 'no-notebook');
}
"""


class NotebookFailure(AssertionError):
    """A notebook that did not open, run or render as it should; the message says what is seen."""


@dataclass
class Explorer:
    """One widget explorer: ``index`` (1-based, page order), the output ``element`` (a Playwright
    locator for the widget's output area) and the ``cell`` position that displays it."""

    index: int
    cell: int
    element: object


class NotebookPage:
    """One notebook opened in JupyterLab in a Playwright ``page``.

    ``lab`` is the running ``LabServer``; ``shots`` the folder for this notebook's screenshots.
    """

    def __init__(self, page, lab, name: str, shots: Path) -> None:
        self.page = page
        self.lab = lab
        self.name = name
        self.stem = Path(name).stem
        self.shots = Path(shots)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.console: list[str] = []
        page.on("pageerror", lambda err: self.console.append(f"page error: {err}"))
        page.on(
            "console",
            lambda m: (
                self.console.append(f"console {m.type}: {m.text}") if m.type == "error" else None
            ),
        )

    # --- reading the page ------------------------------------------------------------------
    def cells(self) -> list[dict]:
        return self.page.evaluate(_CELLS_JS)

    def kernel_status(self) -> str:
        return self.page.evaluate(_KERNEL_JS)

    def dialog_text(self) -> str:
        """Text of an open JupyterLab dialog (kernel died, file load error...), or ''."""
        dialogs = self.page.locator(".jp-Dialog")
        if dialogs.count() == 0:
            return ""
        return " | ".join(t.strip().replace("\n", " ") for t in dialogs.all_inner_texts())

    def describe(self, n_cells: int = 3) -> str:
        """What the page shows: kernel, dialog, running cells and the last executed cells."""
        try:
            cells = self.cells()
            kernel = self.kernel_status()
            dialog = self.dialog_text()
        except PlaywrightError as err:  # the page itself may be gone
            return f"(the page cannot be read: {err})"
        lines = [f"kernel: {kernel}"]
        if dialog:
            lines.append(f"dialog: {dialog[:300]}")
        if not cells:
            body = self.page.inner_text("body")[:500] if self.page.locator("body").count() else ""
            lines.append(f"no notebook cells on the page; it shows: {body!r}")
            return "\n".join(lines)
        running = [c for c in cells if "*" in c["prompt"]]
        if running:
            lines.append(
                "still running or queued: "
                + ", ".join(
                    f"cell {c['index']} ({_first_line(c['source'])!r})" for c in running[:5]
                )
            )
        ran = [c for c in cells if re.match(r"\[\d+\]", c["prompt"]) or "*" in c["prompt"]]
        for c in (ran or cells)[-n_cells:]:
            out = " / ".join(o["text"].strip() for o in c["outputs"] if o["text"].strip())
            lines.append(
                f"cell {c['index']} {c['prompt']} {_first_line(c['source'])!r} -> {out[-300:]!r}"
            )
        return "\n".join(lines)

    # --- opening and running ---------------------------------------------------------------
    def open(self, timeout_s: float) -> None:
        """Open the notebook in a workspace of its own and wait for its idle, connected kernel."""
        deadline = time.monotonic() + timeout_s
        self.page.goto(
            self.lab.url(f"lab/workspaces/{self.stem}/tree/{self.name}"), timeout=timeout_s * 1000
        )
        while True:
            status = "not loaded"
            if self.page.locator(".jp-NotebookPanel .jp-Cell").count() > 0:
                status = self.kernel_status()
                if status == "idle/connected":
                    return
            dialog = self.dialog_text()
            if dialog:
                raise NotebookFailure(f"{self.name}: did not open; a dialog says: {dialog[:500]}")
            if time.monotonic() > deadline:
                raise NotebookFailure(
                    f"{self.name}: not open with an idle kernel after {timeout_s:.0f} s "
                    f"(kernel: {status}); the page shows:\n{self.describe()}"
                )
            time.sleep(0.5)

    def run_all(self) -> None:
        """Run > Run All Cells, from JupyterLab's menu bar."""
        self.page.click(".lm-MenuBar-itemLabel:text-is('Run')")
        self.page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
        # the click queues every code cell: wait until the first prompt says so
        self.page.wait_for_function(
            "() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputPrompt'))"
            ".some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))",
            timeout=30_000,
        )

    def wait_finished(self, deadline: float, limit_s: float) -> None:
        """Wait until no prompt reads ``[*]`` and the kernel is idle (3 looks in a row)."""
        quiet = 0
        while quiet < 3:
            cells = self.cells()
            status = self.kernel_status()
            running = any("*" in c["prompt"] for c in cells)
            quiet = quiet + 1 if (not running and status == "idle/connected") else 0
            if status.startswith(("dead", "restarting", "autorestarting", "no-kernel")):
                raise NotebookFailure(
                    f"{self.name}: the kernel is {status} during the run; "
                    f"the page shows:\n{self.describe()}"
                )
            if time.monotonic() > deadline:
                raise NotebookFailure(
                    f"{self.name}: not finished within its limit of {limit_s:.0f} s; "
                    f"the page shows:\n{self.describe()}"
                )
            time.sleep(0.5)
        # widget views render after their display message: let "Loading widget..." settle
        with suppress(PlaywrightTimeout):  # widget_problems() reports what is still loading
            self.page.wait_for_function(
                "() => !Array.from(document.querySelectorAll('.jp-OutputArea-output'))"
                ".some(o => (o.innerText || '').includes('Loading widget...'))",
                timeout=30_000,
            )

    # --- checks ----------------------------------------------------------------------------
    def errors(self) -> list[str]:
        """One line per traceback on the page: ``cell N [In k]: <exception line>``."""
        found = []
        for cell in self.cells():
            for out in cell["outputs"]:
                text = out["text"]
                is_stderr = out["mime"] == "application/vnd.jupyter.stderr"
                if not ("Traceback" in text or (is_stderr and _error_line(text))):
                    continue
                line = _error_line(text) or _first_line(text)
                found.append(f"cell {cell['index']} {cell['prompt'].rstrip(':')}: {line}")
        # a traceback the cell walk missed (e.g. an output area outside a cell) still counts
        if not found and self.page.locator(STDERR, has_text="Traceback").count():
            found.append(
                "a traceback outside any cell: "
                + _first_line(self.page.locator(STDERR, has_text="Traceback").first.inner_text())
            )
        return found

    def count_images(self) -> int:
        return self.page.locator(f"{OUTPUT} img").count()

    def image_problems(self) -> list[str]:
        """Image outputs that did not become a decoded ``<img>``."""
        problems = self.page.evaluate("""
            () => Array.from(document.querySelectorAll(
                '.jp-OutputArea-output[data-mime-type="image/png"], .jp-OutputArea-output img'))
              .flatMap(el => {
                const imgs = el.tagName === 'IMG' ? [el] : Array.from(el.querySelectorAll('img'));
                const cell = el.closest('.jp-Cell');
                const idx = cell ? Array.from(cell.parentNode.children).filter(
                    c => c.classList.contains('jp-Cell')).indexOf(cell) + 1 : 0;
                if (imgs.length === 0) return [`cell ${idx}: an image/png output without <img>`];
                return imgs.filter(i => !(i.complete && i.naturalWidth > 0))
                           .map(() => `cell ${idx}: an <img> that did not decode`);
              })
        """)
        return sorted(set(problems))

    def widget_problems(self) -> list[str]:
        """Widgets shown as text (their repr or an error) instead of live controls."""
        found = self.unrendered_widgets()
        for cell in self.cells():
            for out in cell["outputs"]:
                text = out["text"]
                m = WIDGET_TEXT_REPR.search(text)
                if m:
                    found.append(
                        f"cell {cell['index']}: widget shown as text "
                        f"{_line_around(text, m.start())!r}"
                    )
                for marker in WIDGET_ERRORS:
                    if marker in text:
                        found.append(
                            f"cell {cell['index']}: {_line_around(text, text.index(marker))!r}"
                        )
        return found

    def unrendered_widgets(self) -> list[str]:
        """Cells whose model holds more widget displays than the page shows as live widgets.

        The notebook model (read through ``window.jupyterapp``) says which outputs are widget
        views; each must be a live ``.jupyter-widgets`` element in that cell's output area.
        """
        counts = self.page.evaluate("""
            () => {
              const nb = window.jupyterapp.shell.currentWidget.content;
              return nb.widgets.map((cell, i) => {
                const outs = (cell.model.toJSON().outputs || []);
                const model = outs.filter(o => o.data &&
                    o.data['application/vnd.jupyter.widget-view+json']).length;
                const live = Array.from(cell.node.querySelectorAll(
                    '.jp-OutputArea-output > .jupyter-widgets'))
                  .filter(w => !w.parentElement.closest('.widget-output')).length;
                return {index: i + 1, model, live};
              });
            }
        """)
        return [
            f"cell {c['index']}: {c['model']} widget display(s), {c['live']} rendered as "
            f"live controls"
            for c in counts
            if c["live"] < c["model"]
        ]

    def explorers(self) -> list[Explorer]:
        """Top-level widget outputs holding live controls and an Output widget."""
        outs = self.page.locator(f"{OUTPUT}:has(> .jupyter-widgets .widget-output)")
        found = []
        for i in range(outs.count()):
            el = outs.nth(i)
            cell = el.evaluate("""o => { const c = o.closest('.jp-Cell');
                return Array.from(c.parentNode.children).filter(
                    x => x.classList.contains('jp-Cell')).indexOf(c) + 1; }""")
            found.append(Explorer(index=i + 1, cell=cell, element=el))
        return found

    def picture(self, explorer: Explorer) -> dict:
        return explorer.element.evaluate(_PICTURE_JS)

    def screenshot_page(self, filename: str) -> Path:
        path = self.shots / filename
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def screenshot_explorer(self, explorer: Explorer, filename: str) -> Path:
        path = self.shots / filename
        explorer.element.scroll_into_view_if_needed()
        explorer.element.screenshot(path=str(path))
        return path

    def change_explorer(self, explorer: Explorer, timeout_s: float = 60.0) -> str:
        """Move one control of ``explorer`` and wait for a new, decoded picture.

        Tries, in order, the first slider (focus its handle, ArrowRight; ArrowLeft at the end of
        its range), dropdown (pick another option), toggle button (click another) or checkbox.
        Returns a description of the change; raises NotebookFailure when the picture stays.
        """
        where = f"{self.name}: explorer {explorer.index} (cell {explorer.cell})"
        before = self.picture(explorer)
        if before["n"] == 0:
            raise NotebookFailure(f"{where}: its Output holds no picture (<img>) before any change")
        what = self._move_a_control(explorer, where)
        deadline = time.monotonic() + timeout_s
        while True:
            now = self.picture(explorer)
            if now["n"] > 0 and now["decoded"] and now["hash"] != before["hash"]:
                return what
            errs = [e for e in self.errors()]
            if errs:
                raise NotebookFailure(f"{where}: after {what}, an error: {errs[0]}")
            if time.monotonic() > deadline:
                raise NotebookFailure(
                    f"{where}: the picture did not change within {timeout_s:.0f} s after {what}"
                )
            time.sleep(0.25)

    def _move_a_control(self, explorer: Explorer, where: str) -> str:
        el = explorer.element
        slider = el.locator(".widget-slider").first
        if slider.count():
            label = _label(slider)
            readout = slider.locator(".widget-readout")
            old = readout.inner_text().strip() if readout.count() else "?"
            handle = slider.locator(".noUi-handle").first
            handle.scroll_into_view_if_needed()
            handle.focus()
            self.page.keyboard.press("ArrowRight")
            new = readout.inner_text().strip() if readout.count() else "?"
            if new == old:  # at the end of its range
                self.page.keyboard.press("ArrowLeft")
                new = readout.inner_text().strip() if readout.count() else "?"
            return f"moving slider {label!r} from {old} to {new}"
        select = el.locator(".widget-dropdown select").first
        if select.count():
            label = _label(el.locator(".widget-dropdown").first)
            options = select.locator("option").all_inner_texts()
            current = select.evaluate("s => s.options[s.selectedIndex].textContent")
            others = [o for o in options if o != current]
            if not others:
                raise NotebookFailure(f"{where}: dropdown {label!r} has one option only")
            select.select_option(label=others[0])
            return f"choosing {others[0]!r} in dropdown {label!r} (was {current!r})"
        toggles = el.locator(".widget-toggle-buttons button")
        if toggles.count() > 1:
            for i in range(toggles.count()):
                button = toggles.nth(i)
                if "mod-active" not in (button.get_attribute("class") or ""):
                    text = button.inner_text().strip()
                    button.click()
                    return f"clicking toggle button {text!r}"
        checkbox = el.locator(".widget-checkbox input[type=checkbox]").first
        if checkbox.count():
            label = _label(el.locator(".widget-checkbox").first)
            checkbox.click()
            return f"clicking checkbox {label!r}"
        raise NotebookFailure(f"{where}: no slider, dropdown, toggle button or checkbox to move")


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _error_line(text: str) -> str:
    """The ``ExceptionName: message`` line of a traceback (the last one when chained)."""
    for line in reversed(text.splitlines()):
        if ERROR_LINE.match(line.strip()):
            return line.strip()
    return ""


def _line_around(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start : end if end >= 0 else len(text)].strip()[:200]


def _label(control) -> str:
    label = control.locator(".widget-label").first
    return label.inner_text().strip() if label.count() else "(no label)"

"""A live loss plot for :func:`mrcnn_edu.engine.train` (notebook ``08_training.ipynb``).

Mask R-CNN (He et al. 2017, section 3.1 "Training") minimises the sum of five losses: the RPN's
objectness and box terms and the heads' classification, box and mask terms. Watching them fall,
each on its own, is how one sees a run work (or not) while it runs. The training loop reports
each logged row through its callbacks (``on_log(step, row)``) and never draws
(docs/ARCHITECTURE.md);
:class:`LiveLossPlot` is such a callback: it redraws :func:`mrcnn_edu.viz.plot_loss_curves` into
one display slot of the notebook, replaced in place (``IPython.display`` with a display id),
so the cell shows one picture that grows, not one picture per redraw.

A display handle rather than an ``ipywidgets.Output``: the picture is a plain ``image/png``
output, so an executed notebook keeps the last one, and nothing travels through widget comms
while the training loop holds the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from matplotlib.figure import Figure

from mrcnn_edu.viz import plot_loss_curves

__all__ = ["LiveLossPlot"]


class LiveLossPlot:
    """A training callback that redraws the loss curves as rows are logged.

    Use::

        live = LiveLossPlot(title="shapes")
        live.show()                              # the (empty) plot appears here
        run_training(exp, data, out, callbacks=[live])
        live.finish()                            # the last redraw, whatever the throttle

    Args:
        title: the plot's title; the latest step and total loss are appended.
        min_interval_s: redraw at most this often (rendering a PNG costs ~0.1 s; a fast run
            logging every step would otherwise spend its time drawing). The rows are all kept;
            :meth:`finish` draws them all.
        log_y: log-scale losses (the small ones beside the large ones).
        figsize, dpi: of the picture.
        display: where the picture goes. ``None``: ``IPython.display.display`` with a display
            id (in a notebook); any callable ``display(png_bytes)`` otherwise (tests, scripts).

    Attributes:
        rows: every row received (``on_log``), oldest first.
        redraws: how many pictures were drawn.
        figure: the matplotlib ``Figure`` of the latest picture (its axes hold the curves).
        png: the latest picture as PNG bytes.
    """

    def __init__(
        self,
        *,
        title: str | None = None,
        min_interval_s: float = 2.0,
        log_y: bool = True,
        figsize: Sequence[float] = (7.5, 3.8),
        dpi: int = 80,
        display=None,
    ):
        if min_interval_s < 0:
            raise ValueError(f"LiveLossPlot: min_interval_s must be >= 0, got {min_interval_s}")
        self.title = title
        self.min_interval_s = float(min_interval_s)
        self.log_y = log_y
        self.figsize = tuple(figsize)
        self.dpi = int(dpi)
        self._display = display
        self._handle = None
        self._last_draw = -float("inf")
        self.rows: list[dict] = []
        self.redraws = 0
        self.figure: Figure | None = None
        self.png: bytes | None = None

    # ----------------------------------------------------------------------------- callbacks
    def on_log(self, step: int, row: dict) -> None:
        """Keep ``row``; redraw if ``min_interval_s`` has passed since the last picture."""
        if "step" not in row:
            raise KeyError(
                f"LiveLossPlot.on_log: row of step {step} has no 'step' "
                f"(keys {sorted(row)}); pass the rows mrcnn_edu.engine.train logs"
            )
        self.rows.append(dict(row))
        if time.perf_counter() - self._last_draw >= self.min_interval_s:
            self.redraw()

    # ----------------------------------------------------------------------------- drawing
    def show(self) -> None:
        """Put the picture (so far) into the notebook; later redraws replace it in place."""
        self.redraw()

    def finish(self) -> None:
        """Draw every row received (the throttle may have skipped the last ones)."""
        self.redraw()

    def draw(self) -> Figure:
        """A new ``Figure`` of the rows so far (no display)."""
        fig = Figure(figsize=self.figsize, dpi=self.dpi)
        ax = fig.subplots()
        title = self.title or "training losses"
        if self.rows:
            last = self.rows[-1]
            total = f", total {last['loss']:.3f}" if last.get("loss") is not None else ""
            title = f"{title}: step {last['step']}{total}"
        plot_loss_curves(self.rows, ax=ax, title=title, log_y=self.log_y and bool(self.rows))
        if self.rows:
            ax.legend(fontsize=7, ncol=3, loc="upper right")
        fig.tight_layout()
        return fig

    def redraw(self) -> None:
        """Draw now and replace the picture."""
        import io

        fig = self.draw()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi)
        self.figure, self.png = fig, buf.getvalue()
        self.redraws += 1
        self._last_draw = time.perf_counter()
        if self._display is not None:
            self._display(self.png)
            return
        from IPython.display import Image, display

        picture = Image(data=self.png, format="png")
        if self._handle is None:
            self._handle = display(picture, display_id=True)
        else:
            self._handle.update(picture)

"""ipywidgets explorers used by the notebooks (only ``viz``, ``widgets`` and ``cli`` import
matplotlib / ipywidgets, DESIGN.md).

Every explorer follows one pattern: a ``VBox`` of controls plus an ``Output`` that is cleared and
re-drawn on each change. Only the dataset browser is imported here; import the others from their
submodule (``mrcnn_edu.widgets.roi``, ``mrcnn_edu.widgets.anchors``) so that importing this
package stays light.
"""

from .dataset import dataset_browser, draw_sample

__all__ = ["dataset_browser", "draw_sample"]

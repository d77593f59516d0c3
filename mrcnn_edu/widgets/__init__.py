"""ipywidgets explorers used by the notebooks (only ``viz``, ``widgets`` and ``cli`` import
matplotlib / ipywidgets, docs/ARCHITECTURE.md).

Every explorer follows one pattern: a ``VBox`` of controls plus an ``Output`` that is cleared and
re-drawn on each change. The dataset browser, the FPN level explorer and the mask target explorer
are imported here (they need only ``viz``); import the others from their submodule
(``mrcnn_edu.widgets.roi``, ``mrcnn_edu.widgets.anchors``; notebook 08's live loss plot,
``mrcnn_edu.widgets.training.LiveLossPlot``) so that importing this package stays light.
"""

from .dataset import dataset_browser, draw_sample
from .fpn_levels import fpn_level_explorer
from .mask_targets import mask_target_explorer

__all__ = ["dataset_browser", "draw_sample", "fpn_level_explorer", "mask_target_explorer"]

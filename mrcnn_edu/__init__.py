"""mrcnn_edu: Mask R-CNN (He, Gkioxari, Dollar, Girshick, 2017) rebuilt from its parts.

The notebooks in ``notebooks/`` derive each piece; this package holds the tested code they
import. Layers (who may import whom) are described in ``docs/ARCHITECTURE.md``: ``ops`` are leaves,
``boxes``/``anchors``/``matching`` sit on ``ops``, ``rpn`` sits on those, and only ``viz``,
``widgets`` and ``cli`` import matplotlib, ipywidgets or argparse.
"""

__version__ = "0.1.0"

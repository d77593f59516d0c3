"""THE list of notebooks the browser suite runs in JupyterLab (issue 9).

A later notebook joins the suite by one line here. Each entry names the file in ``notebooks/``,
its time limit (open + run all cells, quick mode, on a 2-core machine) and what it must show:
``figures``: at least one matplotlib picture as an ``<img>``; ``explorers``: how many widget
explorers (a VBox of controls + an Output with a picture) it displays at least.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Notebook:
    name: str  # file name in notebooks/
    limit_s: float = 150.0  # open it and run every cell within this many seconds (quick mode)
    figures: bool = True  # it must show at least one figure as an <img>
    explorers: int = 1  # it must display at least this many widget explorers


NOTEBOOKS: list[Notebook] = [
    Notebook("00_tour.ipynb", explorers=0),  # the tour shows figures only
    Notebook("01_data_coco_format.ipynb"),
    Notebook("02_roipool_vs_roialign.ipynb"),
    # the CUDA kernels run in Numba's simulator without a GPU: slower
    Notebook("03_kernels_numba_cuda.ipynb", limit_s=200.0, explorers=0),
    Notebook("04_anchors_and_rpn.ipynb"),
    Notebook("05_box_head.ipynb", explorers=0),  # figures of sampling, targets, NMS
    Notebook("06_mask_head.ipynb"),  # the mask target explorer
    # builds several ResNet-50 models and runs torchvision's and ours: slower
    Notebook("07_fpn_full_model.ipynb", limit_s=200.0),  # the FPN level explorer
    # trains a few steps and evaluates: slower; the live loss plot is a picture, not an explorer
    Notebook("08_training.ipynb", limit_s=200.0, explorers=0),
    # trains four two-step runs and evaluates them: slower; figures only
    Notebook("08b_ablations.ipynb", limit_s=240.0, explorers=0),
    # starts torchrun (2 gloo processes) four times, trains and evaluates: slower; figures only
    Notebook("09_coco_training.ipynb", limit_s=240.0, explorers=0),
    # trains a few steps, evaluates, builds a ResNet-50 model: slower; the heatmap explorer
    Notebook("10_keypoints.ipynb", limit_s=200.0),
]

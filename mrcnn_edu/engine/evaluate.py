"""Evaluation: how good are the boxes, masks and keypoints a model detects?

Two measures live here:

- :func:`proposal_recall`, the measure of a Region Proposal Network used by Ren et al. 2015
  (Faster R-CNN, section 4.1 and figure 4: recall against IoU for 300 / 1000 / 2000 proposals)
  and by Hosang et al. 2016 ("What makes for effective detection proposals?"). Notebook
  ``04_anchors_and_rpn.ipynb`` plots it for the RPN trained there.
- :func:`evaluate`, COCO's AP through ``pycocotools.cocoeval.COCOeval``: box AP, mask AP and
  keypoint AP (OKS), the numbers of Mask R-CNN's tables (He et al. 2017, section 4: "AP
  (averaged over IoU thresholds), AP50, AP75 and APS, APM, APL (AP at different scales)").
  Notebooks ``08_training.ipynb`` (COCO metrics) and ``10_keypoints.ipynb`` (OKS)
  are where the series explains it.

How a model's output becomes a COCO result (:func:`coco_results`)::

    boxes  [N, 4] (x1, y1, x2, y2)  ->  "bbox": [x, y, w, h]
    labels [N] contiguous 1..C       ->  "category_id": dataset.label_to_cat_id[label]
    masks  [N, 1, H, W] probability ->  "segmentation": RLE of (mask >= 0.5), counts as str
    keypoints [N, K, 3] (x, y, v)    ->  "keypoints": [x1, y1, v1, x2, y2, v2, ...]

Under ``torchrun`` :func:`evaluate` runs in parallel: each rank runs the model on its shard of
the batches, rank 0 gathers the detections, puts them back in the data set's order and runs
COCOeval once, and every rank returns the same result, equal to a single-process evaluation.

``engine`` reports through return values: nothing here prints (COCOeval's own printing is
captured into :attr:`EvalResult.summary_text`) or plots.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm.auto import tqdm

from mrcnn_edu.ops import box_iou
from mrcnn_edu.utils import atomic_write, keep_freed_memory

from . import distributed as dist_utils

# ---------------------------------------------------------------------------------------------
# Proposal recall (notebook 04)
# ---------------------------------------------------------------------------------------------


def _check_boxes(boxes, what: str, i: int) -> torch.Tensor:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(
            f"proposal_recall: {what}[{i}] must be a torch.Tensor, got {type(boxes).__name__}"
        )
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"proposal_recall: {what}[{i}] must have shape [N, 4] (x1, y1, x2, y2), "
            f"got {tuple(boxes.shape)}"
        )
    return boxes.detach().to(torch.float32)


def proposal_recall(
    proposals: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    num_proposals: Sequence[int] = (50, 100, 300, 1000),
    iou_thresholds: Sequence[float] = (0.5, 0.7),
) -> dict[tuple[int, float], float]:
    """Fraction of ground-truth boxes covered by at least one of the top-``k`` proposals.

    A gt box counts as recalled at ``(k, t)`` when some proposal among the first ``k`` of its
    image has IoU ``>= t`` with it. The recall pools all gt boxes of all images (a gt box is one
    vote, as in COCO's AR, so images with many objects weigh more).

    Args:
        proposals: per image, ``[P_i, 4]`` float (x1, y1, x2, y2) in pixels, **sorted by
            decreasing score** (as ``RegionProposalNetwork`` returns them); an image with
            ``P_i < k`` simply uses all of its proposals.
        gt_boxes: per image, ``[G_i, 4]`` float ground-truth boxes (``G_i`` may be 0).
        num_proposals: the ``k`` values.
        iou_thresholds: the ``t`` values.

    Returns:
        ``{(k, t): recall}`` with ``recall`` a Python float in [0, 1], or ``nan`` when there
        is no gt box at all.

    Example (one image, two gt boxes; the best proposal covers the first only)::

        >>> p = [torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 25.]])]
        >>> g = [torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]])]
        >>> proposal_recall(p, g, num_proposals=(1, 2), iou_thresholds=(0.5, 0.7))
        {(1, 0.5): 0.5, (1, 0.7): 0.5, (2, 0.5): 1.0, (2, 0.7): 0.5}
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(
            f"proposal_recall: got {len(proposals)} proposal lists but "
            f"{len(gt_boxes)} gt lists; need one of each per image"
        )
    ks = [int(k) for k in num_proposals]
    ts = [float(t) for t in iou_thresholds]
    if any(k < 1 for k in ks):
        raise ValueError(f"proposal_recall: num_proposals must be >= 1, got {ks}")
    if any(not 0.0 <= t <= 1.0 for t in ts):
        raise ValueError(f"proposal_recall: iou_thresholds must lie in [0, 1], got {ts}")

    covered = {(k, t): 0 for k in ks for t in ts}
    num_gt = 0
    for i, (props, gts) in enumerate(zip(proposals, gt_boxes)):
        props = _check_boxes(props, "proposals", i)
        gts = _check_boxes(gts, "gt_boxes", i).to(props.device)
        num_gt += gts.shape[0]
        if gts.shape[0] == 0:
            continue
        if props.shape[0] == 0:
            continue  # nothing proposed: no gt box of this image is covered
        iou = box_iou(gts, props[: max(ks)])  # [G, min(P, max k)]
        # best_upto[:, j] = best IoU of each gt box among the first j+1 proposals
        best_upto = iou.cummax(dim=1).values  # [G, P']
        for k in ks:
            best = best_upto[:, min(k, best_upto.shape[1]) - 1]  # [G]
            for t in ts:
                covered[(k, t)] += int((best >= t).sum())
    if num_gt == 0:
        return {key: float("nan") for key in covered}
    return {key: n / num_gt for key, n in covered.items()}


# ---------------------------------------------------------------------------------------------
# COCO AP (notebooks 08 and 10)
# ---------------------------------------------------------------------------------------------

#: The IoU types COCOeval knows, in the order they are reported.
IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")

#: Names of ``COCOeval.stats`` for boxes and masks: AP over IoU 0.50:0.05:0.95, at 0.50 and
#: 0.75, for small (< 32^2 px), medium and large (> 96^2 px) objects, then the average recall
#: with at most 1, 10, 100 detections per image and AR by size (100 detections).
BOX_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
#: Names of ``COCOeval.stats`` for keypoints (OKS instead of IoU, at most 20 detections per
#: image, no "small" range: COCO does not annotate keypoints of small persons).
KEYPOINT_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APm",
    "APl",
    "AR",
    "AR50",
    "AR75",
    "ARm",
    "ARl",
)
#: The columns of :func:`format_metrics_table`.
TABLE_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")

#: COCO's per-keypoint OKS constants for its 17 person keypoints (``COCOeval.Params``): the
#: spread of human annotators' clicks around each keypoint, relative to the object's scale.
COCO_KEYPOINT_SIGMAS: tuple[float, ...] = tuple(
    s / 10.0
    for s in (
        0.26,
        0.25,
        0.25,
        0.35,
        0.35,
        0.79,
        0.79,
        0.72,
        0.72,
        0.62,
        0.62,
        1.07,
        1.07,
        0.87,
        0.87,
        0.89,
        0.89,
    )
)


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        metrics: ``{iou_type: {name: value}}`` with the names of :data:`BOX_STAT_NAMES` (bbox,
            segm) or :data:`KEYPOINT_STAT_NAMES` plus ``"APs"`` (keypoints), values in [0, 1];
            ``nan`` where COCOeval says -1 (no ground truth in that area range).
        per_category: ``{iou_type: {category name: AP}}`` (AP over IoU 0.50:0.95, all areas).
        stats: ``{iou_type: COCOeval.stats as a list}``, exactly as COCOeval computed them.
        val_losses: mean over the images of each loss the model returned (empty when
            ``with_losses=False`` or the model returns none).
        images_per_second: images divided by the seconds spent in the model's forward passes
            (data loading and COCOeval not counted).
        num_images: images evaluated.
        num_detections: detections over all images.
        iou_types: the IoU types evaluated, in :data:`IOU_TYPES` order.
        summary_text: COCOeval's printed summary per IoU type.
        results_file: where the COCO results JSON was written (or None).
    """

    metrics: dict[str, dict[str, float]]
    per_category: dict[str, dict[str, float]]
    stats: dict[str, list[float]]
    val_losses: dict[str, float]
    images_per_second: float
    num_images: int
    num_detections: int
    iou_types: tuple[str, ...]
    summary_text: str = ""
    results_file: Path | None = None


def unwrap_coco_dataset(dataset) -> tuple[object, list[int]]:
    """The COCO-backed data set under ``dataset`` and the image ids ``dataset`` covers, in order.

    ``dataset`` is a :class:`mrcnn_edu.data.CocoDetection` (anything with ``coco``, ``ids``
    and ``label_to_cat_id``) or ``torch.utils.data.Subset`` s of one, nested any depth.

    Returns:
        ``(base, image_ids)``: ``dataset[j]`` is image ``image_ids[j]`` of ``base.coco``.
    """
    chain = []
    ds = dataset
    while not hasattr(ds, "coco"):
        if isinstance(ds, torch.utils.data.Subset):
            chain.append(ds.indices)
            ds = ds.dataset
        else:
            raise TypeError(
                f"expected a COCO-format data set (mrcnn_edu.data.CocoDetection, or a "
                f"torch.utils.data.Subset of one), got {type(dataset).__name__}: it has no "
                f"'coco' attribute (pycocotools COCO of its annotation file)"
            )
    ids = [int(i) for i in ds.ids]
    for indices in reversed(chain):  # innermost Subset first
        ids = [ids[int(i)] for i in indices]
    return ds, ids


def _label_map(base) -> dict[int, int]:
    """Contiguous training label -> COCO category id (the one place the mapping is read)."""
    mapping = getattr(base, "label_to_cat_id", None)
    if mapping is None:  # a data set whose labels already are category ids
        return {int(c): int(c) for c in base.coco.getCatIds()}
    return {int(k): int(v) for k, v in mapping.items()}


def _as_cpu(x, name: str, i: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"coco_results: detections[{i}]['{name}'] must be a torch.Tensor, "
            f"got {type(x).__name__}"
        )
    return x.detach().cpu()


def coco_results(
    detections: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    *,
    label_to_cat_id: Mapping[int, int] | None = None,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """Model detections -> COCO result dicts (the format of COCO's results JSON).

    Args:
        detections: per image a dict with ``boxes`` [N, 4] float (x1, y1, x2, y2) in the
            original image's pixels, ``labels`` [N] int64, ``scores`` [N] float and optionally
            ``masks`` [N, 1, H, W] (or [N, H, W]) float probabilities in the image's size and
            ``keypoints`` [N, K, 3] float (x, y, v).
        image_ids: the COCO image id of each entry of ``detections``.
        label_to_cat_id: label -> COCO ``category_id`` (``CocoDetection.label_to_cat_id``);
            ``None``: labels already are category ids.
        mask_threshold: a mask pixel is in the object when its probability is ``>=`` this.

    Returns:
        One dict per detection: ``image_id``, ``category_id``, ``score``, ``bbox``
        ``[x, y, w, h]``, plus ``segmentation`` (compressed RLE ``{"size": [H, W], "counts":
        str}``) when masks are given and ``keypoints`` (``[x1, y1, v1, ...]``, 3K floats) when
        keypoints are given. All values are plain Python types, ready for ``json.dump``.

    Example::

        >>> det = {"boxes": torch.tensor([[10., 20., 40., 60.]]), "labels": torch.tensor([2]),
        ...        "scores": torch.tensor([0.5])}
        >>> coco_results([det], [7], label_to_cat_id={1: 1, 2: 3})
        [{'image_id': 7, 'category_id': 3, 'score': 0.5, 'bbox': [10.0, 20.0, 30.0, 40.0]}]
    """
    if len(detections) != len(image_ids):
        raise ValueError(
            f"coco_results: got {len(detections)} detection dicts but "
            f"{len(image_ids)} image ids; need one id per image"
        )
    results: list[dict] = []
    for i, (det, image_id) in enumerate(zip(detections, image_ids)):
        if not isinstance(det, Mapping):
            raise TypeError(
                f"coco_results: detections[{i}] must be a dict with 'boxes', "
                f"'labels', 'scores', got {type(det).__name__}"
            )
        missing = [k for k in ("boxes", "labels", "scores") if k not in det]
        if missing:
            raise ValueError(
                f"coco_results: detections[{i}] (image id {image_id}) lacks "
                f"{', '.join(repr(m) for m in missing)}; has {sorted(det)}"
            )
        boxes = _as_cpu(det["boxes"], "boxes", i).to(torch.float64)
        labels = _as_cpu(det["labels"], "labels", i)
        scores = _as_cpu(det["scores"], "scores", i).to(torch.float64)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"coco_results: detections[{i}]['boxes'] must be [N, 4] "
                f"(x1, y1, x2, y2), got {tuple(boxes.shape)}"
            )
        N = boxes.shape[0]
        for name, t in (("labels", labels), ("scores", scores)):
            if t.shape != (N,):
                raise ValueError(
                    f"coco_results: detections[{i}]['{name}'] must be [N] with "
                    f"N = {N} (the number of boxes), got {tuple(t.shape)}"
                )
        if labels.is_floating_point():
            raise TypeError(
                f"coco_results: detections[{i}]['labels'] must be an integer "
                f"tensor, got {labels.dtype}"
            )
        if label_to_cat_id is None:
            cat_ids = [int(v) for v in labels]
        else:
            unknown = sorted({int(v) for v in labels} - set(label_to_cat_id))
            if unknown:
                raise ValueError(
                    f"coco_results: detections[{i}] (image id {image_id}) has "
                    f"label(s) {unknown} that map to no category; known labels "
                    f"{sorted(label_to_cat_id)}"
                )
            cat_ids = [int(label_to_cat_id[int(v)]) for v in labels]
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]  # (x1, y1, x2, y2) -> (x, y, w, h)

        rles = None
        if "masks" in det:
            masks = _as_cpu(det["masks"], "masks", i)
            if masks.dim() == 4 and masks.shape[1] == 1:
                masks = masks[:, 0]  # (N, 1, H, W) -> (N, H, W)
            if masks.dim() != 3 or masks.shape[0] != N:
                raise ValueError(
                    f"coco_results: detections[{i}]['masks'] must be [N, 1, H, W] "
                    f"with N = {N}, got {tuple(det['masks'].shape)}"
                )
            binary = (masks >= mask_threshold).to(torch.uint8)  # (N, H, W)
            # pycocotools wants (H, W, N) in Fortran (column-major) order
            fortran = np.asfortranarray(binary.permute(1, 2, 0).numpy())  # (N, H, W) -> (H, W, N)
            rles = mask_utils.encode(fortran) if N else []
        kps = None
        if "keypoints" in det:
            kps = _as_cpu(det["keypoints"], "keypoints", i).to(torch.float64)
            if kps.dim() != 3 or kps.shape[0] != N or kps.shape[2] != 3:
                raise ValueError(
                    f"coco_results: detections[{i}]['keypoints'] must be "
                    f"[N, K, 3] (x, y, v) with N = {N}, got {tuple(kps.shape)}"
                )
            kps = kps.reshape(N, 3 * kps.shape[1])  # (N, K, 3) -> (N, 3K): x1, y1, v1, x2, ...

        for j in range(N):
            res = {
                "image_id": int(image_id),
                "category_id": cat_ids[j],
                "score": float(scores[j]),
                "bbox": [float(v) for v in xywh[j]],
            }
            if rles is not None:
                res["segmentation"] = {
                    "size": [int(s) for s in rles[j]["size"]],
                    "counts": rles[j]["counts"].decode("ascii"),
                }
            if kps is not None:
                res["keypoints"] = [float(v) for v in kps[j]]
            results.append(res)
    return results


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    """Copies of the results holding only ``iou_type`` 's field (``loadRes`` edits its input).

    Keeping ``bbox`` next to ``segmentation`` would make ``COCO.loadRes`` take the box's
    w * h as the detection's area, so masks would be sorted into small / medium / large by their
    box; with ``segmentation`` alone it takes the mask's area, as COCO's own mask results do.
    """
    key = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    return [
        {
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "score": r["score"],
            key: copy.deepcopy(r[key]),
        }
        for r in results
    ]


def _ground_truth(base) -> COCO:
    """A fresh ``COCO`` of the data set's annotation file (COCOeval edits the gt it is given:
    ``_prepare`` turns polygons into RLE and sets ``ignore``)."""
    buf = io.StringIO()
    ann_file = getattr(base, "ann_file", None)
    with contextlib.redirect_stdout(buf):
        if ann_file is not None and Path(ann_file).is_file():
            gt = COCO(str(ann_file))
        else:
            gt = COCO()
            gt.dataset = copy.deepcopy(base.coco.dataset)
            gt.createIndex()
    for ann in gt.dataset["annotations"]:  # fields COCOeval reads without checking
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        if "keypoints" in ann and "num_keypoints" not in ann:
            ann["num_keypoints"] = int(sum(1 for v in ann["keypoints"][2::3] if v > 0))
    return gt


def _empty_results(gt: COCO) -> COCO:
    """A results ``COCO`` with no detections (``loadRes`` fails on an empty list)."""
    dt = COCO()
    dt.dataset = {
        "images": list(gt.dataset["images"]),
        "annotations": [],
        "categories": copy.deepcopy(gt.dataset["categories"]),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def _keypoint_sigmas(gt: COCO, num_keypoints: int, given: Sequence[float] | None) -> np.ndarray:
    """OKS sigmas: ``given``, else a category's ``"sigmas"`` list, else COCO's 17 defaults."""
    K = num_keypoints
    if given is not None:
        sigmas, source = np.asarray(given, dtype=np.float64), "kpt_oks_sigmas"
    else:
        cats = [c for c in gt.dataset["categories"] if c.get("sigmas") is not None]
        if cats:
            sigmas = np.asarray(cats[0]["sigmas"], dtype=np.float64)
            source = f"the 'sigmas' of category {cats[0].get('name')!r}"
        elif K == len(COCO_KEYPOINT_SIGMAS):
            return np.asarray(COCO_KEYPOINT_SIGMAS, dtype=np.float64)
        else:
            raise ValueError(
                f"evaluate: keypoint AP (OKS) needs one sigma per keypoint; the annotation file "
                f"has K = {K} keypoints and no category with a 'sigmas' list, and COCO's defaults "
                f"are for its 17 person keypoints. Pass kpt_oks_sigmas=[{K} floats] or add "
                f'"sigmas": [...] to the category in the annotation file'
            )
    if sigmas.shape != (K,) or not np.all(np.isfinite(sigmas)) or np.any(sigmas <= 0):
        raise ValueError(
            f"evaluate: {source} must be {K} positive numbers (one per keypoint), "
            f"got {sigmas.tolist()}"
        )
    return sigmas


def _run_cocoeval(
    gt: COCO, results: list[dict], iou_type: str, image_ids: list[int], sigmas: np.ndarray | None
) -> tuple[list[float], dict[str, float], str]:
    """COCOeval on one IoU type; returns (stats, per-category AP, COCOeval's printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = gt.loadRes(_results_for(results, iou_type)) if results else _empty_results(gt)
        E = COCOeval(gt, dt, iouType=iou_type)
        E.params.imgIds = sorted(image_ids)
        if sigmas is not None:
            E.params.kpt_oks_sigmas = sigmas
        E.evaluate()
        E.accumulate()
        E.summarize()
    stats = [float(s) for s in E.stats]
    # precision: [T iou thresholds, R recall points, K categories, A area ranges, M max dets]
    precision = E.eval["precision"]
    names = [gt.cats[c]["name"] for c in E.params.catIds]
    per_category = {}
    for k, cat_id in enumerate(E.params.catIds):
        p = precision[:, :, k, 0, -1]  # area "all", the largest max-detections setting
        p = p[p > -1]  # -1: no ground truth of this category
        name = names[k] if names.count(names[k]) == 1 else f"{names[k]} (id {cat_id})"
        per_category[name] = float(p.mean()) if p.size else math.nan
    return stats, per_category, buf.getvalue()


def _named_metrics(stats: list[float], iou_type: str) -> dict[str, float]:
    names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else BOX_STAT_NAMES
    metrics = {n: (math.nan if s == -1 else s) for n, s in zip(names, stats)}
    metrics.setdefault("APs", math.nan)  # keypoints: COCO has no small range
    return metrics


def _collate(batch):
    return tuple(zip(*batch))


def _to_device(target: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in target.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Inside: torch's CPU generator and ``device``'s CUDA generator seeded with ``seed``;
    after: both as they were."""
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def evaluate(
    model: nn.Module,
    dataset,
    *,
    iou_types: Sequence[str] | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    results_file: str | Path | None = None,
    max_images: int | None = None,
    progress: bool = True,
    with_losses: bool = True,
    kpt_oks_sigmas: Sequence[float] | None = None,
    mask_threshold: float = 0.5,
    distributed: bool | None = None,
    amp: str | None = None,
) -> EvalResult:
    """COCO AP of ``model`` on ``dataset``, scored by pycocotools' COCOeval.

    The model runs in eval mode under ``torch.no_grad`` over the set (in order), as
    ``detections, losses = model(images, targets)`` (``targets=None`` when ``with_losses`` is
    False). Its detections become COCO results (:func:`coco_results`) and are scored against the
    data set's own annotation file, restricted to the images evaluated; crowd regions
    (``iscrowd=1``) are COCOeval's business (a detection on one is ignored, not a false positive).

    Args:
        model: ``model(images: list of [3, H, W] float 0..1, targets: list of dicts | None) ->
            (detections, losses)``; per image ``boxes`` [N, 4] (x1, y1, x2, y2) in the image's
            pixels, ``labels`` [N] int64 (contiguous 1..C), ``scores`` [N], and optionally
            ``masks`` [N, 1, H, W] float probabilities and ``keypoints`` [N, K, 3].
        dataset: a :class:`mrcnn_edu.data.CocoDetection` (or a ``Subset`` of one) whose images
            are in their original size (no resizing transform: boxes must come back in the
            annotation file's pixels).
        iou_types: any of ``"bbox"``, ``"segm"``, ``"keypoints"``; ``None``: ``bbox``, plus
            ``segm`` if the model returns ``masks``, plus ``keypoints`` if it returns
            ``keypoints`` and the set has keypoints.
        batch_size, num_workers: of the ``DataLoader`` feeding the model.
        device: where the model runs (the model is moved there); default: where its
            parameters are.
        results_file: write the COCO results JSON there (atomically). One dict per detection
            with ``bbox`` and, when present, ``segmentation`` and ``keypoints``; note that
            ``COCO.loadRes`` on such a file takes the box area as the area of a mask result, so
            for mask AP give COCOeval the results without ``bbox`` (as this function does).
        max_images: evaluate only the first ``max_images`` images.
        progress: show a tqdm bar.
        with_losses: pass the targets, so the model also returns its losses (one forward pass);
            their mean over the images is ``val_losses``. The losses' random sampling (anchors,
            RoIs) draws from torch's generators seeded with the batch's index and restored
            afterwards, so ``val_losses`` are reproducible, the same however the batches are
            shared among ranks, and the caller's random state is left as it was.
        kpt_oks_sigmas: K OKS sigmas; default: the annotation file's category ``"sigmas"``,
            else COCO's 17 (only when K = 17).
        mask_threshold: mask probability at or above which a pixel belongs to the object.
        distributed: shard the images over the ranks of the process group (``None``: when
            one with more than one process is initialised; every rank must call
            ``evaluate``). The batches are those of a single process (``batch_size``
            consecutive images), dealt out round robin (batch ``b`` to rank ``b % W``), so
            every image is batched (padded) with the same companions; rank 0 gathers the
            detections and losses, replays them in batch order and runs COCOeval once; every
            rank returns that result, equal to a single-process evaluation exactly. A
            ``DistributedDataParallel`` model is unwrapped (its forward would synchronise),
            and rank 0's buffers (batch-norm statistics) are copied to the other ranks.
            ``images_per_second`` is then all images over the slowest rank's model time.

        amp: ``None`` (float32), ``"bf16"`` or ``"fp16"``: run the model under
            ``torch.autocast`` (layers in low precision, geometry and outputs in float32; on
            GPUs. On a CPU without bf16/fp16 units it is slower than float32).

    Returns:
        :class:`EvalResult`. No detections at all gives AP 0 (and a warning).
    """
    keep_freed_memory()  # glibc keeps freed activations' pages (mrcnn_edu.utils)
    if distributed is None:
        distributed = dist_utils.is_distributed()
    elif distributed and not dist_utils.is_distributed():
        raise ValueError(
            "evaluate: distributed=True needs an initialised process group with "
            "more than one process (torchrun + init_distributed())"
        )
    if distributed:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        dist_utils.broadcast_buffers(model)  # one model: rank 0's batch-norm statistics
    base, all_ids = unwrap_coco_dataset(dataset)
    if iou_types is not None:
        if isinstance(iou_types, str):
            iou_types = [iou_types]
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ValueError(
                f"evaluate: iou_types must be a non-empty list of {IOU_TYPES}, "
                f"got {list(iou_types)}"
            )
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"evaluate: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    num_keypoints = len(base.keypoint_names) if getattr(base, "keypoint_names", None) else 0
    if iou_types is not None and "keypoints" in iou_types and not num_keypoints:
        raise ValueError(
            f"evaluate: iou_types has 'keypoints' but {base!r} has no keypoint "
            "category (a person_keypoints_*.json file)"
        )
    gt = _ground_truth(base)
    sigmas = None
    if iou_types is not None and "keypoints" in iou_types:  # fail before the long model run
        sigmas = _keypoint_sigmas(gt, num_keypoints, kpt_oks_sigmas)

    n = len(all_ids)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"evaluate: max_images must be >= 1, got {max_images}")
        n = min(n, int(max_images))
    if n == 0:
        raise ValueError(f"evaluate: the data set is empty ({base!r})")
    subset = dataset if n == len(all_ids) else torch.utils.data.Subset(dataset, range(n))
    # batch b holds images b*batch_size ... (b+1)*batch_size - 1; rank r runs b = r, r + W, ...
    batch_ids = list(range(-(-n // batch_size)))  # ceil(n / batch_size)
    if distributed:
        batch_ids = batch_ids[dist_utils.rank() :: dist_utils.world_size()]
    batches = [list(range(b * batch_size, min((b + 1) * batch_size, n))) for b in batch_ids]
    loader = torch.utils.data.DataLoader(
        subset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate
    )
    progress = progress and dist_utils.is_main_process()
    if device is not None:
        device = torch.device(device)
        model.to(device)
    else:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    label_to_cat_id = _label_map(base)

    records: list[tuple] = []  # per batch: (batch id, image ids, results, {loss: value}, size)
    seen = {"masks": False, "keypoints": False}
    model_seconds = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b, (images, targets) in zip(
                batch_ids, tqdm(loader, desc="evaluate", disable=not progress)
            ):
                ids = []
                for j, (image, target) in enumerate(zip(images, targets)):
                    index = b * batch_size + j
                    if "image_id" not in target:
                        raise ValueError(f"evaluate: dataset[{index}] target has no 'image_id'")
                    image_id = int(target["image_id"])
                    info = gt.imgs.get(image_id)
                    if info is None:
                        raise ValueError(
                            f"evaluate: dataset[{index}] has image id {image_id}, "
                            f"which is not in {getattr(base, 'ann_file', 'the set')}"
                        )
                    if tuple(image.shape[-2:]) != (info["height"], info["width"]):
                        raise ValueError(
                            f"evaluate: dataset[{index}] (image id {image_id}) image is "
                            f"{tuple(image.shape)} but the annotation file says height "
                            f"{info['height']}, width {info['width']}; evaluate on images in "
                            f"their original size (no resizing transform)"
                        )
                    ids.append(image_id)
                batch = [im.to(device) for im in images]
                tgts = [_to_device(t, device) for t in targets] if with_losses else None
                _sync(device)
                start = time.perf_counter()
                with (
                    _seeded(b, device) if with_losses else contextlib.nullcontext(),
                    torch.autocast(device.type, dtype=autocast_dtype, enabled=amp is not None),
                ):
                    out = model(batch, tgts)
                _sync(device)
                model_seconds += time.perf_counter() - start
                if not (isinstance(out, (tuple, list)) and len(out) == 2):
                    raise TypeError(
                        "evaluate: model(images, targets) must return "
                        f"(detections, losses), got {type(out).__name__}"
                    )
                detections, losses = out
                if len(detections) != len(batch):
                    raise ValueError(
                        f"evaluate: the model returned {len(detections)} detection "
                        f"dicts for a batch of {len(batch)} images"
                    )
                for det in detections:
                    for key, was_seen in seen.items():
                        seen[key] = was_seen or key in det
                batch_results = coco_results(
                    detections, ids, label_to_cat_id=label_to_cat_id, mask_threshold=mask_threshold
                )
                batch_losses = {}
                for name, value in (losses or {}).items():
                    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                        raise ValueError(
                            f"evaluate: loss '{name}' must be a scalar tensor, got "
                            f"{getattr(value, 'shape', type(value).__name__)}"
                        )
                    batch_losses[name] = float(value)
                records.append((b, ids, batch_results, batch_losses, len(batch)))
    finally:
        model.train(was_training)

    if not distributed:
        return _score(
            records,
            seen,
            model_seconds,
            gt=gt,
            base=base,
            iou_types=iou_types,
            num_keypoints=num_keypoints,
            sigmas=sigmas,
            kpt_oks_sigmas=kpt_oks_sigmas,
            results_file=results_file,
        )
    try:
        gathered = dist_utils.gather_object((records, seen, model_seconds))
        outcome = None
        if dist_utils.is_main_process():
            records = sorted((r for part in gathered for r in part[0]), key=lambda r: r[0])
            seen = {k: any(part[1][k] for part in gathered) for k in seen}
            try:
                outcome = (
                    "ok",
                    _score(
                        records,
                        seen,
                        max(part[2] for part in gathered),
                        gt=gt,
                        base=base,
                        iou_types=iou_types,
                        num_keypoints=num_keypoints,
                        sigmas=sigmas,
                        kpt_oks_sigmas=kpt_oks_sigmas,
                        results_file=results_file,
                    ),
                )
            except (ValueError, OSError) as err:  # every rank raises it, not rank 0 alone
                outcome = ("error", err)
        kind, value = dist_utils.broadcast_object(outcome)
    except RuntimeError as err:
        if dist_utils.is_comm_error(err):  # another rank failed on its shard, or died
            raise dist_utils.peer_lost_error("evaluate", err) from err
        raise
    if kind == "error":
        raise value
    return value


def _score(
    records: list[tuple],
    seen: dict[str, bool],
    model_seconds: float,
    *,
    gt: COCO,
    base,
    iou_types,
    num_keypoints: int,
    sigmas,
    kpt_oks_sigmas,
    results_file,
) -> EvalResult:
    """The second half of :func:`evaluate`: the per-batch ``records`` (in batch order) ->
    COCO results, mean losses, COCOeval per IoU type, an :class:`EvalResult`."""
    results: list[dict] = []
    image_ids: list[int] = []
    loss_sums: dict[str, float] = {}
    for _, ids, batch_results, batch_losses, size in records:
        results.extend(batch_results)
        image_ids.extend(ids)
        for name, value in batch_losses.items():
            loss_sums[name] = loss_sums.get(name, 0.0) + value * size

    if iou_types is None:
        iou_types = ["bbox"]
        if seen["masks"]:
            iou_types.append("segm")
        if seen["keypoints"] and num_keypoints:
            iou_types.append("keypoints")
            sigmas = _keypoint_sigmas(gt, num_keypoints, kpt_oks_sigmas)
    else:
        for t, key in (("segm", "masks"), ("keypoints", "keypoints")):
            if t in iou_types and not seen[key]:
                raise ValueError(
                    f"evaluate: iou_types has '{t}' but the model returned no "
                    f"'{key}' in its detections"
                )
    iou_types = tuple(t for t in IOU_TYPES if t in iou_types)

    written = None
    if results_file is not None:
        written = Path(results_file)
        text = json.dumps(results).encode("utf-8")
        atomic_write(written, lambda f: f.write(text))
    if not results:
        warnings.warn(
            f"evaluate: the model returned no detections on the {len(image_ids)} "
            "images; AP and AR are 0 (nan where the set has no ground truth)",
            stacklevel=3,
        )

    metrics, per_category, stats, texts = {}, {}, {}, []
    for t in iou_types:
        s, per_cat, text = _run_cocoeval(
            gt, results, t, image_ids, sigmas if t == "keypoints" else None
        )
        stats[t] = s
        metrics[t] = _named_metrics(s, t)
        per_category[t] = per_cat
        texts.append(f"IoU type: {t}\n{text}")
    num = len(image_ids)
    return EvalResult(
        metrics=metrics,
        per_category=per_category,
        stats=stats,
        val_losses={k: v / num for k, v in loss_sums.items()},
        images_per_second=num / model_seconds if model_seconds > 0 else math.inf,
        num_images=num,
        num_detections=len(results),
        iou_types=iou_types,
        summary_text="\n".join(texts),
        results_file=written,
    )


def format_metrics_table(result: EvalResult) -> str:
    """A markdown table of AP, AP50, AP75, APs, APm, APl per IoU type, in percent (as the
    paper's tables); ``-`` where a value is undefined (no ground truth in that area range).

    >>> r = EvalResult(metrics={"bbox": dict(AP=0.5, AP50=0.75, AP75=0.5, APs=float("nan"),
    ...                APm=0.25, APl=1.0)}, per_category={}, stats={}, val_losses={},
    ...                images_per_second=1.0, num_images=1, num_detections=1, iou_types=("bbox",))
    >>> print(format_metrics_table(r))
    | IoU type | AP | AP50 | AP75 | APs | APm | APl |
    |---|---:|---:|---:|---:|---:|---:|
    | bbox | 50.0 | 75.0 | 50.0 | - | 25.0 | 100.0 |
    """
    lines = [
        "| IoU type | " + " | ".join(TABLE_METRICS) + " |",
        "|---|" + "---:|" * len(TABLE_METRICS),
    ]
    for t in result.iou_types or tuple(result.metrics):
        m = result.metrics[t]
        cells = []
        for name in TABLE_METRICS:
            v = m.get(name, math.nan)
            cells.append("-" if v is None or math.isnan(v) else f"{100 * v:.1f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

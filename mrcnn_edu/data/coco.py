"""COCO-format data sets (COCO 2017 itself, or the synthetic shapes set) as a torch Dataset.

The annotation format is the one of Lin et al., "Microsoft COCO" (2014), which Mask R-CNN
(He et al. 2017, Sec. 4) trains and evaluates on. Notebook ``01_data_coco_format.ipynb`` explains
the JSON structure, polygons vs RLE, ``area`` and ``iscrowd``, and this class.

One sample is ``(image, target)``:

- ``image``: float32 [3, H, W] in 0..1 (RGB).
- ``target`` (N = non-crowd instances kept for training, M = crowd regions, K = keypoints):

  ========================  ===========================  ==========================================
  key                       shape, dtype                 meaning
  ========================  ===========================  ==========================================
  ``boxes``                 [N, 4] float32               (x1, y1, x2, y2) pixels, clipped to image
  ``labels``                [N] int64                    contiguous 1..C (0 is background)
  ``masks``                 [N, H, W] uint8              0/1 (only when ``load_masks``)
  ``keypoints``             [N, K, 3] float32            (x, y, v), v in {0, 1, 2} (keypoint files)
  ``image_id``              [] int64                     COCO image id
  ``area``                  [N] float32                  the annotation's ``area`` (mask pixels)
  ``iscrowd``               [N] int64                    all 0: crowds are kept out (see below)
  ``ann_ids``               [N] int64                    COCO annotation ids of the N instances
  ``crowd_boxes``           [M, 4] float32               boxes of ``iscrowd=1`` regions
  ``crowd_masks``           [M, H, W] uint8              their masks (only when ``load_masks``)
  ========================  ===========================  ==========================================

Crowd regions (``iscrowd=1``) are not training targets (Mask R-CNN, like Detectron, ignores them
for the losses); they are returned separately because evaluation and RPN matching may want to
ignore detections that fall on them. Annotations whose box has zero area after clipping are
dropped; their number is reported in ONE warning when the dataset is built. (Real COCO has such
boxes: annotation 918 of ``instances_train2017.json`` is a collinear polygon with a box of height
0, cocodataset/cocoapi issue #355.)

Bad input is reported when the dataset is built (file, JSON syntax, fields, category ids,
polygons, repeated ids, keypoint counts) or when the sample is loaded (missing or mismatched image
file, an annotation without ``segmentation`` while masks are loaded), with a message naming the
file, annotation id, image id or field, never as a crash deep inside a DataLoader worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

README_HINT = "see data/README.md for how to download COCO 2017 or generate the shapes set"


class CocoFormatError(ValueError):
    """An annotation file that is not valid COCO (the message names the file and the entry)."""


# ---------------------------------------------------------------------------------------------
# Loading and checking an annotation file
# ---------------------------------------------------------------------------------------------

_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def load_coco_json(ann_file: str | Path) -> dict:
    """Read and check a COCO annotation file; returns the parsed dict.

    Raises:
        FileNotFoundError: the file does not exist.
        CocoFormatError: malformed JSON (with line and column), a missing top-level or per-entry
            field, an entry that is not an object, a repeated id, an annotation whose
            ``image_id`` or ``category_id`` is unknown, a polygon with fewer than 3 points, a
            malformed RLE, or a ``keypoints`` list whose length is not 3 x its category's K.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file} ({README_HINT})")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{ann_file}: malformed JSON at line {err.lineno}, column "
                              f"{err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{ann_file}: top level must be a JSON object, "
                              f"got {type(data).__name__}")
    for key, fields in _REQUIRED.items():
        if key not in data:
            raise CocoFormatError(f"{ann_file}: missing required field '{key}'")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{ann_file}: field '{key}' must be a list")
        seen: set = set()
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise CocoFormatError(f"{ann_file}: {key}[{i}] must be a JSON object, got "
                                      f"{type(entry).__name__}")
            missing = [f for f in fields if f not in entry]
            if missing:
                who = f"id {entry['id']}" if "id" in entry else f"index {i}"
                raise CocoFormatError(f"{ann_file}: {key}[{i}] ({who}) is missing required "
                                      f"field(s) {', '.join(repr(m) for m in missing)}")
            # pycocotools indexes by id: a repeated id would silently replace the earlier entry
            if entry["id"] in seen:
                raise CocoFormatError(f"{ann_file}: {key}[{i}] repeats id {entry['id']!r}; ids "
                                      f"must be unique within '{key}'")
            seen.add(entry["id"])
    cat_ids = {c["id"] for c in data["categories"]}
    image_ids = {im["id"] for im in data["images"]}
    num_keypoints = {c["id"]: len(c["keypoints"]) for c in data["categories"]
                     if isinstance(c.get("keypoints"), list)}
    for ann in data["annotations"]:
        aid = ann["id"]
        if ann["category_id"] not in cat_ids:
            raise CocoFormatError(f"{ann_file}: annotation id {aid} has category_id "
                                  f"{ann['category_id']}, which is not in 'categories' "
                                  f"(known ids: {sorted(cat_ids)})")
        if ann["image_id"] not in image_ids:
            raise CocoFormatError(f"{ann_file}: annotation id {aid} has image_id "
                                  f"{ann['image_id']}, which is not in 'images'")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise CocoFormatError(f"{ann_file}: annotation id {aid}: 'bbox' must be "
                                  f"[x, y, width, height], got {box!r}")
        _check_segmentation(ann_file, ann)
        kps, K = ann.get("keypoints"), num_keypoints.get(ann["category_id"])
        if kps and K is not None and (not isinstance(kps, list) or len(kps) != 3 * K):
            n = len(kps) if isinstance(kps, list) else type(kps).__name__
            raise CocoFormatError(f"{ann_file}: annotation id {aid} has {n} keypoint numbers; "
                                  f"its category has {K} keypoints, so 3 x {K} = {3 * K} "
                                  "(x, y, v per keypoint) are expected")
    return data


def _check_segmentation(ann_file: Path, ann: dict) -> None:
    """Polygons need >= 3 points (6 numbers, an even count); RLE needs 'size' and 'counts'."""
    seg = ann.get("segmentation")
    aid = ann["id"]
    if seg is None:
        return
    if isinstance(seg, list):
        if len(seg) == 0:
            raise CocoFormatError(f"{ann_file}: annotation id {aid}: empty polygon list in "
                                  "'segmentation'")
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, list) else "?"
                raise CocoFormatError(
                    f"{ann_file}: annotation id {aid}: polygon {k} has {n} coordinates; a "
                    "polygon needs at least 3 points (6 numbers x1, y1, x2, y2, x3, y3) and an "
                    "even count")
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise CocoFormatError(f"{ann_file}: annotation id {aid}: RLE segmentation needs "
                                  f"'size' and 'counts', got keys {sorted(seg)}")
    else:
        raise CocoFormatError(f"{ann_file}: annotation id {aid}: 'segmentation' must be a list "
                              f"of polygons or an RLE dict, got {type(seg).__name__}")


def _clip_box(bbox, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2) clipped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return x1, y1, x2, y2


def _valid_box(ann: dict, img: dict) -> bool:
    x1, y1, x2, y2 = _clip_box(ann["bbox"], img["width"], img["height"])
    return x2 > x1 and y2 > y1


def ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Decode one annotation's ``segmentation`` (polygons, uncompressed or compressed RLE).

    Returns uint8 [H, W] with 0/1. Polygons are rasterized by pycocotools and their parts
    merged; an uncompressed RLE (``counts`` a list, as COCO stores crowds) is compressed first.
    """
    seg = ann["segmentation"]
    if isinstance(seg, list):                                   # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):                       # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:                                                       # compressed RLE
        rle = seg
    if list(rle["size"]) != [height, width]:
        raise CocoFormatError(f"annotation id {ann['id']}: RLE size {list(rle['size'])} does "
                              f"not match the image's [height, width] = [{height}, {width}]")
    return mask_utils.decode(rle)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class CocoDetection(torch.utils.data.Dataset):
    """Any COCO-format detection / instance segmentation / keypoint set, via pycocotools.

    Args:
        image_dir: folder holding the images named by ``file_name``.
        ann_file: COCO JSON (``instances_*.json`` or ``person_keypoints_*.json``).
        transforms: optional ``transforms(image, target) -> (image, target)``, applied last.
        skip_empty: drop images with no usable instance (no non-crowd annotation with a box of
            positive area), as training usually does; evaluation keeps them.
        load_masks: decode masks (``target["masks"]``, ``target["crowd_masks"]``); False is
            faster for box-only work.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` object (for COCOeval and ``loadAnns``).
        ids: image ids in dataset order (sorted).
        cat_ids: sorted COCO category ids.
        cat_id_to_label / label_to_cat_id: COCO id <-> contiguous label 1..C.
        class_names: ``["__background__", name of label 1, ...]``.
        keypoint_names, skeleton: from the first category that has them (else None).
        num_dropped_boxes: annotations dropped for a zero-area box.

    >>> ds = CocoDetection("data/shapes/val", "data/shapes/annotations/instances_val.json")  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, *,
                 transforms: Callable | None = None, skip_empty: bool = False,
                 load_masks: bool = True) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.load_masks = load_masks
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} ({README_HINT})")
        data = load_coco_json(self.ann_file)

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco.createIndex()

        self.cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = {lab: cid for cid, lab in self.cat_id_to_label.items()}
        self.class_names = ["__background__"] + [self.coco.cats[c]["name"] for c in self.cat_ids]
        kp_cats = [c for c in self.cat_ids if self.coco.cats[c].get("keypoints")]
        self.keypoint_names = list(self.coco.cats[kp_cats[0]]["keypoints"]) if kp_cats else None
        self.skeleton = ([tuple(p) for p in self.coco.cats[kp_cats[0]].get("skeleton", [])]
                         if kp_cats else None)

        # count zero-area boxes once, here, instead of warning in every __getitem__
        self.num_dropped_boxes = sum(
            1 for a in data["annotations"] if not _valid_box(a, self.coco.imgs[a["image_id"]]))
        if self.num_dropped_boxes:
            warnings.warn(f"{self.ann_file}: {self.num_dropped_boxes} annotation(s) have a box of "
                          "zero area (after clipping to the image) and are dropped",
                          stacklevel=2)

        ids = sorted(self.coco.imgs)
        if skip_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) and _valid_box(a, self.coco.imgs[i])
                                         for a in self.coco.imgToAnns[i])]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """The image of ``image_id`` as float32 [3, H, W] in 0..1; checks the file exists and its
        size matches the JSON's width/height."""
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} (image id {image_id}) not found; "
                                    f"annotations: {self.ann_file}")
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))                      # (H, W, 3) uint8
        if arr.shape[:2] != (info["height"], info["width"]):
            raise CocoFormatError(
                f"image file {path} (image id {image_id}) is {arr.shape[1]}x{arr.shape[0]} "
                f"(width x height) but {self.ann_file} says {info['width']}x{info['height']}")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)

    def load_target(self, image_id: int) -> dict[str, torch.Tensor]:
        """The target dict of ``image_id`` (see the module docstring for the keys)."""
        info = self.coco.imgs[image_id]
        H, W = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns[image_id] if _valid_box(a, info)]
        train = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]

        def boxes_of(group):
            return torch.tensor([_clip_box(a["bbox"], W, H) for a in group],
                                dtype=torch.float32).reshape(-1, 4)

        def masks_of(group):
            if not group:
                return torch.zeros((0, H, W), dtype=torch.uint8)
            for a in group:
                if "segmentation" not in a:
                    raise CocoFormatError(f"{self.ann_file}: annotation id {a['id']} has no "
                                          "'segmentation' (use load_masks=False for boxes only)")
            return torch.from_numpy(np.stack([ann_to_mask(a, H, W) for a in group]))

        target = {
            "boxes": boxes_of(train),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in train],
                                   dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in train], dtype=torch.float32),
            "iscrowd": torch.zeros(len(train), dtype=torch.int64),
            "ann_ids": torch.tensor([a["id"] for a in train], dtype=torch.int64),
            "crowd_boxes": boxes_of(crowd),
        }
        if self.load_masks:
            target["masks"] = masks_of(train)
            target["crowd_masks"] = masks_of(crowd)
        if self.keypoint_names is not None:
            K = len(self.keypoint_names)
            kps = torch.zeros((len(train), K, 3), dtype=torch.float32)
            for i, a in enumerate(train):
                if a.get("keypoints"):
                    kp = torch.tensor(a["keypoints"], dtype=torch.float32)
                    if kp.numel() != 3 * K:
                        raise CocoFormatError(f"{self.ann_file}: annotation id {a['id']} has "
                                              f"{kp.numel()} keypoint numbers, expected 3 x {K}")
                    kps[i] = kp.reshape(K, 3)                        # (3K,) -> (K, 3)
            target["keypoints"] = kps
        return target

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[idx]
        image = self.load_image(image_id)
        target = self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {len(self.cat_ids)} classes, "
                f"image_dir={str(self.image_dir)!r}, ann_file={str(self.ann_file)!r})")


# ---------------------------------------------------------------------------------------------
# Named layouts
# ---------------------------------------------------------------------------------------------


def coco2017(root: str | Path, split: str = "val2017", *, keypoints: bool = False,
             **kwargs) -> CocoDetection:
    """COCO 2017 in its official layout: ``root/{split}/`` and
    ``root/annotations/instances_{split}.json`` (``person_keypoints_{split}.json`` with
    ``keypoints=True``). Extra keyword arguments go to ``CocoDetection``.

    Raises FileNotFoundError listing everything missing and pointing to data/README.md.
    """
    root = Path(root)
    stem = "person_keypoints" if keypoints else "instances"
    image_dir = root / split
    ann_file = root / "annotations" / f"{stem}_{split}.json"
    missing = [str(p) for p in (image_dir, ann_file) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"COCO 2017 '{split}' not found under {root}; missing: {', '.join(missing)}. "
            f"Expected root/{split}/*.jpg and root/annotations/{stem}_{split}.json "
            f"({README_HINT})")
    return CocoDetection(image_dir, ann_file, **kwargs)


def shapes_dataset(root: str | Path, split: str = "train", **kwargs) -> CocoDetection:
    """The synthetic set written by ``write_shapes_dataset(root, ...)`` (or
    ``mrcnn-edu make-shapes --out root``): detection or keypoint files, whichever exist."""
    root = Path(root)
    for stem in ("instances", "person_keypoints"):
        ann_file = root / "annotations" / f"{stem}_{split}.json"
        if ann_file.is_file():
            return CocoDetection(root / split, ann_file, **kwargs)
    raise FileNotFoundError(
        f"no shapes set under {root}: neither annotations/instances_{split}.json nor "
        f"annotations/person_keypoints_{split}.json exists. Write one with "
        f"`mrcnn-edu make-shapes --out {root}` or mrcnn_edu.data.write_shapes_dataset "
        f"({README_HINT})")

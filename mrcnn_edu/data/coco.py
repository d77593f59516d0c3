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
ignore detections that fall on them. Annotations whose box has zero area after clipping (or a
NaN / infinite coordinate) are dropped; their number is reported in ONE warning when the dataset
is built. (Real COCO has such
boxes: annotation 918 of ``instances_train2017.json`` is a collinear polygon with a box of height
0, cocodataset/cocoapi issue #355.)

Bad input is reported when the dataset is built (file, JSON syntax, fields and their types,
category ids, polygons with too few points or coordinates that are not finite or lie far outside
the image, repeated ids, keypoint counts, image sizes, file names that leave the image folder) or
when the sample is loaded (missing, mismatched, corrupt or unsupported image file, an RLE whose
size or run lengths do not fit the image, an annotation without ``segmentation`` while masks are
loaded, any other error while an annotation is read), with a message naming the file,
annotation id, image id or field, never as a crash deep inside a DataLoader worker or as a
garbage mask. ``mrcnn_edu.engine.check_data`` reports every problem of a set at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

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
            field, an entry that is not an object, a repeated id, an image whose ``width`` /
            ``height`` is not a positive int (at most ``MAX_IMAGE_SIDE``) or whose ``file_name``
            leaves the image folder (absolute, or with a ``..`` part), an annotation whose
            ``image_id`` or ``category_id`` is unknown, a ``bbox`` that is not 4 numbers (a
            NaN / infinite one is dropped like a zero-area box), an ``area`` / ``iscrowd`` /
            ``keypoints`` value that is not a finite number of the right kind, a polygon with
            fewer than 3 points or a coordinate that is not finite or lies more than the image's
            size outside it, an RLE without ``size`` and ``counts`` (the rest of an RLE is
            checked before it is decoded, :func:`rle_problem`), or a ``keypoints`` list whose
            length is not 3 x its category's K. Every message names the file and the image or
            annotation id.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file} ({README_HINT})")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(
            f"{ann_file}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{ann_file}: top level must be a JSON object, got {type(data).__name__}"
        )
    for key, fields in _REQUIRED.items():
        if key not in data:
            raise CocoFormatError(f"{ann_file}: missing required field '{key}'")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{ann_file}: field '{key}' must be a list")
        seen: set = set()
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise CocoFormatError(
                    f"{ann_file}: {key}[{i}] must be a JSON object, got {type(entry).__name__}"
                )
            missing = [f for f in fields if f not in entry]
            if missing:
                who = f"id {entry['id']}" if "id" in entry else f"index {i}"
                raise CocoFormatError(
                    f"{ann_file}: {key}[{i}] ({who}) is missing required "
                    f"field(s) {', '.join(repr(m) for m in missing)}"
                )
            # pycocotools indexes by id: a repeated id would silently replace the earlier entry
            if entry["id"] in seen:
                raise CocoFormatError(
                    f"{ann_file}: {key}[{i}] repeats id {entry['id']!r}; ids "
                    f"must be unique within '{key}'"
                )
            seen.add(entry["id"])
    for im in data["images"]:
        _check_image_entry(ann_file, im)
    cat_ids = {c["id"] for c in data["categories"]}
    image_ids = {im["id"] for im in data["images"]}
    images = {im["id"]: im for im in data["images"]}
    num_keypoints = {
        c["id"]: len(c["keypoints"])
        for c in data["categories"]
        if isinstance(c.get("keypoints"), list)
    }
    for ann in data["annotations"]:
        aid = ann["id"]
        if ann["category_id"] not in cat_ids:
            raise CocoFormatError(
                f"{ann_file}: annotation id {aid} has category_id "
                f"{ann['category_id']}, which is not in 'categories' "
                f"(known ids: {sorted(cat_ids)})"
            )
        if ann["image_id"] not in image_ids:
            raise CocoFormatError(
                f"{ann_file}: annotation id {aid} has image_id "
                f"{ann['image_id']}, which is not in 'images'"
            )
        box = ann["bbox"]
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box)
        ):
            raise CocoFormatError(
                f"{ann_file}: annotation id {aid}: 'bbox' must be "
                f"[x, y, width, height], got {box!r}"
            )
        if "area" in ann and not _is_finite_number(ann["area"]):
            raise CocoFormatError(
                f"{ann_file}: annotation id {aid}: 'area' must be a finite "
                f"number, got {ann['area']!r}"
            )
        if ann.get("iscrowd", 0) not in (0, 1):  # True / False compare equal to 1 / 0
            raise CocoFormatError(
                f"{ann_file}: annotation id {aid}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}"
            )
        _check_segmentation(ann_file, ann, images[ann["image_id"]])
        kps, K = ann.get("keypoints"), num_keypoints.get(ann["category_id"])
        if kps and K is not None and (not isinstance(kps, list) or len(kps) != 3 * K):
            n = len(kps) if isinstance(kps, list) else type(kps).__name__
            raise CocoFormatError(
                f"{ann_file}: annotation id {aid} has {n} keypoint numbers; "
                f"its category has {K} keypoints, so 3 x {K} = {3 * K} "
                "(x, y, v per keypoint) are expected"
            )
        if kps and K is not None:
            bad = [
                i
                for i, v in enumerate(kps)
                if not _is_finite_number(v) or (i % 3 == 2 and v not in (0, 1, 2))
            ]
            if bad:
                i = bad[0]
                what = (
                    "visibility v must be 0, 1 or 2"
                    if i % 3 == 2 and _is_finite_number(kps[i])
                    else "must be a finite number"
                )
                raise CocoFormatError(
                    f"{ann_file}: annotation id {aid}: keypoints[{i}] = {kps[i]!r}: {what}"
                )
    return data


#: Largest image side accepted in an annotation file (JPEG's own limit): a typo such as a width
#: of 1e9 would otherwise allocate gigabytes for every mask of that image.
MAX_IMAGE_SIDE = 65535


def _is_finite_number(v) -> bool:
    """A JSON number that is finite (Python's json reads NaN and Infinity); bools are not."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_image_entry(ann_file: Path, im: dict) -> None:
    """``width`` / ``height`` positive ints, ``file_name`` a relative path inside the folder."""
    iid = im["id"]
    for key in ("width", "height"):
        v = im[key]
        if not (
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 < v <= MAX_IMAGE_SIDE
        ):
            raise CocoFormatError(
                f"{ann_file}: image id {iid}: '{key}' must be an int in "
                f"1..{MAX_IMAGE_SIDE}, got {v!r}"
            )
    name = im["file_name"]
    if not isinstance(name, str) or not name or "\0" in name:
        raise CocoFormatError(
            f"{ann_file}: image id {iid}: 'file_name' must be a non-empty string, got {name!r}"
        )
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    ):
        raise CocoFormatError(
            f"{ann_file}: image id {iid}: 'file_name' {name!r} would read "
            "outside the image folder; it must be a relative path without "
            "'..' (e.g. '000000000001.jpg')"
        )


def _check_segmentation(ann_file: Path, ann: dict, img: dict) -> None:
    """Polygons: >= 3 points (an even count of finite numbers) within the image +- its size
    (a NaN or a 1e12 would crash or exhaust memory in pycocotools' rasterizer). RLE: a dict
    with ``size`` and ``counts``; the rest is checked before decoding (:func:`rle_problem`)."""
    seg = ann.get("segmentation")
    aid = ann["id"]
    if seg is None:
        return
    H, W = img["height"], img["width"]
    where = f"{ann_file}: annotation id {aid} (image id {img['id']})"
    if isinstance(seg, list):
        if len(seg) == 0:
            raise CocoFormatError(f"{where}: empty polygon list in 'segmentation'")
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, list) else "?"
                raise CocoFormatError(
                    f"{where}: polygon {k} has {n} coordinates; a polygon needs at least 3 "
                    "points (6 numbers x1, y1, x2, y2, x3, y3) and an even count"
                )
            for i, v in enumerate(poly):
                if not _is_finite_number(v):
                    raise CocoFormatError(
                        f"{where}: polygon {k} coordinate {i} is {v!r}; "
                        "coordinates must be finite numbers"
                    )
                size = W if i % 2 == 0 else H  # x at even positions, y at odd ones
                if not -size <= v <= 2 * size:
                    axis = "x" if i % 2 == 0 else "y"
                    raise CocoFormatError(
                        f"{where}: polygon {k} coordinate {i} ({axis}) is {v!r}, more than the "
                        f"image's {'width' if axis == 'x' else 'height'} ({size}) outside the "
                        f"image (allowed {-size}..{2 * size})"
                    )
    elif isinstance(seg, dict):
        # its size and run lengths are checked where it is decoded (rle_problem): the data
        # check (engine.check_data) builds the set to report every such annotation at once
        if "counts" not in seg or "size" not in seg:
            raise CocoFormatError(
                f"{where}: RLE segmentation needs 'size' and 'counts', got keys {sorted(seg)}"
            )
    else:
        raise CocoFormatError(
            f"{where}: 'segmentation' must be a list of polygons or an RLE "
            f"dict, got {type(seg).__name__}"
        )


def rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``, in numpy).

    Each run length is written in 5-bit groups, least significant first, as characters
    ``chr(48 + group)`` with bit 0x20 meaning "more groups follow" and bit 0x10 of the last
    group the sign; from the fourth run on, a value is the difference to the run two before.
    Raises ``ValueError`` for a character outside ``'0'..'o'``, a truncated last value or a
    negative run length.

    >>> rle_string_counts("52203")   # values 5 2 2 0 3; the last two add to the runs 2 before
    [5, 2, 2, 2, 5]
    """
    if not counts:
        return []
    c = np.frombuffer(counts.encode("latin-1", "replace"), dtype=np.uint8).astype(np.int64) - 48
    bad = np.flatnonzero((c < 0) | (c > 63))
    if bad.size:
        raise ValueError(
            f"character {counts[bad[0]]!r} at position {bad[0]} is not an RLE character ('0'..'o')"
        )
    last = np.flatnonzero((c & 0x20) == 0)  # the last character of each value
    if last.size == 0 or last[-1] != c.size - 1:
        raise ValueError("the string ends in the middle of a value")
    first = np.concatenate([[0], last[:-1] + 1])
    length = last - first + 1  # characters per value
    if int(length.max()) > 12:  # 60 bits: far beyond any image
        raise ValueError(f"a value spans {int(length.max())} characters")
    k = np.arange(c.size) - np.repeat(first, length)  # group index within its value
    vals = np.add.reduceat((c & 0x1F) << (5 * k), first)
    negative = (c[last] & 0x10) != 0
    vals = np.where(negative, vals - (np.int64(1) << (5 * length)), vals)
    runs = vals.copy()
    for start in (1, 2):  # runs[m] = vals[m] + runs[m - 2] for m >= 3: two running sums
        if runs.size > start + 2:
            idx = np.arange(start, runs.size, 2)
            runs[idx] = np.cumsum(vals[idx])
    if (runs < 0).any():
        raise ValueError(f"run {int(np.flatnonzero(runs < 0)[0])} has a negative length")
    return runs.tolist()


def _clip_box(bbox, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2) clipped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return x1, y1, x2, y2


def _valid_box(ann: dict, img: dict) -> bool:
    """A box of positive area after clipping; NaN / infinite coordinates are not one."""
    if not all(math.isfinite(float(v)) for v in ann["bbox"]):
        return False
    x1, y1, x2, y2 = _clip_box(ann["bbox"], img["width"], img["height"])
    return x2 > x1 and y2 > y1


def rle_problem(seg: dict, height: int, width: int) -> str | None:
    """What is wrong with an RLE ``segmentation`` for an image of ``height x width``, or None.

    ``size`` must be ``[height, width]`` and the run lengths (a list of non-negative ints, or
    pycocotools' compressed string) must add up to ``height * width``: pycocotools decodes
    a shorter RLE into uninitialised memory (a different mask on every run) without a word.
    """
    size = seg.get("size")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and size == [height, width]
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)
    ):
        return f"RLE 'size' {size!r} must be the image's [height, width] = [{height}, {width}]"
    counts = seg.get("counts")
    if isinstance(counts, list):
        bad = [
            c
            for c in counts
            if not (isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0)
        ]
        if bad:
            return f"RLE 'counts' must be non-negative ints (run lengths), got {bad[0]!r}"
        runs = counts
    elif isinstance(counts, str):
        try:
            runs = rle_string_counts(counts)
        except ValueError as err:
            return f"compressed RLE 'counts' is not valid: {err}"
    else:
        return (
            f"RLE 'counts' must be a list of run lengths or a compressed string, got "
            f"{type(counts).__name__}"
        )
    total = int(sum(runs))
    if total != height * width:
        return (
            f"RLE run lengths add up to {total} pixels but the image has height x width = "
            f"{height} x {width} = {height * width}"
        )
    return None


def ann_to_mask(ann: dict, height: int, width: int, where: str | None = None) -> np.ndarray:
    """Decode one annotation's ``segmentation`` (polygons, uncompressed or compressed RLE).

    Returns uint8 [H, W] with 0/1. Polygons are rasterized by pycocotools and their parts
    merged; an uncompressed RLE (``counts`` a list, as COCO stores crowds) is compressed first.
    An RLE is checked first (:func:`rle_problem`): a ``CocoFormatError`` starting with
    ``where`` (default ``"annotation id <id>"``) instead of a mask of garbage.
    """
    seg = ann["segmentation"]
    if isinstance(seg, dict):
        problem = rle_problem(seg, height, width)
        if problem:
            where = where or f"annotation id {ann.get('id')}"
            raise CocoFormatError(f"{where}: {problem}")
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:  # compressed RLE
        rle = seg
    return mask_utils.decode(rle)


#: Pillow modes converted to RGB at 8 bits (``Image.convert("RGB")``), then divided by 255.
_EIGHT_BIT_MODES = {
    "1",
    "L",
    "P",
    "RGB",
    "RGBA",
    "RGBX",
    "RGBa",
    "LA",
    "La",
    "PA",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
}


def _image_to_tensor(im: Image.Image, what: str) -> torch.Tensor:
    """A decoded Pillow image -> float32 [3, H, W] in 0..1 by the range of its pixel type."""
    mode = im.mode
    if mode in _EIGHT_BIT_MODES:
        arr = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)
    if mode.startswith("I;16") or mode == "I":  # 16-bit (or int32) gray
        gray = np.asarray(im).astype(np.float64)  # (H, W)
        lo, hi = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            raise CocoFormatError(
                f"{what} is a 32-bit integer image (Pillow mode {mode!r}) "
                f"with values {lo:g}..{hi:g}, outside the 16-bit range "
                "0..65535; convert it to 8 or 16 bits per channel"
            )
        gray = gray / 65535.0
    elif mode == "F":  # 32-bit float gray
        gray = np.asarray(im).astype(np.float64)
        values = gray[np.isfinite(gray)]
        finite = values.size == gray.size
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not finite or lo < 0 or hi > 1:
            raise CocoFormatError(
                f"{what} is a float image (Pillow mode 'F') with values "
                f"{lo:g}..{hi:g}{'' if finite else ' and NaN/inf'}; float "
                "images must hold 0..1 (or convert it to 8 or 16 bits)"
            )
    else:
        raise CocoFormatError(
            f"{what} has Pillow mode {mode!r}, which is not supported: save "
            "it as 8-bit RGB / grayscale (or 16-bit grayscale)"
        )
    t = torch.from_numpy(gray.astype(np.float32))  # (H, W)
    return t[None].expand(3, -1, -1).contiguous()  # (H, W) -> (3, H, W)


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

    >>> ds = CocoDetection(
    ...     "data/shapes/val", "data/shapes/annotations/instances_val.json"
    ... )  # doctest: +SKIP
    >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        transforms: Callable | None = None,
        skip_empty: bool = False,
        load_masks: bool = True,
    ) -> None:
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
        self.skeleton = (
            [tuple(p) for p in self.coco.cats[kp_cats[0]].get("skeleton", [])] if kp_cats else None
        )

        # count zero-area boxes once, here, instead of warning in every __getitem__
        self.num_dropped_boxes = sum(
            1 for a in data["annotations"] if not _valid_box(a, self.coco.imgs[a["image_id"]])
        )
        if self.num_dropped_boxes:
            warnings.warn(
                f"{self.ann_file}: {self.num_dropped_boxes} annotation(s) have a box of "
                "zero area (after clipping to the image) or a NaN / infinite "
                "coordinate and are dropped (engine.check_data names them)",
                stacklevel=2,
            )

        ids = sorted(self.coco.imgs)
        if skip_empty:
            ids = [
                i
                for i in ids
                if any(
                    not a.get("iscrowd", 0) and _valid_box(a, self.coco.imgs[i])
                    for a in self.coco.imgToAnns[i]
                )
            ]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        """The image of ``image_id`` as float32 [3, H, W] in 0..1; checks the file exists and its
        size matches the JSON's width/height.

        8-bit images (any Pillow mode that converts to RGB: L, P, RGBA, CMYK, ...) are divided
        by 255. 16-bit grayscale (``I;16`` PNGs, or ``I`` with values in 0..65535) is divided
        by 65535, and float (``F``) images must already hold 0..1: their real range, not
        Pillow's 8-bit conversion, which turns 16-bit PNGs all white and float TIFFs all
        black. Other modes and out-of-range values are refused. A truncated or corrupt file is
        an ``OSError`` naming the file and the image id.
        """
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"image file {path} (image id {image_id}) not found; annotations: {self.ann_file}"
            )
        try:
            with Image.open(path) as im:
                if im.size != (info["width"], info["height"]):  # checked before decoding
                    raise CocoFormatError(
                        f"image file {path} (image id {image_id}) is {im.size[0]}x{im.size[1]} "
                        f"(width x height) but {self.ann_file} says "
                        f"{info['width']}x{info['height']}"
                    )
                im.load()
                return _image_to_tensor(im, f"image file {path} (image id {image_id})")
        except CocoFormatError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
            raise OSError(
                f"image file {path} (image id {image_id}) cannot be read: "
                f"{type(err).__name__}: {err} (truncated or corrupt?); annotations: "
                f"{self.ann_file}"
            ) from err

    def load_target(self, image_id: int) -> dict[str, torch.Tensor]:
        """The target dict of ``image_id`` (see the module docstring for the keys)."""
        info = self.coco.imgs[image_id]
        H, W = info["height"], info["width"]
        anns = []
        for a in self.coco.imgToAnns[image_id]:
            with self._reading(a, image_id):
                if _valid_box(a, info):
                    anns.append(a)
        train = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]

        def boxes_of(group):
            rows = []
            for a in group:
                with self._reading(a, image_id):
                    rows.append(_clip_box(a["bbox"], W, H))
            return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)

        def masks_of(group):
            if not group:
                return torch.zeros((0, H, W), dtype=torch.uint8)
            masks = []
            for a in group:
                if "segmentation" not in a:
                    raise CocoFormatError(
                        f"{self.ann_file}: annotation id {a['id']} has no "
                        "'segmentation' (use load_masks=False for boxes only)"
                    )
                with self._reading(a, image_id):
                    masks.append(
                        ann_to_mask(
                            a,
                            H,
                            W,
                            where=f"{self.ann_file}: annotation id {a['id']} (image id {image_id})",
                        )
                    )
            return torch.from_numpy(np.stack(masks))

        areas = []
        for a in train:
            with self._reading(a, image_id):
                areas.append(float(a.get("area", 0.0)))
        target = {
            "boxes": boxes_of(train),
            "labels": torch.tensor(
                [self.cat_id_to_label[a["category_id"]] for a in train], dtype=torch.int64
            ),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
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
                    with self._reading(a, image_id):
                        kp = torch.tensor(a["keypoints"], dtype=torch.float32)
                    if kp.numel() != 3 * K:
                        raise CocoFormatError(
                            f"{self.ann_file}: annotation id {a['id']} has "
                            f"{kp.numel()} keypoint numbers, expected 3 x {K}"
                        )
                    kps[i] = kp.reshape(K, 3)  # (3K,) -> (K, 3)
            target["keypoints"] = kps
        return target

    @contextlib.contextmanager
    def _reading(self, ann: dict, image_id: int):
        """Where one annotation is read: an error of pycocotools, numpy or torch on it (a garbage
        RLE string, a wrong field type) is re-raised once, naming the file, annotation and image
        id, instead of reaching the user (or a DataLoader worker) without them."""
        try:
            yield
        except CocoFormatError:
            raise
        except Exception as err:
            raise CocoFormatError(
                f"{self.ann_file}: annotation id {ann.get('id')!r} (image id "
                f"{image_id}) cannot be read: {type(err).__name__}: "
                f"{err}"
            ) from err

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[idx]
        image = self.load_image(image_id)
        target = self.load_target(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {len(self.cat_ids)} classes, "
            f"image_dir={str(self.image_dir)!r}, ann_file={str(self.ann_file)!r})"
        )


# ---------------------------------------------------------------------------------------------
# Named layouts
# ---------------------------------------------------------------------------------------------


def coco2017(
    root: str | Path, split: str = "val2017", *, keypoints: bool = False, **kwargs
) -> CocoDetection:
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
            f"({README_HINT})"
        )
    return CocoDetection(image_dir, ann_file, **kwargs)


def shapes_dataset(
    root: str | Path, split: str = "train", *, verify: str = "quick", **kwargs
) -> CocoDetection:
    """The synthetic set written by ``write_shapes_dataset(root, ...)`` (or
    ``mrcnn-edu make-shapes --out root``): detection or keypoint files, whichever exist.

    ``verify`` checks that the split is the set it says it is, before any sample is read:
    ``"quick"`` (default): the image files in ``root/{split}/`` are exactly the JSON's, and,
    where the set has its ``shapes_manifest.json``, the annotation file's sha256, the image
    names and byte sizes, and the seed, size and counts in the JSON's ``info`` are the
    manifest's; ``"full"`` also hashes every image; ``"none"`` skips the checks. A mismatch
    (a set mixed from two writes, a half-written or altered set) is a ``CocoFormatError``.
    """
    if verify not in ("quick", "full", "none"):
        raise ValueError(
            f"shapes_dataset: verify must be 'quick', 'full' or 'none', got {verify!r}"
        )
    root = Path(root)
    for stem in ("instances", "person_keypoints"):
        ann_file = root / "annotations" / f"{stem}_{split}.json"
        if ann_file.is_file():
            ds = CocoDetection(root / split, ann_file, **kwargs)
            if verify != "none":
                check_shapes_split(root, split, ds, full=verify == "full")
            return ds
    raise FileNotFoundError(
        f"no shapes set under {root}: neither annotations/instances_{split}.json nor "
        f"annotations/person_keypoints_{split}.json exists. Write one with "
        f"`mrcnn-edu make-shapes --out {root}` or mrcnn_edu.data.write_shapes_dataset "
        f"({README_HINT})"
    )


def check_shapes_split(
    root: str | Path, split: str, ds: CocoDetection, *, full: bool = False
) -> None:
    """Check that split ``split`` of the shapes set in ``root`` is one consistent write.

    ``ds``: the split's dataset (its parsed JSON is used). See :func:`shapes_dataset`.
    Raises ``CocoFormatError`` naming what does not match.
    """
    from .shapes import MANIFEST_FORMAT, MANIFEST_NAME

    root = Path(root)
    fix = (
        f"the set in {root} is mixed or incomplete; write it again with `mrcnn-edu "
        f"make-shapes --out {root} --overwrite ...` (or write_shapes_dataset(..., "
        "overwrite=True))"
    )
    json_names = sorted(im["file_name"] for im in ds.coco.dataset["images"])
    folder = root / split
    disk_names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))

    def differ(what: str, want: list[str], have: list[str]) -> str:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        return (
            f"{what}: {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra "
            f"(e.g. {extra[:3]})"
        )

    if disk_names != json_names:
        raise CocoFormatError(
            f"{folder}: the image files are not the ones "
            f"{ds.ann_file.name} lists ({differ('files', json_names, disk_names)}"
            f"); {fix}"
        )
    info = ds.coco.dataset.get("info", {})
    ours = info.get("mrcnn_edu") if isinstance(info, dict) else None
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        if ours is not None:  # written by a version that writes manifests: it went missing
            raise CocoFormatError(f"{manifest_path} is missing; {fix}")
        return  # a set from before manifests: the file names are all we know
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entry = manifest["splits"][split]
        ok = manifest.get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CocoFormatError(
            f"{manifest_path}: unreadable or without split '{split}' "
            f"({type(err).__name__}: {err}); {fix}"
        ) from None
    if not ok:
        raise CocoFormatError(f"{manifest_path} is not a shapes manifest; {fix}")
    rel = ds.ann_file.relative_to(root).as_posix() if ds.ann_file.is_relative_to(root) else None
    digest = hashlib.sha256(ds.ann_file.read_bytes()).hexdigest()
    if rel != entry.get("annotation_file") or digest != entry.get("annotation_sha256"):
        raise CocoFormatError(
            f"{ds.ann_file} is not the annotation file the manifest "
            f"{manifest_path.name} records for '{split}' "
            f"({entry.get('annotation_file')}); {fix}"
        )
    want = {
        "seed": manifest.get("seed"),
        "size": manifest.get("size"),
        "num_images": entry.get("num_images"),
        "kind": manifest.get("kind"),
    }
    have = {k: (ours or {}).get(k) for k in want}
    if have != want:
        raise CocoFormatError(
            f"{ds.ann_file}: info says {have} but the manifest says {want}; {fix}"
        )
    recorded = entry.get("images", {})
    if sorted(recorded) != json_names:
        raise CocoFormatError(
            f"{manifest_path.name} and {ds.ann_file.name} list different "
            f"images ({differ('images', sorted(recorded), json_names)}); {fix}"
        )
    for name in json_names:
        nbytes, sha = recorded[name]
        path = folder / name
        if path.stat().st_size != nbytes or (
            full and hashlib.sha256(path.read_bytes()).hexdigest() != sha
        ):
            raise CocoFormatError(
                f"{path} is not the image the manifest records (size or "
                f"sha256 differ: another write's image?); {fix}"
            )

"""Check a COCO-format data set before training: every bad target, named by image and annotation.

A wrong box or an empty mask does not crash training; it quietly teaches the network the wrong
thing, or turns one loss into ``nan`` thousands of steps later (a box of width 0 gives an
infinite ``log(w / w_a)`` regression target, Faster R-CNN's Eqn. (2)). :func:`check_data` looks
at every annotation of a :class:`mrcnn_edu.data.CocoDetection` once and lists what is wrong:

===================  ==========================================================================
field                problem
===================  ==========================================================================
``file_name``        image file missing or unreadable
``width/height``     the image file's size differs from the annotation file's width / height
``bbox``             not finite; width or height below 1 px; reaching outside the image
``category_id``      its training label lies outside 1..C
``segmentation``     missing (when masks are loaded), malformed RLE, mask size differs from the
                     image, empty mask, mask and box disagree (IoU of the mask's tight box with
                     ``bbox`` below 0.5)
===================  ==========================================================================

It works from the annotation JSON and pycocotools' run-length encodings (area and tight box are
computed on the RLE, without decoding masks) and reads only each image file's header (its size),
never its pixels, so a 2000-image set of 256 px images is checked in about two seconds. Run it
on a new set before training on it. ``engine`` reports through return values: nothing here prints.

:func:`check_coco_layout` checks a COCO 2017 root before any of that (``mrcnn-edu check-data
--coco ROOT``, notebook ``09_coco_training.ipynb``): the folders and annotation files are where
the official archives put them, the annotation files' images are on disk, and a sample of image
files has the size their annotation file says; it names what is missing and the archive that
holds it. A smaller set in the same layout passes, with a note that its counts are not COCO's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from mrcnn_edu.engine.evaluate import unwrap_coco_dataset

MIN_BOX_SIDE = 1.0  # px: a box narrower or lower than this is degenerate
BOX_TOLERANCE = 1.0  # px: a box may overshoot the image border by this much (COCO's boxes
# come from float polygons; the data set clips them) before it's reported
MIN_MASK_BOX_IOU = 0.5  # below this IoU between the mask's tight box and bbox they disagree
MAX_LISTED = 50  # problems written out by str(report); the rest are counted


class DataError(ValueError):
    """A data set with bad targets (the message lists them, see :class:`DataReport`)."""


@dataclass(frozen=True)
class Problem:
    """One bad target: which image, which annotation (None: the image itself), which field."""

    image_id: int
    ann_id: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"image {self.image_id}"
        if self.ann_id is not None:
            where += f", annotation {self.ann_id}"
        return f"{where}: {self.field}: {self.message}"


@dataclass
class DataReport:
    """What :func:`check_data` found.

    Attributes:
        problems: every :class:`Problem`, in image order.
        num_images / num_annotations: how much was checked.
        source: the annotation file checked.
    """

    problems: list[Problem]
    num_images: int
    num_annotations: int
    source: str = ""

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.source}: " if self.source else ""
        checked = f"{self.num_images} images, {self.num_annotations} annotations"
        if self.ok:
            return f"{head}{checked}: no problems found"
        lines = [f"{head}{len(self.problems)} problem(s) in {checked}:"]
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        """Raise :class:`DataError` listing the problems, if there are any."""
        if not self.ok:
            raise DataError(str(self))


def rle_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString`` in Python).

    Each count is stored in 5-bit groups, least significant first, as characters ``chr(48 + c)``
    where bit 0x20 of ``c`` says "more groups follow" and bit 0x10 of the last group is the sign;
    from the third count on, a count is stored as its difference to the count two before.
    Reading the counts here (instead of decoding the mask) lets :func:`check_data` verify that
    they add up to height x width before pycocotools trusts them.

    >>> from pycocotools import mask as mask_utils
    >>> import numpy as np
    >>> m = np.zeros((3, 4), np.uint8); m[1:, 1:3] = 1
    >>> rle_counts(mask_utils.encode(np.asfortranarray(m))["counts"].decode())
    [4, 2, 1, 2, 3]
    """
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("compressed RLE string ends inside a count")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} at {p} is not an RLE character")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # negative: sign-extend
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _segmentation_rle(seg, height: int, width: int) -> tuple[dict | None, str | None]:
    """(RLE, None) for a well-formed segmentation of an image of this size, else (None, why)."""
    if isinstance(seg, list):  # polygons: rasterized at the image's size
        try:
            return mask_utils.merge(mask_utils.frPyObjects(seg, height, width)), None
        except Exception as err:  # noqa: BLE001 - pycocotools raises bare Exceptions
            return None, f"polygons cannot be rasterized: {err}"
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        return None, "neither polygons nor an RLE dict with 'size' and 'counts'"
    size = seg["size"]
    if list(size) != [height, width]:
        return None, (
            f"mask size {list(size)} (height, width) differs from the image's [{height}, {width}]"
        )
    counts = seg["counts"]
    try:
        if isinstance(counts, list):
            runs = [int(c) for c in counts]
        elif isinstance(counts, (str, bytes)):
            runs = rle_counts(counts.decode("ascii") if isinstance(counts, bytes) else counts)
        else:
            return None, f"RLE 'counts' must be a list or a string, got {type(counts).__name__}"
    except ValueError as err:
        return None, f"malformed RLE counts: {err}"
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        return None, (
            f"malformed RLE: the runs add up to {sum(runs)} pixels (or one is negative),"
            f" not height x width = {height * width}"
        )
    if isinstance(counts, list):
        return mask_utils.frPyObjects(seg, height, width), None
    return {"size": [height, width], "counts": counts}, None


def _iou_xywh(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _fmt(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def _check_image(base, image_id: int, info: dict, out: list[Problem]) -> bool:
    """Image-level checks; True when the annotation file's size can be trusted for the masks."""
    W, H = info.get("width"), info.get("height")
    sizes_ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (W, H))
    if not sizes_ok:
        out.append(
            Problem(
                image_id,
                None,
                "width/height",
                f"width {W!r} and height {H!r} must be positive integers",
            )
        )
    image_dir = getattr(base, "image_dir", None)
    if image_dir is None:
        return sizes_ok
    path = Path(image_dir) / info["file_name"]
    if not path.is_file():
        out.append(Problem(image_id, None, "file_name", f"image file {path} not found"))
        return sizes_ok
    try:
        with Image.open(path) as im:  # reads the header only
            w, h = im.size
    except (UnidentifiedImageError, OSError) as err:
        out.append(
            Problem(
                image_id, None, "file_name", f"image file {path} cannot be read as an image: {err}"
            )
        )
        return sizes_ok
    if sizes_ok and (w, h) != (W, H):
        out.append(
            Problem(
                image_id,
                None,
                "width/height",
                f"image file {path} is {w}x{h} (width x height) but the annotation "
                f"file says {W}x{H}",
            )
        )
    return sizes_ok


def _check_annotation(
    ann: dict,
    image_id: int,
    W: int,
    H: int,
    label_of: dict[int, int],
    num_classes: int,
    sizes_ok: bool,
    check_masks: bool,
    out: list[Problem],
) -> None:
    aid = ann.get("id")

    def bad(field: str, message: str) -> None:
        out.append(Problem(image_id, aid, field, message))

    label = label_of.get(ann["category_id"])
    if label is None or not 1 <= label <= num_classes:
        bad(
            "category_id",
            f"category_id {ann['category_id']} is training label {label}, outside 1..{num_classes}",
        )

    x, y, w, h = (float(v) for v in ann["bbox"])
    box_ok = False
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        bad("bbox", f"box {_fmt((x, y, w, h))} (x, y, w, h) is not finite")
    elif w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:
        bad(
            "bbox",
            f"degenerate box {_fmt((x, y, w, h))} (x, y, w, h): width {w:g}, height "
            f"{h:g}; both must be at least {MIN_BOX_SIDE:g} px",
        )
    elif not sizes_ok:
        pass  # the image's size is reported; no border to check against
    elif (
        x < -BOX_TOLERANCE
        or y < -BOX_TOLERANCE
        or x + w > W + BOX_TOLERANCE
        or y + h > H + BOX_TOLERANCE
    ):
        bad(
            "bbox",
            f"box {_fmt((x, y, w, h))} (x, y, w, h) reaches outside the {W}x{H} "
            f"(width x height) image",
        )
    else:
        box_ok = True

    if not (check_masks and sizes_ok):
        return
    if "segmentation" not in ann:
        bad(
            "segmentation",
            "missing (the data set loads masks; use load_masks=False for boxes only)",
        )
        return
    rle, why = _segmentation_rle(ann["segmentation"], H, W)
    if rle is None:
        bad("segmentation", why)
        return
    if int(mask_utils.area(rle)) == 0:
        bad("segmentation", "empty mask (0 pixels)")
        return
    if box_ok:  # a box with its own problem is reported once, above
        tight = [float(v) for v in mask_utils.toBbox(rle)]  # (x, y, w, h), w = x_max - x_min + 1
        iou = _iou_xywh(tight, (x, y, w, h))
        if iou < MIN_MASK_BOX_IOU:
            bad(
                "segmentation",
                f"mask and box disagree: the mask's tight box {_fmt(tight)} has "
                f"IoU {iou:.2f} < {MIN_MASK_BOX_IOU} with bbox "
                f"{_fmt((x, y, w, h))} (x, y, w, h)",
            )


def check_data(dataset, *, num_classes: int | None = None, progress: bool = True) -> DataReport:
    """Check every image and annotation of a COCO-format data set; returns a :class:`DataReport`.

    Args:
        dataset: a :class:`mrcnn_edu.data.CocoDetection` (or a ``Subset`` of one); the images
            it serves are checked, crowd annotations included.
        num_classes: object classes, not counting the background, so valid training labels
            are 1..num_classes (a torchvision-style ``num_classes`` that counts the background
            is this + 1). Default: the number of categories of the data set.
        progress: show a tqdm bar.

    Returns:
        The report; ``report.raise_if_bad()`` turns it into a :class:`DataError`.

    Example::

        >>> report = check_data(shapes_dataset("data/shapes", "train"))  # doctest: +SKIP
        >>> report.raise_if_bad()  # doctest: +SKIP
    """
    base, image_ids = unwrap_coco_dataset(dataset)
    coco = base.coco
    mapping = getattr(base, "cat_id_to_label", None)
    if mapping is None:  # labels are the category ids themselves
        label_of = {int(c): int(c) for c in coco.getCatIds()}
    else:
        label_of = {int(c): int(lab) for c, lab in mapping.items()}
    if num_classes is None:
        num_classes = max(label_of.values(), default=0)
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"check_data: num_classes must be a positive int (object classes "
            f"without the background), got {num_classes!r}"
        )
    check_masks = bool(getattr(base, "load_masks", True))

    problems: list[Problem] = []
    num_annotations = 0
    for image_id in tqdm(image_ids, desc="check_data", disable=not progress):
        info = coco.imgs[image_id]
        sizes_ok = _check_image(base, image_id, info, problems)
        anns = coco.imgToAnns.get(image_id, [])
        num_annotations += len(anns)
        for ann in sorted(anns, key=lambda a: a["id"]):
            _check_annotation(
                ann,
                image_id,
                info["width"],
                info["height"],
                label_of,
                num_classes,
                sizes_ok,
                check_masks,
                problems,
            )
    return DataReport(problems, len(image_ids), num_annotations, str(getattr(base, "ann_file", "")))


# ---------------------------------------------------------------------------------------------
# The COCO 2017 layout: `mrcnn-edu check-data --coco ROOT` (notebook 09)
# ---------------------------------------------------------------------------------------------

#: Images listed in the official annotation files (and image files in the official archives).
COCO2017_IMAGES = {"train2017": 118287, "val2017": 5000}
#: Annotations (object instances) in ``instances_{split}.json``.
COCO2017_ANNOTATIONS = {"train2017": 860001, "val2017": 36781}
COCO2017_CATEGORIES = 80  # object categories (ids 1..90 with gaps)
#: Where each part comes from (https://cocodataset.org/#download); each unzips into its folder.
COCO2017_URLS = {
    "train2017": "http://images.cocodataset.org/zips/train2017.zip",
    "val2017": "http://images.cocodataset.org/zips/val2017.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
}
COCO2017_SIZES = {"train2017": "~18 GB", "val2017": "~778 MB", "annotations": "~241 MB"}
SIZE_SAMPLE = 500  # images per split whose header is read to compare its size with the JSON's


@dataclass(frozen=True)
class LayoutProblem:
    """One thing wrong with a data root's layout: the file or folder, and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class SplitSummary:
    """What one annotation file of a COCO root holds, and what of it is on disk.

    Attributes:
        split: ``"train2017"`` or ``"val2017"``.
        annotation_file: the JSON file checked.
        num_images: images listed in it.
        num_image_files: files in the split's image folder.
        num_missing: listed images whose file is not there.
        num_annotations / num_categories: what the JSON holds.
        num_sizes_checked: image headers read and compared with the JSON's width / height.
    """

    split: str
    annotation_file: str
    num_images: int = 0
    num_image_files: int = 0
    num_missing: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    num_sizes_checked: int = 0

    def __str__(self) -> str:
        return (
            f"{Path(self.annotation_file).name}: {self.num_images} images "
            f"({self.num_image_files} files in {self.split}/, {self.num_missing} missing), "
            f"{self.num_annotations} annotations, {self.num_categories} categories; "
            f"{self.num_sizes_checked} image sizes checked"
        )


@dataclass
class CocoLayoutReport:
    """What :func:`check_coco_layout` found.

    Attributes:
        root: the data root checked.
        problems: every :class:`LayoutProblem` (a missing folder or file, an unreadable or
            malformed annotation file, a listed image missing on disk, an image whose size
            differs from its annotation file's); any problem makes ``ok`` False.
        notes: what is worth knowing but not wrong (counts that differ from COCO 2017's, no
            keypoint files, image files that no annotation file lists).
        splits: one :class:`SplitSummary` per annotation file read.
        fetch: the official archives that would supply what is missing
            (keys of :data:`COCO2017_URLS`).
    """

    root: str
    problems: list[LayoutProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    splits: list[SplitSummary] = field(default_factory=list)
    fetch: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found (notes do not count)."""
        return not self.problems

    def how_to_get(self) -> str:
        """Shell commands that download and unpack the archives in :attr:`fetch` ("" if none)."""
        if not self.fetch:
            return ""
        names = [Path(COCO2017_URLS[k]).name for k in self.fetch]
        lines = [f"mkdir -p {self.root} && cd {self.root}"]
        lines += [f"wget -c {COCO2017_URLS[k]}   # {COCO2017_SIZES[k]}" for k in self.fetch]
        lines += [f"unzip -q {n}" for n in names]
        lines.append("(data/README.md lists each archive's size and md5 sum to verify it)")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"COCO 2017 layout of {self.root}"
        if self.ok:
            lines = [f"{head}: no problems found"]
        else:
            lines = [f"{head}: {len(self.problems)} problem(s):"]
            lines += [f"  {p}" for p in self.problems[:MAX_LISTED]]
            if len(self.problems) > MAX_LISTED:
                lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        if self.splits:
            lines.append("checked:")
            lines += [f"  {s}" for s in self.splits]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        if self.fetch:
            lines.append("how to get what is missing (the official COCO 2017 archives):")
            lines += [f"  {line}" for line in self.how_to_get().splitlines()]
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        """Raise :class:`DataError` with the report, if there is a problem."""
        if not self.ok:
            raise DataError(str(self))


def _load_coco_json(path: Path, out: list[LayoutProblem]) -> dict | None:
    """The parsed annotation file, or None after appending what is wrong with it."""
    import json

    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        out.append(LayoutProblem(str(path), f"cannot be read as JSON: {err}"))
        return None
    if not isinstance(data, dict):
        out.append(LayoutProblem(str(path), f"holds a {type(data).__name__}, not a JSON object"))
        return None
    absent = [
        k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)
    ]
    if absent:
        out.append(
            LayoutProblem(
                str(path),
                f"not a COCO annotation file: no list {', '.join(repr(k) for k in absent)}",
            )
        )
        return None
    return data


def _valid_image_entries(
    images: list, ann_file: Path, out: list[LayoutProblem]
) -> list[tuple[int, str, int, int]]:
    """``(id, file_name, width, height)`` of the well-formed entries of ``images``; a problem
    for each malformed one."""
    entries = []
    for k, info in enumerate(images):
        if not isinstance(info, dict):
            out.append(LayoutProblem(str(ann_file), f"images[{k}] is not an object"))
            continue
        iid, name, W, H = (info.get(key) for key in ("id", "file_name", "width", "height"))
        if (
            isinstance(iid, bool)
            or not isinstance(iid, int)
            or not isinstance(name, str)
            or not name
        ):
            out.append(
                LayoutProblem(
                    str(ann_file),
                    f"images[{k}] needs an int 'id' and a 'file_name', got id {iid!r}, "
                    f"file_name {name!r}",
                )
            )
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (W, H)):
            out.append(
                LayoutProblem(
                    str(ann_file),
                    f"image id {iid} ({name}): width {W!r} and height {H!r} must be positive "
                    "integers",
                )
            )
            continue
        entries.append((iid, name, W, H))
    return entries


def _read_size(path: Path) -> tuple[int, int] | str:
    """``(width, height)`` from the image file's header, or why it cannot be read."""
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        return f"cannot be read as an image: {err}"


def _check_coco_split(
    root: Path,
    split: str,
    ann_file: Path,
    files: set[str],
    sample: int | None,
    seed: int,
    sizes: dict[str, tuple[int, int] | str],
    report: CocoLayoutReport,
    listed: set[str],
) -> None:
    """Counts, presence and (a sample of) image sizes of one annotation file of ``split``."""
    import random

    image_dir = root / split
    data = _load_coco_json(ann_file, report.problems)
    if data is None:
        return
    entries = _valid_image_entries(data["images"], ann_file, report.problems)
    summary = SplitSummary(
        split,
        str(ann_file),
        num_images=len(data["images"]),
        num_image_files=len(files),
        num_annotations=len(data["annotations"]),
        num_categories=len(data["categories"]),
    )
    del data  # COCO's train annotations take gigabytes as Python objects
    present = []
    for iid, name, W, H in entries:
        listed.add(name)
        on_disk = name in files if "/" not in name else (image_dir / name).is_file()
        if on_disk:
            present.append((iid, name, W, H))
        else:
            summary.num_missing += 1
            report.problems.append(
                LayoutProblem(
                    str(image_dir / name),
                    f"image id {iid} of {ann_file.name} is not in {image_dir}/",
                )
            )
    if summary.num_missing > 10:
        report.notes.append(
            f"{summary.num_missing} of the {len(entries)} images of {ann_file.name} are "
            f"missing from {image_dir}/: an interrupted download or unzip? Unzip "
            f"{Path(COCO2017_URLS.get(split, split)).name} again"
        )
    if sample is not None and sample < len(present):
        present = sorted(random.Random(seed).sample(present, sample))
    for iid, name, W, H in present:
        path = image_dir / name
        if str(path) not in sizes:
            sizes[str(path)] = _read_size(path)
        size = sizes[str(path)]
        summary.num_sizes_checked += 1
        if isinstance(size, str):
            report.problems.append(LayoutProblem(str(path), f"image id {iid}: {size}"))
        elif size != (W, H):
            report.problems.append(
                LayoutProblem(
                    str(path),
                    f"image id {iid} is {size[0]}x{size[1]} (width x height) but "
                    f"{ann_file.name} says {W}x{H}",
                )
            )
    report.splits.append(summary)
    if ann_file.name.startswith("instances_") and split in COCO2017_IMAGES:
        want = (COCO2017_IMAGES[split], COCO2017_ANNOTATIONS[split], COCO2017_CATEGORIES)
        have = (summary.num_images, summary.num_annotations, summary.num_categories)
        if have != want:
            report.notes.append(
                f"{ann_file.name}: {have[0]} images, {have[1]} annotations, {have[2]} "
                f"categories, not COCO 2017's {want[0]}, {want[1]}, {want[2]}: a set in the "
                "COCO layout, not COCO 2017 itself (fine for a smaller or synthetic set)"
            )


def _list_files(folder: Path) -> set[str]:
    """Names of the regular files directly in ``folder`` (one ``scandir``: fast on 118k)."""
    import os

    with os.scandir(folder) as it:
        return {e.name for e in it if e.is_file()}


def check_coco_layout(
    root: str | Path,
    *,
    splits: tuple[str, ...] = ("train2017", "val2017"),
    sample: int | None = SIZE_SAMPLE,
    seed: int = 0,
    log=None,
) -> CocoLayoutReport:
    """Check that ``root`` holds COCO 2017 in its official layout; returns a
    :class:`CocoLayoutReport` (problems, notes, and how to get what is missing).

    Expected::

        root/train2017/*.jpg                          118287 images
        root/val2017/*.jpg                              5000 images
        root/annotations/instances_{train,val}2017.json
        root/annotations/person_keypoints_{train,val}2017.json   (keypoint training only)

    Problems (``report.ok`` is False): a missing folder or annotation file (with the archive
    to download, see :data:`COCO2017_URLS`; an archive lying unzipped in ``root`` is pointed
    out), an annotation file that is not COCO JSON, an image it lists that is not in the image
    folder, and, for a seeded random sample of ``sample`` images per annotation file (``None``:
    every image), an image file whose header cannot be read or whose size differs from the
    JSON's width and height. Only headers are read, so the sample costs milliseconds; reading
    ``instances_train2017.json`` itself (448 MB) takes the most time, tens of seconds.

    Notes (not problems): counts of images, annotations and categories that differ from COCO
    2017's (a smaller set in the same layout, such as the shapes set laid out like COCO,
    passes), no ``person_keypoints_*`` files, image files that no annotation file lists.
    The annotations themselves (boxes, masks, labels) are :func:`check_data`'s job.

    Args:
        root: the data root.
        splits: the splits to check (``("val2017",)`` to evaluate without the training set).
        sample: images per annotation file whose size is checked (None: all).
        seed: seeds the sample.
        log: called with a line before each slow step (e.g. ``print``); None: silent.

    Example::

        >>> report = check_coco_layout("data/coco")  # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    if sample is not None and (
        isinstance(sample, bool) or not isinstance(sample, int) or sample < 0
    ):
        raise ValueError(
            f"check_coco_layout: sample must be a non-negative int or None, got {sample!r}"
        )
    unknown = [s for s in splits if s not in COCO2017_IMAGES]
    if unknown or not splits:
        raise ValueError(
            f"check_coco_layout: splits must be some of {tuple(COCO2017_IMAGES)}, got {splits!r}"
        )
    say = log or (lambda line: None)
    root = Path(root)
    report = CocoLayoutReport(str(root))

    def missing(path: Path, what: str, archive: str) -> None:
        zipped = root / Path(COCO2017_URLS[archive]).name
        if zipped.is_file():
            how = (
                f"{zipped.name} is in {root} but not unzipped: cd {root} && unzip -q {zipped.name}"
            )
        else:
            how = (
                f"it comes from {COCO2017_URLS[archive]} ({COCO2017_SIZES[archive]}), "
                f"unzipped in {root}"
            )
            if archive not in report.fetch:
                report.fetch.append(archive)
        report.problems.append(LayoutProblem(str(path), f"{what} not found; {how}"))

    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        report.problems.append(LayoutProblem(str(root), f"the data root {what}"))
        report.fetch = [*splits, "annotations"]
        return report
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):  # a root one level too high?
        if (sub / "annotations").is_dir() and any((sub / s).is_dir() for s in splits):
            report.notes.append(f"{sub} looks like a COCO root: did you mean --coco {sub}?")

    ann_dir = root / "annotations"
    if not ann_dir.is_dir():
        missing(ann_dir, "the annotations/ folder", "annotations")
    sizes: dict[str, tuple[int, int] | str] = {}
    no_keypoints = []
    for split in splits:
        image_dir = root / split
        ann_files = [ann_dir / f"{stem}_{split}.json" for stem in ("instances", "person_keypoints")]
        if ann_dir.is_dir() and not ann_files[0].is_file():
            missing(ann_files[0], f"the annotation file for {split}", "annotations")
        if not image_dir.is_dir():
            missing(image_dir, f"the image folder {split}/", split)
            continue
        say(f"listing {image_dir}/")
        files = _list_files(image_dir)
        listed: set[str] = set()
        for ann_file in ann_files:
            if not ann_file.is_file():
                continue
            mb = ann_file.stat().st_size / 2**20
            say(f"reading {ann_file} ({mb:.0f} MB) and checking its images")
            _check_coco_split(root, split, ann_file, files, sample, seed, sizes, report, listed)
        if ann_dir.is_dir() and not ann_files[1].is_file():
            no_keypoints.append(ann_files[1].name)
        unlisted = sorted(files - listed) if listed else []
        if unlisted:
            report.notes.append(
                f"{len(unlisted)} file(s) in {image_dir}/ are in no annotation file "
                f"(e.g. {', '.join(unlisted[:3])}): ignored by training and evaluation"
            )
    if no_keypoints:
        report.notes.append(
            f"no {' or '.join(no_keypoints)}: needed only for keypoints "
            f"(coco-keypoints-r50-fpn); they come with {Path(COCO2017_URLS['annotations']).name}"
        )
    return report

"""check_data: a clean shapes set passes; each bad target written into a copy of its annotation
file (or its image folder) is reported once, with its image id, annotation id and field."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from mrcnn_edu.data import CocoDetection, shapes_dataset, write_shapes_dataset
from mrcnn_edu.data.coco import ann_to_mask
from mrcnn_edu.data.shapes import mask_to_rle
from mrcnn_edu.engine.check_data import (
    MAX_LISTED,
    DataError,
    DataReport,
    Problem,
    check_data,
    rle_counts,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, train=0, val=6, size=SIZE, progress=False)
    return root


def _found(report: DataReport) -> list[tuple]:
    return [(p.image_id, p.ann_id, p.field) for p in report.problems]


def _pick(data: dict) -> dict:
    """A non-crowd annotation with at least 100 px (so a 5 x 5 box overlaps it by IoU < 0.5)."""
    return next(a for a in data["annotations"] if not a["iscrowd"] and a["area"] >= 100)


def _variant(shapes_root: Path, tmp_path: Path, edit, **kw) -> tuple[CocoDetection, dict]:
    """A copy of the val split with ``edit(data, ann, image_dir)`` applied; returns the data set
    (built quietly: the loader warns about boxes it drops) and the edited annotation."""
    image_dir = tmp_path / "val"
    shutil.copytree(shapes_root / "val", image_dir)
    data = json.loads((shapes_root / "annotations" / "instances_val.json").read_text())
    ann = _pick(data)
    edit(data, ann, image_dir)
    ann_file = tmp_path / "instances_val.json"
    ann_file.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CocoDetection(image_dir, ann_file, **kw), ann


def test_clean_set_is_ok(shapes_root: Path) -> None:
    ds = shapes_dataset(shapes_root, "val")
    report = check_data(ds, progress=False)
    assert report.ok, str(report)
    assert report.num_images == 6
    assert report.num_annotations == len(ds.coco.dataset["annotations"])
    assert str(report).endswith(
        f"6 images, {report.num_annotations} annotations: no problems found"
    )
    report.raise_if_bad()  # nothing to raise


def _zero_rle(size) -> dict:
    rle = mask_utils.encode(np.zeros(size, np.uint8, order="F"))
    return {"size": list(size), "counts": rle["counts"].decode("ascii")}


def _set(key, value):
    def edit(data, ann, image_dir):
        ann[key] = value

    return edit


def _set_box(index, value):
    def edit(data, ann, image_dir):
        ann["bbox"][index] = value

    return edit


def _box_away_from_mask(data, ann, image_dir):
    mask = torch.from_numpy(ann_to_mask(ann, SIZE, SIZE))
    ys, xs = torch.nonzero(mask, as_tuple=True)
    tight = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    for x, y in ((0, 0), (SIZE - 6, SIZE - 6), (0, SIZE - 6), (SIZE - 6, 0)):
        box = torch.tensor([[x, y, x + 5, y + 5]], dtype=torch.float32)
        if box_iou(box, tight).item() < 0.5:  # torchvision as the independent check
            ann["bbox"] = [x, y, 5, 5]
            return
    raise AssertionError("no corner box disagrees with the mask")


def _drop_segmentation(data, ann, image_dir):
    del ann["segmentation"]


CASES = {
    # name: (edit, field, message fragment)
    "degenerate box": (_set_box(3, 0.5), "bbox", "degenerate box"),
    "zero-height box (the loader drops it)": (_set_box(3, 0), "bbox", "height 0"),
    "box outside the image": (_set_box(0, SIZE - 3), "bbox", "reaches outside the 64x64"),
    "non-finite box": (_set_box(1, float("nan")), "bbox", "not finite"),
    "empty mask": (_set("segmentation", _zero_rle((SIZE, SIZE))), "segmentation", "empty mask"),
    "mask and box disagree": (_box_away_from_mask, "segmentation", "mask and box disagree"),
    "mask size differs": (
        _set("segmentation", _zero_rle((32, 32))),
        "segmentation",
        "mask size [32, 32]",
    ),
    "malformed RLE": (
        _set("segmentation", {"size": [SIZE, SIZE], "counts": [10, 5]}),
        "segmentation",
        "add up to 15 pixels",
    ),
    "no segmentation": (_drop_segmentation, "segmentation", "missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_annotation_is_named(case: str, shapes_root: Path, tmp_path: Path) -> None:
    edit, field, fragment = CASES[case]
    ds, ann = _variant(shapes_root, tmp_path, edit)
    report = check_data(ds, progress=False)
    assert _found(report) == [(ann["image_id"], ann["id"], field)], str(report)
    assert fragment in report.problems[0].message
    text = str(report)
    assert f"image {ann['image_id']}, annotation {ann['id']}: {field}: " in text
    assert text.startswith(f"{ds.ann_file}: 1 problem(s) in 6 images")
    with pytest.raises(DataError, match=f"annotation {ann['id']}: {field}"):
        report.raise_if_bad()
    assert issubclass(DataError, ValueError)


def test_labels_outside_the_model_classes(shapes_root: Path, tmp_path: Path) -> None:
    def edit(data, ann, image_dir):  # every object a square (label 1) but one triangle (3)
        for a in data["annotations"]:
            a["category_id"] = 1
        ann["category_id"] = 5

    ds, ann = _variant(shapes_root, tmp_path, edit)
    assert ds.cat_id_to_label == {1: 1, 3: 2, 5: 3}  # labels are contiguous, not category ids
    assert check_data(ds, progress=False).ok  # 3 categories: labels 1..3 are fine
    report = check_data(ds, num_classes=2, progress=False)
    assert _found(report) == [(ann["image_id"], ann["id"], "category_id")]
    assert "category_id 5 is training label 3, outside 1..2" in report.problems[0].message
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        check_data(ds, num_classes=0, progress=False)


def test_image_file_problems(shapes_root: Path, tmp_path: Path) -> None:
    def edit(data, ann, image_dir):
        with Image.open(image_dir / "000000000001.png") as im:
            im.resize((SIZE - 4, SIZE)).save(image_dir / "000000000001.png")
        (image_dir / "000000000002.png").unlink()

    ds, _ = _variant(shapes_root, tmp_path, edit)
    report = check_data(ds, progress=False)
    assert _found(report) == [(1, None, "width/height"), (2, None, "file_name")]
    assert "is 60x64 (width x height) but the annotation file says 64x64" in str(report)
    assert "000000000002.png not found" in str(report)


def test_subsets_and_box_only_sets(shapes_root: Path, tmp_path: Path) -> None:
    ds, ann = _variant(shapes_root, tmp_path, _set("segmentation", _zero_rle((SIZE, SIZE))))
    index = ds.ids.index(ann["image_id"])
    others = [i for i in range(len(ds)) if i != index]
    assert check_data(torch.utils.data.Subset(ds, others), progress=False).ok
    inner = torch.utils.data.Subset(ds, [index] + others)
    report = check_data(torch.utils.data.Subset(inner, [0]), progress=False)
    assert report.num_images == 1 and _found(report) == [
        (ann["image_id"], ann["id"], "segmentation")
    ]
    # a box-only data set does not need masks: they are not checked
    boxes_only = CocoDetection(ds.image_dir, ds.ann_file, load_masks=False)
    assert check_data(boxes_only, progress=False).ok


def test_report_lists_the_first_problems_then_counts() -> None:
    problems = [Problem(i, 100 + i, "bbox", "degenerate") for i in range(MAX_LISTED + 10)]
    problems.append(Problem(7, None, "file_name", "missing"))
    report = DataReport(problems, num_images=61, num_annotations=60, source="x.json")
    lines = str(report).splitlines()
    assert lines[0] == "x.json: 61 problem(s) in 61 images, 60 annotations:"
    assert lines[1] == "  image 0, annotation 100: bbox: degenerate"
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1] == "  ... and 11 more"
    assert str(problems[-1]) == "image 7: file_name: missing"
    assert not report.ok


def test_rle_counts_match_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for h, w, p in ((5, 7, 0.5), (40, 33, 0.05), (64, 64, 0.97), (3, 3, 0.0), (300, 200, 0.3)):
        mask = (rng.random((h, w)) < p).astype(np.uint8)
        mask[h // 3 : 2 * h // 3, w // 4 : w // 2] = 1  # long runs too (multi-group counts)
        compressed = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        # independent: numpy run lengths over the column-major pixel order (shapes.mask_to_rle)
        assert rle_counts(compressed) == mask_to_rle(mask, compressed=False)["counts"]
    with pytest.raises(ValueError, match="not an RLE character"):
        rle_counts("ab\x7f")

"""check_data: a clean shapes set passes; each bad target written into a copy of its annotation
file (or its image folder) is reported once, with its image id, annotation id and field.

check_coco_layout (``mrcnn-edu check-data --coco ROOT``): the shapes set laid out like COCO 2017
passes with a note on its counts; each missing folder or file, image missing on disk, image of
the wrong size and malformed annotation file is a problem naming the path."""

from __future__ import annotations

import importlib
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
    COCO2017_URLS,
    MAX_LISTED,
    CocoLayoutReport,
    DataError,
    DataReport,
    Problem,
    check_coco_layout,
    check_data,
    rle_counts,
)

# the module (``mrcnn_edu.engine.check_data`` the attribute is the function of that name)
check_module = importlib.import_module("mrcnn_edu.engine.check_data")

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


# ---------------------------------------------------------------------------------------------
# check_coco_layout / `mrcnn-edu check-data --coco ROOT`: on the shapes set laid out like COCO
# 2017 (as tests/test_keypoint_training.py builds it: train2017/, val2017/ and
# annotations/instances_{train,val}2017.json).
# ---------------------------------------------------------------------------------------------
COCO_TRAIN, COCO_VAL = 3, 5


@pytest.fixture(scope="module")
def shapes_for_coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_for_coco")
    write_shapes_dataset(root, train=COCO_TRAIN, val=COCO_VAL, size=SIZE, progress=False)
    return root


@pytest.fixture
def coco_root(shapes_for_coco: Path, tmp_path: Path) -> Path:
    """A fresh copy of the shapes set laid out like COCO 2017, for a test to damage."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(shapes_for_coco / split, root / f"{split}2017")
        shutil.copy(
            shapes_for_coco / "annotations" / f"instances_{split}.json",
            root / "annotations" / f"instances_{split}2017.json",
        )
    return root


def _problems(report: CocoLayoutReport) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in report.problems]


def test_coco_layout_of_the_shapes_set_passes_with_a_note(coco_root: Path) -> None:
    report = check_coco_layout(coco_root)
    assert report.ok, str(report)
    assert report.fetch == [] and report.how_to_get() == ""
    for summary, split, n in zip(
        report.splits, ("train2017", "val2017"), (COCO_TRAIN, COCO_VAL), strict=True
    ):
        data = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        assert summary.split == split
        assert summary.num_images == n == len(list((coco_root / split).iterdir()))
        assert summary.num_image_files == n and summary.num_missing == 0
        assert summary.num_annotations == len(data["annotations"])
        assert summary.num_categories == 3
        assert summary.num_sizes_checked == n  # fewer than SIZE_SAMPLE: every image
    text = str(report)
    assert text.startswith(f"COCO 2017 layout of {coco_root}: no problems found")
    assert f"instances_val2017.json: {COCO_VAL} images, " in text
    assert "not COCO 2017's 5000, 36781, 80" in text and "not COCO 2017's 118287" in text
    assert "no person_keypoints_train2017.json or person_keypoints_val2017.json" in text
    report.raise_if_bad()  # nothing to raise


def test_real_coco_counts_give_no_count_note(coco_root: Path, monkeypatch) -> None:
    """The note compares with COCO 2017's counts: a set with those counts gets none."""
    counts = {}
    for split in ("train2017", "val2017"):
        data = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        counts[split] = (len(data["images"]), len(data["annotations"]))
    monkeypatch.setattr(check_module, "COCO2017_IMAGES", {k: v[0] for k, v in counts.items()})
    monkeypatch.setattr(check_module, "COCO2017_ANNOTATIONS", {k: v[1] for k, v in counts.items()})
    monkeypatch.setattr(check_module, "COCO2017_CATEGORIES", 3)
    report = check_coco_layout(coco_root)
    assert report.ok and not any("not COCO 2017" in n for n in report.notes), report.notes


@pytest.mark.parametrize(
    "remove, archive",
    [
        ("val2017", "val2017"),
        ("train2017", "train2017"),
        ("annotations/instances_val2017.json", "annotations"),
        ("annotations", "annotations"),
    ],
)
def test_a_missing_folder_or_file_is_named_with_its_archive(
    coco_root: Path, remove: str, archive: str
) -> None:
    target = coco_root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    report = check_coco_layout(coco_root)
    assert not report.ok
    named = [p for p in report.problems if p.path == str(target)]
    assert len(named) == 1, str(report)
    assert "not found" in named[0].message and COCO2017_URLS[archive] in named[0].message
    assert report.fetch == [archive]
    text = str(report)
    assert f"wget -c {COCO2017_URLS[archive]}" in text
    assert f"unzip -q {Path(COCO2017_URLS[archive]).name}" in text
    with pytest.raises(DataError, match=str(target)):
        report.raise_if_bad()
    if remove == "annotations":  # both annotation files go with it: one problem, one archive
        assert len(report.problems) == 1 and report.splits == []


def test_an_archive_that_is_not_unzipped_is_pointed_out(coco_root: Path) -> None:
    shutil.rmtree(coco_root / "val2017")
    (coco_root / "val2017.zip").write_bytes(b"PK")
    report = check_coco_layout(coco_root)
    assert _problems(report) == [
        (
            str(coco_root / "val2017"),
            f"the image folder val2017/ not found; val2017.zip is in {coco_root} but not "
            f"unzipped: cd {coco_root} && unzip -q val2017.zip",
        )
    ]
    assert report.fetch == []  # nothing to download


def test_a_missing_root(tmp_path: Path) -> None:
    report = check_coco_layout(tmp_path / "nowhere")
    assert _problems(report) == [(str(tmp_path / "nowhere"), "the data root does not exist")]
    assert report.fetch == ["train2017", "val2017", "annotations"]
    report = check_coco_layout(tmp_path / "nowhere", splits=("val2017",))
    assert report.fetch == ["val2017", "annotations"]


def test_an_image_listed_but_not_on_disk(coco_root: Path) -> None:
    missing = coco_root / "val2017" / "000000000003.png"
    missing.unlink()
    report = check_coco_layout(coco_root)
    assert _problems(report) == [
        (str(missing), f"image id 3 of instances_val2017.json is not in {coco_root / 'val2017'}/")
    ]
    val = report.splits[1]
    assert (val.num_images, val.num_image_files, val.num_missing) == (COCO_VAL, COCO_VAL - 1, 1)
    assert val.num_sizes_checked == COCO_VAL - 1


def test_an_image_whose_size_disagrees_with_the_json(coco_root: Path) -> None:
    path = coco_root / "train2017" / "000000000002.png"
    with Image.open(path) as im:
        im.resize((SIZE - 4, SIZE)).save(path)
    report = check_coco_layout(coco_root)
    assert _problems(report) == [
        (
            str(path),
            "image id 2 is 60x64 (width x height) but instances_train2017.json says 64x64",
        )
    ]
    path.write_bytes(b"not a png")
    (problem,) = check_coco_layout(coco_root).problems
    assert problem.path == str(path) and "image id 2: cannot be read as an image" in problem.message


def test_the_size_check_reads_a_seeded_sample(coco_root: Path) -> None:
    """A bounded sample (fast on 118k images) reads ``sample`` headers per annotation file,
    the same ones for the same seed; ``sample=None`` reads all."""
    for name in [f"{i:012d}.png" for i in range(1, COCO_VAL + 1)]:
        path = coco_root / "val2017" / name
        with Image.open(path) as im:
            im.resize((SIZE, SIZE + 1)).save(path)  # every val image is wrong
    full = check_coco_layout(coco_root, sample=None)
    assert len(full.problems) == COCO_VAL and full.splits[1].num_sizes_checked == COCO_VAL
    small = check_coco_layout(coco_root, sample=2, seed=5)
    assert [s.num_sizes_checked for s in small.splits] == [2, 2]
    assert len(small.problems) == 2
    assert {p.path for p in small.problems} < {p.path for p in full.problems}
    assert _problems(check_coco_layout(coco_root, sample=2, seed=5)) == _problems(small)
    assert check_coco_layout(coco_root, sample=0).splits[1].num_sizes_checked == 0
    with pytest.raises(ValueError, match="sample must be a non-negative int"):
        check_coco_layout(coco_root, sample=-1)
    with pytest.raises(ValueError, match="splits must be some of"):
        check_coco_layout(coco_root, splits=("test2017",))


def test_malformed_annotation_files(coco_root: Path) -> None:
    ann = coco_root / "annotations" / "instances_val2017.json"
    ann.write_text("{")
    (problem,) = check_coco_layout(coco_root).problems
    assert problem.path == str(ann) and problem.message.startswith("cannot be read as JSON")
    ann.write_text(json.dumps({"images": []}))
    (problem,) = check_coco_layout(coco_root).problems
    assert problem.message == "not a COCO annotation file: no list 'annotations', 'categories'"
    data = json.loads((coco_root / "annotations" / "instances_train2017.json").read_text())
    data["images"][0]["width"] = 0
    data["images"][1]["file_name"] = None
    ann.write_text(json.dumps(data))
    found = _problems(check_coco_layout(coco_root, splits=("val2017",)))
    assert found == [
        (
            str(ann),
            "image id 1 (000000000001.png): width 0 and height 64 must be positive integers",
        ),
        (str(ann), "images[1] needs an int 'id' and a 'file_name', got id 2, file_name None"),
    ]


def test_notes_for_unlisted_files_and_a_root_one_level_too_high(coco_root: Path) -> None:
    (coco_root / "val2017" / "extra.png").write_bytes(b"")
    report = check_coco_layout(coco_root)
    assert report.ok
    assert any("1 file(s) in" in n and "extra.png" in n for n in report.notes), report.notes
    report = check_coco_layout(coco_root.parent)
    assert not report.ok
    assert f"{coco_root} looks like a COCO root: did you mean --coco {coco_root}?" in report.notes


def test_the_keypoint_files_are_checked_too(coco_root: Path) -> None:
    kp = coco_root / "annotations" / "person_keypoints_val2017.json"
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    data["images"].append(dict(data["images"][0], id=99, file_name="gone.png"))
    kp.write_text(json.dumps(data))
    report = check_coco_layout(coco_root, splits=("val2017",))
    assert _problems(report) == [
        (
            str(coco_root / "val2017" / "gone.png"),
            f"image id 99 of person_keypoints_val2017.json is not in {coco_root / 'val2017'}/",
        )
    ]
    assert [Path(s.annotation_file).name for s in report.splits] == [
        "instances_val2017.json",
        "person_keypoints_val2017.json",
    ]
    assert not any("person_keypoints" in n for n in report.notes)


def test_cli_check_data_coco(coco_root: Path, capsys) -> None:
    from mrcnn_edu.cli import main

    assert main(["check-data", "--coco", str(coco_root), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"COCO 2017 layout of {coco_root}: no problems found")
    assert "not COCO 2017's 5000" in out and err == ""

    missing = coco_root / "val2017" / "000000000004.png"
    missing.unlink()
    assert main(["check-data", "--coco", str(coco_root)]) == 1
    out, err = capsys.readouterr()
    assert f"{missing}: image id 4 of instances_val2017.json is not in" in out
    assert f"reading {coco_root / 'annotations' / 'instances_val2017.json'}" in err  # progress
    assert err.rstrip().endswith(
        f"mrcnn-edu check-data: error: 1 problem(s) in the COCO 2017 layout of {coco_root}, "
        "listed above"
    )
    # only the training split: the damaged val2017 is not looked at
    assert main(["check-data", "--coco", str(coco_root), "--split", "train2017"]) == 0
    shutil.rmtree(coco_root / "train2017")
    assert main(["check-data", "--coco", str(coco_root), "--sample", "0"]) == 1
    out, _ = capsys.readouterr()
    assert f"wget -c {COCO2017_URLS['train2017']}" in out
    assert main(["check-data", "--coco", str(coco_root), "--sample", "-1"]) == 2
    assert "error: check_coco_layout: sample must be" in capsys.readouterr().err
    assert main(["check-data", "--data", str(coco_root), "--sample", "3"]) == 2
    assert "--split and --sample go with --coco" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-data", "--coco", str(coco_root), "--data", str(coco_root)])

"""The synthetic shapes / stick-figure generator: files -> pycocotools -> CocoDetection round trip,
determinism, COCO area ranges, crowd RLE, keypoint visibility and skeleton, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mrcnn_edu.cli import main
from mrcnn_edu.data import shapes_dataset, write_shapes_dataset
from mrcnn_edu.data.shapes import (
    CATEGORY_IDS,
    CLASS_NAMES,
    FLIP_INDEX,
    FLIP_MAP,
    KEYPOINT_NAMES,
    SKELETON,
    flip_index,
    generate_image,
    mask_to_rle,
)

# pycocotools (numpy 2) warns inside mask.decode about the __array__ copy keyword: not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    files = write_shapes_dataset(root, train=6, val=3, size=256, seed=0, progress=False)
    assert files == {
        "train": root / "annotations" / "instances_train.json",
        "val": root / "annotations" / "instances_val.json",
    }
    return root


@pytest.fixture(scope="module")
def keypoint_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sticks")
    write_shapes_dataset(root, train=8, val=0, size=160, seed=0, keypoints=True, progress=False)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_files_are_real_coco(shapes_root: Path) -> None:
    ann_file = shapes_root / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    assert {"info", "licenses", "images", "annotations", "categories"} <= set(data)
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS)
    assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES)
    assert all(c["supercategory"] for c in data["categories"])
    assert len(data["images"]) == 6
    for im in data["images"]:
        assert (im["width"], im["height"]) == (256, 256)
        assert (shapes_root / "train" / im["file_name"]).is_file()
    assert data["images"][0]["file_name"] == "000000000001.png"
    kinds = {
        (
            "polygon"
            if isinstance(a["segmentation"], list)
            else "rle"
            if isinstance(a["segmentation"]["counts"], str)
            else "urle"
        )
        for a in data["annotations"]
    }
    assert {"polygon", "rle"} <= kinds  # occluded objects are stored as compressed RLE
    n_poly = sum(isinstance(a["segmentation"], list) for a in data["annotations"])
    assert n_poly > len(data["annotations"]) / 2  # most objects are polygons
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_round_trip_through_pycocotools_and_dataset(shapes_root: Path, split: str) -> None:
    ann_file = shapes_root / "annotations" / f"instances_{split}.json"
    coco = COCO(str(ann_file))  # pycocotools reads it on its own
    ds = shapes_dataset(shapes_root, split)
    assert ds.cat_ids == sorted(CATEGORY_IDS) and ds.class_names[1:] == list(CLASS_NAMES)
    n_seen = 0
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 256, 256) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        anns = {a["id"]: a for a in coco.loadAnns(coco.getAnnIds(imgIds=[t["image_id"].item()]))}
        assert t["ann_ids"].tolist() == [a for a in anns if not anns[a]["iscrowd"]]
        union = torch.zeros(256, 256, dtype=torch.int32)
        for k, ann_id in enumerate(t["ann_ids"].tolist()):
            ann, mask, box = anns[ann_id], t["masks"][k], t["boxes"][k]
            n_seen += 1
            # labels map back to the category ids of the file
            assert ds.label_to_cat_id[t["labels"][k].item()] == ann["category_id"]
            # mask area = annotation area = pycocotools' own decode
            assert mask.sum().item() == ann["area"] == t["area"][k].item()
            np.testing.assert_array_equal(mask.numpy(), coco.annToMask(ann))
            # the annotation bbox is the tight box of the mask (pycocotools computes it here)
            rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
            assert mask_utils.toBbox(rle).tolist() == ann["bbox"]
            # the xyxy box encloses the mask's pixels [x1, x2) x [y1, y2)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box[0] == xs.min() and box[2] == xs.max() + 1
            assert box[1] == ys.min() and box[3] == ys.max() + 1
            union += mask
        # masks are visible parts: no pixel belongs to two instances
        assert union.max() <= 1
    assert n_seen >= 10


def test_area_ranges_hit_small_medium_large(shapes_root: Path) -> None:
    data = json.loads((shapes_root / "annotations" / "instances_train.json").read_text())
    areas = np.array([a["area"] for a in data["annotations"] if not a["iscrowd"]])
    assert (areas < 32**2).any()  # COCO "small"
    assert ((areas >= 32**2) & (areas < 96**2)).any()  # "medium"
    assert (areas >= 96**2).any()  # "large"


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    kw = {"train": 2, "val": 2, "size": 96, "progress": False}
    write_shapes_dataset(tmp_path / "a", seed=3, **kw)
    write_shapes_dataset(tmp_path / "b", seed=3, **kw)
    write_shapes_dataset(tmp_path / "c", seed=4, **kw)
    ha, hb, hc = (_hashes(tmp_path / d) for d in "abc")
    assert len(ha) == 2 + 2 + 2 + 1 and ha == hb  # images, annotation files, the manifest
    assert ha.keys() == hc.keys()
    assert all(ha[k] != hc[k] for k in ha)
    assert not list((tmp_path / "a").rglob("*.tmp"))  # atomic writes leave no temp files


def test_crowd_region_is_uncompressed_rle_and_kept_out_of_targets() -> None:
    image, instances = generate_image(np.random.default_rng(7), 128, crowd=True)
    assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
    crowds = [i for i in instances if i["iscrowd"]]
    assert len(crowds) == 1
    seg = crowds[0]["segmentation"]
    assert isinstance(seg["counts"], list) and seg["size"] == [128, 128]
    rle = mask_utils.frPyObjects(seg, 128, 128)
    np.testing.assert_array_equal(mask_utils.decode(rle), crowds[0]["mask"])


def test_uncompressed_rle_by_hand() -> None:
    m = np.zeros((3, 2), np.uint8)
    m[1:, 0] = 1  # column 0, rows 1-2
    m[0, 1] = 1  # column 1, row 0 -> runs: 1 zero, 3 ones, 2 zeros
    assert mask_to_rle(m, compressed=False) == {"size": [3, 2], "counts": [1, 3, 2]}
    m[0, 0] = 1  # starts with a one: an empty run of zeros first
    assert mask_to_rle(m, compressed=False) == {"size": [3, 2], "counts": [0, 4, 2]}


def test_keypoint_set(keypoint_root: Path) -> None:
    ann_file = keypoint_root / "annotations" / "person_keypoints_train.json"
    assert (keypoint_root / "annotations" / "person_keypoints_val.json").is_file()
    data = json.loads(ann_file.read_text())
    (cat,) = data["categories"]
    K = len(KEYPOINT_NAMES)
    assert cat["name"] == "person" and cat["keypoints"] == list(KEYPOINT_NAMES) and K >= 7
    # skeleton: 1-based pairs, no self-loops, a tree connecting all K keypoints
    edges = [tuple(e) for e in cat["skeleton"]]
    assert edges == [tuple(e) for e in SKELETON] and len(edges) == K - 1
    assert all(1 <= a <= K and 1 <= b <= K and a != b for a, b in edges)
    reached, frontier = {1}, [1]
    while frontier:
        n = frontier.pop()
        for a, b in edges:
            for u, v in ((a, b), (b, a)):
                if u == n and v not in reached:
                    reached.add(v)
                    frontier.append(v)
    assert reached == set(range(1, K + 1))

    ds = shapes_dataset(keypoint_root, "train")
    vis = []
    for i in range(len(ds)):
        _, t = ds[i]
        kps = t["keypoints"]
        assert kps.shape == (len(t["boxes"]), K, 3) and kps.dtype == torch.float32
        for k, ann_id in enumerate(t["ann_ids"].tolist()):
            ann = ds.coco.anns[ann_id]
            v = kps[k, :, 2]
            assert ann["num_keypoints"] == int((v > 0).sum())
            assert (kps[k, v == 0, :2] == 0).all()  # unlabelled: x = y = 0
            mask = t["masks"][k]
            for x, y, vv in kps[k][v > 0].tolist():
                assert 0 <= x < 160 and 0 <= y < 160
                # v=2 lies on the person's visible mask; v=1 was painted over by a later object
                assert mask[int(y), int(x)].item() == (1 if vv == 2 else 0)
            vis.append(v)
    values = set(torch.cat(vis).tolist())
    assert values == {0.0, 1.0, 2.0}


def test_flip_index() -> None:
    # independent reference: torchvision's / Detectron's flip order of COCO's 17 keypoints
    coco17 = [
        "nose",
        "left_eye",
        "right_eye",
        "left_ear",
        "right_ear",
        "left_shoulder",
        "right_shoulder",
        "left_elbow",
        "right_elbow",
        "left_wrist",
        "right_wrist",
        "left_hip",
        "right_hip",
        "left_knee",
        "right_knee",
        "left_ankle",
        "right_ankle",
    ]
    assert flip_index(coco17) == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert sorted(FLIP_INDEX) == list(range(len(KEYPOINT_NAMES)))
    for i, j in enumerate(FLIP_INDEX):
        a, b = KEYPOINT_NAMES[i], KEYPOINT_NAMES[j]
        assert a.replace("left_", "").replace("right_", "") == b.replace("left_", "").replace(
            "right_", ""
        )
        assert a == b or {a.split("_")[0], b.split("_")[0]} == {"left", "right"}
    assert all(FLIP_INDEX[i] == j and FLIP_INDEX[j] == i for i, j in FLIP_MAP)
    assert len(FLIP_MAP) == 4


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size must be at least 32"):
        write_shapes_dataset("/nonexistent/never-written", train=1, val=1, size=8, progress=False)
    with pytest.raises(ValueError, match="train must be a non-negative int"):
        write_shapes_dataset("/nonexistent/never-written", train=-1, progress=False)


def test_cli_make_shapes_matches_library(tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "make-shapes",
            "--out",
            str(tmp_path / "cli"),
            "--train",
            "2",
            "--val",
            "1",
            "--size",
            "64",
            "--seed",
            "5",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "instances_train.json" in capsys.readouterr().out
    write_shapes_dataset(tmp_path / "lib", train=2, val=1, size=64, seed=5, progress=False)
    assert _hashes(tmp_path / "cli") == _hashes(tmp_path / "lib")

    rc = main(
        [
            "make-shapes",
            "--out",
            str(tmp_path / "kp"),
            "--train",
            "1",
            "--val",
            "0",
            "--size",
            "64",
            "--keypoints",
            "--no-progress",
        ]
    )
    assert rc == 0 and (tmp_path / "kp" / "annotations" / "person_keypoints_train.json").is_file()
    with pytest.raises(SystemExit):
        main(["make-shapes", "--train", "-3"])


def test_dataset_browser_and_draw_sample(shapes_root: Path, keypoint_root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mrcnn_edu.widgets import dataset_browser, draw_sample

    ds = shapes_dataset(shapes_root, "val")
    fig, ax = plt.subplots()
    draw_sample(ds, 0, ax=ax)
    n_boxes = len(ds[0][1]["boxes"]) + len(ds[0][1]["crowd_boxes"])
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == n_boxes
    plt.close(fig)
    fig, ax = plt.subplots()
    draw_sample(ds, 0, show_boxes=False, show_crowd=False, ax=ax)
    assert not [p for p in ax.patches if isinstance(p, Rectangle)]
    plt.close(fig)
    with pytest.raises(IndexError, match="index 99 out of range"):
        draw_sample(ds, 99)

    kp = shapes_dataset(keypoint_root, "train")
    fig, ax = plt.subplots()
    draw_sample(kp, 0, ax=ax)  # skeleton and keypoints from the dataset's attributes
    assert ax.lines  # skeleton lines drawn
    plt.close(fig)

    browser = dataset_browser(ds)
    assert browser.children[-1] is browser.output
    slider = browser.controls["index"]
    assert slider.max == len(ds) - 1 and slider.continuous_update is False
    calls = []
    browser.controls["masks"].observe(lambda ch: calls.append(ch["new"]), names="value")
    browser.controls["masks"].value = False  # triggers a redraw; must not raise
    slider.value = len(ds) - 1
    assert calls == [False]
    assert plt.get_fignums() == []  # every redraw closes its figure


def test_existing_set_is_never_overwritten_by_accident(tmp_path: Path, capsys) -> None:
    out = tmp_path / "set"
    kw = {"val": 1, "size": 64, "progress": False}
    write_shapes_dataset(out, train=3, seed=1, **kw)
    before = _hashes(out)
    # a second set into the same folder, of either kind, is refused before anything is written
    for keypoints in (False, True):
        with pytest.raises(FileExistsError, match=r"already holds a data set .*overwrite=True"):
            write_shapes_dataset(out, train=2, seed=2, keypoints=keypoints, **kw)
    rc = main(
        [
            "make-shapes",
            "--out",
            str(out),
            "--train",
            "2",
            "--val",
            "1",
            "--size",
            "64",
            "--seed",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 2 and "already holds a data set" in capsys.readouterr().err
    assert _hashes(out) == before
    # an existing but empty folder (e.g. tempfile.mkdtemp) is fine
    (tmp_path / "empty").mkdir()
    write_shapes_dataset(tmp_path / "empty", train=1, **kw)
    # overwrite=True / --overwrite replaces the set's files
    rc = main(
        [
            "make-shapes",
            "--out",
            str(out),
            "--train",
            "3",
            "--val",
            "1",
            "--size",
            "64",
            "--seed",
            "2",
            "--no-progress",
            "--overwrite",
        ]
    )
    assert rc == 0
    write_shapes_dataset(tmp_path / "fresh", train=3, seed=2, **kw)
    assert _hashes(out) == _hashes(tmp_path / "fresh") != before
    # a plain file where the folder should be
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        write_shapes_dataset(tmp_path / "file", train=1, **kw)


# ---------------------------------------------------------------------------------------------
# All-or-nothing writes and the manifest (issue 17)
# ---------------------------------------------------------------------------------------------
def test_interrupted_swap_puts_the_old_set_back(tmp_path: Path, monkeypatch) -> None:
    """Where the OS cannot exchange two folders atomically, the swap is two renames: an
    interrupt between them puts the old set back and removes the new one."""
    from mrcnn_edu.data import shapes

    out = tmp_path / "set"
    kw = {"train": 2, "val": 1, "size": 48, "progress": False}
    write_shapes_dataset(out, seed=1, **kw)
    before = _hashes(out)
    monkeypatch.setattr(shapes, "_exchange", lambda a, b: False)
    real_rename, calls = shapes.os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old set moved away, new set not yet in: Ctrl-C here
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(shapes.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        write_shapes_dataset(out, seed=2, overwrite=True, **kw)
    assert _hashes(out) == before and not list(tmp_path.glob(".set*"))
    monkeypatch.setattr(shapes.os, "rename", real_rename)
    write_shapes_dataset(out, seed=2, overwrite=True, **kw)  # the fallback path works
    write_shapes_dataset(tmp_path / "fresh", seed=2, **kw)
    assert _hashes(out) == _hashes(tmp_path / "fresh") and not list(tmp_path.glob(".set*"))


def test_killed_write_leaves_the_old_set_and_its_staging_is_cleaned_later(tmp_path: Path) -> None:
    out = tmp_path / "set"
    kw = {"train": 2, "val": 0, "size": 48, "progress": False}
    write_shapes_dataset(out, seed=1, **kw)
    # what `kill -9` during a write leaves: a staging folder whose process is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / ".set.writing-abc123"
    (stale / "train").mkdir(parents=True)
    (stale / ".pid").write_text(str(dead.pid))
    live = tmp_path / ".set.writing-live"  # another writer still at work
    live.mkdir()
    (live / ".pid").write_text(str(os.getpid()))
    assert len(shapes_dataset(out, "train")) == 2  # readers never look at staging
    write_shapes_dataset(out, seed=2, overwrite=True, **kw)
    assert not stale.exists() and live.exists()


def test_manifest_and_info_record_the_set(tmp_path: Path) -> None:
    from mrcnn_edu import __version__
    from mrcnn_edu.data.shapes import MANIFEST_NAME

    write_shapes_dataset(tmp_path, train=3, val=2, size=48, seed=7, progress=False)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert (manifest["seed"], manifest["size"], manifest["kind"]) == (7, 48, "detection")
    assert manifest["mrcnn_edu_version"] == __version__
    for split, n in (("train", 3), ("val", 2)):
        entry = manifest["splits"][split]
        data = json.loads((tmp_path / entry["annotation_file"]).read_text())
        assert data["info"]["mrcnn_edu"] == {
            "kind": "detection",
            "split": split,
            "seed": 7,
            "size": 48,
            "num_images": n,
            "num_annotations": len(data["annotations"]),
            "mrcnn_edu_version": __version__,
        }
        assert data["info"]["date_created"] == "seed=7 size=48"  # kept for old readers
        assert entry["num_images"] == n and sorted(entry["images"]) == sorted(
            im["file_name"] for im in data["images"]
        )
        for name, (nbytes, sha) in entry["images"].items():
            blob = (tmp_path / split / name).read_bytes()
            assert len(blob) == nbytes and hashlib.sha256(blob).hexdigest() == sha


def test_loader_detects_a_set_that_is_not_one_write(tmp_path: Path) -> None:
    from mrcnn_edu.data import CocoFormatError
    from mrcnn_edu.data.shapes import MANIFEST_NAME

    kw = {"train": 3, "val": 0, "size": 48, "progress": False}
    write_shapes_dataset(tmp_path / "a", seed=1, **kw)
    write_shapes_dataset(tmp_path / "b", seed=2, **kw)
    a, b = tmp_path / "a", tmp_path / "b"
    # an orphan image (what an old smaller overwrite left)
    (a / "train" / "000000000009.png").write_bytes((b / "train" / "000000000001.png").read_bytes())
    with pytest.raises(
        CocoFormatError,
        match=r"not the ones instances_train\.json lists .*"
        r"0 missing .*1 extra .*000000000009\.png",
    ):
        shapes_dataset(a, "train")
    (a / "train" / "000000000009.png").unlink()
    # the other write's annotation file
    ann = a / "annotations" / "instances_train.json"
    good = ann.read_bytes()
    ann.write_bytes((b / "annotations" / "instances_train.json").read_bytes())
    with pytest.raises(
        CocoFormatError,
        match="not the annotation file the manifest shapes_manifest.json records for .train.",
    ):
        shapes_dataset(a, "train")
    ann.write_bytes(good)
    # a missing manifest in a set that had one
    (a / MANIFEST_NAME).rename(tmp_path / "m.json")
    with pytest.raises(CocoFormatError, match="shapes_manifest.json is missing"):
        shapes_dataset(a, "train")
    (tmp_path / "m.json").rename(a / MANIFEST_NAME)
    assert len(shapes_dataset(a, "train", verify="full")) == 3
    with pytest.raises(ValueError, match="verify must be"):
        shapes_dataset(a, "train", verify="yes")

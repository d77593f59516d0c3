"""CocoDetection against a small hand-written COCO file (masks and areas computed by hand), and
every kind of bad input it must report clearly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn_edu.data import CocoDetection, CocoFormatError, coco2017, shapes_dataset

# pycocotools (numpy 2) warns inside mask.decode about the __array__ copy keyword: not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 5, 6  # image 1 is 6 px wide, 5 px high

# --- hand-computed masks ---------------------------------------------------------------------
# polygon: rectangle with corners (1, 1) and (4, 3) covers pixel columns 1..3 and rows 1..2
POLY_MASK = np.zeros((H, W), np.uint8)
POLY_MASK[1:3, 1:4] = 1
# uncompressed RLE, column-major runs [7 zeros, 3 ones, 20 zeros]: the 7 zeros fill column 0
# (5 px) and rows 0-1 of column 1, so the ones are rows 2-4 of column 1
URLE_MASK = np.zeros((H, W), np.uint8)
URLE_MASK[2:5, 1] = 1
# compressed RLE: an L shape in the right part of the image
CRLE_MASK = np.zeros((H, W), np.uint8)
CRLE_MASK[0:4, 5] = 1
CRLE_MASK[3, 4] = 1
# crowd region (uncompressed RLE): column 0 rows 3-4 -> runs [3 zeros, 2 ones, 25 zeros]
CROWD_MASK = np.zeros((H, W), np.uint8)
CROWD_MASK[3:5, 0] = 1


def _crle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _coco_dict() -> dict:
    return {
        "info": {"description": "hand-written test file"},
        "licenses": [],
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},  # no annotations
            {"id": 3, "file_name": "c.png", "width": W, "height": H},  # only a crowd
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 0,
                "area": 6.0,
                "bbox": [1, 1, 3, 2],
                "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 2,
                "iscrowd": 0,
                "area": 3.0,
                "bbox": [1, 2, 1, 3],
                "segmentation": {"size": [H, W], "counts": [7, 3, 20]},
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 0,
                "area": 5.0,
                "bbox": [4, 0, 2, 4],
                "segmentation": _crle(CRLE_MASK),
            },
            {
                "id": 13,
                "image_id": 1,
                "category_id": 2,
                "iscrowd": 1,
                "area": 2.0,
                "bbox": [0, 3, 1, 2],
                "segmentation": {"size": [H, W], "counts": [3, 2, 25]},
            },
            {
                "id": 14,
                "image_id": 1,
                "category_id": 2,
                "iscrowd": 0,
                "area": 0.0,
                "bbox": [2, 2, 0, 3],
                "segmentation": [[2, 2, 2, 2, 2, 5]],
            },  # zero-width box
            {
                "id": 15,
                "image_id": 3,
                "category_id": 2,
                "iscrowd": 1,
                "area": 2.0,
                "bbox": [0, 3, 1, 2],
                "segmentation": {"size": [H, W], "counts": [3, 2, 25]},
            },
        ],
        # ids deliberately non-contiguous and out of order: labels must follow sorted ids
        "categories": [
            {"id": 7, "name": "kite", "supercategory": "thing"},
            {"id": 2, "name": "ball", "supercategory": "thing"},
        ],
    }


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


@pytest.fixture()
def coco_dir(tmp_path: Path) -> Path:
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        Image.fromarray(_image(seed)).save(tmp_path / name)
    (tmp_path / "ann.json").write_text(json.dumps(_coco_dict()))
    return tmp_path


def _dataset(d: Path, **kw) -> CocoDetection:
    with pytest.warns(UserWarning, match=r"1 annotation\(s\) have a box of zero area"):
        return CocoDetection(d, d / "ann.json", **kw)


def test_hand_written_file_targets(coco_dir: Path) -> None:
    ds = _dataset(coco_dir)
    assert ds.cat_ids == [2, 7]
    assert ds.cat_id_to_label == {2: 1, 7: 2} and ds.label_to_cat_id == {1: 2, 2: 7}
    assert ds.class_names == ["__background__", "ball", "kite"]
    assert ds.ids == [1, 2, 3] and len(ds) == 3
    assert ds.num_dropped_boxes == 1

    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), _image(0) / 255.0, atol=1e-6)
    assert t["image_id"].item() == 1 and t["image_id"].dtype == torch.int64
    # ann 14 (zero-area box) dropped, crowd ann 13 kept out of the training targets
    assert t["ann_ids"].tolist() == [10, 11, 12]
    assert t["labels"].tolist() == [2, 1, 2] and t["labels"].dtype == torch.int64
    expected_boxes = torch.tensor([[1, 1, 4, 3], [1, 2, 2, 5], [4, 0, 6, 4]], dtype=torch.float32)
    torch.testing.assert_close(t["boxes"], expected_boxes)
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (3, H, W)
    for got, want in zip(t["masks"], [POLY_MASK, URLE_MASK, CRLE_MASK]):
        np.testing.assert_array_equal(got.numpy(), want)
    assert t["area"].tolist() == [6.0, 3.0, 5.0]
    assert t["area"].tolist() == [float(m.sum()) for m in (POLY_MASK, URLE_MASK, CRLE_MASK)]
    assert t["iscrowd"].tolist() == [0, 0, 0]
    # the crowd region is returned for evaluation, separately
    torch.testing.assert_close(t["crowd_boxes"], torch.tensor([[0.0, 3.0, 1.0, 5.0]]))
    np.testing.assert_array_equal(t["crowd_masks"][0].numpy(), CROWD_MASK)
    assert "keypoints" not in t

    _, t2 = ds[1]  # an image without annotations gives empty, well-shaped targets
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)
    assert t2["masks"].shape == (0, H, W) and t2["crowd_boxes"].shape == (0, 4)


def test_skip_empty_load_masks_and_transforms(coco_dir: Path) -> None:
    calls = []

    def flip(image, target):
        calls.append(target["image_id"].item())
        return image.flip(-1), target

    ds = _dataset(coco_dir, skip_empty=True, load_masks=False, transforms=flip)
    assert ds.ids == [1]  # image 2 has nothing, image 3 only a crowd
    image, t = ds[0]
    assert calls == [1]
    np.testing.assert_allclose(
        image.permute(1, 2, 0).numpy(), _image(0)[:, ::-1] / 255.0, atol=1e-6
    )
    assert "masks" not in t and "crowd_masks" not in t
    assert t["boxes"].shape == (3, 4)


def test_keypoints_are_returned(tmp_path: Path) -> None:
    Image.fromarray(_image(0)).save(tmp_path / "a.png")
    data = {
        "images": [{"id": 5, "file_name": "a.png", "width": W, "height": H}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 1,
                "iscrowd": 0,
                "area": 6.0,
                "bbox": [1, 1, 3, 2],
                "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
                "keypoints": [1.5, 1.5, 2, 0, 0, 0, 3.5, 2.5, 1],
                "num_keypoints": 2,
            }
        ],
        "categories": [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": ["head", "left_hand", "right_hand"],
                "skeleton": [[1, 2], [1, 3]],
            }
        ],
    }
    (tmp_path / "kp.json").write_text(json.dumps(data))
    ds = CocoDetection(tmp_path, tmp_path / "kp.json")
    assert ds.keypoint_names == ["head", "left_hand", "right_hand"]
    assert ds.skeleton == [(1, 2), (1, 3)]
    _, t = ds[0]
    assert t["keypoints"].dtype == torch.float32 and t["keypoints"].shape == (1, 3, 3)
    torch.testing.assert_close(
        t["keypoints"][0], torch.tensor([[1.5, 1.5, 2.0], [0.0, 0.0, 0.0], [3.5, 2.5, 1.0]])
    )


# --- bad input --------------------------------------------------------------------------------


def _write(d: Path, data) -> Path:
    p = d / "ann.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nope\.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_missing_image_folder(tmp_path: Path) -> None:
    ann = _write(tmp_path, _coco_dict())
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*nofolder"):
        CocoDetection(tmp_path / "nofolder", ann)


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    ann = _write(tmp_path, '{"images": [],\n "annotations": [,]}')
    with pytest.raises(CocoFormatError, match=r"ann\.json: malformed JSON at line 2, column 18"):
        CocoDetection(tmp_path, ann)


def test_missing_top_level_field(tmp_path: Path) -> None:
    data = _coco_dict()
    del data["categories"]
    with pytest.raises(CocoFormatError, match=r"ann\.json: missing required field 'categories'"):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_missing_annotation_field(tmp_path: Path) -> None:
    data = _coco_dict()
    del data["annotations"][1]["bbox"]
    with pytest.raises(
        CocoFormatError, match=r"annotations\[1\] \(id 11\) is missing required field\(s\) 'bbox'"
    ):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_missing_image_field(tmp_path: Path) -> None:
    data = _coco_dict()
    del data["images"][0]["height"]
    with pytest.raises(CocoFormatError, match=r"images\[0\] \(id 1\) .*'height'"):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_unknown_category_id(tmp_path: Path) -> None:
    data = _coco_dict()
    data["annotations"][2]["category_id"] = 99
    with pytest.raises(
        CocoFormatError, match=r"annotation id 12 has category_id 99, which is not in 'categories'"
    ):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_unknown_image_id(tmp_path: Path) -> None:
    data = _coco_dict()
    data["annotations"][0]["image_id"] = 42
    with pytest.raises(CocoFormatError, match=r"annotation id 10 has image_id 42"):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_polygon_with_fewer_than_three_points(tmp_path: Path) -> None:
    data = _coco_dict()
    data["annotations"][0]["segmentation"] = [[1, 1, 4, 1]]
    with pytest.raises(
        CocoFormatError,
        match=r"annotation id 10 \(image id 1\): polygon 0 has 4 coordinates.*"
        r"at least 3 points",
    ):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_repeated_id_and_non_object_entry(tmp_path: Path) -> None:
    data = _coco_dict()
    data["images"][1]["id"] = 1  # pycocotools would silently keep only one of them
    with pytest.raises(CocoFormatError, match=r"images\[1\] repeats id 1"):
        CocoDetection(tmp_path, _write(tmp_path, data))
    data = _coco_dict()
    data["annotations"][3]["id"] = 10
    with pytest.raises(CocoFormatError, match=r"annotations\[3\] repeats id 10"):
        CocoDetection(tmp_path, _write(tmp_path, data))
    data = _coco_dict()
    data["annotations"].append(17)
    with pytest.raises(CocoFormatError, match=r"annotations\[6\] must be a JSON object, got int"):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_keypoint_count_checked_when_built(tmp_path: Path) -> None:
    data = {
        "images": [{"id": 5, "file_name": "a.png", "width": W, "height": H}],
        "annotations": [
            {
                "id": 1,
                "image_id": 5,
                "category_id": 1,
                "bbox": [1, 1, 3, 2],
                "keypoints": [1.5, 1.5, 2, 0, 0, 0],
            }
        ],  # 2 keypoints of 3
        "categories": [{"id": 1, "name": "person", "keypoints": ["head", "left", "right"]}],
    }
    with pytest.raises(CocoFormatError, match=r"annotation id 1 has 6 keypoint numbers.*3 x 3 = 9"):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_bad_bbox(tmp_path: Path) -> None:
    data = _coco_dict()
    data["annotations"][0]["bbox"] = [1, 1, 3]
    with pytest.raises(CocoFormatError, match=r"annotation id 10: 'bbox' must be \[x, y, width"):
        CocoDetection(tmp_path, _write(tmp_path, data))


def test_missing_image_file_names_file_and_id(coco_dir: Path) -> None:
    (coco_dir / "b.png").unlink()
    ds = _dataset(coco_dir)
    ds[0]  # image 1 is still there
    with pytest.raises(FileNotFoundError, match=r"image file .*b\.png \(image id 2\) not found"):
        ds[1]


def test_image_size_mismatch(coco_dir: Path) -> None:
    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(coco_dir / "a.png")
    ds = _dataset(coco_dir)
    with pytest.raises(CocoFormatError, match=r"a\.png \(image id 1\) is 6x6 .* says 6x5"):
        ds[0]


def test_coco2017_layout_errors_list_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"missing: .*val2017, .*instances_val2017\.json.*data/README\.md"
    ):
        coco2017(tmp_path)
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing: [^,]*person_keypoints_val2017\.json"):
        coco2017(tmp_path, keypoints=True)


def test_coco2017_layout_loads(tmp_path: Path) -> None:
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(_image(0)).save(tmp_path / "val2017" / "a.png")
    data = _coco_dict()
    data["images"] = data["images"][:1]
    data["annotations"] = data["annotations"][:3]
    _write(tmp_path / "annotations", data).rename(
        tmp_path / "annotations" / "instances_val2017.json"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero-area boxes here: no warning
        ds = coco2017(tmp_path)
    assert ds.ids == [1] and ds[0][1]["labels"].tolist() == [2, 1, 2]


def test_shapes_dataset_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no shapes set under .*make-shapes --out"):
        shapes_dataset(tmp_path, "val")


def test_rle_string_counts_equal_pycocotools() -> None:
    """The compressed-RLE reader used by the build-time checks decodes pycocotools' strings to
    the run lengths pycocotools itself uses (random masks, empty and full ones included)."""
    from mrcnn_edu.data.coco import rle_string_counts

    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if t % 7 == 0:
            mask[:] = t % 2
        rle = mask_utils.encode(np.asfortranarray(mask))
        runs = rle_string_counts(rle["counts"].decode("ascii"))
        assert sum(runs) == h * w
        flat = mask.reshape(-1, order="F")  # column-major, as COCO
        pos, value = 0, 0
        for r in runs:  # runs alternate 0s and 1s
            assert (flat[pos : pos + r] == value).all()
            pos, value = pos + r, 1 - value

"""Adversarial input (issue 17): every case must give a clear error or the correct answer.

Grouped as the issue groups them: data lost or corrupted, crashes and runaway memory, silent
wrong answers, pass-through errors. Each case names the exact message it expects (file,
annotation id, image id, field), and the obvious neighbours of each case (other non-finite
values, other fields, other images) are tried with it. torchvision-operator parity (float16 /
bfloat16, integer and batched boxes) lives in test_roi_ops.py and test_box_ops.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn_edu.anchors import AnchorGenerator
from mrcnn_edu.data import CocoDetection, CocoFormatError, shapes_dataset, write_shapes_dataset
from mrcnn_edu.data.shapes import MANIFEST_NAME, mask_to_rle
from mrcnn_edu.matching import Matcher
from mrcnn_edu.ops import box_iou, roi_align, roi_pool
from mrcnn_edu.ops.roi import MAX_SAMPLES_PER_ROI
from mrcnn_edu.transforms import Normalize, Resize, batch_images
from mrcnn_edu.utils import atomic_write

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MRCNN_EDU = Path(sys.executable).parent / "mrcnn-edu"  # the console script of this venv
H, W = 6, 8  # the hand-made COCO image


def _hashes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# Data lost or corrupted
# ---------------------------------------------------------------------------------------------
def test_interrupted_overwrite_leaves_the_old_set_whole(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) to `mrcnn-edu make-shapes --overwrite` while the new set is half
    written: the folder still holds the old set, byte for byte, and it loads and verifies."""
    out = tmp_path / "set"
    write_shapes_dataset(out, train=12, val=3, size=64, seed=1, progress=False)
    before = _hashes(out)
    proc = subprocess.Popen(
        [
            str(MRCNN_EDU),
            "make-shapes",
            "--out",
            str(out),
            "--train",
            "2000",
            "--val",
            "100",
            "--size",
            "64",
            "--seed",
            "2",
            "--overwrite",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C's default action even when this suite runs as a background job (`make test &`),
        # whose children a non-interactive shell starts with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline, staged = time.monotonic() + 120, []
        while time.monotonic() < deadline and proc.poll() is None and len(staged) < 30:
            staged = list(tmp_path.glob(".set.writing-*/train/*.png"))
            time.sleep(0.02)
        assert proc.poll() is None and len(staged) >= 30, "the new set was not half written"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert _hashes(out) == before  # the old set, untouched
    assert not list(tmp_path.glob(".set*"))  # the staging folder is gone
    for split in ("train", "val"):
        ds = shapes_dataset(out, split, verify="full")
        assert len(ds) == {"train": 12, "val": 3}[split]
        assert ds.coco.dataset["info"]["mrcnn_edu"]["seed"] == 1


def test_overwrite_with_a_smaller_set_leaves_no_orphans(tmp_path: Path) -> None:
    kw = {"val": 2, "size": 64, "progress": False}
    write_shapes_dataset(tmp_path / "set", train=9, seed=1, **kw)
    write_shapes_dataset(tmp_path / "set", train=3, seed=2, overwrite=True, **kw)
    write_shapes_dataset(tmp_path / "fresh", train=3, seed=2, **kw)
    assert _hashes(tmp_path / "set") == _hashes(tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "set" / "train").iterdir()) == [
        f"{i:012d}.png" for i in (1, 2, 3)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "set"]  # nothing left over


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_keep_normal_permissions(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "new.bin", lambda f: f.write(b"x"))
        (tmp_path / "kept.bin").write_bytes(b"old")
        os.chmod(tmp_path / "kept.bin", 0o640)
        atomic_write(tmp_path / "kept.bin", lambda f: f.write(b"new"))
        write_shapes_dataset(tmp_path / "set", train=1, val=0, size=32, progress=False)
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return p.stat().st_mode & 0o777

    assert mode(tmp_path / "new.bin") == 0o666 & ~umask  # what open() would give
    assert mode(tmp_path / "kept.bin") == 0o640  # an existing file keeps its mode
    assert (tmp_path / "kept.bin").read_bytes() == b"new"
    root = tmp_path / "set"
    assert mode(root) == mode(root / "train") == 0o777 & ~umask  # not mkdtemp's 0700
    for p in [
        root / MANIFEST_NAME,
        root / "train" / "000000000001.png",
        root / "annotations" / "instances_train.json",
    ]:
        assert mode(p) == 0o666 & ~umask, p


def test_other_files_in_the_output_folder_are_never_deleted(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"not part of a shapes set .*notes\.txt"):
            write_shapes_dataset(out, train=1, val=0, size=32, progress=False, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".set*"))


# ---------------------------------------------------------------------------------------------
# Crashes and runaway memory: caught when the data set is built, naming file and annotation
# ---------------------------------------------------------------------------------------------
def _coco(tmp_path: Path, ann: dict | None = None, image: dict | None = None) -> Path:
    """One 8 x 6 image with one polygon annotation (id 5), updated by ``ann`` / ``image``."""
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(tmp_path / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H, **(image or {})}],
        "annotations": [
            {
                "id": 5,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": 6.0,
                "bbox": [1, 1, 3, 2],
                "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]],
                **(ann or {}),
            }
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))  # NaN / Infinity as JSON allows
    return tmp_path / "ann.json"


BAD = [float("nan"), float("inf"), float("-inf"), 1e12, -1e12, 3 * W + 1]


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("position", [0, 3])  # an x and a y
def test_polygon_coordinates_must_be_finite_and_near_the_image(tmp_path, value, position):
    poly = [1, 1, 4, 1, 4, 3, 1, 3]
    poly[position] = value
    ann_file = _coco(tmp_path, ann={"segmentation": [poly]})
    with pytest.raises(
        CocoFormatError,
        match=rf"ann\.json: annotation id 5 \(image id 1\): "
        rf"polygon 0 coordinate {position}",
    ):
        CocoDetection(tmp_path, ann_file)


def test_polygon_edge_of_the_allowed_range_is_fine(tmp_path: Path) -> None:
    # within the image +- its size: a polygon that sticks out of the frame is real data
    ann_file = _coco(tmp_path, ann={"segmentation": [[-W, -H, 2 * W, 1, 4, 2 * H]]})
    _, target = CocoDetection(tmp_path, ann_file)[0]
    assert target["masks"].shape == (1, H, W)


@pytest.mark.parametrize("value", ["1", True, None, [1]])
def test_polygon_coordinates_must_be_numbers(tmp_path: Path, value) -> None:
    ann_file = _coco(tmp_path, ann={"segmentation": [[1, 1, 4, value, 4, 3]]})
    with pytest.raises(CocoFormatError, match="polygon 0 coordinate 3 is .*finite numbers"):
        CocoDetection(tmp_path, ann_file)


@pytest.mark.parametrize(
    "counts,total", [([10, 5], 15), ([10, 5, 40], 55), ([0, H * W + 1], H * W + 1)]
)
def test_rle_runs_must_cover_the_image_exactly(tmp_path: Path, counts, total) -> None:
    """pycocotools would decode uninitialised memory (a different mask on every run)."""
    for compressed in (False, True):
        if compressed:  # the same runs as pycocotools' compressed string
            from pycocotools import _mask

            n = sum(counts)
            rle = _mask.frUncompressedRLE([{"size": [1, n], "counts": counts}], 1, n)[0]
            counts_field = rle["counts"].decode("ascii")
        else:
            counts_field = counts
        ann_file = _coco(
            tmp_path, ann={"segmentation": {"size": [H, W], "counts": counts_field}, "iscrowd": 1}
        )
        # checked where the mask is decoded (engine.check_data reports it for the whole set)
        ds = CocoDetection(tmp_path, ann_file)
        with pytest.raises(
            CocoFormatError,
            match=rf"ann\.json: annotation id 5 \(image id 1\): "
            rf"RLE run lengths add up to {total} pixels "
            rf"but .* {H} x {W} = {H * W}",
        ):
            ds[0]
        assert len(CocoDetection(tmp_path, ann_file, load_masks=False)[0][1]["crowd_boxes"]) == 1


@pytest.mark.parametrize("size", [[H, W + 1], [W, H], [H], "6x8", [H, 8.0]])
def test_rle_size_must_be_the_images(tmp_path: Path, size) -> None:
    rle = mask_to_rle(np.zeros((H, W), np.uint8), compressed=False)
    ds = CocoDetection(tmp_path, _coco(tmp_path, ann={"segmentation": {**rle, "size": size}}))
    with pytest.raises(
        CocoFormatError,
        match=r"ann\.json: annotation id 5 \(image id 1\): RLE "
        r"'size' .* must be the image's \[height, width\] "
        rf"= \[{H}, {W}\]",
    ):
        ds[0]


@pytest.mark.parametrize(
    "counts,why",
    [
        ("\x01\x02garbage", "not an RLE character"),
        ("0o", "ends in the middle of a value"),
        ("@", "negative length"),
        ([3, -1, 50], "non-negative ints"),
        ([3.5, 44.5], "non-negative"),
        (12, "must be a list of run lengths or a compressed string"),
    ],
)
def test_garbage_rle_counts(tmp_path: Path, counts, why) -> None:
    ds = CocoDetection(
        tmp_path, _coco(tmp_path, ann={"segmentation": {"size": [H, W], "counts": counts}})
    )
    with pytest.raises(
        CocoFormatError,
        match=rf"ann\.json: annotation id 5 \(image id 1\): "
        rf".*{why}",
    ):
        ds[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_box_is_dropped_and_counted(tmp_path: Path, value) -> None:
    """Like a zero-area box: never a training target, counted in one warning (and named by
    engine.check_data); the sample still loads."""
    for i in range(4):
        box = [1, 1, 3, 2]
        box[i] = value
        with pytest.warns(
            UserWarning,
            match=r"1 annotation\(s\) have a box of zero area .* or "
            "a NaN / infinite coordinate and are dropped",
        ):
            ds = CocoDetection(tmp_path, _coco(tmp_path, ann={"bbox": box}))
        _, target = ds[0]
        assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bbox", [1, "1", 3, 2], "'bbox' must be"),
        ("bbox", [1, 1, 3], "'bbox' must be"),
        ("area", float("nan"), "'area' must be a finite number"),
        ("area", "6", "'area' must be a finite number"),
        ("iscrowd", 2, "'iscrowd' must be 0 or 1"),
    ],
)
def test_other_annotation_fields(tmp_path: Path, field, value, match) -> None:
    with pytest.raises(CocoFormatError, match=rf"ann\.json: annotation id 5: {match}"):
        CocoDetection(tmp_path, _coco(tmp_path, ann={field: value}))


@pytest.mark.parametrize(
    "kps,match",
    [
        (["1", "2", "2"] * 2, r"keypoints\[0\] = '1': must be a finite number"),
        ([1, 2, 2, float("nan"), 1, 1], r"keypoints\[3\] = nan: must be a finite number"),
        ([1, 2, 2, 3, 1, 7], r"keypoints\[5\] = 7: visibility v must be 0, 1 or 2"),
    ],
)
def test_keypoints_must_be_numbers(tmp_path: Path, kps, match) -> None:
    ann_file = _coco(tmp_path, ann={"keypoints": kps})
    data = json.loads(ann_file.read_text())
    data["categories"][0]["keypoints"] = ["a", "b"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=rf"annotation id 5: {match}"):
        CocoDetection(tmp_path, ann_file)


@pytest.mark.parametrize(
    "image,match",
    [
        ({"width": 10**9}, r"image id 1: 'width' must be an int in 1\.\.65535, got 1000000000"),
        ({"height": 0}, "'height' must be an int"),
        ({"height": 6.0}, "'height' must be an int"),
        ({"file_name": "../../etc/passwd"}, "would read outside the image folder"),
        ({"file_name": "/etc/passwd"}, "would read outside the image folder"),
        ({"file_name": "sub/../../a.png"}, "would read outside the image folder"),
        ({"file_name": "C:\\\\x.png"}, "would read outside the image folder"),
        ({"file_name": ""}, "'file_name' must be a non-empty string"),
        ({"file_name": 7}, "'file_name' must be a non-empty string"),
    ],
)
def test_image_entries(tmp_path: Path, image, match) -> None:
    with pytest.raises(
        CocoFormatError, match=rf"ann\.json: {match}" if "image id" in match else match
    ):
        CocoDetection(tmp_path, _coco(tmp_path, image=image))


def test_make_shapes_arguments_are_bounded(tmp_path: Path, capsys) -> None:
    from mrcnn_edu.cli import main

    # the case, as a user runs it: a one-line usage error, no MemoryError traceback
    r = subprocess.run(
        [str(MRCNN_EDU), "make-shapes", "--out", str(tmp_path / "x"), "--size", "60000"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --size: must be between 32 and 4096, got 60000" in r.stderr
    for args, match in (
        (["--size", "8"], "--size: must be between 32 and 4096"),
        (["--train", "-1"], "--train: must be between 0 and"),
        (["--seed", "-5"], "--seed: must be between 0 and"),
        (["--val", "1e9"], "--val: invalid int value"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["make-shapes", "--out", str(tmp_path / "x"), *args])
        assert exit_info.value.code == 2 and match in capsys.readouterr().err, args
    assert not (tmp_path / "x").exists()
    for kw, match in (
        ({"size": 60000}, "size must be at most 4096"),
        ({"train": 10**7}, "train must be at most"),
        ({"seed": -1}, "seed must be a non-negative int"),
    ):
        with pytest.raises(ValueError, match=match):
            write_shapes_dataset(tmp_path / "y", progress=False, **kw)


@pytest.mark.parametrize("backend", ["reference", "numba", "cuda", "torchvision"])
def test_roi_align_refuses_a_runaway_sampling_grid(backend: str) -> None:
    """A huge spatial_scale with adaptive sampling asked the reference for terabytes (and the
    kernels for days of loops): refused before any backend runs, naming the RoI and grid."""
    x = torch.zeros(1, 2, 8, 8)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0], [0.0, 1.0, 1.0, 6.0, 7.0]])
    start = time.monotonic()
    with pytest.raises(
        ValueError,
        match=r"roi_align: rois\[1\] = .* at spatial_scale=1000000\.0 "
        r"spans 6e\+06 x 5e\+06 \(height x width\).*adaptive.*"
        rf"at most {MAX_SAMPLES_PER_ROI} are allowed",
    ):
        roi_align(x, rois, 7, spatial_scale=1e6, backend=backend)
    with pytest.raises(ValueError, match="sampling_ratio=5000 asks for 5000 x 5000"):
        roi_align(x, rois, 7, sampling_ratio=5000, backend=backend)
    with pytest.raises(
        ValueError,
        match=r"rois\[1\] .* times spatial_scale=1e\+38 overflows "
        "torch.float32",
    ):
        roi_pool(x, rois, 7, spatial_scale=1e38, backend=backend)
    assert time.monotonic() - start < 5
    # a full-size case below the bound still runs: 1333 x 800 image RoI at stride 4, adaptive
    big = torch.tensor([[0.0, 0.0, 0.0, 1333.0, 800.0]])
    assert roi_align(torch.zeros(1, 1, 200, 334), big, 7, 0.25, backend="reference").shape == (
        1,
        1,
        7,
        7,
    )


# ---------------------------------------------------------------------------------------------
# Silent wrong answers
# ---------------------------------------------------------------------------------------------
def test_gt_that_overlaps_no_anchor_never_becomes_a_target() -> None:
    anchors = AnchorGenerator(sizes=((16,),), aspect_ratios=((1.0,),))((32, 32), [(4, 4)])
    gt = torch.tensor(
        [
            [0.0, 0.0, 16.0, 16.0],  # a real object
            [100.0, 100.0, 120.0, 120.0],  # outside the image
            [5.0, 5.0, 5.0, 20.0],
        ]
    )  # zero width
    matched = Matcher(0.7, 0.3, allow_low_quality_matches=True)(box_iou(gt, anchors))
    assert set(matched.tolist()) <= {0, -1, -2}  # gts 1 and 2 claim nothing
    assert (matched == 0).sum() >= 1


def test_matcher_refuses_nan() -> None:
    iou = box_iou(
        torch.tensor([[3.0, 3.0, 3.0, 3.0]]),
        torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 4.0, 4.0]]),
    )
    assert torch.isnan(iou[0, 0])  # two zero-area boxes: 0 / 0
    for low_quality in (False, True):
        with pytest.raises(
            ValueError,
            match=r"Matcher: .* holds NaN \(first at gt 0, "
            r"prediction 0\)",
        ):
            Matcher(0.7, 0.3, low_quality)(iou)


def _save(tmp_path: Path, arr: np.ndarray, name: str) -> Path:
    Image.fromarray(arr).save(tmp_path / name)
    data = json.loads(_coco(tmp_path).read_text())
    data["images"][0].update(file_name=name, width=arr.shape[1], height=arr.shape[0])
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json"


def test_16_bit_and_float_images_load_by_their_real_range(tmp_path: Path) -> None:
    g16 = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 1300  # 0 .. 61100
    image = CocoDetection(tmp_path, _save(tmp_path, g16, "g16.png")).load_image(1)
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    want = torch.from_numpy(g16.astype(np.float32) / 65535)
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.equal(image, want.expand(3, H, W))  # not all 1.0
    f = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    image = CocoDetection(tmp_path, _save(tmp_path, f, "f.tiff")).load_image(1)
    assert torch.equal(image, torch.from_numpy(f).expand(3, H, W))  # not all 0
    i32 = g16.astype(np.int32)  # 16-bit data as mode I
    image = CocoDetection(tmp_path, _save(tmp_path, i32, "i.tiff")).load_image(1)
    assert torch.equal(image, want.expand(3, H, W))


@pytest.mark.parametrize(
    "arr,match",
    [
        (
            np.full((H, W), 2.5, np.float32),
            r"float image \(Pillow mode 'F'\) with values 2\.5\.\.2\.5",
        ),
        (np.full((H, W), np.nan, np.float32), "and NaN/inf"),
        (np.full((H, W), 70000, np.int32), r"32-bit integer image .* 70000\.\.70000"),
        (np.full((H, W), -3, np.int32), "outside the 16-bit range"),
    ],
)
def test_images_out_of_their_range_are_refused(tmp_path: Path, arr, match) -> None:
    ds = CocoDetection(tmp_path, _save(tmp_path, arr, "x.tiff"))
    with pytest.raises(CocoFormatError, match=rf"x\.tiff \(image id 1\) .*{match}"):
        ds[0]


def test_truncated_or_corrupt_image_names_file_and_id(tmp_path: Path) -> None:
    ann_file = _coco(tmp_path)
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])  # truncated
    ds = CocoDetection(tmp_path, ann_file)
    with pytest.raises(OSError, match=r"a\.png \(image id 1\) cannot be read: .*truncated"):
        ds[0]
    (tmp_path / "a.png").write_bytes(b"not an image at all")  # garbage
    with pytest.raises(
        OSError,
        match=r"a\.png \(image id 1\) cannot be read: "
        "UnidentifiedImageError",
    ):
        ds[0]
    Image.fromarray(rgb).save(tmp_path / "a.png")  # repaired: loads
    assert torch.equal(ds[0][0], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("backend", ["reference", "numba", "cuda", "torchvision"])
@pytest.mark.parametrize("aligned", ["no", "False", 0, 1, None, torch.tensor(True)])
def test_aligned_must_be_a_bool(backend, aligned) -> None:
    x, rois = torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])
    with pytest.raises(TypeError, match=r"roi_align: aligned must be a bool .*got "):
        roi_align(x, rois, 2, aligned=aligned, backend=backend)
    assert roi_align(x, rois, 2, aligned=np.bool_(True), backend=backend).shape == (1, 1, 2, 2)


def test_huge_equal_boxes_have_iou_one() -> None:
    boxes = torch.tensor([[0.0, 0.0, 1e20, 1e20], [-3e38, -3e38, 3e38, 3e38]])
    for backend in ("reference", "numba", "cuda", "torchvision"):
        assert torch.equal(torch.diagonal(box_iou(boxes, boxes, backend=backend)), torch.ones(2)), (
            backend
        )


def test_uint8_image_where_floats_are_expected() -> None:
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    for call, who in (
        (lambda: batch_images([image]), r"batch_images \(image 0\)"),
        (lambda: Normalize()(image), "Normalize"),
        (lambda: Resize(8, 16)(image, None), "Resize"),
    ):
        with pytest.raises(
            TypeError,
            match=rf"{who}: image must be a floating tensor with "
            r"values in 0\.\.1, got dtype torch\.uint8 \(a uint8 "
            r"image holds 0\.\.255: ConvertImageDtype\(\)",
        ):
            call()


# ---------------------------------------------------------------------------------------------
# Pass-through errors from pycocotools / torch: wrapped once where the annotation is read
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,kind",
    [
        ("segmentation", [[1, 1, 4, "x", 4, 3]], "ValueError"),  # inside pycocotools
        ("bbox", [1, 1, "x", 2], "ValueError"),
        ("area", "lots", "ValueError"),
    ],
)
def test_errors_inside_pycocotools_and_torch_name_the_annotation(tmp_path, field, value, kind):
    """Build-time checks catch these in files; an annotation changed in memory afterwards
    (``ds.coco.anns``, as notebook code may do) still gets a message naming it."""
    ds = CocoDetection(tmp_path, _coco(tmp_path))
    ds.coco.anns[5][field] = value
    with pytest.raises(
        CocoFormatError,
        match=rf"ann\.json: annotation id 5 \(image id 1\) "
        rf"cannot be read: {kind}",
    ):
        ds[0]


# ---------------------------------------------------------------------------------------------
# A set mixed from two writes (what an interrupted in-place overwrite used to leave) is detected
# ---------------------------------------------------------------------------------------------
def test_mixed_set_is_detected(tmp_path: Path) -> None:
    kw = {"train": 4, "val": 0, "size": 64, "progress": False}
    old, new = tmp_path / "old", tmp_path / "new"
    write_shapes_dataset(old, seed=1, **kw)
    write_shapes_dataset(new, seed=2, **kw)
    shapes_dataset(old, "train", verify="full")
    # the old annotation file beside images already replaced by the new seed's
    for name in ("000000000001.png", "000000000002.png"):
        (old / "train" / name).write_bytes((new / "train" / name).read_bytes())
    with pytest.raises(
        CocoFormatError,
        match=r"000000000001\.png is not the image the manifest "
        r"records .*--overwrite",
    ):
        shapes_dataset(old, "train", verify="full")
    assert len(shapes_dataset(old, "train", verify="none")) == 4


def test_cli_amp_flag_reaches_the_recipe(monkeypatch, tmp_path):
    """``train --amp bf16`` is ``--set train.amp=bf16``; an unknown precision is refused."""
    import mrcnn_edu.engine.recipe as recipe
    from mrcnn_edu.cli import main

    seen = {}

    def fake_run_training(exp, *args, **kwargs):
        seen["amp"] = exp.train.amp
        raise ValueError("stop here")  # the CLI prints it and returns 2

    monkeypatch.setattr(recipe, "run_training", fake_run_training)
    argv = ["train", "--preset", "shapes", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    assert main([*argv, "--amp", "bf16"]) == 2 and seen["amp"] == "bf16"
    assert main(argv) == 2 and seen["amp"] is None
    with pytest.raises(SystemExit):
        main([*argv, "--amp", "fp8"])

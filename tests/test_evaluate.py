"""COCO evaluation against pycocotools and hand-computed AP.

A hand-made COCO file (3 images, boxes in the small / medium / large ranges, a crowd region, an
image without objects) is scored for fake models whose detections are built from the ground
truth: perfect ones (AP 1), boxes shifted so that every IoU is (w - dx) / (w + dx) = 0.6327
(matched at IoU thresholds 0.50, 0.55, 0.60 only, so AP = 3/10), and none at all (AP 0). Every
stat is also compared with COCOeval run here by hand on the written results JSON.

"AP 1" means 1 up to 1e-12: COCOeval computes precision as tp / (tp + fp + eps) with
eps = np.spacing(1), so one true positive alone gives 1 / (1 + 2.2e-16) = 0.9999999999999998.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from mrcnn_edu.data import CocoDetection, shapes_dataset, write_shapes_dataset
from mrcnn_edu.data.shapes import mask_to_rle
from mrcnn_edu.engine.evaluate import (
    BOX_STAT_NAMES,
    EvalResult,
    coco_results,
    evaluate,
    format_metrics_table,
    unwrap_coco_dataset,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# --- the hand-made set -------------------------------------------------------------------------
# (image id, width, height)
IMAGES = [(1, 40, 30), (2, 128, 120), (3, 16, 16)]
# (ann id, image id, category id, x, y, w, h): integer rectangles, whose polygon rasterizes to
# exactly w * h pixels. Areas: 80 and 240 (small, < 32^2), 1200 (medium), 10000 (large, > 96^2).
RECTS = [
    (1, 1, 7, 2, 3, 10, 8),
    (2, 1, 2, 20, 5, 12, 20),
    (4, 2, 2, 2, 10, 100, 100),
    (5, 2, 7, 70, 85, 40, 30),
]
CROWD = np.zeros((30, 40), np.uint8)
CROWD[22:30, 0:6] = 1  # image 1, bottom-left corner, away from every object and shifted box
SHIFT = 0.225  # dx = 0.225 w  ->  IoU = (w - dx) / (w + dx) = 0.775 / 1.225
SHIFTED_IOU = 0.775 / 1.225


def _coco_dict() -> dict:
    anns = [
        {
            "id": a,
            "image_id": i,
            "category_id": c,
            "iscrowd": 0,
            "area": float(w * h),
            "bbox": [x, y, w, h],
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        }
        for a, i, c, x, y, w, h in RECTS
    ]
    anns.append(
        {
            "id": 3,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 1,
            "area": float(CROWD.sum()),
            "bbox": [0, 22, 6, 8],
            "segmentation": mask_to_rle(CROWD, compressed=False),
        }
    )
    return {
        "images": [
            {"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in IMAGES
        ],
        "annotations": anns,
        # ids non-contiguous and out of order: labels 1, 2 are category ids 2, 7
        "categories": [{"id": 7, "name": "kite"}, {"id": 2, "name": "ball"}],
    }


@pytest.fixture()
def coco_set(tmp_path: Path) -> CocoDetection:
    for i, w, h in IMAGES:
        pixels = np.random.default_rng(i).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    (tmp_path / "ann.json").write_text(json.dumps(_coco_dict()))
    return CocoDetection(tmp_path, tmp_path / "ann.json")


# --- fake models ---------------------------------------------------------------------------------


def _one(x: float) -> bool:
    return abs(x - 1.0) <= 1e-12  # see the module docstring (COCOeval's eps)


def _key(image: torch.Tensor) -> bytes:
    return image.cpu().numpy().tobytes()


class FakeModel(nn.Module):
    """Returns detections made from the ground truth of the image it is given.

    ``mode``: "perfect" (boxes, masks and keypoints of the targets), "shifted" (boxes moved right
    by SHIFT x width, no masks), "empty" (no detections), "keypoints+0.5" (perfect, keypoints moved
    0.5 px). Losses (only when targets are given): ``loss_id`` = mean image id of the batch,
    ``loss_const`` = 2.
    """

    def __init__(self, dataset, mode: str = "perfect", masks: bool = True) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.mode, self.masks = mode, masks
        self.truth = {}
        for k in range(len(dataset)):
            image, target = dataset[k]
            self.truth[_key(image)] = target
        self.calls_in_training = 0

    def forward(self, images, targets=None):
        self.calls_in_training += int(self.training)
        detections = []
        for image in images:
            t = self.truth[_key(image)]
            n = len(t["boxes"])
            boxes = t["boxes"].clone()
            det = {
                "boxes": boxes,
                "labels": t["labels"].clone(),
                "scores": torch.linspace(0.9, 0.5, n) if n else torch.zeros(0),
            }
            if self.mode == "shifted":
                boxes[:, [0, 2]] += SHIFT * (boxes[:, 2] - boxes[:, 0])[:, None]
            elif self.mode == "empty":
                det = {k: v[:0] for k, v in det.items()}
            if self.masks and self.mode != "shifted":
                masks = t["masks"][:, None].float()  # (N, H, W) -> (N, 1, H, W)
                det["masks"] = masks[: len(det["boxes"])]
            if "keypoints" in t and self.mode != "empty":
                kps = t["keypoints"].clone()
                if self.mode == "keypoints+0.5":
                    kps[:, :, :2] += 0.5
                det["keypoints"] = kps
            detections.append(det)
        losses = {}
        if targets is not None:
            ids = torch.stack([t["image_id"] for t in targets]).float()
            losses = {"loss_id": ids.mean() * self.scale, "loss_const": torch.tensor(2.0)}
        return detections, losses


# --- reference: COCOeval run by hand -------------------------------------------------------------


def _reference_stats(
    ann_file: Path, results_file: Path, iou_type: str, img_ids, sigmas=None
) -> np.ndarray:
    key = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    results = json.loads(results_file.read_text())
    # one field per result, as COCO's own result files for each task are
    results = [
        {
            "image_id": r["image_id"],
            "category_id": r["category_id"],
            "score": r["score"],
            key: r[key],
        }
        for r in results
    ]
    gt = COCO(str(ann_file))
    E = COCOeval(gt, gt.loadRes(results), iouType=iou_type)
    E.params.imgIds = sorted(img_ids)
    if sigmas is not None:
        E.params.kpt_oks_sigmas = np.asarray(sigmas)
    E.evaluate()
    E.accumulate()
    E.summarize()
    return E.stats


def _assert_matches_reference(
    result: EvalResult, ann_file: Path, results_file: Path, img_ids, sigmas=None
) -> None:
    for t in result.iou_types:
        ref = _reference_stats(ann_file, results_file, t, img_ids, sigmas)
        assert result.stats[t] == pytest.approx(ref.tolist(), abs=0, rel=0), t
        named = list(result.metrics[t].values())[: len(ref)]
        for got, want in zip(named, ref):
            assert (math.isnan(got) and want == -1) or got == want


# --- tests ---------------------------------------------------------------------------------------


def test_perfect_detections_give_ap_one(coco_set: CocoDetection, tmp_path: Path) -> None:
    model = FakeModel(coco_set)
    out = tmp_path / "out" / "results.json"
    result = evaluate(model, coco_set, results_file=out, progress=False)
    assert result.iou_types == ("bbox", "segm")
    assert result.num_images == 3 and result.num_detections == 4
    assert result.results_file == out
    for t in ("bbox", "segm"):
        for name in BOX_STAT_NAMES:
            assert _one(result.metrics[t][name]), (t, name)
        assert result.per_category[t] == pytest.approx({"kite": 1.0, "ball": 1.0}, abs=1e-12)
    _assert_matches_reference(result, coco_set.ann_file, out, [1, 2, 3])
    assert "Average Precision" in result.summary_text and "IoU type: segm" in result.summary_text
    assert result.images_per_second > 0
    assert model.calls_in_training == 0 and model.training  # eval inside, mode restored

    # the written results load in pycocotools; labels were mapped back to category ids
    results = json.loads(out.read_text())
    dt = coco_set.coco.loadRes(json.loads(out.read_text()))
    assert len(dt.getAnnIds()) == 4
    by_ann = {(r["image_id"], tuple(r["bbox"])): r for r in results}
    for _a, i, c, x, y, w, h in RECTS:
        r = by_ann[(i, (float(x), float(y), float(w), float(h)))]
        assert r["category_id"] == c
        assert isinstance(r["segmentation"]["counts"], str)
        mask = mask_utils.decode(r["segmentation"])
        assert mask.sum() == w * h and mask[y : y + h, x : x + w].all()


def test_shifted_boxes_hand_computed_ap(coco_set: CocoDetection, tmp_path: Path) -> None:
    # IoU 0.6327 passes the thresholds 0.50, 0.55, 0.60 and fails 0.65 .. 0.95: AP = 3 / 10
    assert 0.60 < SHIFTED_IOU < 0.65
    out = tmp_path / "shifted.json"
    result = evaluate(FakeModel(coco_set, "shifted"), coco_set, results_file=out, progress=False)
    assert result.iou_types == ("bbox",)  # a box-only model: no masks, no segm
    m = result.metrics["bbox"]
    assert _one(m["AP50"]) and m["AP75"] == 0.0
    # every object (small, medium and large) and every max-detections setting: 3 of 10
    for name in ("AP", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert m[name] == pytest.approx(0.3, abs=1e-12), name
    assert result.per_category["bbox"] == pytest.approx({"kite": 0.3, "ball": 0.3}, abs=1e-12)
    _assert_matches_reference(result, coco_set.ann_file, out, [1, 2, 3])
    # the boxes really have that IoU (torchvision's box_iou as the independent check)
    from torchvision.ops import box_iou

    image, target = coco_set[0]
    dets, _ = FakeModel(coco_set, "shifted").eval()([image])
    ious = box_iou(dets[0]["boxes"], target["boxes"]).diag()
    torch.testing.assert_close(ious, torch.full_like(ious, SHIFTED_IOU))


def test_no_detections_give_zeros(coco_set: CocoDetection, tmp_path: Path) -> None:
    out = tmp_path / "empty.json"
    with pytest.warns(UserWarning, match="no detections"):
        result = evaluate(FakeModel(coco_set, "empty"), coco_set, results_file=out, progress=False)
    assert json.loads(out.read_text()) == []
    assert result.num_detections == 0 and result.iou_types == ("bbox", "segm")
    for t in ("bbox", "segm"):
        for name in BOX_STAT_NAMES:  # the set has objects of every size: all defined, all 0
            assert result.metrics[t][name] == 0.0, (t, name)
        assert result.per_category[t] == {"kite": 0.0, "ball": 0.0}


def test_val_losses_are_the_mean_over_images(coco_set: CocoDetection) -> None:
    # batches [1, 2] and [3]: loss_id = 1.5 and 3; weighted by batch size -> mean id = 2
    result = evaluate(FakeModel(coco_set), coco_set, batch_size=2, device="cpu", progress=False)
    assert result.val_losses == pytest.approx({"loss_id": 2.0, "loss_const": 2.0})
    assert _one(result.metrics["bbox"]["AP"])
    none = evaluate(FakeModel(coco_set), coco_set, with_losses=False, num_workers=1, progress=False)
    assert none.val_losses == {} and none.stats == result.stats


def test_subsets_and_max_images_restrict_the_images(
    coco_set: CocoDetection, tmp_path: Path
) -> None:
    sub = torch.utils.data.Subset(torch.utils.data.Subset(coco_set, [2, 1, 0]), [1, 2])
    base, ids = unwrap_coco_dataset(sub)
    assert base is coco_set and ids == [2, 1]
    out = tmp_path / "sub.json"
    result = evaluate(FakeModel(coco_set, "shifted"), sub, results_file=out, progress=False)
    assert result.num_images == 2
    _assert_matches_reference(result, coco_set.ann_file, out, [1, 2])

    # image 1 only: its two small objects; no medium / large gt there -> nan (COCOeval's -1)
    first = evaluate(FakeModel(coco_set), coco_set, max_images=1, progress=False)
    assert first.num_images == 1 and first.num_detections == 2
    m = first.metrics["bbox"]
    assert _one(m["AP"]) and _one(m["APs"])
    assert math.isnan(m["APm"]) and math.isnan(m["APl"])
    assert first.stats["bbox"][4] == -1.0
    table = format_metrics_table(first)
    assert table.splitlines()[2] == "| bbox | 100.0 | 100.0 | 100.0 | 100.0 | - | - |"
    assert table.splitlines()[3].startswith("| segm | 100.0")


def test_bad_requests_fail_clearly(coco_set: CocoDetection) -> None:
    with pytest.raises(ValueError, match="iou_types has 'segm' but the model returned no"):
        evaluate(FakeModel(coco_set, "shifted"), coco_set, iou_types=["segm"], progress=False)
    with pytest.raises(ValueError, match="iou_types must be"):
        evaluate(FakeModel(coco_set), coco_set, iou_types=["mask"], progress=False)
    with pytest.raises(ValueError, match="no keypoint category"):
        evaluate(FakeModel(coco_set), coco_set, iou_types=["keypoints"], progress=False)
    with pytest.raises(TypeError, match="no 'coco' attribute"):
        evaluate(FakeModel(coco_set), [coco_set[0]], progress=False)

    class Resize(torch.utils.data.Dataset):  # a wrapper that breaks the original image size
        def __init__(self, ds):
            self.ds, self.coco, self.ids = ds, ds.coco, ds.ids
            self.label_to_cat_id = ds.label_to_cat_id

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            image, target = self.ds[i]
            return image[:, ::2].contiguous(), target

    with pytest.raises(ValueError, match=r"image id 1\) image is \(3, 15, 40\).*original size"):
        evaluate(FakeModel(coco_set), Resize(coco_set), progress=False)


def test_coco_results_by_hand() -> None:
    mask = torch.zeros(2, 1, 5, 6)
    mask[0, 0, 1:3, 2:5] = 0.7  # a 2 x 3 block above the threshold
    mask[0, 0, 4, 0] = 0.49  # below it
    mask[1, 0, 0, 0] = 0.5  # exactly at it: in
    det = {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 1.5, 1.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.75, 0.25]),
        "masks": mask,
        "keypoints": torch.tensor([[[1.0, 2.0, 1.0]], [[3.0, 4.0, 2.0]]]),
    }
    res = coco_results(
        [det, {k: v[:0] for k, v in det.items()}], [7, 8], label_to_cat_id={1: 10, 2: 20}
    )
    assert len(res) == 2
    assert res[0]["image_id"] == 7 and res[0]["category_id"] == 10
    assert res[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and res[1]["bbox"] == [0.0, 0.0, 1.5, 1.0]
    assert res[0]["score"] == 0.75 and res[1]["category_id"] == 20
    assert res[0]["keypoints"] == [1.0, 2.0, 1.0] and res[1]["keypoints"] == [3.0, 4.0, 2.0]
    want0 = np.zeros((5, 6), np.uint8)
    want0[1:3, 2:5] = 1
    want1 = np.zeros((5, 6), np.uint8)
    want1[0, 0] = 1
    for r, want in zip(res, (want0, want1)):
        assert r["segmentation"]["size"] == [5, 6]
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), want)
    json.dumps(res)  # plain Python types only
    with pytest.raises(ValueError, match=r"label\(s\) \[3\] that map to no category"):
        coco_results([{**det, "labels": torch.tensor([1, 3])}], [7], label_to_cat_id={1: 10, 2: 20})
    with pytest.raises(ValueError, match=r"detections\[0\]\['boxes'\] must be \[N, 4\]"):
        coco_results([{**det, "boxes": torch.zeros(2, 5)}], [7])
    with pytest.raises(ValueError, match=r"got 1 detection dicts but 2 image ids"):
        coco_results([det], [7, 8])


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, train=4, val=3, size=64, progress=False)
    return root


def test_shapes_set_perfect_model(shapes_root: Path, tmp_path: Path) -> None:
    ds = shapes_dataset(shapes_root, "val")
    out = tmp_path / "r.json"
    result = evaluate(FakeModel(ds), ds, results_file=out, progress=False)
    assert result.iou_types == ("bbox", "segm")
    for t in ("bbox", "segm"):
        assert _one(result.metrics[t]["AP"]) and _one(result.metrics[t]["AP75"])
        present = {
            ds.coco.cats[a["category_id"]]["name"]
            for a in ds.coco.dataset["annotations"]
            if not a["iscrowd"]
        }
        assert {k for k, v in result.per_category[t].items() if _one(v)} == present
    # labels 1..3 went back to the set's category ids 1, 3, 5
    assert {r["category_id"] for r in json.loads(out.read_text())} <= {1, 3, 5}
    _assert_matches_reference(result, ds.ann_file, out, ds.ids)


@pytest.fixture(scope="module")
def keypoint_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("figures")
    write_shapes_dataset(root, train=0, val=3, size=64, keypoints=True, progress=False)
    return root


def test_keypoints_need_sigmas_and_use_them(keypoint_root: Path, tmp_path: Path) -> None:
    ds = shapes_dataset(keypoint_root, "val")
    K = len(ds.keypoint_names)
    assert K != 17
    # the stick figures carry their own sigmas (tests/test_keypoint_training.py): drop them
    bare_data = json.loads(ds.ann_file.read_text())
    assert bare_data["categories"][0].pop("sigmas")
    bare_file = tmp_path / "bare.json"
    bare_file.write_text(json.dumps(bare_data))
    bare = CocoDetection(ds.image_dir, bare_file)
    with pytest.raises(ValueError, match=f"K = {K} keypoints and no category with a 'sigmas'"):
        evaluate(FakeModel(bare), bare, iou_types=["bbox", "keypoints"], progress=False)

    perfect = evaluate(FakeModel(bare), bare, kpt_oks_sigmas=[0.05] * K, progress=False)
    assert perfect.iou_types == ("bbox", "segm", "keypoints")
    assert _one(perfect.metrics["keypoints"]["AP"])
    assert math.isnan(perfect.metrics["keypoints"]["APs"])  # COCO has no small keypoint range
    with pytest.raises(ValueError, match="must be 11 positive numbers"):
        evaluate(FakeModel(ds), ds, kpt_oks_sigmas=[0.05] * 3, progress=False)

    # sigmas stored in the annotation file's category are used
    data = json.loads(ds.ann_file.read_text())
    sigmas = [0.05 + 0.01 * k for k in range(K)]
    data["categories"][0]["sigmas"] = sigmas
    ann_file = tmp_path / "kp.json"
    ann_file.write_text(json.dumps(data))
    ds2 = CocoDetection(ds.image_dir, ann_file)
    out = tmp_path / "kp_results.json"
    moved = evaluate(FakeModel(ds2, "keypoints+0.5"), ds2, results_file=out, progress=False)
    assert 0.05 < moved.metrics["keypoints"]["AP"] < 0.95, moved.metrics["keypoints"]
    _assert_matches_reference(moved, ann_file, out, ds2.ids, sigmas=sigmas)
    other = _reference_stats(ann_file, out, "keypoints", ds2.ids, sigmas=[0.1] * K)
    assert other.tolist() != moved.stats["keypoints"]


def test_amp_runs_the_model_under_autocast(coco_set: CocoDetection) -> None:
    class Probe(FakeModel):
        def forward(self, images, targets=None):
            self.autocast = torch.is_autocast_enabled("cpu")
            self.dtype = torch.get_autocast_dtype("cpu")
            return super().forward(images, targets)

    model = Probe(coco_set)
    plain = evaluate(model, coco_set, progress=False)
    assert model.autocast is False
    result = evaluate(model, coco_set, progress=False, amp="bf16")
    assert model.autocast is True and model.dtype == torch.bfloat16
    assert result.metrics == plain.metrics  # outputs are float32 whatever the layers ran in
    assert not torch.is_autocast_enabled("cpu")  # switched off again after the pass
    with pytest.raises(ValueError, match="amp must be None, 'bf16' or 'fp16', got 'fp8'"):
        evaluate(model, coco_set, progress=False, amp="fp8")

"""Keypoint R-CNN trained on the stick figures: the OKS sigmas the set carries, the flip map the
training set uses, a 2-step ``stick-figures`` run scored with COCOeval, the COCO keypoint recipe
and ``mrcnn-edu demo`` with a keypoint recipe (issue 16).

References: pycocotools' ``COCOeval`` run directly on the results file (for the sigmas), the
issue's per-part sigmas typed in by hand, a flip computed by hand from the keypoint names (for
the flip map), and the paper's section 5 numbers (for the COCO recipe).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_edu.data import shapes_dataset, write_shapes_dataset
from mrcnn_edu.data.shapes import KEYPOINT_NAMES, KEYPOINT_SIGMAS
from mrcnn_edu.engine.evaluate import evaluate
from mrcnn_edu.engine.recipe import build_datasets, get_experiment, load_model, run_training

#: The issue's COCO-like sigmas per body part, typed in independently of the generator.
ISSUE_SIGMAS = {
    "head": 0.026,
    "neck": 0.079,
    "left_elbow": 0.072,
    "right_elbow": 0.072,
    "left_hand": 0.062,
    "right_hand": 0.062,
    "hip": 0.107,
    "left_knee": 0.087,
    "right_knee": 0.087,
    "left_foot": 0.089,
    "right_foot": 0.089,
}

#: 64-pixel inputs, 2 images per step, 2 steps: a run of seconds.
TINY = {
    "model.transform.min_size": (64,),
    "model.transform.max_size": 64,
    "train.batch_size": 2,
    "train.steps": 2,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "train.num_workers": 0,
}


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("figures") / "kp"
    write_shapes_dataset(root, train=4, val=3, size=64, seed=0, keypoints=True, progress=False)
    return root


class GtKeypointModel(torch.nn.Module):
    """Detects every gt person (score 1) and puts its keypoints ``shift`` pixels off."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift
        self.unused = torch.nn.Parameter(torch.zeros(1))  # evaluate reads the device from it

    def forward(self, images, targets):
        dets = []
        for t in targets:
            kps = t["keypoints"].clone()
            kps[..., :2] += self.shift
            kps[..., 2] = 1.0
            dets.append(
                {
                    "boxes": t["boxes"],
                    "labels": t["labels"],
                    "scores": torch.ones(len(t["boxes"])),
                    "keypoints": kps,
                }
            )
        return dets, {}


def _cocoeval_keypoint_stats(ann_file: Path, results_file: Path, sigmas) -> list[float]:
    """pycocotools on its own: keypoint results only (as evaluate gives them), these sigmas."""
    results = [
        {k: r[k] for k in ("image_id", "category_id", "score", "keypoints")}
        for r in json.loads(results_file.read_text())
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        E = COCOeval(gt, gt.loadRes(results), iouType="keypoints")
        E.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return [float(s) for s in E.stats]


def test_the_set_carries_the_issue_sigmas_and_evaluate_uses_them(
    figures: Path, tmp_path: Path
) -> None:
    want = [ISSUE_SIGMAS[name] for name in KEYPOINT_NAMES]
    assert list(KEYPOINT_SIGMAS) == want
    for split in ("train", "val"):
        data = json.loads((figures / "annotations" / f"person_keypoints_{split}.json").read_text())
        (cat,) = data["categories"]
        assert cat["keypoints"] == list(KEYPOINT_NAMES) and cat["sigmas"] == want

    val = shapes_dataset(figures, "val")
    out = tmp_path / "results.json"
    res = evaluate(GtKeypointModel(shift=1.0), val, results_file=out, progress=False)
    assert res.iou_types == ("bbox", "keypoints")
    assert 0.0 < res.metrics["keypoints"]["AP"] < 1.0, res.metrics["keypoints"]  # OKS matters
    assert res.stats["keypoints"] == pytest.approx(
        _cocoeval_keypoint_stats(val.ann_file, out, want), abs=1e-12
    )
    # other sigmas give other numbers: the file's were used, not a default
    looser = _cocoeval_keypoint_stats(val.ann_file, out, [3 * s for s in want])
    assert looser[0] > res.stats["keypoints"][0]


def _partner(name: str) -> str:
    for a, b in (("left_", "right_"), ("right_", "left_")):
        if name.startswith(a):
            return b + name[len(a) :]
    return name


def test_training_flips_swap_left_and_right_keypoints(figures: Path, tmp_path: Path) -> None:
    exp = get_experiment("stick-figures", {"train.hflip": 1.0})  # always flip
    train_set, _ = build_datasets(exp, figures, val=False)
    flip = train_set.transforms
    assert flip.p == 1.0
    assert [KEYPOINT_NAMES[j] for j in flip.flip_index] == [_partner(n) for n in KEYPOINT_NAMES]
    plain = shapes_dataset(figures, "train")
    checked = 0
    for i in range(len(train_set)):
        image, target = train_set[i]
        image0, target0 = plain[plain.ids.index(train_set.ids[i])]
        W = image0.shape[-1]
        torch.testing.assert_close(image, image0.flip(-1))
        for k, name in enumerate(KEYPOINT_NAMES):  # keypoint k after = its partner before
            before = target0["keypoints"][:, KEYPOINT_NAMES.index(_partner(name))]  # [N, 3]
            after = target["keypoints"][:, k]
            labelled = before[:, 2] > 0
            torch.testing.assert_close(after[:, 2], before[:, 2])
            torch.testing.assert_close(after[labelled, 0], W - before[labelled, 0])
            torch.testing.assert_close(after[labelled, 1], before[labelled, 1])
            checked += int(labelled.sum()) if name != _partner(name) else 0
    assert checked > 0  # some left/right keypoint was really swapped

    det_root = tmp_path / "shapes"
    write_shapes_dataset(det_root, train=2, val=0, size=64, progress=False)
    det_train, _ = build_datasets(get_experiment("shapes"), det_root, val=False)
    assert det_train.transforms.flip_index is None  # no keypoints: nothing to swap


def test_two_step_stick_figure_training_gives_a_keypoint_ap(figures: Path, tmp_path: Path) -> None:
    exp = get_experiment("stick-figures", TINY)
    assert exp.model.roi_heads.keypoint and not exp.model.roi_heads.mask
    assert exp.model.roi_heads.num_keypoints == len(KEYPOINT_NAMES)
    model, result = run_training(exp, figures, tmp_path / "run", progress=False)
    assert result.steps_done == 2
    assert all(math.isfinite(r["loss_keypoint"]) for r in result.history)
    assert exp.model.num_classes == 2  # background + person, from the data
    _, val = build_datasets(exp, figures, train=False)
    res = evaluate(model, val, progress=False)
    assert "keypoints" in res.iou_types
    assert 0.0 <= res.metrics["keypoints"]["AP"] <= 1.0
    assert len(res.stats["keypoints"]) == 10
    assert "loss_keypoint" in res.val_losses and math.isfinite(res.val_losses["loss_keypoint"])
    # eval --set: a trained model's test-time settings change, its weights and layers do not
    plain, _ = load_model(tmp_path / "run" / "last.pt")
    assert (plain.roi_heads.keypoint_decoding, plain.roi_heads.keypoint_rescore) == (
        "subpixel",
        True,
    )
    tv_style, exp2 = load_model(
        tmp_path / "run" / "last.pt",
        overrides={
            "model.roi_heads.keypoint_decoding": "torchvision",
            "model.roi_heads.keypoint_rescore": "false",
            "model.roi_heads.score_thresh": "0.2",
        },
    )
    assert (tv_style.roi_heads.keypoint_decoding, tv_style.roi_heads.keypoint_rescore) == (
        "torchvision",
        False,
    )
    assert tv_style.roi_heads.score_thresh == exp2.model.roi_heads.score_thresh == 0.2
    for (k, v), (k2, v2) in zip(plain.state_dict().items(), tv_style.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    with pytest.raises(
        ValueError, match="only test-time settings .* not model.roi_heads.keypoint_layers"
    ):
        load_model(
            tmp_path / "run" / "last.pt", overrides={"model.roi_heads.keypoint_layers": "(8,)"}
        )
    with pytest.raises(KeyError, match="nearest: model.roi_heads.keypoint_decoding"):
        load_model(
            tmp_path / "run" / "last.pt", overrides={"model.roi_heads.keypoint_decodin": "x"}
        )


def test_stick_figure_and_coco_keypoint_recipes() -> None:
    exp = get_experiment("stick-figures")
    m, t = exp.model, exp.train
    assert (m.backbone.depth, m.backbone.fpn_channels, m.roi_heads.representation_size) == (
        10,
        64,
        256,
    )
    assert m.roi_heads.keypoint_layers == (128,) * 4 and m.transform.min_size == (256,)
    assert (m.roi_heads.batch_size_per_image, m.roi_heads.mask_rois_per_image) == (128, 8)
    assert (t.optimizer, t.lr, t.batch_size, t.schedule, t.max_minutes, t.hflip) == (
        "adamw",
        5e-4,
        4,
        "cosine",
        15.0,
        0.5,
    )
    assert t.warmup_steps > 0 and exp.data.layout == "shapes"
    # not torchvision's inference: sub-pixel keypoints, detections scored by their heatmaps too
    assert (m.roi_heads.keypoint_decoding, m.roi_heads.keypoint_rescore) == ("subpixel", True)

    coco = get_experiment("coco-keypoints-r50-fpn")  # Mask R-CNN sec. 5
    assert coco.model.roi_heads.keypoint and coco.model.roi_heads.num_keypoints == 17
    assert coco.model.roi_heads.keypoint_layers == (512,) * 8 and coco.model.backbone.depth == 50
    assert coco.model.roi_heads.keypoint_decoding == "torchvision"  # the paper's, torchvision's
    assert coco.model.roi_heads.keypoint_rescore is False
    assert coco.model.transform.min_size == (640, 672, 704, 736, 768, 800)
    c = coco.train
    assert (c.batch_size, c.lr, c.steps, c.milestones, c.optimizer) == (
        16,
        0.02,
        90000,
        (60000, 80000),
        "sgd",
    )
    assert coco.data.layout == "coco"


def test_a_keypoint_model_reads_the_coco_keypoint_files(figures: Path, tmp_path: Path) -> None:
    """A COCO root holds instances_* and person_keypoints_* side by side: the keypoint recipe
    must read the second (with COCO's flip map), the detection recipe the first."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(figures / "train", root / "train2017")
    shutil.copy(
        figures / "annotations" / "person_keypoints_train.json",
        root / "annotations" / "person_keypoints_train2017.json",
    )
    det = tmp_path / "det"  # a detection file for the same image names and sizes
    write_shapes_dataset(det, train=4, val=0, size=64, progress=False)
    shutil.copy(
        det / "annotations" / "instances_train.json",
        root / "annotations" / "instances_train2017.json",
    )

    kp_train, _ = build_datasets(get_experiment("coco-keypoints-r50-fpn"), root, val=False)
    assert kp_train.keypoint_names == list(KEYPOINT_NAMES)
    assert kp_train.ann_file.name == "person_keypoints_train2017.json"
    assert [KEYPOINT_NAMES[j] for j in kp_train.transforms.flip_index] == [
        _partner(n) for n in KEYPOINT_NAMES
    ]
    det_train, _ = build_datasets(get_experiment("coco-r50-fpn-1x"), root, val=False)
    assert det_train.ann_file.name == "instances_train2017.json"
    assert det_train.keypoint_names is None


def _without_sigmas(root: Path, split: str) -> None:
    """Make ``root`` look written before the generator stored its sigmas (the manifest agrees)."""
    ann_file = root / "annotations" / f"person_keypoints_{split}.json"
    data = json.loads(ann_file.read_text())
    del data["categories"][0]["sigmas"]
    text = json.dumps(data, separators=(",", ":")).encode()
    ann_file.write_bytes(text)
    manifest = json.loads((root / "shapes_manifest.json").read_text())
    manifest["splits"][split]["annotation_sha256"] = hashlib.sha256(text).hexdigest()
    (root / "shapes_manifest.json").write_text(json.dumps(manifest))


def test_demo_with_the_keypoint_recipe_reports_keypoint_ap(
    figures: Path, tmp_path: Path, capsys
) -> None:
    """On a stick-figure set written before the sigmas were stored: the demo scores it with
    the generator's sigmas instead of failing after its training."""
    from mrcnn_edu.cli import main

    data = tmp_path / "figures"
    shutil.copytree(figures, data)
    _without_sigmas(data, "val")
    with pytest.raises(ValueError, match="no category with a 'sigmas' list"):
        evaluate(GtKeypointModel(1.0), shapes_dataset(data, "val"), progress=False)
    out = tmp_path / "demo"
    sets = [f"{k}={v}" for k, v in TINY.items()]
    args = [
        "demo",
        "--preset",
        "stick-figures",
        "--data",
        str(data),
        "--out",
        str(out),
        "--minutes",
        "0.2",
        "--num-images",
        "1",
        "--no-progress",
    ]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| keypoints |" in printed and "keypoint AP" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["keypoints"]["AP"] <= 1.0 and "segm" not in metrics
    assert metrics["steps"] >= 1 and metrics["preset"] == "stick-figures"
    for name in ("predictions.png", "losses.png", "val_results.json"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "val_results.json").read_text())
    assert all(len(r["keypoints"]) == 3 * len(KEYPOINT_NAMES) for r in results)


def test_eval_of_torchvision_keypoint_weights_reads_the_keypoint_files(
    figures: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``mrcnn-edu eval --weights torchvision:keypointrcnn_resnet50_fpn=FILE`` on a COCO root
    scores keypoints: the person_keypoints file is read. (The R50 checkpoint is replaced by a
    small untrained keypoint model: what is checked is the data the CLI hands it.)"""
    from mrcnn_edu import cli
    from mrcnn_edu.model import build_model

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(figures / "val", root / "val2017")
    shutil.copy(
        figures / "annotations" / "person_keypoints_val.json",
        root / "annotations" / "person_keypoints_val2017.json",
    )
    det = tmp_path / "det"
    write_shapes_dataset(det, train=0, val=3, size=64, progress=False)
    shutil.copy(
        det / "annotations" / "instances_val.json", root / "annotations" / "instances_val2017.json"
    )
    cfg = get_experiment("stick-figures", TINY).model
    cfg.num_classes = 2
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.roi_heads.score_thresh = 0.0  # untrained: keep whatever it finds
    monkeypatch.setattr(cli, "_load_weights_arg", lambda spec: model)
    args = ["eval", "--weights", "torchvision:keypointrcnn_resnet50_fpn=x.pth", "--data", str(root)]
    assert cli.main(args + ["--no-progress"]) == 0
    assert "| keypoints |" in capsys.readouterr().out
    # --set changes a checkpoint's test-time settings; with --weights there is none to change
    assert cli.main(args + ["--set", "model.roi_heads.keypoint_rescore=true", "--no-progress"]) == 2
    assert "--set changes a checkpoint's settings: use it with --checkpoint" in (
        capsys.readouterr().err
    )

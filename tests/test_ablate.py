"""engine.ablate: the paper's Table 2 studies end to end on a tiny set (2 steps), resume, the
table's statistics against hand-computed values, the verdicts, the variants' switches reaching
the built model (against torchvision's operators), the shapes options and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torchvision
from pycocotools import mask as mask_utils

from mrcnn_edu.cli import main
from mrcnn_edu.config import flat_keys
from mrcnn_edu.data.shapes import (
    MANIFEST_NAME,
    generate_image,
    mask_to_bbox,
    write_shapes_dataset,
)
from mrcnn_edu.engine import ablate
from mrcnn_edu.engine.ablate import (
    ShapesData,
    compare,
    format_results,
    get_study,
    list_studies,
    mean_std,
    plan_steps,
    run_study,
    select_predictions,
    summarize,
)
from mrcnn_edu.engine.evaluate import evaluate
from mrcnn_edu.engine.recipe import build_datasets, get_experiment, list_experiments, load_model
from mrcnn_edu.model import build_model
from mrcnn_edu.viz import draw_ablation_bars, plot_ablation_study

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# every variant alike: 64 px images, narrow heads, few RoIs (the studies' switches untouched)
TINY = {
    "model.transform.min_size": "(64,)",
    "model.transform.max_size": "64",
    "model.backbone.fpn_channels": "32",
    "model.roi_heads.representation_size": "64",
    "model.roi_heads.mask_layers": "(16, 16)",
    "model.roi_heads.mask_dim_reduced": "16",
    "model.roi_heads.batch_size_per_image": "32",
    "model.rpn.pre_nms_top_n_train": "100",
    "model.rpn.post_nms_top_n_train": "50",
    "model.rpn.pre_nms_top_n_test": "50",
    "model.rpn.post_nms_top_n_test": "20",
    "model.roi_heads.detections_per_img": "10",
    "train.batch_size": "1",
    "train.num_workers": "0",
    "train.log_every": "1",
}


def _tiny_study(name: str, variants: tuple[str, ...]) -> ablate.Study:
    study = get_study(name)
    return dataclasses.replace(
        study,
        data=dataclasses.replace(study.data, train=4, val=2, size=64),
        variants=tuple(v for v in study.variants if v.name in variants),
    )


# ------------------------------------------------------------------------------ definitions
def test_studies_and_recipes_are_registered():
    assert list_studies() == ["roi-pool", "mask-loss"]
    assert {"shapes-c4", "shapes-c5"} <= set(list_experiments())
    roi = get_study("roi-pool")
    assert [v.name for v in roi.variants] == [
        "c4-pool",
        "c4-align",
        "c4-aligned",
        "c5-pool",
        "c5-align",
        "c5-aligned",
    ]
    assert not roi.data.small and not roi.data.overlap and roi.data.name == "shapes_128"
    assert roi.data.size == 128
    loss = get_study("mask-loss")
    assert loss.data.overlap and loss.data.name == "shapes_overlap"
    # the paper's numbers (He et al. 2017, Table 2b/2c/2d and sec. 4.2)
    assert roi.variant("c4-pool").paper["segm AP"] == 26.9
    assert roi.variant("c4-align").paper["segm AP"] == 30.3
    assert roi.variant("c5-pool").paper == {
        "segm AP": 23.6,
        "segm AP50": 46.5,
        "segm AP75": 21.6,
        "bbox AP": 28.2,
    }
    assert roi.variant("c5-align").paper == {
        "segm AP": 30.9,
        "segm AP50": 51.8,
        "segm AP75": 32.1,
        "bbox AP": 34.0,
    }
    assert not roi.variant("c4-aligned").paper
    assert [loss.variant(m).paper["segm AP"] for m in ("sigmoid", "softmax", "agnostic")] == [
        30.3,
        24.8,
        29.7,
    ]
    with pytest.raises(KeyError, match="studies: roi-pool, mask-loss"):
        get_study("roi-align")


def _pool_reference(
    op: str, aligned: bool, feats: torch.Tensor, boxes: torch.Tensor, scale: float, size: int
) -> torch.Tensor:
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)  # [K, 5] (batch index first)
    if op == "pool":
        return torchvision.ops.roi_pool(feats, rois, size, scale)
    return torchvision.ops.roi_align(feats, rois, size, scale, sampling_ratio=2, aligned=aligned)


@pytest.mark.parametrize("name", ["roi-pool", "mask-loss"])
def test_variants_differ_in_the_built_model(name):
    """The switch of each variant reaches the model: the poolers compute torchvision's
    roi_pool / roi_align(aligned) at the backbone's stride; the mask loss mode and the mask
    predictor's channels follow ``mask_loss``; everything else is the same."""
    study = get_study(name)
    feats = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[13.3, 20.7, 61.9, 50.2], [100.5, 90.1, 180.0, 230.6]])
    for v in study.variants:
        exp = v.experiment(0, TINY)
        model = build_model(exp.model)
        h = exp.model.roi_heads
        pool = model.roi_heads.box_roi_pool
        assert (pool.op, pool.aligned) == (h.pooler_op, h.aligned)
        assert model.roi_heads.mask_loss_mode == h.mask_loss
        channels = model.roi_heads.mask_predictor.mask_fcn_logits.out_channels
        assert channels == (1 if h.mask_loss == "agnostic" else exp.model.num_classes)
        strides = tuple(model.backbone.strides)
        if name == "roi-pool":
            assert strides == {"c4": (16,), "c5": (32,)}[v.group]
            stride = strides[0]
            f = {"0": feats[:, :, : 256 // stride, : 256 // stride]}
            got = pool(f, [boxes], [(256, 256)])  # [K, C, 7, 7]
            want = _pool_reference(h.pooler_op, h.aligned, f["0"], boxes, 1 / stride, 7)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            assert strides == (4, 8, 16, 32, 64)  # P2..P5 and the pooled P6
    # variants of a group differ only in the keys they declare
    for v in study.variants:
        ref = next(w for w in study.variants if w.group == v.group)
        a = flat_keys(get_experiment(v.recipe, {**TINY, **v.overrides}))
        b = flat_keys(get_experiment(ref.recipe, {**TINY, **ref.overrides}))
        assert {k for k in a if a[k] != b[k]} <= set(v.overrides) | set(ref.overrides)


def test_shared_overrides_cannot_erase_the_switch():
    v = get_study("roi-pool").variant("c4-pool")
    with pytest.raises(ValueError, match="model.roi_heads.pooler_op"):
        v.experiment(0, {"model.roi_heads.pooler_op": "align"})
    with pytest.raises(ValueError, match="train.seed"):
        v.experiment(0, {"train.seed": "3"})
    assert v.experiment(5, TINY).train.seed == 5


# -------------------------------------------------------------------------- shapes options
def test_shapes_options_overlap_and_small():
    counts = {}
    for opts in ({}, {"overlap": True}, {"small": True}):
        n, crossed, large, sides = 0, 0, 0, []
        for i in range(30):
            _, inst = generate_image(np.random.default_rng([1, i]), 128, **opts)
            n += len(inst)
            boxes = [mask_to_bbox(x["mask"]) for x in inst]
            sides += [math.sqrt(x["mask"].sum()) for x in inst]
            large += sum(x["mask"].sum() >= (0.3 * 128) ** 2 for x in inst)
            for a in range(len(inst)):
                for b in range(a + 1, len(inst)):
                    xa, ya, wa, ha = boxes[a]
                    xb, yb, wb, hb = boxes[b]
                    if (
                        inst[a]["category_id"] != inst[b]["category_id"]
                        and min(xa + wa, xb + wb) > max(xa, xb)
                        and min(ya + ha, yb + hb) > max(ya, yb)
                    ):
                        crossed += 1
        counts[tuple(opts)] = (n / 30, crossed / 30, large, max(sides))
    default, overlap, small = counts[()], counts[("overlap",)], counts[("small",)]
    assert overlap[0] > 1.5 * default[0]  # denser scenes
    assert overlap[1] > 3 * default[1]  # objects of different classes cross each other
    assert small[2] == 0 < default[2] and small[3] <= 0.25 * 128 + 1  # no large objects
    with pytest.raises(ValueError, match="detection set"):
        generate_image(np.random.default_rng(0), 64, keypoints=True, overlap=True)


def test_option_sets_record_their_options_and_ensure_checks_them(tmp_path):
    write_shapes_dataset(tmp_path / "shapes_small", train=2, val=1, size=48, progress=False)
    manifest = json.loads((tmp_path / "shapes_small" / MANIFEST_NAME).read_text())
    assert "options" not in manifest  # the default set's bytes are unchanged
    with pytest.raises(ValueError, match="options none, but this study needs {'small': True}"):
        ShapesData("shapes_small", small=True).ensure(tmp_path)
    root = ShapesData("shapes_overlap", train=2, val=1, size=48, overlap=True).ensure(
        tmp_path, progress=False
    )
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    info = json.loads((root / "annotations" / "instances_val.json").read_text())["info"]
    assert manifest["options"] == info["mrcnn_edu"]["options"] == {"overlap": True}
    assert ShapesData("shapes_overlap", overlap=True).ensure(tmp_path) == root  # kept as is


def test_cli_make_shapes_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "make-shapes",
                "--overlap",
                "--small",
                "--train",
                "2",
                "--val",
                "1",
                "--size",
                "48",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "data/shapes_overlap_small" / MANIFEST_NAME).read_text())
    assert manifest["options"] == {"overlap": True, "small": True}


# ------------------------------------------------------------------------------ the plan
def test_plan_steps_from_the_slowest_variant(monkeypatch):
    study = get_study("roi-pool")
    secs = {"c4-pool": 0.5, "c4-align": 1.0, "c4-aligned": 2.0}
    timed = []

    def fake_time(exp, data_dir, device="cpu"):
        name = {
            ("pool", False): "c4-pool",
            ("align", False): "c4-align",
            ("align", True): "c4-aligned",
        }[(exp.model.roi_heads.pooler_op, exp.model.roi_heads.aligned)]
        timed.append(name)
        return secs[name]

    monkeypatch.setattr(ablate, "time_variant", fake_time)
    plan = plan_steps(study, "c4", None, minutes=1.0, steps=None)
    assert sorted(timed) == sorted(secs)  # only the group's variants are timed
    assert plan["steps"] == int(60 * 0.85 / 2.0) == 25  # the slowest sets the steps
    assert plan_steps(study, "c4", None, minutes=0.1, steps=None)["steps"] == ablate.MIN_STEPS
    assert plan_steps(study, "c4", None, minutes=1000.0, steps=None)["steps"] == 1000  # recipe
    timed.clear()
    assert plan_steps(study, "c4", None, minutes=1.0, steps=None, plan=plan) is plan
    assert not timed  # a resumed study reuses its plan
    with pytest.raises(
        ValueError,
        match=r"planned with --minutes 1.0 \(25 steps\), not "
        r"--minutes 2.0",
    ):
        plan_steps(study, "c4", None, minutes=2.0, steps=None, plan=plan)
    with pytest.raises(ValueError, match="not --steps 7"):
        plan_steps(study, "c4", None, minutes=1.0, steps=7, plan=plan)


def test_fit_schedule_keeps_every_run_to_the_same_steps():
    exp = get_experiment("shapes")
    ablate.fit_schedule(exp, 40)
    t = exp.train
    assert (t.steps, t.warmup_steps, t.max_minutes, t.checkpoint_every, t.keep_last) == (
        40,
        4,
        None,
        10,
        1,
    )


# ------------------------------------------------------------------------- end to end
def test_two_step_study_end_to_end_and_resume(tmp_path, monkeypatch):
    study = _tiny_study("roi-pool", ("c5-pool", "c5-align"))
    study = dataclasses.replace(study, data=dataclasses.replace(study.data, val=3))
    kw = {
        "seeds": 1,
        "minutes": None,
        "data_root": tmp_path / "data",
        "out_dir": tmp_path / "out",
        "progress": False,
        "steps": 2,
        "overrides": TINY,
        "work_dir": tmp_path / "work",
        # keep 2 of the 3 val images; every detection (a 2-step model scores low)
        "prediction_images": 2,
        "prediction_min_score": 0.0,
        "pretrain_steps": 2,  # one ResNet body pre-trained for every variant
    }
    calls = []
    real = ablate.run_training

    def counting(exp, *a, **k):
        calls.append(exp.model.roi_heads.pooler_op)
        return real(exp, *a, **k)

    monkeypatch.setattr(ablate, "run_training", counting)
    records = run_study(study, command="pytest", **kw)
    assert calls == ["pool", "align"] and len(records) == 2
    out = tmp_path / "out"
    manifest = json.loads((tmp_path / "data" / "shapes_128" / MANIFEST_NAME).read_text())
    assert manifest.get("options", {}) == {} and manifest["size"] == 64  # written
    for v in study.variants:
        rec = json.loads((out / f"roi-pool_{v.name}_seed0.json").read_text())
        assert (
            rec["config"]["model"]["roi_heads"]["pooler_op"]
            == v.overrides["model.roi_heads.pooler_op"]
        )
        assert rec["config"]["model"]["backbone"]["kind"] == "resnet_c5"
        assert rec["config"]["train"]["seed"] == 0 and rec["seed"] == 0
        assert rec["steps"] == rec["steps_planned"] == 2 and rec["minutes"] >= 0
        assert rec["git"]["commit"] is None or len(rec["git"]["commit"]) == 40
        assert rec["machine"]["cpu_count"] >= 1
        assert rec["machine"]["torch"] == torch.__version__
        assert set(rec["stats"]) == {"bbox", "segm"}
        assert all(len(rec["stats"][t]) == 12 for t in ("bbox", "segm"))  # full COCOeval stats
        assert rec["data"]["options"] == {} and rec["command"] == "pytest"
    assert (tmp_path / "work/roi-pool/c5-pool/seed0/last.pt").is_file()  # first seed kept

    # every variant started from the same pre-trained body, recorded with its hash
    weights = tmp_path / "work" / "pretrained" / "shapes_128_resnet10_2steps.pt"
    sha = ablate.file_sha256(weights)
    for v in study.variants:
        rec = json.loads((out / f"roi-pool_{v.name}_seed0.json").read_text())
        assert rec["pretrained"]["sha256"] == sha and rec["pretrained"]["steps"] == 2
        assert rec["config"]["model"]["backbone"]["weights"] == str(weights)

    # each run keeps its detections on the val images of smallest id, beside its JSON
    for v in study.variants:
        rec = json.loads((out / f"roi-pool_{v.name}_seed0.json").read_text())
        path = out / f"roi-pool_{v.name}_seed0.predictions.json"
        assert path == ablate.predictions_file(out, "roi-pool", v.name, 0) and path.is_file()
        assert rec["predictions"]["file"] == path.name and rec["predictions"]["image_ids"] == [1, 2]
        assert rec["data"]["evaluated_images"] == 3
        preds = ablate.load_predictions(path)
        assert len(preds) == rec["predictions"]["num_detections"] > 0
        assert {p["image_id"] for p in preds} <= {1, 2}  # image 3 was evaluated, not kept
        for p in preds:
            mask = mask_utils.decode(p["segmentation"])
            assert mask.shape == (64, 64) and mask.dtype == np.uint8  # the val image's size
            assert p["category_id"] in (1, 3, 5)  # COCO category ids, not training labels
        assert not (tmp_path / f"work/roi-pool/{v.name}/seed0/eval_results.json").exists()
        assert path.stat().st_size < 64 * 1024
    # against an evaluation of the kept checkpoint: the same detections on images 1 and 2
    model, exp = load_model(tmp_path / "work/roi-pool/c5-pool/seed0/last.pt")
    _, val = build_datasets(exp, tmp_path / "data" / "shapes_128", train=False)
    evaluate(model, val, iou_types=("bbox", "segm"), progress=False, results_file=tmp_path / "r")
    full = [r for r in json.loads((tmp_path / "r").read_text()) if r["image_id"] in (1, 2)]
    kept = ablate.load_predictions(out / "roi-pool_c5-pool_seed0.predictions.json")
    assert len(kept) == len(full)
    full.sort(key=lambda r: (r["image_id"], -r["score"]))
    for a, b in zip(full, kept):
        assert a["segmentation"] == b["segmentation"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["roi-pool/c5"]["steps"] == 2 and plan["roi-pool/c5"]["how"] == "given"
    assert plan["roi-pool/pretrain"]["sha256"] == sha
    text = (out / "results.md").read_text()
    assert "| RoIPool | 1 | 2 |" in text and "| RoIAlign | 1 | 2 |" in text
    assert "23.6" in text and "30.9" in text and "one seed only" in text

    # resume: everything is there, nothing trains
    calls.clear()
    again = run_study(study, **kw)
    assert calls == [] and [r["variant"] for r in again] == ["c5-pool", "c5-align"]
    # an interrupted study re-runs only what is missing, with the plan it was started with
    (out / "roi-pool_c5-align_seed0.json").unlink()
    with pytest.raises(ValueError, match="planned with --steps 2, not --steps 3"):
        run_study(study, **{**kw, "steps": 3})
    with pytest.raises(ValueError, match="pre-trained for 2 steps, not 3"):
        run_study(study, **{**kw, "pretrain_steps": 3})
    assert calls == []
    stub = _StubRuns()
    monkeypatch.setattr(ablate, "_train_and_evaluate", stub)
    weights.unlink()  # pre-trained again, to the same bytes, or the missing run would differ
    run_study(study, **kw)
    assert stub.calls == [("c5-align", 0, 2)] and ablate.file_sha256(weights) == sha
    with pytest.raises(ValueError, match="set by the pre-training"):
        run_study(study, **{**kw, "overrides": {**TINY, "model.backbone.weights": str(weights)}})


class _StubRuns:
    """Stands in for ablate._train_and_evaluate (no training): records what it was asked to
    run, leaves a file in the run folder, returns a record with fixed metrics."""

    def __init__(self):
        self.calls = []

    def __call__(self, study, variant, seed, *, data_dir, steps, overrides, run_dir, **kw):
        self.calls.append((variant.name, seed, steps))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "last.pt").write_bytes(b"")
        exp = variant.experiment(seed, overrides)
        return {
            **_fake(study.name, variant.name, seed, {"AP": 0.1, "AP50": 0.2, "AP75": 0.05}),
            "steps": steps,
            "config": dataclasses.asdict(exp),
        }


# ------------------------------------------------------------------ statistics and verdicts
def _fake(study: str, variant: str, seed: int, segm: dict, bbox_ap: float = 0.5) -> dict:
    v = get_study(study).variant(variant)
    return {
        "study": study,
        "variant": variant,
        "label": v.label,
        "group": v.group,
        "seed": seed,
        "steps": 100,
        "minutes": 1.5,
        "metrics": {"segm": segm, "bbox": {"AP": bbox_ap}},
        "data": {
            "root": "data/shapes_overlap",
            "train_images": 1000,
            "evaluated_images": 200,
            "size": 256,
            "options": {"overlap": True},
        },
        "git": {"commit": "a" * 40, "dirty": False},
        "machine": {"platform": "Linux", "cpu_count": 2, "torch": "2.x", "device": "cpu"},
        "command": "mrcnn-edu ablate --study mask-loss --seeds 3 --minutes 2",
    }


def test_select_predictions_keeps_the_smallest_ids_and_high_scores():
    def det(image_id: int, score: float) -> dict:
        return {
            "image_id": image_id,
            "category_id": 3,
            "score": score,
            "bbox": [0.0, 0.0, 1.0, 1.0],
            "segmentation": {"size": [4, 4], "counts": "04"},
        }

    results = [det(9, 0.9), det(4, 0.2), det(4, 0.35), det(2, 0.3), det(7, 0.99), det(2, 0.8)]
    kept, chosen = select_predictions(results, [9, 7, 4, 2, 11], num_images=3, min_score=0.3)
    assert kept == [2, 4, 7]  # by id, not by the order evaluated
    # score >= 0.3 (0.3 itself kept, 0.2 dropped), image 9 not kept; by image, then score
    assert [(r["image_id"], r["score"]) for r in chosen] == [
        (2, 0.8),
        (2, 0.3),
        (4, 0.35),
        (7, 0.99),
    ]
    assert select_predictions(results, [4, 2])[0] == [2, 4]  # fewer images than num_images
    with pytest.raises(ValueError, match="prediction images must be >= 1"):
        select_predictions(results, [1], num_images=0)
    with pytest.raises(ValueError, match="lacks \\['segmentation'\\]"):
        select_predictions([{k: v for k, v in det(1, 0.5).items() if k != "segmentation"}], [1])


def test_decode_predictions_round_trip():
    """coco_results (what evaluate writes) -> decode_predictions: the masks, boxes, scores and
    training labels come back."""
    from mrcnn_edu.engine.evaluate import coco_results

    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 1, 20, 24, generator=g) > 0.5).float()  # [N, 1, H, W]
    det = {
        "boxes": torch.tensor([[1.0, 2.0, 10.5, 12.0], [0.0, 0.0, 24.0, 20.0], [3, 4, 5, 6.0]]),
        "labels": torch.tensor([2, 1, 3]),
        "scores": torch.tensor([0.9, 0.5, 0.25]),
        "masks": masks,
    }
    to_cat = {1: 1, 2: 3, 3: 5}
    results = coco_results([det, det], [4, 7], label_to_cat_id=to_cat)
    out = ablate.decode_predictions(results, 7, (20, 24), {c: k for k, c in to_cat.items()})
    assert torch.equal(out["masks"], masks[:, 0].to(torch.uint8))
    assert out["masks"].dtype == torch.uint8 and out["labels"].tolist() == [2, 1, 3]
    torch.testing.assert_close(out["boxes"], det["boxes"])
    torch.testing.assert_close(out["scores"], det["scores"])
    assert ablate.decode_predictions(results, 7, (20, 24))["labels"].tolist() == [3, 1, 5]
    empty = ablate.decode_predictions(results, 99, (20, 24))
    assert empty["masks"].shape == (0, 20, 24) and empty["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="mask of size \\[20, 24\\], but the image is"):
        ablate.decode_predictions(results, 7, (24, 20))
    with pytest.raises(ValueError, match="category id 3, which maps to no label"):
        ablate.decode_predictions(results, 7, (20, 24), {1: 1, 5: 3})


def test_mean_std_by_hand():
    mean, std, n = mean_std([1.0, 2.0, 4.0])
    assert n == 3 and mean == pytest.approx(7 / 3)
    # sum of squared deviations: (4/3)^2 + (1/3)^2 + (5/3)^2 = 42/9, over n - 1 = 2
    assert std == pytest.approx(math.sqrt(42 / 9 / 2))
    mean, std, n = mean_std([0.5, None, float("nan")])
    assert (mean, n) == (0.5, 1) and math.isnan(std)
    assert mean_std([])[2] == 0


def test_table_and_verdicts_from_fake_runs(tmp_path):
    records = []
    for seed, (sig, soft, agn) in enumerate(
        [(0.30, 0.20, 0.33), (0.32, 0.21, 0.30), (0.34, 0.22, 0.32)]
    ):
        records += [
            _fake("mask-loss", "sigmoid", seed, {"AP": sig, "AP50": 0.5, "AP75": sig}),
            _fake("mask-loss", "softmax", seed, {"AP": soft, "AP50": 0.4, "AP75": soft}),
            _fake("mask-loss", "agnostic", seed, {"AP": agn, "AP50": 0.5, "AP75": agn}),
        ]
    for r in records:
        (tmp_path / f"mask-loss_{r['variant']}_seed{r['seed']}.json").write_text(json.dumps(r))
    summaries = {s.variant: s for s in summarize(ablate.load_runs(tmp_path))}
    sig, soft, agn = summaries["sigmoid"], summaries["softmax"], summaries["agnostic"]
    # hand-computed: sigmoid 30, 32, 34 -> 32.0 +- 2.0; softmax 20, 21, 22 -> 21.0 +- 1.0;
    # agnostic 33, 30, 32 -> 31.67 +- sqrt(((4/3)^2 + (5/3)^2 + (1/3)^2) / 2) = 1.53
    assert sig.mean["segm AP"] == pytest.approx(32.0) and sig.std["segm AP"] == pytest.approx(2.0)
    assert soft.mean["segm AP"] == pytest.approx(21.0)
    assert soft.std["segm AP"] == pytest.approx(1.0)
    assert agn.mean["segm AP"] == pytest.approx(95 / 3)
    assert agn.std["segm AP"] == pytest.approx(math.sqrt(42 / 9 / 2))
    assert sig.seeds == [0, 1, 2] and sig.values["bbox AP"] == [50.0, 50.0, 50.0]

    text = format_results(ablate.load_runs(tmp_path))
    assert (
        "| sigmoid (decoupled) | 3 | 100 | 32.0 ± 2.0 | 50.0 ± 0.0 | 32.0 ± 2.0 | "
        "50.0 ± 0.0 | 30.3 | 51.2 | 31.5 | — |" in text
    )
    assert "| softmax (coupled) | 3 | 100 | 21.0 ± 1.0 |" in text
    assert "| class-agnostic | 3 | 100 | 31.7 ± 1.5 |" in text and "| 29.7 | — | — | — |" in text
    assert "mrcnn-edu ablate --study mask-loss --seeds 3 --minutes 2" in text
    assert "Start: random weights (no pre-training)." in text  # the fakes have no "pretrained"
    assert "9 runs, 14 minutes of training (1.5..1.5 per run)." in text
    pre = {"steps": 400, "depth": 10, "sha256": "b" * 64, "val_miou": 0.47}
    pre["val_miou_background_only"] = 0.19
    with_start = [{**r, "pretrained": pre, "eval_minutes": 0.5} for r in records]
    text = format_results(with_start)
    assert (
        "Start: every run from one ResNet-10 pre-trained for 400 steps on semantic "
        "segmentation of the training images (`engine.pretrain`; val mean IoU 0.47, against "
        "0.19 for calling every pixel background; SHA-256 bbbbbbbbbbbb)"
    ) in text
    assert "(1.5..1.5 per run) and 4 of evaluation." in text
    with_start[0] = {**with_start[0], "pretrained": {**pre, "sha256": "c" * 64}}
    assert "DIFFERENT weights" in format_results(with_start)
    text = format_results(records)
    # sigmoid vs softmax: +11.0 > spread 2.0; sigmoid vs agnostic: +0.33 < spread 2.0
    assert (
        "mask AP: sigmoid (decoupled) 32.0 ± 2.0 vs softmax (coupled) 21.0 ± 1.0, a "
        "difference of +11.0 points, larger than the spread over seeds (2.0): sigmoid "
        "(decoupled) is better here, as the paper found."
    ) in text
    assert (
        "mask AP: sigmoid (decoupled) 32.0 ± 2.0 vs class-agnostic 31.7 ± 1.5, a "
        "difference of +0.3 points, within the noise (the spread over seeds is 2.0)"
    ) in text
    # compare(a, b) reads "the paper found a better": the other way round, outside the noise
    assert "sigmoid (decoupled) is better here, unlike the paper" in compare(soft, sig)
    # a difference exactly as large as the spread is not "within"; one seed has no spread
    at = dataclasses.replace(soft, values={**soft.values, "segm AP": [29.0, 31.0, 30.0]})
    assert "+2.0 points, larger than the spread over seeds (2.0)" in compare(sig, at)
    one = dataclasses.replace(sig, values={**sig.values, "segm AP": [30.0]})
    assert "one seed only" in compare(one, soft)


def test_charts_bars_are_means_and_dots_are_seeds():
    values = {"RoIPool": [20.0, 22.0, 24.0], "RoIAlign": [30.0, 31.0, 35.0], "one": [5.0]}
    fig, ax = plt.subplots()
    draw_ablation_bars(ax, values, paper={"RoIPool": 26.9})
    bars = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    assert bars["bar:RoIPool"].get_height() == pytest.approx(22.0)
    assert bars["bar:RoIAlign"].get_height() == pytest.approx(32.0)
    dots = {c.get_gid(): c.get_offsets() for c in ax.collections if c.get_gid()}
    np.testing.assert_allclose(dots["seeds:RoIAlign"][:, 1], [30.0, 31.0, 35.0])
    np.testing.assert_allclose(dots["seeds:one"][:, 1], [5.0])
    assert any(t.get_text() == "paper 26.9" for t in ax.texts)
    with pytest.raises(ValueError, match="values\\['x'\\] must be finite"):
        draw_ablation_bars(ax, {"x": [float("nan")]})
    plt.close(fig)
    fig = plot_ablation_study(
        {"C4": {"mask AP": values}, "C5": {"mask AP": values, "box AP": values}}
    )
    assert len(fig.axes) == 4 and not fig.axes[1].axison  # the empty cell is switched off
    plt.close(fig)


def test_cli_ablate(tmp_path, capsys, monkeypatch):
    """The command's plumbing (training itself is the end-to-end test's): the study's set,
    --set for every variant, --keep, the JSONs, results.md and the chart."""
    write_shapes_dataset(
        tmp_path / "data" / "shapes_overlap", train=4, val=2, size=64, overlap=True, progress=False
    )
    stub = _StubRuns()
    monkeypatch.setattr(ablate, "_train_and_evaluate", stub)
    args = [
        "ablate",
        "--study",
        "mask-loss",
        "--seeds",
        "2",
        "--steps",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--data",
        str(tmp_path / "data"),
        "--work",
        str(tmp_path / "work"),
        "--no-progress",
        "--pretrain-steps",
        "1",
        "--set",
        "train.lr=0.001",
    ]
    assert main(args) == 0
    assert stub.calls == [(v, s, 3) for v in ("sigmoid", "softmax", "agnostic") for s in (0, 1)]
    out = capsys.readouterr().out
    assert "mask-loss softmax seed 1: mask AP 10.0 (3 steps" in out
    assert "## Decoupled vs coupled masks (Table 2b)" in out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["mask-loss.png"] + [
        f"mask-loss_{v}_seed{s}.json" for v in ("agnostic", "sigmoid", "softmax") for s in (0, 1)
    ] + ["plan.json", "results.md"]
    work = tmp_path / "work" / "mask-loss" / "softmax"
    assert (work / "seed0").is_dir() and not (work / "seed1").exists()  # --keep first-seed
    rec = json.loads((tmp_path / "out" / "mask-loss_softmax_seed1.json").read_text())
    assert rec["command"] == (
        "mrcnn-edu ablate --study mask-loss --seeds 2 --steps 3 --pretrain-steps 1 --out "
        f"{tmp_path / 'out'} --data {tmp_path / 'data'} --set "
        "train.lr=0.001"
    )
    assert rec["config"]["model"]["roi_heads"]["mask_loss"] == "softmax"
    assert rec["config"]["train"]["lr"] == 0.001 and rec["config"]["train"]["seed"] == 1
    assert rec["pretrained"]["steps"] == 1
    assert (tmp_path / "work" / "pretrained" / "shapes_overlap_resnet10_1steps.pt").is_file()
    assert main([*args, "--set", "model.roi_heads.mask_loss=softmax"]) == 2
    assert "may not set model.roi_heads.mask_loss" in capsys.readouterr().err


def test_run_dir_of_an_interrupted_run_is_kept_and_a_stale_one_replaced(tmp_path):
    run = tmp_path / "roi-pool" / "c4-pool" / "seed0"
    what = {"variant_overrides": {"model.roi_heads.aligned": False}, "seed": 0, "steps": 40}
    ablate._claim_run_dir(run, what)
    (run / "last.pt").write_bytes(b"checkpoint")  # then the run was interrupted
    ablate._claim_run_dir(run, dict(what))
    assert (run / "last.pt").read_bytes() == b"checkpoint"  # same request: training continues
    ablate._claim_run_dir(run, {**what, "steps": 80})
    assert not (run / "last.pt").exists()  # another request: the old checkpoint is gone
    assert json.loads((run / "ablate_run.json").read_text())["steps"] == 80
    (run / "last.pt").write_bytes(b"x")
    (run / "ablate_run.json").unlink()  # a folder that is not an ablate run's
    ablate._claim_run_dir(run, what)
    assert sorted(p.name for p in run.iterdir()) == ["ablate_run.json"]


RESULTS = Path(__file__).resolve().parents[1] / "results" / "ablations"
# config fields added after the committed runs, with the value that behaves as before them
ADDED_SINCE = {
    "model.roi_heads.mask_rois_per_image": None,
    "model.roi_heads.keypoint_decoding": "torchvision",
    "model.roi_heads.keypoint_rescore": False,
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_committed_runs_are_what_the_studies_build_today():
    """``mrcnn-edu ablate`` reproduces the committed results only if every committed run's
    config is what its variant builds now: the demo's ``shapes`` preset may move on, the studies
    (``STUDY_HEADS``) may not. Only ``data.class_names`` is filled in at run time (from the set)."""
    files = sorted(RESULTS.glob("*_seed*.json"))
    files = [f for f in files if not f.name.endswith(".predictions.json")]
    expected = {
        (s, v.name, seed)
        for s in list_studies()
        for v in get_study(s).variants
        for seed in range(3)
    }
    found = set()
    for path in files:
        record = json.loads(path.read_text(encoding="utf-8"))
        variant = get_study(record["study"]).variant(record["variant"])
        exp = variant.experiment(record["seed"], record.get("shared_overrides"))
        ablate.fit_schedule(exp, record["steps"])
        now = _flat(json.loads(json.dumps(dataclasses.asdict(exp))))
        then = _flat(record["config"])
        now.pop("data.class_names")
        then.pop("data.class_names")
        for key, value in ADDED_SINCE.items():  # fields the runs predate: old behaviour
            assert key not in then and now.pop(key) == value, key
        assert now == then, f"{path.name}: the config {variant.name} builds today differs"
        found.add((record["study"], record["variant"], record["seed"]))
    assert found == expected, f"committed runs missing: {sorted(expected - found)}"

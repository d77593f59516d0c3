"""Configs and named presets: every width, threshold and switch of the model in one place.

A config is a tree of ``@dataclass`` es with a comment on every default; :func:`mrcnn_edu.model.
build_model` translates it into modules in one function (no registry). Presets are plain
functions returning a config, so ``get_preset("maskrcnn-r50-fpn")`` is go-to-definition friendly.

The defaults are torchvision's ``maskrcnn_resnet50_fpn`` (= Mask R-CNN, He et al. 2017, sec. 3.1
"Implementation Details", with FPN): the same weights give the same detections. Widths are
settings so that a CPU preset (``"shapes"``) trains in minutes while ``"maskrcnn-r50-fpn"``
matches torchvision's shapes. Notebook ``07_fpn_full_model.ipynb`` walks through them.

``override(cfg, {"roi_heads.aligned": True})`` changes nested fields by dotted name (the CLI's
``--set key=value``); an unknown key names the nearest existing keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BackboneConfig",
    "ModelConfig",
    "RPNConfig",
    "RoIHeadsConfig",
    "TransformConfig",
    "flat_keys",
    "from_dict",
    "get_preset",
    "list_presets",
    "override",
]

FPN_ANCHOR_SIZES = ((32,), (64,), (128,), (256,), (512,))  # one size per level P2..P6
ASPECT_RATIOS_3 = (0.5, 1.0, 2.0)  # h / w


@dataclass
class BackboneConfig:
    kind: str = "resnet_fpn"  # "resnet_fpn" | "resnet_c4" (Table 2, stride 16) | "resnet_c5" (32)
    depth: int = 50  # ResNet depth: 10 (one block per stage), 18, 34, 50 or 101
    norm: str = "frozen_bn"  # ResNet norm: "frozen_bn" (fine-tuning), "bn" or "gn" (from scratch)
    trainable_layers: int = 3  # ResNet stages trained, counted from the top (0..5)
    fpn_channels: int = 256  # FPN output channels (every level)
    fpn_norm: str | None = None  # None (v1) or "bn" (torchvision's v2 models)
    returned_layers: tuple[int, ...] = (1, 2, 3, 4)  # ResNet stages fed to the FPN (C2..C5)
    # The body's initial weights (the paper fine-tunes ImageNet ones): None = random (the shapes
    # presets train from scratch), a torchvision weights name ("ResNet50_Weights.IMAGENET1K_V1",
    # downloaded once into torch's hub cache) or the path of a local .pth holding a torchvision
    # ResNet state dict (offline). run_training (`mrcnn-edu train`) loads it when a run starts;
    # build_model does not (so building a model never downloads). The model presets keep None;
    # the coco-* training recipes set torchvision's ImageNet weights (engine/recipe.py).
    weights: str | None = None


@dataclass
class RPNConfig:
    anchor_sizes: tuple = FPN_ANCHOR_SIZES  # per level: anchor side lengths in input pixels
    aspect_ratios: tuple = (ASPECT_RATIOS_3,) * 5  # per level: h / w ratios
    conv_depth: int = 1  # 3x3 convs in the RPN head (torchvision v2: 2)
    fg_iou_thresh: float = 0.7  # anchor IoU >= 0.7: object (Faster R-CNN 3.1.2)
    bg_iou_thresh: float = 0.3  # anchor IoU < 0.3: background
    batch_size_per_image: int = 256  # anchors sampled per image for the loss
    positive_fraction: float = 0.5  # at most half of them positive
    pre_nms_top_n_train: int = 2000  # per level, before NMS, training
    pre_nms_top_n_test: int = 1000  # per level, before NMS, testing
    post_nms_top_n_train: int = 2000  # per image, after NMS, training
    post_nms_top_n_test: int = 1000  # per image, after NMS, testing
    nms_thresh: float = 0.7  # IoU of the proposals' NMS
    score_thresh: float = 0.0  # minimum objectness probability of a proposal


@dataclass
class RoIHeadsConfig:
    # pooling (Mask R-CNN sec. 3, "RoIAlign"; Table 2c/2d ablate these three)
    pooler_op: str = "align"  # "align" (RoIAlign) or "pool" (RoIPool, the Fast R-CNN operator)
    aligned: bool = False  # half-pixel shift (detectron2's correction); False = torchvision v1
    sampling_ratio: int = 2  # bilinear samples per bin side (0: adaptive)
    backend: str = "auto"  # mrcnn_edu.ops backend: "auto" | "numba" | "cuda" | "reference" | ...
    box_resolution: int = 7  # pooled size for the box head
    mask_resolution: int = 14  # pooled size for the mask head
    # box head (Fast R-CNN)
    box_head: str = "mlp"  # "mlp" (TwoMLPHead), "convfc" (v2: 4 convs + 1 fc), "res5" (C4)
    representation_size: int = 1024  # width of the box head's fc layers
    box_conv_dims: tuple[int, ...] = (256, 256, 256, 256)  # "convfc" only
    box_norm: str | None = None  # "convfc" only: None or "bn"
    fg_iou_thresh: float = 0.5  # proposal IoU >= 0.5: foreground RoI (sec. 3.1)
    bg_iou_thresh: float = 0.5  # below: background
    batch_size_per_image: int = 512  # RoIs sampled per image ("N is 64 ... 512 for FPN")
    positive_fraction: float = 0.25  # "positive to negative 1:3"
    # training: at most this many of an image's positive RoIs (a random subset) go through the
    # mask and keypoint branches; None: all of them (the paper's and torchvision's rule)
    mask_rois_per_image: int | None = None
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # box coder
    score_thresh: float = 0.05  # test: minimum class probability of a detection
    nms_thresh: float = 0.5  # test: per-class NMS IoU
    detections_per_img: int = 100  # test: keep the best 100 ("top-100 scoring boxes")
    # mask head (sec. 3, figure 4 right)
    mask: bool = True  # False: Faster R-CNN (no mask branch)
    mask_layers: tuple[int, ...] = (256, 256, 256, 256)  # 3x3 convs of the mask head
    mask_dilation: int = 1  # dilation of those convs
    mask_norm: str | None = None  # None (v1) or "bn" (v2)
    mask_dim_reduced: int = 256  # channels of the 2x deconv
    mask_loss: str = "sigmoid"  # "sigmoid" (decoupled, the paper), "softmax", "agnostic"
    # keypoint head (sec. 5: each keypoint a one-hot m x m mask, m = 56)
    keypoint: bool = False  # True: Keypoint R-CNN branch
    num_keypoints: int = 17  # K (COCO persons: 17)
    keypoint_layers: tuple[int, ...] = (512,) * 8  # 3x3 convs ("eight 3x3 512-d conv layers")
    keypoint_resolution: int = 14  # pooled size; heatmaps are 4x larger (56x56)
    # test: heatmap -> keypoint ("torchvision": argmax of the map resized to the RoI's pixels;
    # "subpixel": argmax of the m x m map plus one Newton step on its logits) and whether a
    # detection's score is multiplied by its heatmaps' mean confidence (not torchvision's)
    keypoint_decoding: str = "torchvision"
    keypoint_rescore: bool = False


@dataclass
class TransformConfig:
    min_size: tuple[int, ...] = (800,)  # shorter side (one drawn per image when training)
    max_size: int = 1333  # longer side limit
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB mean
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet RGB std
    size_divisible: int = 32  # pad the batch to a multiple of the largest stride


@dataclass
class ModelConfig:
    num_classes: int = 91  # including background (index 0); COCO's 80 classes use ids 1..90
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    channels_last: bool = False  # run the network in NHWC memory layout (see benchmarks/)


# ----------------------------------------------------------------------------------- presets
def maskrcnn_r50_fpn() -> ModelConfig:
    """torchvision's ``maskrcnn_resnet50_fpn`` (v1): the paper's R50-FPN Mask R-CNN."""
    return ModelConfig()


def maskrcnn_r50_fpn_v2() -> ModelConfig:
    """torchvision's ``maskrcnn_resnet50_fpn_v2`` (Li et al. 2021 "Benchmarking detection
    transfer learning with ViTs"): BN in FPN, a 2-conv RPN head, 4conv+1fc box head, BN mask
    head."""
    cfg = ModelConfig()
    cfg.backbone.norm = "bn"
    cfg.backbone.fpn_norm = "bn"
    cfg.rpn.conv_depth = 2
    cfg.roi_heads.box_head = "convfc"
    cfg.roi_heads.box_norm = "bn"
    cfg.roi_heads.mask_norm = "bn"
    return cfg


def fasterrcnn_r50_fpn() -> ModelConfig:
    """torchvision's ``fasterrcnn_resnet50_fpn``: Mask R-CNN without the mask branch."""
    cfg = maskrcnn_r50_fpn()
    cfg.roi_heads.mask = False
    return cfg


def fasterrcnn_r50_fpn_v2() -> ModelConfig:
    """torchvision's ``fasterrcnn_resnet50_fpn_v2``."""
    cfg = maskrcnn_r50_fpn_v2()
    cfg.roi_heads.mask = False
    return cfg


def keypointrcnn_r50_fpn() -> ModelConfig:
    """torchvision's ``keypointrcnn_resnet50_fpn`` (the paper's sec. 5 person keypoint model):
    2 classes (background, person), no mask branch, 17 keypoints, multi-scale training with the
    shorter side in 640..800."""
    cfg = ModelConfig(num_classes=2)
    cfg.roi_heads.mask = False
    cfg.roi_heads.keypoint = True
    cfg.transform.min_size = (640, 672, 704, 736, 768, 800)
    return cfg


def maskrcnn_r50_c4() -> ModelConfig:
    """The paper's ResNet-50-C4 (Table 2): RPN and RoI pooling on res4 (stride 16), res5 as the
    RoI head on 14x14 pooled features; 15 anchors per location at one level."""
    cfg = ModelConfig()
    cfg.backbone.kind = "resnet_c4"
    cfg.rpn.anchor_sizes = ((32, 64, 128, 256, 512),)
    cfg.rpn.aspect_ratios = (ASPECT_RATIOS_3,)
    cfg.rpn.pre_nms_top_n_train = 12000  # Detectron's C4 setting (one level)
    cfg.rpn.pre_nms_top_n_test = 6000
    cfg.rpn.post_nms_top_n_train = 2000
    cfg.rpn.post_nms_top_n_test = 1000
    cfg.roi_heads.box_head = "res5"
    cfg.roi_heads.box_resolution = 14
    cfg.roi_heads.mask_resolution = 14
    cfg.roi_heads.batch_size_per_image = 64  # sec. 3.1: "N is 64 for the C4 backbone"
    return cfg


def maskrcnn_r50_c5() -> ModelConfig:
    """A stride-32 variant (Table 2d): everything pooled from res5 (C5), FPN-style heads."""
    cfg = ModelConfig()
    cfg.backbone.kind = "resnet_c5"
    cfg.rpn.anchor_sizes = ((32, 64, 128, 256, 512),)
    cfg.rpn.aspect_ratios = (ASPECT_RATIOS_3,)
    return cfg


def shapes() -> ModelConfig:
    """A from-scratch model for the 256 px synthetic shapes set, small enough to train on a
    2-core CPU in minutes: ResNet-10 (ResNet-18's stages with one block each) with trainable
    BN, a 64-channel FPN, a 256-d box head on 128 RoIs per image, a mask head of four
    64-channel convs trained on at most 16 positive RoIs per image, anchors scaled to 256 px
    images. Categories: background + the 3 shapes
    (``CocoDetection`` maps the generator's gapped ids 1, 3, 5 to labels 1, 2, 3), so
    ``num_classes = 4``.

    Why so small: a training step on a CPU is bound by convolution arithmetic, so AP within a
    fixed wall-clock budget grows with steps per minute. Once the RPN finds the objects, the
    mask head runs on every positive RoI (up to 32 per image here) and its convolutions cost as
    much as the backbone's, so it trains on a random 16 of them (``mask_rois_per_image``):
    the box head still learns from all 128 RoIs, the mask head keeps its four convolutions. A
    step of this network takes about 0.58 s once trained where ResNet-18 with a 128-channel
    FPN and heads took 1.6 s fresh (more once trained), and 10 minutes on a quiet 2-core CPU
    reach about 1000 steps and mask AP 0.57-0.61 (a slower shared host: 650 steps, 0.41;
    ``benchmarks/RESULTS.md``)."""
    cfg = ModelConfig(num_classes=4)
    cfg.backbone.depth = 10
    cfg.backbone.norm = "bn"
    cfg.backbone.trainable_layers = 5
    cfg.backbone.fpn_channels = 64
    cfg.rpn.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    cfg.rpn.pre_nms_top_n_train = 600
    cfg.rpn.post_nms_top_n_train = 300
    cfg.rpn.pre_nms_top_n_test = 300
    cfg.rpn.post_nms_top_n_test = 150
    cfg.roi_heads.representation_size = 256
    cfg.roi_heads.batch_size_per_image = 128
    cfg.roi_heads.mask_rois_per_image = 16  # the mask head's convs dominate a trained step
    cfg.roi_heads.mask_layers = (64, 64, 64, 64)
    cfg.roi_heads.mask_dim_reduced = 64
    cfg.roi_heads.detections_per_img = 50
    cfg.transform.min_size = (256,)
    cfg.transform.max_size = 256
    return cfg


def stick_figures() -> ModelConfig:
    """Keypoint R-CNN at a CPU's scale for the 256 px stick-figure set (``make-shapes
    --keypoints``): the ``shapes`` backbone (ResNet-10 with trainable BN, 64-channel FPN, anchors
    16..256) and 256-d box head on 128 RoIs per image, no mask branch, a keypoint head of four
    128-channel 3x3 convs (the paper's: eight 512-d) predicting 11 heatmaps of 56 x 56, trained
    on a random 8 of each image's positive RoIs (``mask_rois_per_image``). Classes: background
    + person. At most 20 detections per image: COCO's keypoint AP reads no more
    (``maxDets=20``).

    Why this head: per step a 128-channel head learns more than a 64-channel one, and on 8
    positives it costs about what the 64-channel head costs on 16. In 15 minutes on the same
    2-core host (a slow one: about 850 steps either way) it reached keypoint AP 0.619 against
    0.577 (torchvision's decoding; ``benchmarks/RESULTS.md``). ``make demo-keypoints`` on a
    faster 2-core host: 1561 steps in 15 minutes, keypoint AP 0.761 (box AP 0.674).

    Unlike torchvision's Keypoint R-CNN, it decodes each heatmap to a fraction of a cell
    (``keypoint_decoding = "subpixel"``) and weighs a detection's score by how sure its heatmaps
    are (``keypoint_rescore``): the figures are small (median area ~1250 px^2), where OKS
    tolerates about 2 px for the head, and the two add about 0.03 keypoint AP to the same
    trained weights (0.619 -> 0.654 for the run above)."""
    cfg = shapes()
    cfg.num_classes = 2
    cfg.roi_heads.mask = False
    cfg.roi_heads.keypoint = True
    cfg.roi_heads.num_keypoints = 11  # mrcnn_edu.data.shapes.KEYPOINT_NAMES
    cfg.roi_heads.keypoint_layers = (128, 128, 128, 128)
    cfg.roi_heads.mask_rois_per_image = 8  # the keypoint head's convs: 8 of the positives
    cfg.roi_heads.detections_per_img = 20
    cfg.roi_heads.keypoint_decoding = "subpixel"  # not torchvision's: see the docstring
    cfg.roi_heads.keypoint_rescore = True
    return cfg


_PRESETS = {
    "maskrcnn-r50-fpn": maskrcnn_r50_fpn,
    "maskrcnn-r50-fpn-v2": maskrcnn_r50_fpn_v2,
    "fasterrcnn-r50-fpn": fasterrcnn_r50_fpn,
    "fasterrcnn-r50-fpn-v2": fasterrcnn_r50_fpn_v2,
    "keypointrcnn-r50-fpn": keypointrcnn_r50_fpn,
    "maskrcnn-r50-c4": maskrcnn_r50_c4,
    "maskrcnn-r50-c5": maskrcnn_r50_c5,
    "shapes": shapes,
    "stick-figures": stick_figures,
}


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return sorted(_PRESETS)


def unknown_name(name: str, choices, what: str = "preset") -> KeyError:
    """The error for a name that is not among ``choices``: the nearest names, then all."""
    close = difflib.get_close_matches(name, list(choices), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return KeyError(f"unknown {what} {name!r}{hint}; {what}s: {', '.join(sorted(choices))}")


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for preset ``name``; an unknown name lists the presets."""
    if name not in _PRESETS:
        raise unknown_name(name, _PRESETS)
    return _PRESETS[name]()


# ---------------------------------------------------------------------------------- overrides
def flat_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"roi_heads.aligned": False, ...}``: every leaf field of a config tree by dotted name."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flat_keys(value, key + "."))
        else:
            out[key] = value
    return out


def _coerce(value: Any, current: Any, key: str, hint: Any = None) -> Any:
    """Turn a ``--set`` string into the type of the field's current value (a field annotated
    ``str | None`` takes any string as is, e.g. a path ``./resnet50.pth``; ``none`` is None)."""
    if not isinstance(value, str):
        return value
    if hint == (str | None):
        return None if value in ("None", "none", "null") else value
    import ast

    if isinstance(current, bool):
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"--set {key}: expected true/false, got {value!r}")
    if isinstance(current, str) or (current is None and value[:1] not in "([{0123456789-."):
        return None if value in ("None", "none", "null") else value
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise ValueError(
            f"--set {key}: cannot read {value!r} as a {type(current).__name__}"
        ) from None
    if isinstance(current, float) and isinstance(parsed, int):
        parsed = float(parsed)
    if isinstance(current, tuple) and isinstance(parsed, list):
        parsed = tuple(parsed)
    if isinstance(current, tuple) and not isinstance(parsed, tuple):
        parsed = (parsed,)
    if current is not None and not isinstance(parsed, type(current)):
        raise ValueError(f"--set {key}: expected a {type(current).__name__}, got {value!r}")
    return parsed


def override(cfg: Any, changes: dict[str, Any]) -> Any:
    """Set nested fields by dotted name, in place, and return ``cfg``.

    Strings are parsed into the field's type (``"true"``, ``"0.01"``, ``"(800, 1024)"``), so
    ``override(cfg, {"roi_heads.pooler_op": "pool"})`` and the CLI's ``--set`` share one path.
    An unknown key raises ``KeyError`` naming the nearest keys.
    """
    keys = flat_keys(cfg)
    for key, value in changes.items():
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.5)
            hint = f"; nearest: {', '.join(close)}" if close else ""
            raise KeyError(f"unknown config key {key!r}{hint}")
        *path, leaf = key.split(".")
        node = cfg
        for p in path:
            node = getattr(node, p)
        try:
            hint = typing.get_type_hints(type(node)).get(leaf)
        except (NameError, TypeError):  # an annotation that does not evaluate: go by the value
            hint = None
        setattr(node, leaf, _coerce(value, getattr(node, leaf), key, hint))
    return cfg


def from_dict(cls, values: dict):
    """Rebuild a config dataclass ``cls`` from ``dataclasses.asdict`` output (e.g. the config
    stored in a checkpoint): nested dataclasses are rebuilt, lists become tuples again, and a
    key the dataclass does not have is an error naming it."""
    if not isinstance(values, dict):
        raise TypeError(f"from_dict({cls.__name__}): expected a dict, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"from_dict({cls.__name__}): unknown fields {unknown}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        hint = hints.get(f.name)
        if dataclasses.is_dataclass(hint):
            v = from_dict(hint, v)
        elif isinstance(v, list):
            v = _to_tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def _to_tuple(v):
    return tuple(_to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v

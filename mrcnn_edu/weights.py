"""Load torchvision's detection checkpoints into ``mrcnn_edu`` models.

torchvision's COCO-trained ``maskrcnn_resnet50_fpn`` (box AP 37.9, mask AP 34.6 on val2017) and
its v2 (47.4 / 41.8), and the two Faster R-CNNs, load into the matching ``mrcnn_edu`` model
through :data:`KEY_TABLE`, an explicit table from torchvision's parameter names to ours. Most
names are the same by design (the ResNet body, the RPN head, the heads); the FPN's are renamed
for reading (``inner_blocks`` -> ``lateral_convs``, ``layer_blocks`` -> ``output_convs``).
The same weights give the same detections (``tests/test_model_equivalence.py``).

These machines cannot download anything: ``from_torchvision`` takes a file path, a state dict,
a torchvision model, or a torchvision weights enum (``MaskRCNN_ResNet50_FPN_Weights.DEFAULT``,
which downloads where the network allows).

Notebook ``07_fpn_full_model.ipynb`` runs the equivalence check live.

:func:`load_backbone_weights` gives a freshly built model its ResNet's ImageNet start (the
config's ``backbone.weights``: a torchvision enum name or a local ``.pth``), as
``run_training`` does when a run of a ``coco-*`` recipe starts (notebook ``09_coco_training``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .backbone import Res5Head, ResNetBody, load_resnet_weights, resnet_state_dict
from .config import ModelConfig, get_preset
from .model import MaskRCNN, build_model
from .utils import describe_mismatch, load_torch_dict

__all__ = [
    "ARCHS",
    "KEY_TABLE",
    "from_torchvision",
    "load_backbone_weights",
    "load_torchvision_state_dict",
    "map_torchvision_key",
    "map_torchvision_state_dict",
    "to_torchvision_state_dict",
]

# torchvision builder name -> our preset
ARCHS: dict[str, str] = {
    "maskrcnn_resnet50_fpn": "maskrcnn-r50-fpn",
    "maskrcnn_resnet50_fpn_v2": "maskrcnn-r50-fpn-v2",
    "fasterrcnn_resnet50_fpn": "fasterrcnn-r50-fpn",
    "fasterrcnn_resnet50_fpn_v2": "fasterrcnn-r50-fpn-v2",
    "keypointrcnn_resnet50_fpn": "keypointrcnn-r50-fpn",
}

# (torchvision pattern, our replacement), tried in order; the first that matches wins.
# v1 FPN convs have no norm: torchvision wraps each conv in Conv2dNormActivation (index 0), we
# keep a bare Conv2d. v2 FPN convs have a BatchNorm: both sides are (conv, norm) sequences.
KEY_TABLE: list[tuple[str, str]] = [
    (r"^backbone\.body\.", "backbone.body."),  # ResNet: torchvision's resnet names
    (
        r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.(weight|bias)$",
        r"backbone.fpn.lateral_convs.\1.\2",
    ),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.", r"backbone.fpn.lateral_convs.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.(weight|bias)$", r"backbone.fpn.output_convs.\1.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.", r"backbone.fpn.output_convs.\1."),
    (r"^rpn\.head\.", "rpn.head."),  # conv.<i>.0, cls_logits, bbox_pred
    (r"^roi_heads\.box_head\.", "roi_heads.box_head."),  # fc6/fc7 (v1), 0.0 ... (v2)
    (r"^roi_heads\.box_predictor\.", "roi_heads.box_predictor."),  # cls_score, bbox_pred
    (r"^roi_heads\.mask_head\.", "roi_heads.mask_head."),  # <i>.0 conv (, <i>.1 norm)
    (r"^roi_heads\.mask_predictor\.", "roi_heads.mask_predictor."),  # conv5_mask, logits
    (r"^roi_heads\.keypoint_head\.", "roi_heads.keypoint_head."),  # 0, 2, ..., 14 (convs)
    (r"^roi_heads\.keypoint_predictor\.", "roi_heads.keypoint_predictor."),  # kps_score_lowres
]
_COMPILED = [(re.compile(p), r) for p, r in KEY_TABLE]


def map_torchvision_key(key: str, fpn_norm: bool = False) -> str:
    """Our name for torchvision parameter/buffer ``key`` (``KeyError`` if no rule matches).

    ``fpn_norm``: the FPN has a norm layer (v2), so ``inner_blocks.i.0`` stays a sequence
    index (``lateral_convs.i.0``) instead of collapsing onto a bare conv.
    """
    for pattern, repl in _COMPILED:
        if fpn_norm and "fpn" in pattern.pattern and r"\.0\.(weight|bias)$" in pattern.pattern:
            continue
        if pattern.search(key):
            return pattern.sub(repl, key)
    raise KeyError(f"no rule of mrcnn_edu.weights.KEY_TABLE maps torchvision key {key!r}")


def _has_fpn_norm(state_dict: Mapping[str, Any]) -> bool:
    return any(re.match(r"^backbone\.fpn\.inner_blocks\.\d+\.1\.", k) for k in state_dict)


def map_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision names -> ours, for every entry (order kept)."""
    fpn_norm = _has_fpn_norm(state_dict)
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        try:
            out[map_torchvision_key(key, fpn_norm)] = value
        except KeyError:
            unmapped.append(key)
    if unmapped:
        raise KeyError(
            f"{len(unmapped)} torchvision keys match no rule of KEY_TABLE: "
            f"{unmapped[:10]}{' ...' if len(unmapped) > 10 else ''}"
        )
    return out


def to_torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our model's state dict under torchvision's names (the table inverted)."""
    ours = model.state_dict()
    fpn_norm = any(re.match(r"^backbone\.fpn\.lateral_convs\.\d+\.1\.", k) for k in ours)
    inverse = {}
    for key in ours:
        tv = key
        tv = re.sub(
            r"^backbone\.fpn\.lateral_convs\.(\d+)\.",
            r"backbone.fpn.inner_blocks.\1." if fpn_norm else r"backbone.fpn.inner_blocks.\1.0.",
            tv,
        )
        tv = re.sub(
            r"^backbone\.fpn\.output_convs\.(\d+)\.",
            r"backbone.fpn.layer_blocks.\1." if fpn_norm else r"backbone.fpn.layer_blocks.\1.0.",
            tv,
        )
        assert map_torchvision_key(tv, fpn_norm) == key, (key, tv)
        inverse[tv] = ours[key]
    return inverse


def load_torchvision_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, what: str = "the checkpoint"
) -> None:
    """Load a torchvision-named state dict into ``model`` (strict).

    BatchNorm's ``num_batches_tracked`` counters are dropped where our model has frozen
    BatchNorm (torchvision's ``FrozenBatchNorm2d`` drops them too). Any other missing or
    unexpected key, or a shape mismatch, raises ``ValueError`` naming them.
    """
    mapped = map_torchvision_state_dict(state_dict)
    own = model.state_dict()
    mapped = {
        k: v for k, v in mapped.items() if not (k.endswith("num_batches_tracked") and k not in own)
    }
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            describe_mismatch(f"{what} does not fit the model", missing, unexpected, shapes)
        )
    for k in own:  # counters the checkpoint lacks keep their value
        if k not in mapped:
            mapped[k] = own[k]
    model.load_state_dict(mapped, strict=True)


def _state_dict_from(source: Any) -> tuple[dict[str, Tensor], str]:
    if isinstance(source, nn.Module):
        return source.state_dict(), f"the {type(source).__name__} model"
    if isinstance(source, Mapping):
        sd = (
            source.get("model", source)
            if "model" in source and isinstance(source.get("model"), Mapping)
            else source
        )
        return dict(sd), "the state dict"
    if isinstance(source, (str, Path)):
        path = Path(source)
        sd, _ = _state_dict_from(load_torch_dict(path, "checkpoint"))
        return sd, str(path)
    if hasattr(source, "get_state_dict"):  # a torchvision WeightsEnum member
        return source.get_state_dict(progress=True), f"torchvision weights {source}"
    raise TypeError(
        f"from_torchvision: source must be a path, a state dict, a torchvision "
        f"model or weights enum, got {type(source).__name__}"
    )


def from_torchvision(
    source: Any, arch: str = "maskrcnn_resnet50_fpn", *, config: ModelConfig | None = None
) -> MaskRCNN:
    """The ``mrcnn_edu`` model for torchvision builder ``arch`` with ``source``'s weights, in
    eval mode.

    Args:
        source: checkpoint file path, state dict, torchvision model, or torchvision weights
            enum member (downloads where the network allows).
        arch: ``maskrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn_v2``,
            ``fasterrcnn_resnet50_fpn`` or ``fasterrcnn_resnet50_fpn_v2``.
        config: optional config to build instead of the arch's preset (e.g. other test-time
            thresholds); ``num_classes`` is always taken from the checkpoint.

    The ResNet body uses frozen BatchNorm (what the COCO checkpoints were trained with; in
    eval mode BatchNorm and frozen BatchNorm compute the same).
    """
    if arch not in ARCHS:
        raise ValueError(
            f"from_torchvision: unknown arch {arch!r}; choose one of {', '.join(ARCHS)}"
        )
    state_dict, what = _state_dict_from(source)
    cfg = config if config is not None else get_preset(ARCHS[arch])
    cfg.backbone.norm = "frozen_bn"
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state_dict:
        raise ValueError(
            f"from_torchvision: {what} is not a {arch} checkpoint (no {key!r}; "
            f"first keys: {list(state_dict)[:5]})"
        )
    cfg.num_classes = int(state_dict[key].shape[0])
    kp_key = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
    if kp_key in state_dict:  # ConvTranspose2d weight [in, K, 4, 4]
        cfg.roi_heads.num_keypoints = int(state_dict[kp_key].shape[1])
    model = build_model(cfg)
    load_torchvision_state_dict(model, state_dict, what=f"{what} (as {arch})")
    return model.eval()


def load_backbone_weights(model: nn.Module, weights: Any = None) -> nn.Module:
    """Load a ResNet's initial weights (e.g. ImageNet's) into every ResNet part of ``model``.

    The parts are the :class:`~mrcnn_edu.backbone.ResNetBody` of the backbone and, in the C4
    design, the :class:`~mrcnn_edu.backbone.Res5Head` that runs ``layer4`` per RoI; each takes
    the entries of the file under its torchvision names, strictly (a file of another depth, or
    with foreign keys, raises ``ValueError`` naming them). Frozen BatchNorm takes the file's
    statistics. Nothing else changes: the FPN and the heads keep their initialisation, and no
    random number is drawn, so a seeded run differs from one without weights only in the body.

    Args:
        model: a model from :func:`~mrcnn_edu.model.build_model`.
        weights: what :func:`~mrcnn_edu.backbone.resnet_state_dict` accepts (a torchvision enum
            name such as ``"ResNet50_Weights.IMAGENET1K_V1"``, a ``.pth`` path, a state dict);
            default ``model.config.backbone.weights``. ``None`` there too: nothing is loaded.

    Returns:
        ``model`` (loaded in place).
    """
    if weights is None:
        config = getattr(model, "config", None)
        weights = getattr(getattr(config, "backbone", None), "weights", None)
        if weights is None:
            return model
    parts = [m for m in model.modules() if isinstance(m, (ResNetBody, Res5Head))]
    if not parts:
        raise ValueError(
            f"load_backbone_weights: {type(model).__name__} holds no ResNet body to load "
            f"{weights!r} into"
        )
    what = str(weights) if isinstance(weights, (str, Path)) else "the state dict"
    state_dict = resnet_state_dict(weights, "load_backbone_weights")  # read (or fetch) once
    for part in parts:  # (modules() yields a Res5Head shared by the box and mask heads once)
        load_resnet_weights(part, state_dict, who="load_backbone_weights", what=what)
    return model

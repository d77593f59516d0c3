"""Backbones: the convolutional trunk that turns images into feature maps.

Every backbone returns the same thing: an ``OrderedDict`` of named feature maps, finest first,
and carries ``out_channels`` and ``strides`` so the RPN's anchor generator and the RoI pooler can
be matched to it. This file holds:

* :class:`TinyBackbone`: a handful of conv + BatchNorm + ReLU layers small enough to train a
  Region Proposal Network (Ren et al. 2015, section 3.1) on 256x256 shapes images on a 2-core CPU
  in a few minutes. Notebook ``04_anchors_and_rpn.ipynb`` trains an RPN on it.
* The real backbone of Mask R-CNN (He et al. 2017, section 3, "Network Architecture"): a ResNet
  (He et al. 2016) with frozen BatchNorm (:class:`FrozenBatchNorm2d`, :func:`resnet_body`) under
  a Feature Pyramid Network (Lin et al. 2017, "Feature Pyramid Networks for Object Detection",
  section 3: :class:`FPN`, :class:`BackboneWithFPN`, :func:`resnet_fpn_backbone`). Notebook
  ``07_fpn_full_model.ipynb`` explains it.
* The single-map variants of the paper's Table 2 ablations: "C4" (the RoI features are cropped
  from ResNet's stage 4 and the stage-5 blocks run per RoI, :class:`ResNetC4Backbone` +
  :class:`Res5Head`) and "C5" (one stride-32 map, :class:`ResNetC5Backbone`).

The ResNets are torchvision's own classes (``torchvision.models.resnet``; the paper does not
change ResNet), so every parameter keeps torchvision's name (``conv1.weight``, ``bn1.weight``,
``layer1.0.conv1.weight``, ...) and torchvision's detection checkpoints (``backbone.body.*``)
load with a prefix change only. They start random (``weights=None``) or from pre-trained weights
(``weights="ResNet50_Weights.IMAGENET1K_V1"`` or a local ``.pth``: the ImageNet pre-training
the paper fine-tunes from; :func:`resnet_state_dict`, :func:`load_resnet_weights`).
The FPN is written out here, readably; its parameter names map onto torchvision's
``FeaturePyramidNetwork`` as::

    norm=None:   inner_blocks.{i}.0.{weight,bias}  ->  lateral_convs.{i}.{weight,bias}
                 layer_blocks.{i}.0.{weight,bias}  ->  output_convs.{i}.{weight,bias}
    norm="bn":   inner_blocks.{i}.{0,1}.*          ->  lateral_convs.{i}.{0,1}.*
                 layer_blocks.{i}.{0,1}.*          ->  output_convs.{i}.{0,1}.*
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as resnet_models

__all__ = [
    "FPN",
    "BackboneWithFPN",
    "FrozenBatchNorm2d",
    "Res5Head",
    "ResNetBody",
    "ResNetC4Backbone",
    "ResNetC5Backbone",
    "TinyBackbone",
    "freeze_resnet",
    "load_resnet_weights",
    "norm_layer",
    "resnet_body",
    "resnet_fpn_backbone",
    "resnet_state_dict",
    "torchvision_resnet",
]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias, BN has one) -> BatchNorm -> ReLU; halves the size when ``stride=2``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """A small strided CNN with one output feature map per entry of ``strides``.

    Stage ``s`` halves the resolution with a stride-2 conv then adds ``depth - 1`` stride-1
    convs; stage widths grow as ``width * 2**s`` (capped at ``8 * width``). The stages whose
    cumulative stride is in ``strides`` are projected by a 1x1 conv to ``out_channels`` channels
    (like FPN's lateral convs, without the top-down path) and returned.

    Args:
        out_channels: channels of every returned feature map (the RPN head's ``in_channels``).
        strides: strides of the returned maps, powers of two >= 2, e.g. ``(8, 16)``.
        width: channels of the first stage.
        depth: convs per stage (>= 1).
        generator: optional ``torch.Generator`` for the weight init; without it the init draws
            from torch's global RNG, so ``torch.manual_seed`` before construction fixes it.

    ``forward(images [B, 3, H, W] float32) -> OrderedDict[str, Tensor]`` with keys ``"0"``,
    ``"1"``, ... (finest first); map ``i`` has shape ``[B, out_channels, ceil(H / s_i),
    ceil(W / s_i)]`` where ``s_i = strides[i]``.
    """

    def __init__(
        self,
        out_channels: int = 64,
        strides: tuple[int, ...] = (8, 16),
        width: int = 16,
        depth: int = 2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        strides = tuple(int(s) for s in strides)
        if (
            not strides
            or any(s < 2 or s & (s - 1) for s in strides)
            or list(strides) != sorted(set(strides))
        ):
            raise ValueError(
                f"TinyBackbone: strides must be increasing powers of two >= 2, got {strides}"
            )
        if depth < 1 or width < 1 or out_channels < 1:
            raise ValueError(
                f"TinyBackbone: out_channels, width and depth must be >= 1, got "
                f"out_channels={out_channels}, width={width}, depth={depth}"
            )
        self.out_channels = int(out_channels)
        self.strides = strides
        num_stages = int(math.log2(strides[-1]))  # stage s (1-based) has cumulative stride 2**s

        self.stages = nn.ModuleList()
        self.lateral = nn.ModuleDict()
        in_ch = 3
        for s in range(1, num_stages + 1):
            ch = width * 2 ** min(s - 1, 3)
            layers = [_conv_bn_relu(in_ch, ch, stride=2)]
            layers += [_conv_bn_relu(ch, ch, stride=1) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*layers))
            if 2**s in strides:
                self.lateral[str(strides.index(2**s))] = nn.Conv2d(ch, self.out_channels, 1)
            in_ch = ch
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-normal convs (fan_out, ReLU), zero biases, BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """images ``[B, 3, H, W]`` float -> ``OrderedDict`` ``{"0": [B, C, H/s0, W/s0], ...}``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"TinyBackbone: images must be a [B, 3, H, W] tensor, got {got}")
        if not images.is_floating_point():
            raise TypeError(f"TinyBackbone: images must be floating point, got {images.dtype}")
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = images
        for s, stage in enumerate(self.stages, start=1):
            x = stage(x)  # [B, C_s, ceil(H / 2**s), ceil(W / 2**s)]
            if 2**s in self.strides:
                key = str(self.strides.index(2**s))
                features[key] = self.lateral[key](x)  # [B, out_channels, ., .]
        return features


# =============================================================================================
# ResNet + FPN: the backbone of Mask R-CNN (He et al. 2017, section 3, "Network Architecture")
# =============================================================================================
def _check_images(images, who: str, channels: int = 3) -> None:
    """Raise a clear error unless ``images`` is a floating ``[B, channels, H, W]`` tensor."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != channels:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}: input must be a [B, {channels}, H, W] tensor, got {got}")
    if not images.is_floating_point():
        raise TypeError(f"{who}: input must be floating point, got {images.dtype}")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters: ``y = x * scale + shift``.

    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``, per
    channel. All four are buffers (not parameters), so no optimizer touches them and ``train()``
    does not switch to batch statistics.

    Why frozen: a detector sees large images (800 x 1333) and so fits only 1-2 of them on a GPU.
    BatchNorm statistics over such a tiny per-GPU batch are too noisy to train, so Detectron (the
    paper's code) and torchvision keep the ImageNet statistics of the pre-trained ResNet and use
    BatchNorm as a fixed per-channel affine map. (The alternatives that train the statistics,
    BatchNorm synchronised across GPUs and GroupNorm, are ``norm="bn"`` / ``"gn"`` below.)

    Buffer names and numerics are those of ``torchvision.ops.misc.FrozenBatchNorm2d``; a
    ``BatchNorm2d`` state dict loads (its ``num_batches_tracked`` is dropped).

    Args:
        num_features: channels ``C``.
        eps: added to the variance.

    ``forward(x [B, C, H, W]) -> [B, C, H, W]``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm2d has it, we do not
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # every buffer (C,) -> (1, C, 1, 1), broadcast over batch and space
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORMS = ("frozen_bn", "bn", "gn")
GN_GROUPS = 32  # GroupNorm groups (Wu & He 2018, and detectron2's default)
STAGES = ("layer1", "layer2", "layer3", "layer4")  # ResNet stages C2..C5 in torchvision's names
STAGE_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
RESNET_SPECS = {  # depth -> (block class, blocks per stage), as torchvision.models.resnet{depth}
    # ResNet-10: ResNet-18 with one BasicBlock per stage (torchvision's ResNet class, no builder
    # or weights of its own); the CPU-sized ``shapes`` presets use it.
    10: (resnet_models.BasicBlock, (1, 1, 1, 1)),
    18: (resnet_models.BasicBlock, (2, 2, 2, 2)),
    34: (resnet_models.BasicBlock, (3, 4, 6, 3)),
    50: (resnet_models.Bottleneck, (3, 4, 6, 3)),
    101: (resnet_models.Bottleneck, (3, 4, 23, 3)),
}


def norm_layer(norm: str, who: str = "norm_layer"):
    """``"frozen_bn"`` | ``"bn"`` | ``"gn"`` -> a callable ``num_channels -> nn.Module``."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return partial(nn.GroupNorm, GN_GROUPS)  # GroupNorm(32, num_channels)
    raise ValueError(f"{who}: unknown norm {norm!r}; expected one of {NORMS}")


def _check_depth(depth, who: str) -> None:
    if depth not in RESNET_SPECS or isinstance(depth, bool):
        raise ValueError(f"{who}: depth must be one of {tuple(RESNET_SPECS)}, got {depth!r}")


def _check_trainable_layers(trainable_layers, who: str) -> None:
    if (
        not isinstance(trainable_layers, int)
        or isinstance(trainable_layers, bool)
        or not 0 <= trainable_layers <= 5
    ):
        raise ValueError(
            f"{who}: trainable_layers must be an int in 0..5, got {trainable_layers!r}"
        )


def freeze_resnet(resnet: nn.Module, trainable_layers: int) -> None:
    """Freeze (``requires_grad_(False)``) all but the last ``trainable_layers`` ResNet stages.

    The stages, last first, are ``layer4, layer3, layer2, layer1, conv1`` (``5`` also trains
    ``bn1``), exactly as torchvision's ``_resnet_fpn_extractor``: ``3`` (the default of the
    detection models) trains ``layer2..layer4`` and freezes the stem and ``layer1``, whose
    ImageNet features are generic edges and colours.
    """
    _check_trainable_layers(trainable_layers, "freeze_resnet")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in resnet.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)


# ---------------------------------------------------------------------------- initial weights
# Mask R-CNN sec. 3.1: the backbone starts from ImageNet pre-training. ``weights`` (the config's
# ``backbone.weights``) names that start: a torchvision weights enum name (downloaded once into
# torch's hub cache by torchvision's own weights API) or the path of a local ``.pth`` file
# holding a torchvision ResNet state dict (for machines without internet).
RESNET_TOP_LEVEL = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
_ENUM_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*_Weights\.[A-Za-z0-9_]+$")  # ResNet50_Weights.X


def _weights_enum(name: str, who: str):
    """The torchvision ``WeightsEnum`` member called ``name`` (e.g.
    ``"ResNet50_Weights.IMAGENET1K_V1"``), or a ``ValueError`` that lists the members of that
    enum (or says it does not exist)."""
    import torchvision.models

    enum_name, member = name.split(".", 1)
    enum_cls = getattr(torchvision.models, enum_name, None)
    if enum_cls is None or not hasattr(enum_cls, "__members__"):
        raise ValueError(
            f"{who}: torchvision has no weights enum {enum_name!r} (from {name!r}); ResNet "
            f"weights are e.g. 'ResNet50_Weights.IMAGENET1K_V1' or 'ResNet18_Weights.IMAGENET1K_V1'"
        )
    try:
        return torchvision.models.get_weight(name)
    except (KeyError, ValueError):
        members = ", ".join(f"{enum_name}.{m}" for m in enum_cls.__members__)
        raise ValueError(
            f"{who}: torchvision's {enum_name} has no member {member!r}; it has {members}"
        ) from None


def _download_enum(name: str, who: str) -> dict[str, torch.Tensor]:
    """``get_weight(name).get_state_dict(...)``: torchvision's download into torch's hub cache
    (read from there when it is already present), with an error that says what to do offline."""
    import http.client

    weights = _weights_enum(name, who)
    try:
        return dict(weights.get_state_dict(progress=True, check_hash=True))
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, refused, DNS ...
        filename = weights.url.rsplit("/", 1)[-1]
        cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
        raise FileNotFoundError(
            f"{who}: cannot download torchvision's {name} ({type(err).__name__}: {err}). "
            f"Without internet: download {weights.url} on a machine that has it, then either "
            f"copy it to {cache} (torch's hub cache, where torchvision looks first) or put it "
            f"anywhere and pass its path: `mrcnn-edu train ... --set "
            f"model.backbone.weights=/path/to/{filename}` (see data/README.md)"
        ) from err


def _unwrap_state_dict(sd: Mapping, what: str, who: str) -> dict[str, torch.Tensor]:
    """``sd`` itself, or the state dict it wraps under ``"state_dict"`` / ``"model"``."""
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next(
            (sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), Mapping)), None
        )
        if inner is None:
            raise ValueError(
                f"{who}: {what} holds no tensors (keys {sorted(map(str, sd))[:8]}); expected "
                f"a torchvision ResNet state dict such as torchvision's resnet50-0676ba61.pth"
            )
        sd = inner
    return dict(sd)


def resnet_state_dict(weights, who: str = "resnet_state_dict") -> dict[str, torch.Tensor]:
    """The torchvision ResNet state dict that ``weights`` names (``BackboneConfig.weights``).

    Args:
        weights: one of
            * a torchvision weights enum name, e.g. ``"ResNet50_Weights.IMAGENET1K_V1"`` (what
              ``maskrcnn_resnet50_fpn`` starts from): loaded through torchvision's weights API,
              ``get_weight(name).get_state_dict(progress=True, check_hash=True)``, which
              downloads once into torch's hub cache (``torch.hub.get_dir()/checkpoints``);
            * the path of a local ``.pth`` / ``.pt`` file holding a torchvision ResNet state
              dict (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``, ...;
              a dict that wraps it under ``"state_dict"`` or ``"model"`` also works);
            * a state dict (a mapping of tensors), returned as a plain dict;
            * a torchvision weights enum member (``ResNet50_Weights.IMAGENET1K_V1``).

    Returns:
        ``dict`` name -> tensor (on the CPU).

    Raises:
        ValueError: an unknown enum or member name (the error lists the enum's members), a
            string that is neither an existing file nor an enum name, or a file that holds no
            state dict.
        FileNotFoundError: no file at the path, or the download failed (the error names the
            URL to fetch and where to put the file).
    """
    if isinstance(weights, Mapping):
        return _unwrap_state_dict(weights, "the state dict", who)
    if hasattr(weights, "get_state_dict") and hasattr(weights, "url"):  # a WeightsEnum member
        return _download_enum(f"{type(weights).__name__}.{weights.name}", who)
    if not isinstance(weights, (str, Path)):
        raise TypeError(
            f"{who}: weights must be an enum name, a file path or a state dict, got "
            f"{type(weights).__name__}"
        )
    text = str(weights)
    path = Path(text).expanduser()
    if path.is_file():
        from .utils import load_torch_dict

        return _unwrap_state_dict(load_torch_dict(path, "ResNet weights file"), str(path), who)
    if _ENUM_NAME.match(text):
        return _download_enum(text, who)
    if "/" in text or "\\" in text or path.suffix in (".pth", ".pt", ".pkl", ".bin"):
        raise FileNotFoundError(f"{who}: no ResNet weights file at {path}")
    raise ValueError(
        f"{who}: weights {text!r} is neither an existing file nor a torchvision weights name "
        f"such as 'ResNet50_Weights.IMAGENET1K_V1'"
    )


def load_resnet_weights(
    module: nn.Module, weights, *, who: str = "load_resnet_weights", what: str | None = None
) -> None:
    """Load torchvision ResNet weights into ``module``, strictly, by torchvision's names.

    ``module`` holds torchvision's ResNet modules under their names: a torchvision ``ResNet``
    (see :func:`torchvision_resnet`), a :class:`ResNetBody` or a :class:`Res5Head`. Entries of
    the file for the parts of a ResNet that ``module`` does not hold (``fc`` of a body, the
    stages after the last returned one, the stem and ``layer1..3`` of a ``Res5Head``) are
    skipped; every other key must match both ways, with equal shapes. A frozen BatchNorm
    (:class:`FrozenBatchNorm2d`) takes the file's ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` (its ``num_batches_tracked`` is dropped), so it applies ImageNet's
    statistics, as in Detectron and torchvision.

    Args:
        module: the receiving module.
        weights: anything :func:`resnet_state_dict` accepts (an enum name, a path, a state dict).
        who, what: names used in error messages.

    Raises:
        ValueError: keys missing from the file, keys the module does not have, or shape
            mismatches (e.g. a ResNet-18 file for a ResNet-50 body), each listed by name.
    """
    state_dict = resnet_state_dict(weights, who)
    what = what or (str(weights) if isinstance(weights, (str, Path)) else "the state dict")
    own = module.state_dict()
    children = {name for name, _ in module.named_children()}
    take = {
        k: v
        for k, v in state_dict.items()
        if not (k.split(".")[0] in RESNET_TOP_LEVEL and k.split(".")[0] not in children)
        and not (k.endswith("num_batches_tracked") and k not in own)  # frozen BN: no counter
    }
    missing = [k for k in own if k not in take and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in take if k not in own]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in take.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        from .utils import describe_mismatch

        message = describe_mismatch(
            f"{who}: {what} does not fit the {type(module).__name__}", missing, unexpected, shapes
        )
        hints = []
        if any(k.startswith(("backbone.", "module.")) for k in unexpected):
            hints.append(
                "its keys carry a prefix: a detection checkpoint loads with "
                "mrcnn_edu.weights.from_torchvision, a DDP one after stripping 'module.'"
            )
        if any(k.endswith(("running_mean", "running_var")) for k in unexpected):
            hints.append("the file has BatchNorm statistics this model's norm lacks (norm='gn'?)")
        blocks = {".".join(k.split(".")[:2]) for k in take}  # "layer1.0", ... in the file
        if shapes or any(".".join(k.split(".")[:2]) not in blocks for k in missing):
            hints.append("is it a ResNet of another depth?")  # whole blocks absent, or resized
        raise ValueError(message + (f" ({'; '.join(hints)})" if hints else ""))
    for k in own:  # counters the file lacks keep their value
        take.setdefault(k, own[k])
    module.load_state_dict(take, strict=True)


def torchvision_resnet(
    depth: int = 50,
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    generator: torch.Generator | None = None,
    weights=None,
) -> resnet_models.ResNet:
    """A torchvision ``ResNet`` with the chosen norm layer, optionally pre-trained, partly frozen.

    Without ``generator`` the weights are drawn from torch's global RNG exactly as
    ``torchvision.models.resnet{depth}(weights=None, norm_layer=...)`` draws them, so a seed gives
    torchvision's numbers; with one, every conv is re-drawn from it with torchvision's init
    (Kaiming normal, ``fan_out``, ReLU). The classifier ``fc`` is left as built (no backbone
    uses it).

    ``weights`` (``None``: random, as above) names initial weights, loaded as torchvision's
    ``resnet{depth}(weights=..., norm_layer=FrozenBatchNorm2d)`` loads them, after the random
    init and before freezing: an enum name such as ``"ResNet50_Weights.IMAGENET1K_V1"``, a
    ``.pth`` path or a state dict (:func:`resnet_state_dict`, :func:`load_resnet_weights`).
    Frozen BatchNorm then applies the file's ImageNet statistics.
    """
    who = "torchvision_resnet"
    _check_depth(depth, who)
    _check_trainable_layers(trainable_layers, who)
    block, layers = RESNET_SPECS[depth]
    resnet = resnet_models.ResNet(block, list(layers), norm_layer=norm_layer(norm, who))
    if generator is not None:
        with torch.no_grad():
            for m in resnet.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(
                        m.weight, mode="fan_out", nonlinearity="relu", generator=generator
                    )
    if weights is not None:
        load_resnet_weights(resnet, weights, who=f"{who} (ResNet-{depth})")
    freeze_resnet(resnet, trainable_layers)
    return resnet


def _stage_out_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage: ``conv3`` of its last Bottleneck or ``conv2`` of its
    last BasicBlock (64 * 2**(s-1) * expansion: 256..2048 for R50, 64..512 for R18)."""
    last = stage[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


class ResNetBody(nn.Module):
    """The trunk of a torchvision ResNet up to its last returned stage, returning those stages.

    Holds torchvision's own modules under torchvision's names (``conv1``, ``bn1``, ``relu``,
    ``maxpool``, ``layer1``, ...; ``avgpool`` and ``fc`` are dropped, and so are stages after the
    last returned one), so ``state_dict`` keys are torchvision's ``resnet`` keys.

    Args:
        resnet: a ``torchvision.models.ResNet`` (see :func:`torchvision_resnet`).
        returned: stage names to return, in order, a subset of ``STAGES``.

    Attributes:
        returned: the returned stage names.
        out_channels_list: channels of each returned stage.
        strides: stride of each returned stage (``layer1`` 4, ``layer2`` 8, ``layer3`` 16,
            ``layer4`` 32).

    ``forward(images [B, 3, H, W]) -> OrderedDict`` ``{"layer1": [B, C1, H/4, W/4], ...}``
    (sizes rounded up at each stride-2 step) for the returned stages.
    """

    def __init__(self, resnet: resnet_models.ResNet, returned=STAGES) -> None:
        super().__init__()
        returned = tuple(returned)
        if (
            not returned
            or any(r not in STAGES for r in returned)
            or list(returned) != sorted(set(returned), key=STAGES.index)
        ):
            raise ValueError(
                f"ResNetBody: returned must be increasing stage names from {STAGES}, got {returned}"
            )
        self.conv1, self.bn1, self.relu, self.maxpool = (
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
        )
        self.stage_names = STAGES[: STAGES.index(returned[-1]) + 1]
        for name in self.stage_names:
            setattr(self, name, getattr(resnet, name))
        self.returned = returned
        self.out_channels_list = tuple(_stage_out_channels(getattr(self, n)) for n in returned)
        self.strides = tuple(STAGE_STRIDES[n] for n in returned)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        _check_images(images, "ResNetBody")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # [B, 64, H/4, W/4] (stem)
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.stage_names:
            x = getattr(self, name)(x)  # [B, C_s, H/stride_s, W/stride_s]
            if name in self.returned:
                features[name] = x
        return features


def resnet_body(
    depth: int = 50,
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    returned=STAGES,
    generator: torch.Generator | None = None,
    weights=None,
) -> ResNetBody:
    """A ResNet-``depth`` trunk (18, 34, 50 or 101) returning the ``returned`` stages.

    Args:
        depth: 18 | 34 (BasicBlock) or 50 | 101 (Bottleneck).
        norm: ``"frozen_bn"`` (:class:`FrozenBatchNorm2d`, the paper's setting), ``"bn"``
            (``nn.BatchNorm2d``) or ``"gn"`` (``GroupNorm(32, C)``).
        trainable_layers: 0..5 stages left trainable, last first (see :func:`freeze_resnet`).
        returned: stage names to return, e.g. ``("layer1", "layer2", "layer3", "layer4")``.
        generator: optional ``torch.Generator`` for the init (see :func:`torchvision_resnet`).
        weights: ``None`` (random) or initial weights: a torchvision enum name such as
            ``"ResNet50_Weights.IMAGENET1K_V1"``, a ``.pth`` path or a state dict (see
            :func:`resnet_state_dict`); loaded before the layers are frozen.

    Returns:
        a :class:`ResNetBody`; ``forward(images [B, 3, H, W]) -> OrderedDict`` of the stages.
    """
    resnet = torchvision_resnet(depth, norm, trainable_layers, generator, weights)
    return ResNetBody(resnet, returned)


class FPN(nn.Module):
    """Feature Pyramid Network (Lin et al. 2017, section 3): a top-down path with lateral links.

    For input maps ``C_1 .. C_L`` (finest first; ResNet's ``layer1..layer4`` are ``C2..C5``)::

        lateral_i = Conv1x1_i(C_i)                          # every level to out_channels
        M_L       = lateral_L
        M_i       = lateral_i + upsample_nearest(M_{i+1})   # i = L-1 .. 1, to C_i's size
        P_i       = Conv3x3_i(M_i)                          # reduces upsampling aliasing
        P_pool    = max_pool2d(P_L, kernel 1, stride 2)     # "P6": subsampled P5 (extra="maxpool")

    Every ``P_i`` has ``out_channels`` channels, so one RPN / RoI head serves all levels.

    Args:
        in_channels_list: channels of each input map, finest first (e.g. 256, 512, 1024, 2048).
        out_channels: channels of every output map (256 in the paper).
        norm: ``None`` (plain convs with bias, the paper), ``"bn"`` or ``"gn"`` (conv without
            bias followed by ``BatchNorm2d`` / ``GroupNorm(32, C)``, torchvision's v2 models).
        extra: ``"maxpool"`` adds the ``"pool"`` level (torchvision's ``LastLevelMaxPool``), or
            ``None``.
        generator: optional ``torch.Generator`` for the init; without it the init draws from
            torch's global RNG in torchvision's order, so a seed gives torchvision's weights.

    Submodules: ``lateral_convs`` and ``output_convs`` (``ModuleList``, one entry per level; each
    a ``Conv2d`` when ``norm is None``, else ``Sequential(conv, norm)``). Convs are initialised
    as torchvision's FPN: ``kaiming_uniform_(a=1)``, bias 0.

    ``forward(features)``: ``features`` is a mapping (finest first) or sequence of
    ``[B, C_i, h_i, w_i]`` tensors; returns ``OrderedDict`` ``{"0": P_1, ..., str(L-1): P_L,
    "pool": P_pool}``, each ``[B, out_channels, h_i, w_i]`` (``"pool"``:
    ``[B, out_channels, ceil(h_L / 2), ceil(w_L / 2)]``).
    """

    EXTRAS = ("maxpool", None)

    def __init__(
        self,
        in_channels_list,
        out_channels: int = 256,
        norm: str | None = None,
        extra: str | None = "maxpool",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        in_channels_list = tuple(int(c) for c in in_channels_list)
        if not in_channels_list or any(c <= 0 for c in in_channels_list) or out_channels <= 0:
            raise ValueError(
                f"FPN: in_channels_list must be non-empty positive ints and "
                f"out_channels positive, got {in_channels_list}, {out_channels}"
            )
        if extra not in self.EXTRAS:
            raise ValueError(f"FPN: unknown extra {extra!r}; expected one of {self.EXTRAS}")
        make_norm = None if norm is None else norm_layer(norm, "FPN")
        if norm == "gn" and out_channels % GN_GROUPS:
            raise ValueError(
                f"FPN: norm='gn' needs out_channels divisible by {GN_GROUPS}, got {out_channels}"
            )
        self.in_channels_list = in_channels_list
        self.out_channels = int(out_channels)
        self.norm = norm
        self.extra = extra

        def conv(in_ch: int, kernel: int) -> nn.Module:
            padding = kernel // 2  # keeps the size: 1x1 pad 0, 3x3 pad 1
            if make_norm is None:
                return nn.Conv2d(in_ch, self.out_channels, kernel, padding=padding)
            return nn.Sequential(
                nn.Conv2d(in_ch, self.out_channels, kernel, padding=padding, bias=False),
                make_norm(self.out_channels),
            )

        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for in_ch in in_channels_list:  # built level by level, as torchvision (same RNG order)
            self.lateral_convs.append(conv(in_ch, 1))
            self.output_convs.append(conv(self.out_channels, 3))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Convs: ``kaiming_uniform_(a=1)``, bias 0 (norm layers keep weight 1, bias 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features) -> OrderedDict[str, torch.Tensor]:
        xs = list(features.values()) if isinstance(features, Mapping) else list(features)
        if len(xs) != len(self.lateral_convs):
            raise ValueError(f"FPN: expected {len(self.lateral_convs)} feature maps, got {len(xs)}")
        for i, (x, c) in enumerate(zip(xs, self.in_channels_list)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"FPN: feature map {i} must be [B, {c}, h, w], got {got}")

        # top-down: start at the coarsest level, upsample and add the next finer lateral
        merged = self.lateral_convs[-1](xs[-1])  # M_L [B, out, h_L, w_L]
        outputs = [self.output_convs[-1](merged)]  # P_L
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.lateral_convs[i](xs[i])  # [B, out, h_i, w_i]
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = lateral + top_down  # M_i [B, out, h_i, w_i]
            outputs.insert(0, self.output_convs[i](merged))  # P_i

        result: OrderedDict[str, torch.Tensor] = OrderedDict(
            (str(i), p) for i, p in enumerate(outputs)
        )
        if self.extra == "maxpool":
            # kernel 1 stride 2 max pool = plain subsampling of P_L (torchvision's LastLevelMaxPool)
            result["pool"] = F.max_pool2d(outputs[-1], kernel_size=1, stride=2, padding=0)
        return result


class BackboneWithFPN(nn.Module):
    """A body (e.g. :class:`ResNetBody`) followed by an :class:`FPN`.

    Args:
        body: module ``images -> OrderedDict`` of ``L`` maps, finest first, with attribute
            ``strides`` (``L`` ints) and optionally ``out_channels_list``.
        fpn: an :class:`FPN` with ``L`` levels.

    Attributes:
        body, fpn: the two stages (state-dict prefixes ``body.`` and ``fpn.``).
        out_channels: channels of every output map (``fpn.out_channels``).
        strides: stride of every output map, e.g. ``(4, 8, 16, 32, 64)`` (the ``"pool"`` level
            has twice the coarsest body stride).

    ``forward(images [B, 3, H, W]) -> OrderedDict`` ``{"0": [B, out_channels, H/4, W/4], ...,
    "3": [.., H/32, W/32], "pool": [.., H/64, W/64]}`` for ResNet-FPN (sizes rounded up).
    """

    def __init__(self, body: nn.Module, fpn: FPN) -> None:
        super().__init__()
        strides = getattr(body, "strides", None)
        if strides is None:
            raise ValueError(
                "BackboneWithFPN: body must have a 'strides' attribute (one stride "
                "per returned map)"
            )
        strides = tuple(int(s) for s in strides)
        if len(strides) != len(fpn.lateral_convs):
            raise ValueError(
                f"BackboneWithFPN: body returns {len(strides)} maps (strides "
                f"{strides}) but the FPN has {len(fpn.lateral_convs)} levels"
            )
        body_channels = getattr(body, "out_channels_list", None)
        if body_channels is not None and tuple(body_channels) != fpn.in_channels_list:
            raise ValueError(
                f"BackboneWithFPN: body channels {tuple(body_channels)} differ from "
                f"the FPN's in_channels_list {fpn.in_channels_list}"
            )
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels
        self.strides = strides + ((2 * strides[-1],) if fpn.extra == "maxpool" else ())

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        _check_images(images, "BackboneWithFPN")
        return self.fpn(self.body(images))


def resnet_fpn_backbone(
    depth: int = 50,
    out_channels: int = 256,
    norm: str = "frozen_bn",
    fpn_norm: str | None = None,
    trainable_layers: int = 3,
    returned_layers=(1, 2, 3, 4),
    generator: torch.Generator | None = None,
    weights=None,
) -> BackboneWithFPN:
    """ResNet-``depth`` + FPN, as torchvision's ``resnet_fpn_backbone`` (Mask R-CNN's backbone).

    Args:
        depth: 18, 34, 50 or 101.
        out_channels: FPN channels (256 in the paper; smaller for CPU presets).
        norm: the ResNet's norm, ``"frozen_bn"`` | ``"bn"`` | ``"gn"``.
        fpn_norm: the FPN's norm, ``None`` (the paper, torchvision v1) | ``"bn"`` (v2) | ``"gn"``.
        trainable_layers: 0..5 ResNet stages left trainable (see :func:`freeze_resnet`).
        returned_layers: stages feeding the FPN, numbers in 1..4, increasing.
        generator: optional ``torch.Generator`` for the init; without it a seed gives
            torchvision's weights (the ResNet's draws, then the FPN's).
        weights: the ResNet's initial weights (``None``: random; see :func:`resnet_body`). The
            FPN always starts random, as in the paper and torchvision.

    Returns:
        :class:`BackboneWithFPN` with ``strides`` ``(4, 8, 16, 32, 64)`` for the default layers.
    """
    layers = tuple(returned_layers)
    if (
        not layers
        or any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 4 for k in layers)
        or list(layers) != sorted(set(layers))
    ):
        raise ValueError(
            f"resnet_fpn_backbone: returned_layers must be increasing ints in 1..4, "
            f"got {returned_layers!r}"
        )
    body = resnet_body(
        depth, norm, trainable_layers, tuple(f"layer{k}" for k in layers), generator, weights
    )
    fpn = FPN(
        body.out_channels_list, out_channels, norm=fpn_norm, extra="maxpool", generator=generator
    )
    return BackboneWithFPN(body, fpn)


# =============================================================================================
# C4 and C5: the single-map backbones of the paper's Table 2 ablations
# =============================================================================================
class ResNetC4Backbone(nn.Module):
    """ResNet ``conv1 .. layer3`` ("C4", Mask R-CNN section 3): one map with stride 16.

    In the C4 design (Faster R-CNN with ResNet, and the paper's ResNet-50-C4 rows) the RoIs are
    pooled from this map (14 x 14) and ResNet's stage 5 runs per RoI: see :class:`Res5Head`.

    Args: as :func:`resnet_body`.

    Attributes:
        body: a :class:`ResNetBody` (torchvision names ``body.conv1.weight``, ...).
        out_channels: 1024 (R50/R101) or 256 (R18/R34).
        strides: ``(16,)``.

    ``forward(images [B, 3, H, W]) -> OrderedDict`` ``{"0": [B, out_channels, H/16, W/16]}``.
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "frozen_bn",
        trainable_layers: int = 3,
        generator: torch.Generator | None = None,
        weights=None,
    ) -> None:
        super().__init__()
        self.body = resnet_body(depth, norm, trainable_layers, ("layer3",), generator, weights)
        self.out_channels = self.body.out_channels_list[0]
        self.strides = self.body.strides

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(images)["layer3"])])


class Res5Head(nn.Module):
    """ResNet's stage 5 (torchvision ``layer4``) run on pooled RoI features (the C4 head).

    Mask R-CNN section 3, figure 4 (left): the RoIs are pooled 14 x 14 from the C4 map, then
    ``layer4`` (whose first block has stride 2) turns them into ``7 x 7`` maps with the stage-5
    width. The box head averages this map (global average pool -> class scores and box deltas)
    and the mask head deconvolves it back to 14 x 14 (-> 14 x 14 masks); those heads live in
    ``mrcnn_edu.heads``. ``forward`` returns the map itself.

    Args: as :func:`resnet_body` (``trainable_layers >= 1`` keeps ``layer4`` trainable).

    Attributes:
        layer4: torchvision's module (``layer4.0.conv1.weight``, ...: torchvision resnet keys).
        in_channels: 1024 (R50/R101) or 256 (R18/R34): the C4 map's channels.
        out_channels: 2048 (R50/R101) or 512 (R18/R34).

    ``forward(x [K, in_channels, 14, 14]) -> [K, out_channels, 7, 7]`` (any ``h, w``:
    ``ceil(h / 2), ceil(w / 2)``).
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "frozen_bn",
        trainable_layers: int = 3,
        generator: torch.Generator | None = None,
        weights=None,
    ) -> None:
        super().__init__()
        resnet = torchvision_resnet(depth, norm, trainable_layers, generator, weights)
        self.layer4 = resnet.layer4
        self.in_channels = _stage_out_channels(resnet.layer3)
        self.out_channels = _stage_out_channels(resnet.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "Res5Head", channels=self.in_channels)
        return self.layer4(x)  # [K, C4, h, w] -> [K, C5, ceil(h/2), ceil(w/2)]


class ResNetC5Backbone(nn.Module):
    """ResNet ``conv1 .. layer4`` ("C5"): one map with stride 32, for the Table 2 ablations.

    Args: as :func:`resnet_body`.

    Attributes:
        body: a :class:`ResNetBody`.
        out_channels: 2048 (R50/R101) or 512 (R18/R34).
        strides: ``(32,)``.

    ``forward(images [B, 3, H, W]) -> OrderedDict`` ``{"0": [B, out_channels, H/32, W/32]}``.
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "frozen_bn",
        trainable_layers: int = 3,
        generator: torch.Generator | None = None,
        weights=None,
    ) -> None:
        super().__init__()
        self.body = resnet_body(depth, norm, trainable_layers, ("layer4",), generator, weights)
        self.out_channels = self.body.out_channels_list[0]
        self.strides = self.body.strides

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([("0", self.body(images)["layer4"])])

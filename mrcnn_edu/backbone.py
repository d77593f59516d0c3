"""Backbones: the convolutional trunk that turns images into feature maps.

For now this file holds only :class:`TinyBackbone`, a handful of conv + BatchNorm + ReLU layers
small enough to train a Region Proposal Network (Ren et al. 2015, section 3.1) on 256x256 shapes
images on a 2-core CPU in a few minutes. Notebook ``04_anchors_and_rpn.ipynb`` trains an RPN on it.

The real backbone of Mask R-CNN (He et al. 2017, section 3, "Network Architecture"): a ResNet
with frozen BatchNorm + a Feature Pyramid Network (Lin et al. 2017), and the C4 variant the
ablations need, joins this file in a later issue (see ``DESIGN.md``; notebook 07 explains it).
Every backbone returns the same thing: an ``OrderedDict`` of named feature maps, finest first,
and carries ``out_channels`` and ``strides`` so the RPN's anchor generator can be matched to it.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn


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

    def __init__(self, out_channels: int = 64, strides: tuple[int, ...] = (8, 16), width: int = 16,
                 depth: int = 2, generator: torch.Generator | None = None) -> None:
        super().__init__()
        strides = tuple(int(s) for s in strides)
        if not strides or any(s < 2 or s & (s - 1) for s in strides) or list(strides) != sorted(
                set(strides)):
            raise ValueError(f"TinyBackbone: strides must be increasing powers of two >= 2, "
                             f"got {strides}")
        if depth < 1 or width < 1 or out_channels < 1:
            raise ValueError(f"TinyBackbone: out_channels, width and depth must be >= 1, got "
                             f"out_channels={out_channels}, width={width}, depth={depth}")
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
            if 2 ** s in strides:
                self.lateral[str(strides.index(2 ** s))] = nn.Conv2d(ch, self.out_channels, 1)
            in_ch = ch
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-normal convs (fan_out, ReLU), zero biases, BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu",
                                        generator=generator)
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
            if 2 ** s in self.strides:
                key = str(self.strides.index(2 ** s))
                features[key] = self.lateral[key](x)  # [B, out_channels, ., .]
        return features

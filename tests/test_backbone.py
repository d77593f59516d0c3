"""ResNet + FPN backbones against torchvision (same weights -> same features) and the C4/C5 maps.

torchvision's modules are built independently (``torchvision.models.detection.backbone_utils``,
``torchvision.ops.FeaturePyramidNetwork``, ``torchvision.models.resnet50``); their state dict is
loaded into ours through :func:`torchvision_fpn_key`, after randomising every BatchNorm buffer and
bias so that no parameter can be silently ignored or mis-mapped. Images are small (3 x 96 x 128)
to keep R50 fast on two CPU cores.
"""

import re
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from mrcnn_edu.backbone import (
    FPN,
    BackboneWithFPN,
    FrozenBatchNorm2d,
    Res5Head,
    ResNetC4Backbone,
    ResNetC5Backbone,
    TinyBackbone,
    resnet_body,
    resnet_fpn_backbone,
    resnet_state_dict,
)

IMAGE_SIZES = [(96, 128), (75, 101)]  # the second is not a multiple of 32: ceil at every stride
TOL = {"atol": 1e-4, "rtol": 1e-4}


def torchvision_fpn_key(k: str, fpn_norm=None) -> str:
    """torchvision ``BackboneWithFPN`` state-dict key -> ours.

    ``body.*`` is unchanged (both hold torchvision's resnet modules); FPN convs are renamed:
    without a norm torchvision wraps each conv in a one-entry Sequential (``.0.``), we do not.
    """
    if fpn_norm is None:
        k = re.sub(r"^fpn\.inner_blocks\.(\d+)\.0\.", r"fpn.lateral_convs.\1.", k)
        return re.sub(r"^fpn\.layer_blocks\.(\d+)\.0\.", r"fpn.output_convs.\1.", k)
    k = re.sub(r"^fpn\.inner_blocks\.(\d+)\.", r"fpn.lateral_convs.\1.", k)
    return re.sub(r"^fpn\.layer_blocks\.(\d+)\.", r"fpn.output_convs.\1.", k)


@torch.no_grad()
def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Give every norm buffer/affine and every bias non-trivial values (init leaves them 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (TVFrozenBatchNorm2d, FrozenBatchNorm2d, nn.BatchNorm2d)):
            C = m.weight.shape[0]
            m.weight.copy_(1 + 0.1 * torch.randn(C, generator=g))
            m.bias.copy_(0.1 * torch.randn(C, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(C, generator=g))
            m.running_var.copy_(0.5 + torch.rand(C, generator=g))
        elif isinstance(m, nn.GroupNorm):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


def load_from_torchvision(ours: nn.Module, tv: nn.Module, fpn_norm=None) -> None:
    sd = {torchvision_fpn_key(k, fpn_norm): v for k, v in tv.state_dict().items()}
    assert set(sd) == set(ours.state_dict()), set(sd) ^ set(ours.state_dict())
    ours.load_state_dict(sd, strict=True)


def images(size, seed=0, batch=2):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def assert_same_features(ours_out, tv_out):
    assert list(ours_out) == list(tv_out)
    for k in tv_out:
        assert ours_out[k].shape == tv_out[k].shape, k
        torch.testing.assert_close(ours_out[k], tv_out[k], **TOL)


def trainable(module: nn.Module) -> set:
    return {n for n, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# FrozenBatchNorm2d
# ---------------------------------------------------------------------------------------------
def test_frozen_bn_equals_torchvision_and_batchnorm_eval():
    C = 6
    tv = randomise_(TVFrozenBatchNorm2d(C, eps=1e-3), 1)
    ours = FrozenBatchNorm2d(C, eps=1e-3)
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in tv.named_buffers()]
    assert list(ours.parameters()) == []  # nothing for an optimizer
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, C, 5, 7, generator=torch.Generator().manual_seed(0))
    ours.train()  # train mode must not change anything
    assert torch.equal(ours(x), tv(x))
    # an independent reference: BatchNorm2d in eval mode with the same statistics
    bn = nn.BatchNorm2d(C, eps=1e-3).eval()
    bn.load_state_dict(ours.state_dict())  # BatchNorm2d accepts a missing num_batches_tracked
    torch.testing.assert_close(ours(x), bn(x), atol=1e-6, rtol=1e-6)
    # a BatchNorm2d state dict (with num_batches_tracked) loads strictly
    FrozenBatchNorm2d(C).load_state_dict(bn.state_dict(), strict=True)
    # channels_last input gives the same numbers
    assert torch.equal(ours(x.contiguous(memory_format=torch.channels_last)), ours(x))


# ---------------------------------------------------------------------------------------------
# ResNet + FPN against torchvision
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r50_pair():
    torch.manual_seed(0)
    tv = tv_resnet_fpn(backbone_name="resnet50", weights=None, trainable_layers=3)
    torch.manual_seed(0)
    ours = resnet_fpn_backbone(depth=50)
    return tv, ours


def test_resnet50_fpn_same_seed_same_weights(r50_pair):
    # without a generator, the init draws from the global RNG in torchvision's order
    tv, ours = r50_pair
    tv_sd = {torchvision_fpn_key(k): v for k, v in tv.state_dict().items()}
    ours_sd = ours.state_dict()
    assert set(tv_sd) == set(ours_sd)
    for k in ours_sd:
        assert torch.equal(ours_sd[k], tv_sd[k]), k


def test_resnet50_fpn_equals_torchvision(r50_pair):
    tv, _ = r50_pair
    randomise_(tv, 2)
    torch.manual_seed(5)  # different weights until loaded
    ours = resnet_fpn_backbone(depth=50)
    load_from_torchvision(ours, tv)
    # parameter names under body are exactly torchvision's resnet names
    assert {k for k in ours.state_dict() if k.startswith("body.")} == {
        k for k in tv.state_dict() if k.startswith("body.")
    }
    assert "body.layer1.0.conv1.weight" in ours.state_dict()
    assert ours.out_channels == 256 and ours.strides == (4, 8, 16, 32, 64)
    tv.eval(), ours.eval()
    with torch.no_grad():
        for i, size in enumerate(IMAGE_SIZES):
            x = images(size, seed=i)
            out, ref = ours(x), tv(x)
            assert_same_features(out, ref)
            for k, s in zip(out, ours.strides):
                assert out[k].shape[-2:] == tuple(-(-d // s) for d in size), (k, s)


@pytest.mark.parametrize("returned_layers", [(1, 2, 3, 4), (2, 3, 4)])
def test_resnet18_fpn_equals_torchvision_extractor(returned_layers):
    resnet = torchvision.models.resnet18(weights=None, norm_layer=TVFrozenBatchNorm2d)
    tv = randomise_(_resnet_fpn_extractor(resnet, 3, returned_layers=list(returned_layers)), 3)
    ours = resnet_fpn_backbone(depth=18, returned_layers=returned_layers)
    load_from_torchvision(ours, tv)
    assert ours.body.out_channels_list == tuple(64 * 2 ** (k - 1) for k in returned_layers)
    assert ours.strides == tuple(2 ** (k + 1) for k in returned_layers) + (
        2 ** (returned_layers[-1] + 2),
    )
    with torch.no_grad():
        for i, size in enumerate(IMAGE_SIZES):
            assert_same_features(ours(images(size, seed=i)), tv(images(size, seed=i)))


def test_channels_last_input_gives_same_features():
    torch.manual_seed(0)
    model = randomise_(resnet_fpn_backbone(depth=18, out_channels=32), 4).eval()
    x = images((64, 96))
    with torch.no_grad():
        ref = model(x)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert_same_features(out, ref)


@pytest.mark.parametrize("trainable_layers", [0, 3, 5])
@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_trainable_parameters_equal_torchvision(trainable_layers, norm):
    norm_layer = TVFrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    depth, name = (50, "resnet50") if norm == "frozen_bn" else (18, "resnet18")
    tv = tv_resnet_fpn(
        backbone_name=name, weights=None, norm_layer=norm_layer, trainable_layers=trainable_layers
    )
    ours = resnet_fpn_backbone(depth=depth, norm=norm, trainable_layers=trainable_layers)
    assert trainable(ours) == {torchvision_fpn_key(k) for k in trainable(tv)}
    frozen = {n for n, _ in ours.named_parameters()} - trainable(ours)
    if trainable_layers == 0:
        assert all(n.startswith("fpn.") for n in trainable(ours))
    if trainable_layers == 5:
        assert not frozen
    if trainable_layers == 3:
        assert "body.layer2.0.conv1.weight" in trainable(ours)
        assert "body.layer1.0.conv1.weight" in frozen and "body.conv1.weight" in frozen
        if norm == "bn":
            assert "body.bn1.weight" in frozen


def test_resnet_body_returns_named_stages_and_strides():
    body = resnet_body(depth=34, returned=("layer2", "layer4"))
    assert body.out_channels_list == (128, 512) and body.strides == (8, 32)
    assert not hasattr(body, "fc") and not hasattr(body, "avgpool")
    out = body(images((64, 64), batch=1))
    assert list(out) == ["layer2", "layer4"]
    assert out["layer2"].shape == (1, 128, 8, 8) and out["layer4"].shape == (1, 512, 2, 2)
    # stages after the last returned one are not built into the body
    assert not hasattr(resnet_body(depth=18, returned=("layer1",)), "layer2")


def test_generator_makes_init_reproducible_and_independent_of_global_rng():
    torch.manual_seed(0)
    a = resnet_fpn_backbone(depth=18, out_channels=16, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    b = resnet_fpn_backbone(depth=18, out_channels=16, generator=torch.Generator().manual_seed(7))
    c = resnet_fpn_backbone(depth=18, out_channels=16, generator=torch.Generator().manual_seed(8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["body.conv1.weight"], sc["body.conv1.weight"])
    assert not torch.equal(sa["fpn.output_convs.0.weight"], sc["fpn.output_convs.0.weight"])


# ---------------------------------------------------------------------------------------------
# FPN alone (with norms: torchvision's v2 models)
# ---------------------------------------------------------------------------------------------
FPN_IN = [8, 16, 24, 32]
FPN_SIZES = [(25, 33), (13, 17), (7, 9), (4, 5)]  # a ResNet's ceil sizes of a 97 x 129 image


def fpn_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (str(i), torch.randn(2, c, h, w, generator=g))
        for i, (c, (h, w)) in enumerate(zip(FPN_IN, FPN_SIZES))
    )


@pytest.mark.parametrize("norm", [None, "bn", "gn"])
def test_fpn_equals_torchvision(norm):
    tv_norm = {None: None, "bn": nn.BatchNorm2d, "gn": partial(nn.GroupNorm, 32)}[norm]
    torch.manual_seed(0)
    tv = FeaturePyramidNetwork(FPN_IN, 32, extra_blocks=LastLevelMaxPool(), norm_layer=tv_norm)
    torch.manual_seed(0)
    ours = FPN(FPN_IN, 32, norm=norm)
    # same seed, same weights (torchvision's init order)
    tv_sd = {torchvision_fpn_key("fpn." + k, norm)[4:]: v for k, v in tv.state_dict().items()}
    assert set(tv_sd) == set(ours.state_dict())
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in tv_sd.items())
    expected_lateral = nn.Conv2d if norm is None else nn.Sequential
    assert all(isinstance(m, expected_lateral) for m in [*ours.lateral_convs, *ours.output_convs])

    randomise_(tv, 6)
    ours.load_state_dict(
        {torchvision_fpn_key("fpn." + k, norm)[4:]: v for k, v in tv.state_dict().items()}
    )
    x = fpn_inputs()
    for mode in ("train", "eval"):  # BatchNorm: batch statistics, then running statistics
        tv.train(mode == "train"), ours.train(mode == "train")
        assert_same_features(ours(x), tv(x))
        if norm == "bn" and mode == "train":  # the running statistics were updated identically
            torch.testing.assert_close(
                ours.output_convs[0][1].running_mean, tv.layer_blocks[0][1].running_mean
            )
    out = ours(list(x.values()))  # a plain list of maps works too
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert out["pool"].shape[-2:] == (2, 3)


def test_fpn_hand_computed_top_down():
    # 1x1 laterals = identity, 3x3 outputs = identity (centre tap): P_i = C_i + upsampled M_{i+1}
    fpn = FPN([1, 1], 1, extra=None)
    with torch.no_grad():
        for m in fpn.lateral_convs:
            m.weight.fill_(1.0)
        for m in fpn.output_convs:
            m.weight.zero_()
            m.weight[0, 0, 1, 1] = 1.0
    c2 = torch.zeros(1, 1, 3, 4)
    c3 = torch.tensor([[[[1.0, 2.0]]]])  # 1 x 2: nearest upsampling to 3 x 4 repeats columns
    out = fpn({"a": c2, "b": c3})
    assert list(out) == ["0", "1"]
    assert torch.equal(out["1"], c3)
    assert torch.equal(out["0"], torch.tensor([[1.0, 1.0, 2.0, 2.0]] * 3).reshape(1, 1, 3, 4))


# ---------------------------------------------------------------------------------------------
# C4 / C5 (Table 2 ablations)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, c4, c5", [(50, 1024, 2048), (18, 256, 512), (34, 256, 512)])
def test_c4_c5_shapes_and_strides(depth, c4, c5):
    x = images((96, 128), batch=1)
    backbone = ResNetC4Backbone(depth)
    assert backbone.out_channels == c4 and backbone.strides == (16,)
    out = backbone(x)
    assert list(out) == ["0"] and out["0"].shape == (1, c4, 6, 8)
    head = Res5Head(depth)
    assert head.in_channels == c4 and head.out_channels == c5
    assert head(torch.randn(3, c4, 14, 14)).shape == (3, c5, 7, 7)
    c5_backbone = ResNetC5Backbone(depth)
    assert c5_backbone.out_channels == c5 and c5_backbone.strides == (32,)
    assert c5_backbone(x)["0"].shape == (1, c5, 3, 4)


def test_c4_body_and_res5_head_equal_torchvision_resnet50():
    tv = randomise_(torchvision.models.resnet50(weights=None, norm_layer=TVFrozenBatchNorm2d), 7)
    tv.eval()
    tv_sd = tv.state_dict()
    backbone = ResNetC4Backbone(50)
    backbone.load_state_dict(
        {"body." + k: v for k, v in tv_sd.items() if not k.startswith(("layer4.", "fc."))},
        strict=True,
    )
    head = Res5Head(50)
    head.load_state_dict({k: v for k, v in tv_sd.items() if k.startswith("layer4.")}, strict=True)
    x = images((96, 128))
    with torch.no_grad():
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        torch.testing.assert_close(backbone(x)["0"], ref, **TOL)
        rois = torch.randn(3, 1024, 14, 14, generator=torch.Generator().manual_seed(1))
        out = head(rois)
        assert out.shape == (3, 2048, 7, 7)
        torch.testing.assert_close(out, tv.layer4(rois), **TOL)


def test_res5_head_trainability_follows_trainable_layers():
    assert all(p.requires_grad for p in Res5Head(18, trainable_layers=1).parameters())
    assert not any(p.requires_grad for p in Res5Head(18, trainable_layers=0).parameters())


# ---------------------------------------------------------------------------------------------
# Errors and the unchanged TinyBackbone
# ---------------------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match="depth must be one of"):
        resnet_body(depth=152)
    with pytest.raises(ValueError, match="unknown norm 'sync'"):
        resnet_body(depth=18, norm="sync")
    with pytest.raises(ValueError, match="trainable_layers must be an int in 0..5"):
        resnet_body(depth=18, trainable_layers=6)
    with pytest.raises(ValueError, match="returned_layers"):
        resnet_fpn_backbone(depth=18, returned_layers=(0, 1))
    with pytest.raises(ValueError, match="returned must be increasing"):
        resnet_body(depth=18, returned=("layer3", "layer2"))
    with pytest.raises(ValueError, match="out_channels divisible by 32"):
        FPN([8], 24, norm="gn")
    with pytest.raises(ValueError, match="unknown extra"):
        FPN([8], 8, extra="conv")
    with pytest.raises(ValueError, match=r"feature map 1 must be \[B, 16, h, w\]"):
        FPN([8, 16], 8)([torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 2, 2)])
    with pytest.raises(ValueError, match="body channels"):
        BackboneWithFPN(resnet_body(depth=18, returned=("layer3", "layer4")), FPN([8, 16], 8))
    with pytest.raises(ValueError, match=r"Res5Head: input must be a \[B, 256, H, W\]"):
        Res5Head(18)(torch.zeros(1, 512, 14, 14))
    with pytest.raises(TypeError, match="floating point"):
        resnet_body(depth=18)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_tiny_backbone_unchanged():
    tiny = TinyBackbone(
        out_channels=8, strides=(8, 16), width=4, generator=torch.Generator().manual_seed(0)
    )
    out = tiny(torch.zeros(1, 3, 64, 64))
    assert list(out) == ["0", "1"] and out["1"].shape == (1, 8, 4, 4)


# ---------------------------------------------------------------------------------------------
# Initial weights (BackboneConfig.weights): a local .pth or a torchvision weights enum name
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """A seeded torchvision resnet18 (BatchNorm statistics and counters made non-trivial, as
    after ImageNet training) in eval mode, and its state dict saved as a .pth file."""
    torch.manual_seed(5)
    tv = randomise_(torchvision.models.resnet18(weights=None), 11)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pth"
    torch.save(tv.state_dict(), path)
    return tv.eval(), path


def _tv_stages(tv, x):
    """torchvision's own forward through the stages: {"layer1": ..., "layer4": ...}."""
    out, x = {}, tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = out[name] = getattr(tv, name)(x)
    return out


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_local_pth_loads_into_the_body_exactly(r18_file, norm):
    tv, path = r18_file
    tv_sd = tv.state_dict()
    body = resnet_fpn_backbone(depth=18, norm=norm, weights=str(path)).body
    sd = body.state_dict()
    if norm == "frozen_bn":  # FrozenBatchNorm2d has no counter; the classifier fc is dropped
        assert set(sd) == {
            k for k in tv_sd if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
        }
    else:
        assert set(sd) == {k for k in tv_sd if not k.startswith("fc.")}
    for k, v in sd.items():
        assert torch.equal(v, tv_sd[k]), k  # parameters, BN statistics, counters: all exact
    if norm == "frozen_bn":  # the frozen BN applies the file's running statistics
        assert isinstance(body.layer3[1].bn2, FrozenBatchNorm2d)
        assert torch.equal(body.layer3[1].bn2.running_mean, tv.layer3[1].bn2.running_mean)
        assert torch.equal(body.bn1.running_var, tv.bn1.running_var)
    # freezing happens after loading, exactly as without weights (stem and layer1 frozen)
    assert trainable(body) == trainable(resnet_fpn_backbone(depth=18, norm=norm).body)
    assert not any(n.startswith(("conv1", "bn1", "layer1")) for n in trainable(body))
    # same numbers as torchvision's resnet18 in eval mode (frozen BN: in train mode too)
    x = images((64, 96))
    body.train(norm == "frozen_bn")
    with torch.no_grad():
        ours, ref = body(x), _tv_stages(tv, x)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)


def test_single_map_bodies_and_res5_head_take_their_part_of_the_file(r18_file):
    tv, path = r18_file
    c4 = ResNetC4Backbone(18, weights=path)  # conv1 .. layer3: the file's layer4 and fc skipped
    assert not hasattr(c4.body, "layer4")
    assert torch.equal(c4.body.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)
    head = Res5Head(18, weights=path)  # layer4 only: the stem and layer1..3 skipped
    for k, v in head.state_dict().items():
        assert torch.equal(v, tv.state_dict()[k]), k
    c5 = ResNetC5Backbone(18, weights={"state_dict": tv.state_dict()})  # a wrapped dict works
    assert torch.equal(c5.body.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)


def test_weights_enum_name_goes_through_torchvisions_weights_api(r18_file, monkeypatch):
    """The enum path without the network: torchvision's ``WeightsEnum.get_state_dict`` (its
    download into the hub cache) replaced by one that returns the seeded state dict."""
    from torchvision.models import ResNet18_Weights
    from torchvision.models._api import WeightsEnum

    tv, _ = r18_file
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return tv.state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    body = resnet_body(18, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert calls == [(ResNet18_Weights.IMAGENET1K_V1, {"progress": True, "check_hash": True})]
    assert torch.equal(
        body.layer2[0].downsample[1].running_mean, tv.layer2[0].downsample[1].running_mean
    )
    assert torch.equal(
        resnet_body(18, weights=ResNet18_Weights.IMAGENET1K_V1).conv1.weight, tv.conv1.weight
    )


def test_offline_error_names_the_file_to_download_and_where_to_put_it(monkeypatch):
    import urllib.error
    from pathlib import Path

    from torchvision.models import get_weight
    from torchvision.models._api import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    url = get_weight("ResNet50_Weights.IMAGENET1K_V1").url  # torchvision's own
    filename = url.rsplit("/", 1)[-1]
    with pytest.raises(FileNotFoundError) as info:
        resnet_state_dict("ResNet50_Weights.IMAGENET1K_V1")
    message = str(info.value)
    assert "cannot download torchvision's ResNet50_Weights.IMAGENET1K_V1" in message
    assert "Temporary failure in name resolution" in message
    assert f"download {url}" in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints" / filename) in message
    assert f"--set model.backbone.weights=/path/to/{filename}" in message


def test_wrong_files_name_the_mismatched_keys(r18_file, tmp_path):
    tv, path = r18_file
    sd = tv.state_dict()
    # a ResNet-18 file for a ResNet-50 body: Bottleneck keys missing, 3x3 vs 1x1 convs
    with pytest.raises(ValueError) as info:
        resnet_body(50, weights=path)
    message = str(info.value)
    assert "torchvision_resnet (ResNet-50)" in message and str(path) in message
    assert "missing keys: layer1.0.conv3.weight" in message
    assert "layer1.0.conv1.weight: file (64, 64, 3, 3) vs model (64, 64, 1, 1)" in message
    assert "another depth" in message
    # one statistic short: named exactly
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in sd.items() if k != "layer4.1.bn2.running_var"}, short)
    with pytest.raises(ValueError, match=r"missing keys: layer4\.1\.bn2\.running_var$"):
        resnet_body(18, weights=short)
    # a detection checkpoint's names: every key unexpected, with the hint
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"backbone.body." + k: v for k, v in sd.items()}, prefixed)
    with pytest.raises(ValueError) as info:
        resnet_body(18, weights=prefixed)
    message = str(info.value)
    assert "missing keys: conv1.weight, bn1.weight" in message
    assert "unexpected keys: backbone.body.conv1.weight" in message
    assert "mrcnn_edu.weights.from_torchvision" in message
    # GroupNorm has no running statistics
    with pytest.raises(ValueError, match=r"unexpected keys: bn1\.running_mean.*norm='gn'"):
        resnet_body(18, norm="gn", weights=path)
    # not a state dict at all
    junk = tmp_path / "junk.pth"
    torch.save({"step": 3, "name": "x"}, junk)
    with pytest.raises(ValueError, match="holds no tensors"):
        resnet_state_dict(junk)


def test_unknown_weights_names_give_clear_errors():
    with pytest.raises(
        ValueError,
        match=r"ResNet50_Weights has no member 'IMAGENET1K_V9'; it has "
        r"ResNet50_Weights\.IMAGENET1K_V1, ResNet50_Weights\.IMAGENET1K_V2",
    ):
        resnet_body(18, weights="ResNet50_Weights.IMAGENET1K_V9")
    with pytest.raises(ValueError, match="torchvision has no weights enum 'ResNet51_Weights'"):
        resnet_state_dict("ResNet51_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="neither an existing file nor a torchvision weights"):
        resnet_state_dict("resnet50")
    with pytest.raises(FileNotFoundError, match="no ResNet weights file at /nonexistent/r50.pth"):
        resnet_state_dict("/nonexistent/r50.pth")
    with pytest.raises(TypeError, match="got int"):
        resnet_state_dict(50)

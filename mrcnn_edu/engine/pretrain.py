"""Pre-training a ResNet body on whole images: the shapes stand-in for the paper's ImageNet weights.

Mask R-CNN's ablations (Table 2) fine-tune a ResNet-50 that ImageNet classification trained
first; every variant starts from the same weights, so a short schedule already compares the
heads. The ablation studies (:mod:`mrcnn_edu.engine.ablate`) do the same on the shapes sets:
:func:`pretrain_resnet` trains a torchvision ``ResNet`` once, with no RoI operator, no boxes and
no instance masks (so no variant's switch takes part), and writes its state dict;
``BackboneConfig.weights`` then names that file for every variant alike.

The task is semantic segmentation (FCN, Long et al. 2015, the "FCN-8s" form): 1x1 convolutions
score every class on ``layer2``, ``layer3`` and ``layer4`` (strides 8, 16, 32), the scores are
summed at stride 8 and upsampled bilinearly to the image, and a per-pixel softmax
cross-entropy is trained against the class map of the image (:func:`class_maps`: each object's
mask painted with its class, background 0). A first attempt that only counted each class's
objects per image (whole-image labels, as ImageNet's) learned nothing in the steps affordable
here (its count error stayed at that of always guessing the mean); a dense task teaches every
position of the map, and it converges in a few hundred steps.

Example (``mrcnn-edu make-shapes --overlap`` writes the set)::

    >>> from mrcnn_edu.engine.pretrain import class_maps
    >>> ann = "data/shapes_overlap/annotations/instances_train.json"
    >>> files, maps, names = class_maps(ann)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mrcnn_edu.backbone import torchvision_resnet
from mrcnn_edu.data.coco import ann_to_mask, load_coco_json
from mrcnn_edu.utils import atomic_write, keep_freed_memory

__all__ = ["SegmentationNet", "class_maps", "file_sha256", "load_images", "pretrain_resnet"]


def class_maps(ann_file: str | Path) -> tuple[list[str], torch.Tensor, list[str]]:
    """``(file names, class maps, class names)`` of a COCO instances file.

    Returns:
        file names: one per image, in the file's image order.
        class maps: ``[N, H, W]`` uint8: ``k`` (1..K, categories sorted by id) where an
            object's mask covers the pixel, 0 elsewhere; where masks overlap the later
            annotation wins. Crowd regions are 255 (ignored by the loss). The images must
            share one size.
        class names: the ``K`` category names.
    """
    data = load_coco_json(ann_file)
    cats = sorted(c["id"] for c in data["categories"])
    if len(cats) > 254:
        raise ValueError(f"pretrain: {ann_file} has {len(cats)} categories; at most 254")
    names = {c["id"]: c["name"] for c in data["categories"]}
    label = {c: i + 1 for i, c in enumerate(cats)}
    sizes = {(im["height"], im["width"]) for im in data["images"]}
    if len(sizes) != 1:
        raise ValueError(f"pretrain: the images of {ann_file} have {len(sizes)} sizes; need one")
    (h, w), row = sizes.pop(), {im["id"]: i for i, im in enumerate(data["images"])}
    maps = np.zeros((len(row), h, w), np.uint8)
    for a in data["annotations"]:
        m = ann_to_mask(a, h, w).astype(bool)
        maps[row[a["image_id"]]][m] = 255 if a.get("iscrowd", 0) else label[a["category_id"]]
    return (
        [im["file_name"] for im in data["images"]],
        torch.from_numpy(maps),
        [names[c] for c in cats],
    )


def load_images(folder: str | Path, files: list[str]) -> torch.Tensor:
    """``[N, 3, H, W]`` uint8: the images ``folder / f`` (RGB), which must share one size."""
    folder = Path(folder)
    out = None
    for i, f in enumerate(files):
        path = folder / f
        try:
            with Image.open(path) as im:
                a = np.array(im.convert("RGB"))
        except OSError as err:
            raise OSError(f"pretrain: cannot read image {path} ({err})") from None
        if out is None:
            out = torch.empty(len(files), 3, a.shape[0], a.shape[1], dtype=torch.uint8)
        if a.shape[:2] != tuple(out.shape[2:]):
            raise ValueError(
                f"pretrain: {path} is {a.shape[1]}x{a.shape[0]} px, the first image "
                f"{out.shape[3]}x{out.shape[2]}; pre-training needs one image size"
            )
        out[i] = torch.from_numpy(a).permute(2, 0, 1)
    if out is None:
        raise ValueError(f"pretrain: no images listed for {folder}")
    return out


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (records which weights a run started from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SegmentationNet(nn.Module):
    """A torchvision ``ResNet`` with FCN-8s scoring: ``[B, 3, H, W]`` -> ``[B, K + 1, H, W]``.

    1x1 convolutions give class scores on ``layer2``, ``layer3`` and ``layer4`` (strides 8,
    16, 32); the coarser ones are upsampled bilinearly to stride 8 and added, and the sum is
    upsampled to the input's size. ``resnet.fc`` is not used.
    """

    def __init__(self, resnet: nn.Module, num_classes: int):
        super().__init__()
        self.resnet = resnet
        chans = [_out_channels(getattr(resnet, f"layer{i}")) for i in (2, 3, 4)]
        self.score = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, size = self.resnet, x.shape[-2:]
        x = r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))
        c2 = r.layer2(x)
        c3 = r.layer3(c2)
        c4 = r.layer4(c3)
        out = self.score[0](c2)
        for s, c in ((self.score[1], c3), (self.score[2], c4)):
            out = out + _upsample(s(c), out.shape[-2:])
        return _upsample(out, size)


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _out_channels(stage: nn.Sequential) -> int:
    convs = [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


def _miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over classes 0..num_classes-1 (present in target or prediction) of the IoU."""
    keep = target != 255
    ious = []
    for k in range(num_classes):
        p, t = (pred == k) & keep, (target == k) & keep
        union = int((p | t).sum())
        if union:
            ious.append(int((p & t).sum()) / union)
    return sum(ious) / len(ious)


def pretrain_resnet(
    data_dir: str | Path,
    out_path: str | Path,
    *,
    depth: int = 10,
    norm: str = "bn",
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
    train_split: str = "train",
    val_split: str | None = "val",
    progress: bool = True,
) -> dict:
    """Train a torchvision ResNet on semantic segmentation of a COCO set; save its weights.

    The network is :class:`SegmentationNet` around ``torchvision_resnet(depth, norm)`` (the
    detector's body, every stage trained). AdamW, 5 % linear warm-up then cosine decay to zero,
    random horizontal flips, images normalised as the detector's transform does
    (``image_mean``, ``image_std``), at their stored size; per-pixel softmax cross-entropy
    against :func:`class_maps` (crowd pixels ignored).

    Args:
        data_dir: a COCO-format root: ``annotations/instances_{split}.json`` and ``{split}/``.
        out_path: where the ResNet state dict goes (written atomically; without ``fc``, so it
            loads into the detector's bodies with ``BackboneConfig.weights = str(out_path)``).
            A JSON with what this returns is written beside it (``.json`` suffix).
        steps, batch_size, lr, weight_decay, seed: the schedule (CPU, deterministic per seed
            and thread count).
        val_split: a split to report the mean IoU on (``None``: none).

    Returns:
        ``{"task", "data", "depth", "norm", "steps", "batch_size", "lr", "seed", "seconds",
        "train_loss", "val_miou", "val_miou_background_only", "sha256", "path"}``:
        ``train_loss`` is the mean cross-entropy of the last tenth of the steps; ``val_miou``
        the mean over classes (background included) of the IoU of the predicted class maps on
        ``val_split``, and for scale ``val_miou_background_only`` that of calling every
        pixel background.
    """
    data_dir, out_path = Path(data_dir), Path(out_path)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"pretrain: steps and batch_size must be >= 1, got {steps}, {batch_size}")
    files, maps, names = class_maps(data_dir / "annotations" / f"instances_{train_split}.json")
    images = load_images(data_dir / train_split, files)
    if tuple(images.shape[2:]) != tuple(maps.shape[1:]):
        raise ValueError(
            f"pretrain: the images of {data_dir / train_split} are {tuple(images.shape[2:])}, "
            f"their annotations say {tuple(maps.shape[1:])}"
        )
    num_classes = len(names) + 1

    gen = torch.Generator().manual_seed(seed)
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = SegmentationNet(torchvision_resnet(depth, norm=norm, trainable_layers=5), num_classes)
    finally:
        torch.set_rng_state(rng_state)
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
    )
    warm = max(1, steps // 20)

    def lr_at(step: int) -> float:  # step 0-based
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"pre-train ResNet-{depth} ({data_dir.name})", unit="step")
    keep_freed_memory()  # as train() does: each step's activations reuse mapped pages
    start = time.perf_counter()
    losses = []
    net.train()
    n = len(files)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x = _normalize(images[idx], image_mean, image_std)
        y = maps[idx].long()
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.cross_entropy(net(x), y, ignore_index=255)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: non-finite loss at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start

    miou = base = None
    if val_split is not None:
        vfiles, vmaps, _ = class_maps(data_dir / "annotations" / f"instances_{val_split}.json")
        vimages = load_images(data_dir / val_split, vfiles)
        net.eval()
        with torch.no_grad():
            pred = torch.cat(
                [
                    net(_normalize(vimages[i : i + 32], image_mean, image_std)).argmax(1)
                    for i in range(0, len(vfiles), 32)
                ]
            )
        miou = _miou(pred, vmaps.long(), num_classes)
        base = _miou(torch.zeros_like(pred), vmaps.long(), num_classes)

    state = {k: v for k, v in net.resnet.state_dict().items() if not k.startswith("fc.")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda f: torch.save(state, f))
    tail = losses[-max(1, steps // 10) :]
    info = {
        "task": "semantic segmentation (FCN-8s scores on layer2..4, per-pixel cross-entropy)",
        "data": str(data_dir),
        "depth": depth,
        "norm": norm,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "seconds": round(seconds, 1),
        "train_loss": round(sum(tail) / len(tail), 4),
        "val_miou": None if miou is None else round(miou, 4),
        "val_miou_background_only": None if base is None else round(base, 4),
        "sha256": file_sha256(out_path),
        "path": str(out_path),
    }
    text = json.dumps(info, indent=1).encode("utf-8")
    atomic_write(out_path.with_suffix(".json"), lambda f: f.write(text))
    return info

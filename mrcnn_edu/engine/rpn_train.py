"""Train a Region Proposal Network on its own, then ask it for proposals.

Faster R-CNN (Ren et al. 2015, section 3.1.3 "Training RPNs") trains the RPN end to end by SGD
on mini-batches of anchors sampled from each image (256 anchors, up to half positive); its loss
is Eqn. (1): ``L = 1/N_cls sum L_cls(p_i, p_i*) + lambda 1/N_reg sum p_i* L_reg(t_i, t_i*)``.
Mask R-CNN (He et al. 2017, section 3.1) reuses that RPN unchanged. Here the backbone and RPN
are trained together with no detection head, which is section 3.1's first step of the
"4-step alternating training" and what notebook ``04_anchors_and_rpn.ipynb`` does on the
synthetic shapes set.

``engine`` reports through return values and an optional callback; it never plots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mrcnn_edu.transforms import batch_images

LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg")


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _make_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("train_rpn: pass either generator or seed, not both")
    if generator is not None:
        return generator
    gen = torch.Generator()
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def _load_example(dataset, index: int, fn: str = "train_rpn") -> tuple[torch.Tensor, torch.Tensor]:
    """dataset[index] -> (image [3, H, W] float32, gt boxes [G, 4] float32), checked."""
    item = dataset[index]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TypeError(
            f"{fn}: dataset[{index}] must be an (image, target) pair, got {type(item).__name__}"
        )
    image, target = item
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{fn}: dataset[{index}] image must be a [3, H, W] tensor, got {got}")
    if not isinstance(target, dict) or "boxes" not in target:
        raise ValueError(
            f"{fn}: dataset[{index}] target must be a dict with a 'boxes' field ([G, 4] xyxy)"
        )
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    return image.to(torch.float32), boxes


def train_rpn(
    backbone: nn.Module,
    rpn: nn.Module,
    dataset,
    *,
    iterations: int,
    batch_size: int = 4,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 1e-4,
    max_grad_norm: float | None = 10.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Train ``backbone`` + ``rpn`` for ``iterations`` steps on ``dataset``; return the history.

    Each step takes ``batch_size`` images (a fresh random permutation of the data set per
    epoch, drawn from ``generator``), pads them into one ``[B, 3, H, W]`` tensor with
    ``mrcnn_edu.transforms.batch_images``, runs ``features = backbone(images)`` and
    ``proposals, losses = rpn(images, image_sizes, features, targets, generator=generator)``
    (the RPN's anchor sampling also draws from ``generator``), and takes one optimizer step on
    ``loss_objectness + loss_rpn_box_reg``.

    Args:
        backbone: ``images [B, 3, H, W] -> OrderedDict[str, [B, C, h, w]]``.
        rpn: a ``mrcnn_edu.rpn.RegionProposalNetwork`` (or anything with its ``forward``).
        dataset: indexable, ``len()``-able; ``dataset[i] -> (image [3, H, W] float32,
            target dict with "boxes" [G, 4] float32 xyxy pixels)``, e.g.
            ``mrcnn_edu.data.shapes_dataset(root, "train")``.
        iterations: number of optimizer steps.
        batch_size: images per step.
        lr: learning rate.
        optimizer: ``"adam"`` (plain Adam, forgiving for short runs) or ``"sgd"``
            (momentum 0.9, as in the paper; wants a larger ``lr`` such as 0.01-0.02).
        weight_decay: L2 penalty on all parameters.
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping); keeps the
            first steps of a freshly initialised network from blowing up.
        generator / seed: source of all randomness here (batch order, anchor sampling); pass one
            at most (default: seed 0). The weights' init is the caller's business.
        device: where to train; both modules are moved there (default: where the backbone's
            parameters already are).
        progress: show a tqdm bar.
        callback: called after every step as ``callback(step, record)`` with ``record`` the
            floats ``{"loss", "loss_objectness", "loss_rpn_box_reg", "lr"}``.

    Returns:
        history ``{"step": [...], "loss": [...], "loss_objectness": [...],
        "loss_rpn_box_reg": [...], "lr": [...], "seconds": [elapsed since start]}``, one entry
        per step. Both modules are left in the train / eval mode they had before the call.
    """
    if iterations < 1 or batch_size < 1:
        raise ValueError(
            f"train_rpn: iterations and batch_size must be >= 1, got "
            f"iterations={iterations}, batch_size={batch_size}"
        )
    n = len(dataset)
    if n == 0:
        raise ValueError("train_rpn: the data set is empty")
    gen = _make_generator(generator, seed)
    if device is not None:
        device = torch.device(device)
        backbone.to(device)  # in place: the parameters the optimizer sees are the moved ones
        rpn.to(device)
    else:
        device = _module_device(backbone)
    params = [p for m in (backbone, rpn) for p in m.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"train_rpn: optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    was_training = (backbone.training, rpn.training)
    backbone.train()
    rpn.train()
    history: dict[str, list[float]] = {k: [] for k in ("step", "loss", *LOSS_KEYS, "lr", "seconds")}
    order = torch.randperm(n, generator=gen)
    cursor = 0
    start = time.perf_counter()
    try:
        bar = tqdm(range(iterations), desc="train_rpn", disable=not progress)
        for step in bar:
            idx = []
            while len(idx) < batch_size:  # walk through the permutation, reshuffle per epoch
                if cursor == n:
                    order, cursor = torch.randperm(n, generator=gen), 0
                idx.append(int(order[cursor]))
                cursor += 1
            examples = [_load_example(dataset, i) for i in idx]
            images, image_sizes = batch_images([im for im, _ in examples])  # [B, 3, H', W']
            images = images.to(device)
            targets = [{"boxes": boxes.to(device)} for _, boxes in examples]

            features = backbone(images)
            _, losses = rpn(images, image_sizes, features, targets, generator=gen)
            loss = sum(losses[k] for k in LOSS_KEYS)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"train_rpn: loss became {loss.item()} at step {step} "
                    f"({ {k: float(losses[k]) for k in LOSS_KEYS} }); lower lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()

            record = {
                "loss": float(loss.detach()),
                **{k: float(losses[k].detach()) for k in LOSS_KEYS},
                "lr": float(opt.param_groups[0]["lr"]),
            }
            history["step"].append(step)
            for k, v in record.items():
                history[k].append(v)
            history["seconds"].append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if callback is not None:
                callback(step, record)
    finally:
        backbone.train(was_training[0])
        rpn.train(was_training[1])
    return history


def pick_example(
    dataset,
    *,
    min_objects: int = 4,
    min_size_ratio: float = 3.0,
    min_size: float = 12.0,
    limit: int = 100,
) -> int:
    """Index of the first image whose ground truth shows anchors, matching and box deltas well.

    Notebook ``04_anchors_and_rpn.ipynb`` draws one image's anchors, matches and deltas; an image
    with a single tiny object in a corner shows nothing (one positive anchor, hidden under the gt
    box). So the example is chosen by what it must show, the same way in quick and full mode:
    at least ``min_objects`` objects, of sizes ``sqrt(w * h)`` spanning a factor of at least
    ``min_size_ratio`` (several anchor sizes and pyramid levels come into play), none smaller
    than ``min_size`` pixels (every object gets anchors of its own size).

    Args:
        dataset: ``dataset[i] -> (image, target)`` with ``target["boxes"]`` ``[G, 4]`` xyxy.
        limit: look at the first ``limit`` images only.

    Returns:
        the index ``i``. Raises ``ValueError`` naming the criteria when none of the first
        ``limit`` images meets them.
    """
    if min_objects < 1 or min_size_ratio < 1.0 or limit < 1:
        raise ValueError(
            f"pick_example: need min_objects >= 1, min_size_ratio >= 1 and "
            f"limit >= 1, got {min_objects}, {min_size_ratio}, {limit}"
        )
    n = min(len(dataset), limit)
    for i in range(n):
        _, boxes = _load_example(dataset, i, "pick_example")
        if len(boxes) < min_objects:
            continue
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)  # [G, 2]
        size = (wh[:, 0] * wh[:, 1]).sqrt()  # [G] sqrt(area), the anchors' notion of size
        if float(size.min()) >= min_size and float(size.max()) >= min_size_ratio * float(
            size.min()
        ):
            return i
    raise ValueError(
        f"pick_example: none of the first {n} images has >= {min_objects} objects "
        f"of sizes spanning a factor >= {min_size_ratio}, all >= {min_size} px; "
        "relax the criteria or use a larger data set"
    )


@torch.no_grad()
def predict_proposals(
    backbone: nn.Module,
    rpn: nn.Module,
    images: Sequence[torch.Tensor] | torch.Tensor,
    *,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Proposals of a trained RPN for each image, in eval mode (``testing`` top-n settings).

    Args:
        images: a list of ``[3, H_i, W_i]`` float32 tensors, or one ``[B, 3, H, W]`` tensor.
        batch_size: images per forward pass.

    Returns:
        per image, proposals ``[P_i, 4]`` float32 (x1, y1, x2, y2) in that image's pixels,
        clipped to it and sorted by decreasing objectness (``P_i <= post_nms_top_n["testing"]``).
        Both modules are put back in the mode they had.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"predict_proposals: images must be [B, 3, H, W] or a list of "
                f"[3, H, W] tensors, got a tensor of shape {tuple(images.shape)}"
            )
        images = list(images)
    device = _module_device(backbone)
    was_training = (backbone.training, rpn.training)
    backbone.eval()
    rpn.eval()
    out: list[torch.Tensor] = []
    try:
        for i in range(0, len(images), batch_size):
            chunk = [im.to(torch.float32) for im in images[i : i + batch_size]]
            for j, im in enumerate(chunk):
                if im.dim() != 3 or im.shape[0] != 3:
                    raise ValueError(
                        f"predict_proposals: image {i + j} must be [3, H, W], got {tuple(im.shape)}"
                    )
            batch, image_sizes = batch_images(chunk)  # [b, 3, H', W']
            batch = batch.to(device)
            proposals, _ = rpn(batch, image_sizes, backbone(batch))
            out.extend(p.detach() for p in proposals)
    finally:
        backbone.train(was_training[0])
        rpn.train(was_training[1])
    return out

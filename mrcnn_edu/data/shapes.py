"""A synthetic data set in real COCO format: shapes for detection, stick figures for keypoints.

Matterport's Mask_RCNN taught with a "shapes" set that needs no download, so a first training run
takes minutes on a CPU. This module writes such a set as *real* COCO files (the same JSON layout
and PNG folders as COCO 2017), so everything downstream -- pycocotools, ``CocoDetection``, COCOeval
-- is exercised exactly as on COCO. Notebook ``01_data_coco_format.ipynb`` walks through it.

Detection set (``instances_{split}.json``): squares, circles and triangles with random colours,
sizes spread over COCO's small (< 32^2 px), medium and large (> 96^2 px) area ranges, on textured
backgrounds (gradients, stripes, blocky noise). Objects are drawn in painter's order, so each
instance's mask is the part left VISIBLE after later objects are drawn on top; instances that end
up (almost) hidden are dropped. Unoccluded objects are stored as polygons; occluded ones as
compressed RLE (their visible part is no longer a polygon). The val split also holds a few
"crowd" regions (a cluster of tiny objects of one class, ``iscrowd=1``, uncompressed RLE, as COCO
annotates crowds).

Two options change the scenes for the ablations of ``mrcnn_edu.engine.ablate`` (Table 2 of the
paper; notebook ``08b_ablations.ipynb``); without them the output is exactly the default set:

* ``overlap=True``: denser scenes (``OVERLAP_OBJECTS`` objects per image) where most objects are
  placed across an earlier object of a *different* class, so RoIs hold parts of two classes
  (what a per-pixel softmax over classes has to fight over, Table 2b);
* ``small=True``: object sides of about 1/16 .. 1/4 of the image (16..64 px at 256 px), mostly
  COCO "small" and "medium": a cell of a stride-16 or stride-32 map is a large fraction of such
  an object, so RoIPool's rounding to cells shows (Table 2c/2d).

Keypoint set (``person_keypoints_{split}.json``, ``keypoints=True``): stick-figure "persons" with
the 11 keypoints of ``KEYPOINT_NAMES``, a COCO ``skeleton`` (1-based pairs), the OKS ``sigmas``
of ``KEYPOINT_SIGMAS`` (not a COCO field: ``engine.evaluate`` gives them to COCOeval) and
visibility v = 0 (out of the frame, stored as x = y = 0), 1 (occluded by a later object) or
2 (visible), among unlabelled shapes that occlude them.

Every instance mask is *defined* as pycocotools' rasterization of its polygons, so the masks a
reader decodes from the JSON are bit-identical to the ones the generator composed.
Determinism: image ``i`` of a split is drawn from ``np.random.default_rng([seed, mode, split, i])``
and PNGs are written by Pillow without timestamps, so the same seed gives the same bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .. import __version__
from ..utils import atomic_write, current_umask

# ---------------------------------------------------------------------------------------------
# Categories and keypoints
# ---------------------------------------------------------------------------------------------

#: Detection classes. Class ``CLASS_NAMES[i]`` has COCO category id ``CATEGORY_IDS[i]``.
CLASS_NAMES: tuple[str, ...] = ("square", "circle", "triangle")
#: Like COCO's ids (1..90 with gaps), these are NOT contiguous on purpose: ``CocoDetection``
#: maps them to training labels 1..C (``cat_id_to_label``) and back (``label_to_cat_id``).
CATEGORY_IDS: tuple[int, ...] = (1, 3, 5)

PERSON_CATEGORY_ID = 1
#: Keypoint names in COCO order (left before right); index k is keypoint k of an annotation.
KEYPOINT_NAMES: tuple[str, ...] = (
    "head",
    "neck",
    "left_elbow",
    "right_elbow",
    "left_hand",
    "right_hand",
    "hip",
    "left_knee",
    "right_knee",
    "left_foot",
    "right_foot",
)
#: Limbs as 1-based keypoint index pairs, the convention of COCO's ``skeleton`` field.
SKELETON: tuple[tuple[int, int], ...] = (
    (1, 2),  # head - neck
    (2, 3),
    (3, 5),  # neck - left_elbow - left_hand
    (2, 4),
    (4, 6),  # neck - right_elbow - right_hand
    (2, 7),  # neck - hip
    (7, 8),
    (8, 10),  # hip - left_knee - left_foot
    (7, 9),
    (9, 11),  # hip - right_knee - right_foot
)


def flip_index(names: tuple[str, ...] | list[str] = KEYPOINT_NAMES) -> list[int]:
    """Permutation that swaps left/right keypoints, derived from the ``left_``/``right_`` names.

    After a horizontal flip, ``keypoints[:, flip_index(names)]`` puts every keypoint back under its
    own name. Works for COCO's 17 person keypoints too.

    >>> flip_index(["nose", "left_eye", "right_eye"])
    [0, 2, 1]
    """
    names = list(names)
    out = []
    for n in names:
        if n.startswith("left_"):
            partner = "right_" + n[len("left_") :]
        elif n.startswith("right_"):
            partner = "left_" + n[len("right_") :]
        else:
            partner = n
        out.append(names.index(partner) if partner in names else names.index(n))
    return out


#: OKS sigmas (COCOeval's ``kpt_oks_sigmas``), one per keypoint of ``KEYPOINT_NAMES``: COCO's
#: constants for the nearest COCO body part (head <- nose .026, neck <- shoulders .079, elbows
#: .072, hands <- wrists .062, hip <- hips .107, knees .087, feet <- ankles .089). Stored as the
#: person category's ``"sigmas"`` in the annotation file, where ``engine.evaluate`` reads them.
KEYPOINT_SIGMAS: tuple[float, ...] = tuple(
    {
        "head": 0.026,
        "neck": 0.079,
        "elbow": 0.072,
        "hand": 0.062,
        "hip": 0.107,
        "knee": 0.087,
        "foot": 0.089,
    }[name.removeprefix("left_").removeprefix("right_")]
    for name in KEYPOINT_NAMES
)

#: ``keypoints[:, FLIP_INDEX]`` swaps left and right (a permutation of range(K)).
FLIP_INDEX: list[int] = flip_index(KEYPOINT_NAMES)
#: The same information as (left, right) 0-based index pairs.
FLIP_MAP: list[tuple[int, int]] = [(i, j) for i, j in enumerate(FLIP_INDEX) if i < j]

# ---------------------------------------------------------------------------------------------
# Generator settings
# ---------------------------------------------------------------------------------------------

MIN_VISIBLE_FRACTION = 0.2  # drop an instance when less than this fraction of it stays visible
MIN_VISIBLE_PIXELS = 12  # ... or fewer visible pixels than this
MAX_OBJECTS = 6  # objects per detection image: uniform in 1..MAX_OBJECTS
MAX_PERSONS = 4  # persons per keypoint image: uniform in 1..MAX_PERSONS
OVERLAP_OBJECTS = (4, 10)  # overlap=True: objects per image, uniform in this range
OVERLAP_PROBABILITY = 0.75  # overlap=True: chance an object is placed across an earlier one
OVERLAP_DISTANCE = (0.3, 0.75)  # ... centre distance / (sum of the two radii): partial overlap
SMALL_SIDES = (1 / 16, 0.25)  # small=True: object side (sqrt of area) range, / image side
CROWD_PROBABILITY = 0.2  # chance that a val image holds one crowd region (detection set)

_MODES = {"detection": 0, "keypoints": 1}
_SPLITS = {"train": 0, "val": 1}

MIN_SIZE = 32  # image side bounds of write_shapes_dataset (pixels)
MAX_SIZE = 4096  # a 4096 px image needs ~0.2 GB while drawn; 60000 px would need 40
MAX_IMAGES = 1_000_000  # images per split
#: The set's manifest, written last into the set's folder (see :func:`write_shapes_dataset`).
MANIFEST_NAME = "shapes_manifest.json"
MANIFEST_FORMAT = "mrcnn_edu shapes set"
_STAGING = ".writing-"  # temporary folders: ``.{out.name}.writing-XXXX`` beside ``out``

# ---------------------------------------------------------------------------------------------
# Drawing helpers: polygons -> masks through pycocotools, so decoding the JSON gives the same mask
# ---------------------------------------------------------------------------------------------


def _round_poly(points: np.ndarray) -> list[float]:
    """[P, 2] float vertices -> COCO's flat [x1, y1, x2, y2, ...] rounded to 0.01 px."""
    return [round(float(v), 2) for v in points.reshape(-1)]  # (P, 2) -> (2P,)


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (list of flat [x1, y1, ...] lists) -> uint8 mask [H, W], parts merged."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles))


def mask_to_rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """uint8 mask [H, W] -> COCO RLE dict, JSON-ready.

    Compressed: ``counts`` is pycocotools' ASCII string. Uncompressed (as COCO stores crowds):
    ``counts`` is the list of run lengths over the column-major (Fortran) pixel order, starting
    with a run of zeros.
    """
    h, w = mask.shape
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")}
    flat = mask.astype(np.uint8).reshape(-1, order="F")  # (H, W) -> (H*W,) column by column
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:  # RLE always starts with a (possibly empty) run of zeros
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": counts}


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """Tight COCO box [x, y, w, h] of the nonzero pixels (w = x_max - x_min + 1)."""
    xs = np.flatnonzero(mask.any(axis=0))  # columns holding a pixel
    ys = np.flatnonzero(mask.any(axis=1))  # rows holding a pixel
    if xs.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def _regular_polygon(cx: float, cy: float, radius: float, n: int, angle: float) -> np.ndarray:
    """[n, 2] vertices of a regular n-gon of circumradius ``radius`` rotated by ``angle``."""
    t = angle + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _shape_polygon(
    kind: str,
    area: float,
    rng: np.random.Generator,
    size: int,
    near: tuple[np.ndarray, float] | None = None,
) -> np.ndarray:
    """Vertices [P, 2] of a square / circle / triangle of about ``area`` px^2, inside the frame.

    ``near = (centre [2], radius)``: place it across that shape (``overlap=True`` scenes): its
    centre at ``OVERLAP_DISTANCE`` times the sum of the two radii from ``centre``, in a random
    direction (then moved, if needed, so that every vertex stays in the frame).
    """
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "square":  # area = side^2, circumradius = side / sqrt(2)
        radius, n = math.sqrt(area / 2), 4
    elif kind == "circle":  # area = pi r^2; enough vertices that the polygon looks round
        radius = math.sqrt(area / math.pi)
        n = int(np.clip(2 * math.pi * radius / 3, 12, 64))
    else:  # equilateral triangle: area = (3 sqrt(3) / 4) R^2
        radius, n = math.sqrt(4 * area / (3 * math.sqrt(3))), 3
    radius = min(radius, size / 2 - 1)
    pts = _regular_polygon(0.0, 0.0, radius, n, angle)
    lo, hi = pts.min(0), pts.max(0)
    if near is not None:
        centre, other_radius = near
        phi = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(*OVERLAP_DISTANCE) * (radius + other_radius)
        cx = float(np.clip(centre[0] + dist * np.cos(phi), -lo[0], size - hi[0]))
        cy = float(np.clip(centre[1] + dist * np.sin(phi), -lo[1], size - hi[1]))
        return pts + np.array([cx, cy])
    # place the shape so every vertex stays in [0, size]
    cx = rng.uniform(-lo[0], size - hi[0])
    cy = rng.uniform(-lo[1], size - hi[1])
    return pts + np.array([cx, cy])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background, float32 [H, W, 3] in 0..255: a gradient plus stripes or blocky noise.

    Blocky (nearest-upsampled) noise instead of per-pixel noise keeps the PNGs small.
    """
    r = np.arange(size, dtype=np.float32) / size
    yy, xx = r[:, None], r[None, :]  # (H, 1), (1, W), 0..1
    c1, c2 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    phi = rng.uniform(0, 2 * np.pi)
    t = np.cos(phi) * xx + np.sin(phi) * yy  # (H, W)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)  # (H, W) in 0..1
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]  # (H, W, 3)
    kind = rng.integers(3)
    if kind == 1:  # stripes
        period = rng.uniform(6, 40) / size
        psi = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (np.cos(psi) * xx + np.sin(psi) * yy) / period) > 0
        img = img + wave[..., None] * rng.uniform(-60, 60, size=3).astype(np.float32)
    elif kind == 2:  # blocky noise
        block = int(rng.choice([4, 8, 16]))
        n = -(-size // block)
        coarse = rng.normal(0, 25, size=(n, n, 3)).astype(np.float32)
        img = img + np.repeat(np.repeat(coarse, block, 0), block, 1)[:size, :size]
    return img


def _contrasting_color(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A random RGB colour far enough from the mean colour currently under ``mask``."""
    under = img[mask.astype(bool)].mean(0) if mask.any() else img.reshape(-1, 3).mean(0)
    color = rng.uniform(0, 255, size=3)
    for _ in range(10):
        if np.linalg.norm(color - under) > 90:
            break
        color = rng.uniform(0, 255, size=3)
    return color.astype(np.float32)


def _sample_area(rng: np.random.Generator, size: int, small: bool = False) -> float:
    """Log-uniform area from ~(size/25)^2 to (0.65 size)^2: at 256 px about 40% small, 20% large.

    ``small``: sides from ``SMALL_SIDES[0] * size`` to ``SMALL_SIDES[1] * size`` instead (16..64
    px at 256 px: about half COCO "small", none "large").
    """
    if small:
        a_min = max(64.0, (SMALL_SIDES[0] * size) ** 2)
        a_max = max(a_min * 2, (SMALL_SIDES[1] * size) ** 2)
        return float(np.exp(rng.uniform(np.log(a_min), np.log(a_max))))
    a_min = max(64.0, (size / 25) ** 2)
    a_max = max(a_min * 2, (0.65 * size) ** 2)
    return float(np.exp(rng.uniform(np.log(a_min), np.log(a_max))))


def _limb_polygon(p: np.ndarray, q: np.ndarray, width: float) -> np.ndarray:
    """Rectangle [4, 2] of the given width around segment p-q, extended by width/2 at both ends."""
    d = q - p
    d = d / max(float(np.linalg.norm(d)), 1e-6)
    n = np.array([-d[1], d[0]])
    a, b = p - d * width / 2, q + d * width / 2
    h = n * width / 2
    return np.stack([a + h, b + h, b - h, a - h])


def _stick_figure(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random pose: keypoints [K, 2] (x, y) and body polygons (head + one per limb).

    Hip placed anywhere in the middle 80% of the frame, so big figures can leave the frame.
    """
    height = float(np.exp(rng.uniform(np.log(0.18 * size), np.log(0.8 * size))))
    width = max(2.5, 0.06 * height)
    hip = rng.uniform(0.1 * size, 0.9 * size, size=2)

    def step(p, length, angle):  # angle 0 = right, pi/2 = down (image y grows downwards)
        return p + length * np.array([np.cos(angle), np.sin(angle)])

    up = -np.pi / 2 + rng.normal(0, 0.2)
    neck = step(hip, 0.32 * height, up)
    head_r = 0.09 * height
    head = step(neck, head_r + 0.02 * height, up)
    kps = {"head": head, "neck": neck, "hip": hip}
    for side, sgn in (("left", 1.0), ("right", -1.0)):  # the figure faces the viewer
        a1 = np.pi / 2 + sgn * rng.uniform(0.3, 2.4)  # upper arm, hanging or raised
        kps[f"{side}_elbow"] = step(neck, 0.17 * height, a1)
        kps[f"{side}_hand"] = step(kps[f"{side}_elbow"], 0.15 * height, a1 + rng.normal(0, 0.6))
        a2 = np.pi / 2 + sgn * rng.uniform(0.05, 0.6)  # thigh, mostly downwards
        kps[f"{side}_knee"] = step(hip, 0.24 * height, a2)
        kps[f"{side}_foot"] = step(kps[f"{side}_knee"], 0.24 * height, a2 + rng.normal(0, 0.3))
    keypoints = np.stack([kps[n] for n in KEYPOINT_NAMES])  # (K, 2)
    n_head = int(np.clip(2 * math.pi * head_r / 3, 12, 48))
    polys = [_regular_polygon(head[0], head[1], head_r, n_head, 0.0)]
    for i, j in SKELETON:
        if KEYPOINT_NAMES[i - 1] == "head":  # the head circle already covers head-neck
            continue
        polys.append(_limb_polygon(keypoints[i - 1], keypoints[j - 1], width))
    return keypoints, polys


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def generate_image(
    rng: np.random.Generator,
    size: int = 256,
    *,
    keypoints: bool = False,
    crowd: bool = False,
    overlap: bool = False,
    small: bool = False,
) -> tuple[np.ndarray, list[dict]]:
    """Draw one image and its instances.

    Args:
        rng: numpy Generator (all randomness comes from it).
        size: image height = width in pixels.
        keypoints: stick-figure persons (plus unlabelled occluding shapes) instead of shapes.
        crowd: add one crowd region (detection set only).
        overlap: denser scenes (``OVERLAP_OBJECTS``), most objects placed across an earlier
            object of another class (detection set only; see the module docstring).
        small: smaller objects (``SMALL_SIDES``; detection set only).
    Returns:
        image: uint8 [H, W, 3].
        instances: list of dicts with ``category_id`` (int), ``mask`` uint8 [H, W] (visible part),
        ``segmentation`` (COCO polygons or RLE), ``iscrowd`` (0/1) and, for persons,
        ``keypoints`` float [K, 3] (x, y, v). Hidden instances are already dropped.
    """
    if keypoints and (overlap or small):
        raise ValueError(
            "generate_image: overlap and small are options of the detection set, "
            "not of the keypoint set (keypoints=True)"
        )
    img = _background(rng, size)
    # painter's list: (category_id or None for unlabelled, polygons, keypoints or None, iscrowd)
    items: list[tuple] = []
    if crowd and not keypoints:
        k = int(rng.integers(len(CLASS_NAMES)))
        centre = rng.uniform(0.2 * size, 0.8 * size, size=2)
        spread = rng.uniform(0.06, 0.15) * size
        polys = []
        for _ in range(int(rng.integers(8, 21))):
            pts = _shape_polygon(CLASS_NAMES[k], rng.uniform(20, 60), rng, size)
            pts = pts - pts.mean(0) + np.clip(centre + rng.normal(0, spread, 2), 6, size - 6)
            polys.append(_round_poly(pts))
        items.append((CATEGORY_IDS[k], polys, None, 1))
    if keypoints:
        persons = [
            ("person", _stick_figure(rng, size)) for _ in range(rng.integers(1, MAX_PERSONS + 1))
        ]
        distractors = [("shape", None) for _ in range(rng.integers(0, 4))]
        order = persons + distractors
        order = [order[i] for i in rng.permutation(len(order))]
        for kind, fig in order:
            if kind == "person":
                kp, polys = fig
                items.append((PERSON_CATEGORY_ID, [_round_poly(p) for p in polys], kp, 0))
            else:
                shape = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
                pts = _shape_polygon(shape, _sample_area(rng, size) / 3, rng, size)
                items.append((None, [_round_poly(pts)], None, 0))
    else:
        lo, hi = OVERLAP_OBJECTS if overlap else (1, MAX_OBJECTS)
        n = int(rng.integers(lo, hi + 1))
        objs = []
        for _ in range(n):
            k = int(rng.integers(len(CLASS_NAMES)))
            area = _sample_area(rng, size, small=small)
            objs.append((area * rng.lognormal(0, 0.7), k, area))
        objs.sort(key=lambda o: -o[0])  # mostly large behind small, with some jitter
        placed: list[tuple[np.ndarray, float, int]] = []  # overlap: (centre [2], radius, class)
        for _, k, area in objs:
            near = None
            if overlap and placed and rng.random() < OVERLAP_PROBABILITY:
                centre, radius, other = placed[int(rng.integers(len(placed)))]
                k = (other + 1 + int(rng.integers(len(CLASS_NAMES) - 1))) % len(CLASS_NAMES)
                near = (centre, radius)
            pts = _shape_polygon(CLASS_NAMES[k], area, rng, size, near=near)
            if overlap:
                centre = pts.mean(0)
                placed.append((centre, float(np.linalg.norm(pts - centre, axis=1).max()), k))
            items.append((CATEGORY_IDS[k], [_round_poly(pts)], None, 0))

    # paint back to front
    full_masks = []
    for _cat, polys, _, _ in items:
        m = polygons_to_mask(polys, size, size)
        full_masks.append(m)
        img[m.astype(bool)] = _contrasting_color(rng, img, m)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # visible part = own mask minus everything painted later (walk front to back)
    covered = np.zeros((size, size), dtype=bool)
    covered_after: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
    for i in range(len(items) - 1, -1, -1):
        covered_after[i] = covered.copy()
        covered |= full_masks[i].astype(bool)

    instances = []
    for i, (cat, polys, kp, iscrowd) in enumerate(items):
        if cat is None:
            continue
        full = full_masks[i]
        vis = (full.astype(bool) & ~covered_after[i]).astype(np.uint8)
        n_full, n_vis = int(full.sum()), int(vis.sum())
        if n_vis < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * n_full):
            continue
        inside = all(0 <= v <= size for p in polys for v in p)
        if iscrowd:
            seg = mask_to_rle(vis, compressed=False)
        elif n_vis == n_full and inside:
            seg = polys
        else:
            seg = mask_to_rle(vis, compressed=True)
        inst = {"category_id": int(cat), "mask": vis, "segmentation": seg, "iscrowd": iscrowd}
        if kp is not None:
            kpv = np.zeros((len(KEYPOINT_NAMES), 3))
            for j, (x, y) in enumerate(kp):
                if not (0 <= x < size and 0 <= y < size):
                    continue  # out of the frame: v = 0 and x = y = 0, as COCO stores it
                occluded = covered_after[i][int(y), int(x)]
                kpv[j] = (round(float(x), 2), round(float(y), 2), 1 if occluded else 2)
            inst["keypoints"] = kpv
        instances.append(inst)
    return image, instances


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _categories(keypoints: bool) -> list[dict]:
    if keypoints:
        return [
            {
                "id": PERSON_CATEGORY_ID,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(KEYPOINT_NAMES),
                "skeleton": [list(p) for p in SKELETON],
                "sigmas": list(KEYPOINT_SIGMAS),
            }
        ]  # OKS constants (not a COCO field)
    return [
        {"id": cid, "name": name, "supercategory": "shape"}
        for cid, name in zip(CATEGORY_IDS, CLASS_NAMES)
    ]


def _options(overlap: bool, small: bool) -> dict[str, bool]:
    """The scene options that differ from the default set (``{}`` for the default set)."""
    return {k: True for k, v in (("overlap", overlap), ("small", small)) if v}


def write_split(
    out: str | Path,
    split: str,
    num_images: int,
    size: int = 256,
    seed: int = 0,
    keypoints: bool = False,
    progress=None,
    manifest: dict | None = None,
    *,
    overlap: bool = False,
    small: bool = False,
) -> Path:
    """Write one split: PNGs under ``out/{split}/`` and its annotation JSON; returns the JSON path.

    ``progress``: a tqdm bar to advance (or None). ``manifest``: a dict that receives this
    split's entry of the set's manifest (annotation file, its sha256, counts, and the byte size
    and sha256 of every image). ``overlap``, ``small``: see :func:`generate_image`; when set they
    are recorded as ``info["mrcnn_edu"]["options"]`` (the default set records none). Files are
    written in place: :func:`write_shapes_dataset` calls this inside a staging folder, so nobody
    sees a half-written split.
    """
    out = Path(out)
    mode = "keypoints" if keypoints else "detection"
    images, annotations = [], []
    image_files: dict[str, list] = {}
    ann_id = 1
    for i in range(num_images):
        rng = np.random.default_rng([seed, _MODES[mode], _SPLITS[split], i])
        crowd = split == "val" and not keypoints and rng.random() < CROWD_PROBABILITY
        image, instances = generate_image(
            rng, size, keypoints=keypoints, crowd=crowd, overlap=overlap, small=small
        )
        image_id = i + 1
        file_name = f"{image_id:012d}.png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=3)
        png = buf.getvalue()
        atomic_write(out / split / file_name, lambda f, b=png: f.write(b))
        image_files[file_name] = [len(png), hashlib.sha256(png).hexdigest()]
        images.append(
            {"id": image_id, "file_name": file_name, "width": size, "height": size, "license": 1}
        )
        for inst in instances:
            mask = inst["mask"]
            ann = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": inst["category_id"],
                "segmentation": inst["segmentation"],
                "area": float(mask.sum()),
                "bbox": mask_to_bbox(mask),
                "iscrowd": inst["iscrowd"],
            }
            if "keypoints" in inst:
                kp = inst["keypoints"]
                ann["keypoints"] = [
                    float(v) if j % 3 < 2 else int(v) for j, v in enumerate(kp.reshape(-1))
                ]  # (K, 3) -> (3K,)
                ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
            annotations.append(ann)
            ann_id += 1
        if progress is not None:
            progress.update(1)
    name = "stick figures" if keypoints else "shapes"
    ours = {
        "kind": mode,
        "split": split,
        "seed": int(seed),
        "size": int(size),
        "num_images": int(num_images),
        "num_annotations": len(annotations),
        "mrcnn_edu_version": __version__,
    }
    if _options(overlap, small):
        ours["options"] = _options(overlap, small)
    data = {
        "info": {
            "description": f"mrcnn_edu synthetic {name} ({split})",
            "version": "1.0",
            "year": 2017,
            "contributor": "mrcnn_edu.data.shapes",
            "url": "",
            "date_created": f"seed={seed} size={size}",
            # what this set is, for a reader to check (see shapes_manifest.json)
            "mrcnn_edu": ours,
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0 Universal",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
        "images": images,
        "annotations": annotations,
        "categories": _categories(keypoints),
    }
    stem = "person_keypoints" if keypoints else "instances"
    ann_file = out / "annotations" / f"{stem}_{split}.json"
    text = json.dumps(data, separators=(",", ":")).encode("utf-8")
    atomic_write(ann_file, lambda f: f.write(text))
    if manifest is not None:
        manifest[split] = {
            "annotation_file": f"annotations/{stem}_{split}.json",
            "annotation_sha256": hashlib.sha256(text).hexdigest(),
            "num_images": int(num_images),
            "num_annotations": len(annotations),
            "images": image_files,
        }
    return ann_file


def existing_outputs(out: str | Path, keypoints: bool = False) -> list[Path]:
    """What ``write_shapes_dataset(out, keypoints=keypoints)`` would overwrite or mix with.

    The annotation files it writes (``annotations/{stem}_{train,val}.json``) that exist, and the
    split folders (``train/``, ``val/``) that exist and are not empty (their PNG names would
    collide, or the set would be mixed with other files). An empty or missing ``out`` gives [].
    """
    out = Path(out)
    stem = "person_keypoints" if keypoints else "instances"
    found = [out / "annotations" / f"{stem}_{split}.json" for split in _SPLITS]
    found = [p for p in found if p.exists()]
    for split in _SPLITS:
        folder = out / split
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            found.append(folder)
    return found


def write_shapes_dataset(
    out: str | Path,
    train: int = 2000,
    val: int = 300,
    size: int = 256,
    seed: int = 0,
    keypoints: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    *,
    overlap: bool = False,
    small: bool = False,
) -> dict[str, Path]:
    """Write the synthetic set in COCO 2017 layout and return ``{split: annotation file}``.

    Layout::

        out/annotations/instances_train.json   (person_keypoints_train.json with keypoints=True)
        out/annotations/instances_val.json
        out/train/000000000001.png ...
        out/val/000000000001.png ...
        out/shapes_manifest.json               what the set is, to check it when loading

    Image ids run 1..n within each split. The same arguments give byte-identical files.
    ``keypoints=True`` writes the stick-figure set; give it its own ``out`` folder, since the
    image file names would collide with a detection set in the same folder. ``overlap=True``
    (denser scenes of overlapping objects of different classes) and ``small=True`` (smaller
    objects) change the detection scenes (see :func:`generate_image`); the manifest and the
    annotation files' ``info["mrcnn_edu"]`` record them as ``"options"`` (absent without them,
    so the default set's bytes do not change).

    All or nothing: the set is written into a staging folder beside ``out``
    (``.{name}.writing-XXXX``, same parent, so same file system) and moved into place in one
    step at the end (an atomic exchange of the two folders where the OS offers it, else two
    renames, undone on failure). A reader, or a Ctrl-C / kill at any moment, sees the old set
    or the new one, never a mix; the old set's files are removed with it, so a smaller new set
    leaves no orphan images. The annotation files' ``info["mrcnn_edu"]`` and
    ``shapes_manifest.json`` record the seed, size, counts and package version, and the
    manifest the byte size and sha256 of every file, so a loader
    (:func:`mrcnn_edu.data.coco.shapes_dataset`) detects a mixed or half-written set.

    A user's data is never overwritten by accident: if ``out`` already holds this set's
    annotation files or a non-empty ``train/`` / ``val/`` folder (see :func:`existing_outputs`),
    a ``FileExistsError`` lists them, before anything is written. ``overwrite=True`` replaces
    the set. Since ``out`` is replaced as a whole, it may hold nothing but a shapes set: other
    files there are a ``FileExistsError`` (listing them) with or without ``overwrite``.
    """
    for name, n, hi in (
        ("train", train, MAX_IMAGES),
        ("val", val, MAX_IMAGES),
        ("size", size, MAX_SIZE),
        ("seed", seed, 2**63 - 1),
    ):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"write_shapes_dataset: {name} must be a non-negative int, got {n!r}")
        if n > hi:
            raise ValueError(f"write_shapes_dataset: {name} must be at most {hi}, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"write_shapes_dataset: size must be at least {MIN_SIZE} px, got {size}")
    if keypoints and (overlap or small):
        raise ValueError(
            "write_shapes_dataset: overlap and small are options of the detection "
            "set, not of the keypoint set (keypoints=True)"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"write_shapes_dataset: {out} exists and is not a folder")
    if not overwrite:
        clash = existing_outputs(out, keypoints)
        if clash:
            raise FileExistsError(
                f"write_shapes_dataset: {out} already holds a data set "
                f"({', '.join(str(p) for p in clash)}); nothing was written. Choose another "
                "output folder, delete it, or pass overwrite=True (--overwrite) to replace it"
            )
    foreign = foreign_entries(out)
    if foreign:
        raise FileExistsError(
            f"write_shapes_dataset: {out} holds files that are not part of a shapes set "
            f"({', '.join(str(p) for p in foreign[:10])}{', ...' if len(foreign) > 10 else ''}); "
            "nothing was written. The set replaces its folder as a whole: move them away or "
            "choose another output folder"
        )
    real = Path(os.path.realpath(out))  # a symlinked `out`: write at its target
    real.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(real)
    staging = Path(tempfile.mkdtemp(dir=real.parent, prefix=f".{real.name}{_STAGING}"))
    try:
        (staging / ".pid").write_text(str(os.getpid()))
        # mkdtemp makes the folder private (0700): give it the mode a plain mkdir would have
        mode = os.stat(real).st_mode & 0o7777 if real.is_dir() else 0o777 & ~current_umask()
        os.chmod(staging, mode)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=train + val, desc=f"writing {out}", unit="img")
        splits: dict = {}
        try:
            for split, n in (("train", train), ("val", val)):
                write_split(
                    staging,
                    split,
                    n,
                    size,
                    seed,
                    keypoints,
                    bar,
                    manifest=splits,
                    overlap=overlap,
                    small=small,
                )
        finally:
            if bar is not None:
                bar.close()
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": 1,
            "mrcnn_edu_version": __version__,
            "kind": "keypoints" if keypoints else "detection",
            "seed": int(seed),
            "size": int(size),
            "splits": splits,
        }
        if _options(overlap, small):
            manifest["options"] = _options(overlap, small)
        text = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        atomic_write(staging / MANIFEST_NAME, lambda f: f.write(text))
        (staging / ".pid").unlink()
        _move_into_place(staging, real)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the new set only; `out` is untouched
        raise
    stem = "person_keypoints" if keypoints else "instances"
    return {split: out / "annotations" / f"{stem}_{split}.json" for split in ("train", "val")}


def foreign_entries(out: str | Path) -> list[Path]:
    """Entries of ``out`` that no shapes set writes (so replacing ``out`` would delete them).

    A shapes set folder holds ``annotations/`` (only ``{instances,person_keypoints}_
    {train,val}.json`` and atomic-write temporaries), ``train/``, ``val/`` and the manifest.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    ours = {"annotations", "train", "val", MANIFEST_NAME}
    found = [
        p
        for p in sorted(out.iterdir())
        if p.name not in ours or (p.name in ("train", "val", "annotations") and not p.is_dir())
    ]
    ann = out / "annotations"
    if ann.is_dir():
        names = {
            f"{stem}_{split}.json"
            for stem in ("instances", "person_keypoints")
            for split in _SPLITS
        }
        found += [
            p
            for p in sorted(ann.iterdir())
            if p.name not in names and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
    return found


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this file system (or kernel) cannot exchange: fall back to renames
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _move_into_place(staging: Path, out: Path) -> None:
    """Put the finished set ``staging`` at ``out``; the old ``out`` (if any) is deleted."""
    if not out.exists():
        os.rename(staging, out)  # no old set: one rename
        return
    if _exchange(staging, out):  # one atomic step: old set now at staging
        _discard(staging)
        return
    old = staging.with_name(staging.name + "-old")
    os.rename(out, old)  # old set out of the way ...
    try:
        os.rename(staging, out)  # ... new set in
    except BaseException:
        os.rename(old, out)  # failed or interrupted: old set back
        raise
    _discard(old)


def _discard(folder: Path) -> None:
    """Delete a replaced set; marked first, so a delete cut short is finished by the next write."""
    (folder / ".pid").write_text(str(os.getpid()))
    shutil.rmtree(folder, ignore_errors=True)


def _remove_stale_staging(out: Path) -> None:
    """Delete staging folders of earlier writes to ``out`` that were killed (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}{_STAGING}*"):
        try:
            pid = int((p / ".pid").read_text())
        except (OSError, ValueError):
            continue  # finished (no .pid) or not ours: leave it alone
        try:
            os.kill(pid, 0)
            continue  # still being written by a live process
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue

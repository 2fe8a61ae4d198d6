"""The benchmark's synthetic detection data: filled shapes on textured backgrounds, as COCO and as YOLO.

``write_shapes_coco(root, ...)`` writes, deterministically from ``seed``::

    root/annotations/instances_train.json   root/train/*.jpg
    root/annotations/instances_val.json     root/val/*.jpg

(COCO's layout, what effdense's ``data.format: coco`` reads with ``data.root=root``). Three classes,
square (category id 1), circle (2) and triangle (3), 1-6 objects of 24-80 px per square image (256 px by
default), each object in its own random colour (the colour says nothing about the class); backgrounds mix
smoothed noise, stripes, gradients and checkers at varied contrast, some images are low-contrast (objects
close to the background's colour), some carry unannotated clutter (thin lines), and some hold no object.

``coco_to_yolo(coco_root, yolo_root)`` converts that (or any COCO split pair in the same layout) to the
YOLO layout ultralytics reads: ``yolo_root/images/<split>/`` (hard links to the same JPEG files, copies
where links are impossible), ``yolo_root/labels/<split>/<stem>.txt`` with one ``class cx cy w h`` line
per box, normalised by the image size (class = index of the category id in sorted order; crowd boxes are
left out; an image without boxes gets an empty file) and ``yolo_root/data.yaml`` (absolute ``path``,
``names``).

This module imports neither effdense nor ultralytics (numpy, OpenCV and PyYAML only).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import yaml

MARKER = ".effdense-synthetic.json"  # as tasks.data.synthetic: marks a folder a synthetic writer made
CATEGORIES = ({"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"})
EMPTY_FRACTION = 0.08      # images without objects
LOW_CONTRAST_FRACTION = 0.2
CLUTTER_FRACTION = 0.3


# ---------------------------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """One channel of smooth noise in [-1, 1]: a coarse random grid resized up with cubic interpolation."""
    cells = int(rng.integers(3, 17))
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), -1, 1)


def _pattern(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A grey-level pattern in [-1, 1], shape (size, size)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if kind == "noise":
        return _smooth_noise(rng, size)
    if kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 48)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        wave = np.sin(2 * math.pi * phase)
        return np.sign(wave) if rng.random() < 0.3 else wave  # hard or soft stripes
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xs - size / 2) * math.cos(angle) + (ys - size / 2) * math.sin(angle)
        return ramp / (size / math.sqrt(2))
    # checker
    cell = rng.uniform(8, 40)
    return np.where((np.floor(xs / cell) + np.floor(ys / cell)) % 2 == 0, 1.0, -1.0).astype(np.float32)


def _background(rng: np.random.Generator, size: int, low_contrast: bool) -> np.ndarray:
    """float32 (size, size, 3) in 0..255: a base colour plus one or two coloured patterns."""
    base = rng.uniform(40, 215, 3).astype(np.float32)
    image = np.broadcast_to(base, (size, size, 3)).copy()
    kinds = ("noise", "stripes", "gradient", "checker")
    for _ in range(int(rng.integers(1, 3))):
        kind = kinds[int(rng.integers(len(kinds)))]
        amplitude = rng.uniform(4, 14) if low_contrast else rng.uniform(10, 60)
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)  # the pattern's colour direction
        image += amplitude * _pattern(rng, size, kind)[..., None] * tint
    return image


def _shape_mask(category: int, size: int, cx: float, cy: float, side: float, orientation: int) -> np.ndarray:
    """Boolean mask of a filled shape whose tight box is ``side`` x ``side`` centred on (cx, cy)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy, half = xs - cx, ys - cy, side / 2
    if category == 1:  # square
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if category == 2:  # circle
        return dx**2 + dy**2 <= half**2
    # triangle: apex up / right / down / left, base on the opposite side of the box
    along, across = [(dy, dx), (-dx, dy), (-dy, dx), (dx, dy)][orientation]
    return (along >= -half) & (along <= half) & (np.abs(across) <= (along + half) / 2)


def _object_colour(rng: np.random.Generator, local: np.ndarray, low_contrast: bool) -> np.ndarray:
    """A random colour that differs from the local background mean by a set amount (small when low-contrast)."""
    target = rng.uniform(18, 40) if low_contrast else rng.uniform(45, 140)
    for _ in range(50):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if abs(np.linalg.norm(colour - local) / math.sqrt(3) - target) < 12:
            return colour
    direction = rng.normal(size=3).astype(np.float32)  # fall back: step away from the background
    direction /= np.linalg.norm(direction) + 1e-6
    return np.clip(local + target * math.sqrt(3) * direction, 0, 255)


def draw_image(rng: np.random.Generator, size: int, objects: int, low_contrast: bool, clutter: bool
               ) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """(uint8 RGB image (size, size, 3), [(category id, [x, y, w, h]), ...])."""
    image = _background(rng, size, low_contrast)
    if clutter:  # thin unannotated lines
        for _ in range(int(rng.integers(1, 4))):
            p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
            colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
            cv2.line(image, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), colour, int(rng.integers(1, 3)))
    placed: list[tuple[float, float, float]] = []
    annotations = []
    for _ in range(objects * 20):  # rejection sampling: boxes apart by a few pixels
        if len(placed) == objects:
            break
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"]
        side = float(rng.uniform(24, 80))
        cx, cy = float(rng.uniform(side / 2, size - side / 2)), float(rng.uniform(side / 2, size - side / 2))
        if any(abs(cx - px) < (side + ps) / 2 + 2 and abs(cy - py) < (side + ps) / 2 + 2 for px, py, ps in placed):
            continue
        placed.append((cx, cy, side))
        mask = _shape_mask(category, size, cx, cy, side, int(rng.integers(4)))
        colour = _object_colour(rng, image[mask].mean(axis=0), low_contrast)
        shading = rng.uniform(-8, 8) * _smooth_noise(rng, size)[mask][:, None]  # a little texture on the object
        image[mask] = colour + shading
        ys, xs = np.nonzero(mask)  # the tight box of the pixels drawn
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        annotations.append((category, [x0, y0, x1 - x0, y1 - y0]))
    image += rng.uniform(1, 6) * rng.standard_normal(image.shape).astype(np.float32)  # sensor noise
    return np.clip(np.round(image), 0, 255).astype(np.uint8), annotations


# ---------------------------------------------------------------------------------------------- writers


def _claim(root: Path, params: dict) -> None:
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise ValueError(f"refusing to write synthetic data into '{root}': the folder is not empty and was not "
                         f"written by a synthetic writer (no {MARKER})")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")


def write_shapes_coco(root: str | Path, train_images: int = 240, val_images: int = 40, size: int = 256,
                      seed: int = 0) -> Path:
    """Write the dataset under ``root`` (empty, missing, or written by a synthetic writer) and return it.
    The same arguments give the same files."""
    if train_images < 1 or val_images < 1:
        raise ValueError(f"train_images and val_images must be >= 1, got {train_images}, {val_images}")
    if size < 96:
        raise ValueError(f"size must be >= 96 px (objects are 24-80 px), got {size}")
    root = Path(root)
    params = dict(kind="bench-shapes-coco", train_images=train_images, val_images=val_images, size=size, seed=seed)
    _claim(root, params)
    for name in ("train", "val", "annotations"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(seed)
    image_id = annotation_id = 1
    for split, count in (("train", train_images), ("val", val_images)):
        (root / split).mkdir()
        empty_every = max(2, round(1 / EMPTY_FRACTION))
        images, annotations = [], []
        for index in range(count):
            objects = 0 if index % empty_every == 1 else int(rng.integers(1, 7))  # images 1, 13, 25, ... empty
            image, boxes = draw_image(rng, size, objects, low_contrast=rng.random() < LOW_CONTRAST_FRACTION,
                                      clutter=rng.random() < CLUTTER_FRACTION)
            name = f"{split}_{index:05d}.jpg"
            cv2.imwrite(str(root / split / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 92])
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for category, bbox in boxes:
                annotations.append({"id": annotation_id, "image_id": image_id, "category_id": category,
                                    "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, "segmentation": []})
                annotation_id += 1
            image_id += 1
        data = {"info": {"description": "effdense benchmark shapes", "version": "1"}, "licenses": [],
                "images": images, "annotations": annotations,
                "categories": [dict(c, supercategory="shape") for c in CATEGORIES]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def coco_to_yolo(coco_root: str | Path, yolo_root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Convert ``coco_root`` (COCO layout) to the YOLO layout under ``yolo_root``; returns ``data.yaml``'s path."""
    coco_root, yolo_root = Path(coco_root), Path(yolo_root).resolve()
    _claim(yolo_root, {"kind": "bench-shapes-yolo", "source": str(Path(coco_root).resolve())})
    categories = None
    for split in splits:
        data = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        cats = sorted(data["categories"], key=lambda c: c["id"])
        if categories is None:
            categories = cats
        elif [c["id"] for c in cats] != [c["id"] for c in categories]:
            raise ValueError(f"{split}: categories differ from the first split's")
        to_class = {c["id"]: index for index, c in enumerate(cats)}
        images_dir, labels_dir = yolo_root / "images" / split, yolo_root / "labels" / split
        for folder in (images_dir, labels_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        by_image: dict[int, list[dict]] = {image["id"]: [] for image in data["images"]}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                by_image[ann["image_id"]].append(ann)
        for image in data["images"]:
            width, height = float(image["width"]), float(image["height"])
            lines = []
            for ann in by_image[image["id"]]:
                x, y, w, h = (float(v) for v in ann["bbox"])
                lines.append(f"{to_class[ann['category_id']]} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
                             f"{w / width:.6f} {h / height:.6f}")
            name = Path(image["file_name"])
            _link_or_copy(coco_root / split / name, images_dir / name.name)
            (labels_dir / f"{name.stem}.txt").write_text("".join(line + "\n" for line in lines))
    spec = {"path": str(yolo_root), **{split: f"images/{split}" for split in splits},
            "names": {index: c["name"] for index, c in enumerate(categories or [])}}
    out = yolo_root / "data.yaml"
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def category_ids(coco_json: str | Path) -> list[int]:
    """The sorted category ids of a COCO file: YOLO class k is category ``category_ids(...)[k]``."""
    return sorted(c["id"] for c in json.loads(Path(coco_json).read_text())["categories"])

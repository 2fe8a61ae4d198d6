"""A small COCO-format detection dataset of coloured shapes on noise (demos and tests).

``write_coco(root)`` writes ``root/annotations/instances_{train,val}.json`` and ``root/{train,val}/*.jpg``
exactly as COCO lays them out. Three classes with non-contiguous category ids (3 square, 7 circle,
11 triangle), each with its own colour family, 1-4 objects of 20-64 px per image of 128-192 px
(not square), on a dark noisy background; every split holds an image without objects and a crowd
annotation (a cluster of small squares under one ``iscrowd`` box). The same arguments give the same
bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torchvision.io import encode_jpeg

MARKER = ".effdense-synthetic.json"  # marks a folder a synthetic writer made (and may rewrite)
CATEGORIES = ({"id": 3, "name": "square"}, {"id": 7, "name": "circle"}, {"id": 11, "name": "triangle"})
# A base colour per class (RGB), jittered per object: colour and shape both tell the class.
_COLOURS = {3: (230, 70, 60), 7: (70, 220, 90), 11: (80, 110, 240)}


def _mask(category: int, xs: torch.Tensor, ys: torch.Tensor, cx: float, cy: float, half: float) -> torch.Tensor:
    dx, dy = xs - cx, ys - cy
    if category == 3:
        return (dx.abs() <= half) & (dy.abs() <= half)
    if category == 7:
        return dx**2 + dy**2 <= half**2
    # Triangle, apex up, filling its box: base at cy + half, apex at cy - half.
    return (dy >= -half) & (dy <= half) & (dx.abs() <= (dy + half) / 2)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _draw_image(generator: torch.Generator, height: int, width: int, objects: int, crowd: bool):
    """(uint8 image, annotations as (category, [x, y, w, h], iscrowd))."""
    background = 90.0 * torch.rand(3, 1, 1, generator=generator)
    image = background + 10.0 * torch.randn(3, height, width, generator=generator)
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5
    placed, annotations = [], []
    for _ in range(objects * 10):  # rejection sampling keeps objects mostly apart
        if len(placed) == objects:
            break
        category = CATEGORIES[int(torch.randint(len(CATEGORIES), (), generator=generator))]["id"]
        half = _uniform(generator, 10, min(32, min(height, width) / 4))
        cx, cy = _uniform(generator, half, width - half), _uniform(generator, half, height - half)
        if any(abs(cx - px) < half + ph and abs(cy - py) < half + ph for px, py, ph in placed):
            continue
        placed.append((cx, cy, half))
        _paint(image, generator, category, xs, ys, cx, cy, half)
        annotations.append((category, [cx - half, cy - half, 2 * half, 2 * half], 0))
    if crowd:  # a cluster of tiny squares, annotated once as a crowd region
        x0, y0 = _uniform(generator, 0, width - 48), _uniform(generator, 0, height - 48)
        for row in range(3):
            for col in range(3):
                _paint(image, generator, 3, xs, ys, x0 + 8 + 16 * col, y0 + 8 + 16 * row, 4)
        annotations.append((3, [x0 + 4, y0 + 4, 40.0, 40.0], 1))
    return image.round().clamp(0, 255).to(torch.uint8), annotations


def _paint(image, generator, category, xs, ys, cx, cy, half) -> None:
    colour = torch.tensor(_COLOURS[category], dtype=torch.float32) + 25.0 * torch.randn(3, generator=generator)
    mask = _mask(category, xs, ys, cx, cy, half)
    image[:, mask] = colour.clamp(0, 255).view(3, 1)


def write_coco(root: str | Path, train_images: int = 240, val_images: int = 60, min_size: int = 128,
               max_size: int = 192, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (empty, missing, or written by this function before) and return it."""
    if train_images < 2 or val_images < 2:
        raise ValueError(f"train_images and val_images must be >= 2, got {train_images}, {val_images}")
    if not 64 <= min_size <= max_size:
        raise ValueError(f"image sizes must satisfy 64 <= min_size <= max_size, got {min_size}, {max_size}")
    root = Path(root)
    params = dict(kind="coco", train_images=train_images, val_images=val_images, min_size=min_size,
                  max_size=max_size, seed=seed)
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise ValueError(f"refusing to write synthetic data into '{root}': the folder is not empty and was not "
                         f"written by tasks.data.synthetic_detection (no {MARKER})")
    for name in ("train", "val", "annotations"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
    generator = torch.Generator().manual_seed(seed)
    image_id, annotation_id = 1000, 1
    for split, count in (("train", train_images), ("val", val_images)):
        folder = root / split
        folder.mkdir()
        images, annotations = [], []
        for index in range(count):
            height = int(torch.randint(min_size, max_size + 1, (), generator=generator))
            width = int(torch.randint(min_size, max_size + 1, (), generator=generator))
            objects = 0 if index == 0 else int(torch.randint(1, 5, (), generator=generator))
            image, objs = _draw_image(generator, height, width, objects, crowd=index == 1)
            name = f"{split}_{index:05d}.jpg"
            (folder / name).write_bytes(encode_jpeg(image, quality=92).numpy().tobytes())
            image_id += 7  # sparse, non-sequential ids: evaluation must map them back
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for category, bbox, iscrowd in objs:
                bbox = [round(v, 2) for v in bbox]
                annotations.append({"id": annotation_id, "image_id": image_id, "category_id": category, "bbox": bbox,
                                    "area": round(bbox[2] * bbox[3], 2), "iscrowd": iscrowd, "segmentation": []})
                annotation_id += 1
        data = {"info": {"description": "effdense synthetic shapes", "version": "1"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": [dict(c, supercategory="shape")
                                                                             for c in CATEGORIES]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root

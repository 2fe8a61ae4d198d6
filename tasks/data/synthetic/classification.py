"""Small synthetic datasets written in the exact on-disk formats the loaders read (for demos and tests).

Classification: an ImageFolder tree of real JPEG files, one shape per class (circle, square, ...),
with random colours, positions, sizes and pixel noise: easy for a small CNN, but it has to learn.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.io import encode_jpeg

MARKER = ".effdense-synthetic.json"  # marks a folder this module wrote (and may rewrite)

Mask = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (dx, dy, radius, period)


def _circle(dx, dy, radius, period):
    return dx**2 + dy**2 <= radius**2


def _square(dx, dy, radius, period):
    return torch.maximum(dx.abs(), dy.abs()) <= 0.85 * radius


def _triangle(dx, dy, radius, period):  # apex up, base at +0.8 r, base half-width r
    return (dy >= -radius) & (dy <= 0.8 * radius) & (dx.abs() <= (dy + radius) / 1.8)


def _stripes(dx, dy, radius, period):  # diagonal stripes filling a square
    return _square(dx, dy, radius, period) & (torch.floor((dx + dy) / period) % 2 == 0)


def _ring(dx, dy, radius, period):
    distance_sq = dx**2 + dy**2
    return (distance_sq <= radius**2) & (distance_sq >= (0.55 * radius) ** 2)


def _cross(dx, dy, radius, period):
    arm = radius / 3
    return ((dx.abs() <= arm) & (dy.abs() <= radius)) | ((dy.abs() <= arm) & (dx.abs() <= radius))


def _diamond(dx, dy, radius, period):
    return dx.abs() + dy.abs() <= radius


def _checker(dx, dy, radius, period):
    return _square(dx, dy, radius, period) & ((torch.floor(dx / period) + torch.floor(dy / period)) % 2 == 0)


SHAPES: dict[str, Mask] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "stripes": _stripes,
    "ring": _ring, "cross": _cross, "diamond": _diamond, "checker": _checker,
}


def write_classification(root: str | Path, num_classes: int = 4, train_per_class: int = 60, val_per_class: int = 20,
                         size: int = 64, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<shape>/<shape>_NNNN.jpg``; the same arguments give the same bytes.

    ``root`` must be empty, missing, or a folder this function wrote before (then it is rewritten).
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes={num_classes} must be in [1, {len(SHAPES)}] (shapes: {', '.join(SHAPES)})")
    if size < 16:
        raise ValueError(f"size={size} must be >= 16 pixels")
    root = _prepare_root(Path(root), dict(kind="classification", num_classes=num_classes, seed=seed, size=size,
                                          train_per_class=train_per_class, val_per_class=val_per_class))
    generator = torch.Generator().manual_seed(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for shape in list(SHAPES)[:num_classes]:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(draw_shapes(shape, per_class, size, generator)):
                (folder / f"{shape}_{index:04d}.jpg").write_bytes(encode_jpeg(image, quality=90).numpy().tobytes())
    return root


def draw_shapes(shape: str, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` uint8 (3, size, size) images: a bright ``shape`` of random colour, size and position
    on a dark noisy background of random colour (a consistent contrast polarity keeps it quick to learn)."""
    def uniform(low, high):  # (count, 1, 1) draws, broadcasting over the pixel grid
        return low + (high - low) * torch.rand(count, 1, 1, generator=generator)

    radius = size * uniform(0.2, 0.38)
    centre_x, centre_y = (radius + (size - 2 * radius) * uniform(0, 1) for _ in range(2))
    period = (size * uniform(0.06, 0.1)).clamp(min=2.0)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    mask = SHAPES[shape](coords.view(1, 1, size) - centre_x, coords.view(1, size, 1) - centre_y, radius, period)
    foreground = 140.0 + 115.0 * torch.rand(count, 3, 1, 1, generator=generator)
    background = 110.0 * torch.rand(count, 3, 1, 1, generator=generator)
    images = torch.where(mask.unsqueeze(1), foreground, background)
    images = images + 8.0 * torch.randn(count, 3, size, size, generator=generator)
    return images.round().clamp(0, 255).to(torch.uint8)


def _prepare_root(root: Path, params: dict) -> Path:
    marker = root / MARKER
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise ValueError(f"refusing to write synthetic data into '{root}': the folder is not empty "
                         f"and was not written by tasks.data.synthetic (no {MARKER})")
    for split in ("train", "val"):
        shutil.rmtree(root / split, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params, sort_keys=True) + "\n")
    return root

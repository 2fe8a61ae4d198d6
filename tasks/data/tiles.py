"""Tiles of large images (aerial photos, slides, drone pictures) at their native resolution.

One grid for training, sliding-window segmentation and sliced detection: tiles of ``size`` pixels whose
neighbours share ``overlap`` of the side (step ``size - round(size * overlap)``); the last row and column
are moved back to end at the border, so every tile is ``size`` wide and high and every pixel is covered;
along a side shorter than ``size`` the tile is the whole side (an image smaller than a tile is one tile).
Windows are ``(x1, y1, x2, y2)`` in image pixels, corners exclusive at the far end.

Training (``data.tile.size``): the datasets of ``tasks.data.seg_common`` and ``tasks.data.coco`` become one
sample per tile of every image (``use_tiles``): an epoch covers every pixel of the split once, in a
shuffled order of tiles. Each sample is the crop of the image (and its mask, or its boxes: clipped to the
tile, a box kept when at least ``min_visible`` = 50% of its area is inside; ignore regions (crowd) kept
whenever a part is inside), and the usual train transform then runs on the crop as it would on a whole image:
detection's fits the tile into ``data.image_size`` (times the scale jitter), segmentation's random-scales it
and crops ``data.image_size``; with ``data.image_size`` equal to the tile size the objects keep their native
size (up to the jitter). Tiles without any box are kept (background the detector must learn). Evaluation
keeps whole images: segmentation's ``data.eval.mode: slide`` windows default to the tiles
(``tasks.segmentation.inference``), detection slices with ``--slice`` (``tasks.detection.slicing``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger("effdense")

__all__ = ["MIN_VISIBLE", "tile_step", "grid_starts", "tile_grid", "fit_window", "crop_image", "crop_boxes",
           "crop_detection_target", "tile_index", "image_sizes", "describe_tiles"]

MIN_VISIBLE = 0.5  # the fraction of a box's area that must lie inside a tile for the box to be kept

Window = tuple[int, int, int, int]  # (x1, y1, x2, y2)


def tile_step(size: int, overlap: float) -> int:
    """The step between neighbouring tiles: ``size - round(size * overlap)`` (at least 1)."""
    if size < 1:
        raise ValueError(f"tile size {size} must be >= 1")
    if not 0 <= overlap < 1:
        raise ValueError(f"tile overlap {overlap} must be in [0, 1) (a fraction of the tile side)")
    return max(1, size - round(size * overlap))


def grid_starts(length: int, window: int, step: int) -> list[int]:
    """Where windows start along a side of ``length``: every ``step`` pixels, the last one moved back to end
    at the border; ``[0]`` when the side is not longer than the window."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / step) + 1
    return sorted({min(i * step, length - window) for i in range(count)})


def tile_grid(height: int, width: int, size: int | Sequence[int], overlap: float = 0.2,
              step: int | Sequence[int] | None = None) -> list[Window]:
    """The tiles of an image (row by row) as ``(x1, y1, x2, y2)``; ``size`` an int or (h, w); ``step``
    overrides the one ``overlap`` gives."""
    tile_h, tile_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if step is None:
        step_h, step_w = tile_step(tile_h, overlap), tile_step(tile_w, overlap)
    else:
        step_h, step_w = (step, step) if isinstance(step, int) else (int(step[0]), int(step[1]))
    return [(x, y, min(x + tile_w, width), min(y + tile_h, height))
            for y in grid_starts(height, tile_h, step_h) for x in grid_starts(width, tile_w, step_w)]


def fit_window(window: Window | None, height: int, width: int) -> Window:
    """``window`` moved (not shrunk, where it fits) to lie inside an image of ``height`` x ``width``; None
    or an image smaller than the window gives the part that exists (for a replacement sample of another size)."""
    if window is None:
        return 0, 0, width, height
    x1, y1, x2, y2 = window
    tile_w, tile_h = min(x2 - x1, width), min(y2 - y1, height)
    x1, y1 = max(0, min(x1, width - tile_w)), max(0, min(y1, height - tile_h))
    return x1, y1, x1 + tile_w, y1 + tile_h


def crop_image(image: torch.Tensor, window: Window) -> torch.Tensor:
    """The ``window`` of a (..., H, W) image or mask (a contiguous copy: the decoded image can be freed)."""
    x1, y1, x2, y2 = window
    return image[..., y1:y2, x1:x2].contiguous()


def crop_boxes(boxes: torch.Tensor, window: Window, min_visible: float = MIN_VISIBLE,
               iscrowd: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the boxes kept, in the tile's pixels and clipped to it; the keep mask over ``boxes``).

    A box is kept when at least ``min_visible`` of its area lies inside ``window`` (a box 40% inside is
    dropped, 60% kept, with the default 0.5); crowd boxes (``iscrowd``: ignore regions) whenever any part
    of them is inside. Boxes are (n, 4) xyxy in the image's pixels."""
    from torchvision.ops import box_area, clip_boxes_to_image

    x1, y1, x2, y2 = window
    boxes = boxes.reshape(-1, 4).float()
    shifted = boxes - boxes.new_tensor([x1, y1, x1, y1])
    clipped = clip_boxes_to_image(shifted, (y2 - y1, x2 - x1))
    area, inside = box_area(boxes), box_area(clipped)
    visible = (inside > 0) & (inside >= min_visible * area)
    if iscrowd is not None and len(iscrowd):
        visible |= iscrowd.reshape(-1).bool() & (inside > 0)
    return clipped[visible], visible


def crop_detection_target(target: dict, window: Window, min_visible: float = MIN_VISIBLE) -> dict:
    """A detection target (``boxes``, ``labels``, optional ``iscrowd``) for the tile ``window``; gains
    ``tile`` = the window in the image's pixels."""
    boxes, keep = crop_boxes(target["boxes"], window, min_visible, target.get("iscrowd"))
    out = dict(target, boxes=boxes, tile=tuple(int(v) for v in window))
    for key in ("labels", "iscrowd"):
        if key in target:
            out[key] = target[key][keep]
    return out


def tile_index(sizes: Sequence[tuple[int, int] | None], size: int, overlap: float) -> list[tuple[int, Window | None]]:
    """``(image index, window)`` for every tile of every image, image by image; ``sizes`` are (height,
    width) per image, None where unknown (the whole image is one sample: it is read, and fails or is
    skipped, as without tiles)."""
    index: list[tuple[int, Window | None]] = []
    for i, hw in enumerate(sizes):
        if hw is None:
            index.append((i, None))
        else:
            index.extend((i, window) for window in tile_grid(hw[0], hw[1], size, overlap))
    return index


def image_sizes(paths: Sequence[Path], workers: int = 8) -> list[tuple[int, int] | None]:
    """(height, width) of each image file from its header (decoded only where Pillow cannot read it:
    multi-band or float TIFFs); None for a file that is missing or unreadable."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.data.images import header_size

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = pool.map(header_size, paths)
        return [None if size is None else (size[1], size[0]) for size in sizes]  # (height, width)



def describe_tiles(name: str, images: int, tiles: int, size: int, overlap: float) -> None:
    """One log line: how many tiles a split became."""
    log.info("%s: %d images -> %d tiles of %d px (overlap %g) per epoch (data.tile)", name, images, tiles, size,
             overlap)

"""The small-data detection recipe's image operations (``data.augment`` mosaic / mixup / hsv_* / translate /
affine_scale; ultralytics' meanings, see /work/shared/reference/small-data-detection.md). Pure functions of
their arguments: the random draws are the callers' (:class:`tasks.data.transforms.detection.DetectionTrainTransform`
for one image, :class:`tasks.data.mosaic.MosaicDetection` for mosaic and mixup).

Geometry. The recipe's random affine is a zoom ``z`` about the output's centre plus a shift ``t`` (no rotation
or shear), so it is done as a resize by ``z`` (``transforms.v2`` on the image and on ``tv_tensors.BoundingBoxes``)
and a copy at an integer position (:func:`place`); a mosaic places each of its four images, resized by its
fit ratio times ``z``, around the mosaic centre in the same way (:func:`mosaic`), which equals building the
2H x 2W mosaic canvas, warping it and cropping the centre H x W, without resampling twice or warping
4x the pixels. Pixels no image covers get the fill colour.

Boxes are clipped to the output; :func:`keep_boxes` then drops those under ``min_size`` pixels in width or
height, those with less than ``min_visible`` of their area left by the clipping, and those longer than
``max_aspect`` times their width (or the reverse): ultralytics' ``box_candidates`` numbers (2 px, 10%, 100).

HSV (:func:`hsv_jitter`): hue rotated by a fraction of the circle, saturation and value multiplied by gains,
then clipped (saturation to 1, value to the top of the images' range), as ultralytics' ``RandomHSV`` does
(since 8.3.79 the hue is shifted, not multiplied). torchvision's ``adjust_saturation`` blends with the luma
grey and ``adjust_brightness`` clips each band on its own (shifting the hue of bright pixels), so this is its
own HSV round trip in float32, on uint8 or float images of any value range (value = max over the bands).
With other than 3 bands only the value gain means anything: every band is scaled by the pixel's value ratio.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from tasks.data.images import workable

__all__ = ["MIN_BOX_SIZE", "MIN_VISIBLE", "MAX_ASPECT", "as_boxes", "resize", "box_areas", "place", "zoom_shift",
           "mosaic", "keep_boxes", "draw_hsv", "hsv_jitter", "blend"]

MIN_BOX_SIZE = 2.0  # pixels, width and height, after the recipe's geometry
MIN_VISIBLE = 0.1  # fraction of a box's area that must survive the clipping
MAX_ASPECT = 100.0


def as_boxes(boxes: torch.Tensor, canvas: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes.reshape(-1, 4).float(), format="XYXY", canvas_size=canvas)


def resize(image: torch.Tensor, boxes, new_h: int, new_w: int):
    """``image`` (any dtype: as :func:`tasks.data.images.workable`) and ``boxes`` resized to (new_h, new_w)."""
    image = F.resize(tv_tensors.Image(workable(image)), [new_h, new_w], antialias=True)
    boxes = F.resize(boxes, [new_h, new_w])
    return image, boxes


def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    boxes = boxes.as_subclass(torch.Tensor).reshape(-1, 4)
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def place(canvas: torch.Tensor, image: torch.Tensor, boxes: tv_tensors.BoundingBoxes, size: tuple[int, int],
          left: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image`` and its ``boxes`` to ``size`` (h, w) and copy it into ``canvas`` (C, H, W; changed in
    place) with its top-left corner at (``left``, ``top``), either of which may be negative or reach past
    the canvas: only the part inside is copied. Returns (the boxes in canvas pixels, clipped to it, plain
    (n, 4); their areas before the clipping)."""
    new_h, new_w = size
    if tuple(image.shape[-2:]) != (new_h, new_w):
        image, boxes = resize(image, boxes, new_h, new_w)
    areas = box_areas(boxes)
    height, width = canvas.shape[-2:]
    x1, y1, x2, y2 = max(left, 0), max(top, 0), min(left + new_w, width), min(top + new_h, height)
    if x2 > x1 and y2 > y1:
        canvas[:, y1:y2, x1:x2] = image[:, y1 - top:y2 - top, x1 - left:x2 - left]
    moved = F.clamp_bounding_boxes(F.crop(boxes, -top, -left, height, width))  # a crop at -corner = a shift
    return moved.as_subclass(torch.Tensor), areas


def _canvas(like: torch.Tensor, size: tuple[int, int], fill: Sequence[float]) -> torch.Tensor:
    values = torch.tensor([float(v) for v in fill], dtype=torch.float32).to(like.dtype)
    return values.view(-1, 1, 1).expand(like.shape[0], *size).clone()


def zoom_shift(image: torch.Tensor, boxes: tv_tensors.BoundingBoxes, zoom: float, shift: tuple[float, float],
               fill: Sequence[float]):
    """The random affine on one (C, H, W) image: zoomed by ``zoom`` about its centre and moved by ``shift``
    (dx, dy) pixels, same size, the uncovered part filled with ``fill`` (one value per band).

    Returns (image, boxes clipped (n, 4), their areas before the clipping, (sx, sy), (left, top)): an input
    pixel ``p`` of ``image`` lands at ``p * (sx, sy) + (left, top)`` (the zoom and shift as rounded to whole
    pixels)."""
    height, width = image.shape[-2:]
    new_h, new_w = max(1, round(height * zoom)), max(1, round(width * zoom))
    left, top = round((width - new_w) / 2 + shift[0]), round((height - new_h) / 2 + shift[1])
    canvas = _canvas(workable(image), (height, width), fill)
    boxes, areas = place(canvas, image, boxes, (new_h, new_w), left, top)
    return canvas, boxes, areas, (new_w / width, new_h / height), (left, top)


def mosaic(samples: Sequence[tuple[torch.Tensor, dict]], size: tuple[int, int], centre: tuple[float, float],
           zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0), fill: Sequence[float] = (0.0,)):
    """Four ``(image (C, h, w), target)`` samples (boxes in their own pixels) -> one ``size`` (H, W) mosaic.

    Each image is resized to fit (H, W) keeping its aspect ratio and placed on a 2H x 2W canvas around
    ``centre`` (cx, cy) (ultralytics draws it uniformly in [W/2, 3W/2] x [H/2, 3H/2]): the first image
    ends at the centre (top-left quadrant), the second starts right of it (top-right), the third below
    it (bottom-left), the fourth is the bottom-right; then the canvas is zoomed by ``zoom`` about its
    centre, moved by ``shift`` (dx, dy) and its middle (H, W) kept: canvas point ``p`` lands at
    ``(W/2, H/2) + zoom * (p - (W, H)) + shift`` (each image's corner rounded to a whole pixel).

    Returns (image, target, areas): target = ``boxes`` (n, 4) clipped to the output, ``labels``, ``iscrowd``
    (when every sample has it), ``source`` (n,) the sample each box comes from, ``image_id`` (the first
    sample's) and ``mosaic`` (every sample's image id); ``areas``: the boxes' areas before the clipping.
    """
    if len(samples) != 4:
        raise ValueError(f"a mosaic takes 4 samples, got {len(samples)}")
    height, width = size
    first = workable(samples[0][0])
    canvas = _canvas(first, (height, width), fill)
    corner_x = round(width / 2 + zoom * (centre[0] - width) + shift[0])
    corner_y = round(height / 2 + zoom * (centre[1] - height) + shift[1])
    parts: dict[str, list] = {"boxes": [], "labels": [], "iscrowd": [], "source": [], "areas": []}
    for index, (image, target) in enumerate(samples):
        h, w = image.shape[-2:]
        ratio = zoom * min(height / h, width / w)
        new_h, new_w = max(1, round(h * ratio)), max(1, round(w * ratio))
        left = corner_x - new_w if index in (0, 2) else corner_x
        top = corner_y - new_h if index in (0, 1) else corner_y
        boxes, areas = place(canvas, image, as_boxes(target["boxes"], (h, w)), (new_h, new_w), left, top)
        parts["boxes"].append(boxes)
        parts["areas"].append(areas)
        parts["labels"].append(target["labels"].reshape(-1))
        parts["iscrowd"].append(target.get("iscrowd"))
        parts["source"].append(torch.full((len(boxes),), index, dtype=torch.int64))
    out = {"boxes": torch.cat(parts["boxes"]), "labels": torch.cat(parts["labels"]),
           "source": torch.cat(parts["source"]), "image_id": samples[0][1].get("image_id"),
           "mosaic": tuple(target.get("image_id") for _, target in samples)}
    if all(flags is not None for flags in parts["iscrowd"]):
        out["iscrowd"] = torch.cat([flags.reshape(-1) for flags in parts["iscrowd"]])
    return canvas, out, torch.cat(parts["areas"])


def keep_boxes(target: dict, boxes: torch.Tensor, areas: torch.Tensor | None = None,
               min_size: float = MIN_BOX_SIZE, min_visible: float = MIN_VISIBLE,
               max_aspect: float = MAX_ASPECT) -> dict:
    """``target`` with ``boxes`` (clipped, (n, 4)) less those thinner than ``min_size``, those with less
    than ``min_visible`` of ``areas`` (their areas before the clipping; None: no such rule) left, and
    those with an aspect ratio over ``max_aspect``; the per-box entries (labels, iscrowd, source) follow."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (width >= min_size) & (height >= min_size)
    keep &= torch.maximum(width / height.clamp(min=1e-6), height / width.clamp(min=1e-6)) <= max_aspect
    if areas is not None:
        keep &= width * height >= min_visible * areas
    out = dict(target)
    out["boxes"] = boxes[keep]
    for key in ("labels", "iscrowd", "source"):
        if key in target:
            out[key] = target[key][keep]
    return out


def draw_hsv(hue: float, saturation: float, value: float) -> tuple[float, float, float]:
    """ultralytics' random gains: (hue shift in [-hue, hue] of the circle, saturation gain in
    [1 - saturation, 1 + saturation], value gain in [1 - value, 1 + value]), drawn with ``random``."""
    draws = [random.uniform(-1.0, 1.0) for _ in range(3)]
    return draws[0] * hue, 1.0 + draws[1] * saturation, 1.0 + draws[2] * value


def hsv_jitter(image: torch.Tensor, hue: float = 0.0, saturation: float = 1.0, value: float = 1.0,
               top: float | None = None) -> torch.Tensor:
    """``image`` (C, H, W), uint8 or float, with its hue rotated by ``hue`` (fraction of the circle) and its
    saturation and value multiplied by the gains; saturation clipped to 1 and value to ``top`` (255 for
    uint8; None for float: unbounded). Other than 3 bands: only ``value`` (every band scaled by
    ``min(value, top / max over the bands)``); a hue or saturation change is a ValueError."""
    x = image.to(torch.float32)
    if image.dtype == torch.uint8:
        top = 255.0 if top is None else min(float(top), 255.0)
    v = x.amax(dim=0)  # HSV value
    gain = torch.full_like(v, value) if top is None else (top / v.clamp(min=1e-12)).clamp_(max=value)  # V' / V
    if image.shape[0] != 3:
        if hue or saturation != 1.0:
            raise ValueError(f"a hue or saturation change needs 3 bands (RGB), the image has {image.shape[0]}")
        out = x.mul_(gain)
    else:
        red, green, blue = x
        delta = v - x.amin(dim=0)  # chroma = V S
        # hue in sixths of the circle: the sector of the largest band (R 0, G 2, B 4) plus the place inside it
        h = torch.where(v == red, green - blue, torch.where(v == green, blue - red + 2 * delta, red - green + 4 * delta))
        h = h.div_(delta.clamp(min=1e-12)).add_(6 * hue).remainder_(6)
        chroma = (delta * saturation).clamp_(max=v).mul_(gain)  # V' S' = (V' / V) min(S gain, 1) V
        # back to RGB: band n = V' - V' S' clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B
        k = (torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + h).remainder_(6)
        out = torch.minimum(k, 4 - k).clamp_(0, 1).mul_(chroma).neg_().add_(v * gain)
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.clamp_(min=0, max=top).to(image.dtype)  # (v * top / v may round above top)


def blend(first: tuple[torch.Tensor, dict], second: tuple[torch.Tensor, dict], ratio: float):
    """Mixup: ``ratio * first + (1 - ratio) * second`` (rounded for uint8), with the boxes (labels, iscrowd)
    of both; the other entries (image id, meta) are the first's, ``mixup`` holds (ratio, second image id)."""
    (image_a, target_a), (image_b, target_b) = first, second
    mixed = image_a.to(torch.float32) * ratio + image_b.to(torch.float32) * (1.0 - ratio)
    image = mixed.round_().clamp_(0, 255).to(torch.uint8) if image_a.dtype == torch.uint8 else mixed
    target = dict(target_a)
    target["boxes"] = torch.cat([target_a["boxes"].reshape(-1, 4), target_b["boxes"].reshape(-1, 4)])
    target["labels"] = torch.cat([target_a["labels"].reshape(-1), target_b["labels"].reshape(-1)])
    if "iscrowd" in target_a or "iscrowd" in target_b:
        flags = [t["iscrowd"].reshape(-1) if "iscrowd" in t else torch.zeros(len(t["boxes"]), dtype=torch.bool)
                 for t in (target_a, target_b)]
        target["iscrowd"] = torch.cat(flags)
    target.pop("source", None)
    target["mixup"] = (float(ratio), target_b.get("image_id"))
    return image, target

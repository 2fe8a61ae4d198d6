"""Detection augmentation with transforms.v2 and ``tv_tensors.BoundingBoxes`` (boxes move with the image).

``size`` is the input (h, w) or one int for a square. Train: random scale jitter (the image is resized
to fit ``size * s``, s uniform in [0.1, 2.0]), a random ``size`` crop (or bottom/right padding where it
is smaller), horizontal flip; boxes are clipped and those thinner than ``min_box_size`` pixels dropped
(with their labels and crowd flags). Eval: letterbox (resized to fit ``size`` keeping the aspect
ratio, the rest padded bottom/right). Both pad with the
ImageNet mean colour (0 after normalisation) and record how input pixels relate to the original:
``input = original * scale + offset`` per axis, ``scale = (sx, sy)``, ``offset = (ox, oy)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

MEAN_FILL = (124, 116, 104)  # ImageNet mean * 255: padding that normalises to ~0


def input_size(size: int | Sequence[int]) -> tuple[int, int]:
    """An int or (h, w) -> (h, w), both >= 1."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"detection input size {size!r} must be positive")
    return height, width


def _as_boxes(boxes: torch.Tensor, canvas: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes.reshape(-1, 4).float(), format="XYXY", canvas_size=canvas)


def _fill(fill: Sequence[int], channels: int) -> list[float]:
    return [float(v) for v in fill][:channels] if len(fill) >= channels else [float(fill[0])] * channels


def _resize(image: torch.Tensor, boxes, new_h: int, new_w: int):
    image = F.resize(tv_tensors.Image(image), [new_h, new_w], antialias=True)
    boxes = F.resize(boxes, [new_h, new_w])
    return image, boxes


def letterbox(image: torch.Tensor, size: int | Sequence[int], fill: Sequence[int] = MEAN_FILL,
              boxes: torch.Tensor | None = None):
    """uint8 (3, H, W) -> ((3, h, w) letterboxed image, meta[, boxes moved along]) for ``size`` (h, w).

    ``meta``: ``orig_size`` (H, W), ``scale`` (sx, sy) and ``offset`` (0, 0): input = original * scale.
    """
    out_h, out_w = input_size(size)
    height, width = image.shape[-2:]
    ratio = min(out_h / height, out_w / width)
    new_h, new_w = max(1, min(out_h, round(height * ratio))), max(1, min(out_w, round(width * ratio)))
    bb = _as_boxes(boxes if boxes is not None else torch.zeros(0, 4), (height, width))
    out, bb = _resize(image, bb, new_h, new_w)
    padding = [0, 0, out_w - new_w, out_h - new_h]
    out = F.pad(out, padding, fill=_fill(fill, out.shape[0]))
    bb = F.pad(bb, padding)
    meta = {"orig_size": (int(height), int(width)), "scale": (new_w / width, new_h / height), "offset": (0.0, 0.0)}
    out = out.as_subclass(torch.Tensor)
    if boxes is None:
        return out, meta
    return out, meta, bb.as_subclass(torch.Tensor)


def unletterbox_boxes(boxes: torch.Tensor, meta: dict) -> torch.Tensor:
    """Boxes in input pixels -> the original image's pixels (inverse of ``scale``/``offset``), clipped."""
    (sx, sy), (ox, oy) = meta["scale"], meta["offset"]
    height, width = meta["orig_size"]
    scale = boxes.new_tensor([sx, sy, sx, sy])
    offset = boxes.new_tensor([ox, oy, ox, oy])
    out = (boxes - offset) / scale
    limit = boxes.new_tensor([width, height, width, height])
    return torch.minimum(out.clamp(min=0), limit)


def _keep_boxes(boxes: torch.Tensor, target: dict, min_size: float) -> dict:
    """``target`` with clipped ``boxes``, less those thinner than ``min_size`` (with their labels/flags)."""
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    out = dict(target)
    out["boxes"] = boxes[keep]
    for key in ("labels", "iscrowd"):
        if key in target:
            out[key] = target[key][keep]
    return out


class DetectionTrainTransform:
    """``(uint8 image (3, H, W), target)`` -> the jittered ``size`` crop and its target.

    ``target`` holds ``boxes`` (n, 4) xyxy original pixels, ``labels``, optional ``iscrowd``; the
    result's boxes are in input pixels and it gains ``orig_size``, ``scale``/``offset`` (the mapping
    before the flip) and ``hflip`` (whether the image was then mirrored).
    """

    def __init__(self, size: int | Sequence[int], scale_range: tuple[float, float] = (0.1, 2.0), hflip: float = 0.5,
                 fill: Sequence[int] = MEAN_FILL, min_box_size: float = 1.0):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < min <= max, got {scale_range}")
        self.size, self.scale_range, self.hflip = input_size(size), tuple(scale_range), float(hflip)
        self.fill, self.min_box_size = tuple(fill), float(min_box_size)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        height, width = image.shape[-2:]
        out_h, out_w = self.size
        jitter = random.uniform(*self.scale_range)
        ratio = jitter * min(out_h / height, out_w / width)
        new_h, new_w = max(1, round(height * ratio)), max(1, round(width * ratio))
        boxes = _as_boxes(target["boxes"], (height, width))
        out, boxes = _resize(image, boxes, new_h, new_w)
        top = random.randint(0, max(0, new_h - out_h))
        left = random.randint(0, max(0, new_w - out_w))
        crop_h, crop_w = min(out_h, new_h), min(out_w, new_w)
        out, boxes = F.crop(out, top, left, crop_h, crop_w), F.crop(boxes, top, left, crop_h, crop_w)
        padding = [0, 0, out_w - crop_w, out_h - crop_h]
        out = F.pad(out, padding, fill=_fill(self.fill, out.shape[0]))
        boxes = F.clamp_bounding_boxes(F.pad(boxes, padding))
        flipped = self.hflip > 0 and random.random() < self.hflip
        if flipped:
            out, boxes = F.horizontal_flip(out), F.horizontal_flip(boxes)
        result = _keep_boxes(boxes.as_subclass(torch.Tensor), target, self.min_box_size)
        result.update(orig_size=(int(height), int(width)), scale=(new_w / width, new_h / height),
                      offset=(-float(left), -float(top)), hflip=flipped)
        return out.as_subclass(torch.Tensor), result


class DetectionEvalTransform:
    """``(uint8 image, target)`` -> the letterboxed ``size`` image and its target (boxes in input pixels,
    plus ``orig_size``/``scale``/``offset`` for mapping detections back)."""

    def __init__(self, size: int | Sequence[int], fill: Sequence[int] = MEAN_FILL):
        self.size, self.fill = input_size(size), tuple(fill)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        out, meta, boxes = letterbox(image, self.size, self.fill, target["boxes"])
        result = dict(target)
        result["boxes"] = boxes
        result.update(meta)
        return out, result


def detection_collate(batch):
    """Images stack (uint8 (N, 3, S, S)); targets stay a list of dicts (variable box counts)."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)

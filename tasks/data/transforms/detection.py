"""Detection augmentation with transforms.v2 and ``tv_tensors.BoundingBoxes`` (boxes move with the image).

``size`` is the input (h, w) or one int for a square. Train: random scale jitter (the image is resized
to fit ``size * s``, s uniform in [0.1, 2.0]), a random ``size`` crop (or bottom/right padding where it
is smaller), horizontal flip; boxes are clipped and those thinner than ``min_box_size`` pixels dropped
(with their labels and crowd flags). Eval: letterbox (resized to fit ``size`` keeping the aspect
ratio, the rest padded bottom/right). Both pad with the
mean colour (0 after normalisation: :func:`mean_fill` of a config; ImageNet's by default) and record how
input pixels relate to the original: ``input = original * scale + offset`` per axis, ``scale = (sx, sy)``,
``offset = (ox, oy)``. 8-bit images stay uint8; others (16-bit) become float32 of the same values
(torchvision's transforms take uint8 or float only), and the collate stacks them as they come.

The small-data recipe's options of the train transform (``data.augment``; all 0 = off, and then nothing
else is drawn or done): ``translate`` / ``affine_scale``, a random zoom ``1 +- affine_scale`` about the
centre and shift ``+-translate * size`` after the crop (``scale``/``offset`` include it), boxes then
filtered by :func:`tasks.data.transforms.detection_recipe.keep_boxes`; ``hsv`` = (hsv_h, hsv_s, hsv_v), random
HSV gains after the flip (:func:`~tasks.data.transforms.detection_recipe.hsv_jitter`; ``value_top`` clips
the value of float images). Mosaic and mixup combine samples: :class:`tasks.data.mosaic.MosaicDetection`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import functional as F

from tasks.data.errors import DataError
from tasks.data.images import describe_dtype
from tasks.data.transforms.detection_recipe import as_boxes as _as_boxes
from tasks.data.transforms.detection_recipe import MIN_BOX_SIZE, draw_hsv, hsv_jitter, keep_boxes, zoom_shift
from tasks.data.transforms.detection_recipe import resize as _resize

MEAN_FILL = (124, 116, 104)  # ImageNet mean * 255: padding that normalises to ~0


def mean_fill(cfg) -> tuple[float, ...] | None:
    """The padding value per band that normalises to 0: ``lo + mean (hi - lo)`` in the images' own values
    (``data.input_range``, else 0..255), rounded for uint8 images when used; None with
    ``data.normalize=percentile`` (no fixed value: each image pads with its own per-band mean)."""
    if cfg.data.normalize == "percentile":
        return None
    lo, hi = cfg.data.input_range if cfg.data.input_range is not None else (0.0, 255.0)
    return tuple(float(lo) + float(m) * (float(hi) - float(lo)) for m in cfg.data.mean)


def input_size(size: int | Sequence[int]) -> tuple[int, int]:
    """An int or (h, w) -> (h, w), both >= 1."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"detection input size {size!r} must be positive")
    return height, width


def fill_values(fill: Sequence[float] | None, image: torch.Tensor) -> list[float]:
    """``fill`` for ``image``'s bands (rounded for uint8); None: the image's own mean per band."""
    channels = image.shape[0]
    if fill is None:
        return image.to(torch.float32).mean(dim=(-2, -1)).tolist()
    values = [float(v) for v in fill][:channels] if len(fill) >= channels else [float(fill[0])] * channels
    return [float(round(v)) for v in values] if image.dtype == torch.uint8 else values


def letterbox(image: torch.Tensor, size: int | Sequence[int], fill: Sequence[float] | None = MEAN_FILL,
              boxes: torch.Tensor | None = None):
    """(C, H, W) -> ((C, h, w) letterboxed image, meta[, boxes moved along]) for ``size`` (h, w).

    ``meta``: ``orig_size`` (H, W), ``scale`` (sx, sy) and ``offset`` (0, 0): input = original * scale.
    """
    out_h, out_w = input_size(size)
    height, width = image.shape[-2:]
    ratio = min(out_h / height, out_w / width)
    new_h, new_w = max(1, min(out_h, round(height * ratio))), max(1, min(out_w, round(width * ratio)))
    bb = _as_boxes(boxes if boxes is not None else torch.zeros(0, 4), (height, width))
    out, bb = _resize(image, bb, new_h, new_w)
    padding = [0, 0, out_w - new_w, out_h - new_h]
    out = F.pad(out, padding, fill=fill_values(fill, out))
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
    """``(image (C, H, W), target)`` -> the jittered ``size`` crop and its target.

    ``target`` holds ``boxes`` (n, 4) xyxy original pixels, ``labels``, optional ``iscrowd``; the
    result's boxes are in input pixels and it gains ``orig_size``, ``scale``/``offset`` (the mapping
    before the flip) and ``hflip`` (whether the image was then mirrored). ``hsv``, ``translate``,
    ``affine_scale``, ``value_top``: the small-data recipe's options (the module's docstring).
    """

    def __init__(self, size: int | Sequence[int], scale_range: tuple[float, float] = (0.1, 2.0), hflip: float = 0.5,
                 fill: Sequence[float] | None = MEAN_FILL, min_box_size: float = 1.0,
                 hsv: Sequence[float] = (0.0, 0.0, 0.0), translate: float = 0.0, affine_scale: float = 0.0,
                 value_top: float | None = None):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < min <= max, got {scale_range}")
        self.size, self.scale_range, self.hflip = input_size(size), tuple(scale_range), float(hflip)
        self.fill, self.min_box_size = tuple(fill) if fill is not None else None, float(min_box_size)
        self.hsv, self.value_top = tuple(float(v) for v in hsv), value_top
        self.translate, self.affine_scale = float(translate), float(affine_scale)

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
        out = F.pad(out, padding, fill=fill_values(self.fill, out))
        boxes = F.clamp_bounding_boxes(F.pad(boxes, padding))
        scale, offset, areas = (new_w / width, new_h / height), (-float(left), -float(top)), None
        if self.translate or self.affine_scale:  # the recipe's random affine: zoom about the centre, shift
            zoom = random.uniform(1.0 - self.affine_scale, 1.0 + self.affine_scale)
            shift = (random.uniform(-1.0, 1.0) * self.translate * out_w,
                     random.uniform(-1.0, 1.0) * self.translate * out_h)
            out, moved, areas, (zx, zy), (zl, zt) = zoom_shift(out, boxes, zoom, shift, fill_values(self.fill, out))
            boxes = _as_boxes(moved, (out_h, out_w))
            scale, offset = (scale[0] * zx, scale[1] * zy), (offset[0] * zx + zl, offset[1] * zy + zt)
        flipped = self.hflip > 0 and random.random() < self.hflip
        if flipped:
            out, boxes = F.horizontal_flip(out), F.horizontal_flip(boxes)
        out = out.as_subclass(torch.Tensor)
        if any(self.hsv):
            out = hsv_jitter(out, *draw_hsv(*self.hsv), top=self.value_top)
        boxes = boxes.as_subclass(torch.Tensor)
        if areas is None:
            result = _keep_boxes(boxes, target, self.min_box_size)
        else:
            result = keep_boxes(target, boxes, areas, min_size=max(self.min_box_size, MIN_BOX_SIZE))
        result.update(orig_size=(int(height), int(width)), scale=scale, offset=offset, hflip=flipped)
        return out, result


class DetectionEvalTransform:
    """``(image, target)`` -> the letterboxed ``size`` image and its target (boxes in input pixels,
    plus ``orig_size``/``scale``/``offset`` for mapping detections back)."""

    def __init__(self, size: int | Sequence[int], fill: Sequence[float] | None = MEAN_FILL):
        self.size, self.fill = input_size(size), tuple(fill) if fill is not None else None

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        out, meta, boxes = letterbox(image, self.size, self.fill, target["boxes"])
        result = dict(target)
        result["boxes"] = boxes
        result.update(meta)
        return out, result


def detection_collate(batch):
    """Images stack ((N, C, S, S), uint8 for 8-bit data, else float32); targets stay a list of dicts (variable
    box counts). Images of two dtypes in one batch are a one-line error naming them (one 16-bit file among
    8-bit ones; the datasets' readers catch it first, naming the file)."""
    images, targets = zip(*batch)
    kinds = {image.dtype for image in images}
    if len(kinds) > 1:
        ids = {image.dtype: target.get("image_id") for image, target in zip(images, targets)}
        found = ", ".join(f"{describe_dtype(dtype)} (image id {ids[dtype]})" for dtype in sorted(kinds, key=str))
        raise DataError(f"a batch mixes image depths: {found}; expected one depth for every image of a dataset "
                        f"(`effdense data check` lists each image's)")
    return torch.stack(images), list(targets)

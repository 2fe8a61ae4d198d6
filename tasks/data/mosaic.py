"""Mosaic and mixup for detection training (``data.augment.mosaic`` / ``mixup``, the small-data recipe).

:class:`MosaicDetection` wraps a training dataset (``CocoDetection`` and the formats converted to it, whole
images or ``data.tile`` tiles): it takes the dataset's transform (the one-image train transform) and reads
the dataset's own samples untransformed. Per sample, with probability ``mosaic`` four samples (this one and
three drawn at random) become one mosaic (:func:`tasks.data.transforms.detection_recipe.mosaic`: a 2H x 2W
canvas around a centre drawn uniformly in its middle half, then the random zoom ``1 +- affine_scale`` and
shift ``+- translate * size``, cropped to the input size), then flipped (``hflip``), HSV-jittered and its
boxes clipped and filtered (:func:`~tasks.data.transforms.detection_recipe.keep_boxes`); otherwise the
sample goes through the one-image transform as without the wrapper. Then, with probability ``mixup``,
another sample made the same way is blended in with a Beta(32, 32) ratio, the boxes of both kept.

A mosaic sample's meta (``orig_size``, ``scale``, ``offset``, ``hflip``) describes the mosaic canvas, not
one image: ``orig_size`` is the canvas (2H, 2W) and ``input = canvas * scale + offset`` up to each image's
corner rounding; ``image_id`` is the first image's, ``mosaic`` lists the four, ``source`` gives each box's
(0..3). A mixed sample keeps the first's meta and adds ``mixup`` = (ratio, the other image id). Nothing
reads this meta in training; evaluation never sees either kind.

``set_mixing(False)`` switches mosaic and mixup off (``close_mosaic``; :mod:`tasks.detection.augment`),
``set_mixing(True)`` back to the configured probabilities. Randomness comes from Python's ``random`` (the
DataLoader seeds it per worker), as in the one-image transform. Other attributes are the dataset's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from tasks.data.images import workable
from tasks.data.transforms.detection import fill_values, input_size
from tasks.data.transforms.detection_recipe import as_boxes, blend, draw_hsv, hsv_jitter, keep_boxes, mosaic

__all__ = ["MosaicDetection", "MIXUP_BETA"]

MIXUP_BETA = 32.0  # the Beta(a, a) of mixup's ratio (ultralytics)


class MosaicDetection(Dataset):
    """``dataset`` (its samples ``(image, target)``, read untransformed: its ``transform`` moves here) with
    mosaic and mixup; ``size``, ``hflip``, ``hsv``, ``translate``, ``affine_scale``, ``fill`` (None: the
    images' mean) and ``value_top`` as the one-image train transform has them (``data.augment``)."""

    def __init__(self, dataset, size: int | Sequence[int], mosaic: float = 1.0, mixup: float = 0.0,
                 hflip: float = 0.5, hsv: Sequence[float] = (0.0, 0.0, 0.0), translate: float = 0.0,
                 affine_scale: float = 0.0, fill: Sequence[float] | None = None, value_top: float | None = None):
        if not hasattr(dataset, "transform"):
            raise TypeError(f"MosaicDetection needs a dataset with a 'transform' attribute, got "
                            f"{type(dataset).__name__}")
        self.dataset, self.transform = dataset, dataset.transform
        dataset.transform = None  # its samples: the image as read (or the tile) and boxes in its pixels
        self.size, self.hflip = input_size(size), float(hflip)
        self.hsv = tuple(float(v) for v in hsv)
        self.translate, self.affine_scale = float(translate), float(affine_scale)
        self.fill, self.value_top = tuple(fill) if fill is not None else None, value_top
        self.configured = (float(mosaic), float(mixup))
        self.mosaic, self.mixup = self.configured

    def set_mixing(self, on: bool) -> None:
        """Mosaic and mixup at their configured probabilities (``on``) or off."""
        self.mosaic, self.mixup = self.configured if on else (0.0, 0.0)

    @property
    def mixing(self) -> bool:
        return bool(self.mosaic or self.mixup)

    def __getattr__(self, name: str):  # the wrapped dataset's attributes (classes, cat_ids, tiles, root, ...)
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self._sample(index)
        if self.mixup > 0 and random.random() < self.mixup:
            other = self._sample(random.randrange(len(self)))
            sample = blend(sample, other, random.betavariate(MIXUP_BETA, MIXUP_BETA))
        return sample

    def _sample(self, index: int):
        if self.mosaic > 0 and random.random() < self.mosaic:
            others = [random.randrange(len(self)) for _ in range(3)]
            return self._mosaic([self.dataset[i] for i in (index, *others)])
        image, target = self.dataset[index]
        return self.transform(image, target) if self.transform is not None else (image, target)

    def _mosaic(self, samples: list):
        height, width = self.size
        samples = [(workable(image), target) for image, target in samples]
        if self.fill is not None:
            fill = fill_values(self.fill, samples[0][0])
        else:  # data.normalize=percentile: the mean of the four images' means
            means = torch.tensor([fill_values(None, image) for image, _ in samples]).mean(dim=0).tolist()
            fill = fill_values(means, samples[0][0])
        centre = (random.uniform(0.5 * width, 1.5 * width), random.uniform(0.5 * height, 1.5 * height))
        zoom = random.uniform(1.0 - self.affine_scale, 1.0 + self.affine_scale)
        shift = (random.uniform(-1.0, 1.0) * self.translate * width,
                 random.uniform(-1.0, 1.0) * self.translate * height)
        image, target, areas = mosaic(samples, self.size, centre, zoom, shift, fill)
        boxes = target["boxes"]
        flipped = self.hflip > 0 and random.random() < self.hflip
        if flipped:
            image = F.horizontal_flip(image)
            boxes = F.horizontal_flip(as_boxes(boxes, (height, width))).as_subclass(torch.Tensor)
        image = image.as_subclass(torch.Tensor)
        if any(self.hsv):
            image = hsv_jitter(image, *draw_hsv(*self.hsv), top=self.value_top)
        target = keep_boxes(target, boxes, areas)
        offset = (width / 2 + shift[0] - zoom * width, height / 2 + shift[1] - zoom * height)
        target.update(orig_size=(2 * height, 2 * width), scale=(zoom, zoom), offset=offset, hflip=flipped)
        return image, target

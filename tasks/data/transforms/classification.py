"""Classification augmentation with torchvision.transforms.v2 on (C, H, W) image tensors.

8-bit images stay uint8 (the fast path: uint8 travels); others (16-bit) become float32 of the same values
first (:func:`tasks.data.images.workable`), since torchvision's transforms take uint8 or float only.
RandAugment is 8-bit only (:class:`tasks.data.images.EightBitOnly`). Normalisation (range, mean/std)
happens on the device, after the batch has travelled. Sizes are (h, w) pairs (``tasks.config.resolve_image_size``).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from tasks.config.schema import ClassificationAugmentConfig
from tasks.data.images import EightBitOnly, workable


class Compose(v2.Compose):
    """``v2.Compose`` that first makes the image one torchvision takes (:func:`tasks.data.images.workable`:
    uint8 as it is, 16-bit as float32 of the same values)."""

    def forward(self, *inputs):
        return super().forward(*(workable(item) if isinstance(item, torch.Tensor) else item for item in inputs))


def classification_train_transform(augment: ClassificationAugmentConfig, size: tuple[int, int]) -> Compose:
    """RandomResizedCrop(size, scale=(scale_min, 1)), horizontal flip, optional RandAugment."""
    steps = [v2.RandomResizedCrop(tuple(size), scale=(augment.scale_min, 1.0), antialias=True)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=augment.hflip))
    if augment.randaugment:
        steps.append(EightBitOnly(v2.RandAugment(num_ops=augment.randaugment_ops,
                                                 magnitude=augment.randaugment_magnitude)))
    return Compose(steps)


def classification_eval_transform(augment: ClassificationAugmentConfig, size: tuple[int, int]) -> Compose:
    """Resize the short side to ``int(max(size) / eval_crop_pct)``, then centre-crop ``size``."""
    return Compose([
        v2.Resize(int(max(size) / augment.eval_crop_pct), antialias=True),
        v2.CenterCrop(tuple(size)),
    ])

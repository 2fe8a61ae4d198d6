"""Classification augmentation with torchvision.transforms.v2 on uint8 (3, H, W) tensors.

Transforms return uint8; normalisation (mean/std) happens on the device, after the batch has travelled.
Sizes are (h, w) pairs (``tasks.config.resolve_image_size``).
"""

from __future__ import annotations

from torchvision.transforms import v2

from tasks.config.schema import ClassificationAugmentConfig


def classification_train_transform(augment: ClassificationAugmentConfig, size: tuple[int, int]) -> v2.Compose:
    """RandomResizedCrop(size, scale=(scale_min, 1)), horizontal flip, optional RandAugment."""
    steps = [v2.RandomResizedCrop(tuple(size), scale=(augment.scale_min, 1.0), antialias=True)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=augment.hflip))
    if augment.randaugment:
        steps.append(v2.RandAugment(num_ops=augment.randaugment_ops, magnitude=augment.randaugment_magnitude))
    return v2.Compose(steps)


def classification_eval_transform(augment: ClassificationAugmentConfig, size: tuple[int, int]) -> v2.Compose:
    """Resize the short side to ``int(max(size) / eval_crop_pct)``, then centre-crop ``size``."""
    return v2.Compose([
        v2.Resize(int(max(size) / augment.eval_crop_pct), antialias=True),
        v2.CenterCrop(tuple(size)),
    ])

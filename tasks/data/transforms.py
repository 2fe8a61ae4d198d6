"""Classification augmentation with torchvision.transforms.v2 on uint8 (3, H, W) tensors.

Transforms return uint8; normalisation (mean/std) happens on the device, after the batch has travelled.
"""

from __future__ import annotations

from torchvision.transforms import v2

from tasks.config import AugmentConfig


def classification_train_transform(augment: AugmentConfig, size: int) -> v2.Compose:
    """RandomResizedCrop(size, scale=(scale_min, 1)), horizontal flip, optional RandAugment."""
    steps = [v2.RandomResizedCrop(size, scale=(augment.scale_min, 1.0), antialias=True)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=augment.hflip))
    if augment.randaugment:
        steps.append(v2.RandAugment(num_ops=augment.randaugment_ops, magnitude=augment.randaugment_magnitude))
    return v2.Compose(steps)


def classification_eval_transform(augment: AugmentConfig, size: int) -> v2.Compose:
    """Resize the short side to ``int(size / eval_crop_pct)``, then centre-crop ``size`` x ``size``."""
    return v2.Compose([
        v2.Resize(int(size / augment.eval_crop_pct), antialias=True),
        v2.CenterCrop(size),
    ])

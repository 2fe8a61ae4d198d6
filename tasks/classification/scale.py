"""What a classification config's scale resolves to: the backbone and the input size."""

from __future__ import annotations

import torch

from tasks.config.scaling import B_SCALES, IMAGENET_TOP1, ScaleFamily, describe_backbone, random_images

__all__ = ["describe_scale", "example_batch", "SCALES", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("width_multiplier", "depth_multiplier")  # what `effdense backbones --task` shows per row

SCALES = ScaleFamily(prefix="B", names=B_SCALES, cpu_names=B_SCALES[:3], published=IMAGENET_TOP1)


def describe_scale(cfg) -> dict:
    """Plain data: task, phi / scale, input size, backbone name and width/depth multipliers."""
    return describe_backbone(cfg)


def example_batch(cfg, batch_size: int, device="cpu"):
    """uint8 images and int64 labels (N,) in 0..num_classes-1."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, cfg.model.num_classes, (batch_size,), generator=generator)
    return random_images(cfg, batch_size, generator).to(device), labels.to(device)

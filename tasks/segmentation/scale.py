"""What a segmentation config's scale resolves to: the backbone, the input size and the head's sizes."""

from __future__ import annotations

import torch

from heads.bifpn_seg import levels_for_crop

from tasks.config.scaling import (B_SCALES, IMAGENET_TOP1, ScaleFamily, backbone_spec, bifpn_size, decoder_widths,
                                  describe_backbone, random_images, resolve_image_size)

__all__ = ["describe_scale", "example_batch", "SCALES", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("decoder_channels", "bifpn_width", "bifpn_repeats")

# The backbone's ImageNet top-1 beside each scale; crops are a data choice, so a scale is measured at the
# config's crop (summaries: the 512x1024 Cityscapes crop).
SCALES = ScaleFamily(prefix="B", names=B_SCALES, cpu_names=B_SCALES[:3], published=IMAGENET_TOP1,
                     metric="bb top-1", image_size="config", summary_size=(512, 1024))


def describe_scale(cfg) -> dict:
    """:func:`tasks.config.scaling.describe_backbone` plus the head: U-Net decoder widths, or the BiFPN's
    width, repeats and levels (null keys: the EfficientDet row of the scale, the levels from the crop)."""
    info = describe_backbone(cfg)
    head, m = cfg.model.segmentation, cfg.model
    info["head"] = head.head
    if head.head == "bifpn":
        width, repeats = head.bifpn_width, head.bifpn_repeats
        if width is None or repeats is None:
            name, options = backbone_spec(m)
            row_width, row_repeats = bifpn_size(name, options.get("phi"))
            width, repeats = width or row_width, repeats or row_repeats
        info.update(bifpn_width=width, bifpn_repeats=repeats,
                    bifpn_levels=list(head.bifpn_levels or levels_for_crop(resolve_image_size(cfg))))
    else:
        info["decoder_channels"] = decoder_widths(head.decoder_channels, backbone_spec(m)[1].get("phi"))
    return info


def example_batch(cfg, batch_size: int, device="cpu"):
    """uint8 images and ``{"masks": int64 (N, H, W)}`` with classes 0..C-1 and ~5% ignore pixels (binary: 0/1;
    multilabel: (N, C, H, W) 0/1)."""
    generator = torch.Generator().manual_seed(0)
    images = random_images(cfg, batch_size, generator)
    mode, classes = cfg.model.segmentation.mode, cfg.model.num_classes
    shape = (batch_size, *([classes] if mode == "multilabel" else []), *images.shape[-2:])
    masks = torch.randint(0, classes if mode == "multiclass" else 2, shape, generator=generator)
    ignore = torch.rand(masks.shape, generator=generator) < 0.05
    masks[ignore] = cfg.data.ignore_index
    return images.to(device), {"masks": masks.to(device)}

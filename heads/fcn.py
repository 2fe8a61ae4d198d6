"""mmsegmentation's ``FCNHead``: the auxiliary head its Cityscapes configs put on the stride-16 features.

``num_convs`` 3x3 conv (no bias) + BatchNorm + ReLU units of ``channels`` (256), optionally the input
concatenated back and fused by one more such unit (``concat_input``; off in mmseg's auxiliary heads),
``Dropout2d(dropout)`` (0.1) and a 1x1 classifier with bias, initialised N(0, 0.01) with a zero bias as
mmseg initialises ``conv_seg``. The logits come out at the input's stride; whoever computes the loss
resizes them to the labels (bilinear, ``align_corners=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from .unet import ConvNormReLU

__all__ = ["FCNHead"]


class FCNHead(nn.Module):
    """Features (N, ``in_channels``, h, w) -> logits (N, ``num_classes``, h, w) (see the module docstring)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 kernel_size: int = 3, concat_input: bool = False, dropout: float = 0.1):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"num_convs={num_convs} must be at least 1")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size={kernel_size} must be odd (the output keeps the input's size)")
        self.num_classes = num_classes
        self.convs = nn.Sequential(*[ConvNormReLU(in_channels if i == 0 else channels, channels, kernel_size)
                                     for i in range(num_convs)])
        self.conv_cat = ConvNormReLU(in_channels + channels, channels, kernel_size) if concat_input else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.classifier(self.dropout(out))

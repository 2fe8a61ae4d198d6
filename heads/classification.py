"""The EfficientNet classifier head: 1x1 conv to the head width, pool, dropout, linear."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from backbones.blocks import ConvNormAct


class ClassificationHead(nn.Module):
    """Backbone's last feature map -> logits. Backbone + this head is the paper's classifier."""

    def __init__(self, in_channels: int, head_channels: int, num_classes: int, dropout: float = 0.2,
                 act: str = "silu", norm_eps: float = 1e-5, norm_momentum: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.conv = ConvNormAct(in_channels, head_channels, 1, act=act,
                                norm=partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout, inplace=True)
        self.fc = nn.Linear(head_channels, num_classes)
        self.num_classes = num_classes
        # torchvision/timm initialisation of the final layer.
        init_range = 1.0 / head_channels**0.5
        nn.init.uniform_(self.fc.weight, -init_range, init_range)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, pre-logit features (N, head_channels)."""
        return self.pool(self.conv(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))

    @classmethod
    def for_backbone(cls, backbone, num_classes: int, dropout: float | None = None) -> "ClassificationHead":
        """The head that completes ``backbone`` (a ``backbones.EfficientNet``) into its classifier."""
        arch = backbone.arch
        bn = backbone.stem.bn
        return cls(backbone.num_features, arch.head_channels, num_classes,
                   dropout=arch.dropout if dropout is None else dropout, act=arch.activation,
                   norm_eps=bn.eps, norm_momentum=bn.momentum)

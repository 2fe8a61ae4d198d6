"""The U-Net decoder over the backbone taps, the segmentation head and the auxiliary presence head.

Layout (for the default five taps s2..s32): the s32 map is the decoder's input; block ``i`` upsamples
to the exact size of the next finer tap, concatenates it (the skip) and applies two 3x3 conv + norm +
ReLU; a last block without skip upsamples to the output size. Sizes come from the tensors, so any
H x W works, odd ones included.

Module names follow smp's ``Unet`` block for block (``blocks.{i}.conv1``, ``attention1``, ``conv2``,
``attention2``), with ``conv``/``bn`` inside each conv unit where smp numbers them ``0``/``1``, so an
smp state dict maps key by key (``tasks.segmentation_smp``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import SqueezeExcitation

__all__ = ["ConvNormReLU", "SCSE", "UNetBlock", "UNetDecoder", "SegmentationHead", "AuxClassificationHead"]

NORMS = ("batchnorm", "identity")
ATTENTIONS = (None, "scse")
UPSAMPLING = ("nearest", "bilinear")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


class ConvNormReLU(nn.Sequential):
    """3x3 conv -> BatchNorm (or none) -> ReLU; the conv has a bias only when no norm follows."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, norm: str = "batchnorm"):
        super().__init__()
        _check_choice("norm", norm, NORMS)
        with_norm = norm == "batchnorm"
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=not with_norm)
        if with_norm:
            self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze-excitation (Roy et al., 2018): ``x * cSE(x) + x * sSE(x)``.

    The channel branch is torchvision's ``SqueezeExcitation`` (ReLU, squeeze width ``channels // 16``).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel = SqueezeExcitation(channels, max(1, channels // reduction), activation=nn.ReLU)
        self.spatial = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel(x) + x * torch.sigmoid(self.spatial(x))


class UNetBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip (if any), then two conv units."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str = "batchnorm",
                 attention: str | None = None, upsampling: str = "nearest"):
        super().__init__()
        _check_choice("attention", attention, ATTENTIONS)
        _check_choice("upsampling", upsampling, UPSAMPLING)
        joined = in_channels + skip_channels
        self.upsampling = upsampling
        self.attention1 = SCSE(joined) if attention == "scse" and skip_channels > 0 else None
        self.conv1 = ConvNormReLU(joined, out_channels, norm=norm)
        self.conv2 = ConvNormReLU(out_channels, out_channels, norm=norm)
        self.attention2 = SCSE(out_channels) if attention == "scse" else None
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor, size: Sequence[int], skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode=self.upsampling)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
            if self.attention1 is not None:
                x = self.attention1(x)
        x = self.conv2(self.conv1(x))
        return x if self.attention2 is None else self.attention2(x)


class UNetDecoder(nn.Module):
    """U-Net decoder over ``encoder_channels`` (finest tap first, e.g. s2, s4, s8, s16, s32 channels).

    ``forward(features, output_size)``: ``features`` in the same order as ``encoder_channels``;
    returns ``(N, decoder_channels[-1], *output_size)`` (default output size: twice the finest tap).
    One block per tap: ``len(decoder_channels)`` must equal ``len(encoder_channels)``.
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
                 attention: str | None = None, norm: str = "batchnorm", upsampling: str = "nearest"):
        super().__init__()
        encoder_channels, decoder_channels = list(encoder_channels), list(decoder_channels)
        if not encoder_channels:
            raise ValueError("encoder_channels is empty; expected the channels of each tap, finest first")
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(f"decoder_channels {decoder_channels} has {len(decoder_channels)} entries but there are "
                             f"{len(encoder_channels)} encoder taps {encoder_channels}; expected one per tap")
        deepest_first = encoder_channels[::-1]
        in_channels = [deepest_first[0]] + decoder_channels[:-1]
        skip_channels = deepest_first[1:] + [0]
        self.blocks = nn.ModuleList(
            UNetBlock(i, s, o, norm=norm, attention=attention, upsampling=upsampling)
            for i, s, o in zip(in_channels, skip_channels, decoder_channels))
        self.encoder_channels = tuple(encoder_channels)
        self.out_channels = decoder_channels[-1]
        init_decoder(self)

    @classmethod
    def for_backbone(cls, backbone, **options) -> "UNetDecoder":
        """The decoder over every tap ``backbone`` (a ``backbones.EfficientNet``) returns."""
        return cls([spec.channels for spec in backbone.feature_info], **options)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int] | None = None) -> torch.Tensor:
        if len(features) != len(self.blocks):
            raise ValueError(f"UNetDecoder got {len(features)} feature maps; expected {len(self.blocks)} "
                             f"(channels {list(self.encoder_channels)}, finest first)")
        if output_size is None:
            output_size = [2 * s for s in features[0].shape[-2:]]
        deepest_first = list(features)[::-1]
        x = deepest_first[0]
        for block, skip in zip(self.blocks, deepest_first[1:] + [None]):
            x = block(x, output_size if skip is None else skip.shape[-2:], skip)
        return x


class SegmentationHead(nn.Module):
    """3x3 conv to ``num_classes`` logits, then bilinear upsampling by ``upsampling`` (1: none)."""

    def __init__(self, in_channels: int, num_classes: int, kernel: int = 3, upsampling: int = 1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.conv = nn.Conv2d(in_channels, num_classes, kernel, padding=kernel // 2)
        self.upsampling = upsampling
        self.num_classes = num_classes
        _init_head(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.upsampling > 1:
            x = F.interpolate(x, scale_factor=self.upsampling, mode="bilinear", align_corners=True)
        return x


class AuxClassificationHead(nn.Module):
    """Image-level class presence logits from the deepest tap: pool, dropout, linear (smp's aux_params)."""

    def __init__(self, in_channels: int, num_classes: int, pooling: str = "avg", dropout: float = 0.2):
        super().__init__()
        _check_choice("pooling", pooling, ("avg", "max"))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_classes = num_classes
        _init_head(self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(x).flatten(1)))


def init_decoder(module: nn.Module) -> None:
    """Decoder initialisation: convs kaiming-uniform (fan-in, ReLU) with zero bias, norms 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_head(layer: nn.Module) -> None:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)

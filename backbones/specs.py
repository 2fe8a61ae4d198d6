"""Architecture as typed rows: stage tables, the channel/repeat rounding and the named presets.

B0's seven rows are one literal table that reads like the paper (Tan & Le, 2019, Table 1); every
other V1 size is derived from it by width/depth multipliers (the published rows' are listed below;
what a compound coefficient phi means lives in :mod:`backbones.scaling`). EfficientNetV2 tables are
literal (torchvision's), since V2 sizes are not derived from one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``repeats`` blocks of one kind; only the first block has ``stride``."""

    block: str  # "mbconv" (depthwise, EfficientNet) or "fused" (FusedMBConv, EfficientNetV2)
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int
    se_ratio: float  # squeeze width as a fraction of the block's *input* channels; 0 = no SE


@dataclass(frozen=True)
class ArchSpec:
    """A fully resolved architecture: the exact numbers the modules are built from."""

    stem_channels: int
    stages: tuple[StageSpec, ...]
    head_channels: int
    activation: str  # "silu" or "relu6"
    resolution: int  # native input size (square)
    dropout: float  # classifier dropout
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1


B0_STAGES = (
    StageSpec(block="mbconv", repeats=1, kernel=3, stride=1, expand=1, out_channels=16, se_ratio=0.25),
    StageSpec(block="mbconv", repeats=2, kernel=3, stride=2, expand=6, out_channels=24, se_ratio=0.25),
    StageSpec(block="mbconv", repeats=2, kernel=5, stride=2, expand=6, out_channels=40, se_ratio=0.25),
    StageSpec(block="mbconv", repeats=3, kernel=3, stride=2, expand=6, out_channels=80, se_ratio=0.25),
    StageSpec(block="mbconv", repeats=3, kernel=5, stride=1, expand=6, out_channels=112, se_ratio=0.25),
    StageSpec(block="mbconv", repeats=4, kernel=5, stride=2, expand=6, out_channels=192, se_ratio=0.25),
    StageSpec(block="mbconv", repeats=1, kernel=3, stride=1, expand=6, out_channels=320, se_ratio=0.25),
)
B0_STEM, B0_HEAD = 32, 1280


def _fused(repeats, kernel, stride, expand, out_channels):
    return StageSpec(block="fused", repeats=repeats, kernel=kernel, stride=stride, expand=expand,
                     out_channels=out_channels, se_ratio=0.0)


def _mb(repeats, kernel, stride, expand, out_channels):
    return StageSpec(block="mbconv", repeats=repeats, kernel=kernel, stride=stride, expand=expand,
                     out_channels=out_channels, se_ratio=0.25)


# EfficientNetV2 (Tan & Le, 2021, Table 4 and the released M/L configs; torchvision agrees).
V2_S_STAGES = (
    _fused(2, 3, 1, 1, 24), _fused(4, 3, 2, 4, 48), _fused(4, 3, 2, 4, 64),
    _mb(6, 3, 2, 4, 128), _mb(9, 3, 1, 6, 160), _mb(15, 3, 2, 6, 256),
)
V2_M_STAGES = (
    _fused(3, 3, 1, 1, 24), _fused(5, 3, 2, 4, 48), _fused(5, 3, 2, 4, 80),
    _mb(7, 3, 2, 4, 160), _mb(14, 3, 1, 6, 176), _mb(18, 3, 2, 6, 304), _mb(5, 3, 1, 6, 512),
)
V2_L_STAGES = (
    _fused(4, 3, 1, 1, 32), _fused(7, 3, 2, 4, 64), _fused(7, 3, 2, 4, 96),
    _mb(10, 3, 2, 4, 192), _mb(19, 3, 1, 6, 224), _mb(25, 3, 2, 6, 384), _mb(7, 3, 1, 6, 640),
)

def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% down (paper/TF rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def scale_channels(channels: int, width: float) -> int:
    return make_divisible(channels * width)


def scale_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


@dataclass(frozen=True)
class Preset:
    """A named model: the base table plus the multipliers that size it."""

    name: str
    family: str  # "v1", "lite" or "v2"
    width: float
    depth: float
    resolution: int
    dropout: float
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1

    def arch(self) -> ArchSpec:
        if self.family == "v2":
            stages = _V2_TABLES[self.name]
            stem = 32 if self.name.endswith("-l") else 24
            return ArchSpec(stem_channels=stem, stages=stages, head_channels=1280, activation="silu",
                            resolution=self.resolution, dropout=self.dropout,
                            norm_eps=self.norm_eps, norm_momentum=self.norm_momentum)
        lite = self.family == "lite"
        last = len(B0_STAGES) - 1
        stages = tuple(
            replace(
                row,
                out_channels=scale_channels(row.out_channels, self.width),
                # Lite keeps the first and last stage's depth (TF-lite reference, timm agrees).
                repeats=row.repeats if lite and i in (0, last) else scale_repeats(row.repeats, self.depth),
                se_ratio=0.0 if lite else row.se_ratio,
            )
            for i, row in enumerate(B0_STAGES)
        )
        return ArchSpec(
            stem_channels=B0_STEM if lite else scale_channels(B0_STEM, self.width),
            stages=stages,
            head_channels=B0_HEAD if lite else scale_channels(B0_HEAD, self.width),
            activation="relu6" if lite else "silu",
            resolution=self.resolution,
            dropout=self.dropout,
            norm_eps=self.norm_eps,
            norm_momentum=self.norm_momentum,
        )


_V2_TABLES = {
    "efficientnetv2-s": V2_S_STAGES,
    "efficientnetv2-m": V2_M_STAGES,
    "efficientnetv2-l": V2_L_STAGES,
}

# TF-trained sizes (B5 and up, V2) keep TF's BatchNorm: eps 1e-3, momentum 0.01 (PyTorch convention).
_TF_BN = dict(norm_eps=1e-3, norm_momentum=0.01)

PRESETS: dict[str, Preset] = {}


def _add(preset: Preset) -> None:
    if preset.name in PRESETS:
        raise ValueError(f"duplicate preset name {preset.name!r}")
    PRESETS[preset.name] = preset


# (width, depth, resolution, dropout): the published table.
for _name, _w, _d, _r, _p, _bn in [
    ("efficientnet-b0", 1.0, 1.0, 224, 0.2, {}),
    ("efficientnet-b1", 1.0, 1.1, 240, 0.2, {}),
    ("efficientnet-b2", 1.1, 1.2, 260, 0.3, {}),
    ("efficientnet-b3", 1.2, 1.4, 300, 0.3, {}),
    ("efficientnet-b4", 1.4, 1.8, 380, 0.4, {}),
    ("efficientnet-b5", 1.6, 2.2, 456, 0.4, _TF_BN),
    ("efficientnet-b6", 1.8, 2.6, 528, 0.5, _TF_BN),
    ("efficientnet-b7", 2.0, 3.1, 600, 0.5, _TF_BN),
    ("efficientnet-b8", 2.2, 3.6, 672, 0.5, _TF_BN),
    ("efficientnet-l2", 4.3, 5.3, 800, 0.5, _TF_BN),
]:
    _add(Preset(name=_name, family="v1", width=_w, depth=_d, resolution=_r, dropout=_p, **_bn))

for _name, _w, _d, _r, _p in [
    ("efficientnet-lite0", 1.0, 1.0, 224, 0.2),
    ("efficientnet-lite1", 1.0, 1.1, 240, 0.2),
    ("efficientnet-lite2", 1.1, 1.2, 260, 0.3),
    ("efficientnet-lite3", 1.2, 1.4, 280, 0.3),
    ("efficientnet-lite4", 1.4, 1.8, 300, 0.3),
]:
    _add(Preset(name=_name, family="lite", width=_w, depth=_d, resolution=_r, dropout=_p))

for _name, _r, _p in [("efficientnetv2-s", 384, 0.2), ("efficientnetv2-m", 480, 0.3), ("efficientnetv2-l", 480, 0.4)]:
    _add(Preset(name=_name, family="v2", width=1.0, depth=1.0, resolution=_r, dropout=_p, **_TF_BN))


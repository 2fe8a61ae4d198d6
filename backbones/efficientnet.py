"""The EfficientNet encoder: stem + stages, returning multi-scale feature taps."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import BLOCKS, ConvNormAct
from .specs import ArchSpec


@dataclass(frozen=True)
class FeatureSpec:
    """One feature tap: its name (nominal level, e.g. ``s8``), channels and actual stride.

    With ``output_stride`` < 32 the deep taps keep their names but report the real stride.
    """

    name: str
    channels: int
    stride: int


NOMINAL_STRIDES = (2, 4, 8, 16, 32)


class EfficientNet(nn.Module):
    """An EfficientNet/EfficientNetV2 encoder built from an :class:`ArchSpec`.

    ``forward(x)`` returns ``{name: tensor}`` for the taps in ``out_indices`` (indices into
    s2, s4, s8, s16, s32); ``feature_info`` describes those taps and is read off the built modules.
    """

    def __init__(self, arch: ArchSpec, in_channels: int = 3, out_indices: Sequence[int] = (0, 1, 2, 3, 4),
                 output_stride: int = 32, drop_path: float = 0.0, norm_eps: float | None = None,
                 norm_momentum: float | None = None, padding: str = "symmetric", name: str = "efficientnet"):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(len(NOMINAL_STRIDES)) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of 0..4 (s2..s32), got {out_indices}")
        self.name = name
        self.arch = arch
        self.in_channels = in_channels
        self.output_stride = output_stride
        self.padding = padding
        self.grad_checkpointing = False
        eps = arch.norm_eps if norm_eps is None else norm_eps
        momentum = arch.norm_momentum if norm_momentum is None else norm_momentum
        norm = partial(nn.BatchNorm2d, eps=eps, momentum=momentum)

        self.stem = ConvNormAct(in_channels, arch.stem_channels, 3, stride=2, act=arch.activation, norm=norm,
                                padding=padding)
        total_blocks = sum(stage.repeats for stage in arch.stages)
        stride, dilation, block_index = 2, 1, 0
        channels = arch.stem_channels
        stages, stage_strides = [], []
        for spec in arch.stages:
            blocks = []
            for i in range(spec.repeats):
                block_stride = spec.stride if i == 0 else 1
                block_dilation = dilation
                if block_stride > 1 and stride * block_stride > output_stride:
                    # Past the output stride: keep the resolution and dilate from the next block on.
                    dilation *= block_stride
                    block_stride = 1
                elif block_stride > 1:
                    stride *= block_stride
                nominal_stride = spec.stride if i == 0 else 1
                blocks.append(BLOCKS[spec.block](
                    channels, spec.out_channels, spec.kernel, block_stride, spec.expand, spec.se_ratio,
                    act=arch.activation, norm=norm, dilation=block_dilation,
                    drop_path=drop_path * block_index / total_blocks,
                    residual=nominal_stride == 1 and channels == spec.out_channels, padding=padding,
                ))
                channels = spec.out_channels
                block_index += 1
            stages.append(nn.Sequential(*blocks))
            stage_strides.append(stride)
        self.stages = nn.ModuleList(stages)

        # A tap is the end of the last stage at each stride (the stem's output if no stage ends at s2).
        nominal = [2]
        for spec in arch.stages:
            nominal.append(nominal[-1] * spec.stride)
        taps = []  # (stage position, -1 = stem)
        for level in NOMINAL_STRIDES:
            positions = [p for p, s in enumerate(nominal) if s == level]
            if not positions:
                raise ValueError(f"{name}: no stage ends at stride {level}")
            taps.append(positions[-1] - 1)
        all_specs = []
        for level, position in zip(NOMINAL_STRIDES, taps):
            module = self.stem if position < 0 else self.stages[position][-1]
            real_stride = 2 if position < 0 else stage_strides[position]
            all_specs.append(FeatureSpec(f"s{level}", module.out_channels, real_stride))
        self.out_indices = out_indices
        self.all_feature_info = all_specs  # every tap, whatever out_indices selects
        self.feature_info = [all_specs[i] for i in out_indices]
        self._tap_positions = {taps[i]: all_specs[i].name for i in out_indices}
        self._last_position = max(self._tap_positions)
        self.num_features = self.stages[-1][-1].out_channels
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference initialisation (TF, torchvision): conv kaiming-normal fan-out; BN 1/0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        x = self.stem(x)
        if -1 in self._tap_positions:
            features[self._tap_positions[-1]] = x
        for position, stage in enumerate(self.stages):
            if position > self._last_position:
                break
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if position in self._tap_positions:
                features[self._tap_positions[position]] = x
        return features

"""The EfficientNet encoder: stem + stages, returning multi-scale feature taps."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Mapping, Sequence

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


def _tracing() -> bool:
    """Under TorchScript/ONNX tracing or torch.compile/export the memory format is left to the compiler."""
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
S2_TAPS = ("stage", "stem")  # s2 = end of stage 1 (timm) or the stem output (smp's EfficientNet encoders)


class EfficientNet(nn.Module):
    """An EfficientNet/EfficientNetV2 encoder built from an :class:`ArchSpec`.

    ``forward(x)`` returns ``{name: tensor}`` for the taps in ``out_indices`` (indices into
    s2, s4, s8, s16, s32); ``feature_info`` describes those taps and is read off the built modules.

    ``cpu_channels_last`` (None: the class default ``EfficientNet.CPU_CHANNELS_LAST``, on): on the CPU
    the input runs in channels-last memory format whatever it arrives in (oneDNN's NHWC kernels, ~1.4x
    the speed; the same function, rounded differently); other devices keep the input's format
    (``train.channels_last`` decides there). Set it False (or the class default) to run the NCHW kernels
    an NCHW peer runs, for bit-for-bit comparisons.

    Tap positions: the end of the last block at each stride (timm's convention). ``s2_tap="stem"``
    takes the stem output as s2 instead (smp's EfficientNet encoders). ``tap_at`` moves named taps to
    explicit ``(stage, block)`` positions (0-based, within the tap's stride), to reproduce encoders
    that tap elsewhere, e.g. ``{"s16": (4, 0)}``: smp's ``efficientnet-b0`` takes s16 after the
    first block of stage 5.
    """

    CPU_CHANNELS_LAST = True  # see cpu_channels_last

    def __init__(self, arch: ArchSpec, in_channels: int = 3, out_indices: Sequence[int] = (0, 1, 2, 3, 4),
                 output_stride: int = 32, drop_path: float = 0.0, norm_eps: float | None = None,
                 norm_momentum: float | None = None, padding: str = "symmetric", name: str = "efficientnet",
                 s2_tap: str = "stage", tap_at: Mapping[str, tuple[int, int]] | None = None,
                 cpu_channels_last: bool | None = None):
        super().__init__()
        if s2_tap not in S2_TAPS:
            raise ValueError(f"s2_tap must be one of {', '.join(S2_TAPS)}, got {s2_tap!r}")
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
        self.cpu_channels_last = cpu_channels_last
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

        self.s2_tap = s2_tap
        nominal = [2]  # nominal stride after the stem and after each stage
        for spec in arch.stages:
            nominal.append(nominal[-1] * spec.stride)
        taps = self._tap_places(nominal, s2_tap, tap_at or {})  # name -> (stage or -1 for the stem, block)
        all_specs = []
        for level_name, (position, block) in taps.items():
            module = self.stem if position < 0 else self.stages[position][block]
            real_stride = 2 if position < 0 else stage_strides[position]
            all_specs.append(FeatureSpec(level_name, module.out_channels, real_stride))
        self.out_indices = out_indices
        self.all_feature_info = all_specs  # every tap, whatever out_indices selects
        self.feature_info = [all_specs[i] for i in out_indices]
        # stage position -> {block index: tap name}; -1 is the stem
        self._taps_by_stage: dict[int, dict[int, str]] = {}
        for spec in self.feature_info:
            position, block = taps[spec.name]
            self._taps_by_stage.setdefault(position, {})[block] = spec.name
        self._last_position = max(self._taps_by_stage)
        self.num_features = self.stages[-1][-1].out_channels
        self._init_weights()

    def _tap_places(self, nominal: list[int], s2_tap: str, tap_at: Mapping[str, tuple[int, int]]):
        """Each tap's (stage position, block index); the stage's last block unless moved by ``tap_at``."""
        taps = {}
        for level in NOMINAL_STRIDES:
            positions = [p for p, s in enumerate(nominal) if s == level]
            if not positions:
                raise ValueError(f"{self.name}: no stage ends at stride {level}")
            position = positions[0] if level == 2 and s2_tap == "stem" else positions[-1]
            taps[f"s{level}"] = (position - 1, -1 if position == 0 else len(self.stages[position - 1]) - 1)
        for tap, place in tap_at.items():
            if tap not in taps:
                raise ValueError(f"tap_at: unknown tap {tap!r}; expected one of {', '.join(taps)}")
            stage, block = place
            if not (0 <= stage < len(self.stages) and 0 <= block < len(self.stages[stage])):
                raise ValueError(f"tap_at[{tap!r}]=({stage}, {block}): no such block in {self.name} "
                                 f"({len(self.stages)} stages)")
            if nominal[stage + 1] != int(tap[1:]):
                raise ValueError(f"tap_at[{tap!r}]=({stage}, {block}): stage {stage} runs at stride "
                                 f"{nominal[stage + 1]}, not {tap[1:]}")
            taps[tap] = (stage, block)
        return taps

    def _init_weights(self) -> None:
        # torchvision's initialisation: conv kaiming-normal fan-out (fan-out counts every output channel, so
        # a depthwise kernel gets std sqrt(2 / (k^2 C)), smaller than TF's sqrt(2 / k^2)); BN 1/0. From
        # scratch on the CPU demo it trains to top-1 1.0 where TF's depthwise init reached 0.91.
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
        channels_last = self.CPU_CHANNELS_LAST if self.cpu_channels_last is None else self.cpu_channels_last
        if channels_last and x.device.type == "cpu" and x.dim() == 4 and not _tracing():
            # oneDNN's NHWC depthwise and pointwise kernels: B0 ~1.4x faster on the CPU than NCHW, train and
            # inference (tools/bench_backbones.py); the values are the same, the taps come out channels-last.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        if -1 in self._taps_by_stage:
            features[self._taps_by_stage[-1][-1]] = x
        for position, stage in enumerate(self.stages):
            if position > self._last_position:
                break
            taps = self._taps_by_stage.get(position, {})
            if any(block != len(stage) - 1 for block in taps):  # a tap inside the stage: block by block
                for block_index, block in enumerate(stage):
                    x = block(x)
                    if block_index in taps:
                        features[taps[block_index]] = x
                continue
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            if taps:
                features[next(iter(taps.values()))] = x
        return features

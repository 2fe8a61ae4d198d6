"""BiFPN: the weighted bidirectional feature pyramid of EfficientDet (Tan, Pang & Le, 2020).

Levels P3..P7 (P3..P8 for D7x): P3-P5 are the backbone's s8/s16/s32 taps; P6 is a 1x1 conv + BN of
s32 (when its channels differ from the width) followed by a 3x3 stride-2 max-pool, and every further
level is a max-pool of the one below. One cell fuses top-down (P6' <- P6, P7 ... P3'' <- P3, P4')
then bottom-up (P4'' <- P4, P4', P3'' ... P7'' <- P7, P6''); the node order is effdet's/automl's,
so checkpoints map node by node. In the first cell every raw input whose channels differ from the
width gets its own 1x1 conv + BN per consuming node. Each fusion is followed by SiLU -> separable
3x3 conv -> BN.

Sizes are read off the feature maps at run time: an upsampled input is resized (nearest) to the
exact size of the node's level, a downsampled one is max-pooled (3x3, stride 2) to ceil(size / 2),
the size strided convs produce. So any input size works (sizes that are not multiples of 2^max_level,
such as the Lite models' 320/384/448, too), not only the preset's square.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from backbones.blocks import ACTIVATIONS

FUSIONS = ("fast", "softmax", "sum")
FUSION_EPS = 1e-4  # fast normalised fusion: w_i / (sum(w) + eps)


@dataclass(frozen=True)
class FusionNode:
    """One BiFPN node: the level it outputs and the maps it fuses, as offsets into the list that
    holds the cell's inputs (0 .. L-1, lowest level first) followed by the node outputs (L + i)."""

    level: int
    inputs: tuple[int, ...]


def bifpn_nodes(min_level: int, max_level: int) -> list[FusionNode]:
    """The nodes of one BiFPN cell, in effdet/automl order: top-down from ``max_level - 1`` to
    ``min_level``, then bottom-up from ``min_level + 1`` to ``max_level``."""
    count = max_level - min_level + 1
    produced = {level: [level - min_level] for level in range(min_level, max_level + 1)}
    nodes: list[FusionNode] = []

    def add(level: int, inputs: list[int]) -> None:
        nodes.append(FusionNode(level, tuple(inputs)))
        produced[level].append(count + len(nodes) - 1)

    for level in range(max_level - 1, min_level - 1, -1):
        add(level, [produced[level][-1], produced[level + 1][-1]])
    for level in range(min_level + 1, max_level + 1):
        add(level, produced[level] + [produced[level - 1][-1]])
    return nodes


def _pad_same(size: int, kernel: int = 3, stride: int = 2) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for one axis: output ceil(size / stride), extra at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def max_pool_down(x: torch.Tensor, padding: str) -> torch.Tensor:
    """3x3 stride-2 max-pool to ceil(size / 2): TF "SAME" padding (-inf, more at the bottom/right) or
    PyTorch's symmetric padding of 1 (what effdet's non-TF models use); the two differ on even sizes."""
    if padding == "same":
        top, bottom = _pad_same(x.shape[-2])
        left, right = _pad_same(x.shape[-1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(x, 3, 2)
    return F.max_pool2d(x, 3, 2, padding=1)


class SeparableConv2d(nn.Sequential):
    """Depthwise kxk conv -> pointwise 1x1 conv (the pointwise one may carry a bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, bias: bool = False):
        super().__init__()
        self.dw = nn.Conv2d(in_channels, in_channels, kernel, padding=kernel // 2, groups=in_channels, bias=False)
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=bias)


class ConvBN(nn.Sequential):
    """1x1 conv (no bias) -> BatchNorm: the channel adapters of the pyramid."""

    def __init__(self, in_channels: int, out_channels: int, norm):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = norm(out_channels)


class ExtraLevel(nn.Module):
    """A level above the backbone's: optional 1x1 conv + BN to the width, then the stride-2 max-pool."""

    def __init__(self, in_channels: int, width: int, norm, padding: str):
        super().__init__()
        self.conv = ConvBN(in_channels, width, norm) if in_channels != width else None
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_down(self.conv(x) if self.conv is not None else x, self.padding)


class FuseNode(nn.Module):
    """Resample each input to the node's level, fuse (fast / softmax / sum), SiLU, separable conv, BN."""

    def __init__(self, node: FusionNode, in_channels: Sequence[int], width: int, fusion: str, norm,
                 act: str, padding: str):
        super().__init__()
        self.inputs = node.inputs
        # Channel adapters for inputs of another width (raw backbone maps in the first cell), by position.
        self.resample = nn.ModuleDict({str(j): ConvBN(in_channels[o], width, norm)
                                       for j, o in enumerate(node.inputs) if in_channels[o] != width})
        self.fusion = fusion
        self.weights = nn.Parameter(torch.ones(len(node.inputs))) if fusion != "sum" else None
        self.act = ACTIVATIONS[act]()
        self.conv = SeparableConv2d(width, width)
        self.bn = norm(width)
        self.padding = padding

    def _resampled(self, maps: list[torch.Tensor], size: torch.Size) -> list[torch.Tensor]:
        out = []
        for j, offset in enumerate(self.inputs):
            x = maps[offset]
            adapter = self.resample[str(j)] if str(j) in self.resample else None
            if adapter is not None:
                x = adapter(x)
            if x.shape[-2] > size[0]:
                x = max_pool_down(x, self.padding)
            elif x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="nearest")
            out.append(x)
        return out

    def forward(self, maps: list[torch.Tensor], size: torch.Size) -> torch.Tensor:
        xs = self._resampled(maps, size)
        if self.weights is None:
            fused = xs[0] + xs[1]
            for x in xs[2:]:
                fused = fused + x
        else:
            weights = self.weights.to(xs[0].dtype)  # fused in the activations' dtype (bf16 under autocast)
            if self.fusion == "fast":
                weights = F.relu(weights)
                weights = weights / (weights.sum() + FUSION_EPS)
            else:
                weights = torch.softmax(weights, dim=0)
            fused = xs[0] * weights[0]
            for i in range(1, len(xs)):
                fused = torch.addcmul(fused, xs[i], weights[i])
        return self.bn(self.conv(self.act(fused)))


class BiFPNCell(nn.Module):
    """One BiFPN repeat: maps for levels min..max in, the fused maps for the same levels out.

    ``finest_only``: build only the top-down nodes and return ``[P_min]`` (its last node), which is all
    a consumer of the finest level needs from the last cell (segmentation); the bottom-up nodes would
    be parameters without gradients.
    """

    def __init__(self, in_channels: Sequence[int], width: int, min_level: int, max_level: int, fusion: str,
                 norm, act: str, padding: str, finest_only: bool = False):
        super().__init__()
        nodes = bifpn_nodes(min_level, max_level)
        if finest_only:
            nodes = nodes[:max_level - min_level]  # top-down: P(max-1)' ... P(min)'
        channels = list(in_channels) + [width] * len(nodes)
        self.nodes = nn.ModuleList(FuseNode(node, channels, width, fusion, norm, act, padding) for node in nodes)
        self._levels = [node.level - min_level for node in nodes]  # index of each node's level
        count = max_level - min_level + 1
        last = {}
        for i, node in enumerate(nodes):
            last[node.level] = count + i
        levels = [min_level] if finest_only else range(min_level, max_level + 1)
        self._outputs = [last[level] for level in levels]

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = list(maps)
        sizes = [x.shape[-2:] for x in maps]
        for node, level in zip(self.nodes, self._levels):
            maps.append(node(maps, sizes[level]))
        return [maps[i] for i in self._outputs]


class BiFPN(nn.Module):
    """Backbone taps (s8, s16, s32) -> ``len(levels)`` maps of ``width`` channels, P3 first.

    ``in_channels``: channels of the backbone maps for the lowest levels (three for EfficientNet:
    s8, s16, s32); ``levels``: consecutive pyramid levels, ``range(3, 8)`` (D0-D7) or ``range(3, 9)``
    (D7x); ``fusion``: ``"fast"`` (ReLU weights normalised by their sum + 1e-4), ``"softmax"`` or
    ``"sum"`` (unweighted, D6+); ``padding``: the max-pools' ``"symmetric"`` or TF ``"same"``
    padding (TF-ported weights); ``act``: ``"silu"`` (``"relu6"`` for the Lite models).
    BatchNorm ``norm_eps``/``norm_momentum`` default to TF's 1e-3 / 0.01 (PyTorch convention).
    The levels may start below 3 (P2 from s4, P1 from s2: ``in_channels`` then lists those taps first).
    ``finest_only``: the last cell keeps only its top-down nodes and ``forward`` returns ``[P_min]``
    (the same tensor the full pyramid gives for that level).
    """

    def __init__(self, in_channels: Sequence[int], width: int, repeats: int, levels: Sequence[int] = range(3, 8),
                 fusion: str = "fast", padding: str = "symmetric", act: str = "silu", norm_eps: float = 1e-3,
                 norm_momentum: float = 0.01, finest_only: bool = False):
        super().__init__()
        levels = tuple(levels)
        in_channels = tuple(int(c) for c in in_channels)
        if len(levels) < 2 or levels != tuple(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"BiFPN levels must be consecutive and at least two, got {levels}")
        if not 1 <= len(in_channels) <= len(levels):
            raise ValueError(f"BiFPN: {len(in_channels)} input maps for levels {levels}; expected 1..{len(levels)}")
        if fusion not in FUSIONS:
            raise ValueError(f"BiFPN fusion={fusion!r} is not one of {', '.join(FUSIONS)}")
        if padding not in ("symmetric", "same"):
            raise ValueError(f"BiFPN padding={padding!r} must be 'symmetric' or 'same'")
        if act not in ACTIVATIONS:
            raise ValueError(f"BiFPN act={act!r} is not one of {', '.join(ACTIVATIONS)}")
        if width < 1 or repeats < 1:
            raise ValueError(f"BiFPN width and repeats must be >= 1, got width={width}, repeats={repeats}")
        self.levels, self.width, self.repeats, self.fusion = levels, width, repeats, fusion
        self.in_channels = in_channels
        norm = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)
        extra_in = in_channels[-1]
        self.extra = nn.ModuleList()
        for _ in range(len(levels) - len(in_channels)):
            self.extra.append(ExtraLevel(extra_in, width, norm, padding))
            extra_in = width
        first = list(in_channels) + [width] * len(self.extra)
        self.finest_only = finest_only
        self.cells = nn.ModuleList(
            BiFPNCell(first if r == 0 else [width] * len(levels), width, levels[0], levels[-1], fusion, norm, act,
                      padding, finest_only=finest_only and r == repeats - 1)
            for r in range(repeats))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        maps = list(features)
        if len(maps) != len(self.in_channels):
            raise ValueError(f"BiFPN expects {len(self.in_channels)} feature maps, got {len(maps)}")
        for extra in self.extra:
            maps.append(extra(maps[-1]))
        for cell in self.cells:
            maps = cell(maps)
        return maps


def init_bifpn(module: nn.Module) -> None:
    """TF/Keras defaults for a pyramid (EfficientDet's BiFPN, the BiFPN segmentation head): glorot-uniform
    conv kernels (fan-out per group), zero biases, BatchNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            area = m.weight[0][0].numel()
            fan_in, fan_out = m.weight.shape[1] * area, m.weight.shape[0] * area // m.groups
            limit = math.sqrt(6.0 / max(2.0, fan_in + fan_out))
            with torch.no_grad():
                m.weight.uniform_(-limit, limit)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


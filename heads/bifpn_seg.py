"""BiFPN segmentation head: EfficientDet's BiFPN over levels P2..P7 and a per-pixel classifier.

The EfficientDet paper (Tan, Pang & Le 2020, section 6) segments with a BiFPN over P2-P7 and a
classifier on P2; ESeg (Meng et al. 2022) widens the level range. Here:

- Level ``l`` has stride ``2**l``. Levels 1..5 come from the backbone taps s2, s4, s8, s16, s32
  (``P1`` needs the s2 tap); every level above 5 is made from s32 as EfficientDet does (1x1 conv + BN
  to the width, then 3x3 stride-2 max-pools). The default ``levels=range(2, 8)`` takes s4..s32 and
  adds P6, P7; ``range(2, 9)`` adds P8, ``range(1, 8)`` starts at s2. :func:`levels_for_crop` picks
  the top level from the training crop (P7 from 512 up, P5 at 128).
- The pyramid is :class:`heads.bifpn.BiFPN` itself (the detector's node graph, fusion, resampling
  and parameter layout; it is level-generic, so P1/P2 need no change to it), built with
  ``finest_only``: only the finest level is read, so the last cell keeps its top-down nodes alone
  (the bottom-up ones would be parameters without gradients, which DDP rejects).
- Refinement (on by default from P2 up; ``refine_channels`` / ``refine``): the finest fused level
  (reduced by a 1x1 conv + BN when ``refine_width`` is narrower than the width) is upsampled
  (bilinear) to the next finer tap (s2 for P2) and added to a 1x1 conv + BN of that tap, then SiLU ->
  separable 3x3 conv -> BN -> SiLU; the classifier runs at that finer stride. On the
  128x128 CPU demo the paper's head (classifier on P2, stride 4) trailed the U-Net by ~0.2 mIoU
  (median of five runs 0.74 vs 0.92; vegetation and cars suffered); refined at the full width it
  matched it (median of ten 0.933 vs 0.937), at half the width it did not (0.860).
- :class:`BiFPNSegHead`: ``depth`` x (separable 3x3 conv -> BN -> SiLU), a 1x1 conv to the class
  logits, then bilinear upsampling (``align_corners=False``) to the output size.

Input sizes. Nothing is padded: the backbone's stride-2 convs give ``ceil(size / 2)`` per level, the
BiFPN resizes every input of a node to the exact size of the node's level (nearest up, max-pool
down), and the logits are resized to the requested output size. So any H x W works -- multiples of
``2**max_level`` align the levels exactly; other sizes (odd ones too) give the ceil-sized levels a
strided network produces, as the detector does.

BatchNorm: eps 1e-3 / momentum 0.01 (TF's, as the detector) unless given; ``build_segmenter`` passes
the backbone's (B0-B4: 1e-5 / 0.1), since with momentum 0.01 a short run evaluates on running
statistics that have hardly moved from their initial values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from backbones.blocks import ACTIVATIONS

from .bifpn import BiFPN, ConvBN, SeparableConv2d, init_bifpn

__all__ = ["DEFAULT_LEVELS", "TAP_LEVELS", "BiFPNSegDecoder", "BiFPNSegHead", "backbone_taps", "check_levels",
           "levels_for_crop", "tap_names"]

DEFAULT_LEVELS = tuple(range(2, 8))  # P2..P7: the EfficientDet paper's segmentation levels
TAP_LEVELS = {"s2": 1, "s4": 2, "s8": 3, "s16": 4, "s32": 5}  # backbone tap -> pyramid level (stride 2**level)
MAX_TAP_LEVEL = 5


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """``levels`` as a tuple, or a one-line error: consecutive, at least two, starting at 1..5."""
    levels = tuple(int(level) for level in levels)
    if len(levels) < 2 or levels != tuple(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"BiFPN segmentation levels must be consecutive and at least two, got {list(levels)}; "
                         f"expected e.g. range(2, 8) (P2..P7)")
    if not 1 <= levels[0] <= MAX_TAP_LEVEL:
        raise ValueError(f"BiFPN segmentation levels start at P{levels[0]}; expected P1..P5 (the finest level "
                         f"must be a backbone tap s2..s32)")
    return levels


def levels_for_crop(size: Sequence[int], min_level: int = 2, max_level: int = 7, coarsest: int = 4) -> tuple[int, ...]:
    """``min_level`` .. the highest level (at most ``max_level``) whose map is still at least ``coarsest``
    pixels on the short side of a ``size`` (h, w) training crop: EfficientDet's P7 at 512 is 4x4.

    512 and up -> P2..P7; 256 -> P2..P6; 128 -> P2..P5. Levels past that hold 2x2 / 1x1 maps whose
    BatchNorm statistics come from a handful of values per batch and differ between training and
    evaluation (on the 128x128 CPU demo, P2..P7 trails P2..P5 by ~0.1 mIoU over five runs).
    """
    short = min(int(v) for v in size)
    if short < 1:
        raise ValueError(f"levels_for_crop: size={list(size)} must be positive (h, w)")
    top = math.floor(math.log2(max(short / coarsest, 1)))
    return tuple(range(min_level, max(min_level + 1, min(max_level, top)) + 1))


def tap_names(levels: Sequence[int]) -> list[str]:
    """The backbone taps that feed ``levels`` (finest first): e.g. P2..P7 -> s4, s8, s16, s32."""
    levels = check_levels(levels)
    return [f"s{2 ** level}" for level in range(levels[0], min(levels[-1], MAX_TAP_LEVEL) + 1)]


def backbone_taps(levels: Sequence[int], refine: bool | None = None) -> list[str]:
    """Every tap the decoder reads: :func:`tap_names` of ``levels``, with refinement (None: on from P2
    up) the next finer tap first -- P2..P7 refined: s2, s4, s8, s16, s32."""
    levels = check_levels(levels)
    refine = levels[0] > 1 if refine is None else refine
    return ([f"s{2 ** (levels[0] - 1)}"] if refine and levels[0] > 1 else []) + tap_names(levels)


class BiFPNSegDecoder(nn.Module):
    """Backbone taps -> BiFPN over ``levels`` -> the finest fused level (``width`` channels).

    ``in_channels``: channels of the taps for the levels ``levels[0] .. min(levels[-1], 5)``, finest
    first (P2..P7: s4, s8, s16, s32). ``width``/``repeats``: BiFPN channels and cells (the compound
    coefficient's rule is the caller's: W = 64 * 1.35^phi, D = 3 + phi). ``fusion``: ``fast``,
    ``softmax`` or ``sum``; ``padding``/``act``/``norm_eps``/``norm_momentum`` as :class:`BiFPN`.
    ``refine_channels``: ``None`` (off), or the channels of the tap one level finer than ``levels[0]``
    (s2 for P2): the output is then at that finer stride with ``refine_width`` channels (None: the
    width; a narrower one cuts the stride-2 cost, see the module docstring).

    ``forward(features, output_size=None)``: ``features`` as ``in_channels`` (plus, with refinement,
    the finer tap *first*); returns ``(N, out_channels, h, w)`` at stride ``out_stride``.
    ``output_size`` is accepted for the U-Net decoder's call signature and not used.
    """

    def __init__(self, in_channels: Sequence[int], width: int, repeats: int, levels: Sequence[int] = DEFAULT_LEVELS,
                 fusion: str = "fast", padding: str = "symmetric", act: str = "silu", norm_eps: float = 1e-3,
                 norm_momentum: float = 0.01, refine_channels: int | None = None, refine_width: int | None = None):
        super().__init__()
        levels = check_levels(levels)
        in_channels = [int(c) for c in in_channels]
        expected = min(levels[-1], MAX_TAP_LEVEL) - levels[0] + 1
        if len(in_channels) != expected:
            raise ValueError(f"BiFPNSegDecoder levels P{levels[0]}..P{levels[-1]} need {expected} tap channels "
                             f"({', '.join(tap_names(levels))}), got {in_channels}")
        if refine_width is not None and refine_channels is None:
            raise ValueError(f"BiFPNSegDecoder refine_width={refine_width} without refinement; expected "
                             f"refine_channels (the finer tap's channels) too, or no refine_width")
        if refine_channels is not None and levels[0] == 1:
            raise ValueError("BiFPN segmentation refinement needs a tap finer than the first level; levels start "
                             "at P1 (s2), which has none -- drop refine or start at P2")
        # finest_only: the last cell keeps its top-down nodes only (its bottom-up ones feed nothing here)
        self.fpn = BiFPN(in_channels, width, repeats, levels, fusion=fusion, padding=padding, act=act,
                         norm_eps=norm_eps, norm_momentum=norm_momentum, finest_only=True)
        self.levels, self.width, self.repeats, self.fusion = levels, width, repeats, fusion
        self.in_channels = tuple(in_channels)
        self.refine = None
        self.out_channels = width
        if refine_channels is not None:
            norm = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)
            self.out_channels = width if refine_width is None else int(refine_width)
            self.refine = _Refine(int(refine_channels), width, self.out_channels, norm, act)
        self.out_level = levels[0] - (1 if self.refine is not None else 0)
        self.out_stride = 2 ** self.out_level
        init_bifpn(self)

    @classmethod
    def for_backbone(cls, backbone, width: int, repeats: int, levels: Sequence[int] = DEFAULT_LEVELS,
                     refine: bool | None = None, **options) -> BiFPNSegDecoder:
        """The decoder over ``backbone``'s taps (a ``backbones.EfficientNet`` whose ``feature_info`` holds
        exactly :func:`backbone_taps` of ``levels`` and ``refine``), checked by name and stride (a dilated
        backbone, ``output_stride`` < 32, does not fit a pyramid). ``refine`` None: on when there is a
        finer tap (levels from P2 up), off from P1."""
        levels = check_levels(levels)
        refine = levels[0] > 1 if refine is None else refine
        names = tap_names(levels)
        if refine:
            if levels[0] == 1:
                raise ValueError("BiFPN segmentation refinement needs a tap finer than the first level; levels start "
                                 "at P1 (s2), which has none -- drop refine or start at P2")
            names = [f"s{2 ** (levels[0] - 1)}"] + names
        specs = list(backbone.feature_info)
        got = [(spec.name, spec.stride) for spec in specs]
        wanted = [(name, int(name[1:])) for name in names]
        if got != wanted:
            extra = " + refinement" if refine else ""
            raise ValueError(f"BiFPN segmentation levels P{levels[0]}..P{levels[-1]}{extra} need the backbone taps "
                             f"{wanted} (name, stride); the backbone gives {got} (is output_stride < 32? the pyramid "
                             f"needs the strided backbone)")
        channels = [spec.channels for spec in specs]
        if refine:
            return cls(channels[1:], width, repeats, levels, refine_channels=channels[0], **options)
        return cls(channels, width, repeats, levels, **options)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int] | None = None) -> torch.Tensor:
        features = list(features)
        finer = features.pop(0) if self.refine is not None else None
        if len(features) != len(self.in_channels):
            raise ValueError(f"BiFPNSegDecoder got {len(features) + (finer is not None)} feature maps; expected "
                             f"{len(self.in_channels) + (self.refine is not None)} (taps finest first)")
        finest = self.fpn(features)[0]
        return finest if self.refine is None else self.refine(finest, finer)


class _Refine(nn.Module):
    """Finest fused level -> 1x1 conv + BN to ``out_width`` (when it differs from ``width``), upsampled
    (bilinear) to the finer tap's size, + 1x1 conv + BN of that tap; then SiLU -> separable 3x3 conv ->
    BN -> SiLU."""

    def __init__(self, skip_channels: int, width: int, out_width: int, norm, act: str):
        super().__init__()
        self.reduce = ConvBN(width, out_width, norm) if out_width != width else None
        self.skip = ConvBN(skip_channels, out_width, norm)
        self.act = ACTIVATIONS[act]()
        self.conv = SeparableConv2d(out_width, out_width)
        self.bn = norm(out_width)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)  # at the coarser stride: 4x cheaper than after upsampling, the same numbers
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + self.skip(skip)
        return self.act(self.bn(self.conv(self.act(x))))


class BiFPNSegHead(nn.Module):
    """Per-pixel classifier: ``depth`` x (separable 3x3 conv -> BN -> activation), 1x1 conv (bias) to
    ``num_classes`` logits at the finest level's stride (``tasks.segmentation.Segmenter`` resizes them to
    the input size)."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 2, act: str = "silu", norm_eps: float = 1e-3,
                 norm_momentum: float = 0.01):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if depth < 0:
            raise ValueError(f"BiFPNSegHead depth must be >= 0, got {depth}")
        if act not in ACTIVATIONS:
            raise ValueError(f"BiFPNSegHead act={act!r} is not one of {', '.join(ACTIVATIONS)}")
        norm = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)
        layers = []
        for _ in range(depth):
            layers += [SeparableConv2d(in_channels, in_channels), norm(in_channels), ACTIVATIONS[act]()]
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)
        self.num_classes, self.depth = num_classes, depth
        init_bifpn(self.convs)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))

"""EfficientDet: backbone + BiFPN + class/box nets, and the D0..D7x and Lite0..Lite4 tables as data.

The class and box nets share their separable convs across pyramid levels and keep one BatchNorm per
level and repeat (Tan, Pang & Le, 2020; effdet's ``HeadNet``). Their outputs per level are
``(N, anchors * classes, H, W)`` and ``(N, anchors * 4, H, W)``, channel = anchor * outputs + k, with
box codes in (ty, tx, th, tw) order, as effdet and automl lay them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from backbones.blocks import ACTIVATIONS
from backbones.scaling import (ALPHA_DEPTH, BETA_WIDTH, BIFPN_WIDTH_GROWTH, LAST_NAMED, check_rule, geometric, linear,
                               named_phi, round_half_up)
from backbones.specs import make_divisible

from .bifpn import BiFPN, SeparableConv2d, init_bifpn

PRIOR_PROBABILITY = 0.01  # the class bias starts every anchor at p = 0.01 (focal-loss paper)


class HeadNet(nn.Module):
    """``depth`` x (separable 3x3 conv shared by all levels -> BN of that level -> activation), then a
    shared separable 3x3 prediction conv with ``num_anchors * num_outputs`` channels (with bias).

    ``prior_probability``: when given, the prediction bias starts at -log((1 - p) / p) (class net);
    otherwise at 0 (box net).
    """

    def __init__(self, width: int, num_outputs: int, num_anchors: int, depth: int, num_levels: int,
                 act: str = "silu", norm_eps: float = 1e-3, norm_momentum: float = 0.01,
                 prior_probability: float | None = None):
        super().__init__()
        if depth < 1 or num_levels < 1 or num_outputs < 1 or num_anchors < 1:
            raise ValueError(f"HeadNet: depth, levels, outputs and anchors must be >= 1, got depth={depth}, "
                             f"levels={num_levels}, outputs={num_outputs}, anchors={num_anchors}")
        norm = partial(nn.BatchNorm2d, eps=norm_eps, momentum=norm_momentum)
        self.num_outputs, self.num_anchors = num_outputs, num_anchors
        self.prior_probability = prior_probability
        self.convs = nn.ModuleList(SeparableConv2d(width, width) for _ in range(depth))
        self.norms = nn.ModuleList(nn.ModuleList(norm(width) for _ in range(num_levels)) for _ in range(depth))
        self.act = ACTIVATIONS[act]()
        self.predict = SeparableConv2d(width, num_anchors * num_outputs, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TF's initialisation: variance scaling (normal, fan-in) for every conv, BN 1/0, the prior bias."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                _variance_scaling_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.reset_predictor()

    def reset_predictor(self) -> None:
        """A fresh prediction layer (weights and prior bias): what a class-count change re-initialises."""
        _variance_scaling_(self.predict.dw.weight)
        _variance_scaling_(self.predict.pw.weight)
        p = self.prior_probability
        nn.init.constant_(self.predict.pw.bias, 0.0 if p is None else -math.log((1 - p) / p))

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for level, x in enumerate(maps):
            for conv, norms in zip(self.convs, self.norms):
                x = self.act(norms[level](conv(x)))
            outputs.append(self.predict(x))
        return outputs


def _variance_scaling_(weight: torch.Tensor) -> None:
    fan_in = weight.shape[1] * weight[0][0].numel()  # per group: in-channels/groups x kernel area
    with torch.no_grad():
        weight.normal_(0.0, math.sqrt(1.0 / max(1.0, fan_in)))


class EfficientDet(nn.Module):
    """``backbone`` (s8, s16, s32 taps) -> :class:`BiFPN` -> class and box nets.

    ``forward(x)`` returns ``(class_maps, box_maps)``: one tensor per level, P3 first, of shape
    ``(N, num_anchors * num_classes, H_l, W_l)`` and ``(N, num_anchors * 4, H_l, W_l)`` (logits and
    box codes; :mod:`tasks.detection` turns them into losses or detections).

    ``cpu_channels_last``: on the CPU, run in channels-last memory format whatever the input's
    (oneDNN's NHWC depthwise and pointwise kernels make D0 ~1.4x faster there, train and inference);
    on other devices the input's format is kept (``train.channels_last`` decides).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, width: int, repeats: int, head_depth: int,
                 levels: Sequence[int] = range(3, 8), fusion: str = "fast", num_anchors: int = 9,
                 padding: str = "symmetric", act: str = "silu", norm_eps: float = 1e-3, norm_momentum: float = 0.01,
                 cpu_channels_last: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        taps = [spec for spec in backbone.feature_info if spec.name in ("s8", "s16", "s32")]
        if [spec.name for spec in taps] != ["s8", "s16", "s32"]:
            raise ValueError(f"EfficientDet needs the backbone's s8, s16 and s32 taps (out_indices=(2, 3, 4)); "
                             f"it has {[spec.name for spec in backbone.feature_info]}")
        self.backbone = backbone
        self.cpu_channels_last = cpu_channels_last
        self._taps = [spec.name for spec in taps]
        self.levels = tuple(levels)
        self.num_classes, self.num_anchors = num_classes, num_anchors
        norm = dict(norm_eps=norm_eps, norm_momentum=norm_momentum)
        self.fpn = BiFPN([spec.channels for spec in taps], width, repeats, self.levels, fusion=fusion,
                         padding=padding, act=act, **norm)
        self.class_net = HeadNet(width, num_classes, num_anchors, head_depth, len(self.levels), act=act,
                                 prior_probability=PRIOR_PROBABILITY, **norm)
        self.box_net = HeadNet(width, 4, num_anchors, head_depth, len(self.levels), act=act, **norm)
        init_bifpn(self.fpn)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's stage activations in backward (the largest share of the memory)."""
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.cpu_channels_last and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        maps = self.fpn([features[name] for name in self._taps])
        return self.class_net(maps), self.box_net(maps)


# ------------------------------------------------------------------------------------------ presets

@dataclass(frozen=True)
class EfficientDetPreset:
    """One row of the EfficientDet table: everything that sizes a detector."""

    name: str
    backbone: str  # a backbones.create name ("efficientnet" with backbone_phi for a free phi)
    input_size: int
    width: int  # BiFPN channels
    repeats: int  # BiFPN cells
    head_depth: int  # separable convs in the class/box nets before the prediction conv
    anchor_scale: float
    levels: tuple[int, ...]
    fusion: str
    backbone_phi: float | None = None  # with backbone="efficientnet": backbones.create(..., phi=backbone_phi)
    drop_path: float = 0.2  # backbone stochastic depth (automl's and effdet's default)
    # More backbones.create options for "efficientnet": the width/depth multipliers of a rule="paper" row
    # (whose closed-form backbone is not what phi= gives under the default rule); empty otherwise.
    backbone_options: tuple[tuple[str, float], ...] = ()
    act: str = "silu"  # the BiFPN's and the class/box nets' activation (relu6 for the Lite rows)


def _row(index: str, backbone: int, size: int, width: int, repeats: int, depth: int, anchor_scale: float = 4.0,
         max_level: int = 7, fusion: str = "fast") -> EfficientDetPreset:
    return EfficientDetPreset(f"efficientdet-d{index}", f"efficientnet-b{backbone}", size, width, repeats, depth,
                              anchor_scale, tuple(range(3, max_level + 1)), fusion)


# automl hparams_config.py (effdet model_config.py agrees); D6+ fuse with an unweighted sum.
PRESETS: dict[str, EfficientDetPreset] = {p.name: p for p in (
    _row("0", 0, 512, 64, 3, 3),
    _row("1", 1, 640, 88, 4, 3),
    _row("2", 2, 768, 112, 5, 3),
    _row("3", 3, 896, 160, 6, 4),
    _row("4", 4, 1024, 224, 7, 4),
    _row("5", 5, 1280, 288, 7, 4),
    _row("6", 6, 1280, 384, 8, 5, fusion="sum"),
    _row("7", 6, 1536, 384, 8, 5, anchor_scale=5.0, fusion="sum"),
    _row("7x", 7, 1536, 384, 8, 5, max_level=8, fusion="sum"),
)}

# The paper's scaling rule for a free phi (section 4.2, eqs. 1-3).
WIDTH_BASE, WIDTH_GROWTH = 64, BIFPN_WIDTH_GROWTH
MIN_FREE_PHI = -2.0


def _lite_row(index: str, backbone: int, size: int, width: int, repeats: int, depth: int,
              anchor_scale: float) -> EfficientDetPreset:
    return EfficientDetPreset(f"efficientdet-lite{index}", f"efficientnet-lite{backbone}", size, width, repeats, depth,
                              anchor_scale, tuple(range(3, 8)), "sum", act="relu6")


# automl hparams_config.py, efficientdet_lite_param_dict (google/automl, 2025-03; effdet's tf_efficientdet_lite*
# agree): EfficientNet-Lite backbones (ReLU6, no SE), ReLU6 in the BiFPN and the heads, unweighted-sum fusion,
# inputs normalised with mean 127 / std 128; lite3 and lite4 keep the default anchor scale 4.0. Stochastic depth
# 0.2 (the Lite builder's survival_prob 0.8). lite3x (lite3's backbone at 640 px, BiFPN 200) is automl's too.
LITE_PRESETS: dict[str, EfficientDetPreset] = {p.name: p for p in (
    _lite_row("0", 0, 320, 64, 3, 3, anchor_scale=3.0),
    _lite_row("1", 1, 384, 88, 4, 3, anchor_scale=3.0),
    _lite_row("2", 2, 448, 112, 5, 3, anchor_scale=3.0),
    _lite_row("3", 3, 512, 160, 6, 4, anchor_scale=4.0),
    _lite_row("3x", 3, 640, 200, 6, 4, anchor_scale=3.0),
    _lite_row("4", 4, 640, 224, 7, 4, anchor_scale=4.0),
)}
PRESETS.update(LITE_PRESETS)


def efficientdet_preset(phi: int | float | str, rule: str = "table") -> EfficientDetPreset:
    """The EfficientDet row at ``phi`` (>= -2): 0..7 or ``"7x"`` (also ``"d3"``, ``"efficientdet-d3"``)
    give the published table under either rule; ``rule`` says what any other phi means.

    ``rule="table"`` (default; :mod:`backbones.scaling`, the same rule as ``backbones.get_preset``):

    * between rows N and N+1 (fraction f), BiFPN width and input size are geometric between the rows'
      (width to a multiple of 8, never more than 10% down; input to the nearest multiple of 128), BiFPN
      repeats and head depth linear, rounded half up; the backbone is ``efficientnet`` at the phi
      interpolated between the rows' backbone indices (D6 and D7 both use B6, so 6 < phi < 7 keeps B6);
      anchor scale, levels and fusion are the nearer row's (the upper one from f = 0.5);
    * above 7, D7 grown per unit of phi past 7 by the paper's rule: width x1.35, input +128, repeats +1,
      head depth +1/3 (the same rounding), on D7's backbone (B6), anchor scale, levels and fusion;
    * below 0, the paper's rule (D0 is the rule at 0).

    ``rule="paper"``: the paper's rule at every phi off the table: W = 64 * 1.35^phi to a multiple of 8,
    D_bifpn = 3 + phi and R = 512 + 128 * phi rounded half up (R to a multiple of 128), D_head = 3 +
    floor(phi / 3), on the closed-form ``efficientnet`` backbone. An integral phi is still the table row:
    the released widths are hand-rounded (D2 has 112 channels where the rule gives 120, D4 224 for 216)
    and D5+ deviate in depth and resolution.

    The Lite rows are named only: ``"lite0"`` .. ``"lite4"``, ``"lite3x"`` (also ``"efficientdet-lite0"``).
    """
    check_rule(rule)
    if isinstance(phi, str):
        key = phi.strip().lower().removeprefix("efficientdet-").removeprefix("efficientdet_")
        if f"efficientdet-{key}" in LITE_PRESETS:
            return LITE_PRESETS[f"efficientdet-{key}"]
        key = key.removeprefix("d")
        if f"efficientdet-d{key}" in PRESETS:
            return PRESETS[f"efficientdet-d{key}"]
        try:
            phi = float(key)
        except ValueError:
            raise ValueError(f"unknown EfficientDet scale {phi!r}; expected 0..7, '7x', 'd0'..'d7x', "
                             f"'lite0'..'lite4', 'lite3x' or a real phi >= {MIN_FREE_PHI:g}") from None
    phi = float(phi)
    if not math.isfinite(phi) or phi < MIN_FREE_PHI:
        raise ValueError(f"EfficientDet phi={phi} must be a finite number >= {MIN_FREE_PHI:g}")
    named = named_phi(phi)
    if named is not None:
        return PRESETS[f"efficientdet-d{named}"]
    if phi < 0 or rule == "paper":
        return _paper_row(phi)
    if phi > LAST_NAMED:
        return _grown_row(phi)
    return _interpolated_row(phi)


def _paper_row(phi: float) -> EfficientDetPreset:
    """The paper's closed form at ``phi``. Below 0 the backbone is ``efficientnet`` with ``backbone_phi``
    (the default rule is the closed form there); above, the closed form's width/depth multipliers name it."""
    if phi < 0:
        backbone = {"backbone_phi": phi}
    else:
        backbone = {"backbone_options": (("depth", ALPHA_DEPTH**phi), ("width", BETA_WIDTH**phi))}
    return EfficientDetPreset(
        name=f"efficientdet(phi={phi:g})", backbone="efficientnet", **backbone,
        input_size=128 * max(1, round_half_up(4 + phi)),
        width=make_divisible(WIDTH_BASE * WIDTH_GROWTH**phi, 8),
        repeats=max(1, round_half_up(3 + phi)),
        head_depth=max(1, 3 + math.floor(phi / 3)),
        anchor_scale=4.0, levels=tuple(range(3, 8)), fusion="fast" if phi < 6 else "sum")


def _backbone_index(row: EfficientDetPreset) -> int:
    return int(row.backbone.rsplit("-b", 1)[1])


def _sized(row: EfficientDetPreset, phi: float, backbone_phi: float, input_size: float, width: float,
           repeats: float, head_depth: float) -> EfficientDetPreset:
    """``row`` (anchor scale, levels, fusion) with the sizes at ``phi``, each rounded as the table is."""
    named = named_phi(backbone_phi)
    if named is not None:
        backbone = {"backbone": f"efficientnet-b{named}", "backbone_phi": None}
    else:
        backbone = {"backbone": "efficientnet", "backbone_phi": backbone_phi}
    return replace(row, name=f"efficientdet(phi={phi:g})", **backbone, backbone_options=(),
                   input_size=128 * max(1, round_half_up(input_size / 128)), width=make_divisible(width, 8),
                   repeats=max(1, round_half_up(repeats)), head_depth=max(1, round_half_up(head_depth)))


def _interpolated_row(phi: float) -> EfficientDetPreset:
    """Between the published rows floor(phi) and floor(phi) + 1 (0 < phi < 7, not an integer)."""
    index = math.floor(phi)
    low, high, fraction = PRESETS[f"efficientdet-d{index}"], PRESETS[f"efficientdet-d{index + 1}"], phi - index
    return _sized(low if fraction < 0.5 else high, phi,
                  backbone_phi=linear(_backbone_index(low), _backbone_index(high), fraction),
                  input_size=geometric(low.input_size, high.input_size, fraction),
                  width=geometric(low.width, high.width, fraction),
                  repeats=linear(low.repeats, high.repeats, fraction),
                  head_depth=linear(low.head_depth, high.head_depth, fraction))


def _grown_row(phi: float) -> EfficientDetPreset:
    """D7 grown by the paper's per-unit factors for phi - 7 (phi > 7)."""
    top, extra = PRESETS[f"efficientdet-d{LAST_NAMED}"], phi - LAST_NAMED
    return _sized(top, phi, backbone_phi=_backbone_index(top), input_size=top.input_size + 128 * extra,
                  width=top.width * WIDTH_GROWTH**extra, repeats=top.repeats + extra,
                  head_depth=top.head_depth + extra / 3)


def list_presets() -> list[str]:
    """The table's names: ``efficientdet-d0`` .. ``efficientdet-d7x``, then ``efficientdet-lite0`` .. ``-lite4``
    (and ``-lite3x``)."""
    return list(PRESETS)

"""segmentation-models-pytorch (smp) interop, both ways.

1. smp checkpoints into our U-Net. A state dict saved from ``smp.Unet(encoder)`` loads strictly into
   ``build_segmenter`` and gives smp's logits. The encoder family decides how our backbone is built
   (its *flavour*):

   ========== ================================ ======================================================
   flavour    smp encoder                      what our backbone needs to compute the same numbers
   ========== ================================ ======================================================
   smp        ``efficientnet-bN``              s2 = stem output; EfficientNet-PyTorch's *static* TF
              (EfficientNet-PyTorch inside)    "same" padding, fixed for the model's native resolution;
                                               BN eps 1e-3; the taps at smp's block indices (its b0
                                               takes s16 after the first block of stage 5)
   smp-timm   ``timm-efficientnet-bN``         s2 = stem output; symmetric padding; BN eps 1e-5
   smp-tu     ``tu-efficientnet_bN``           timm features_only taps (= ours); BN eps 1e-5
   effdense   (ours)                           what the options say
   ========== ================================ ======================================================

   Key mapping: ``encoder.*`` goes through ``backbones.weights`` (EfficientNet-PyTorch / timm
   layouts, its classifier-head convs dropped); the decoder and heads map by name
   (``conv1.0`` -> ``conv1.conv``, ``conv1.1`` -> ``conv1.bn``, ``attention1.attention.cSE.1`` ->
   ``attention1.channel.fc1``, ``segmentation_head.0`` -> ``head.conv``, ``classification_head.3``
   -> ``aux_head.fc``). smp builds an scSE module before its last block's (absent) skip and never
   runs it; those tensors are dropped.

2. Our backbones inside smp: :func:`register_smp_encoders` adds every effdense preset to smp's
   encoder table as ``effdense-<name>`` (smp's ``EncoderMixin`` contract: ``out_channels`` with the
   input first, depth 1..5, output stride 8/16 by dilation, ``set_in_channels``). There are no
   hosted weights: pass ``encoder_weights=None``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch
from segmentation_models_pytorch.encoders import encoders
from segmentation_models_pytorch.encoders._base import EncoderMixin
from torch import nn
from torch.nn import functional as F

import backbones
from backbones.errors import WeightsError
from backbones.weights import adapt_input_channels

log = logging.getLogger("effdense")

__all__ = ["FLAVOURS", "flavour_options", "detect_flavour", "apply_flavour", "split_smp_state",
           "StaticPadConv2d", "freeze_static_padding", "EffdenseSmpEncoder", "register_smp_encoders"]

FLAVOURS = ("effdense", "smp", "smp-timm", "smp-tu")
_FLAVOUR_STEMS = {"smp": "encoder._conv_stem.weight", "smp-timm": "encoder.conv_stem.weight",
                  "smp-tu": "encoder.model.conv_stem.weight"}


# ------------------------------------------------------------------------------------- flavours

def detect_flavour(state: Mapping[str, torch.Tensor], label: str = "checkpoint") -> str | None:
    """The smp flavour of a whole-model state dict, or None when it is not an smp ``Unet`` file."""
    if not any(key.startswith("decoder.blocks.") for key in state) or not any(k.startswith("encoder.") for k in state):
        return None
    for flavour, stem in _FLAVOUR_STEMS.items():
        if stem in state:
            return flavour
    first = [k for k in state if k.startswith("encoder.")][:3]
    raise WeightsError(f"{label}: an smp Unet checkpoint whose encoder is not an EfficientNet (first encoder keys: "
                     f"{', '.join(first)}); expected smp.Unet with 'efficientnet-bN', 'timm-efficientnet-bN' "
                     f"or 'tu-efficientnet_bN'")


def flavour_options(flavour: str, backbone: str) -> dict:
    """The ``backbones.create`` options a flavour fixes (static padding is applied after building)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r} is not one of {', '.join(FLAVOURS)}")
    if flavour == "effdense":
        return {}
    if flavour == "smp-tu":
        return {"s2_tap": "stage", "padding": "symmetric", "norm_eps": 1e-5}
    if flavour == "smp-timm":
        return {"s2_tap": "stem", "padding": "symmetric", "norm_eps": 1e-5}
    return {"s2_tap": "stem", "padding": "same", "norm_eps": 1e-3, "tap_at": _smp_block_taps(backbone)}


def _smp_block_taps(backbone: str) -> dict[str, tuple[int, int]]:
    """(stage, block) of each of smp's ``efficientnet-bN`` taps s4..s32, read from smp's own table."""
    entry = encoders.get(backbone)
    if entry is None or "out_indexes" not in entry.get("params", {}):
        raise WeightsError(f"flavour='smp': smp has no EfficientNet-PyTorch encoder named {backbone!r}; expected "
                         f"efficientnet-b0 ... efficientnet-b7")
    repeats = [stage.repeats for stage in backbones.get_preset(backbone).arch().stages]
    places = [(s, j) for s, count in enumerate(repeats) for j in range(count)]  # global block index -> place
    return {name: places[index] for name, index in zip(("s4", "s8", "s16", "s32"), entry["params"]["out_indexes"])}


def apply_flavour(flavour: str, backbone: str, options: dict) -> dict:
    """``options`` with the flavour's required values added; a conflicting explicit value is an error."""
    merged = dict(options)
    for key, value in flavour_options(flavour, backbone).items():
        if key in merged and merged[key] is not None and merged[key] != value:
            raise WeightsError(f"{key}={merged[key]!r} conflicts with flavour={flavour!r}, which needs {key}={value!r} "
                             f"to reproduce smp's encoder; drop {key} or use flavour='effdense'")
        merged[key] = value
    return merged


def finish_flavour(flavour: str, backbone: nn.Module) -> None:
    """Post-build adaptations: EfficientNet-PyTorch's static padding for ``flavour='smp'``."""
    if flavour == "smp":
        freeze_static_padding(backbone, backbone.arch.resolution)


# ------------------------------------------------------------------------------- static padding

class StaticPadConv2d(nn.Conv2d):
    """A conv whose zero padding ``(left, right, top, bottom)`` is fixed, whatever the input size.

    EfficientNet-PyTorch computes TF "same" padding once, for the model's native image size, and
    keeps it for every input; ``freeze_static_padding`` reproduces that.
    """

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=0,
                         dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
        self.weight = conv.weight
        self.bias = conv.bias
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def freeze_static_padding(backbone: nn.Module, image_size: int) -> None:
    """Give every strided conv the fixed "same" padding that ``image_size`` inputs need (in place).

    Walks the convs in forward order, tracking the feature size as EfficientNet-PyTorch does
    (``ceil(size / stride)`` after each strided conv). Stride-1 convs pad symmetrically already.
    """
    size = (image_size, image_size)
    for name, module in list(backbone.named_modules()):
        if not isinstance(module, nn.Conv2d) or max(module.stride) == 1:
            continue
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        top, bottom = _same_pad(size[0], kh, sh, dh)
        left, right = _same_pad(size[1], kw, sw, dw)
        parent_name, _, leaf = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name), leaf, StaticPadConv2d(module, (left, right, top, bottom)))
        size = (math.ceil(size[0] / sh), math.ceil(size[1] / sw))


# ---------------------------------------------------------------------------------- key mapping

_SMP_RULES = (  # smp key (outside the encoder) -> ours
    (r"^decoder\.blocks\.(\d+)\.conv([12])\.0\.", r"decoder.blocks.\1.conv\2.conv."),
    (r"^decoder\.blocks\.(\d+)\.conv([12])\.1\.", r"decoder.blocks.\1.conv\2.bn."),
    (r"^decoder\.blocks\.(\d+)\.attention([12])\.attention\.cSE\.1\.", r"decoder.blocks.\1.attention\2.channel.fc1."),
    (r"^decoder\.blocks\.(\d+)\.attention([12])\.attention\.cSE\.3\.", r"decoder.blocks.\1.attention\2.channel.fc2."),
    (r"^decoder\.blocks\.(\d+)\.attention([12])\.attention\.sSE\.0\.", r"decoder.blocks.\1.attention\2.spatial."),
    (r"^segmentation_head\.0\.", "head.conv."),
    (r"^classification_head\.3\.", "aux_head.fc."),
)


def split_smp_state(state: Mapping[str, torch.Tensor], num_blocks: int):
    """``(encoder part, the rest under our names, dropped smp keys, unmappable smp keys)``."""
    # timm-universal encoders (smp-tu) hold the timm model under encoder.model.: timm's keys either way
    encoder = {"encoder." + k[len("encoder.model."):] if k.startswith("encoder.model.") else k: v
               for k, v in state.items() if k.startswith("encoder.")}
    rest, dropped, unknown = {}, [], []
    last_attention = re.compile(rf"^decoder\.blocks\.{num_blocks - 1}\.attention1\.")  # built, never run by smp
    for key, value in state.items():
        if key.startswith("encoder."):
            continue
        if last_attention.match(key):
            dropped.append(key)
            continue
        for pattern, replacement in _SMP_RULES:
            if re.match(pattern, key):
                rest[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    return encoder, rest, dropped, unknown


# ------------------------------------------------------------------------------- smp encoders

class EffdenseSmpEncoder(nn.Module, EncoderMixin):
    """An effdense backbone speaking smp's encoder contract (``segmentation_models_pytorch.encoders``).

    ``forward(x)`` returns ``[x, s2, s4, ...][: depth + 1]``; ``out_channels`` lists the channels of
    those maps (read from the backbone's ``feature_info``); ``output_stride`` 8/16 dilates the deep
    stages (built natively; ``make_dilated`` rebuilds with the same weights).
    """

    _is_torch_scriptable = False  # dict-returning backbone: torch.jit.script is not supported
    _is_torch_exportable = True
    _is_torch_compilable = True

    def __init__(self, backbone_name: str, depth: int = 5, output_stride: int = 32, s2_tap: str = "stage"):
        nn.Module.__init__(self)
        if not 1 <= depth <= 5:
            raise ValueError(f"{self.__class__.__name__} depth should be in range [1, 5], got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"Output stride should be 16 or 8, got {output_stride}.")
        self._name, self._s2_tap = backbone_name, s2_tap
        self._depth, self._in_channels, self._output_stride = depth, 3, output_stride
        self.model = self._build(output_stride, 3)
        self._out_channels = [3] + [spec.channels for spec in self.model.all_feature_info]

    def _build(self, output_stride: int, in_channels: int) -> nn.Module:
        return backbones.create(self._name, out_indices=tuple(range(self._depth)), output_stride=output_stride,
                                in_channels=in_channels, s2_tap=self._s2_tap)

    @property
    def out_channels(self) -> list[int]:
        return self._out_channels[: self._depth + 1]

    @property
    def output_stride(self) -> int:
        return min(self._output_stride, 2**self._depth)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, *self.model(x).values()]

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Adapt the stem to ``in_channels`` (pretrained: timm's rule from the RGB kernel; else fresh)."""
        if in_channels == self._in_channels:
            return
        old = self.model.stem.conv
        new = type(old)(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                        dilation=old.dilation, groups=old.groups, bias=old.bias is not None)
        if pretrained:
            with torch.no_grad():
                new.weight.copy_(adapt_input_channels(old.weight, in_channels))
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out")
        self.model.stem.conv = new
        self.model.in_channels = in_channels
        self._in_channels = in_channels
        self._out_channels[0] = in_channels

    def get_stages(self) -> dict[int, list[nn.Module]]:
        """The stages running at nominal strides 16 and 32 (what dilation changes)."""
        stride, groups = 2, {16: [], 32: []}
        for spec, stage in zip(self.model.arch.stages, self.model.stages):
            stride *= spec.stride
            if stride in groups:
                groups[stride].append(stage)
        return groups

    def make_dilated(self, output_stride: int) -> None:
        if output_stride not in (8, 16):
            raise ValueError(f"Output stride should be 16 or 8, got {output_stride}.")
        if output_stride == self._output_stride:
            return
        rebuilt = self._build(output_stride, self._in_channels)
        rebuilt.stem.conv = self.model.stem.conv  # keeps an adapted stem
        rebuilt.load_state_dict(self.model.state_dict())
        self.model, self._output_stride = rebuilt, output_stride


def register_smp_encoders(prefix: str = "effdense-") -> list[str]:
    """Add every effdense preset to smp's encoder table as ``<prefix><name>``; returns the names.

    >>> register_smp_encoders()
    >>> smp.FPN("effdense-efficientnet-b3", encoder_weights=None, classes=19)

    Idempotent. There are no hosted weights (``encoder_weights`` must be None); the free-coefficient
    ``efficientnet`` (needs ``phi``) is not registered.
    """
    names = []
    for name in backbones.list_names():
        if name == backbones.FREE_NAME:
            continue
        key = prefix + name
        existing = encoders.get(key)
        if existing is not None and existing["encoder"] is not EffdenseSmpEncoder:
            raise ValueError(f"smp already has an encoder named {key!r} that is not effdense's; pass another prefix")
        encoders[key] = {"encoder": EffdenseSmpEncoder, "pretrained_settings": {}, "params": {"backbone_name": name}}
        names.append(key)
    return names


"""Scalable EfficientNet encoders with multi-scale feature taps.

>>> import backbones
>>> net = backbones.create("efficientnet-b3", output_stride=16)
>>> [f.channels for f in net.feature_info]
[24, 32, 48, 136, 384]
"""

from __future__ import annotations

from .efficientnet import EfficientNet, FeatureSpec
from .fusion import FusionError, FusionReport, fuse_for_inference
from .scaling import RULES, check_rule, compound_preset, preset_at
from .specs import PRESETS, ArchSpec, Preset, StageSpec

__all__ = ["EfficientNet", "FeatureSpec", "ArchSpec", "Preset", "StageSpec", "create", "get_preset", "list_names",
           "fuse_for_inference", "FusionError", "FusionReport", "RULES"]

FREE_NAME = "efficientnet"


def list_names() -> list[str]:
    """Every name ``create`` accepts (the free-coefficient ``efficientnet`` last)."""
    return list(PRESETS) + [FREE_NAME]


def get_preset(name: str, phi: float | None = None, width: float | None = None, depth: float | None = None,
               rule: str = "table") -> Preset:
    """The preset for ``name`` (native resolution, dropout, multipliers) without building a model.

    ``efficientnet`` takes a compound coefficient ``phi`` or explicit ``width``/``depth`` multipliers.
    ``rule`` says what ``phi`` means (:mod:`backbones.scaling`): ``"table"`` (default) gives the published
    preset ``efficientnet-bN`` itself for an integral phi in 0..7, interpolates between neighbouring rows
    for a fractional one, continues with the paper's closed form below 0 and grows B7 by the rule's factors
    above 7; ``"paper"`` gives the closed form (width 1.1^phi, depth 1.2^phi, resolution 224 * 1.15^phi)
    at every phi. An unknown ``rule`` is a ValueError.
    """
    check_rule(rule)
    if name == FREE_NAME:
        if phi is not None and width is None and depth is None:
            return preset_at(phi, rule)
        return compound_preset(phi=phi, width=width, depth=depth)
    if phi is not None or width is not None or depth is not None:
        raise ValueError(f"phi/width/depth apply only to {FREE_NAME!r}, not to the preset {name!r}")
    if name not in PRESETS:
        raise ValueError(f"unknown backbone {name!r}; known names: {', '.join(list_names())}")
    return PRESETS[name]


def create(name: str, *, phi: float | None = None, width: float | None = None, depth: float | None = None,
           rule: str = "table", weights: str | None = None, **options) -> EfficientNet:
    """Build a backbone by name (``phi``/``width``/``depth``/``rule``: as :func:`get_preset`).

    ``options``: ``in_channels``, ``out_indices``, ``output_stride`` (8/16/32), ``drop_path``,
    ``norm_eps``, ``norm_momentum``, ``padding`` ("symmetric" or TF-compatible "same").
    ``weights``: a local checkpoint (torchvision, timm, effdet, EfficientNet-PyTorch or effdense
    safetensors) or ``"imagenet"`` for torchvision's published file.
    """
    preset = get_preset(name, phi=phi, width=width, depth=depth, rule=rule)
    model = EfficientNet(preset.arch(), name=preset.name, **options)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model

"""Scalable EfficientNet encoders with multi-scale feature taps.

>>> import backbones
>>> net = backbones.create("efficientnet-b3", output_stride=16)
>>> [f.channels for f in net.feature_info]
[24, 32, 48, 136, 384]
"""

from __future__ import annotations

from .efficientnet import EfficientNet, FeatureSpec
from .fusion import FusionError, FusionReport, fuse_for_inference
from .specs import PRESETS, ArchSpec, Preset, StageSpec, compound_preset

__all__ = ["EfficientNet", "FeatureSpec", "ArchSpec", "Preset", "StageSpec", "create", "get_preset", "list_names",
           "fuse_for_inference", "FusionError", "FusionReport"]

FREE_NAME = "efficientnet"


def list_names() -> list[str]:
    """Every name ``create`` accepts (the free-coefficient ``efficientnet`` last)."""
    return list(PRESETS) + [FREE_NAME]


def get_preset(name: str, phi: float | None = None, width: float | None = None, depth: float | None = None) -> Preset:
    """The preset for ``name`` (native resolution, dropout, multipliers) without building a model."""
    if name == FREE_NAME:
        return compound_preset(phi=phi, width=width, depth=depth)
    if phi is not None or width is not None or depth is not None:
        raise ValueError(f"phi/width/depth apply only to {FREE_NAME!r}, not to the preset {name!r}")
    if name not in PRESETS:
        raise ValueError(f"unknown backbone {name!r}; known names: {', '.join(list_names())}")
    return PRESETS[name]


def create(name: str, *, phi: float | None = None, width: float | None = None, depth: float | None = None,
           weights: str | None = None, **options) -> EfficientNet:
    """Build a backbone by name.

    ``options``: ``in_channels``, ``out_indices``, ``output_stride`` (8/16/32), ``drop_path``,
    ``norm_eps``, ``norm_momentum``, ``padding`` ("symmetric" or TF-compatible "same").
    ``weights``: a local checkpoint (torchvision, timm, effdet, EfficientNet-PyTorch or effdense
    safetensors) or ``"imagenet"`` for torchvision's published file.
    """
    preset = get_preset(name, phi=phi, width=width, depth=depth)
    model = EfficientNet(preset.arch(), name=preset.name, **options)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model

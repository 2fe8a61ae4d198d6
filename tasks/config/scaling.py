"""One knob for every task: what ``model.phi`` (or a named scale) resolves to.

One rule, the same in the Python API and in a config (``backbones.get_preset("efficientnet", phi=...)``,
``heads.efficientdet_preset(phi)``, ``model.phi``, ``effdense backbones --phi``, ``effdense budget --search
phi``): an integral phi in 0..7 is the published row (B_phi: Tan & Le 2019, Table 1; D_phi: the released
EfficientDet configs); a fractional phi between two rows interpolates them in the compound-scaling form
(every size grows by a constant factor per unit of phi, so the knob is continuous and monotone); below 0
the papers' rules continue from B0/D0, above 7 the B7/D7 rows grow by the rules' factors. The backbone
rows are ``backbones.scaling``'s and the detector rows ``heads.efficientdet``'s (each layer's own Python
API must give the same numbers, and those layers cannot import this one); this module adds what only
the tasks need: the U-Net decoder widths and the BiFPN size of a segmentation head, and the common part
of :func:`describe_backbone` (each task package's ``describe_scale`` adds its own sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["named_scale", "backbone_spec", "backbone_build", "backbone_at", "backbone_at_model", "detection_scale", "detector_at",
           "detector_row", "decoder_widths", "bifpn_size", "resolve_image_size", "describe_backbone", "random_images", "LAST_NAMED",
           "ScaleFamily", "IMAGENET_TOP1", "B_SCALES"]

from backbones.scaling import BETA_WIDTH, LAST_NAMED
from backbones.scaling import named_phi as named_scale  # the published row an integral phi in 0..7 names

NAMED_PHIS = range(0, LAST_NAMED + 1)  # the published scales B0..B7 / D0..D7


def backbone_spec(model) -> tuple[str, dict]:
    """(``backbones.create`` name, its options) a ``model`` config section names: ``model.phi``
    (:func:`backbone_at`), else ``model.scale`` (B-number), else ``model.backbone``."""
    if model.phi is not None:
        name, options, _, _ = backbone_at(model.phi)
        return name, options
    if model.scale is not None:
        return f"efficientnet-b{model.scale}", {}
    return model.backbone, {}


def backbone_build(model) -> tuple[str, dict]:
    """:func:`backbone_spec` plus the options every task passes to ``backbones.create`` from ``model``: the
    BatchNorm settings when set, and ``in_channels`` when not 3 (ImageNet stems are adapted, not re-initialised)."""
    name, options = backbone_spec(model)
    for key in ("norm_eps", "norm_momentum"):
        if getattr(model, key) is not None:
            options[key] = getattr(model, key)
    if model.in_channels != 3:
        options["in_channels"] = model.in_channels
    return name, options


def detection_scale(model):
    """What names the EfficientDet scale: ``model.phi`` (free), else ``model.scale`` (0..7, 7x), else the
    D-number matching ``model.backbone`` (efficientnet-b3 -> D3)."""
    if model.phi is not None:
        return float(model.phi)
    if model.scale is not None:
        return model.scale
    name = model.backbone
    if name.startswith("efficientnet-b") and name[-1].isdigit():
        return int(name.rsplit("b", 1)[1])
    raise ValueError(f"model.backbone={name!r}: detection needs model.scale (0..7 or 7x) or model.phi")


def backbone_at(phi: float) -> tuple[str, dict, int, float]:
    """(``backbones.create`` name, its options, native resolution, dropout) of the backbone at ``phi``."""
    import backbones

    named = named_scale(phi)
    if named is not None:
        preset = backbones.get_preset(f"efficientnet-b{named}")
        return preset.name, {}, preset.resolution, preset.dropout
    preset = backbones.get_preset("efficientnet", phi=float(phi))
    return "efficientnet", {"phi": float(phi)}, preset.resolution, preset.dropout


def backbone_at_model(model) -> tuple[str, dict, int, float]:
    """:func:`backbone_at` for a ``model`` config section (phi, else scale, else the backbone's own preset)."""
    import backbones

    if model.phi is not None:
        return backbone_at(model.phi)
    name, options = backbone_spec(model)
    preset = backbones.get_preset(name, **options)
    return name, options, preset.resolution, preset.dropout


def detector_at(phi: float | str):
    """The EfficientDet row at ``phi`` (or a named scale such as ``"7x"``): ``heads.efficientdet_preset``."""
    from heads import efficientdet_preset

    return efficientdet_preset(phi)


def detector_row(model_cfg):
    """The EfficientDet row a detection config names (``model.phi``, ``model.scale`` or the backbone's B-number)."""
    return detector_at(detection_scale(model_cfg))


def decoder_widths(channels, phi: float | None) -> list[int]:
    """The U-Net decoder widths at ``phi``: as given at every named scale, and so between them too (the table
    is constant); beyond B7 (or below B0) they grow by the width rule, 1.1^(phi - 7) (1.1^phi), multiples of 8.
    ``build_segmenter`` applies it to an ``efficientnet`` backbone with a ``phi``, so the config and the
    Python API build the same decoder."""
    from backbones.specs import make_divisible

    if phi is None or 0 <= float(phi) <= LAST_NAMED:
        return list(channels)
    extra = float(phi) - LAST_NAMED if phi > LAST_NAMED else float(phi)
    return [make_divisible(c * BETA_WIDTH**extra, 8) for c in channels]


def bifpn_size(backbone: str, phi: float | None = None) -> tuple[int, int]:
    """(BiFPN width, repeats) of a segmentation BiFPN head: the EfficientDet row of the backbone's scale
    (``efficientnet-bN`` -> DN; ``efficientnet`` with ``phi`` -> the row at that phi)."""
    import re

    match = re.fullmatch(r"efficientnet-b([0-7])", backbone)
    if match:
        row = detector_at(int(match[1]))
    elif backbone == "efficientnet" and phi is not None:
        row = detector_at(float(phi))
    else:
        raise ValueError(f"head='bifpn' on backbone {backbone!r}: no EfficientDet row to size the BiFPN from; "
                         f"set bifpn_width and bifpn_repeats (model.segmentation.bifpn_width / bifpn_repeats), "
                         f"or use an efficientnet-b0..b7 backbone or a phi")
    return row.width, row.repeats


def resolve_image_size(cfg) -> tuple[int, int]:
    """``data.image_size`` as (h, w) when set, else the task's native input size (B0 224, D0 512, ...)."""
    size = cfg.data.image_size if cfg.data.image_size is not None else cfg.native_image_size()
    return int(size[0]), int(size[1])


def describe_backbone(cfg) -> dict:
    """What every task shares in a scale's description: the task, phi / scale, the input size and the
    backbone (name, width/depth multipliers, whether it is a published row). Plain data."""
    import backbones

    m = cfg.model
    name, options = backbone_spec(m)
    preset = backbones.get_preset(name, **options)
    return {"task": m.task, "phi": m.phi, "scale": m.scale, "input_size": list(resolve_image_size(cfg)),
            "backbone": preset.name, "width_multiplier": round(preset.width, 4),
            "depth_multiplier": round(preset.depth, 4), "named": m.phi is None or named_scale(m.phi) is not None}


def random_images(cfg, batch_size: int, generator):
    """uint8 (N, 3, H, W) noise at the config's input size (the synthetic batches of ``effdense budget``)."""
    import torch

    height, width = resolve_image_size(cfg)
    bands = cfg.model.in_channels
    return torch.randint(0, 256, (batch_size, bands, height, width), dtype=torch.uint8, generator=generator)


# EfficientNet paper, Table 2 (shared/reference/efficientnet.md)
IMAGENET_TOP1 = {"0": 77.1, "1": 79.1, "2": 80.1, "3": 81.6, "4": 82.9, "5": 83.6, "6": 84.0, "7": 84.3}
B_SCALES = tuple(str(i) for i in NAMED_PHIS)


@dataclass(frozen=True)
class ScaleFamily:
    """A task's named scales, as the shared commands (``effdense backbones --task``, ``effdense budget``) use
    them: the label prefix (``B3``, ``D7x``), the names, the few measured by default on a CPU, the published
    accuracy of each (``metric``), the regex a ``--scales`` name must match (group 1: the scale), whether other
    backbone names (``efficientnet-lite0``) count as scales, and the input size a scale is measured at
    (``native``: the scale's own resolution; ``config``: the config's crop, ``summary_size`` in summaries)."""

    prefix: str
    names: tuple[str, ...]
    cpu_names: tuple[str, ...]
    published: dict = field(default_factory=dict)
    metric: str = "top-1"  # the published metric, as the budget table heads it
    pattern: str = r"(?:efficientnet-b|b)?([0-7])"
    other_backbones: bool = True
    image_size: str = "native"
    summary_size: tuple[int, int] | None = None

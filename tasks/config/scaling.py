"""One knob for every task: what ``model.phi`` (or a named scale) resolves to.

Named scales are exactly the published tables: an integral phi in 0..7 (or ``model.scale``, or
``efficientnet-bN``) is B_phi (Tan & Le 2019, Table 1: width, depth, resolution, dropout) and, for
detection and the BiFPN segmentation head, D_phi (the released EfficientDet configs: input size,
BiFPN width and repeats, head depth); the U-Net decoder is smp's (256, 128, 64, 32, 16) at every one.

A fractional phi between two named scales interpolates in the compound-scaling form: every size
grows by a constant factor per unit of phi (geometric interpolation of width, depth and resolution
between the neighbouring rows; counts such as repeats linearly, then rounded). That keeps the knob
continuous and monotone, which ``effdense budget --search phi`` relies on: the papers' closed-form
rules (depth 1.2^phi, width 1.1^phi, resolution 224 * 1.15^phi; BiFPN width 64 * 1.35^phi, repeats
3 + phi, head depth 3 + phi / 3, input 512 + 128 phi) agree with the tables at phi 0 and 1 only, so
switching between table and rule at the integers would make phi = 2.95 a larger model than phi = 3.
Below 0 and above 7 the rules extrapolate from the end rows (B0 is the rule at 0; above 7, B7/D7
grow by the rules' factors). :func:`describe` says what a config resolves to; training prints it
and writes it to the run directory (``scale.json``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from .schema import detection_scale, named_scale

__all__ = ["backbone_at", "detector_at", "decoder_widths", "bifpn_size", "describe"]

ALPHA_DEPTH, BETA_WIDTH, GAMMA_RESOLUTION = 1.2, 1.1, 1.15  # Tan & Le 2019, section 3.3
BIFPN_WIDTH_GROWTH = 1.35  # Tan, Pang & Le 2020, eq. 1
LAST_NAMED = 7


def _geometric(a: float, b: float, fraction: float) -> float:
    return a ** (1 - fraction) * b**fraction


def backbone_at(phi: float) -> tuple[str, dict, int, float]:
    """(``backbones.create`` name, its options, native resolution, dropout) of the backbone at ``phi``."""
    import backbones

    named = named_scale(phi)
    if named is not None:
        preset = backbones.get_preset(f"efficientnet-b{named}")
        return preset.name, {}, preset.resolution, preset.dropout
    phi = float(phi)
    if phi < 0:  # B0 is the rule at phi 0: the rule continues below it
        preset = backbones.get_preset("efficientnet", phi=phi)
        return "efficientnet", {"phi": phi}, preset.resolution, preset.dropout
    if phi > LAST_NAMED:
        top, extra = backbones.get_preset(f"efficientnet-b{LAST_NAMED}"), phi - LAST_NAMED
        width, depth = top.width * BETA_WIDTH**extra, top.depth * ALPHA_DEPTH**extra
        resolution, dropout = top.resolution * GAMMA_RESOLUTION**extra, top.dropout
    else:
        low, high = (backbones.get_preset(f"efficientnet-b{k}") for k in (math.floor(phi), math.floor(phi) + 1))
        fraction = phi - math.floor(phi)
        width, depth = _geometric(low.width, high.width, fraction), _geometric(low.depth, high.depth, fraction)
        resolution = _geometric(low.resolution, high.resolution, fraction)
        dropout = low.dropout + (high.dropout - low.dropout) * fraction
    options = {"width": round(width, 4), "depth": round(depth, 4)}
    return "efficientnet", options, int(round(resolution / 8)) * 8, round(dropout, 3)


def detector_at(phi: float):
    """The EfficientDet row at ``phi``: the published row for 0..7, interpolated between rows (backbone as
    :func:`backbone_at`), or the rules' factors beyond the table (``heads.efficientdet_preset`` below 0)."""
    from backbones.specs import make_divisible
    from heads import efficientdet_preset

    named = named_scale(phi)
    if named is not None:
        return efficientdet_preset(named)
    phi = float(phi)
    if phi < 0:
        return efficientdet_preset(phi)  # D0 is the rule at phi 0 too
    if phi > LAST_NAMED:
        low = high = efficientdet_preset(LAST_NAMED)
        extra = phi - LAST_NAMED
        width = low.width * BIFPN_WIDTH_GROWTH**extra
        size, repeats, depth = low.input_size + 128 * extra, low.repeats + extra, low.head_depth + extra / 3
        fraction = 0.0
    else:
        low, high = efficientdet_preset(math.floor(phi)), efficientdet_preset(math.floor(phi) + 1)
        fraction = phi - math.floor(phi)
        width = _geometric(low.width, high.width, fraction)
        size = _geometric(low.input_size, high.input_size, fraction)
        repeats = low.repeats + (high.repeats - low.repeats) * fraction
        depth = low.head_depth + (high.head_depth - low.head_depth) * fraction
    name, options, _, _ = _detector_backbone(low, high, fraction)
    nearer = low if fraction < 0.5 else high
    return replace(nearer, name=f"efficientdet(phi={phi:g})", backbone=name,
                   backbone_phi=options.pop("phi", None), backbone_options=tuple(sorted(options.items())),
                   input_size=128 * max(1, int(math.floor(size / 128 + 0.5))), width=make_divisible(width, 8),
                   repeats=max(1, int(math.floor(repeats + 0.5))), head_depth=max(1, int(math.floor(depth + 0.5))))


def _detector_backbone(low, high, fraction: float):
    """The backbone between two rows' backbones (D6 and D7 share B6)."""
    first, second = (int(row.backbone.rsplit("-b", 1)[1]) for row in (low, high))
    return backbone_at(first + (second - first) * fraction) if fraction else backbone_at(first)


def decoder_widths(channels: list[int], model_cfg) -> list[int]:
    """The U-Net decoder widths: as configured at every named scale, and so between them too (the table is
    constant); beyond B7 (or below B0) they grow by the width rule, 1.1^(phi - 7) (1.1^phi), multiples of 8."""
    from backbones.specs import make_divisible

    phi = model_cfg.phi
    if phi is None or 0 <= float(phi) <= LAST_NAMED:
        return list(channels)
    extra = float(phi) - LAST_NAMED if phi > LAST_NAMED else float(phi)
    return [make_divisible(c * BETA_WIDTH**extra, 8) for c in channels]


def bifpn_size(model_cfg) -> tuple[int, int]:
    """(BiFPN width, repeats) of a segmentation BiFPN head: the D-row of the scale (D_n for B_n), or the row
    :func:`detector_at` interpolates for a fractional phi."""
    from .schema import backbone_spec

    if model_cfg.phi is not None:
        row = detector_at(model_cfg.phi)
    else:
        from heads import efficientdet_preset

        name, _ = backbone_spec(model_cfg)
        index = name.rsplit("-b", 1)[-1]
        if not (name.startswith("efficientnet-b") and index.isdigit() and int(index) <= LAST_NAMED):
            raise ValueError(f"head='bifpn' on backbone {name!r}: no EfficientDet row to size the BiFPN from; "
                             f"set model.segmentation.bifpn_width and bifpn_repeats")
        row = efficientdet_preset(int(index))
    return row.width, row.repeats


def describe(cfg) -> dict:
    """What ``cfg``'s scale resolves to: the backbone (name, width/depth multipliers) and, per task, the
    input size, the decoder / BiFPN / head sizes. Plain data (printed, and saved as ``scale.json``)."""
    import backbones

    from .config import resolve_image_size
    from .schema import backbone_spec

    task, m = cfg.model.task, cfg.model
    info: dict = {"task": task, "phi": m.phi, "scale": m.scale, "input_size": list(resolve_image_size(cfg))}
    if task == "detection":
        preset = detector_at(detection_scale(m)) if m.phi is not None else None
        if preset is None:
            from heads import efficientdet_preset

            preset = efficientdet_preset(detection_scale(m))
        options = dict(preset.backbone_options)
        backbone = preset.backbone if preset.backbone_phi is None and not options else \
            backbones.get_preset("efficientnet", phi=preset.backbone_phi, **options).name
        info.update(detector=preset.name, backbone=backbone, bifpn_width=m.detection.width or preset.width,
                    bifpn_repeats=m.detection.repeats or preset.repeats,
                    head_depth=m.detection.head_depth or preset.head_depth, levels=list(preset.levels),
                    anchor_scale=m.detection.anchor_scale or preset.anchor_scale,
                    fusion=m.detection.fusion or preset.fusion)
        return info
    name, options = backbone_spec(m)
    preset = backbones.get_preset(name, **options)
    info.update(backbone=preset.name, width_multiplier=round(preset.width, 4), depth_multiplier=round(preset.depth, 4),
                named=m.phi is None or named_scale(m.phi) is not None)
    if task == "segmentation":
        head = m.segmentation
        info["head"] = head.head
        if head.head == "bifpn":
            from heads.bifpn_seg import levels_for_crop

            width, repeats = (head.bifpn_width, head.bifpn_repeats) if head.bifpn_width and head.bifpn_repeats \
                else bifpn_size(m)
            info.update(bifpn_width=head.bifpn_width or width, bifpn_repeats=head.bifpn_repeats or repeats,
                        bifpn_levels=list(head.bifpn_levels or levels_for_crop(resolve_image_size(cfg))))
        else:
            info["decoder_channels"] = decoder_widths(head.decoder_channels, m)
    return info

"""One knob for every task: what ``model.phi`` (or a named scale) resolves to.

The rules are the papers': backbone depth 1.2^phi and width 1.1^phi, classification resolution
224 * 1.15^phi; EfficientDet's BiFPN width 64 * 1.35^phi, repeats 3 + phi, head depth 3 + phi / 3,
input 512 + 128 phi; the U-Net's decoder widths grow with the backbone's width, 1.1^phi. The named
scales (an integral phi in 0..7, ``model.scale``, ``efficientnet-bN``) are exactly the published
tables (B0..B7: Tan & Le 2019, Table 1; D0..D7: the released EfficientDet configs) and smp's
U-Net decoder (256, 128, 64, 32, 16); a fractional phi interpolates by the rules.
:func:`describe` says what a config resolves to; training prints it and writes it to the run
directory (``scale.json``).
"""

from __future__ import annotations

from .schema import BETA_WIDTH_RULE, backbone_spec, detection_scale, named_scale

__all__ = ["decoder_widths", "bifpn_size", "describe"]


def _free_phi(model_cfg) -> float | None:
    """``model.phi`` when it is not a named scale (the rules apply), else None."""
    phi = model_cfg.phi
    return float(phi) if phi is not None and named_scale(phi) is None else None


def decoder_widths(channels: list[int], model_cfg) -> list[int]:
    """The U-Net decoder widths: as configured for a named scale, times 1.1^phi (multiples of 8) for a free phi."""
    from backbones.specs import make_divisible

    phi = _free_phi(model_cfg)
    if phi is None:
        return list(channels)
    return [make_divisible(c * BETA_WIDTH_RULE**phi, 8) for c in channels]


def bifpn_size(model_cfg) -> tuple[int, int]:
    """(BiFPN width, repeats) for a segmentation BiFPN head: the D-row of the scale (D_n for B_n), or the
    EfficientDet rule for a free phi (``tasks.segmentation_bifpn.bifpn_size``)."""
    from .segmentation_bifpn import bifpn_size as row_size

    return row_size(*backbone_spec(model_cfg))


def describe(cfg) -> dict:
    """What ``cfg``'s scale resolves to: the backbone (name, width/depth multipliers) and, per task, the
    input size, the decoder / BiFPN / head sizes. Plain data (printed, and saved as ``scale.json``)."""
    import backbones

    from .config import resolve_image_size

    task, m = cfg.model.task, cfg.model
    info: dict = {"task": task, "phi": m.phi, "scale": m.scale, "input_size": list(resolve_image_size(cfg))}
    if task == "detection":
        from heads import efficientdet_preset

        preset = efficientdet_preset(detection_scale(m))
        info.update(detector=preset.name, backbone=preset.backbone if preset.backbone_phi is None
                    else f"efficientnet(phi={preset.backbone_phi:g})", bifpn_width=m.detection.width or preset.width,
                    bifpn_repeats=m.detection.repeats or preset.repeats,
                    head_depth=m.detection.head_depth or preset.head_depth, levels=list(preset.levels),
                    anchor_scale=m.detection.anchor_scale or preset.anchor_scale,
                    fusion=m.detection.fusion or preset.fusion)
        return info
    name, options = backbone_spec(m)
    preset = backbones.get_preset(name, **options)
    info.update(backbone=preset.name, width_multiplier=round(preset.width, 4), depth_multiplier=round(preset.depth, 4),
                named=_free_phi(m) is None)
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

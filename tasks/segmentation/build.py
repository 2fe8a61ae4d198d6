"""``build_segmenter(head="bifpn")``: backbone taps for the pyramid levels + ``heads.bifpn_seg``.

Kept beside ``tasks.segmentation`` (which imports it lazily, as it does ``segmentation_smp``); the
arguments are ``build_segmenter``'s, documented there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from torch import nn

import backbones
from backbones.weights import read_state_dict
from heads.bifpn_seg import DEFAULT_LEVELS, TAP_LEVELS, BiFPNSegDecoder, BiFPNSegHead, backbone_taps, check_levels

from .segmentation import UNET_DEFAULTS, Segmenter, _assemble

__all__ = ["build_bifpn_segmenter", "bifpn_size"]


def bifpn_size(backbone: str, options: Mapping) -> tuple[int, int]:
    """(width, repeats) of the EfficientDet row at the backbone's scale (``heads.efficientdet_preset``)."""
    from heads.efficientdet import efficientdet_preset

    match = re.fullmatch(r"efficientnet-b([0-7])", backbone)
    if match:
        row = efficientdet_preset(int(match[1]))
    elif backbone == "efficientnet" and options.get("phi") is not None:
        row = efficientdet_preset(float(options["phi"]))
    else:
        raise ValueError(f"head='bifpn' on backbone {backbone!r}: no EfficientDet row to size the BiFPN from; "
                         f"expected bifpn_width and bifpn_repeats (or an efficientnet-b0..b7 / efficientnet+phi "
                         f"backbone)")
    return row.width, row.repeats


def build_bifpn_segmenter(backbone: str, num_classes: int, weights, bifpn: dict, unet: dict, aux_classes,
                           aux_dropout, aux_pooling, flavour, backbone_weights, backbone_options: dict) -> Segmenter:
    """``build_segmenter(head="bifpn")``: the backbone taps the levels need + BiFPN decoder + classifier."""
    from . import segmentation_smp as smp_interop

    if flavour not in (None, "effdense"):
        raise ValueError(f"flavour={flavour!r} is an smp U-Net layout; head='bifpn' has none -- drop flavour or "
                         f"use head='unet'")
    changed = [key for key, value in unet.items() if value != UNET_DEFAULTS[key]]
    if changed:
        raise ValueError(f"{', '.join(changed)} set with head='bifpn'; these are U-Net options, expected their "
                         f"defaults (or head='unet')")
    if backbone_options.get("output_stride", 32) != 32:
        raise ValueError(f"output_stride={backbone_options['output_stride']} with head='bifpn'; expected 32 (the "
                         f"pyramid takes the strided taps; dilation has no place in it)")
    state = label = None
    if weights is not None:  # read before building: a bad file fails fast
        label = os.fspath(weights)
        state = read_state_dict(label)
    levels = check_levels(bifpn["levels"] if bifpn["levels"] is not None else DEFAULT_LEVELS)
    refine = levels[0] > 1 if bifpn["refine"] is None else bool(bifpn["refine"])
    names = backbone_taps(levels, refine)
    width, repeats = bifpn["width"], bifpn["repeats"]
    if width is None or repeats is None:
        row_width, row_repeats = bifpn_size(backbone, backbone_options)
        width = row_width if width is None else width
        repeats = row_repeats if repeats is None else repeats
    net = backbones.create(backbone, out_indices=tuple(TAP_LEVELS[name] - 1 for name in names), **backbone_options)
    # The pyramid and classifier take the backbone's BatchNorm (B0-B4: PyTorch's 1e-5 / 0.1; TF's 1e-3 / 0.01 for
    # B5+): with TF's 0.01 momentum, a short run evaluates on running statistics that have barely moved.
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    norm = dict(norm_eps=bn.eps, norm_momentum=bn.momentum)
    decoder = BiFPNSegDecoder.for_backbone(net, width, repeats, levels, refine=refine, fusion=bifpn["fusion"] or "fast",
                                           refine_width=bifpn["refine_width"], padding=net.padding, **norm)
    head = BiFPNSegHead(decoder.out_channels, num_classes, depth=2 if bifpn["head_depth"] is None else
                        bifpn["head_depth"], **norm)
    flavour = smp_interop.detect_flavour(state, label) if state is not None else None
    return _assemble(net, decoder, head, aux_classes, aux_pooling, aux_dropout, backbone_weights, state, label, flavour)
